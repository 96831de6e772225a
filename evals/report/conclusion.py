"""The report's conclusion, computed from the results: does the reference variant separate better?

Separation is measured by two numbers, higher is better for both:

- the unlearning score, ``1 - WMDP-bio accuracy`` on the known questions at the sweep
  point that sets SAEBench's score;
- the loss selectivity, ``forget loss rise - retain loss rise`` (nats per token) at the
  strongest clamp of the sweep: how much more the intervention hurts held-out forget
  text than held-out retain text. The point is fixed in advance, not picked for its
  result.

Two kinds of evidence are used, the first one available:

1. Cross-validation: a metric's values over folds for each variant. Every variant is
   evaluated on the same folds, so the reference and a baseline are compared fold by
   fold: they differ significantly when the two-sided paired t-test over the folds
   both have gives ``p < alpha``. The pairing removes what the folds share (easier or
   harder questions and texts). Estimates without fold numbers fall back on Welch's
   unpaired t-test.
2. One eval run per variant: the 95% intervals stored in the unlearning results
   (Wilson intervals for accuracies, Student-t intervals for loss rises). The variants
   differ significantly only when the intervals do not overlap. Two non-overlapping
   95% intervals imply a difference at a level well below 5%, so this test is
   conservative: a real difference can read as "not significant".

The unlearning score is the primary metric unless the base model is at chance on
WMDP-bio or a known set is too small. Then the score measures little real knowledge
removal (the unlearning eval flags it), and the loss selectivity is the
primary metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from scipy import stats

from evals.crossval.schema import CrossvalEvalOutput, PointSummary
from evals.unlearning.schema import (
    CHANCE_ACCURACY,
    LossRise,
    UnlearningEvalOutput,
    UnlearningSweepPoint,
)

Outcome = Literal["better", "worse", "not significant", "not comparable"]

SCORE_METRIC = "unlearning score"
SELECTIVITY_METRIC = "loss selectivity"
WMDP_SET = "wmdp-bio"
MMLU_POOLED_SET = "mmlu"


@dataclass
class Estimate:
    """One variant's value of a separation metric and its uncertainty.

    Attributes:
        value: The metric (a mean over folds for cross-validated estimates).
        low: Lower end of its 95% interval; None without an interval.
        high: Upper end of its 95% interval; None without an interval.
        fold_values: The per-fold values of a cross-validated estimate, else None.
        fold_ids: The fold number of each of ``fold_values``, for paired tests, or None.
        source: Where the value comes from, e.g. the sweep point, for the report.
        setting: (retain_threshold, n_features, multiplier) of the fixed sweep point the
            value is read at, or None. Estimates at different settings are not compared.
    """

    value: float
    low: float | None = None
    high: float | None = None
    fold_values: list[float] | None = None
    fold_ids: list[int] | None = None
    source: str = ""
    setting: tuple[float, int, float] | None = None

    def describe(self) -> str:
        """Format the value with its interval or its fold spread."""
        if self.fold_values is not None:
            n = len(self.fold_values)
            std = stdev(self.fold_values)
            spread = "n/a" if std is None else f"{std:.3f}"
            return f"{self.value:.3f} ± {spread} (mean ± std over {n} folds)"
        if self.low is not None and self.high is not None:
            return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"
        return f"{self.value:.3f}"


@dataclass
class Comparison:
    """The reference variant against one baseline on one metric.

    Attributes:
        metric: ``unlearning score`` or ``loss selectivity``.
        reference: The reference variant.
        baseline: The baseline variant.
        method: The test used, in words.
        outcome: ``better`` or ``worse`` (the reference against the baseline, significant),
            ``not significant``, or ``not comparable`` (a value or interval is missing).
        reference_estimate: The reference's estimate, or None.
        baseline_estimate: The baseline's estimate, or None.
        p_value: The test's p-value; None for the interval test.
        reason: Why the comparison is not comparable, or an empty string.
        qualifier: A flag that weakens the comparison (e.g. an unreliable score), shown
            after it, or an empty string.
    """

    metric: str
    reference: str
    baseline: str
    method: str
    outcome: Outcome
    reference_estimate: Estimate | None = None
    baseline_estimate: Estimate | None = None
    p_value: float | None = None
    reason: str = ""
    qualifier: str = ""

    def sentence(self) -> str:
        """Describe the comparison in one sentence."""
        if self.outcome == "not comparable":
            return f"{self.reference} vs {self.baseline} on the {self.metric}: not comparable, {self.reason}."
        assert self.reference_estimate is not None and self.baseline_estimate is not None
        values = (
            f"{self.reference} {self.reference_estimate.describe()} vs "
            f"{self.baseline} {self.baseline_estimate.describe()}"
        )
        test = self.method if self.p_value is None else f"{self.method}, p = {self.p_value:.3g}"
        if self.outcome == "not significant":
            verdict = "the difference is not significant"
        else:
            verdict = f"{self.reference} is significantly {self.outcome} than {self.baseline}"
        qualifier = f", but {self.qualifier}" if self.qualifier else ""
        return f"On the {self.metric}, {values}: {verdict} ({test}){qualifier}."


@dataclass
class Conclusion:
    """The computed conclusion of a report.

    Attributes:
        reference: The variant tested.
        evidence: ``cross-validation`` or ``single split`` (one eval run per variant),
            or ``none``.
        primary_metric: The metric the verdict reads, or None when nothing was comparable.
        comparisons: Every comparison made, primary and secondary metrics.
        caveats: Facts that qualify the results, such as a base model at chance.
        paragraph: The conclusion in prose, built from the fields above.
    """

    reference: str
    evidence: str
    primary_metric: str | None
    comparisons: list[Comparison]
    caveats: list[str] = field(default_factory=list)
    paragraph: str = ""


def stdev(values: list[float]) -> float | None:
    """Return the sample standard deviation (n - 1 in the denominator), None below two values."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))


