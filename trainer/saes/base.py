"""Shared parts of every SAE architecture: parameters, the unit-norm decoder
constraint, folding of the store's input normalization, and safetensors + JSON I/O.

Shapes: `D` is d_in (the model's d_model), `F` is d_sae (latents), `B` is batch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

SAE_WEIGHTS_FILE = "sae.safetensors"
SAE_CONFIG_FILE = "sae_config.json"

#: Smallest decoder row norm used as a divisor, so that a zero row cannot produce NaN.
DECODER_NORM_EPS = 1e-8

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

SAEType = TypeVar("SAEType", bound="BaseSAE")


class SAEConfigError(ValueError):
    """An invalid SAE config, or a saved SAE that does not match its config."""


def torch_dtype(name: str) -> torch.dtype:
    """Map a dtype name ("float32", "bfloat16", ...) to the torch dtype."""
    if name not in DTYPES:
        raise SAEConfigError(f"invalid dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class BaseSAEConfig:
    """Fields shared by every SAE architecture.

    d_in: input width, the d_model of the store the SAE is trained on.
    d_sae: number of latents.
    dtype: parameter dtype ("float32", "float64", "bfloat16" or "float16").
    device: torch device of the parameters ("cpu", "cuda", "cuda:1", ...).
    activation_space: "normalized" when the SAE takes `norm_scale * x` (how it is
        trained), "raw" after `fold_normalization` when it takes the model's `x`.
    norm_scale: the store's scalar with `E||norm_scale * x||^2 = d_in` on train tokens,
        or None when unknown. In "raw" space it is already folded into the weights.
    metadata: provenance copied from the activation store (model, layer, d_model,
        store path and config hash) and the training run. Informational only.
    """

    d_in: int
    d_sae: int
    dtype: str = "float32"
    device: str = "cpu"
    activation_space: Literal["normalized", "raw"] = "normalized"
    norm_scale: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_in < 1:
            raise SAEConfigError(f"invalid d_in {self.d_in}: it must be a positive integer")
        if self.d_sae < 1:
            raise SAEConfigError(f"invalid d_sae {self.d_sae}: it must be a positive integer")
        torch_dtype(self.dtype)
        if self.activation_space not in ("normalized", "raw"):
            raise SAEConfigError(
                f"invalid activation_space {self.activation_space!r}: use 'normalized' or 'raw'"
            )
        if self.norm_scale is not None and not (math.isfinite(self.norm_scale) and self.norm_scale > 0):
            raise SAEConfigError(f"invalid norm_scale {self.norm_scale}: it must be finite and > 0")

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-serializable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BaseSAEConfig:
        """Build the config from `to_dict` output, rejecting unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise SAEConfigError(
                f"unknown field(s) {', '.join(unknown)} for {cls.__name__}; valid fields: {', '.join(sorted(names))}"
            )
        return cls(**values)


@dataclass
class SAELoss:
    """The training loss of one batch and its parts, all scalar tensors.

    loss: the optimized objective.
    mse_loss: squared reconstruction error summed over D, averaged over tokens.
    sparsity_loss: `mean_b sum_i f_bi ||d_i||`, before the L1 weight is applied.
    """

    loss: torch.Tensor
    mse_loss: torch.Tensor
    sparsity_loss: torch.Tensor


