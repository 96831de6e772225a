"""The base of the pruning hooks: guarded pruning, FVU tracking and the pruning log.

A pruning event runs after completed step t when `is_pruning_step(t, t0, t1,
prune_every)`. The variant chooses scores and a count; `PruningHook.prune_encoder`
then removes the lowest-scoring live connections under two guards:

- every latent keeps its `min_connections` highest-scoring connections;
- no latent that fired on the event's batch before pruning is silent on it after.
  Latents that would be silenced keep all their connections, and the shortfall is
  pruned from other latents in up to `MAX_PRUNE_ROUNDS` rounds.

Pruned weights and their Adam moments are set to 0 (`MaskedSAE.apply_masks_`).

FVU (fraction of variance unexplained, `sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`
per batch) is recorded every step. `fvu_before` of an event is the mean over the
`fvu_window` steps before it, `fvu_after` the mean over the `fvu_window` steps after
it, available `fvu_window` steps later. Then the event's line is appended to
`<run>/pruning_log.jsonl`, and "adaptive" applies its feedback. The after window ends
early at the next event, because the event at t1 may come sooner than fvu_window
steps. An event whose window the run cut short is logged at the end without feedback.
`fvu_after_steps` records the steps averaged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stores.masks import PackedMask
from trainer.batches import Batch
from trainer.checkpoint import COMPLETE_MARKER, latest_checkpoint, read_checkpoint_state
from trainer.pruning.options import FixedOptions, PruningConfigError
from trainer.pruning.schedule import is_pruning_step, resolve_window
from trainer.pruning.selection import select_prunable
from trainer.pruning.tracking import SeparationHook
from trainer.saes import BaseSAE, HookContext
from trainer.saes.masked import MaskedSAE

logger = logging.getLogger(__name__)

PRUNING_LOG_FILE = "pruning_log.jsonl"
PRUNING_STATE_FILE = "pruning_state.json"
FVU_STATE_FILE = "pruning_fvu.safetensors"
PENDING_MASKS_GROUP = "pruning_pending"

#: Rounds of pruning that make up for latents the liveness guard kept whole.
MAX_PRUNE_ROUNDS = 4


def batch_fvu(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Return the FVU of one batch as a 0-d float64 tensor (no device synchronization)."""
    x_BD = x_BD.double()
    error = (x_hat_BD.double() - x_BD).pow(2).sum()
    variance = (x_BD - x_BD.mean(dim=0, keepdim=True)).pow(2).sum()
    return error / variance.clamp_min(1e-12)


def fires_on(sae: MaskedSAE, x_BD: torch.Tensor, encoder_mask_FD: torch.Tensor) -> torch.Tensor:
    """Return which latents fire on at least one token of `x_BD` under `encoder_mask_FD`."""
    f_BF = sae.activate(sae.pre_activations_with_mask(x_BD, encoder_mask_FD))
    return (f_BF > 0).any(dim=0)


