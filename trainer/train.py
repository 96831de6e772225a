"""The SAE training loop: `train(cfg, resume=False) -> run directory`.

Outputs under `<runs_dir>/<run_name>/`:

    config.json        the TrainConfig of the run
    train_log.jsonl    one JSON line every log_every steps (metrics below)
    checkpoints/       resumable checkpoints (trainer/checkpoint.py)
    sae/               the final SAE, in the store's normalized space, with the store's
                       model, layer, d_model, norm_scale and the variant name in its
                       config metadata, and the files of the variant's hook
                       (masks, cache.zarr, separation.json; see trainer/pruning)

Logged metrics are means over the steps since the previous log line:
    loss              the optimized objective
    mse_loss          squared error summed over d_model, averaged over tokens (the loss term)
    mse               squared error averaged over tokens and dimensions (SAEBench's core
                      `mse`, independent of batch size); mse = mse_loss / d_model
    explained_variance  1 - sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2, per batch
    l0                active latents per token
    l1                sum of latent activations per token (decoder norms are 1)
Point values at the log step: lr, l1_coefficient, dead_fraction (share of latents that
did not fire in the last dead_window tokens; 0 until dead_window tokens have been seen).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from stores.activations import ActivationStore
from trainer.batches import Batch, BatchStream
from trainer.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
)
from trainer.config import TrainConfig, lr_at
from trainer.saes import BaseSAE, HookContext, TrainingHook, get_variant
from trainer.saes.base import torch_dtype
from trainer.saes.standard import l1_coefficient_at

logger = logging.getLogger(__name__)

TRAIN_LOG_FILE = "train_log.jsonl"
RUN_CONFIG_FILE = "config.json"
SAE_DIR = "sae"


class TrainError(ValueError):
    """A training run that cannot start, resume or continue."""


def store_provenance(store: ActivationStore) -> dict[str, Any]:
    """Return the store facts that a trained SAE carries in its config metadata."""
    metadata = store.metadata
    return {
        "model": metadata.model,
        "layer": metadata.layer,
        "d_model": metadata.d_model,
        "norm_scale": metadata.norm_scale,
        "store": str(store.path),
        "store_config_hash": metadata.config_hash,
        "context_size": metadata.context_size,
    }


class _MetricWindow:
    """Sums of per-step metrics since the last log line, kept on the device to avoid syncs."""

    NAMES = ("loss", "mse_loss", "mse", "explained_variance", "l0", "l1")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.NAMES), dtype=torch.float64, device=self.device)
        self.steps = 0

    @torch.no_grad()
    def add(self, loss: torch.Tensor, mse_loss: torch.Tensor, x_BD: torch.Tensor, x_hat_BD: torch.Tensor, f_BF: torch.Tensor) -> None:
        x_BD = x_BD.float()
        error_BD = (x_hat_BD.float() - x_BD).pow(2)
        centered_BD = (x_BD - x_BD.mean(dim=0, keepdim=True)).pow(2)
        values = torch.stack(
            [
                loss.detach().double(),
                mse_loss.detach().double(),
                error_BD.mean().double(),
                (1.0 - error_BD.sum() / centered_BD.sum().clamp_min(1e-12)).double(),
                (f_BF > 0).sum(dim=-1).double().mean(),
                f_BF.float().sum(dim=-1).double().mean(),
            ]
        )
        self.sums += values
        self.steps += 1

    def means(self) -> dict[str, float]:
        values = (self.sums / max(self.steps, 1)).tolist()
        return dict(zip(self.NAMES, values, strict=True))


def _check_config_hash(cfg: TrainConfig, state: dict[str, Any], checkpoint_dir: Path) -> None:
    """Raise TrainError when the checkpoint was written under a different config."""
    saved_hash = state.get("config_hash")
    if saved_hash == cfg.config_hash():
        return
    saved = state.get("config", {})
    current = json.loads(json.dumps(cfg.resume_fields(), default=str))
    changed = [
        f"{name}: {saved.get(name)!r} -> {current.get(name)!r}"
        for name in sorted(set(saved) | set(current))
        if saved.get(name) != current.get(name)
    ]
    details = "; ".join(changed) if changed else f"hash {saved_hash} -> {cfg.config_hash()}"
    raise TrainError(
        f"cannot resume from {checkpoint_dir}: the config changed ({details}). "
        "Restore the original settings, or start a new run with another run_name"
    )


def _check_store_hash(store: ActivationStore, state: dict[str, Any], checkpoint_dir: Path) -> None:
    """Raise TrainError when the store at the run's path was harvested again with other settings."""
    saved_hash = state.get("store_config_hash")
    if saved_hash is not None and saved_hash != store.metadata.config_hash:
        raise TrainError(
            f"cannot resume from {checkpoint_dir}: it was trained on a store with config hash {saved_hash}, "
            f"but {store.path} now has config hash {store.metadata.config_hash}. "
            "Resume on the original store, or start a new run with another run_name"
        )


