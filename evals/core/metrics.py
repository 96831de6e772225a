"""Core SAE metrics as streaming accumulators, free of model and file I/O.

Both accumulators keep float64 sums, so a metric depends on which tokens were seen and
not on how they were split into batches (up to float64 rounding).

Conventions (B batch of tokens, D d_model, F d_sae, V vocabulary, N positions):

- A latent is active on a token when its activation is non-zero. The SAEs here have
  non-negative activations (ReLU, TopK), where this is the same as ``f > 0``.
- ``mse`` is per element: the mean of ``(x - x_hat)**2`` over tokens and dimensions.
- ``explained_variance`` is ``1 - sum ||x - x_hat||^2 / sum ||x - mu||^2`` where ``mu`` is
  the per-dimension mean over all evaluated tokens.
- ``explained_variance_legacy`` is SAELens' and SAEBench's older per-token formula,
  ``mean_t (1 - ||x_t - x_hat_t||^2 / ||x_t - mu||^2)``. SAEBench takes ``mu`` over each
  batch, here it is a fixed mean passed in (the mean over all evaluated tokens), so the
  value does not depend on the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Input norms below this count as zero in ``l2_ratio`` and get a ratio of ``||x_hat||``
#: (SAEBench's guard against dividing by a near-zero norm).
MIN_NORM_FOR_RATIO = 1e-4

#: Rows of logits per ``log_softmax`` call in :class:`DownstreamLossAccumulator`.
#: NOTE: 64 rows of a 262,144-token vocabulary are 64 MiB per float32 copy.
DEFAULT_LOGIT_CHUNK = 64


@dataclass(frozen=True)
class ReconstructionMetrics:
    """Reconstruction and sparsity metrics over a set of tokens.

    Fields:
        n_tokens: tokens evaluated.
        explained_variance: ``1 - sum ||x - x_hat||^2 / sum ||x - mu||^2``, ``mu`` the
            per-dimension mean over the evaluated tokens.
        explained_variance_legacy: mean over tokens of ``1 - ||x - x_hat||^2 / ||x - mu||^2``,
            or ``None`` when the accumulator got no reference mean.
        mse: mean of ``(x - x_hat)**2`` over tokens and dimensions.
        cossim: mean per-token cosine similarity of ``x`` and ``x_hat`` (0 where either is zero).
        l2_norm_in: mean ``||x||``.
        l2_norm_out: mean ``||x_hat||``.
        l2_ratio: mean per-token ``||x_hat|| / ||x||``.
        relative_reconstruction_bias: ``sum ||x_hat||^2 / sum <x, x_hat>`` (1 for an unbiased
            reconstruction, below 1 for shrinkage), or ``None`` when ``sum <x, x_hat>`` is 0.
        l0: mean number of active latents per token.
        l1: mean ``sum_i |f_i|`` per token.
        frac_alive: fraction of latents active on at least one evaluated token.
        firing_frequency_F: per-latent fraction of tokens on which the latent is active (float64).
    """

    n_tokens: int
    explained_variance: float
    explained_variance_legacy: float | None
    mse: float
    cossim: float
    l2_norm_in: float
    l2_norm_out: float
    l2_ratio: float
    relative_reconstruction_bias: float | None
    l0: float
    l1: float
    frac_alive: float
    firing_frequency_F: torch.Tensor


class CoreMetricAccumulator:
    """Accumulates reconstruction and sparsity sums over batches of ``(x, x_hat, f)``.

    ``legacy_mean_D`` is the reference mean for ``explained_variance_legacy``. Without it
    the legacy value is ``None``, because the per-token formula needs the mean before the
    first batch.
    """

    def __init__(self, d_sae: int, legacy_mean_D: torch.Tensor | None = None) -> None:
        if d_sae <= 0:
            raise ValueError(f"d_sae must be positive, got {d_sae}")
        self.d_sae = d_sae
        self.legacy_mean_D = (
            None if legacy_mean_D is None else legacy_mean_D.detach().to(torch.float64)
        )

        self.n_tokens = 0
        self._d_model: int | None = None
        # NOTE: sums of squares are taken about a shift (the first batch's mean) because
        # residual streams have dimensions with a large mean, and sum(x^2) - N mu^2 about
        # zero would lose digits to cancellation.
        self._shift_D: torch.Tensor | None = None
        self._sum_centered_D: torch.Tensor | None = None
        self._sum_centered_sq = 0.0
        self._sum_resid_sq = 0.0
        self._sum_cossim = 0.0
        self._sum_norm_in = 0.0
        self._sum_norm_out = 0.0
        self._sum_l2_ratio = 0.0
        self._sum_x_hat_sq = 0.0
        self._sum_x_dot_x_hat = 0.0
        self._sum_legacy = 0.0
        self._sum_l0 = 0.0
        self._sum_l1 = 0.0
        self._fire_count_F = torch.zeros(d_sae, dtype=torch.int64)

    @torch.no_grad()
    def update(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor, f_BF: torch.Tensor) -> None:
        """Add one batch: inputs ``x_BD``, reconstructions ``x_hat_BD``, latent activations ``f_BF``."""
        self._check_shapes(x_BD, x_hat_BD, f_BF)
        if x_BD.shape[0] == 0:
            return

        x_BD = x_BD.detach().to(torch.float64)
        x_hat_BD = x_hat_BD.detach().to(torch.float64)
        f_BF = f_BF.detach()

        if self._shift_D is None or self._sum_centered_D is None:
            self._shift_D = x_BD.mean(dim=0)
            self._sum_centered_D = torch.zeros_like(self._shift_D)
        shift_D = self._shift_D.to(x_BD.device)
        centered_BD = x_BD - shift_D
        self._sum_centered_D += centered_BD.sum(dim=0).cpu()
        self._sum_centered_sq += centered_BD.square().sum().item()

        resid_sq_B = (x_BD - x_hat_BD).square().sum(dim=-1)
        self._sum_resid_sq += resid_sq_B.sum().item()

        norm_in_B = x_BD.norm(dim=-1)
        norm_out_B = x_hat_BD.norm(dim=-1)
        x_dot_x_hat_B = (x_BD * x_hat_BD).sum(dim=-1)
        cossim_B = torch.where(
            (norm_in_B > 0) & (norm_out_B > 0),
            x_dot_x_hat_B / (norm_in_B * norm_out_B).clamp_min(torch.finfo(torch.float64).tiny),
            torch.zeros_like(norm_in_B),
        )
        safe_norm_in_B = torch.where(
            norm_in_B < MIN_NORM_FOR_RATIO, torch.ones_like(norm_in_B), norm_in_B
        )
        self._sum_cossim += cossim_B.sum().item()
        self._sum_norm_in += norm_in_B.sum().item()
        self._sum_norm_out += norm_out_B.sum().item()
        self._sum_l2_ratio += (norm_out_B / safe_norm_in_B).sum().item()
        self._sum_x_hat_sq += norm_out_B.square().sum().item()
        self._sum_x_dot_x_hat += x_dot_x_hat_B.sum().item()

        if self.legacy_mean_D is not None:
            total_B = (x_BD - self.legacy_mean_D.to(x_BD.device)).square().sum(dim=-1)
            self._sum_legacy += (1.0 - resid_sq_B / total_B).sum().item()

        active_BF = f_BF != 0
        self._sum_l0 += active_BF.sum().item()
        self._sum_l1 += f_BF.abs().sum(dtype=torch.float64).item()
        self._fire_count_F += active_BF.sum(dim=0).cpu()

        self.n_tokens += x_BD.shape[0]

    def _check_shapes(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor, f_BF: torch.Tensor) -> None:
        if x_BD.ndim != 2 or x_hat_BD.shape != x_BD.shape:
            raise ValueError(
                f"x and x_hat must both have shape [batch, d_model], got {tuple(x_BD.shape)} "
                f"and {tuple(x_hat_BD.shape)}"
            )
        if f_BF.shape != (x_BD.shape[0], self.d_sae):
            raise ValueError(
                f"f must have shape [batch, d_sae] = [{x_BD.shape[0]}, {self.d_sae}], got {tuple(f_BF.shape)}"
            )
        if self._d_model is None:
            self._d_model = x_BD.shape[1]
        elif x_BD.shape[1] != self._d_model:
            raise ValueError(
                f"d_model changed between batches: {self._d_model} then {x_BD.shape[1]}"
            )
        if self.legacy_mean_D is not None and self.legacy_mean_D.shape != (x_BD.shape[1],):
            raise ValueError(
                f"legacy_mean_D has shape {tuple(self.legacy_mean_D.shape)}, expected ({x_BD.shape[1]},)"
            )

    def compute(self) -> ReconstructionMetrics:
        """Return the metrics over every token added so far.

        Raises ``ValueError`` when no token was added or when the inputs have zero
        variance, because explained variance is undefined then.
        """
        if self.n_tokens == 0 or self._sum_centered_D is None or self._d_model is None:
            raise ValueError("no tokens were added to the accumulator, so no metric is defined")
        n = self.n_tokens

        # Total sum of squares about the mean, from sums about the shift:
        # sum ||c||^2 - n ||mean(c)||^2 with c = x - shift.
        mean_centered_D = self._sum_centered_D / n
        total_sq = self._sum_centered_sq - n * mean_centered_D.square().sum().item()
        if total_sq <= 0.0:
            raise ValueError(
                f"the {n} evaluated activations have zero variance, so explained variance is undefined; "
                "evaluate on more than one distinct token"
            )

        firing_frequency_F = self._fire_count_F.to(torch.float64) / n
        return ReconstructionMetrics(
            n_tokens=n,
            explained_variance=1.0 - self._sum_resid_sq / total_sq,
            explained_variance_legacy=None if self.legacy_mean_D is None else self._sum_legacy / n,
            mse=self._sum_resid_sq / (n * self._d_model),
            cossim=self._sum_cossim / n,
            l2_norm_in=self._sum_norm_in / n,
            l2_norm_out=self._sum_norm_out / n,
            l2_ratio=self._sum_l2_ratio / n,
            relative_reconstruction_bias=(
                self._sum_x_hat_sq / self._sum_x_dot_x_hat if self._sum_x_dot_x_hat != 0.0 else None
            ),
            l0=self._sum_l0 / n,
            l1=self._sum_l1 / n,
            frac_alive=(self._fire_count_F > 0).to(torch.float64).mean().item(),
            firing_frequency_F=firing_frequency_F,
        )


def firing_frequency_summary(firing_frequency_F: torch.Tensor) -> dict[str, float]:
    """Summarize per-latent firing frequencies with SAEBench's core ``misc_metrics``.

    ``freq_over_p`` is the fraction of latents active on more than a fraction p of tokens.
    ``normalized_freq_over_p`` is their share of the summed frequencies, and 0 when every
    latent is dead, as in SAEBench.
    """
    freq_F = firing_frequency_F.to(torch.float64)
    total = freq_F.sum().item()
    summary = {}
    for name, threshold in (("1_percent", 0.01), ("10_percent", 0.1)):
        over_F = freq_F > threshold
        summary[f"freq_over_{name}"] = over_F.to(torch.float64).mean().item()
        summary[f"normalized_freq_over_{name}"] = (
            freq_F[over_F].sum().item() / total if total > 0 else 0.0
        )
    return summary


@torch.no_grad()
def max_cosine_similarity(vectors_FD: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Return, for each row, its largest cosine similarity with any other row, shape [F].

    Rows are processed ``chunk_size`` at a time so that no F x F matrix is built. An
    all-zero row (e.g. a fully pruned latent) has cosine 0 with every row.
    """
    n_rows = vectors_FD.shape[0]
    if vectors_FD.ndim != 2 or n_rows < 2:
        raise ValueError(f"need a [F, D] matrix with F >= 2, got shape {tuple(vectors_FD.shape)}")

    unit_FD = torch.nn.functional.normalize(vectors_FD.detach().to(torch.float32), dim=-1)
    max_F = torch.empty(n_rows, dtype=torch.float32, device=unit_FD.device)
    for start in range(0, n_rows, chunk_size):
        stop = min(start + chunk_size, n_rows)
        sims_CF = unit_FD[start:stop] @ unit_FD.T
        rows_C = torch.arange(stop - start, device=unit_FD.device)
        sims_CF[rows_C, rows_C + start] = -math.inf
        max_F[start:stop] = sims_CF.max(dim=-1).values
    return max_F


