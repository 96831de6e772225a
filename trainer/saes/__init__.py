"""SAE architectures and the registry of trainable variants.

An architecture is an `nn.Module` class saved and loaded by name (`load_sae`). A
variant is what `TrainConfig.variant` selects: an SAE class, an options dataclass
built from `TrainConfig.variant_options`, how to build the SAE config, and an optional
`TrainingHook` that the training loop calls every step (masked variants prune there).

A module in this package registers its architectures and variants when imported
(`register_sae`, `register_variant`). `get_variant` and `load_sae` import every
module of the package first, so a new file such as `masked.py` needs no other edit.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainer.pruning.options import SeparationOptions
from trainer.saes.base import (
    SAE_CONFIG_FILE,
    SAE_WEIGHTS_FILE,
    BaseSAE,
    BaseSAEConfig,
    SAEConfigError,
    SAELoss,
    read_sae_config,
)
from trainer.saes.standard import StandardSAE, StandardSAEConfig

if TYPE_CHECKING:
    from stores.activations import ActivationStore
    from trainer.batches import Batch
    from trainer.config import TrainConfig

__all__ = [
    "SAE_CONFIG_FILE",
    "SAE_WEIGHTS_FILE",
    "BaseSAE",
    "BaseSAEConfig",
    "HookContext",
    "SAEConfigError",
    "SAELoss",
    "StandardSAE",
    "StandardSAEConfig",
    "TrainingHook",
    "Variant",
    "get_variant",
    "load_sae",
    "register_sae",
    "register_variant",
]

SAE_CLASSES: dict[str, type[BaseSAE]] = {}
VARIANTS: dict[str, Variant] = {}


class TrainingHook:
    """Callbacks of a variant into the training loop. Every method defaults to a no-op.

    The loop calls, for each step: forward, `record_reconstruction`, backward, removal
    of the decoder-gradient component parallel to the decoder rows,
    `before_optimizer_step`, `optimizer.step()`, decoder renormalization,
    `after_optimizer_step`. Hooks may edit parameters, gradients and the optimizer's
    state in place.
    """

    def record_reconstruction(self, step: int, x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> None:
        """Receive the step's inputs and their reconstructions, detached (e.g. to track the FVU)."""

    def before_optimizer_step(
        self, step: int, sae: BaseSAE, optimizer: torch.optim.Optimizer, batch: Batch
    ) -> None:
        """Run after the backward pass, before `optimizer.step()` (e.g. mask gradients)."""

    def after_optimizer_step(
        self, step: int, sae: BaseSAE, optimizer: torch.optim.Optimizer, batch: Batch, f_BF: torch.Tensor
    ) -> None:
        """Run after the step and the decoder renormalization (e.g. prune, re-apply masks)."""

    def metrics(self) -> dict[str, float]:
        """Return extra scalars for the training log (e.g. mask density), read at log steps."""
        return {}

    def checkpoint_writers(self) -> list[Callable[[Path], None]]:
        """Return functions that write this hook's state (Zarr arrays, JSON) into a checkpoint directory."""
        return []

    def sae_writers(self) -> list[Callable[[Path], None]]:
        """Return functions that write files beside the final SAE, called with its directory."""
        return []

    def restore(self, checkpoint_dir: Path) -> None:
        """Load the state that `checkpoint_writers` wrote into `checkpoint_dir`."""

    def on_train_end(self, sae: BaseSAE, run_dir: Path) -> None:
        """Run once after the last step, before the final SAE is saved."""


@dataclass
class HookContext:
    """What a variant's hook factory receives when a run starts.

    cfg: the run's TrainConfig.
    options: the variant's options object, built from cfg.variant_options.
    sae: the SAE being trained (already initialized or restored).
    store: the activation store the run reads.
    rng: a NumPy generator seeded from cfg.seed. Every checkpoint saves its state, so
        a hook that samples from it draws the same numbers after a resume.
    run_dir: the run's output directory.
    """

    cfg: TrainConfig
    options: Any
    sae: BaseSAE
    store: ActivationStore
    rng: np.random.Generator
    run_dir: Path


@dataclass
class NoOptions:
    """A variant without options."""


