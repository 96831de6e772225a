"""Output schema of the core eval, grouped as SAEBench's core eval groups its metrics.

Reconstruction metrics are computed in the store's normalized space (``x * norm_scale``,
with ``E||x * norm_scale||^2 = d_model`` on train tokens), so ``mse`` and the L2 norms are
comparable across models and layers. CE loss and KL come from the real model with the
reconstruction mapped back to the raw residual stream.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from evals.common import EvalOutput

EVAL_TYPE_ID_CORE = "core"


class ModelBehaviorPreservationMetrics(BaseModel):
    """KL divergence of the next-token distribution from the unmodified model's."""

    kl_div_score: float | None = Field(
        description="(kl_div_with_ablation - kl_div_with_sae) / kl_div_with_ablation: 1 means the SAE "
        "preserves the output distribution, 0 means it is as bad as zero ablation. None when ablation "
        "does not change the distribution."
    )
    kl_div_with_ablation: float = Field(
        description="Mean KL(p_original || p) in nats per scored token, with the layer's residual set to zero."
    )
    kl_div_with_sae: float = Field(
        description="Mean KL(p_original || p) in nats per scored token, with the residual replaced by the SAE reconstruction."
    )


class ModelPerformancePreservationMetrics(BaseModel):
    """Next-token cross-entropy with and without the SAE."""

    ce_loss_score: float | None = Field(
        description="(ce_loss_with_ablation - ce_loss_with_sae) / (ce_loss_with_ablation - ce_loss_without_sae): "
        "the fraction of the loss increase from zero ablation that the SAE recovers. None when ablation "
        "does not change the loss."
    )
    ce_loss_with_ablation: float = Field(
        description="Mean cross-entropy in nats per scored token with the layer's residual set to zero."
    )
    ce_loss_with_sae: float = Field(
        description="Mean cross-entropy in nats per scored token with the residual replaced by the SAE reconstruction."
    )
    ce_loss_without_sae: float = Field(
        description="Mean cross-entropy in nats per scored token of the unmodified model."
    )


class ReconstructionQualityMetrics(BaseModel):
    """Reconstruction error of held-out activations, in the normalized space."""

    explained_variance: float = Field(
        description="1 - sum ||x - x_hat||^2 / sum ||x - mu||^2, with mu the per-dimension mean over the "
        "evaluated tokens. Negative when the SAE does worse than predicting mu."
    )
    explained_variance_legacy: float | None = Field(
        description="SAELens' older per-token formula, mean over tokens of 1 - ||x - x_hat||^2 / ||x - mu||^2, "
        "with mu the mean over all evaluated tokens (SAEBench uses each batch's mean). Reported for "
        "comparison only."
    )
    mse: float = Field(
        description="Mean of (x - x_hat)^2 over tokens and dimensions (per element, not summed over d_model), "
        "in the normalized space."
    )
    cossim: float = Field(
        description="Mean per-token cosine similarity of x and x_hat; a token where either is zero counts as 0."
    )


class ShrinkageMetrics(BaseModel):
    """Norms of inputs and reconstructions, in the normalized space."""

    l2_norm_in: float = Field(description="Mean ||x|| of the evaluated tokens.")
    l2_norm_out: float = Field(description="Mean ||x_hat|| of their reconstructions.")
    l2_ratio: float = Field(
        description="Mean per-token ||x_hat|| / ||x|| (inputs with ||x|| < 1e-4 divide by 1). Below 1 means shrinkage."
    )
    relative_reconstruction_bias: float | None = Field(
        description="sum ||x_hat||^2 / sum <x, x_hat> over all evaluated tokens: 1 for an unbiased "
        "reconstruction, below 1 for shrinkage. None when sum <x, x_hat> is 0."
    )


class SparsityMetrics(BaseModel):
    """Latent activity per token."""

    l0: float = Field(description="Mean number of non-zero latents per token.")
    l1: float = Field(description="Mean sum of absolute latent activations per token.")