class PruningHook(SeparationHook):
    """Shared mechanics of the "fixed" and "adaptive" hooks; see the module docstring."""

    options: FixedOptions

    def __init__(self, context: HookContext) -> None:
        super().__init__(context)
        if not isinstance(context.sae, MaskedSAE):
            raise PruningConfigError(
                f"variant {context.cfg.variant!r} prunes a MaskedSAE, got {type(context.sae).__name__}"
            )
        self.sae: MaskedSAE = context.sae
        options = self.options
        self.total_steps = context.cfg.total_steps
        self.start_step, self.end_step = resolve_window(options.start_step, options.end_step, self.total_steps)

        d_sae, d_in = self.sae.mask_shape
        self.n_connections = d_sae * d_in
        self.target_count = round(options.target_density * self.n_connections)
        if options.min_connections * d_sae > self.target_count:
            raise PruningConfigError(
                f"min_connections {options.min_connections} keeps at least {options.min_connections}/{d_in} = "
                f"{options.min_connections / d_in:.3f} of the connections, above target_density "
                f"{options.target_density}; lower min_connections to at most "
                f"{math.floor(options.target_density * d_in)} or raise target_density"
            )

        self.fvu_window = options.resolved_fvu_window
        self.fvu_ring_W = torch.zeros(self.fvu_window, dtype=torch.float64, device=self.device)
        self.n_fvu_recorded = 0
        self.pending: dict[str, Any] | None = None
        self.pending_masks: dict[str, PackedMask] = {}

        self.log_path = context.run_dir / PRUNING_LOG_FILE
        if latest_checkpoint(context.run_dir) is None:
            # A fresh run (or a resume without a checkpoint) starts a new log.
            self.log_path.unlink(missing_ok=True)

    # FVU.

    def record_reconstruction(self, step: int, x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> None:
        self.fvu_ring_W[step % self.fvu_window] = batch_fvu(x_BD, x_hat_BD)
        self.n_fvu_recorded += 1

    def moving_fvu(self) -> float | None:
        """Return the mean FVU of the last fvu_window steps (fewer at the start), or None."""
        n = min(self.n_fvu_recorded, self.fvu_window)
        if n == 0:
            return None
        # Slots not yet written are 0, so the sum covers exactly the n recorded steps.
        return float(self.fvu_ring_W.sum()) / n

    # Events.

    def fvu_since(self, event_step: int, done: int) -> float | None:
        """Return the mean FVU of the steps after the event at `event_step`, up to `done`.

        At most the last fvu_window steps are kept, so `done - event_step` must not exceed it.
        """
        slots = [step % self.fvu_window for step in range(event_step, done)]
        if not slots:
            return None
        return float(self.fvu_ring_W[slots].mean())

    def on_step_end(self, done: int, sae: BaseSAE, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
        is_event = is_pruning_step(done, self.start_step, self.end_step, self.options.prune_every)
        # The event at t1 can follow the previous one by fewer than fvu_window steps,
        # and then ends its after window early.
        if self.pending is not None and (done == self.pending["step"] + self.fvu_window or is_event):
            steps_after = done - self.pending["step"]
            fvu_after = self.fvu_since(self.pending["step"], done)
            extra = self.complete_event(self.pending, fvu_after, done, optimizer, batch)
            self._write_event({**self.pending, "fvu_after": fvu_after, "fvu_after_steps": steps_after,
                               **extra, "logged_step": done})
            self.pending = None
            self.pending_masks = {}

        if is_event:
            fvu_before = self.moving_fvu()
            event = self.prune_event(done, optimizer, batch)
            if event is not None:
                self.pending = {"step": done, "fvu_before": fvu_before, **event}
                logger.info(
                    "Pruning at step %d: %d encoder connections pruned, encoder density %.4f",
                    done, event["pruned"], event["density"],
                )

    def prune_event(self, done: int, optimizer: torch.optim.Optimizer, batch: Batch) -> dict[str, Any] | None:
        """Prune at step `done`; return the event's log fields, or None when nothing was pruned.

        Implementations set `self.pending_masks` to the connections they pruned.
        """
        raise NotImplementedError

    def complete_event(
        self, event: dict[str, Any], fvu_after: float | None, done: int, optimizer: torch.optim.Optimizer, batch: Batch
    ) -> dict[str, Any]:
        """Act on an event's FVU after its window and return extra log fields (none by default)."""
        return {}

    @torch.no_grad()
    def prune_encoder(
        self,
        optimizer: torch.optim.Optimizer,
        scores_FD: torch.Tensor,
        tiebreak_FD: torch.Tensor,
        n: int,
        x_BD: torch.Tensor,
    ) -> tuple[torch.Tensor, int]:
        """Prune up to `n` lowest-scoring encoder connections under both guards.

        Returns the pruned connections (bool, latents as rows) and the number of latents
        the liveness guard kept whole.
        """
        sae = self.sae
        live_FD = sae.encoder_mask.to_dense()
        alive_before_F = fires_on(sae, x_BD, live_FD)
        pruned_FD = torch.zeros_like(live_FD)
        frozen_F = torch.zeros_like(alive_before_F)

        for _ in range(MAX_PRUNE_ROUNDS):
            remaining = n - int(pruned_FD.sum())
            if remaining <= 0:
                break
            chosen_FD = select_prunable(
                scores_FD, tiebreak_FD, live_FD & ~pruned_FD, remaining, self.options.min_connections, frozen_F
            )
            if not bool(chosen_FD.any()):
                break
            pruned_FD |= chosen_FD
            # With ReLU one check suffices. With TopK, a latent given back its
            # connections can push another out of the top k, so the check repeats.
            # Each pass freezes at least one more latent or stops.
            while True:
                silenced_F = alive_before_F & ~fires_on(sae, x_BD, live_FD & ~pruned_FD)
                newly_frozen_F = silenced_F & ~frozen_F
                if not bool(silenced_F.any()):
                    break
                pruned_FD &= ~silenced_F[:, None]
                frozen_F |= silenced_F
                if not bool(newly_frozen_F.any()):
                    logger.warning(
                        "%d latents stay silent on the pruning batch although their connections were kept",
                        int(silenced_F.sum()),
                    )
                    break

        sae.set_encoder_mask(PackedMask.from_dense(live_FD & ~pruned_FD))
        sae.apply_masks_(optimizer)
        return pruned_FD, int(frozen_F.sum())

    @torch.no_grad()
    def prune_decoder(
        self, optimizer: torch.optim.Optimizer, scores_FD: torch.Tensor, tiebreak_FD: torch.Tensor, n: int
    ) -> torch.Tensor:
        """Prune up to `n` lowest-scoring decoder connections, keeping min_connections per latent."""
        sae = self.sae
        decoder_mask = sae.decoder_mask
        assert decoder_mask is not None
        live_FD = decoder_mask.to_dense()
        pruned_FD = select_prunable(scores_FD, tiebreak_FD, live_FD, n, self.options.min_connections)
        sae.set_decoder_mask(PackedMask.from_dense(live_FD & ~pruned_FD))
        sae.apply_masks_(optimizer)
        return pruned_FD

    @torch.no_grad()
    def regrow(self, optimizer: torch.optim.Optimizer, encoder_FD: torch.Tensor, decoder_FD: torch.Tensor | None) -> None:
        """Set the given connections live again; their weights and Adam moments start at 0."""
        sae = self.sae
        sae.set_encoder_mask(PackedMask.from_dense(sae.encoder_mask.to_dense() | encoder_FD))
        decoder_mask = sae.decoder_mask
        if decoder_FD is not None and decoder_mask is not None:
            sae.set_decoder_mask(PackedMask.from_dense(decoder_mask.to_dense() | decoder_FD))
        # Pruned weights and moments are already 0 (apply_masks_ at pruning, zero
        # gradients since), so the regrown connections start from 0 as required.
        sae.apply_masks_(optimizer)

    # Log and state.

    def _write_event(self, record: dict[str, Any]) -> None:
        with self.log_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        logger.info(
            "Pruning event of step %d: FVU %s -> %s, %d pruned, %d regrown",
            record["step"], _format(record.get("fvu_before")), _format(record.get("fvu_after")),
            record["pruned"], record.get("regrown", 0),
        )

    def metrics(self) -> dict[str, float]:
        values = super().metrics()
        densities = self.sae.mask_densities()
        values["encoder_density"] = float(densities["encoder_density"] or 0.0)
        if densities["decoder_density"] is not None:
            values["decoder_density"] = float(densities["decoder_density"])
        return values

    def extra_state(self) -> dict[str, Any]:
        """Return the subclass's JSON state saved in checkpoints."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned."""

    def _save_state(self, directory: Path) -> None:
        directory = Path(directory)
        state = {
            "n_fvu_recorded": self.n_fvu_recorded,
            "pending": self.pending,
            "pending_masks": sorted(self.pending_masks),
            **self.extra_state(),
        }
        (directory / PRUNING_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        save_file({"fvu_ring_W": self.fvu_ring_W.contiguous().cpu()}, str(directory / FVU_STATE_FILE))
        for name, mask in self.pending_masks.items():
            mask.save(directory / PENDING_MASKS_GROUP, name)

    def checkpoint_writers(self) -> list:
        # The masks themselves are in the checkpoint already: MaskedSAE.save writes them.
        return [*super().checkpoint_writers(), self._save_state]

    def restore(self, checkpoint_dir: Path) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        super().restore(checkpoint_dir)
        self.sae.load_masks(checkpoint_dir)

        state = json.loads((checkpoint_dir / PRUNING_STATE_FILE).read_text())
        self.n_fvu_recorded = int(state["n_fvu_recorded"])
        self.pending = state["pending"]
        self.pending_masks = {
            name: PackedMask.load(
                checkpoint_dir / PENDING_MASKS_GROUP, name, expected_shape=self.sae.mask_shape, device=self.device
            )
            for name in state["pending_masks"]
        }
        ring_W = load_file(str(checkpoint_dir / FVU_STATE_FILE))["fvu_ring_W"]
        if ring_W.shape != self.fvu_ring_W.shape:
            raise PruningConfigError(
                f"{checkpoint_dir / FVU_STATE_FILE} contains an FVU window of {ring_W.shape[0]} steps, "
                f"this run uses fvu_window {self.fvu_window}; resume with the original options"
            )
        self.fvu_ring_W = ring_W.to(self.device)
        self.load_extra_state(state)
        if (checkpoint_dir / COMPLETE_MARKER).is_file():
            self._trim_log(int(read_checkpoint_state(checkpoint_dir)["step"]))

    def _trim_log(self, last_step: int) -> None:
        """Drop log lines written after `last_step` or at the end of a run; a resumed run writes them again."""
        if not self.log_path.is_file():
            return
        kept_lines = []
        for line in self.log_path.read_text().splitlines():
            if not line.strip():
                continue
            logged_step = json.loads(line).get("logged_step")
            if logged_step is not None and logged_step <= last_step:
                kept_lines.append(line)
        temporary = self.log_path.with_name(f".{self.log_path.name}.{uuid.uuid4().hex}.tmp")
        temporary.write_text("".join(line + "\n" for line in kept_lines))
        os.replace(temporary, self.log_path)

    def on_train_end(self, sae: BaseSAE, run_dir: Path) -> None:
        if self.pending is not None:
            # The run ended inside the event's after window: average the steps it had.
            steps_after = self.total_steps - self.pending["step"]
            fvu_after = self.fvu_since(self.pending["step"], self.total_steps)
            self._write_event({**self.pending, "fvu_after": fvu_after, "fvu_after_steps": steps_after,
                               "feedback": "skipped, the run ended", "logged_step": None})
            self.pending = None
            self.pending_masks = {}

        density = self.sae.encoder_mask.density()
        logger.info("Final encoder density %.4f (target %.4f)", density, self.options.target_density)
        if self.sae.encoder_mask.count() > self.target_count:
            logger.warning(
                "The encoder density %.4f stayed above target_density %.4f: the liveness guard or the "
                "adaptive rate kept more connections than the schedule asked for",
                density, self.options.target_density,
            )
        super().on_train_end(sae, run_dir)


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
