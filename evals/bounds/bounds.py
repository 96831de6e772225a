"""The three separation bounds of the clamp intervention, and the statistics they need.

For a clamp set ``C``, a multiplier ``c >= 0`` and decoder rows ``d_i`` of unit norm, the
clamp changes an input by ``x' - x = sum_{i in C, f_i(x) > 0} (-c - f_i(x)) d_i``, so:

1. Per token, by the triangle inequality:
   ``||x' - x|| <= sum_{i in C} 1{f_i(x) > 0} (c + f_i(x))``.
2. In expectation over retain tokens, because ``E[1{f_i > 0} f_i] = E[f_i]`` for ``f_i >= 0``:
   ``E_R||x' - x|| <= sum_{i in C} (c r_R(i) + E_R[f_i])``, with ``r_R(i) = P_R(f_i > 0)``.
3. Per latent, by Cantelli's inequality ``P(a - mu >= t) <= sigma^2 / (sigma^2 + t^2)``
   for ``t > 0``: the pre-activation ``a_i = w_i . (x - b_dec) + b_i``, whose weights are 0
   outside the encoder support ``S_i``, has retain mean ``mu_i`` and variance
   ``sigma_i^2 = w_i^T Sigma_R w_i = w_{S_i}^T Sigma_R[S_i, S_i] w_{S_i}``. When ``mu_i < 0``,
   ``P_R(f_i > 0) <= P_R(a_i >= 0) <= sigma_i^2 / (sigma_i^2 + mu_i^2)``; otherwise the
   bound is the trivial 1. ReLU gives ``f_i > 0`` exactly when ``a_i > 0``. TopK needs
   ``a_i > 0`` and a place in the top k, so ``P(f_i > 0) <= P(a_i > 0)`` and the bound holds too.

Everything here is computed in float64 and takes tensors in the store's normalized space
``x * norm_scale``. Nothing here reads files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from evals.common import Z_95

FORGET_DOMAIN = 0
RETAIN_DOMAIN = 1
N_DOMAINS = 2


class BoundsError(ValueError):
    """Inputs the bounds cannot be computed from: mismatched shapes or invalid values."""


# Bound 1: per token.


def clamp_delta(f_BC: torch.Tensor, rows_CD: torch.Tensor, multiplier: float) -> torch.Tensor:
    """Return the clamp's change ``x' - x`` in float64, the formula of the intervention.

    Args:
        f_BC: activations of the clamped latents.
        rows_CD: their decoder rows, in the space the change is measured in.
        multiplier: ``c``; firing latents are set to ``-c``.
    """
    f_BC = f_BC.to(torch.float64)
    change_BC = torch.where(f_BC > 0, -multiplier - f_BC, torch.zeros_like(f_BC))
    return change_BC @ rows_CD.to(device=f_BC.device, dtype=torch.float64)


def per_token_bound(f_BC: torch.Tensor, multiplier: float) -> torch.Tensor:
    """Return ``sum_{i in C} 1{f_i > 0} (c + f_i)`` per token, in float64."""
    f_BC = f_BC.to(torch.float64)
    return torch.where(f_BC > 0, multiplier + f_BC, torch.zeros_like(f_BC)).sum(dim=-1)


@dataclass(frozen=True)
class PerTokenSummary:
    """The per-token bound checked on a set of tokens.

    Attributes:
        checks: tokens checked.
        violations: tokens whose ``||x' - x||`` exceeds the bound by more than the tolerance.
        n_active: tokens on which at least one clamped latent fires (bound > 0). On the
            others both sides are exactly 0.
        max_ratio: maximum of ``||x' - x|| / bound`` over active tokens; None without any.
        mean_tightness: mean of that ratio over active tokens; None without any.
    """

    checks: int
    violations: int
    n_active: int
    max_ratio: float | None
    mean_tightness: float | None


class PerTokenCheck:
    """Count per-token bound checks and violations per domain, batch by batch.

    A token violates the bound when ``measured > bound * (1 + relative_tolerance)``. A
    token on which no clamped latent fires has bound 0 and change exactly 0, so it
    passes with any tolerance unless the change is not 0.
    """

    def __init__(self, relative_tolerance: float) -> None:
        if not (math.isfinite(relative_tolerance) and relative_tolerance >= 0):
            raise BoundsError(
                f"invalid relative_tolerance {relative_tolerance}: it must be finite and >= 0"
            )
        self.relative_tolerance = relative_tolerance
        self.checks_2 = np.zeros(N_DOMAINS, dtype=np.int64)
        self.violations_2 = np.zeros(N_DOMAINS, dtype=np.int64)
        self.active_2 = np.zeros(N_DOMAINS, dtype=np.int64)
        self.ratio_sum_2 = np.zeros(N_DOMAINS, dtype=np.float64)
        self.ratio_max_2 = np.full(N_DOMAINS, -np.inf, dtype=np.float64)

    def update(
        self, measured_B: torch.Tensor, bound_B: torch.Tensor, domain_B: torch.Tensor
    ) -> None:
        """Add a batch: ``measured_B = ||x' - x||``, ``bound_B`` and each token's domain (0 or 1)."""
        if not (measured_B.shape == bound_B.shape == domain_B.shape) or measured_B.dim() != 1:
            raise BoundsError(
                f"measured, bound and domain must be vectors of one length, got shapes "
                f"{tuple(measured_B.shape)}, {tuple(bound_B.shape)} and {tuple(domain_B.shape)}"
            )
        measured_B = measured_B.to(torch.float64)
        bound_B = bound_B.to(device=measured_B.device, dtype=torch.float64)
        domain_B = domain_B.to(measured_B.device)
        violated_B = measured_B > bound_B * (1.0 + self.relative_tolerance)
        active_B = bound_B > 0
        ratio_B = torch.where(active_B, measured_B / torch.where(active_B, bound_B, 1.0), 0.0)

        for domain in range(N_DOMAINS):
            in_domain_B = domain_B == domain
            active_in_domain_B = in_domain_B & active_B
            self.checks_2[domain] += int(in_domain_B.sum())
            self.violations_2[domain] += int((violated_B & in_domain_B).sum())
            self.active_2[domain] += int(active_in_domain_B.sum())
            if bool(active_in_domain_B.any()):
                ratios = ratio_B[active_in_domain_B]
                self.ratio_sum_2[domain] += float(ratios.sum())
                self.ratio_max_2[domain] = max(self.ratio_max_2[domain], float(ratios.max()))

    def summary(self, domain: int | None = None) -> PerTokenSummary:
        """Return the summary of one domain (0 forget, 1 retain), or of both when None."""
        domains = list(range(N_DOMAINS)) if domain is None else [domain]
        n_active = int(self.active_2[domains].sum())
        return PerTokenSummary(
            checks=int(self.checks_2[domains].sum()),
            violations=int(self.violations_2[domains].sum()),
            n_active=n_active,
            max_ratio=float(self.ratio_max_2[domains].max()) if n_active else None,
            mean_tightness=float(self.ratio_sum_2[domains].sum()) / n_active if n_active else None,
        )


# Bound 2: expected retain damage.


def expected_damage_bound(
    retain_rate_C: torch.Tensor, retain_mean_f_C: torch.Tensor, multiplier: float
) -> float:
    """Return ``sum_{i in C} (c r_R(i) + E_R[f_i])``."""
    if retain_rate_C.shape != retain_mean_f_C.shape:
        raise BoundsError(
            f"retain rates and mean activations must have one shape, got "
            f"{tuple(retain_rate_C.shape)} and {tuple(retain_mean_f_C.shape)}"
        )
    rate_C = retain_rate_C.to(torch.float64)
    mean_f_C = retain_mean_f_C.to(torch.float64)
    return float((multiplier * rate_C + mean_f_C).sum())


@dataclass(frozen=True)
class MeanInterval:
    """A sample mean with its 95% Student-t interval.

    Attributes:
        mean: sample mean; None without values.
        ci_low: lower end of the interval; None below two values.
        ci_high: upper end of the interval; None below two values.
        n: number of values.
    """

    mean: float | None
    ci_low: float | None
    ci_high: float | None
    n: int


class MeanAccumulator:
    """Streaming mean and variance, merged batch by batch with Chan et al.'s update.

    The merge keeps the sum of squared deviations instead of the raw sum of squares,
    so the variance stays accurate when the mean is large against the spread.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, values_B: torch.Tensor) -> None:
        """Add a batch of values."""
        values_B = values_B.detach().to(torch.float64).flatten()
        n_batch = values_B.numel()
        if n_batch == 0:
            return
        batch_mean = float(values_B.mean())
        batch_m2 = float(((values_B - batch_mean) ** 2).sum())
        total = self.n + n_batch
        difference = batch_mean - self.mean
        self.mean += difference * n_batch / total
        self.m2 += batch_m2 + difference**2 * self.n * n_batch / total
        self.n = total

    def interval(self) -> MeanInterval:
        """Return the mean with its 95% Student-t interval."""
        if self.n == 0:
            return MeanInterval(mean=None, ci_low=None, ci_high=None, n=0)
        if self.n < 2:
            return MeanInterval(mean=self.mean, ci_low=None, ci_high=None, n=self.n)
        standard_error = math.sqrt(self.m2 / (self.n - 1) / self.n)
        half_width = float(stats.t.ppf(0.975, df=self.n - 1)) * standard_error
        return MeanInterval(
            mean=self.mean, ci_low=self.mean - half_width, ci_high=self.mean + half_width, n=self.n
        )