def next_token_mask(
    input_ids_BL: torch.Tensor, special_token_ids: set[int] | list[int]
) -> torch.Tensor:
    """Return ``mask_BL``: True where position t's next-token prediction is scored.

    Position t predicts token t + 1. It is scored when t + 1 exists and neither the input
    token at t nor the target is special. So the prediction made at BOS is excluded,
    because the SAE was not trained on the BOS residual.
    """
    special_ids = torch.tensor(
        sorted(set(special_token_ids)), dtype=input_ids_BL.dtype, device=input_ids_BL.device
    )
    is_special_BL = torch.isin(input_ids_BL, special_ids)
    mask_BL = torch.zeros_like(input_ids_BL, dtype=torch.bool)
    mask_BL[:, :-1] = ~is_special_BL[:, :-1] & ~is_special_BL[:, 1:]
    return mask_BL


@dataclass(frozen=True)
class DownstreamMetrics:
    """Next-token cross-entropy and KL divergence with the SAE spliced in, in nats per token.

    Fields:
        n_tokens: next-token predictions scored.
        ce_loss_without_sae: mean cross-entropy of the unmodified model.
        ce_loss_with_sae: mean cross-entropy with the layer's residual replaced by the SAE reconstruction.
        ce_loss_with_ablation: mean cross-entropy with the layer's residual set to zero.
        ce_loss_score: ``(ce_ablation - ce_sae) / (ce_ablation - ce_without_sae)``, 1 for a
            perfect reconstruction and 0 for one as bad as zero ablation; ``None`` when
            ablation does not change the loss.
        kl_div_with_sae: mean ``KL(p_original || p_sae)`` over next-token distributions.
        kl_div_with_ablation: mean ``KL(p_original || p_ablation)``.
        kl_div_score: ``(kl_ablation - kl_sae) / kl_ablation``; ``None`` when ``kl_ablation`` is 0.
    """

    n_tokens: int
    ce_loss_without_sae: float
    ce_loss_with_sae: float
    ce_loss_with_ablation: float
    ce_loss_score: float | None
    kl_div_with_sae: float
    kl_div_with_ablation: float
    kl_div_score: float | None


