"""Synthetic experiment directories whose result files follow the real eval schemas.

Every result is built with the eval's pydantic model and written with
``write_eval_output``, as the evals write them, so a schema change breaks these
fixtures instead of letting the report read a stale layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from evals.bounds.schema import (
    BoundsEvalOutput,
    BoundsMetricCategories,
    BoundsSummary,
    DamageBoundMetrics,
    DamageMultiplierResult,
    FiringBoundMetrics,
    FiringBoundSummary,
    LatentBoundDetail,
    PerTokenBoundMetrics,
    PerTokenMultiplierResult,
    TokenCheckCounts,
)
from evals.common import default_output_path, wilson_interval, write_eval_output
from evals.core.schema import (
    CoreEvalOutput,
    CoreMetricCategories,
    MaskMetrics,
    MiscMetrics,
    ModelBehaviorPreservationMetrics,
    ModelPerformancePreservationMetrics,
    ReconstructionQualityMetrics,
    ShrinkageMetrics,
    SparsityMetrics,
    TokenStatsMetrics,
)
from evals.crossval.schema import (
    BestPointSummary,
    CrossvalEvalOutput,
    CrossvalMetrics,
    FiringRateSource,
    FoldResult,
    MetricSummary,
    PointSummary,
    VariantSummary,
)
from evals.sparse_probing.schema import (
    SparseProbingEvalOutput,
    SparseProbingLlmMetrics,
    SparseProbingMetricCategories,
    SparseProbingSaeMetrics,
)
from evals.unlearning.schema import (
    LossBaseline,
    LossRise,
    QuestionSetSummary,
    SetAccuracy,
    UnlearningEvalOutput,
    UnlearningMetricCategories,
    UnlearningMetrics,
    UnlearningSweepPoint,
)
from stores.masks import PackedMask

D_MODEL = 16
D_SAE = 32
COMMON = dict(eval_id="00000000-0000-4000-8000-000000000000", datetime_epoch_millis=0)


def set_accuracy(n_correct: int, n: int) -> SetAccuracy:
    low, high = wilson_interval(n_correct, n)
    return SetAccuracy(
        n=n, n_correct=n_correct, accuracy=n_correct / n if n else None, ci_low=low, ci_high=high
    )


def loss_rise(mean: float, half_width: float, n: int = 8) -> LossRise:
    return LossRise(
        baseline_loss=3.0, mean_rise=mean, ci_low=mean - half_width, ci_high=mean + half_width, n_contexts=n
    )


def question_set(n_questions: int, base_correct: int, n_known: int, *, at_chance: bool, too_small: bool) -> QuestionSetSummary:
    low, high = wilson_interval(base_correct, n_questions)
    return QuestionSetSummary(
        n_questions=n_questions, base_n_correct=base_correct, base_accuracy=base_correct / n_questions,
        base_ci_low=low, base_ci_high=high, at_chance=at_chance, n_known=n_known, known_too_small=too_small,
    )


def sweep_point(
    wmdp_correct: int, n_wmdp: int, mmlu_correct: int, n_mmlu: int, multiplier: float,
    forget_rise: float, retain_rise: float, half_width: float = 0.05,
) -> UnlearningSweepPoint:
    mmlu = set_accuracy(mmlu_correct, n_mmlu)
    return UnlearningSweepPoint(
        latent_ids=[0, 1], wmdp_bio=set_accuracy(wmdp_correct, n_wmdp), mmlu=mmlu,
        mmlu_subjects={"human_aging": mmlu}, reported_subjects={},
        loss_rise={"forget": loss_rise(forget_rise, half_width), "retain": loss_rise(retain_rise, half_width)},
        retain_threshold=0.01, n_features=10, n_features_selected=10, multiplier=multiplier,
        counts_in_score=mmlu_correct / n_mmlu >= 0.99,
    )


def unlearning_output(
    variant: str, points: list[UnlearningSweepPoint], *, at_chance: bool = False, n_wmdp: int = 100,
) -> UnlearningEvalOutput:
    """An unlearning result whose score follows SAEBench's rule over ``points``."""
    counted = [point for point in points if point.counts_in_score]
    best = min(counted, key=lambda point: point.wmdp_bio.accuracy) if counted else None
    metrics = UnlearningMetrics(
        unlearning_score=(1.0 - best.wmdp_bio.accuracy) if best else 0.0,
        best_retain_threshold=best.retain_threshold if best else None,
        best_n_features=best.n_features if best else None,
        best_multiplier=best.multiplier if best else None,
        n_points_counted=len(counted),
        reliable=not at_chance,
    )
    # 400 questions, of which the unmodified model answers 108 (0.27, at chance) or 280.
    base_correct = 108 if at_chance else 280
    warnings = (
        [f"wmdp-bio: base accuracy 0.270 on 400 questions (cloze scoring) includes chance (0.25): {variant} test."]
        if at_chance else []
    )
    return UnlearningEvalOutput(
        **COMMON,
        eval_config={"mmlu_threshold": 0.99},
        eval_result_metrics=UnlearningMetricCategories(
            unlearning=metrics,
            question_sets={
                "wmdp-bio": question_set(400, base_correct, n_wmdp, at_chance=at_chance, too_small=False),
                "mmlu": question_set(100, 80, 80, at_chance=False, too_small=False),
            },
            loss=LossBaseline(forget_loss=3.0, retain_loss=3.0, n_forget_contexts=8, n_retain_contexts=8),
        ),
        eval_result_details=points,
        eval_result_unstructured={"warnings": warnings},
        sae_cfg_dict={"variant": variant},
    )


