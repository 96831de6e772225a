"""The computed conclusion on constructed results: significant both ways, not significant, at chance."""

from __future__ import annotations

import pytest
from scipy import stats

from evals.report.conclusion import (
    SCORE_METRIC,
    SELECTIVITY_METRIC,
    Estimate,
    conclude,
    interval_comparison,
    paired_comparison,
    score_estimate,
    selectivity_estimate,
    welch_comparison,
)
from evals.unlearning.schema import UnlearningEvalOutput
from tests.evals.report.conftest import crossval_output, sweep_point, unlearning_output

BASELINES = ["fixed", "standard"]


def single_split(wmdp_correct: dict[str, int], at_chance: bool = False) -> dict[str, UnlearningEvalOutput]:
    """One unlearning result per variant; ``wmdp_correct`` of 100 known questions remain after the clamp."""
    results = {}
    for variant, correct in wmdp_correct.items():
        points = [
            sweep_point(95, 100, 100, 100, 50.0, forget_rise=0.1, retain_rise=0.05),
            sweep_point(correct, 100, 100, 100, 200.0, forget_rise=1.0 - correct / 100, retain_rise=0.1),
        ]
        results[variant] = unlearning_output(variant, points, at_chance=at_chance)
    return results


def outcomes(conclusion, metric: str) -> dict[str, str]:
    return {c.baseline: c.outcome for c in conclusion.comparisons if c.metric == metric}


def test_single_split_significantly_better() -> None:
    results = single_split({"adaptive": 30, "fixed": 78, "standard": 80})

    conclusion = conclude("adaptive", BASELINES, results, None, 0.05)

    assert conclusion.primary_metric == SCORE_METRIC
    assert conclusion.evidence.startswith("single split")
    assert outcomes(conclusion, SCORE_METRIC) == {"fixed": "better", "standard": "better"}
    assert outcomes(conclusion, SELECTIVITY_METRIC) == {"fixed": "better", "standard": "better"}
    assert "adaptive separates significantly better than fixed and standard" in conclusion.paragraph
    assert "test: do the 95% intervals overlap" in conclusion.paragraph


def test_single_split_significantly_worse() -> None:
    results = single_split({"adaptive": 80, "fixed": 30, "standard": 28})

    conclusion = conclude("adaptive", BASELINES, results, None, 0.05)

    assert outcomes(conclusion, SCORE_METRIC) == {"fixed": "worse", "standard": "worse"}
    assert "do not show that adaptive separates better" in conclusion.paragraph
    assert "significantly worse than fixed and standard" in conclusion.paragraph


def test_single_split_not_significant() -> None:
    results = single_split({"adaptive": 74, "fixed": 78, "standard": 80})

    conclusion = conclude("adaptive", BASELINES, results, None, 0.05)

    assert outcomes(conclusion, SCORE_METRIC) == {"fixed": "not significant", "standard": "not significant"}
    assert "not significantly different from fixed and standard" in conclusion.paragraph
    assert "significantly better" not in conclusion.paragraph


def test_single_split_at_chance_reads_loss() -> None:
    results = single_split({"adaptive": 30, "fixed": 78, "standard": 80}, at_chance=True)

    conclusion = conclude("adaptive", BASELINES, results, None, 0.05)

    assert conclusion.primary_metric == SELECTIVITY_METRIC
    assert "the base model is at chance on wmdp-bio" in conclusion.paragraph
    assert "accuracy 0.270" in conclusion.paragraph
    assert "reads the loss selectivity" in conclusion.paragraph
    assert f"on the {SELECTIVITY_METRIC}" in conclusion.paragraph.split(".")[0]
    score_comparisons = [c for c in conclusion.comparisons if c.metric == SCORE_METRIC]
    assert all("flagged unreliable" in c.sentence() for c in score_comparisons)


def test_mixed_outcomes_are_not_a_win() -> None:
    results = single_split({"adaptive": 30, "fixed": 35, "standard": 80})

    conclusion = conclude("adaptive", BASELINES, results, None, 0.05)

    assert outcomes(conclusion, SCORE_METRIC) == {"fixed": "not significant", "standard": "better"}
    assert "do not show" in conclusion.paragraph
    assert "significantly better than standard" in conclusion.paragraph


def test_missing_reference_gives_no_verdict() -> None:
    results = single_split({"fixed": 78, "standard": 80})

    conclusion = conclude("adaptive", BASELINES, results, None, 0.05)

    assert conclusion.primary_metric is None
    assert conclusion.paragraph.startswith("No conclusion")