class DownstreamLossAccumulator:
    """Accumulates next-token CE and KL from three sets of logits for the same positions.

    ``update`` takes logits already restricted to scored positions and their targets. It
    computes ``log_softmax`` in float32 on ``chunk_size`` rows at a time, so the peak
    extra memory is a few ``chunk_size x V`` float32 arrays.
    """

    def __init__(self, chunk_size: int = DEFAULT_LOGIT_CHUNK) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        self.n_tokens = 0
        self._sum_ce_original = 0.0
        self._sum_ce_sae = 0.0
        self._sum_ce_ablation = 0.0
        self._sum_kl_sae = 0.0
        self._sum_kl_ablation = 0.0

    @torch.no_grad()
    def update(
        self,
        logits_original_NV: torch.Tensor,
        logits_sae_NV: torch.Tensor,
        logits_ablation_NV: torch.Tensor,
        targets_N: torch.Tensor,
    ) -> None:
        """Add N scored positions: the three models' logits and the target token ids."""
        if logits_original_NV.ndim != 2:
            raise ValueError(
                f"logits must have shape [positions, vocab], got {tuple(logits_original_NV.shape)}"
            )
        for name, logits_NV in (
            ("logits_sae_NV", logits_sae_NV),
            ("logits_ablation_NV", logits_ablation_NV),
        ):
            if logits_NV.shape != logits_original_NV.shape:
                raise ValueError(
                    f"{name} has shape {tuple(logits_NV.shape)}, expected {tuple(logits_original_NV.shape)}"
                )
        if targets_N.shape != logits_original_NV.shape[:1]:
            raise ValueError(
                f"targets must have shape ({logits_original_NV.shape[0]},), got {tuple(targets_N.shape)}"
            )

        for start in range(0, targets_N.shape[0], self.chunk_size):
            stop = start + self.chunk_size
            targets_C1 = targets_N[start:stop].long().unsqueeze(-1)
            logp_original_CV = torch.log_softmax(logits_original_NV[start:stop].float(), dim=-1)
            ce_original_C = -logp_original_CV.gather(-1, targets_C1).squeeze(-1)
            p_original_CV = logp_original_CV.exp()
            self._sum_ce_original += ce_original_C.sum(dtype=torch.float64).item()

            for logits_NV, kind in ((logits_sae_NV, "sae"), (logits_ablation_NV, "ablation")):
                logp_CV = torch.log_softmax(logits_NV[start:stop].float(), dim=-1)
                ce_C = -logp_CV.gather(-1, targets_C1).squeeze(-1)
                # xlogy-style: terms with p_original = 0 contribute 0, even where logp is -inf.
                kl_terms_CV = torch.where(
                    p_original_CV > 0,
                    p_original_CV * (logp_original_CV - logp_CV),
                    torch.zeros_like(logp_CV),
                )
                kl_C = kl_terms_CV.sum(dim=-1)
                if kind == "sae":
                    self._sum_ce_sae += ce_C.sum(dtype=torch.float64).item()
                    self._sum_kl_sae += kl_C.sum(dtype=torch.float64).item()
                else:
                    self._sum_ce_ablation += ce_C.sum(dtype=torch.float64).item()
                    self._sum_kl_ablation += kl_C.sum(dtype=torch.float64).item()

        self.n_tokens += targets_N.shape[0]

    def compute(self) -> DownstreamMetrics:
        """Return mean CE and KL over every position added so far, and their scores."""
        if self.n_tokens == 0:
            raise ValueError("no next-token predictions were added, so CE and KL are undefined")
        n = self.n_tokens
        ce_original = self._sum_ce_original / n
        ce_sae = self._sum_ce_sae / n
        ce_ablation = self._sum_ce_ablation / n
        kl_sae = self._sum_kl_sae / n
        kl_ablation = self._sum_kl_ablation / n

        ce_gap = ce_ablation - ce_original
        return DownstreamMetrics(
            n_tokens=n,
            ce_loss_without_sae=ce_original,
            ce_loss_with_sae=ce_sae,
            ce_loss_with_ablation=ce_ablation,
            ce_loss_score=(ce_ablation - ce_sae) / ce_gap if ce_gap != 0.0 else None,
            kl_div_with_sae=kl_sae,
            kl_div_with_ablation=kl_ablation,
            kl_div_score=(kl_ablation - kl_sae) / kl_ablation if kl_ablation != 0.0 else None,
        )