def core_output(encoder_density: float | None) -> CoreEvalOutput:
    return CoreEvalOutput(
        **COMMON,
        eval_config={},
        eval_result_metrics=CoreMetricCategories(
            model_behavior_preservation=ModelBehaviorPreservationMetrics(
                kl_div_score=0.95, kl_div_with_ablation=2.0, kl_div_with_sae=0.1
            ),
            model_performance_preservation=ModelPerformancePreservationMetrics(
                ce_loss_score=0.9, ce_loss_with_ablation=8.0, ce_loss_with_sae=3.5, ce_loss_without_sae=3.0
            ),
            reconstruction_quality=ReconstructionQualityMetrics(
                explained_variance=0.8123, explained_variance_legacy=0.8, mse=0.01, cossim=0.99
            ),
            shrinkage=ShrinkageMetrics(l2_norm_in=4.0, l2_norm_out=3.9, l2_ratio=0.97, relative_reconstruction_bias=0.98),
            sparsity=SparsityMetrics(l0=32.0, l1=20.0),
            misc_metrics=MiscMetrics(
                freq_over_1_percent=0.5, freq_over_10_percent=0.1, normalized_freq_over_1_percent=0.9,
                normalized_freq_over_10_percent=0.5, average_max_encoder_cosine_sim=0.3,
                average_max_decoder_cosine_sim=0.3, frac_alive=0.99,
            ),
            masks=MaskMetrics(encoder_density=encoder_density, decoder_density=None),
            token_stats=TokenStatsMetrics(
                total_tokens_eval_reconstruction=1000, total_tokens_eval_sparsity_variance=5000,
                total_contexts_eval_reconstruction=8,
            ),
        ),
    )


def sparse_probing_output() -> SparseProbingEvalOutput:
    return SparseProbingEvalOutput(
        **COMMON,
        eval_config={},
        eval_result_metrics=SparseProbingMetricCategories(
            llm=SparseProbingLlmMetrics(llm_test_accuracy=0.9, llm_top_1_test_accuracy=0.6),
            sae=SparseProbingSaeMetrics(sae_test_accuracy=0.88, sae_top_1_test_accuracy=0.65),
        ),
    )