def test_missing_baseline_is_named() -> None:
    results = single_split({"adaptive": 30, "fixed": 78})

    conclusion = conclude("adaptive", BASELINES, results, None, 0.05)

    assert "not compared with standard (no results)" in conclusion.paragraph


def test_score_estimate_uses_wilson_interval() -> None:
    result = single_split({"adaptive": 30})["adaptive"]

    estimate = score_estimate(result)

    assert estimate is not None
    assert estimate.value == pytest.approx(0.7)
    best = result.eval_result_details[1].wmdp_bio
    assert estimate.low == pytest.approx(1 - best.ci_high)
    assert estimate.high == pytest.approx(1 - best.ci_low)


def test_score_without_counted_point_is_zero() -> None:
    points = [sweep_point(30, 100, 90, 100, 200.0, forget_rise=0.5, retain_rise=0.1)]
    result = unlearning_output("adaptive", points)

    estimate = score_estimate(result)

    assert estimate is not None
    assert (estimate.value, estimate.low, estimate.high) == (0.0, 0.0, 0.0)
    assert "0 by rule" in estimate.source


def test_selectivity_reads_strongest_clamp() -> None:
    result = single_split({"adaptive": 30})["adaptive"]

    estimate = selectivity_estimate(result)

    assert estimate is not None
    assert estimate.value == pytest.approx(0.6)
    assert estimate.setting == (0.01, 10, 200.0)
    # Two independent half-widths of 0.05 combine to 0.05 * sqrt(2).
    assert estimate.high - estimate.value == pytest.approx(0.05 * 2**0.5)


def test_interval_comparison_rejects_other_settings() -> None:
    ref = Estimate(value=0.6, low=0.5, high=0.7, setting=(0.01, 10, 200.0), source="a")
    base = Estimate(value=0.1, low=0.0, high=0.2, setting=(0.01, 20, 200.0), source="b")

    comparison = interval_comparison(SELECTIVITY_METRIC, "adaptive", "fixed", ref, base)

    assert comparison.outcome == "not comparable"
    assert "different sweep points" in comparison.reason


def test_welch_matches_scipy() -> None:
    ref_values, base_values = [0.5, 0.6, 0.55, 0.7, 0.65], [0.2, 0.3, 0.25, 0.1, 0.2]
    ref = Estimate(value=sum(ref_values) / 5, fold_values=ref_values)
    base = Estimate(value=sum(base_values) / 5, fold_values=base_values)

    comparison = welch_comparison(SCORE_METRIC, "adaptive", "fixed", ref, base, 0.05)

    expected = stats.ttest_ind(ref_values, base_values, equal_var=False).pvalue
    assert comparison.p_value == pytest.approx(expected)
    assert comparison.outcome == "better"


def test_welch_zero_variance_is_not_comparable() -> None:
    ref = Estimate(value=0.0, fold_values=[0.0, 0.0, 0.0])
    base = Estimate(value=0.0, fold_values=[0.0, 0.0, 0.0])

    comparison = welch_comparison(SCORE_METRIC, "adaptive", "fixed", ref, base, 0.05)

    assert comparison.outcome == "not comparable"


def fold_estimate(values: list[float], folds: list[int]) -> Estimate:
    return Estimate(value=sum(values) / len(values), fold_values=values, fold_ids=folds)


def test_paired_matches_scipy() -> None:
    # Folds differ a lot from each other, but the reference is above the baseline in
    # every fold by about 0.05: significant when paired, not when unpaired.
    base_values = [0.1, 0.4, 0.7, 0.2, 0.9]
    ref_values = [value + shift for value, shift in zip(base_values, [0.05, 0.06, 0.04, 0.05, 0.055], strict=True)]
    ref = fold_estimate(ref_values, [0, 1, 2, 3, 4])
    base = fold_estimate(base_values, [0, 1, 2, 3, 4])

    paired = paired_comparison(SCORE_METRIC, "adaptive", "fixed", ref, base, 0.05)
    unpaired = welch_comparison(SCORE_METRIC, "adaptive", "fixed", ref, base, 0.05)

    assert paired.p_value == pytest.approx(stats.ttest_rel(ref_values, base_values).pvalue)
    assert paired.outcome == "better"
    assert unpaired.outcome == "not significant"


