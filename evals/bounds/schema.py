"""Output schema of the separation bounds eval, in SAEBench's layout.

Each bound reports how often it was checked and how often it failed. A check of the
per-token bound is one held-out token at one multiplier, of the expected damage bound
one multiplier, and of the firing bound one latent. All norms and activations are in
the store's normalized space ``x * norm_scale``.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from evals.common import EvalOutput

EVAL_TYPE_ID_BOUNDS = "separation_bounds"


class TokenCheckCounts(BaseModel):
    """The per-token bound on the held-out tokens of one domain, or of both."""

    checks: int = Field(description="Held-out tokens checked.")
    violations: int = Field(
        description="Tokens with ||x' - x|| > bound * (1 + relative_tolerance)."
    )
    n_active: int = Field(
        description="Tokens on which at least one clamped latent fires. On the others "
        "both ||x' - x|| and the bound are exactly 0."
    )
    max_ratio: float | None = Field(
        description="Maximum of ||x' - x|| / bound over active tokens; None without any."
    )
    mean_tightness: float | None = Field(
        description="Mean of ||x' - x|| / bound over active tokens (1 means tight); None without any."
    )


class PerTokenMultiplierResult(TokenCheckCounts):
    """The per-token bound at one multiplier, over forget and retain tokens together."""

    multiplier: float = Field(description="Firing clamped latents were set to -multiplier.")
    forget: TokenCheckCounts = Field(description="The same counts on held-out forget tokens.")
    retain: TokenCheckCounts = Field(description="The same counts on held-out retain tokens.")


class PerTokenBoundMetrics(BaseModel):
    """Bound 1: ||x' - x|| <= sum_{i in C} 1{f_i(x) > 0} (c + f_i(x)) on every held-out token."""

    checks: int = Field(description="Checks over all multipliers: held-out tokens x multipliers.")
    violations: int = Field(description="Failed checks over all multipliers.")
    relative_tolerance: float = Field(
        description="A check fails when ||x' - x|| exceeds the bound by more than this fraction of it."
    )
    per_multiplier: list[PerTokenMultiplierResult] = Field(description="One entry per multiplier.")


class DamageMultiplierResult(BaseModel):
    """The expected retain damage bound at one multiplier."""

    multiplier: float = Field(description="Firing clamped latents were set to -multiplier.")
    n_tokens: int = Field(description="Held-out retain tokens behind the empirical mean.")
    empirical_mean: float | None = Field(
        description="Mean of ||x' - x|| over held-out retain tokens; None without any."
    )
    ci_low: float | None = Field(
        description="Lower end of its 95% Student-t interval; None below two tokens."
    )
    ci_high: float | None = Field(
        description="Upper end of its 95% Student-t interval; None below two tokens."
    )
    bound: float = Field(
        description="sum_{i in C} (c r_R(i) + E_R[f_i]) from the train-split statistics."
    )
    bound_on_heldout: float | None = Field(
        description="The same sum from the held-out retain tokens themselves, which the "
        "empirical mean can never exceed beyond rounding; None without tokens."
    )
    tightness: float | None = Field(description="empirical_mean / bound; None when the bound is 0.")
    holds: bool = Field(
        description="The bound is at least the lower end of the interval (or at least the "
        "mean below two tokens)."
    )


class DamageBoundMetrics(BaseModel):
    """Bound 2: E_R||x' - x|| <= sum_{i in C} (c r_R(i) + E_R[f_i])."""

    checks: int = Field(description="Multipliers checked.")
    violations: int = Field(description="Multipliers at which the bound does not hold.")
    per_multiplier: list[DamageMultiplierResult] = Field(description="One entry per multiplier.")


class FiringBoundSummary(BaseModel):
    """Cantelli's firing bound checked on a set of latents."""

    checks: int = Field(description="Latents checked.")
    violations: int = Field(
        description="Latents whose held-out retain firing rate has a Wilson 95% interval "
        "entirely above the bound."
    )
    n_trivial: int = Field(description="Latents with mu_i >= 0, whose bound is the trivial 1.")
    mean_tightness: float | None = Field(
        description="Mean of empirical_rate / cantelli_bound over latents with a non-trivial, "
        "non-zero bound; None without any."
    )
    median_tightness: float | None = Field(
        description="Median of the same ratio; None without any."
    )
    max_tightness: float | None = Field(description="Maximum of the same ratio; None without any.")