def bounds_output(variant: str) -> BoundsEvalOutput:
    counts = TokenCheckCounts(checks=100, violations=0, n_active=40, max_ratio=0.9, mean_tightness=0.5)
    firing_summary = FiringBoundSummary(
        checks=D_SAE, violations=0, n_trivial=2, mean_tightness=0.3, median_tightness=0.25, max_tightness=0.9
    )
    details = [
        LatentBoundDetail(
            id=i, clamped=i < 2, support_size=D_MODEL, mu=-1.0, sigma=0.5, cantelli_bound=0.2,
            trivial=False, train_retain_rate=0.01, train_forget_rate=0.2, empirical_rate=0.01 * (i + 1),
            ci=[0.0, 0.05], preactivation_rate=0.01, tightness=0.05 * (i + 1), violation=False,
        )
        for i in range(4)
    ]
    return BoundsEvalOutput(
        **COMMON,
        eval_config={},
        eval_result_metrics=BoundsMetricCategories(
            summary=BoundsSummary(
                variant=variant, activation="topk", selected_latents=[0, 1], n_features=2, retain_threshold=0.01,
                multipliers=[50.0], stats_source="store", n_train_forget_tokens=1000.0,
                n_train_retain_tokens=1000.0, n_heldout_tokens=200, decoder_norm_min=1.0, decoder_norm_max=1.0,
                clamped_decoder_norm_min=1.0, clamped_decoder_norm_max=1.0, encoder_density=None,
                total_checks=100 + 1 + D_SAE, total_violations=0, all_bounds_hold=True,
            ),
            per_token_bound=PerTokenBoundMetrics(
                checks=100, violations=0, relative_tolerance=1e-5,
                per_multiplier=[PerTokenMultiplierResult(**counts.model_dump(), multiplier=50.0, forget=counts, retain=counts)],
            ),
            expected_damage_bound=DamageBoundMetrics(
                checks=1, violations=0,
                per_multiplier=[DamageMultiplierResult(
                    multiplier=50.0, n_tokens=100, empirical_mean=0.5, ci_low=0.4, ci_high=0.6, bound=1.2,
                    bound_on_heldout=1.1, tightness=0.5 / 1.2, holds=True,
                )],
            ),
            firing_bound=FiringBoundMetrics(
                **firing_summary.model_dump(), theoretical_separation=0.4, empirical_separation=0.03,
                separation_tightness=0.075, n_heldout_retain_tokens=100, all_latents=firing_summary,
            ),
        ),
        eval_result_details=details,
    )


def metric_summary(values: list[float | None]) -> MetricSummary:
    present = [value for value in values if value is not None]
    mean = float(np.mean(present)) if present else None
    std = float(np.std(present, ddof=1)) if len(present) > 1 else None
    return MetricSummary(mean=mean, std=std, n_folds=len(present), values=values)


def crossval_output(scores: dict[str, list[float]], *, at_chance: bool = False) -> CrossvalEvalOutput:
    """A cross-validation result with the given per-fold unlearning scores per variant."""
    summaries, details = {}, []
    for variant, values in scores.items():
        n = len(values)
        point = PointSummary(
            retain_threshold=0.01, n_features=10, multiplier=200.0,
            wmdp_bio_accuracy=metric_summary([1.0 - value for value in values]),
            mmlu_accuracy=metric_summary([1.0] * n),
            forget_loss_rise=metric_summary([0.5 + value for value in values]),
            retain_loss_rise=metric_summary([0.1] * n),
            n_folds_counted=n,
        )
        summaries[variant] = VariantSummary(
            run_name=variant, n_folds=n, n_reliable_folds=0 if at_chance else n,
            unlearning_score=metric_summary(values), n_wmdp_questions=metric_summary([40.0] * n),
            n_wmdp_known=metric_summary([30.0] * n),
            best_point=BestPointSummary(
                wmdp_bio_accuracy=point.wmdp_bio_accuracy, mmlu_accuracy=point.mmlu_accuracy,
                forget_loss_rise=point.forget_loss_rise, retain_loss_rise=point.retain_loss_rise,
            ),
            sweep_points=[point],
        )
        for fold, value in enumerate(values):
            summary = question_set(40, 11 if at_chance else 30, 30, at_chance=at_chance, too_small=False)
            details.append(FoldResult(
                variant=variant, run_name=variant, fold=fold, config_hash="abc", wmdp_bio=summary,
                mmlu=question_set(100, 80, 80, at_chance=False, too_small=False),
                firing_rates=FiringRateSource(source="store", path="store", folds=[], n_forget_tokens=1.0, n_retain_tokens=1.0),
                loss=None,
                metrics=UnlearningMetrics(
                    unlearning_score=value, best_retain_threshold=None, best_n_features=None,
                    best_multiplier=None, n_points_counted=0, reliable=not at_chance,
                ),
                best_point=None, points=[],
                warnings=["wmdp-bio: at chance in this fold."] if at_chance else [],
            ))
    return CrossvalEvalOutput(
        **COMMON, eval_config={"mode": "stats"}, eval_result_metrics=CrossvalMetrics(variants=summaries),
        eval_result_details=details,
    )


