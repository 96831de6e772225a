"""Adaptive pruning (variant "adaptive"): correlation-driven, separation-aware, feedback-controlled.

At each event (every prune_every steps in [t0, t1]), from the correlation cache:

1. specificity of latent i: s_i = (r_F(i) - r_R(i)) / (r_F(i) + r_R(i) + eps);
2. importance of encoder connection (i, j): I_ij = |W_ij| sqrt(E[x_j^2 | f_i > 0]);
3. for forget-specific latents (s_i >= tau), the separation pressure
   q_ij = sqrt(E_R[x_j^2 | f_i > 0]) / (sqrt(E_R[...]) + sqrt(E_F[...]) + eps) and the
   score S_ij = I_ij (1 - beta q_ij); every other latent has S_ij = I_ij;
4. the k_t lowest-scoring live connections are pruned (ties by |W_ij|), never below the
   target density, under the guards of `PruningHook`;
5. fvu_window steps later: if the moving-average FVU rose by more than tolerance,
   k_{t+1} = k_t / 2 and the share regrow_fraction of the event's pruned connections
   with the largest dense-gradient magnitude is regrown; otherwise
   k_{t+1} = min(1.5 k_t, k_max). Pruning stops at the target density or once k < 1.

A forget-specific latent's connections that carry retain-token input score lower, so
they go first: the latent keeps firing on forget tokens and fires less on retain ones.

With `prune_decoder`, the decoder is pruned after each event down to the encoder's
density, by S^dec_ij = |W_dec_ij| sqrt(E[f_i^2]) (the size of latent i's contribution
to output j), and regrown by the same rule.

NOTE: the cache keeps E[x_j^2 | f_i > 0] of the uncentred input x, while the encoder
multiplies x - b_dec, so I_ij measures the connection's input energy about 0.
NOTE: a latent without cache statistics yet (no refresh since it last moved, or one
that never fired) has I_ij = 0, so its connections rank by |W_ij| below every scored one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from stores.cache import Stats, specificity
from stores.masks import PackedMask
from trainer.batches import Batch
from trainer.pruning.events import PruningHook
from trainer.pruning.options import AdaptiveOptions, PruningConfigError
from trainer.pruning.schedule import pruning_steps
from trainer.pruning.selection import select_largest
from trainer.saes import HookContext
from trainer.saes.standard import l1_coefficient_at

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionScores:
    """Scores of the encoder connections, latents as rows, float64.

    scores_FD: S_ij, lower is pruned first.
    importance_FD: I_ij.
    specificity_F: s_i.
    forget_specific_F: s_i >= tau.
    """

    scores_FD: torch.Tensor
    importance_FD: torch.Tensor
    specificity_F: torch.Tensor
    forget_specific_F: torch.Tensor


def connection_scores(
    weight_magnitude_FD: torch.Tensor, forget: Stats, retain: Stats, tau: float, beta: float, epsilon: float
) -> ConnectionScores:
    """Return S_ij, I_ij and s_i from |W_ij| (latents as rows) and the per-domain statistics."""
    magnitude_FD = weight_magnitude_FD.to(torch.float64)
    importance_FD = magnitude_FD * (forget + retain).active_input_energy_FD.sqrt()
    specificity_F = specificity(forget, retain, epsilon)
    forget_specific_F = specificity_F >= tau

    retain_drive_FD = retain.active_input_energy_FD.sqrt()
    forget_drive_FD = forget.active_input_energy_FD.sqrt()
    pressure_FD = retain_drive_FD / (retain_drive_FD + forget_drive_FD + epsilon)
    scores_FD = torch.where(forget_specific_F[:, None], importance_FD * (1.0 - beta * pressure_FD), importance_FD)
    return ConnectionScores(scores_FD, importance_FD, specificity_F, forget_specific_F)


@dataclass(frozen=True)
class FeedbackDecision:
    """Outcome of the FVU feedback after an event.

    next_k: connections to prune at the next event.
    regrow: whether part of the event's pruned connections grow back.
    stop: whether pruning stops (next_k < 1).
    """

    next_k: float
    regrow: bool
    stop: bool


def feedback_rule(k: float, fvu_before: float | None, fvu_after: float | None, tolerance: float, k_max: float) -> FeedbackDecision:
    """Apply the FVU feedback: halve k and regrow on a rise above tolerance, else grow k by 1.5x.

    A missing FVU (no step recorded) counts as no rise.
    """
    rose = fvu_before is not None and fvu_after is not None and fvu_after - fvu_before > tolerance
    next_k = k / 2.0 if rose else min(1.5 * k, float(k_max))
    return FeedbackDecision(next_k=next_k, regrow=rose, stop=next_k < 1.0)


class AdaptivePruningHook(PruningHook):
    """Prune by separation-aware scores at a rate the FVU feedback controls."""

    options: AdaptiveOptions

    def __init__(self, context: HookContext) -> None:
        super().__init__(context)
        options = self.options
        n_events = len(pruning_steps(self.start_step, self.end_step, options.prune_every))
        to_prune = self.n_connections - self.target_count
        self.k_init = options.k_init if options.k_init is not None else max(1, math.ceil(to_prune / n_events))
        self.k_max = options.k_max if options.k_max is not None else 4 * self.k_init
        if self.k_max < self.k_init:
            raise PruningConfigError(
                f"invalid k_max {self.k_max}: it is below k_init {self.k_init}; raise k_max or set k_init"
            )
        self.k = float(self.k_init)
        self.stopped = False

    def scores(self) -> ConnectionScores:
        """Score every encoder connection from the current weights and cache."""
        assert self.tracker is not None
        cache = self.tracker.cache
        return connection_scores(
            self.sae.W_enc_DF.detach().abs().T,
            cache.select(["forget"]),
            cache.select(["retain"]),
            self.options.tau,
            self.options.beta,
            self.options.epsilon,
        )

    @torch.no_grad()
    def prune_event(self, done: int, optimizer: torch.optim.Optimizer, batch: Batch) -> dict[str, Any] | None:
        sae = self.sae
        live = sae.encoder_mask.count()
        if self.stopped or live <= self.target_count:
            return None
        n_encoder = min(math.floor(self.k), live - self.target_count)

        scores = self.scores()
        magnitude_FD = sae.W_enc_DF.detach().abs().T.double()
        pruned_FD, kept_whole = self.prune_encoder(optimizer, scores.scores_FD, magnitude_FD, n_encoder, batch.x_BD)
        self.pending_masks = {"encoder": PackedMask.from_dense(pruned_FD)}

        pruned_decoder = 0
        decoder_mask = sae.decoder_mask
        if decoder_mask is not None:
            n_decoder = decoder_mask.count() - sae.encoder_mask.count()
            if n_decoder > 0:
                decoder_pruned_FD = self.prune_decoder(optimizer, *self._decoder_scores(), n_decoder)
                self.pending_masks["decoder"] = PackedMask.from_dense(decoder_pruned_FD)
                pruned_decoder = int(decoder_pruned_FD.sum())

        densities = sae.mask_densities()
        pruned = int(pruned_FD.sum())
        forget_specific_rows_F = scores.forget_specific_F[:, None].expand_as(pruned_FD)
        return {
            "k": self.k,
            "pruned": pruned,
            "pruned_forget_specific": int((pruned_FD & forget_specific_rows_F).sum()),
            "n_forget_specific": int(scores.forget_specific_F.sum()),
            "pruned_decoder": pruned_decoder,
            "regrown": 0,
            "latents_kept_whole": kept_whole,
            "density": densities["encoder_density"],
            "decoder_density": densities["decoder_density"],
        }

    def _decoder_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.tracker is not None
        both = self.tracker.cache.select()
        mean_square_F = torch.where(both.n_rows_F > 0, both.s2_F / both.n_rows_F.clamp_min(1e-300), 0.0)
        magnitude_FD = self.sae.W_dec_FD.detach().abs().double()
        return magnitude_FD * mean_square_F.sqrt()[:, None], magnitude_FD

    @torch.no_grad()
    def complete_event(
        self, event: dict[str, Any], fvu_after: float | None, done: int, optimizer: torch.optim.Optimizer, batch: Batch
    ) -> dict[str, Any]:
        decision = feedback_rule(self.k, event["fvu_before"], fvu_after, self.options.tolerance, self.k_max)
        regrown = regrown_decoder = 0
        if decision.regrow and self.options.regrow_fraction > 0:
            cfg = self.context.cfg
            l1_coefficient = l1_coefficient_at(done - 1, cfg.l1_coefficient, cfg.l1_warmup_steps)
            grad_W_enc_DF, grad_W_dec_FD = self.sae.dense_gradients(batch.x_BD, l1_coefficient)
            encoder_FD = self._regrowth(
                "encoder", grad_W_enc_DF.abs().T, self.sae.encoder_mask.to_dense()
            )
            decoder_FD = None
            decoder_mask = self.sae.decoder_mask
            if decoder_mask is not None and "decoder" in self.pending_masks:
                decoder_FD = self._regrowth("decoder", grad_W_dec_FD.abs(), decoder_mask.to_dense())
                regrown_decoder = int(decoder_FD.sum())
            self.regrow(optimizer, encoder_FD, decoder_FD)
            regrown = int(encoder_FD.sum())

        self.k = decision.next_k
        if decision.stop:
            self.stopped = True
            logger.warning(
                "Adaptive pruning stops at step %d: k fell to %.3g (< 1) at encoder density %.4f, target %.4f",
                done, self.k, self.sae.encoder_mask.density(), self.options.target_density,
            )
        return {
            "fvu_rose": decision.regrow,
            "regrown": regrown,
            "regrown_decoder": regrown_decoder,
            "next_k": self.k,
            "density_after_feedback": self.sae.encoder_mask.density(),
        }

    def _regrowth(self, name: str, grad_magnitude_FD: torch.Tensor, live_FD: torch.Tensor) -> torch.Tensor:
        candidates_FD = self.pending_masks[name].to_dense() & ~live_FD
        n = math.ceil(self.options.regrow_fraction * int(candidates_FD.sum()))
        return select_largest(grad_magnitude_FD.double(), candidates_FD, n)

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "pruning_k": self.k}

    def extra_state(self) -> dict[str, Any]:
        return {"k": self.k, "stopped": self.stopped}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.k = float(state["k"])
        self.stopped = bool(state["stopped"])
