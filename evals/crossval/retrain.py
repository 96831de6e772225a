"""Training of the per-fold SAEs of cross-validation mode ``retrain``.

For fold k, a variant's SAE is trained with the variant's own run config, renamed
``<run>-fold<k>`` and with ``exclude_folds=[k]``, so that none of fold k's tokens reaches
the SAE. A finished fold run is reused while its config hash matches, and an
interrupted one resumes from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig
from trainer.train import RUN_CONFIG_FILE, SAE_DIR, train

logger = logging.getLogger(__name__)


class RetrainError(ValueError):
    """A run config that cannot be turned into per-fold runs, or a fold run from other settings."""


def fold_run_name(run_name: str, fold: int) -> str:
    """Return ``<run>-fold<k>``, the run of ``run_name``'s SAE trained without fold ``fold``."""
    return f"{run_name}-fold{fold}"


def load_run_config(run_dir: Path) -> TrainConfig:
    """Read ``<run_dir>/config.json``, the config ``trainer.train.train`` wrote, into a `TrainConfig`."""
    # Imported here because knowsep.config is only needed to convert the JSON values.
    from knowsep.config import build

    path = run_dir / RUN_CONFIG_FILE
    if not path.is_file():
        raise RetrainError(
            f"mode 'retrain' needs the training config {path}, which is missing; start the run once "
            f"(knowsep train run_name={run_dir.name} with train_corpora excluding the WMDP-bio corpus), "
            "or set run_names / run_suffix to a run that has one"
        )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        return build(TrainConfig, values)
    except ValueError as error:
        # json.JSONDecodeError, knowsep.config.ConfigError and TrainConfigError are all ValueErrors.
        raise RetrainError(f"invalid training config {path}: {error}") from error


def fold_train_config(
    base: TrainConfig, *, run_name: str, fold: int, runs_dir: str, store: str
) -> TrainConfig:
    """Return ``base`` as the run of fold ``fold``: ``<run_name>-fold<k>`` under ``runs_dir``, without fold k."""
    if base.split != "train":
        raise RetrainError(
            f"run {run_name} trains on split {base.split!r}; mode 'retrain' trains on the store's train split, "
            "because the held-out split gives the fold's loss contexts. Set split='train' in its config"
        )
    # Parallel trainings would interleave their progress bars; the train log still records every step.
    return dataclasses.replace(
        base,
        run_name=fold_run_name(run_name, fold),
        runs_dir=runs_dir,
        store=store,
        exclude_folds=[fold],
        progress_bar=False,
    )


def stored_run_config(run_dir: Path) -> TrainConfig | None:
    """Return the config a fold run was started with, or None when it has none yet."""
    if not (run_dir / RUN_CONFIG_FILE).is_file():
        return None
    return load_run_config(run_dir)


def changed_fields(stored: TrainConfig, expected: TrainConfig) -> str:
    """Describe the fields that make two configs hash differently, as ``name: old -> new``."""
    old: dict[str, Any] = json.loads(json.dumps(stored.resume_fields(), default=str))
    new: dict[str, Any] = json.loads(json.dumps(expected.resume_fields(), default=str))
    return "; ".join(
        f"{name}: {old.get(name)!r} -> {new.get(name)!r}"
        for name in sorted(set(old) | set(new))
        if old.get(name) != new.get(name)
    )


def check_fold_run(train_cfg: TrainConfig, overwrite: bool) -> None:
    """Raise when the fold's run directory was started with another config, unless ``overwrite`` retrains it."""
    stored = stored_run_config(train_cfg.run_dir)
    if stored is None or stored.config_hash() == train_cfg.config_hash():
        return
    message = (
        f"fold run {train_cfg.run_dir} was started with config hash {stored.config_hash()}, "
        f"but the fold needs {train_cfg.config_hash()} ({changed_fields(stored, train_cfg)})"
    )
    if overwrite:
        logger.warning("%s; overwrite is set, so it is trained again", message)
        return
    raise RetrainError(f"{message}; pass overwrite=true to train it again, or use another run name")


def train_fold_sae(train_cfg: TrainConfig, overwrite: bool) -> tuple[Path, bool]:
    """Train the fold's SAE unless a finished one with the same config hash exists.

    Returns the SAE directory and whether this call trained it. A run directory with
    another config hash raises `RetrainError`, or with ``overwrite`` is deleted and
    trained again. A run without its final SAE resumes from its latest checkpoint.
    """
    run_dir = train_cfg.run_dir
    sae_dir = run_dir / SAE_DIR
    stored = stored_run_config(run_dir)
    if stored is not None and stored.config_hash() != train_cfg.config_hash():
        check_fold_run(train_cfg, overwrite)
        logger.warning("Deleting fold run %s to train it again with the current config", run_dir)
        shutil.rmtree(run_dir)
    elif stored is not None and sae_dir.is_dir():
        # train() renames the SAE into place only after the final checkpoint, so the
        # directory marks a finished run.
        logger.info(
            "Fold run %s is finished with config hash %s, reused", run_dir, stored.config_hash()
        )
        return sae_dir, False

    resume = run_dir.is_dir() and any(run_dir.iterdir())
    logger.info(
        "%s fold run %s (exclude_folds %s)",
        "Resuming" if resume else "Starting",
        run_dir,
        train_cfg.exclude_folds,
    )
    train(train_cfg, resume=resume)
    return sae_dir, True