class MiscMetrics(BaseModel):
    """Firing-frequency and weight statistics over latents."""

    freq_over_1_percent: float = Field(
        description="Fraction of latents active on more than 1% of evaluated tokens."
    )
    freq_over_10_percent: float = Field(
        description="Fraction of latents active on more than 10% of evaluated tokens."
    )
    normalized_freq_over_1_percent: float = Field(
        description="Summed firing frequency of latents above 1%, divided by the summed frequency of all latents (0 if all are dead)."
    )
    normalized_freq_over_10_percent: float = Field(
        description="Summed firing frequency of latents above 10%, divided by the summed frequency of all latents (0 if all are dead)."
    )
    average_max_encoder_cosine_sim: float | None = Field(
        description="Mean over latents of the largest cosine similarity between its encoder vector and any other latent's. None when d_sae < 2."
    )
    average_max_decoder_cosine_sim: float | None = Field(
        description="Mean over latents of the largest cosine similarity between its decoder vector and any other latent's. None when d_sae < 2."
    )
    frac_alive: float = Field(
        description="Fraction of latents active on at least one evaluated token; a lower bound on the true alive fraction."
    )


class MaskMetrics(BaseModel):
    """Connection density of a masked SAE's weight matrices."""

    encoder_density: float | None = Field(
        description="Fraction of encoder connections kept by the mask; None for a dense SAE."
    )
    decoder_density: float | None = Field(
        description="Fraction of decoder connections kept by the mask; None for a dense SAE or an unmasked decoder."
    )


class TokenStatsMetrics(BaseModel):
    """Amount of data behind the metrics."""

    total_tokens_eval_reconstruction: int = Field(
        description="Next-token predictions scored for CE loss and KL (special-token inputs and targets excluded)."
    )
    total_tokens_eval_sparsity_variance: int = Field(
        description="Held-out tokens used for the reconstruction, shrinkage, sparsity and frequency metrics."
    )
    total_contexts_eval_reconstruction: int = Field(
        description="Held-out contexts run through the model."
    )


class CoreMetricCategories(BaseModel):
    """Every core metric, by category."""

    model_behavior_preservation: ModelBehaviorPreservationMetrics | None = Field(
        description="KL metrics; None when n_eval_contexts is 0."
    )
    model_performance_preservation: ModelPerformancePreservationMetrics | None = Field(
        description="CE loss metrics; None when n_eval_contexts is 0."
    )
    reconstruction_quality: ReconstructionQualityMetrics = Field(
        description="Reconstruction metrics."
    )
    shrinkage: ShrinkageMetrics = Field(description="Norm metrics.")
    sparsity: SparsityMetrics = Field(description="Sparsity metrics.")
    misc_metrics: MiscMetrics = Field(description="Frequency and weight statistics.")
    masks: MaskMetrics = Field(description="Mask densities (None fields for a dense SAE).")
    token_stats: TokenStatsMetrics = Field(description="Token and context counts.")


class CoreFeatureMetric(BaseModel):
    """Statistics of one latent."""

    index: int = Field(description="Latent index.")
    feature_density: float = Field(
        description="Fraction of evaluated tokens on which the latent is non-zero."
    )
    encoder_bias: float = Field(description="Encoder bias b_enc of the latent.")
    encoder_norm: float = Field(
        description="L2 norm of the latent's encoder vector (normalized space)."
    )
    encoder_decoder_cosine_sim: float = Field(
        description="Cosine similarity of the latent's encoder and decoder vectors."
    )
    max_encoder_cosine_sim: float | None = Field(
        description="Largest cosine similarity of the encoder vector with another latent's; None when d_sae < 2."
    )
    max_decoder_cosine_sim: float | None = Field(
        description="Largest cosine similarity of the decoder vector with another latent's; None when d_sae < 2."
    )


class CoreEvalOutput(EvalOutput[CoreMetricCategories, CoreFeatureMetric]):
    """Result of the core eval in SAEBench's layout."""

    eval_type_id: str = Field(default=EVAL_TYPE_ID_CORE, description="Always 'core'.")