class BaseSAE(nn.Module):
    """A sparse autoencoder `x_hat = W_dec f(x) + b_dec` with unit-norm decoder rows.

    Subclasses set `architecture` and `config_class` and implement `encode`, and
    trainable ones also `initialize` and `training_loss`. The encoder subtracts
    `b_dec` from its input first, as in SAELens and Anthropic's SAEs:
    `f(x) = sigma((x - b_dec) W_enc + b_enc)`.
    """

    architecture: ClassVar[str] = ""
    config_class: ClassVar[type[BaseSAEConfig]] = BaseSAEConfig

    def __init__(self, cfg: BaseSAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = torch_dtype(cfg.dtype)
        device = torch.device(cfg.device)
        self.W_enc_DF = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dtype, device=device))
        self.b_enc_F = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
        self.W_dec_FD = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, dtype=dtype, device=device))
        self.b_dec_D = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype, device=device))

    # Forward pass.

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Return the latent activations `f_BF` of the inputs `x_BD`."""
        raise NotImplementedError(f"{type(self).__name__} must implement encode")

    def initialize(self, sample_ND: torch.Tensor | None = None, generator: torch.Generator | None = None) -> None:
        """Draw the initial weights, using `sample_ND` (normalized activations) for `b_dec`."""
        raise NotImplementedError(f"{type(self).__name__} must implement initialize to be trained")

    def training_loss(
        self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor, f_BF: torch.Tensor, l1_coefficient: float
    ) -> SAELoss:
        """Return the loss of one batch given its forward pass and the current L1 weight."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_loss to be trained")

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        """Return the reconstruction `x_hat_BD` of the latent activations `f_BF`."""
        return f_BF @ self.W_dec_FD + self.b_dec_D

    def forward(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(x_hat_BD, f_BF)`."""
        f_BF = self.encode(x_BD)
        return self.decode(f_BF), f_BF

    # Decoder-norm constraint.

    def _check_trainable_space(self) -> None:
        if self.cfg.activation_space != "normalized":
            raise SAEConfigError(
                "this SAE takes raw activations (its normalization is folded in, so its decoder rows "
                "have norm 1 / norm_scale); train the normalized SAE instead"
            )

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale every decoder row `W_dec_FD[i]` to unit L2 norm."""
        self._check_trainable_space()
        norms_F1 = self.W_dec_FD.norm(dim=1, keepdim=True).clamp_min(DECODER_NORM_EPS)
        self.W_dec_FD.div_(norms_F1)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Remove from `W_dec_FD.grad` its component along each decoder row.

        With unit-norm rows renormalized after each step, that component only changes
        the row norm, which the renormalization undoes, yet it still moves Adam's
        moments. SAELens and Anthropic's SAEs project it out before the step.
        """
        self._check_trainable_space()
        grad_FD = self.W_dec_FD.grad
        if grad_FD is None:
            return
        directions_FD = self.W_dec_FD / self.W_dec_FD.norm(dim=1, keepdim=True).clamp_min(DECODER_NORM_EPS)
        parallel_F1 = (grad_FD * directions_FD).sum(dim=1, keepdim=True)
        grad_FD.sub_(parallel_F1 * directions_FD)

    # Normalization folding.

    def fold_normalization(self: SAEType, norm_scale: float | None = None) -> SAEType:
        """Return a copy that takes raw activations `x` in place of `norm_scale * x`.

        The copy gives `folded(x) == self(norm_scale * x) / norm_scale` with the same
        latent activations `f`, as SAELens' `fold_activation_norm_scaling_factor` does:
        `W_enc *= s`, `W_dec /= s`, `b_dec /= s`. The copy's decoder rows then have norm
        `1 / s`, so it is for inference and export, not for further training.
        `norm_scale` defaults to the config's; passing a different one is an error.
        """
        if self.cfg.activation_space != "normalized":
            raise SAEConfigError("this SAE already takes raw activations: its normalization is folded in")
        scale = norm_scale if norm_scale is not None else self.cfg.norm_scale
        if scale is None:
            raise SAEConfigError(
                "norm_scale is unknown: pass it (the store's metadata norm_scale) to fold_normalization"
            )
        if not (math.isfinite(scale) and scale > 0):
            raise SAEConfigError(f"invalid norm_scale {scale}: it must be finite and > 0")
        if self.cfg.norm_scale is not None and not math.isclose(scale, self.cfg.norm_scale, rel_tol=1e-6):
            raise SAEConfigError(
                f"norm_scale {scale} differs from the SAE's training norm_scale {self.cfg.norm_scale}; "
                "fold with the scale the SAE was trained with"
            )

        folded = copy.deepcopy(self)
        folded.cfg = dataclasses.replace(self.cfg, activation_space="raw", norm_scale=float(scale))
        with torch.no_grad():
            folded.W_enc_DF.mul_(scale)
            folded.W_dec_FD.div_(scale)
            folded.b_dec_D.div_(scale)
        return folded

    # Save and load.

    def save(self, directory: str | Path) -> Path:
        """Write `sae.safetensors` (parameters and buffers) and `sae_config.json`.

        Each file is written to a temporary name and renamed, so a reader never sees a
        half-written file. Returns the directory.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        weights_tmp = directory / f".tmp-{uuid.uuid4().hex}-{SAE_WEIGHTS_FILE}"
        save_file(tensors, str(weights_tmp), metadata={"architecture": self.architecture})
        os.replace(weights_tmp, directory / SAE_WEIGHTS_FILE)

        config = {"architecture": self.architecture, **self.cfg.to_dict()}
        config_tmp = directory / f".tmp-{uuid.uuid4().hex}-{SAE_CONFIG_FILE}"
        config_tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(config_tmp, directory / SAE_CONFIG_FILE)
        return directory

    @classmethod
    def load(cls: type[SAEType], directory: str | Path, *, device: str | None = None) -> SAEType:
        """Load an SAE of this architecture saved by `save`, optionally onto `device`."""
        directory = Path(directory)
        config = read_sae_config(directory)
        architecture = config.pop("architecture")
        if architecture != cls.architecture:
            raise SAEConfigError(
                f"{directory} contains a {architecture!r} SAE, not {cls.architecture!r}; "
                "load it with trainer.saes.load_sae"
            )
        if device is not None:
            config["device"] = device
        cfg = cls.config_class.from_dict(config)
        sae = cls(cfg)

        try:
            tensors = load_file(str(directory / SAE_WEIGHTS_FILE), device=cfg.device)
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:
            raise SAEConfigError(
                f"{directory / SAE_WEIGHTS_FILE} is damaged or unreadable ({error}); "
                "restore it from the run's latest checkpoint or train the SAE again"
            ) from error
        expected = sae.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise SAEConfigError(
                f"{directory / SAE_WEIGHTS_FILE} does not match its config: "
                f"missing {missing or 'none'}, unexpected {unexpected or 'none'}"
            )
        for name, tensor in sorted(tensors.items()):
            if tensor.shape != expected[name].shape:
                raise SAEConfigError(
                    f"{directory / SAE_WEIGHTS_FILE}: {name} has shape {tuple(tensor.shape)}, "
                    f"the config expects {tuple(expected[name].shape)}"
                )
        sae.load_state_dict(tensors)
        return sae


def read_sae_config(directory: str | Path) -> dict[str, Any]:
    """Read `sae_config.json` of a saved SAE, checking that its weights file exists."""
    directory = Path(directory)
    config_path = directory / SAE_CONFIG_FILE
    weights_path = directory / SAE_WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"no saved SAE in {directory}: expected {SAE_CONFIG_FILE} and {SAE_WEIGHTS_FILE} "
            "(written by BaseSAE.save)"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise SAEConfigError(
            f"invalid JSON in {config_path}: {error}; restore it from the run's checkpoint or train the SAE again"
        ) from error
    if "architecture" not in config:
        raise SAEConfigError(f"{config_path} has no 'architecture' field")
    return config
