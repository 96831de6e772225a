"""Config of the separation bounds eval."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal


class BoundsConfigError(ValueError):
    """An invalid separation bounds eval config value."""


@dataclass
class BoundsEvalConfig:
    """Separation bounds eval: check the clamp's theoretical bounds against held-out tokens.

    Attributes:
        sae_path: Directory of a saved SAE (``sae_config.json`` and ``sae.safetensors``),
            e.g. ``runs/<run>/sae``.
        store: Activation store the SAE was trained on. None reads it from the SAE's
            metadata (key ``store``).
        retain_threshold: Latents firing on at least this fraction of retain train tokens
            are never clamped, as in the unlearning eval.
        n_features: Number of latents to clamp, taken by forget firing rate among those
            below ``retain_threshold``.
        multipliers: Values ``c``: firing clamped latents are set to ``-c``. The per-token
            and expected damage bounds are checked for each.
        stats_source: Source of the train-split statistics: firing rates, mean
            activations, and the retain mean and covariance of the input. ``store``
            counts them exactly by streaming the store's train split through the final
            SAE. ``cache`` reads the correlation cache written during training, an
            exponential moving average taken while the encoder still moved.
        cache_path: Correlation cache read when ``stats_source`` is ``cache``. None uses
            ``<sae_path>/cache.zarr``.
        max_train_tokens: Train-split tokens streamed when ``stats_source`` is ``store``,
            sampled uniformly; None streams all of them.
        max_heldout_tokens: Held-out tokens (split 1) on which the bounds are checked,
            sampled uniformly; None checks every one.
        relative_tolerance: A per-token check fails only when the measured norm exceeds
            the bound by more than this fraction of the bound, which absorbs float32
            rounding of the SAE and its decoder norms.
        all_latent_details: Write one ``eval_result_details`` entry per latent of the SAE
            instead of one per clamped latent. The firing bound is checked on every
            latent either way.
        batch_size: Tokens per SAE forward pass.
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        random_seed: Seed of the sampling of train and held-out tokens.
        output: Path of the result JSON. None writes
            ``<run>/evals/separation_bounds.json``, where ``<run>`` is the parent
            directory of ``sae_path``.
    """

    sae_path: str
    store: str | None = None
    retain_threshold: float = 0.01
    n_features: int = 10
    multipliers: list[float] = field(default_factory=lambda: [25.0, 100.0])
    stats_source: Literal["store", "cache"] = "store"
    cache_path: str | None = None
    max_train_tokens: int | None = None
    max_heldout_tokens: int | None = None
    relative_tolerance: float = 1e-4
    all_latent_details: bool = False
    batch_size: int = 4096
    device: str = "auto"
    random_seed: int = 42
    output: str | None = None

    def __post_init__(self) -> None:
        _check_integer("n_features", self.n_features, minimum=1)
        _check_integer("batch_size", self.batch_size, minimum=1)
        for name in ("max_train_tokens", "max_heldout_tokens"):
            if getattr(self, name) is not None:
                _check_integer(name, getattr(self, name), minimum=1)

        if not (0.0 < self.retain_threshold <= 1.0):
            raise BoundsConfigError(
                f"invalid retain_threshold {self.retain_threshold}: it must be in (0, 1]"
            )
        if not self.multipliers:
            raise BoundsConfigError("multipliers is empty: give at least one value, e.g. [25, 100]")
        for multiplier in self.multipliers:
            if not (math.isfinite(multiplier) and multiplier >= 0):
                raise BoundsConfigError(
                    f"invalid multiplier {multiplier}: it must be finite and >= 0, because the "
                    "bounds assume firing latents are clamped to -multiplier <= 0"
                )
        if len(set(self.multipliers)) != len(self.multipliers):
            raise BoundsConfigError(
                f"multipliers {self.multipliers} contain duplicates: give each value once"
            )
        if self.stats_source not in ("store", "cache"):
            raise BoundsConfigError(
                f"invalid stats_source {self.stats_source!r}: choose 'store' or 'cache'"
            )
        if not (math.isfinite(self.relative_tolerance) and 0.0 <= self.relative_tolerance < 1.0):
            raise BoundsConfigError(
                f"invalid relative_tolerance {self.relative_tolerance}: it must be in [0, 1)"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-serializable dict."""
        return dataclasses.asdict(self)


def _check_integer(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BoundsConfigError(f"invalid {name} {value!r}: it must be an integer >= {minimum}")