# Tests


def setting_mismatch(ref: Estimate | None, base: Estimate | None) -> str:
    """Return why two estimates read at different sweep settings cannot be compared, or ''."""
    if ref is None or base is None or ref.setting is None or base.setting is None:
        return ""
    if ref.setting == base.setting:
        return ""
    return f"they are read at different sweep points ({ref.source} vs {base.source})"


def welch_comparison(
    metric: str, reference: str, baseline: str, ref: Estimate, base: Estimate, alpha: float
) -> Comparison:
    """Compare two cross-validated estimates with Welch's two-sided t-test over folds."""
    assert ref.fold_values is not None and base.fold_values is not None
    comparison = Comparison(
        metric=metric, reference=reference, baseline=baseline,
        method=f"Welch's t-test over folds, alpha = {alpha}", outcome="not significant",
        reference_estimate=ref, baseline_estimate=base,
    )
    n_ref, n_base = len(ref.fold_values), len(base.fold_values)
    mismatch = setting_mismatch(ref, base)
    if mismatch:
        return replace(comparison, outcome="not comparable", reason=mismatch)
    if n_ref < 2 or n_base < 2:
        return replace(
            comparison, outcome="not comparable",
            reason=f"Welch's test needs two folds per variant, got {n_ref} and {n_base}",
        )
    std_ref, std_base = stdev(ref.fold_values), stdev(base.fold_values)
    assert std_ref is not None and std_base is not None
    mean_ref = sum(ref.fold_values) / n_ref
    mean_base = sum(base.fold_values) / n_base

    if std_ref == 0.0 and std_base == 0.0:
        # The t statistic is undefined. Equal constant values do not differ; distinct
        # constants would give p = 0, which a handful of folds cannot support.
        return replace(
            comparison, outcome="not comparable",
            reason="every fold has the same value in both variants, so Welch's test is undefined",
        )
    result = stats.ttest_ind_from_stats(
        mean_ref, std_ref, n_ref, mean_base, std_base, n_base, equal_var=False
    )
    p_value = float(result.pvalue)
    if p_value < alpha:
        outcome: Outcome = "better" if mean_ref > mean_base else "worse"
    else:
        outcome = "not significant"
    return replace(comparison, outcome=outcome, p_value=p_value)