def write_train_logs(run_dir: Path, *, pruning: bool) -> None:
    rows = [
        {"step": step, "tokens": step * 4096, "loss": 30.0 / step, "explained_variance": 1 - 1 / step,
         "l0": 32.0, "dead_fraction": 0.0}
        for step in range(1, 11)
    ]
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if pruning:
        events = [{"step": step, "pruned": 10, "regrown": 1, "density": 1 - step / 20} for step in (3, 6)]
        (run_dir / "pruning_log.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))


def write_separation(run_dir: Path, variant: str) -> None:
    """Write ``sae/separation.json`` with the keys the training hook writes."""
    report = {
        "variant": variant, "tau": 0.5, "epsilon": 1e-8, "d_sae": D_SAE, "n_latents_fired": 30,
        "n_forget_specific": 7, "forget_specific_retain_firing_rate_mean": 0.0123,
        "forget_specific_forget_firing_rate_mean": 0.2, "retain_firing_rate_mean": 0.05,
        "cache_token_mass": {"forget": 100.0, "retain": 100.0}, "cache_updates": 10, "source": "test",
    }
    (run_dir / "sae").mkdir(parents=True, exist_ok=True)
    (run_dir / "sae" / "separation.json").write_text(json.dumps(report))


def write_mask(run_dir: Path, density: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    dense_FD = torch.rand(D_SAE, D_MODEL, generator=generator) < density
    PackedMask.from_dense(dense_FD).save(run_dir / "sae" / "masks", "encoder")
    return dense_FD


def build_experiment(
    root: Path,
    *,
    wmdp_correct: dict[str, int] | None = None,
    at_chance: bool = False,
    crossval: CrossvalEvalOutput | None = None,
    with_bounds: bool = True,
) -> Path:
    """Write standard, fixed and adaptive run directories under ``root/exp`` with every result.

    ``wmdp_correct[variant]`` is the number of the 100 known WMDP-bio questions still
    answered after the best clamp, so a lower number is better separation.
    """
    experiment = root / "exp"
    wmdp_correct = wmdp_correct or {"standard": 80, "fixed": 78, "adaptive": 30}
    for index, variant in enumerate(("standard", "fixed", "adaptive")):
        run_dir = experiment / variant
        run_dir.mkdir(parents=True)
        masked = variant != "standard"
        write_train_logs(run_dir, pruning=masked)
        write_separation(run_dir, variant)
        if masked:
            write_mask(run_dir, density=0.25 if variant == "fixed" else 0.4, seed=index)
        write_eval_output(core_output(0.25 if masked else None), default_output_path(run_dir, "core"))
        write_eval_output(sparse_probing_output(), default_output_path(run_dir, "sparse_probing"))
        correct = wmdp_correct[variant]
        points = [
            sweep_point(95, 100, 100, 100, 50.0, forget_rise=0.1, retain_rise=0.05),
            sweep_point(correct, 100, 100, 100, 200.0, forget_rise=1.0 - correct / 100, retain_rise=0.1),
        ]
        write_eval_output(
            unlearning_output(variant, points, at_chance=at_chance), default_output_path(run_dir, "unlearning")
        )
        if with_bounds:
            write_eval_output(bounds_output(variant), default_output_path(run_dir, "separation_bounds"))
    if crossval is not None:
        write_eval_output(crossval, default_output_path(experiment / "crossval", "crossval"))
    return experiment