def _trim_log(log_path: Path, last_step: int) -> None:
    """Drop log lines after `last_step`, which a resumed run writes again."""
    if not log_path.is_file():
        return
    kept_lines = [
        line for line in log_path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step
    ]
    temporary = log_path.with_name(f".{log_path.name}.{uuid.uuid4().hex}.tmp")
    temporary.write_text("".join(line + "\n" for line in kept_lines))
    os.replace(temporary, log_path)


def _save_final_sae(sae: BaseSAE, run_dir: Path, extra_writers: Sequence[Callable[[Path], None]] = ()) -> Path:
    """Save the SAE to `<run_dir>/sae` through a temporary directory and a rename.

    Each of `extra_writers` writes its files (the hook's cache, reports) into the
    temporary directory, so they appear together with the SAE.
    """
    final = run_dir / SAE_DIR
    temporary = run_dir / f".tmp-{SAE_DIR}-{uuid.uuid4().hex}"
    try:
        sae.save(temporary)
        for write in extra_writers:
            write(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return final


def _prepare_run_dir(cfg: TrainConfig, resume: bool) -> tuple[Path, Path | None]:
    """Create the run directory; return it and the checkpoint to resume from, if any."""
    run_dir = cfg.run_dir
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise TrainError(
            f"run directory {run_dir} already exists and is not empty; pass resume=True (--resume) "
            "to continue it, or choose another run_name"
        )
    if resume and checkpoint is None:
        logger.warning("No complete checkpoint in %s: starting the run from step 0", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, checkpoint


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train the SAE variant of `cfg` on its store and return the run directory.

    With `resume=True` the run continues from its latest complete checkpoint. Batches
    are a pure function of `(seed, step)`, and the loop draws no other random numbers
    (hooks draw from the checkpointed NumPy generator). A resumed run therefore ends
    with the same weights, bit for bit, as an uninterrupted one on the same device
    and software.
    """
    store = ActivationStore.open(cfg.store)
    variant = get_variant(cfg.variant)
    options = variant.build_options(cfg.variant_options)
    metadata = {**store_provenance(store), "variant": cfg.variant}
    sae_cfg = variant.build_sae_config(cfg, options, store.metadata.d_model, metadata)
    sae = variant.sae_class(sae_cfg)
    device = torch.device(cfg.device)

    stream = BatchStream(
        store,
        cfg.batch_size,
        cfg.seed,
        cfg.split,
        domains=cfg.domains,
        corpora=cfg.train_corpora,
        exclude_folds=cfg.exclude_folds,
        shuffle_buffer_shards=cfg.shuffle_buffer_shards,
        device=device,
        dtype=torch_dtype(cfg.dtype),
        expected_d_in=sae_cfg.d_in,
    )
    total_steps = cfg.total_steps
    logger.info(
        "Training %s SAE (d_in=%d, d_sae=%d) for %d steps of %d tokens on %d tokens per epoch of %s",
        cfg.variant, sae_cfg.d_in, sae_cfg.d_sae, total_steps, cfg.batch_size, stream.rows_per_epoch, store.path,
    )
    peak_lr = max(lr_at(step, cfg) for step in range(total_steps))
    if peak_lr < cfg.lr:
        logger.warning(
            "lr_warmup_steps (%d) and lr_decay_steps (%d) overlap in the run's %d steps: the learning rate "
            "peaks at %.3g instead of lr %.3g",
            cfg.lr_warmup_steps, cfg.lr_decay_steps, total_steps, peak_lr, cfg.lr,
        )

    # The run directory is created only once the store, variant and options are valid,
    # so a rejected config leaves nothing on disk.
    run_dir, checkpoint = _prepare_run_dir(cfg, resume)
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    np_rng = np.random.default_rng([cfg.seed, 2])
    tokens_since_fired_F = torch.zeros(sae_cfg.d_sae, dtype=torch.int64, device=device)
    start_step = 0
    tokens_seen = 0

    if checkpoint is not None:
        saved_state = read_checkpoint_state(checkpoint)
        _check_config_hash(cfg, saved_state, checkpoint)
        _check_store_hash(store, saved_state, checkpoint)
        state = load_checkpoint(checkpoint, sae, optimizer, np_rng=np_rng)
        start_step = int(state["step"])
        tokens_seen = int(state["tokens_seen"])
        tokens_since_fired_F = torch.tensor(state["tokens_since_fired"], dtype=torch.int64, device=device)
        if start_step >= total_steps and (run_dir / SAE_DIR).is_dir():
            # The SAE directory appears in one rename after the final checkpoint, so
            # its presence means the run finished.
            logger.info("Run %s already finished (%d steps); nothing to train", run_dir, total_steps)
            return run_dir
        _trim_log(run_dir / TRAIN_LOG_FILE, start_step)
        logger.info("Resuming %s from step %d (%d tokens seen)", run_dir, start_step, tokens_seen)
    else:
        (run_dir / TRAIN_LOG_FILE).unlink(missing_ok=True)
        generator = torch.Generator().manual_seed(cfg.seed)
        sae.initialize(stream.batch_at(0).x_BD.float(), generator=generator)

    (run_dir / RUN_CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    hook = variant.make_hook(HookContext(cfg, options, sae, store, np_rng, run_dir)) if variant.make_hook else TrainingHook()
    if checkpoint is not None:
        hook.restore(checkpoint)

    def write_checkpoint(step: int) -> None:
        state = {
            "tokens_seen": tokens_seen,
            "tokens_since_fired": tokens_since_fired_F.tolist(),
            "lr": lr_at(step - 1, cfg),
            "l1_coefficient": l1_coefficient_at(step - 1, cfg.l1_coefficient, cfg.l1_warmup_steps),
            "config_hash": cfg.config_hash(),
            "config": json.loads(json.dumps(cfg.resume_fields(), default=str)),
            "store_config_hash": store.metadata.config_hash,
        }
        path = save_checkpoint(
            run_dir, step, sae, optimizer, state,
            np_rng=np_rng, extra_writers=hook.checkpoint_writers(), keep=cfg.keep_checkpoints,
        )
        logger.info("Saved checkpoint %s", path)

    window = _MetricWindow(device)
    negative_ev_warnings = 0
    warmup_steps = max(cfg.lr_warmup_steps, cfg.l1_warmup_steps)
    progress = tqdm(total=total_steps, initial=start_step, desc=f"train {cfg.run_name}", disable=not cfg.progress_bar)
    batches = stream.iter_from(start_step)
    with progress:
        for step in range(start_step, total_steps):
            batch = next(batches)
            f_BF = _train_step(step, cfg, sae, optimizer, hook, batch, window)

            with torch.no_grad():
                tokens_since_fired_F += batch.x_BD.shape[0]
                tokens_since_fired_F[(f_BF > 0).any(dim=0)] = 0
            tokens_seen += batch.x_BD.shape[0]
            done = step + 1
            progress.update(1)

            if done % cfg.log_every == 0 or done == total_steps:
                record = _log_record(done, tokens_seen, step, cfg, window, tokens_since_fired_F, hook)
                window.reset()
                with (run_dir / TRAIN_LOG_FILE).open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                logger.info(
                    "step %d: loss %.4g, mse %.4g, explained variance %.4f, L0 %.1f, dead %.3f, lr %.3g",
                    done, record["loss"], record["mse"], record["explained_variance"], record["l0"],
                    record["dead_fraction"], record["lr"],
                )
                progress.set_postfix(loss=f"{record['loss']:.4g}", ev=f"{record['explained_variance']:.3f}", l0=f"{record['l0']:.1f}")
                if done > warmup_steps and record["explained_variance"] < 0:
                    negative_ev_warnings += 1
                    if negative_ev_warnings == 1:
                        logger.warning(
                            "Explained variance is %.3f at step %d, after warm-up: the SAE reconstructs its "
                            "training batches worse than their mean. Check lr, l1_coefficient and the store's norm_scale",
                            record["explained_variance"], done,
                        )

            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total_steps:
                write_checkpoint(done)

    if negative_ev_warnings > 1:
        logger.warning("Explained variance was negative at %d log steps after warm-up", negative_ev_warnings)
    if start_step < total_steps:
        write_checkpoint(total_steps)
    hook.on_train_end(sae, run_dir)
    final = _save_final_sae(sae, run_dir, hook.sae_writers())
    logger.info("Saved the trained SAE to %s", final)
    return run_dir


def _train_step(
    step: int,
    cfg: TrainConfig,
    sae: BaseSAE,
    optimizer: torch.optim.Optimizer,
    hook: TrainingHook,
    batch: Batch,
    window: _MetricWindow,
) -> torch.Tensor:
    """Run one optimizer step on `batch` and return its latent activations `f_BF`."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    l1_coefficient = l1_coefficient_at(step, cfg.l1_coefficient, cfg.l1_warmup_steps)

    x_BD = batch.x_BD
    x_hat_BD, f_BF = sae(x_BD)
    losses = sae.training_loss(x_BD, x_hat_BD, f_BF, l1_coefficient)
    if not torch.isfinite(losses.loss):
        raise TrainError(
            f"the loss is {losses.loss.item()} at step {step} (lr {lr:.3g}): training diverged; "
            "lower lr or l1_coefficient, or train in float32"
        )
    hook.record_reconstruction(step, x_BD, x_hat_BD.detach())

    optimizer.zero_grad(set_to_none=True)
    losses.loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    hook.before_optimizer_step(step, sae, optimizer, batch)
    optimizer.step()
    sae.set_decoder_norm_to_unit_norm()
    hook.after_optimizer_step(step, sae, optimizer, batch, f_BF.detach())

    window.add(losses.loss, losses.mse_loss, x_BD, x_hat_BD.detach(), f_BF.detach())
    return f_BF.detach()


def _log_record(
    done: int,
    tokens_seen: int,
    step: int,
    cfg: TrainConfig,
    window: _MetricWindow,
    tokens_since_fired_F: torch.Tensor,
    hook: TrainingHook,
) -> dict[str, Any]:
    """Build one line of train_log.jsonl after `done` steps."""
    record: dict[str, Any] = {"step": done, "tokens": tokens_seen, **window.means()}
    record["dead_fraction"] = float((tokens_since_fired_F >= cfg.dead_window).double().mean().item())
    record["lr"] = lr_at(step, cfg)
    record["l1_coefficient"] = l1_coefficient_at(step, cfg.l1_coefficient, cfg.l1_warmup_steps)
    for name, value in hook.metrics().items():
        if name in record:
            raise TrainError(f"hook metric {name!r} collides with a built-in training metric")
        record[name] = value
    for name, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            logger.warning("Metric %s is %s at step %d", name, value, done)
    return record