def paired_comparison(
    metric: str, reference: str, baseline: str, ref: Estimate, base: Estimate, alpha: float
) -> Comparison:
    """Compare two cross-validated estimates with a two-sided paired t-test over their common folds.

    Falls back on `welch_comparison` when either estimate lacks fold numbers.
    """
    if ref.fold_ids is None or base.fold_ids is None:
        return welch_comparison(metric, reference, baseline, ref, base, alpha)
    assert ref.fold_values is not None and base.fold_values is not None
    comparison = Comparison(
        metric=metric, reference=reference, baseline=baseline,
        method=f"paired t-test over folds, alpha = {alpha}", outcome="not significant",
        reference_estimate=ref, baseline_estimate=base,
    )
    mismatch = setting_mismatch(ref, base)
    if mismatch:
        return replace(comparison, outcome="not comparable", reason=mismatch)

    base_by_fold = dict(zip(base.fold_ids, base.fold_values, strict=True))
    pairs = [
        (value, base_by_fold[fold])
        for fold, value in zip(ref.fold_ids, ref.fold_values, strict=True)
        if fold in base_by_fold
    ]
    if len(pairs) < 2:
        return replace(
            comparison, outcome="not comparable",
            reason=f"the paired test needs two folds with a value in both variants, got {len(pairs)}",
        )
    differences = [a - b for a, b in pairs]
    spread = stdev(differences)
    assert spread is not None
    if spread <= 1e-12 * max(1.0, max(abs(value) for value in differences)):
        # The t statistic is undefined. A difference that is the same in every fold
        # would give p = 0, which a handful of folds cannot support.
        return replace(
            comparison, outcome="not comparable",
            reason="the difference is the same in every fold, so the paired t-test is undefined",
        )
    result = stats.ttest_rel([a for a, _ in pairs], [b for _, b in pairs])
    p_value = float(result.pvalue)
    mean_difference = sum(differences) / len(differences)
    if p_value < alpha:
        outcome: Outcome = "better" if mean_difference > 0 else "worse"
    else:
        outcome = "not significant"
    method = f"paired t-test over {len(pairs)} common folds, alpha = {alpha}"
    return replace(comparison, outcome=outcome, p_value=p_value, method=method)


def interval_comparison(
    metric: str, reference: str, baseline: str, ref: Estimate | None, base: Estimate | None
) -> Comparison:
    """Compare two estimates by whether their 95% intervals overlap."""
    comparison = Comparison(
        metric=metric, reference=reference, baseline=baseline,
        method="test: do the 95% intervals overlap", outcome="not significant",
        reference_estimate=ref, baseline_estimate=base,
    )
    for name, estimate in ((reference, ref), (baseline, base)):
        if estimate is None:
            return replace(comparison, outcome="not comparable", reason=f"{name} has no {metric}")
        if estimate.low is None or estimate.high is None:
            return replace(
                comparison, outcome="not comparable",
                reason=f"{name}'s {metric} has no interval ({estimate.source})",
            )
    assert ref is not None and base is not None
    mismatch = setting_mismatch(ref, base)
    if mismatch:
        return replace(comparison, outcome="not comparable", reason=mismatch)
    assert ref.low is not None and ref.high is not None
    assert base.low is not None and base.high is not None
    if ref.low > base.high:
        return replace(comparison, outcome="better")
    if ref.high < base.low:
        return replace(comparison, outcome="worse")
    return comparison


# Estimates from one unlearning result


def find_point(
    result: UnlearningEvalOutput, retain_threshold: float, n_features: int, multiplier: float
) -> UnlearningSweepPoint | None:
    """Return the sweep point with these settings, or None."""
    for point in result.eval_result_details:
        if (
            point.retain_threshold == retain_threshold
            and point.n_features == n_features
            and point.multiplier == multiplier
        ):
            return point
    return None


def describe_point(point: UnlearningSweepPoint) -> str:
    """Name a sweep point by its settings."""
    return (
        f"retain_threshold {point.retain_threshold:g}, n_features {point.n_features}, "
        f"multiplier {point.multiplier:g}"
    )


def score_point(result: UnlearningEvalOutput) -> UnlearningSweepPoint | None:
    """Return the sweep point that sets the unlearning score, or None when no point counted."""
    metrics = result.eval_result_metrics.unlearning
    if (
        metrics.best_retain_threshold is None
        or metrics.best_n_features is None
        or metrics.best_multiplier is None
    ):
        return None
    return find_point(
        result, metrics.best_retain_threshold, metrics.best_n_features, metrics.best_multiplier
    )


