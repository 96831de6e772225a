"""The correlation cache refreshed during training, step timing, and the separation report.

Every variant's hook derives from `SeparationHook`. With `track_separation` on, it
refreshes a `CorrelationCache` every `cache_every` steps on the first
`cache_subsample` tokens of the step's batch: all statistics decay by `cache_decay`
(an exponential moving average over refreshes), then the batch is added to the rows
of latents whose encoder column or bias moved by more than `cache_tolerance`
(relative L2 change) since their own last refresh ("pattern caching"). Rows that did
not move keep their rates, because their sums and token mass decay together.

The refresh uses the latent activations of the step's training forward pass, so its
statistics describe the encoder as it was before that step's update, and the moved
rows are measured on the same weights (in `before_optimizer_step`).

Logged per log window: `cache_ms` (refresh time averaged over all steps), `step_ms`
(wall time between the ends of consecutive steps, hooks and data loading included)
and `cache_fraction = cache_ms / step_ms`. On CUDA the refresh is timed between two
device synchronizations.

Outputs: each checkpoint holds the cache (`cache.zarr`) and the encoder snapshot of
the last refreshes (`cache_state.safetensors`). The final SAE directory holds
`cache.zarr` and `separation.json`, the report on forget-specific latents
(specificity s_i >= tau) and how often they fire on retain tokens.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stores.cache import DOMAINS, CacheError, CorrelationCache, moved_rows, specificity
from trainer.batches import Batch
from trainer.pruning.options import SeparationOptions
from trainer.saes import BaseSAE, HookContext, TrainingHook

logger = logging.getLogger(__name__)

CACHE_DIR = "cache.zarr"
CACHE_STATE_FILE = "cache_state.safetensors"
SEPARATION_FILE = "separation.json"


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CacheTracker:
    """A CorrelationCache with the encoder snapshot that decides which rows to refresh."""

    def __init__(self, options: SeparationOptions, sae: BaseSAE, *, model: str, layer: int, n_folds: int) -> None:
        self.options = options
        device = sae.W_enc_DF.device
        self.cache = CorrelationCache(
            sae.cfg.d_in,
            sae.cfg.d_sae,
            n_folds if options.cache_per_fold else None,
            model=model,
            layer=layer,
            device=device,
        )
        # Encoder columns (rows 0..D-1) and bias (row D) at each latent's last refresh.
        # Zeros make every latent count as moved at the first refresh.
        self.encoder_at_refresh_KF = torch.zeros(sae.cfg.d_in + 1, sae.cfg.d_sae, dtype=torch.float32, device=device)
        self.pending_rows_R: torch.Tensor | None = None

    def is_refresh_step(self, step: int) -> bool:
        """Return whether 0-based `step` refreshes the cache (every cache_every-th step)."""
        return (step + 1) % self.options.cache_every == 0

    @torch.no_grad()
    def select_rows(self, sae: BaseSAE) -> None:
        """Find the latents whose encoder moved since their last refresh and snapshot them."""
        encoder_KF = torch.cat([sae.W_enc_DF.detach(), sae.b_enc_F.detach()[None, :]]).float()
        rows_R = moved_rows(encoder_KF, self.encoder_at_refresh_KF, self.options.cache_tolerance)
        self.encoder_at_refresh_KF[:, rows_R] = encoder_KF[:, rows_R]
        self.pending_rows_R = rows_R

    @torch.no_grad()
    def refresh(self, batch: Batch, f_BF: torch.Tensor) -> int:
        """Decay the cache and add the batch's subsample to the selected rows; return their count."""
        rows_R = self.pending_rows_R
        if rows_R is None:
            raise CacheError("refresh() needs select_rows() first, on the same step")
        self.pending_rows_R = None
        n_tokens = min(self.options.cache_subsample, batch.x_BD.shape[0])
        self.cache.decay(self.options.cache_decay)
        # Updating all rows at once takes the faster path without index_add_.
        rows = None if rows_R.numel() == self.cache.d_sae else rows_R
        self.cache.update(
            batch.x_BD[:n_tokens],
            f_BF[:n_tokens],
            batch.domain_B[:n_tokens],
            batch.fold_B[:n_tokens],
            rows=rows,
        )
        return int(rows_R.numel())

    def save(self, directory: Path) -> None:
        """Write the cache and the encoder snapshot into `directory`."""
        self.cache.save(directory / CACHE_DIR)
        save_file(
            {"encoder_at_refresh_KF": self.encoder_at_refresh_KF.contiguous().cpu()},
            str(directory / CACHE_STATE_FILE),
        )

    def restore(self, directory: Path) -> None:
        """Load what `save` wrote; raise CacheError for a cache of another model, layer or size."""
        cache = CorrelationCache.load(
            directory / CACHE_DIR,
            expected_model=self.cache.model,
            expected_layer=self.cache.layer,
            expected_d_model=self.cache.d_model,
            expected_d_sae=self.cache.d_sae,
            device=self.cache.device,
        )
        if cache.n_folds != self.cache.n_folds:
            raise CacheError(
                f"the correlation cache in {directory} keeps n_folds={cache.n_folds}, this run expects "
                f"{self.cache.n_folds}; resume with the cache_per_fold setting of the original run"
            )
        self.cache = cache
        snapshot = load_file(str(directory / CACHE_STATE_FILE))["encoder_at_refresh_KF"]
        if snapshot.shape != self.encoder_at_refresh_KF.shape:
            raise CacheError(
                f"{directory / CACHE_STATE_FILE} holds an encoder snapshot of shape {tuple(snapshot.shape)}, "
                f"this SAE needs {tuple(self.encoder_at_refresh_KF.shape)}"
            )
        self.encoder_at_refresh_KF = snapshot.to(self.encoder_at_refresh_KF.device)


