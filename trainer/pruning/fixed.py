"""Gradual magnitude pruning (variant "fixed").

At each event the encoder keeps `round(rho_t * d_sae * d_model)` connections, with
rho_t the cubic schedule of `trainer.pruning.schedule`, by pruning the live
connections of smallest |W_ij| (no data statistics). With `prune_decoder`, the decoder
follows the same schedule on |W_dec_ij|. Both guards of `PruningHook` apply.
"""

from __future__ import annotations

from typing import Any

import torch

from stores.masks import PackedMask
from trainer.batches import Batch
from trainer.pruning.events import PruningHook
from trainer.pruning.schedule import cubic_density


class FixedPruningHook(PruningHook):
    """Prune the smallest-magnitude connections on the cubic density schedule."""

    def scheduled_count(self, done: int) -> int:
        """Return the number of connections kept after the event at step `done`."""
        density = cubic_density(done, self.options.target_density, self.start_step, self.end_step)
        return max(round(density * self.n_connections), self.target_count)

    @torch.no_grad()
    def prune_event(self, done: int, optimizer: torch.optim.Optimizer, batch: Batch) -> dict[str, Any] | None:
        sae = self.sae
        keep = self.scheduled_count(done)
        n_encoder = sae.encoder_mask.count() - keep
        if n_encoder <= 0:
            return None

        magnitude_FD = sae.W_enc_DF.detach().abs().T.double()
        pruned_FD, kept_whole = self.prune_encoder(
            optimizer, magnitude_FD, torch.zeros_like(magnitude_FD), n_encoder, batch.x_BD
        )
        self.pending_masks = {"encoder": PackedMask.from_dense(pruned_FD)}

        pruned_decoder = 0
        decoder_mask = sae.decoder_mask
        if decoder_mask is not None:
            n_decoder = decoder_mask.count() - keep
            if n_decoder > 0:
                decoder_magnitude_FD = sae.W_dec_FD.detach().abs().double()
                decoder_pruned_FD = self.prune_decoder(
                    optimizer, decoder_magnitude_FD, torch.zeros_like(decoder_magnitude_FD), n_decoder
                )
                self.pending_masks["decoder"] = PackedMask.from_dense(decoder_pruned_FD)
                pruned_decoder = int(decoder_pruned_FD.sum())

        densities = sae.mask_densities()
        return {
            "pruned": int(pruned_FD.sum()),
            "pruned_decoder": pruned_decoder,
            "regrown": 0,
            "latents_kept_whole": kept_whole,
            "scheduled_density": keep / self.n_connections,
            "density": densities["encoder_density"],
            "decoder_density": densities["decoder_density"],
        }