def strongest_point(points: list[UnlearningSweepPoint]) -> UnlearningSweepPoint | None:
    """Return the strongest clamp of a sweep: largest multiplier, then most features, then highest retain threshold.

    The loss selectivity is read at this point, a rule fixed in advance, so that no
    point is picked for its result and the same point exists in every fold.
    """
    if not points:
        return None
    return max(points, key=lambda item: (item.multiplier, item.n_features, item.retain_threshold))


def score_estimate(result: UnlearningEvalOutput) -> Estimate | None:
    """Return the unlearning score with the Wilson interval of the accuracy behind it.

    None when the score is None (an empty known set). When no sweep point keeps MMLU
    above the threshold, SAEBench's rule sets the score to 0, with no uncertainty.
    """
    metrics = result.eval_result_metrics.unlearning
    if metrics.unlearning_score is None:
        return None
    point = score_point(result)
    if point is None:
        return Estimate(
            value=metrics.unlearning_score, low=metrics.unlearning_score,
            high=metrics.unlearning_score,
            source="no sweep point kept MMLU accuracy at the threshold, so the score is 0 by rule",
        )
    accuracy = point.wmdp_bio
    if accuracy.ci_low is None or accuracy.ci_high is None:
        return Estimate(value=metrics.unlearning_score, source=describe_point(point))
    return Estimate(
        value=metrics.unlearning_score,
        low=1.0 - accuracy.ci_high,
        high=1.0 - accuracy.ci_low,
        source=f"{describe_point(point)}, {accuracy.n} known WMDP-bio questions",
    )


def selectivity(forget: LossRise, retain: LossRise) -> tuple[float, float | None, float | None] | None:
    """Return forget rise - retain rise with an approximate 95% interval, or None.

    The two rises are means over disjoint context samples, so their errors are
    independent and the interval's half-width is the root sum of squares of theirs.
    NOTE: this is exact for normal errors. With Student-t intervals over few contexts
    it slightly misstates the coverage.
    """
    if forget.mean_rise is None or retain.mean_rise is None:
        return None
    value = forget.mean_rise - retain.mean_rise
    if None in (forget.ci_low, forget.ci_high, retain.ci_low, retain.ci_high):
        return value, None, None
    assert forget.ci_low is not None and forget.ci_high is not None
    assert retain.ci_low is not None and retain.ci_high is not None
    half_width = math.hypot(
        (forget.ci_high - forget.ci_low) / 2, (retain.ci_high - retain.ci_low) / 2
    )
    return value, value - half_width, value + half_width


def selectivity_estimate(result: UnlearningEvalOutput) -> Estimate | None:
    """Return the loss selectivity at the strongest clamp, or None without loss rises."""
    point = strongest_point(result.eval_result_details)
    if point is None or point.loss_rise is None:
        return None
    forget, retain = point.loss_rise.get("forget"), point.loss_rise.get("retain")
    if forget is None or retain is None:
        return None
    values = selectivity(forget, retain)
    if values is None:
        return None
    value, low, high = values
    return Estimate(
        value=value, low=low, high=high,
        source=f"{describe_point(point)}, {forget.n_contexts} forget and {retain.n_contexts} retain contexts",
        setting=(point.retain_threshold, point.n_features, point.multiplier),
    )


def set_caveats(result: UnlearningEvalOutput) -> list[str]:
    """Return the honesty flags of one result as clauses (at chance, known set too small)."""
    caveats = []
    for name in (WMDP_SET, MMLU_POOLED_SET):
        summary = result.eval_result_metrics.question_sets.get(name)
        if summary is None:
            continue
        if summary.at_chance:
            interval = (
                ""
                if summary.base_ci_low is None or summary.base_ci_high is None
                else f" [{summary.base_ci_low:.3f}, {summary.base_ci_high:.3f}]"
            )
            caveats.append(
                f"the base model is at chance on {name}: accuracy {summary.base_accuracy:.3f}"
                f"{interval} on {summary.n_questions} questions includes chance ({CHANCE_ACCURACY})"
            )
        if summary.known_too_small:
            caveats.append(f"the {name} known set is too small ({summary.n_known} questions)")
    return caveats


