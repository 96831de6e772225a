"""Output schema of the cross-validated unlearning eval, in SAEBench's layout.

``eval_result_metrics.variants[<variant>]`` contains the mean and standard deviation
over folds of every metric, and ``eval_result_details`` contains one row per (variant,
fold) with the full sweep of that fold. Every mean is over folds with equal weight, and every
standard deviation is the sample standard deviation (``ddof=1``) over folds.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from evals.common import EvalOutput
from evals.unlearning.schema import (
    LossBaseline,
    QuestionSetSummary,
    UnlearningMetrics,
    UnlearningSweepPoint,
)

EVAL_TYPE_ID_CROSSVAL = "crossval"


class FiringRateSource(BaseModel):
    """Source of the firing rates behind one fold's latent selection."""

    source: str = Field(
        description="'store' (exact counts) or 'cache' (EMA of the correlation cache)."
    )
    path: str = Field(description="The store or cache read.")
    folds: list[int] = Field(
        description="Store folds whose forget tokens fed the forget rates (every fold but the evaluated one)."
    )
    n_forget_tokens: float = Field(
        description="Forget token mass behind the forget rates (an EMA weight for the cache)."
    )
    n_retain_tokens: float = Field(
        description="Retain token mass behind the retain rates, over every fold."
    )


class FoldResult(BaseModel):
    """One variant on one fold: latents selected on the other folds, measured on this fold's questions and text."""

    variant: str = Field(description="The variant label.")
    run_name: str = Field(description="The training run whose SAE was evaluated.")
    fold: int = Field(description="The evaluated fold.")
    mode: Literal["stats", "retrain"] = Field(
        default="stats",
        description="'stats' (one SAE per variant) or 'retrain' (one SAE per fold, trained without it).",
    )
    sae_path: str | None = Field(
        default=None,
        description="The evaluated SAE; in mode 'retrain' the fold's own SAE. None in results written before it was recorded.",
    )
    config_hash: str = Field(
        description="Hash of every setting and input file behind this result, checked on resume."
    )
    wmdp_bio: QuestionSetSummary = Field(
        description="The unmodified model on this fold's WMDP-bio questions."
    )
    mmlu: QuestionSetSummary = Field(
        description="The unmodified model on the pooled side-effect MMLU subjects (the same in every fold)."
    )
    firing_rates: FiringRateSource = Field(description="Source of the selection's firing rates.")
    loss: LossBaseline | None = Field(
        description="Baseline losses on this fold's held-out contexts; None when n_loss_contexts is 0."
    )
    metrics: UnlearningMetrics = Field(
        description="SAEBench's unlearning score on this fold's known WMDP-bio questions."
    )
    best_point: UnlearningSweepPoint | None = Field(
        description="The sweep point that sets this fold's score; None when no point counts."
    )
    points: list[UnlearningSweepPoint] = Field(description="Every sweep point of this fold.")
    warnings: list[str] = Field(
        default_factory=list,
        description="Honesty warnings of this fold (chance accuracy, small known sets).",
    )


class MetricSummary(BaseModel):
    """Mean and standard deviation of one metric over folds."""

    mean: float | None = Field(
        description="Mean over the folds that have a value; None when none has."
    )
    std: float | None = Field(
        description="Sample standard deviation (ddof=1) over those folds; None below two folds."
    )
    n_folds: int = Field(description="Folds that have a value.")
    values: list[float | None] = Field(
        description="The value of each evaluated fold, in fold order; None where a fold has none."
    )


class PointSummary(BaseModel):
    """One sweep point (fixed retain threshold, latent count and multiplier) over folds.

    The hyperparameters are fixed in advance and each fold selects its latents on the
    other folds, so these numbers carry no selection on the evaluated fold.
    """

    retain_threshold: float = Field(description="Retain firing-rate threshold of the selection.")
    n_features: int = Field(description="Latents requested.")
    multiplier: float = Field(description="Firing selected latents were clamped to -multiplier.")
    wmdp_bio_accuracy: MetricSummary = Field(
        description="Accuracy on each fold's known WMDP-bio questions."
    )
    mmlu_accuracy: MetricSummary = Field(
        description="Pooled accuracy on the known side-effect MMLU questions."
    )
    forget_loss_rise: MetricSummary = Field(
        description="Mean loss rise on each fold's held-out forget contexts, in nats per token."
    )
    retain_loss_rise: MetricSummary = Field(
        description="Mean loss rise on each fold's held-out retain contexts, in nats per token."
    )
    n_folds_counted: int = Field(
        description="Folds on which this point's MMLU accuracy reaches mmlu_threshold."
    )


class BestPointSummary(BaseModel):
    """The metrics at the sweep point that sets each fold's score, over folds.

    Each fold picks its point on its own WMDP-bio questions (SAEBench's minimum), so
    these numbers are optimistic; ``sweep_points`` has the unbiased per-point numbers.
    """

    wmdp_bio_accuracy: MetricSummary = Field(
        description="WMDP-bio accuracy at each fold's best point."
    )
    mmlu_accuracy: MetricSummary = Field(
        description="Pooled MMLU accuracy at each fold's best point."
    )
    forget_loss_rise: MetricSummary = Field(
        description="Forget loss rise at each fold's best point, in nats per token."
    )
    retain_loss_rise: MetricSummary = Field(
        description="Retain loss rise at each fold's best point, in nats per token."
    )


class VariantSummary(BaseModel):
    """Every metric of one variant as mean and standard deviation over folds."""

    run_name: str = Field(description="The training run whose SAE was evaluated.")
    n_folds: int = Field(description="Folds evaluated.")
    n_reliable_folds: int = Field(
        description="Folds whose score the unlearning eval marks reliable."
    )
    unlearning_score: MetricSummary = Field(description="SAEBench's unlearning score of each fold.")
    n_wmdp_questions: MetricSummary = Field(description="WMDP-bio questions per fold.")
    n_wmdp_known: MetricSummary = Field(
        description="Known WMDP-bio questions per fold, the n behind each accuracy."
    )
    best_point: BestPointSummary = Field(
        description="Metrics at the point that sets each fold's score."
    )
    sweep_points: list[PointSummary] = Field(description="Metrics of every sweep point.")


class CrossvalMetrics(BaseModel):
    """Cross-validated metrics, by variant."""

    variants: dict[str, VariantSummary] = Field(description="Summary of each variant.")


class CrossvalEvalOutput(EvalOutput[CrossvalMetrics, FoldResult]):
    """Result of the cross-validated unlearning eval in SAEBench's layout."""

    eval_type_id: str = Field(default=EVAL_TYPE_ID_CROSSVAL, description="Always 'crossval'.")