def build_standard_sae_config(cfg: TrainConfig, options: Any, d_in: int, metadata: dict[str, Any]) -> StandardSAEConfig:
    """Build a StandardSAEConfig from the run config and the store's width and provenance."""
    return StandardSAEConfig(
        d_in=d_in,
        d_sae=cfg.d_sae,
        dtype=cfg.dtype,
        device=cfg.device,
        norm_scale=metadata.get("norm_scale"),
        metadata=metadata,
        activation=cfg.activation,
        k=cfg.k,
        l1_coefficient=cfg.l1_coefficient,
        l1_warmup_steps=cfg.l1_warmup_steps,
        b_dec_init=cfg.b_dec_init,
    )


@dataclass(frozen=True)
class Variant:
    """A trainable SAE variant.

    name: the value of TrainConfig.variant that selects it.
    sae_class: the SAE module class, which implements `initialize` and `training_loss`.
    options_class: dataclass built from TrainConfig.variant_options.
    build_sae_config: `(cfg, options, d_in, metadata) -> SAE config`.
    make_hook: `(HookContext) -> TrainingHook`, or None for no per-step work.
    """

    name: str
    sae_class: type[BaseSAE]
    options_class: type = NoOptions
    build_sae_config: Callable[[TrainConfig, Any, int, dict[str, Any]], BaseSAEConfig] = build_standard_sae_config
    make_hook: Callable[[HookContext], TrainingHook] | None = None

    def build_options(self, values: dict[str, Any]) -> Any:
        """Build the options dataclass from `TrainConfig.variant_options`, converting TOML values."""
        from knowsep.config import build

        if not dataclasses.is_dataclass(self.options_class):
            raise SAEConfigError(f"variant {self.name!r}: options_class must be a dataclass")
        return build(self.options_class, dict(values), prefix="variant_options.")


def register_sae(sae_class: type[BaseSAE]) -> type[BaseSAE]:
    """Register an SAE class under its `architecture` name for `load_sae`."""
    if not sae_class.architecture:
        raise SAEConfigError(f"{sae_class.__name__} has no architecture name")
    existing = SAE_CLASSES.get(sae_class.architecture)
    if existing is not None and existing is not sae_class:
        raise SAEConfigError(
            f"architecture {sae_class.architecture!r} is already registered by {existing.__name__}"
        )
    SAE_CLASSES[sae_class.architecture] = sae_class
    return sae_class


def register_variant(variant: Variant) -> Variant:
    """Register a trainable variant under `variant.name`, and its SAE class."""
    existing = VARIANTS.get(variant.name)
    if existing is not None and existing != variant:
        raise SAEConfigError(f"variant {variant.name!r} is already registered")
    register_sae(variant.sae_class)
    VARIANTS[variant.name] = variant
    return variant


def _import_package_modules() -> None:
    """Import every module of this package, so that each registers its classes."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def get_variant(name: str) -> Variant:
    """Return the registered variant `name`, with an error listing the known ones."""
    if name not in VARIANTS:
        _import_package_modules()
    if name not in VARIANTS:
        raise SAEConfigError(f"unknown variant {name!r}; registered variants: {', '.join(sorted(VARIANTS))}")
    return VARIANTS[name]


def load_sae(directory: str | Path, *, device: str | None = None) -> BaseSAE:
    """Load any registered SAE architecture saved with `BaseSAE.save`."""
    architecture = read_sae_config(directory)["architecture"]
    if architecture not in SAE_CLASSES:
        _import_package_modules()
    if architecture not in SAE_CLASSES:
        raise SAEConfigError(
            f"{directory} contains an SAE of unknown architecture {architecture!r}; "
            f"known architectures: {', '.join(sorted(SAE_CLASSES))}"
        )
    return SAE_CLASSES[architecture].load(directory, device=device)


def make_separation_hook(context: HookContext) -> TrainingHook:
    """Build the hook of the "standard" variant: the correlation cache and its report."""
    from trainer.pruning.tracking import SeparationHook

    return SeparationHook(context)


register_variant(
    Variant(name="standard", sae_class=StandardSAE, options_class=SeparationOptions, make_hook=make_separation_hook)
)