def collect_caveats(unlearning: dict[str, UnlearningEvalOutput], variants: list[str]) -> list[str]:
    """Return each distinct honesty flag once, naming the variants whose eval raised it."""
    raised_by: dict[str, list[str]] = {}
    for variant in variants:
        if variant in unlearning:
            for caveat in set_caveats(unlearning[variant]):
                raised_by.setdefault(caveat, []).append(variant)
    return [
        f"In the unlearning eval of {', '.join(names)}, {caveat}."
        for caveat, names in raised_by.items()
    ]


def score_is_reliable(result: UnlearningEvalOutput) -> bool:
    """Return whether the unlearning eval marks its score reliable (not at chance, known sets large enough)."""
    return result.eval_result_metrics.unlearning.reliable


# The verdict


def verdict_sentence(conclusion: Conclusion, baselines: list[str]) -> str:
    """Summarize the primary comparisons in one sentence."""
    primary = [c for c in conclusion.comparisons if c.metric == conclusion.primary_metric]
    by_outcome: dict[str, list[str]] = {}
    for comparison in primary:
        by_outcome.setdefault(comparison.outcome, []).append(comparison.baseline)
    reference = conclusion.reference
    compared = " and ".join(baselines)
    if primary and by_outcome.get("better") == [c.baseline for c in primary] and len(primary) == len(baselines):
        return (
            f"Verdict: {reference} separates significantly better than {compared} on the "
            f"{conclusion.primary_metric} ({conclusion.evidence})."
        )
    parts = []
    if "better" in by_outcome:
        parts.append(f"significantly better than {' and '.join(by_outcome['better'])}")
    if "worse" in by_outcome:
        parts.append(f"significantly worse than {' and '.join(by_outcome['worse'])}")
    if "not significant" in by_outcome:
        parts.append(f"not significantly different from {' and '.join(by_outcome['not significant'])}")
    if "not comparable" in by_outcome:
        parts.append(f"not comparable with {' and '.join(by_outcome['not comparable'])}")
    missing = [name for name in baselines if name not in {c.baseline for c in primary}]
    if missing:
        parts.append(f"not compared with {' and '.join(missing)} (no results)")
    return (
        f"Verdict: the results do not show that {reference} separates better than {compared}: "
        f"on the {conclusion.primary_metric} ({conclusion.evidence}) it is {'; '.join(parts)}."
    )


def build_paragraph(conclusion: Conclusion, baselines: list[str]) -> str:
    """Assemble the conclusion paragraph from the comparisons and caveats."""
    if conclusion.primary_metric is None:
        sentences = [
            f"No conclusion on whether {conclusion.reference} separates better than "
            f"{' and '.join(baselines)}: {conclusion.evidence}."
        ]
        return " ".join(sentences + conclusion.caveats)
    sentences = [verdict_sentence(conclusion, baselines)]
    sentences += conclusion.caveats
    sentences += [comparison.sentence() for comparison in conclusion.comparisons]
    return " ".join(sentences)


def single_split_conclusion(
    reference: str, baselines: list[str], unlearning: dict[str, UnlearningEvalOutput]
) -> Conclusion:
    """Conclude from one unlearning result per variant, with the intervals stored in them."""
    caveats = collect_caveats(unlearning, [reference, *baselines])

    if reference not in unlearning:
        return Conclusion(
            reference=reference, evidence=f"{reference} has no unlearning result",
            primary_metric=None, comparisons=[], caveats=caveats,
        )

    compared = [name for name in baselines if name in unlearning]
    reliable = all(score_is_reliable(unlearning[name]) for name in [reference, *compared])
    primary = SCORE_METRIC if reliable else SELECTIVITY_METRIC
    if not reliable:
        caveats.append(
            "Because the unlearning score is flagged unreliable, the verdict reads the loss "
            "selectivity (forget loss rise minus retain loss rise) instead."
        )

    comparisons = []
    for baseline in compared:
        ref_result, base_result = unlearning[reference], unlearning[baseline]
        comparisons.append(
            interval_comparison(
                SCORE_METRIC, reference, baseline,
                score_estimate(ref_result), score_estimate(base_result),
            )
        )
        comparisons.append(
            interval_comparison(
                SELECTIVITY_METRIC, reference, baseline,
                selectivity_estimate(ref_result), selectivity_estimate(base_result),
            )
        )
    if not reliable:
        mark_unreliable_scores(comparisons)
    # Primary comparisons first, so that the paragraph reads the verdict's evidence first.
    comparisons.sort(key=lambda comparison: comparison.metric != primary)
    return Conclusion(
        reference=reference,
        evidence="single split, one eval run per variant",
        primary_metric=primary,
        comparisons=comparisons,
        caveats=caveats,
    )