class FiringBoundMetrics(FiringBoundSummary):
    """Bound 3: P_R(f_i > 0) <= sigma_i^2 / (sigma_i^2 + mu_i^2) when mu_i < 0, on the clamped latents."""

    theoretical_separation: float = Field(
        description="Sum of the Cantelli bounds over the clamped latents, trivial ones counting 1."
    )
    empirical_separation: float = Field(
        description="Sum of the held-out retain firing rates of the clamped latents."
    )
    separation_tightness: float | None = Field(
        description="empirical_separation / theoretical_separation; None when the latter is 0."
    )
    n_heldout_retain_tokens: int = Field(description="Held-out retain tokens behind the rates.")
    all_latents: FiringBoundSummary = Field(
        description="The same bound checked on every latent of the SAE, clamped or not."
    )


class BoundsSummary(BaseModel):
    """The clamp set, where its statistics come from and the decoder norms the bounds assume."""

    variant: str = Field(description="Training variant of the SAE (standard, fixed, adaptive).")
    activation: str = Field(description="Activation of the SAE: relu or topk.")
    selected_latents: list[int] = Field(
        description="The clamp set C, by decreasing train forget firing rate."
    )
    n_features: int = Field(description="Latents requested.")
    retain_threshold: float = Field(
        description="Latents at or above this train retain rate were excluded."
    )
    multipliers: list[float] = Field(description="Multipliers checked.")
    stats_source: str = Field(
        description="'store' (exact counts over train-split tokens through the final SAE) or "
        "'cache' (the exponential moving average kept during training)."
    )
    n_train_forget_tokens: float = Field(
        description="Forget token mass behind the train statistics."
    )
    n_train_retain_tokens: float = Field(
        description="Retain token mass behind the train statistics."
    )
    n_heldout_tokens: int = Field(description="Held-out tokens checked, forget and retain.")
    decoder_norm_min: float = Field(
        description="Minimum L2 norm of a decoder row in the normalized space, over all latents."
    )
    decoder_norm_max: float = Field(
        description="Maximum L2 norm of a decoder row in the normalized space, over all latents."
    )
    clamped_decoder_norm_min: float | None = Field(
        description="Minimum decoder row norm over the clamped latents; None when none is clamped."
    )
    clamped_decoder_norm_max: float | None = Field(
        description="Maximum decoder row norm over the clamped latents; None when none is clamped."
    )
    encoder_density: float | None = Field(
        description="Fraction of encoder connections kept; None for a dense SAE."
    )
    total_checks: int = Field(description="Checks of all three bounds together.")
    total_violations: int = Field(description="Failed checks of all three bounds together.")
    all_bounds_hold: bool = Field(description="total_violations is 0.")


class BoundsMetricCategories(BaseModel):
    """Metrics of the separation bounds eval, grouped by bound."""

    summary: BoundsSummary = Field(description="Clamp set, statistics and totals.")
    per_token_bound: PerTokenBoundMetrics = Field(
        description="Bound 1, the triangle inequality per token."
    )
    expected_damage_bound: DamageBoundMetrics = Field(
        description="Bound 2, expected retain damage."
    )
    firing_bound: FiringBoundMetrics = Field(
        description="Bound 3, Cantelli's bound on retain firing."
    )


class LatentBoundDetail(BaseModel):
    """Cantelli's firing bound and its check for one latent."""

    id: int = Field(description="Latent index.")
    clamped: bool = Field(description="The latent is in the clamp set C.")
    support_size: int = Field(description="Encoder connections |S_i| (d_model for a dense SAE).")
    mu: float = Field(description="Mean pre-activation on retain train tokens.")
    sigma: float = Field(
        description="Standard deviation of the pre-activation on retain train tokens."
    )
    cantelli_bound: float = Field(description="sigma^2 / (sigma^2 + mu^2) when mu < 0, else 1.")
    trivial: bool = Field(description="mu >= 0, so the bound is the trivial 1.")
    train_retain_rate: float = Field(description="Retain firing rate from the train statistics.")
    train_forget_rate: float = Field(description="Forget firing rate from the train statistics.")
    empirical_rate: float | None = Field(
        description="Firing rate on held-out retain tokens; None without any."
    )
    ci: list[float] | None = Field(
        description="Wilson 95% interval [low, high] of empirical_rate; None without tokens."
    )
    preactivation_rate: float | None = Field(
        description="Fraction of held-out retain tokens with a_i > 0; equals empirical_rate "
        "for ReLU and is at least it for TopK. None without tokens."
    )
    tightness: float | None = Field(
        description="empirical_rate / cantelli_bound; None when the bound is 0 or there are no tokens."
    )
    violation: bool = Field(description="The lower end of ci is above the bound.")


class BoundsEvalOutput(EvalOutput[BoundsMetricCategories, LatentBoundDetail]):
    """The separation bounds eval result."""

    eval_type_id: str = Field(
        default=EVAL_TYPE_ID_BOUNDS, description="Always 'separation_bounds'."
    )
