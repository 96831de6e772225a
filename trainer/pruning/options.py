"""Options of the SAE variants, built from `TrainConfig.variant_options`.

Each dataclass's docstring documents its fields; it is the help of `variant_options`.
Step fields count optimizer steps (a step is one batch of `batch_size` tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class PruningConfigError(ValueError):
    """An invalid option of a pruning variant."""


@dataclass
class SeparationOptions:
    """Correlation cache and forget-specific latent report, shared by every variant.

    track_separation: refresh a correlation cache during training, log its cost, and
        write `cache.zarr` and `separation.json` beside the final SAE. The "adaptive"
        variant needs it.
    cache_every: steps between cache refreshes.
    cache_subsample: tokens of the refresh step's batch added to the cache (its first
        rows; batches are already shuffled). At most the batch size is used.
    cache_decay: factor applied to every cache statistic before each refresh, which
        makes the cache an exponential moving average over refreshes.
    cache_tolerance: relative change of a latent's encoder column (and bias) since its
        last refresh above which its row statistics are updated ("pattern caching");
        0 updates every row that changed at all.
    cache_per_fold: keep statistics per fold of the store (memory grows with the fold
        count); false keeps one bucket per domain.
    tau: specificity threshold; latents with s_i >= tau count as forget-specific.
    epsilon: constant added to denominators of the specificity and separation pressure.
    """

    track_separation: bool = True
    cache_every: int = 10
    cache_subsample: int = 512
    cache_decay: float = 0.9
    cache_tolerance: float = 0.05
    cache_per_fold: bool = False
    tau: float = 0.5
    epsilon: float = 1e-8

    def __post_init__(self) -> None:
        if self.cache_every < 1:
            raise PruningConfigError(f"invalid cache_every {self.cache_every}: it must be a positive integer")
        if self.cache_subsample < 1:
            raise PruningConfigError(f"invalid cache_subsample {self.cache_subsample}: it must be a positive integer")
        if not 0.0 < self.cache_decay <= 1.0:
            raise PruningConfigError(f"invalid cache_decay {self.cache_decay}: it must be in (0, 1]")
        if not (math.isfinite(self.cache_tolerance) and self.cache_tolerance >= 0):
            raise PruningConfigError(f"invalid cache_tolerance {self.cache_tolerance}: it must be finite and >= 0")
        if not -1.0 <= self.tau <= 1.0:
            raise PruningConfigError(f"invalid tau {self.tau}: specificity lies in [-1, 1], so use a tau in [-1, 1]")
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise PruningConfigError(f"invalid epsilon {self.epsilon}: it must be finite and > 0")


@dataclass
class FixedOptions(SeparationOptions):
    """Gradual magnitude pruning ("fixed"): the fields of SeparationOptions plus these.

    target_density: fraction of connections kept at the end, in (0, 1].
    start_step: step t0 where pruning starts; unset uses 10% of the run's steps.
    end_step: step t1 where the density reaches target_density; unset uses 70%.
    prune_every: steps between pruning events in [t0, t1] (t1 always has one).
    min_connections: connections every latent keeps, at least 1.
    prune_decoder: also mask and prune the decoder, to the same density.
    fvu_window: steps averaged for the fraction of variance unexplained (FVU) before
        an event and after it. The pruning log records both, and the "adaptive"
        feedback runs fvu_window steps after the event. Unset uses prune_every // 2 (at least
        1). It must be at most prune_every.
    """

    target_density: float = 0.25
    start_step: int | None = None
    end_step: int | None = None
    prune_every: int = 25
    min_connections: int = 8
    prune_decoder: bool = False
    fvu_window: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.target_density) and 0.0 < self.target_density <= 1.0):
            raise PruningConfigError(
                f"invalid target_density {self.target_density}: it must be in (0, 1] "
                "(the fraction of connections kept)"
            )
        if self.prune_every < 1:
            raise PruningConfigError(f"invalid prune_every {self.prune_every}: it must be a positive integer")
        if self.min_connections < 1:
            raise PruningConfigError(f"invalid min_connections {self.min_connections}: it must be at least 1")
        for name, value in (("start_step", self.start_step), ("end_step", self.end_step)):
            if value is not None and value < 0:
                raise PruningConfigError(f"invalid {name} {value}: it must be >= 0")
        if self.fvu_window is not None and not 1 <= self.fvu_window <= self.prune_every:
            raise PruningConfigError(
                f"invalid fvu_window {self.fvu_window}: use 1 <= fvu_window <= prune_every ({self.prune_every}), "
                "so that an event's feedback runs before the next event"
            )

    @property
    def resolved_fvu_window(self) -> int:
        """fvu_window, or prune_every // 2 (at least 1) when unset."""
        return self.fvu_window if self.fvu_window is not None else max(1, self.prune_every // 2)


@dataclass
class AdaptiveOptions(FixedOptions):
    """Adaptive pruning ("adaptive"): the fields of FixedOptions plus these.

    At each event (every prune_every steps in [t0, t1]) the k lowest-scoring live
    encoder connections are pruned, with score S_ij = I_ij (1 - beta q_ij) for
    forget-specific latents (s_i >= tau) and S_ij = I_ij otherwise.

    beta: weight of the separation pressure q_ij, >= 0.
    tolerance: largest rise of the moving-average FVU after an event that keeps the
        pruning rate growing; a larger rise halves k and regrows connections.
    k_init: connections pruned at the first event; unset spreads the connections to
        prune evenly over the events between t0 and t1.
    k_max: largest k; unset uses 4 * k_init.
    regrow_fraction: share of an event's pruned connections regrown, those with the
        largest dense-gradient magnitude, when the FVU rose by more than tolerance.
    """

    beta: float = 0.5
    tolerance: float = 0.01
    k_init: int | None = None
    k_max: int | None = None
    regrow_fraction: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.track_separation:
            raise PruningConfigError(
                "the adaptive variant scores connections from the correlation cache: set track_separation = true"
            )
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise PruningConfigError(f"invalid beta {self.beta}: it must be finite and >= 0")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise PruningConfigError(f"invalid tolerance {self.tolerance}: it must be finite and >= 0")
        if self.k_init is not None and self.k_init < 1:
            raise PruningConfigError(f"invalid k_init {self.k_init}: it must be a positive integer")
        if self.k_max is not None and self.k_max < 1:
            raise PruningConfigError(f"invalid k_max {self.k_max}: it must be a positive integer")
        if self.k_init is not None and self.k_max is not None and self.k_max < self.k_init:
            raise PruningConfigError(f"invalid k_max {self.k_max}: it must be >= k_init ({self.k_init})")
        if not 0.0 <= self.regrow_fraction <= 1.0:
            raise PruningConfigError(f"invalid regrow_fraction {self.regrow_fraction}: it must be in [0, 1]")