def mark_unreliable_scores(comparisons: list[Comparison]) -> None:
    """Qualify the unlearning score comparisons when the score is flagged unreliable."""
    for comparison in comparisons:
        if comparison.metric == SCORE_METRIC and comparison.outcome != "not comparable":
            comparison.qualifier = "the score is flagged unreliable and measures little knowledge removal"


def crossval_conclusion(
    reference: str,
    baselines: list[str],
    fold_estimates: dict[str, dict[str, Estimate]],
    reliable: bool,
    alpha: float,
    caveats: list[str],
) -> Conclusion:
    """Conclude from per-fold values, ``fold_estimates[metric][variant]``, with paired t-tests."""
    primary = SCORE_METRIC if reliable else SELECTIVITY_METRIC
    if primary not in fold_estimates:
        # Fall back on the metric the cross-validation has, saying so.
        available = [metric for metric in (SCORE_METRIC, SELECTIVITY_METRIC) if metric in fold_estimates]
        if not available:
            return Conclusion(
                reference=reference, evidence="the cross-validation result has no usable metric",
                primary_metric=None, comparisons=[], caveats=caveats,
            )
        caveats = [*caveats, f"The cross-validation has no {primary}; the verdict reads the {available[0]}."]
        primary = available[0]

    comparisons = []
    for metric, by_variant in fold_estimates.items():
        if reference not in by_variant:
            continue
        for baseline in baselines:
            if baseline in by_variant:
                comparisons.append(
                    paired_comparison(metric, reference, baseline, by_variant[reference], by_variant[baseline], alpha)
                )
    if not reliable:
        mark_unreliable_scores(comparisons)
    comparisons.sort(key=lambda comparison: comparison.metric != primary)
    if not any(comparison.metric == primary for comparison in comparisons):
        return Conclusion(
            reference=reference,
            evidence=f"the cross-validation has no {primary} for {reference} and a baseline",
            primary_metric=None, comparisons=comparisons, caveats=caveats,
        )
    n_folds = {len(c.reference_estimate.fold_values or []) for c in comparisons if c.reference_estimate}
    folds = "/".join(str(n) for n in sorted(n_folds))
    return Conclusion(
        reference=reference,
        evidence=f"cross-validation over {folds} folds",
        primary_metric=primary,
        comparisons=comparisons,
        caveats=caveats,
    )



# Cross-validation


def present_folds(values: list[float | None]) -> list[tuple[int, float]]:
    """Return ``(fold, value)`` for the folds that have a value."""
    return [(fold, value) for fold, value in enumerate(values) if value is not None]


