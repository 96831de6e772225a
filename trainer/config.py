"""Configuration of an SAE training run (`knowsep train`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

#: Fields that do not change the trained weights, so a resumed run may change them.
RESUME_INSENSITIVE_FIELDS = frozenset(
    {"runs_dir", "log_every", "checkpoint_every", "keep_checkpoints", "progress_bar"}
)


class TrainConfigError(ValueError):
    """An invalid training config value."""


@dataclass
class TrainConfig:
    """Settings of one SAE training run. Outputs go to <runs_dir>/<run_name>/.

    store: path of the activation store to train on (written by `knowsep harvest`).
    run_name: name of the run directory under runs_dir.
    runs_dir: parent directory of run directories.
    variant: SAE variant to train, a name in the variant registry ("standard" is
        the dense baseline; masked variants register their own names).
    variant_options: options of the variant, a table whose fields the variant's
        options class defines (empty for "standard").
    d_sae: number of SAE latents.
    activation: "relu" (trained with an L1 penalty) or "topk".
    k: latents kept per token when activation is "topk".
    l1_coefficient: weight lambda of the penalty `sum_i f_i ||d_i||` ("relu" only).
        Activations are normalized so that E||x||^2 = d_model and the squared error
        is summed over d_model, as in SAELens.
    l1_warmup_steps: steps over which the L1 weight rises linearly from
        l1_coefficient / l1_warmup_steps to l1_coefficient; 0 disables the warm-up.
    b_dec_init: initial decoder bias: "mean" or "geometric_median" of the first
        batch, or "zeros".
    lr: peak Adam learning rate.
    lr_warmup_steps: steps of linear learning-rate warm-up from lr / lr_warmup_steps to lr.
    lr_decay_steps: the last lr_decay_steps steps decay the learning rate linearly
        towards 0 (the last step uses lr / lr_decay_steps); 0 keeps it constant.
    adam_beta1: Adam's first-moment decay.
    adam_beta2: Adam's second-moment decay.
    batch_size: tokens per training step.
    total_tokens: training tokens; the run takes total_tokens // batch_size steps and
        passes over the data as many times as needed.
    seed: seed of the weight initialization and of the data order.
    shuffle_buffer_shards: shards loaded and shuffled together; memory grows with it.
    checkpoint_every: steps between checkpoints (a final one is always written);
        0 writes only the final checkpoint.
    keep_checkpoints: number of most recent checkpoints kept on disk (at least 1).
    log_every: steps between log lines in train_log.jsonl and the console.
    dead_window: tokens without firing after which a latent counts as dead.
    device: torch device ("cpu", "cuda", "cuda:0", ...).
    dtype: dtype of the SAE parameters and batches ("float32" or "bfloat16").
    train_corpora: names of the store's corpora to train on; empty or unset uses all.
    domains: domains to train on ("forget", "retain"); empty or unset uses both.
    exclude_folds: folds left out of training, for cross-validation with one SAE per
        fold (mode "retrain"); empty or unset trains on every fold.
    split: store split to train on: "train" or "heldout".
    progress_bar: show a tqdm progress bar on the console.
    """

    store: str
    run_name: str = "standard"
    runs_dir: str = "runs"
    variant: str = "standard"
    variant_options: dict[str, Any] = field(default_factory=dict)
    d_sae: int = 4096
    activation: Literal["relu", "topk"] = "relu"
    k: int = 32
    l1_coefficient: float = 5.0
    l1_warmup_steps: int = 1000
    b_dec_init: Literal["mean", "geometric_median", "zeros"] = "mean"
    lr: float = 4e-4
    lr_warmup_steps: int = 500
    lr_decay_steps: int = 1000
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    batch_size: int = 4096
    total_tokens: int = 20_000_000
    seed: int = 0
    shuffle_buffer_shards: int = 4
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 100
    dead_window: int = 5_000_000
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16"] = "float32"
    train_corpora: list[str] | None = None
    domains: list[str] | None = None
    exclude_folds: list[int] | None = None
    split: Literal["train", "heldout"] = "train"
    progress_bar: bool = True

    def __post_init__(self) -> None:
        positive = {
            "d_sae": self.d_sae,
            "k": self.k,
            "batch_size": self.batch_size,
            "total_tokens": self.total_tokens,
            "shuffle_buffer_shards": self.shuffle_buffer_shards,
            "keep_checkpoints": self.keep_checkpoints,
            "log_every": self.log_every,
            "dead_window": self.dead_window,
        }
        for name, value in positive.items():
            if value < 1:
                raise TrainConfigError(f"invalid {name} {value}: it must be a positive integer")
        non_negative = {
            "l1_warmup_steps": self.l1_warmup_steps,
            "lr_warmup_steps": self.lr_warmup_steps,
            "lr_decay_steps": self.lr_decay_steps,
            "checkpoint_every": self.checkpoint_every,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise TrainConfigError(f"invalid {name} {value}: it must be >= 0")
        if self.seed < 0:
            raise TrainConfigError(f"invalid seed {self.seed}: it must be a non-negative integer")
        if self.total_tokens < self.batch_size:
            raise TrainConfigError(
                f"total_tokens {self.total_tokens} is smaller than batch_size {self.batch_size}, "
                "which makes 0 training steps; raise total_tokens or lower batch_size"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise TrainConfigError(f"invalid lr {self.lr}: it must be finite and > 0")
        if not (math.isfinite(self.l1_coefficient) and self.l1_coefficient >= 0):
            raise TrainConfigError(
                f"invalid l1_coefficient {self.l1_coefficient}: it must be finite and >= 0"
            )
        for name, beta in (("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)):
            if not 0 <= beta < 1:
                raise TrainConfigError(f"invalid {name} {beta}: it must be in [0, 1)")
        if self.activation == "topk" and self.k > self.d_sae:
            raise TrainConfigError(
                f"invalid k {self.k}: a TopK SAE needs k <= d_sae ({self.d_sae})"
            )
        _check_device(self.device)
        if not self.run_name or Path(self.run_name).name != self.run_name:
            raise TrainConfigError(
                f"invalid run_name {self.run_name!r}: use a plain directory name without '/'"
            )

    @property
    def total_steps(self) -> int:
        """Number of optimizer steps, `total_tokens // batch_size`."""
        return self.total_tokens // self.batch_size

    @property
    def run_dir(self) -> Path:
        """Directory of this run's outputs, `<runs_dir>/<run_name>`."""
        return Path(self.runs_dir) / self.run_name

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-serializable dict."""
        return dataclasses.asdict(self)

    def resume_fields(self) -> dict[str, Any]:
        """Return the fields that must match for a run to resume from a checkpoint."""
        return {
            name: value
            for name, value in self.to_dict().items()
            if name not in RESUME_INSENSITIVE_FIELDS
        }

    def config_hash(self) -> str:
        """Return a SHA-256 prefix of `resume_fields`, stored in every checkpoint."""
        encoded = json.dumps(self.resume_fields(), sort_keys=True, default=str).encode()
        return hashlib.sha256(encoded).hexdigest()[:16]


def _check_device(device: str) -> None:
    """Raise TrainConfigError for a device this machine lacks, or for ``auto``."""
    from pipeline.models import ModelError, resolve_device

    # NOTE: the device is part of a run's resume identity, so training names it.
    try:
        resolve_device(device, allow_auto=False)
    except ModelError as error:
        raise TrainConfigError(str(error)) from error


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Return the learning rate at 0-based `step`: linear warm-up, constant, linear decay.

    Warm-up gives `lr * (step + 1) / lr_warmup_steps`; in the last `lr_decay_steps`
    steps the rate is `lr * (total_steps - step) / lr_decay_steps`. Where the two
    ranges overlap (a short run), the smaller factor applies.
    """
    factor = 1.0
    if cfg.lr_warmup_steps > 0:
        factor = min(factor, (step + 1) / cfg.lr_warmup_steps)
    if cfg.lr_decay_steps > 0:
        factor = min(factor, (cfg.total_steps - step) / cfg.lr_decay_steps)
    return cfg.lr * max(factor, 0.0)