def test_paired_uses_common_folds_only() -> None:
    ref = fold_estimate([0.5, 0.7, 0.9], [0, 2, 4])
    base = fold_estimate([0.1, 0.3, 0.2, 0.4], [0, 1, 2, 3])

    comparison = paired_comparison(SCORE_METRIC, "adaptive", "fixed", ref, base, 0.05)

    assert comparison.method.startswith("paired t-test over 2 common folds")
    assert comparison.p_value == pytest.approx(stats.ttest_rel([0.5, 0.7], [0.1, 0.2]).pvalue)


def test_paired_needs_two_common_folds() -> None:
    ref = fold_estimate([0.5, 0.9], [0, 4])
    base = fold_estimate([0.1, 0.3], [0, 1])

    comparison = paired_comparison(SCORE_METRIC, "adaptive", "fixed", ref, base, 0.05)

    assert comparison.outcome == "not comparable"
    assert "got 1" in comparison.reason


def test_paired_without_fold_ids_is_welch() -> None:
    ref = Estimate(value=0.6, fold_values=[0.5, 0.6, 0.7])
    base = Estimate(value=0.2, fold_values=[0.1, 0.2, 0.3])

    comparison = paired_comparison(SCORE_METRIC, "adaptive", "fixed", ref, base, 0.05)

    assert comparison.method.startswith("Welch")


def test_crossval_significantly_better() -> None:
    crossval = crossval_output({
        "adaptive": [0.5, 0.6, 0.55, 0.7, 0.65],
        "fixed": [0.2, 0.3, 0.25, 0.1, 0.2],
        "standard": [0.1, 0.15, 0.2, 0.1, 0.05],
    })
    # The single-split results point the other way, so a verdict of "better" can only come from the folds.
    results = single_split({"adaptive": 80, "fixed": 30, "standard": 30})

    conclusion = conclude("adaptive", BASELINES, results, crossval, 0.05)

    assert conclusion.evidence == "cross-validation over 5 folds"
    assert outcomes(conclusion, SCORE_METRIC) == {"fixed": "better", "standard": "better"}
    assert "mean ± std over 5 folds" in conclusion.paragraph
    assert "paired t-test over 5 common folds" in conclusion.paragraph
    assert "separates significantly better than fixed and standard" in conclusion.paragraph


def test_crossval_significantly_worse() -> None:
    crossval = crossval_output({
        "adaptive": [0.1, 0.15, 0.2, 0.1, 0.05],
        "fixed": [0.5, 0.6, 0.55, 0.7, 0.65],
        "standard": [0.5, 0.6, 0.55, 0.7, 0.65],
    })

    conclusion = conclude("adaptive", BASELINES, {}, crossval, 0.05)

    assert outcomes(conclusion, SCORE_METRIC) == {"fixed": "worse", "standard": "worse"}
    assert "significantly worse than fixed and standard" in conclusion.paragraph


def test_crossval_not_significant() -> None:
    crossval = crossval_output({
        "adaptive": [0.3, 0.6, 0.2, 0.5, 0.4],
        "fixed": [0.4, 0.2, 0.5, 0.3, 0.35],
        "standard": [0.35, 0.45, 0.25, 0.5, 0.3],
    })

    conclusion = conclude("adaptive", BASELINES, {}, crossval, 0.05)

    assert outcomes(conclusion, SCORE_METRIC) == {"fixed": "not significant", "standard": "not significant"}
    assert "not significantly different" in conclusion.paragraph


def test_crossval_at_chance_reads_loss() -> None:
    crossval = crossval_output(
        {"adaptive": [0.5, 0.6, 0.55], "fixed": [0.2, 0.3, 0.25], "standard": [0.1, 0.15, 0.2]}, at_chance=True
    )

    conclusion = conclude("adaptive", BASELINES, {}, crossval, 0.05)

    assert conclusion.primary_metric == SELECTIVITY_METRIC
    assert "at chance on WMDP-bio in 3 of 3 folds" in conclusion.paragraph


def test_alpha_changes_the_verdict() -> None:
    crossval = crossval_output({"adaptive": [0.5, 0.7, 0.4], "fixed": [0.3, 0.4, 0.2], "standard": [0.3, 0.4, 0.2]})

    loose = conclude("adaptive", BASELINES, {}, crossval, 0.2)
    strict = conclude("adaptive", BASELINES, {}, crossval, 0.01)

    p_value = next(c.p_value for c in loose.comparisons if c.metric == SCORE_METRIC)
    assert 0.01 < p_value < 0.2
    assert outcomes(loose, SCORE_METRIC)["fixed"] == "better"
    assert outcomes(strict, SCORE_METRIC)["fixed"] == "not significant"