def crossval_estimates(output: CrossvalEvalOutput) -> dict[str, dict[str, Estimate]]:
    """Return the per-fold unlearning score and loss selectivity of every variant.

    The selectivity of a fold is its forget loss rise minus its retain loss rise at the
    strongest clamp of the sweep. Folds missing either rise are left out.
    """
    estimates: dict[str, dict[str, Estimate]] = {SCORE_METRIC: {}, SELECTIVITY_METRIC: {}}
    for variant, summary in output.eval_result_metrics.variants.items():
        score_folds = present_folds(summary.unlearning_score.values)
        if score_folds:
            scores = [value for _, value in score_folds]
            estimates[SCORE_METRIC][variant] = Estimate(
                value=sum(scores) / len(scores), fold_values=scores,
                fold_ids=[fold for fold, _ in score_folds],
                source=f"{len(scores)} of {summary.n_folds} folds have a score",
            )
        point = strongest_point_summary(summary.sweep_points)
        if point is None:
            continue
        folds_and_differences = [
            (fold, forget - retain)
            for fold, (forget, retain) in enumerate(
                zip(point.forget_loss_rise.values, point.retain_loss_rise.values, strict=True)
            )
            if forget is not None and retain is not None
        ]
        if folds_and_differences:
            differences = [value for _, value in folds_and_differences]
            estimates[SELECTIVITY_METRIC][variant] = Estimate(
                value=sum(differences) / len(differences), fold_values=differences,
                fold_ids=[fold for fold, _ in folds_and_differences],
                source=(
                    f"retain_threshold {point.retain_threshold:g}, n_features {point.n_features}, "
                    f"multiplier {point.multiplier:g}"
                ),
                setting=(point.retain_threshold, point.n_features, point.multiplier),
            )
    return {metric: values for metric, values in estimates.items() if values}


def strongest_point_summary(points: list[PointSummary]) -> PointSummary | None:
    """Return the strongest clamp of a cross-validated sweep, by the rule of ``strongest_point``."""
    if not points:
        return None
    return max(points, key=lambda item: (item.multiplier, item.n_features, item.retain_threshold))


def crossval_caveats(output: CrossvalEvalOutput, variants: list[str]) -> list[str]:
    """Count the folds whose base model is at chance or whose known sets are too small."""
    caveats = []
    for variant in variants:
        folds = [fold for fold in output.eval_result_details if fold.variant == variant]
        if not folds:
            continue
        at_chance = [fold.fold for fold in folds if fold.wmdp_bio.at_chance]
        too_small = [fold.fold for fold in folds if fold.wmdp_bio.known_too_small]
        if at_chance:
            accuracies = ", ".join(f"{fold.wmdp_bio.base_accuracy:.3f}" for fold in folds if fold.wmdp_bio.at_chance)
            caveats.append(
                f"the base model is at chance on WMDP-bio in {len(at_chance)} of {len(folds)} folds "
                f"(folds {at_chance}, base accuracies {accuracies}; chance is {CHANCE_ACCURACY})"
            )
        if too_small:
            caveats.append(f"the WMDP-bio known set is too small in folds {too_small}")
        if any(fold.mmlu.at_chance for fold in folds):
            caveats.append("the base model is at chance on the pooled MMLU subjects")
    return caveats


def crossval_reliable(output: CrossvalEvalOutput, variants: list[str]) -> bool:
    """Return whether every fold of every listed variant has a score marked reliable."""
    summaries = output.eval_result_metrics.variants
    return all(
        summaries[name].n_reliable_folds == summaries[name].n_folds for name in variants if name in summaries
    )


# Entry point


def conclude(
    reference: str,
    baselines: list[str],
    unlearning: dict[str, UnlearningEvalOutput],
    crossval: CrossvalEvalOutput | None,
    alpha: float,
) -> Conclusion:
    """Compute the conclusion: cross-validation when it covers the reference, else one result per variant."""
    if crossval is not None and reference in crossval.eval_result_metrics.variants:
        names = [reference, *baselines]
        raised_by: dict[str, list[str]] = {}
        for variant in names:
            for caveat in crossval_caveats(crossval, [variant]):
                raised_by.setdefault(caveat, []).append(variant)
        caveats = [f"In the cross-validation of {', '.join(v)}, {caveat}." for caveat, v in raised_by.items()]
        reliable = crossval_reliable(crossval, names)
        if not reliable:
            caveats.append(
                "Because some folds' unlearning scores are flagged unreliable, the verdict reads the loss "
                "selectivity (forget loss rise minus retain loss rise) instead."
            )
        conclusion = crossval_conclusion(
            reference, baselines, crossval_estimates(crossval), reliable, alpha, caveats
        )
    else:
        conclusion = single_split_conclusion(reference, baselines, unlearning)
        if crossval is not None:
            conclusion.caveats.append(
                f"The cross-validation result has no {reference} variant, so it was not used."
            )
    conclusion.paragraph = build_paragraph(conclusion, baselines)
    return conclusion
