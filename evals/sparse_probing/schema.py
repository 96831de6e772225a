"""Output schema of the sparse probing eval, with the metric names of SAEBench's sparse probing results.

Accuracies are fractions of test texts classified correctly in balanced one-vs-rest
tasks, so 0.5 is chance. Each metric is averaged over the classes of a dataset, then
over datasets. A top-k probe with k above the number of features uses every feature.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from evals.common import EvalOutput

EVAL_TYPE_ID_SPARSE_PROBING = "sparse_probing"


class SparseProbingLlmMetrics(BaseModel):
    """Probe accuracies on the model's mean-pooled residual stream at the SAE's layer."""

    llm_test_accuracy: float = Field(
        description="Test accuracy of a probe on the full mean-pooled residual stream, averaged over tasks."
    )
    llm_top_1_test_accuracy: float | None = Field(
        default=None,
        description="Test accuracy of a probe on the top 1 residual stream channels; None when 1 is not in k_values.",
    )
    llm_top_2_test_accuracy: float | None = Field(
        default=None,
        description="Test accuracy of a probe on the top 2 residual stream channels; None when 2 is not in k_values.",
    )
    llm_top_5_test_accuracy: float | None = Field(
        default=None,
        description="Test accuracy of a probe on the top 5 residual stream channels; None when 5 is not in k_values.",
    )
    llm_top_10_test_accuracy: float | None = Field(
        default=None,
        description="Test accuracy of a probe on the top 10 residual stream channels; None when 10 is not in k_values.",
    )
    llm_top_20_test_accuracy: float | None = Field(
        default=None,
        description="Test accuracy of a probe on the top 20 residual stream channels; None when 20 is not in k_values.",
    )
    llm_top_50_test_accuracy: float | None = Field(
        default=None,
        description="Test accuracy of a probe on the top 50 residual stream channels; None when 50 is not in k_values.",
    )
    llm_top_100_test_accuracy: float | None = Field(
        default=None,
        description="Test accuracy of a probe on the top 100 residual stream channels; None when 100 is not in k_values.",
    )


class SparseProbingSaeMetrics(BaseModel):
    """Probe accuracies on the SAE's mean-pooled latents."""

    sae_test_accuracy: float | None = Field(
        default=None,
        description="Test accuracy of a probe on all mean-pooled SAE latents, averaged over tasks.",
    )
    sae_top_1_test_accuracy: float | None = Field(
        default=None,
        description="Test accuracy of a probe on the top 1 SAE latents; None when 1 is not in k_values.",
    )
    sae_top_2_test_accuracy: float | None = Field(
        default=None,
        description="Test accuracy of a probe on the top 2 SAE latents; None when 2 is not in k_values.",
    )
    sae_top_5_test_accuracy: float | None = Field(
        default=None,
        description="Test accuracy of a probe on the top 5 SAE latents; None when 5 is not in k_values.",
    )
    sae_top_10_test_accuracy: float | None = Field(
        default=None,
        description="Test accuracy of a probe on the top 10 SAE latents; None when 10 is not in k_values.",
    )
    sae_top_20_test_accuracy: float | None = Field(
        default=None,
        description="Test accuracy of a probe on the top 20 SAE latents; None when 20 is not in k_values.",
    )
    sae_top_50_test_accuracy: float | None = Field(
        default=None,
        description="Test accuracy of a probe on the top 50 SAE latents; None when 50 is not in k_values.",
    )
    sae_top_100_test_accuracy: float | None = Field(
        default=None,
        description="Test accuracy of a probe on the top 100 SAE latents; None when 100 is not in k_values.",
    )


class SparseProbingMetricCategories(BaseModel):
    """The averaged metrics, grouped as SAEBench groups them."""

    llm: SparseProbingLlmMetrics = Field(description="Probes on residual stream activations.")
    sae: SparseProbingSaeMetrics = Field(description="Probes on SAE latents.")


class SparseProbingResultDetail(SparseProbingSaeMetrics, SparseProbingLlmMetrics):
    """The metrics of one dataset, averaged over its classes, and the data behind them."""

    dataset_name: str = Field(
        description="Dataset name followed by '_results', as SAEBench names its per-dataset entries."
    )
    classes: list[str] = Field(description="Labels probed, one one-vs-rest task each.")
    probe_train_set_size: int = Field(
        description="Texts in each task's train set (half of the class, half of the other classes), after any downsizing."
    )
    probe_test_set_size: int = Field(
        description="Texts in each task's test set, after any downsizing."
    )
    downsized: bool = Field(
        description="True when a class had too few texts for the configured sizes, so smaller sets were used."
    )
    n_texts: int = Field(description="Distinct texts run through the model for this dataset.")
    n_truncated_texts: int = Field(
        description="Texts longer than context_length tokens, of which only the beginning was used."
    )
    n_tokens: int = Field(
        description="Tokens averaged into the pooled features (special tokens excluded)."
    )
    sae_frac_alive: float = Field(
        description="Fraction of SAE latents active on at least one of those tokens."
    )
    n_test_predictions: int | None = Field(
        default=None,
        description="Test predictions behind each accuracy: classes times probe_test_set_size (None in files written before it was recorded).",
    )
    accuracy_intervals: dict[str, list[float]] = Field(
        default_factory=dict,
        description=(
            "Wilson 95% interval [low, high] of each accuracy above, treating the n_test_predictions "
            "pooled over the one-vs-rest tasks as independent. Chance is 0.5 (balanced tasks): an "
            "accuracy whose interval contains 0.5 is not distinguishable from chance."
        ),
    )


class SparseProbingEvalOutput(EvalOutput[SparseProbingMetricCategories, SparseProbingResultDetail]):
    """Result of the sparse probing eval in SAEBench's layout.

    ``eval_result_unstructured`` contains the per-class accuracies: ``{"<dataset>_results":
    {metric name: {label: accuracy}}}``, as SAEBench writes them.
    """

    eval_type_id: str = Field(
        default=EVAL_TYPE_ID_SPARSE_PROBING, description="Always 'sparse_probing'."
    )
    eval_result_unstructured: Any | None = Field(
        default=None, description="Per-class test accuracies of every probe, by dataset and metric."
    )