# Bound 3: Cantelli's inequality on the masked pre-activation.


def preactivation_moments(
    W_enc_DF: torch.Tensor,
    b_enc_F: torch.Tensor,
    b_dec_D: torch.Tensor,
    mean_x_D: torch.Tensor,
    cov_x_DD: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the mean ``mu_F`` and variance ``var_F`` of ``a = (x - b_dec) W_enc + b_enc``.

    ``W_enc_DF`` must be the effective encoder, zero outside each latent's support, so
    that ``w_i^T Sigma w_i`` equals ``w_{S_i}^T Sigma[S_i, S_i] w_{S_i}``. The variance
    does not depend on ``b_dec``, since subtracting a constant does not change it. It is
    clamped at 0 against rounding of an indefinite ``cov_x_DD``.
    """
    d_model = W_enc_DF.shape[0]
    if cov_x_DD.shape != (d_model, d_model) or mean_x_D.shape != (d_model,):
        raise BoundsError(
            f"the encoder has d_model {d_model}, but the input mean has shape "
            f"{tuple(mean_x_D.shape)} and the covariance {tuple(cov_x_DD.shape)}"
        )
    W_DF = W_enc_DF.to(torch.float64)
    device = W_DF.device
    mean_x_D = mean_x_D.to(device, torch.float64)
    cov_DD = cov_x_DD.to(device, torch.float64)

    mu_F = (mean_x_D - b_dec_D.to(device, torch.float64)) @ W_DF + b_enc_F.to(device, torch.float64)
    # diag(W^T Sigma W) without the F x F product.
    var_F = ((cov_DD @ W_DF) * W_DF).sum(dim=0).clamp_min(0.0)
    return mu_F, var_F


def cantelli_bound(mu_F: torch.Tensor, var_F: torch.Tensor) -> torch.Tensor:
    """Return the bound on ``P(a > 0)``: ``var / (var + mu^2)`` where ``mu < 0``, else 1.

    A latent with ``mu < 0`` and zero variance never reaches 0, so its bound is 0.
    """
    mu_F = mu_F.to(torch.float64)
    var_F = var_F.to(torch.float64).clamp_min(0.0)
    negative_F = mu_F < 0
    denominator_F = torch.where(negative_F, var_F + mu_F**2, 1.0)
    return torch.where(negative_F, var_F / denominator_F, torch.ones_like(mu_F))


def wilson_interval_array(successes: np.ndarray, n_total: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the Wilson score 95% interval of each proportion ``successes / n_total``.

    Returns NaN arrays when ``n_total`` is 0.
    """
    successes = np.asarray(successes, dtype=np.float64)
    if n_total <= 0:
        nan = np.full_like(successes, np.nan)
        return nan, nan.copy()
    proportion = successes / n_total
    z_squared = Z_95**2
    denominator = 1.0 + z_squared / n_total
    centre = (proportion + z_squared / (2 * n_total)) / denominator
    half_width = (
        Z_95
        * np.sqrt(proportion * (1.0 - proportion) / n_total + z_squared / (4 * n_total**2))
        / denominator
    )
    return np.maximum(0.0, centre - half_width), np.minimum(1.0, centre + half_width)


# Train-split statistics.


@dataclass(frozen=True)
class TrainStatistics:
    """Train-split statistics that the bounds and the latent selection need, in float64.

    Attributes:
        forget_rate_F: fraction of forget tokens on which each latent fires.
        retain_rate_F: fraction of retain tokens on which each latent fires, ``r_R``.
        retain_mean_f_F: mean activation on retain tokens, zeros included, ``E_R[f]``.
        retain_mean_x_D: mean normalized input on retain tokens.
        retain_cov_x_DD: population covariance of the normalized input on retain tokens.
        n_forget: forget token mass behind the rates (a count, or an EMA weight).
        n_retain: retain token mass.
        source: ``store`` (exact counts) or ``cache`` (the training cache).
    """

    forget_rate_F: torch.Tensor
    retain_rate_F: torch.Tensor
    retain_mean_f_F: torch.Tensor
    retain_mean_x_D: torch.Tensor
    retain_cov_x_DD: torch.Tensor
    n_forget: float
    n_retain: float
    source: str


class TrainStatisticsAccumulator:
    """Accumulate ``TrainStatistics`` exactly from batches of inputs and latent activations.

    The retain input sums are taken about a shift (the first retain batch's mean), which
    keeps ``E[x x^T] - E[x] E[x]^T`` accurate when the mean is large against the spread.
    """

    def __init__(self, d_model: int, d_sae: int, device: torch.device | str = "cpu") -> None:
        self.d_model = d_model
        self.d_sae = d_sae
        self.tokens_2 = torch.zeros(N_DOMAINS, dtype=torch.float64, device=device)
        self.firing_2F = torch.zeros(N_DOMAINS, d_sae, dtype=torch.float64, device=device)
        self.sum_f_2F = torch.zeros(N_DOMAINS, d_sae, dtype=torch.float64, device=device)
        self.shift_D: torch.Tensor | None = None
        self.sum_x_D = torch.zeros(d_model, dtype=torch.float64, device=device)
        self.sum_xx_DD = torch.zeros(d_model, d_model, dtype=torch.float64, device=device)

    def update(self, x_BD: torch.Tensor, f_BF: torch.Tensor, domain_B: torch.Tensor) -> None:
        """Add a batch of normalized inputs, their latent activations and domains (0 or 1)."""
        if x_BD.shape[1:] != (self.d_model,) or f_BF.shape != (x_BD.shape[0], self.d_sae):
            raise BoundsError(
                f"expected x of shape (batch, {self.d_model}) and f of shape (batch, {self.d_sae}), "
                f"got {tuple(x_BD.shape)} and {tuple(f_BF.shape)}"
            )
        device = self.tokens_2.device
        x_BD = x_BD.to(device, torch.float64)
        f_BF = f_BF.to(device, torch.float64)
        domain_B = domain_B.to(device, torch.int64)

        self.tokens_2 += torch.bincount(domain_B, minlength=N_DOMAINS)[:N_DOMAINS].to(torch.float64)
        self.firing_2F.index_add_(0, domain_B, (f_BF > 0).to(torch.float64))
        self.sum_f_2F.index_add_(0, domain_B, f_BF)

        retain_BD = x_BD[domain_B == RETAIN_DOMAIN]
        if retain_BD.shape[0] == 0:
            return
        if self.shift_D is None:
            self.shift_D = retain_BD.mean(dim=0)
        centred_BD = retain_BD - self.shift_D
        self.sum_x_D += centred_BD.sum(dim=0)
        self.sum_xx_DD.addmm_(centred_BD.T, centred_BD)

    def result(self) -> TrainStatistics:
        """Return the statistics; raise `BoundsError` when a domain has no tokens."""
        n_forget, n_retain = (float(value) for value in self.tokens_2)
        if n_forget == 0 or n_retain == 0:
            raise BoundsError(
                f"the train split has {n_forget:g} forget and {n_retain:g} retain tokens; the "
                "bounds need both. Harvest a forget and a retain corpus"
            )
        assert self.shift_D is not None
        centred_mean_D = self.sum_x_D / n_retain
        cov_DD = self.sum_xx_DD / n_retain - torch.outer(centred_mean_D, centred_mean_D)
        return TrainStatistics(
            forget_rate_F=self.firing_2F[FORGET_DOMAIN] / n_forget,
            retain_rate_F=self.firing_2F[RETAIN_DOMAIN] / n_retain,
            retain_mean_f_F=self.sum_f_2F[RETAIN_DOMAIN] / n_retain,
            retain_mean_x_D=self.shift_D + centred_mean_D,
            retain_cov_x_DD=(cov_DD + cov_DD.T) / 2,
            n_forget=n_forget,
            n_retain=n_retain,
            source="store",
        )