def separation_report(cache: CorrelationCache, tau: float, epsilon: float) -> dict[str, Any]:
    """Summarize the forget-specific latents (s_i >= tau) of a cache and their retain firing.

    Rates are those of the cache's exponential moving average, so they describe the
    latents late in training, on training-batch subsamples.
    """
    forget = cache.select(["forget"])
    retain = cache.select(["retain"])
    specificity_F = specificity(forget, retain, epsilon)
    specific_F = specificity_F >= tau
    n_specific = int(specific_F.sum())
    fired_F = (forget.c_F + retain.c_F) > 0

    def mean_or_none(values_F: torch.Tensor) -> float | None:
        return float(values_F.mean()) if values_F.numel() else None

    return {
        "tau": tau,
        "epsilon": epsilon,
        "d_sae": cache.d_sae,
        "n_latents_fired": int(fired_F.sum()),
        "n_forget_specific": n_specific,
        "forget_specific_retain_firing_rate_mean": mean_or_none(retain.firing_rate_F[specific_F]),
        "forget_specific_forget_firing_rate_mean": mean_or_none(forget.firing_rate_F[specific_F]),
        "retain_firing_rate_mean": mean_or_none(retain.firing_rate_F),
        "cache_token_mass": {"forget": float(forget.n), "retain": float(retain.n)},
        "cache_updates": cache.n_updates,
        "source": "exponential moving average of training-batch subsamples (cache.zarr beside this file)",
    }


class SeparationHook(TrainingHook):
    """Cache refresh, step timing and the separation report; the base of every variant's hook.

    Subclasses prune in `on_step_end`, which runs after the cache refresh of each step.
    """

    def __init__(self, context: HookContext) -> None:
        self.context = context
        self.options: SeparationOptions = context.options
        self.device = context.sae.W_enc_DF.device
        store_metadata = context.store.metadata
        self.tracker: CacheTracker | None = None
        if self.options.track_separation:
            if tuple(store_metadata.domains) != DOMAINS:
                raise CacheError(
                    f"store {context.store.path} has domains {store_metadata.domains}, the correlation cache "
                    f"needs {list(DOMAINS)}; set variant_options.track_separation = false"
                )
            self.tracker = CacheTracker(
                self.options,
                context.sae,
                model=store_metadata.model,
                layer=store_metadata.layer,
                n_folds=store_metadata.n_folds,
            )
        self.report: dict[str, Any] | None = None
        self._reset_timing()
        self._last_step_end = time.perf_counter()

    def _reset_timing(self) -> None:
        self._steps = 0
        self._cache_seconds = 0.0
        self._step_seconds = 0.0
        self._rows_refreshed = 0
        self._refreshes = 0

    def before_optimizer_step(self, step: int, sae: BaseSAE, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
        if self.tracker is None or not self.tracker.is_refresh_step(step):
            return
        synchronize(self.device)
        start = time.perf_counter()
        self.tracker.select_rows(sae)
        self._cache_seconds += time.perf_counter() - start

    def after_optimizer_step(
        self, step: int, sae: BaseSAE, optimizer: torch.optim.Optimizer, batch: Batch, f_BF: torch.Tensor
    ) -> None:
        if self.tracker is not None and self.tracker.pending_rows_R is not None:
            synchronize(self.device)
            start = time.perf_counter()
            self._rows_refreshed += self.tracker.refresh(batch, f_BF)
            synchronize(self.device)
            self._cache_seconds += time.perf_counter() - start
            self._refreshes += 1

        self.on_step_end(step + 1, sae, optimizer, batch)

        now = time.perf_counter()
        self._step_seconds += now - self._last_step_end
        self._last_step_end = now
        self._steps += 1

    def on_step_end(self, done: int, sae: BaseSAE, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
        """Run after `done` completed steps and the cache refresh (pruning hooks override it)."""

    def metrics(self) -> dict[str, float]:
        steps = max(self._steps, 1)
        step_ms = 1e3 * self._step_seconds / steps
        values = {"step_ms": step_ms}
        if self.tracker is not None:
            cache_ms = 1e3 * self._cache_seconds / steps
            values["cache_ms"] = cache_ms
            values["cache_fraction"] = cache_ms / step_ms if step_ms > 0 else 0.0
            values["cache_rows_per_refresh"] = self._rows_refreshed / max(self._refreshes, 1)
        self._reset_timing()
        return values

    def checkpoint_writers(self) -> list:
        return [] if self.tracker is None else [self.tracker.save]

    def restore(self, checkpoint_dir: Path) -> None:
        if self.tracker is not None:
            self.tracker.restore(Path(checkpoint_dir))

    def on_train_end(self, sae: BaseSAE, run_dir: Path) -> None:
        if self.tracker is None:
            logger.info("track_separation is off: no separation report for run %s", run_dir)
            return
        self.report = {"variant": self.context.cfg.variant, **separation_report(
            self.tracker.cache, self.options.tau, self.options.epsilon
        )}
        retain_rate = self.report["forget_specific_retain_firing_rate_mean"]
        logger.info(
            "Forget-specific latents (s_i >= %.2f): %d of %d; their mean retain firing rate is %s",
            self.options.tau,
            self.report["n_forget_specific"],
            self.report["d_sae"],
            "undefined (none)" if retain_rate is None else f"{retain_rate:.4g}",
        )

    def sae_writers(self) -> list:
        if self.tracker is None:
            return []
        tracker = self.tracker
        report = self.report

        def write_cache(directory: Path) -> None:
            tracker.cache.save(Path(directory) / CACHE_DIR)

        def write_report(directory: Path) -> None:
            (Path(directory) / SEPARATION_FILE).write_text(json.dumps(report, indent=2) + "\n")

        return [write_cache] if report is None else [write_cache, write_report]
