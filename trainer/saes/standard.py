"""The standard (dense) SAE: ReLU with an L1 penalty, or TopK.

ReLU loss per batch: `mean_b ||x_b - x_hat_b||^2 + lambda_t * mean_b sum_i f_bi ||d_i||`,
where `d_i = W_dec_FD[i]` and `lambda_t` rises linearly from `lambda / l1_warmup_steps`
to `lambda` over the first `l1_warmup_steps` steps (SAELens' schedule). TopK keeps the
`k` largest pre-activations of each token (ReLU after) and has no sparsity penalty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from trainer.saes.base import BaseSAE, BaseSAEConfig, SAEConfigError, SAELoss


@dataclass
class StandardSAEConfig(BaseSAEConfig):
    """A standard SAE: the fields of BaseSAEConfig plus these.

    activation: "relu" (trained with the L1 penalty) or "topk" (no penalty).
    k: latents kept per token when activation is "topk"; ignored for "relu".
    l1_coefficient: weight lambda of the sparsity penalty `sum_i f_i ||d_i||` ("relu").
    l1_warmup_steps: steps over which the penalty weight rises linearly to
        l1_coefficient; 0 applies the full weight from the first step.
    b_dec_init: initial decoder bias: "mean" (mean of a sample of inputs),
        "geometric_median" (Weiszfeld iterations on the sample) or "zeros".
    """

    activation: Literal["relu", "topk"] = "relu"
    k: int = 32
    l1_coefficient: float = 5.0
    l1_warmup_steps: int = 0
    b_dec_init: Literal["mean", "geometric_median", "zeros"] = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activation not in ("relu", "topk"):
            raise SAEConfigError(f"invalid activation {self.activation!r}: use 'relu' or 'topk'")
        if self.activation == "topk" and not 1 <= self.k <= self.d_sae:
            raise SAEConfigError(f"invalid k {self.k} for a TopK SAE with d_sae {self.d_sae}: use 1 <= k <= d_sae")
        if not (math.isfinite(self.l1_coefficient) and self.l1_coefficient >= 0):
            raise SAEConfigError(f"invalid l1_coefficient {self.l1_coefficient}: it must be finite and >= 0")
        if self.l1_warmup_steps < 0:
            raise SAEConfigError(f"invalid l1_warmup_steps {self.l1_warmup_steps}: it must be >= 0")
        if self.b_dec_init not in ("mean", "geometric_median", "zeros"):
            raise SAEConfigError(
                f"invalid b_dec_init {self.b_dec_init!r}: use 'mean', 'geometric_median' or 'zeros'"
            )


def l1_coefficient_at(step: int, l1_coefficient: float, l1_warmup_steps: int) -> float:
    """Return the L1 weight at 0-based `step`: `lambda * min(1, (step + 1) / warmup)`."""
    if l1_warmup_steps <= 0:
        return l1_coefficient
    return l1_coefficient * min(1.0, (step + 1) / l1_warmup_steps)


def geometric_median(points_ND: torch.Tensor, max_iterations: int = 100, tolerance: float = 1e-6) -> torch.Tensor:
    """Return the geometric median of the rows of `points_ND` by Weiszfeld's algorithm."""
    points_ND = points_ND.to(torch.float64)
    median_D = points_ND.mean(dim=0)
    for _ in range(max_iterations):
        distances_N = (points_ND - median_D).norm(dim=1).clamp_min(1e-12)
        weights_N = 1.0 / distances_N
        updated_D = (weights_N[:, None] * points_ND).sum(dim=0) / weights_N.sum()
        shift = (updated_D - median_D).norm().item()
        median_D = updated_D
        if shift <= tolerance * max(1.0, median_D.norm().item()):
            break
    return median_D


class StandardSAE(BaseSAE):
    """A dense SAE with ReLU + L1 or TopK activations."""

    architecture = "standard"
    config_class = StandardSAEConfig
    cfg: StandardSAEConfig

    def __init__(self, cfg: StandardSAEConfig) -> None:
        super().__init__(cfg)

    @torch.no_grad()
    def initialize(self, sample_ND: torch.Tensor | None = None, generator: torch.Generator | None = None) -> None:
        """Draw the initial weights.

        Decoder rows are random unit vectors (normalized Gaussians), the encoder is the
        decoder's transpose and `b_enc` is zero. `b_dec` follows `cfg.b_dec_init`,
        computed on `sample_ND`, a sample of normalized activations that every
        option except "zeros" requires.
        """
        W_dec_FD = torch.randn(
            self.cfg.d_sae, self.cfg.d_in, dtype=torch.float32, generator=generator
        ).to(device=self.W_dec_FD.device, dtype=self.W_dec_FD.dtype)
        self.W_dec_FD.copy_(W_dec_FD)
        self.set_decoder_norm_to_unit_norm()
        self.W_enc_DF.copy_(self.W_dec_FD.T)
        self.b_enc_F.zero_()

        if self.cfg.b_dec_init == "zeros":
            self.b_dec_D.zero_()
            return
        if sample_ND is None or sample_ND.shape[0] == 0:
            raise SAEConfigError(f"b_dec_init={self.cfg.b_dec_init!r} needs a non-empty sample of activations")
        if sample_ND.shape[1] != self.cfg.d_in:
            raise SAEConfigError(f"the b_dec sample has width {sample_ND.shape[1]}, the SAE's d_in is {self.cfg.d_in}")
        if self.cfg.b_dec_init == "mean":
            b_dec_D = sample_ND.to(torch.float64).mean(dim=0)
        else:
            b_dec_D = geometric_median(sample_ND)
        self.b_dec_D.copy_(b_dec_D.to(self.b_dec_D))

    def pre_activations(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Return the encoder pre-activations `(x - b_dec) W_enc + b_enc`."""
        return (x_BD - self.b_dec_D) @ self.W_enc_DF + self.b_enc_F

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        pre_BF = self.pre_activations(x_BD)
        if self.cfg.activation == "relu":
            return torch.relu(pre_BF)
        top_values_BK, top_indices_BK = pre_BF.topk(self.cfg.k, dim=-1, sorted=False)
        f_BF = torch.zeros_like(pre_BF)
        return f_BF.scatter(-1, top_indices_BK, torch.relu(top_values_BK))

    def training_loss(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor, f_BF: torch.Tensor, l1_coefficient: float) -> SAELoss:
        """Return the loss of one batch given its forward pass and the current L1 weight.

        NOTE: TopK trains on the reconstruction error alone. The AuxK loss of Gao et al.
        (2024), which revives dead latents, is not implemented.
        """
        mse_loss = (x_hat_BD - x_BD).pow(2).sum(dim=-1).mean()
        decoder_norms_F = self.W_dec_FD.norm(dim=1)
        sparsity_loss = (f_BF * decoder_norms_F).sum(dim=-1).mean()
        if self.cfg.activation == "relu":
            loss = mse_loss + l1_coefficient * sparsity_loss
        else:
            loss = mse_loss
        return SAELoss(loss=loss, mse_loss=mse_loss, sparsity_loss=sparsity_loss)
