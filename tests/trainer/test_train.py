"""Tests of the training loop: resume, config checks, logs, errors and learning."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.trainer.conftest import build_store, tiny_train_config
from trainer.batches import BatchError, BatchStream
from trainer.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from trainer.config import TrainConfig, TrainConfigError
from trainer.saes import StandardSAE, TrainingHook, Variant, load_sae, register_variant
from trainer.train import TRAIN_LOG_FILE, TrainError, train

INTERRUPT_VARIANT = "standard-interruptible-test"


class SimulatedCrash(RuntimeError):
    """Raised by the test hook to stand in for a killed process."""


class InterruptHook(TrainingHook):
    """Raises after a chosen step; the step is a class attribute that tests set."""

    crash_after_step: int | None = None
    calls: list[tuple[str, int]] = []

    def before_optimizer_step(self, step, sae, optimizer, batch):
        InterruptHook.calls.append(("before", step))

    def after_optimizer_step(self, step, sae, optimizer, batch, f_BF):
        InterruptHook.calls.append(("after", step))
        if (
            InterruptHook.crash_after_step is not None
            and step + 1 == InterruptHook.crash_after_step
        ):
            raise SimulatedCrash(f"simulated crash after step {step + 1}")

    def metrics(self):
        return {"hook_calls": float(len(InterruptHook.calls))}


register_variant(
    Variant(
        name=INTERRUPT_VARIANT, sae_class=StandardSAE, make_hook=lambda context: InterruptHook()
    )
)


@pytest.fixture(autouse=True)
def reset_hook():
    InterruptHook.crash_after_step = None
    InterruptHook.calls = []
    yield
    InterruptHook.crash_after_step = None


def make_config(store, tmp_path, **overrides) -> TrainConfig:
    values = dict(
        batch_size=32,
        total_tokens=32 * 20,
        seed=11,
        shuffle_buffer_shards=2,
        keep_checkpoints=2,
        dead_window=64,
    )
    return tiny_train_config(store, tmp_path, **{**values, **overrides})


def read_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / TRAIN_LOG_FILE).read_text().splitlines()]


def test_resume_is_bit_identical(small_store, tmp_path):
    uninterrupted_dir = train(
        make_config(small_store, tmp_path, run_name="whole", variant=INTERRUPT_VARIANT)
    )

    InterruptHook.crash_after_step = 12
    interrupted_cfg = make_config(
        small_store, tmp_path, run_name="split", variant=INTERRUPT_VARIANT
    )
    with pytest.raises(SimulatedCrash):
        train(interrupted_cfg)
    assert latest_checkpoint(interrupted_cfg.run_dir).name == "step_00000010"
    assert not (interrupted_cfg.run_dir / "sae").exists()

    InterruptHook.crash_after_step = None
    InterruptHook.calls = []
    resumed_dir = train(interrupted_cfg, resume=True)
    assert InterruptHook.calls[0] == ("before", 10)

    whole = load_sae(uninterrupted_dir / "sae")
    resumed = load_sae(resumed_dir / "sae")
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name

    whole_log = read_log(uninterrupted_dir)
    resumed_log = read_log(resumed_dir)
    assert [record["step"] for record in resumed_log] == [5, 10, 15, 20]
    for a, b in zip(whole_log, resumed_log, strict=True):
        assert a["loss"] == b["loss"], a["step"]
        assert a["dead_fraction"] == b["dead_fraction"], a["step"]


def test_resume_finished_run_is_noop(small_store, tmp_path):
    cfg = make_config(small_store, tmp_path, total_tokens=32 * 10)
    run_dir = train(cfg)
    sae_file = run_dir / "sae" / "sae.safetensors"
    written = sae_file.stat().st_mtime_ns
    log_before = read_log(run_dir)

    assert train(cfg, resume=True) == run_dir

    assert sae_file.stat().st_mtime_ns == written
    assert read_log(run_dir) == log_before


def test_resume_rejects_changed_config(small_store, tmp_path):
    cfg = make_config(small_store, tmp_path, total_tokens=32 * 10)
    train(cfg)
    changed = replace(cfg, lr=2e-2)
    with pytest.raises(TrainError, match=r"lr: 0\.01 -> 0\.02"):
        train(changed, resume=True)


def test_resume_rejects_reharvested_store(small_store, tmp_path):
    cfg = make_config(small_store, tmp_path, total_tokens=32 * 10)
    train(cfg)
    original_hash = small_store.metadata.config_hash
    small_store.metadata.config_hash = "another-harvest"
    small_store.write_metadata()
    try:
        with pytest.raises(TrainError, match="now has config hash another-harvest"):
            train(cfg, resume=True)
    finally:
        small_store.metadata.config_hash = original_hash
        small_store.write_metadata()


def test_resume_damaged_checkpoint_is_an_error(small_store, tmp_path):
    cfg = make_config(small_store, tmp_path, total_tokens=32 * 10)
    run_dir = train(cfg)
    checkpoint = latest_checkpoint(run_dir)
    weights = checkpoint / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="is damaged or unreadable"):
        train(cfg, resume=True)


def test_unavailable_cuda_device_rejected(small_store, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrainConfigError, match="CUDA is not available"):
        make_config(small_store, tmp_path, device="cuda")


def test_resume_allows_changed_logging(small_store, tmp_path):
    cfg = make_config(small_store, tmp_path, total_tokens=32 * 10)
    train(cfg)
    run_dir = train(replace(cfg, log_every=1), resume=True)
    assert (run_dir / "sae").is_dir()


def test_fresh_run_rejects_existing_dir(small_store, tmp_path):
    cfg = make_config(small_store, tmp_path, total_tokens=32 * 5)
    train(cfg)
    with pytest.raises(TrainError, match="already exists and is not empty"):
        train(cfg)


def test_log_and_outputs(small_store, tmp_path):
    cfg = make_config(small_store, tmp_path, variant=INTERRUPT_VARIANT)
    run_dir = train(cfg)
    log = read_log(run_dir)
    assert [record["step"] for record in log] == [5, 10, 15, 20]
    assert [record["tokens"] for record in log] == [160, 320, 480, 640]
    expected_keys = {
        "step",
        "tokens",
        "loss",
        "mse_loss",
        "mse",
        "explained_variance",
        "l0",
        "l1",
        "dead_fraction",
        "lr",
        "l1_coefficient",
        "hook_calls",
    }
    for record in log:
        assert set(record) == expected_keys
        assert record["mse"] == pytest.approx(record["mse_loss"] / small_store.metadata.d_model)
        assert 0.0 <= record["dead_fraction"] <= 1.0
    assert log[0]["l1_coefficient"] == pytest.approx(0.5)
    assert log[0]["lr"] == pytest.approx(1e-2)
    assert log[-1]["lr"] == pytest.approx(1e-2 / 5)

    assert [path.name for path in list_checkpoints(run_dir)] == ["step_00000015", "step_00000020"]
    state = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())
    assert state["step"] == 20
    assert state["tokens_seen"] == 640
    assert len(state["tokens_since_fired"]) == 32

    sae = load_sae(run_dir / "sae")
    assert sae.cfg.norm_scale == pytest.approx(small_store.metadata.norm_scale)
    assert sae.cfg.metadata["d_model"] == 16
    assert sae.cfg.metadata["model"] == "synthetic"
    assert sae.cfg.metadata["layer"] == 0
    assert sae.cfg.activation_space == "normalized"
    assert torch.allclose(sae.W_dec_FD.norm(dim=1), torch.ones(32), atol=1e-5)
    assert json.loads((run_dir / "config.json").read_text())["seed"] == 11


def test_empty_split_is_an_error(tmp_path):
    store = build_store(
        tmp_path / "all_train", split_fn=lambda doc_ids: np.zeros(len(doc_ids), dtype=np.uint8)
    )
    with pytest.raises(BatchError, match="no tokens in store"):
        train(make_config(store, tmp_path, split="heldout"))
    assert not (tmp_path / "runs" / "run" / "sae").exists()


def test_nan_in_store_is_an_error(tmp_path):
    def acts_with_inf(rng, n_rows, d_model):
        acts = rng.normal(size=(n_rows, d_model)).astype(np.float32)
        acts[5, 0] = np.inf
        return acts

    store = build_store(
        tmp_path / "inf",
        n_shards=1,
        acts_fn=acts_with_inf,
        split_fn=lambda d: np.zeros(len(d), dtype=np.uint8),
    )
    with pytest.raises(BatchError, match="shard 0, row 5 "):
        train(make_config(store, tmp_path, batch_size=96, total_tokens=96 * 2))


def test_negative_explained_variance_warns(small_store, tmp_path, caplog):
    # With lr 1e-12 the SAE keeps its random initialization with b_dec = 0, which
    # reconstructs the offset Gaussian rows worse than their batch mean does
    # (explained variance about -0.6 on this store).
    cfg = make_config(
        small_store,
        tmp_path,
        lr=1e-12,
        l1_warmup_steps=0,
        lr_warmup_steps=0,
        lr_decay_steps=0,
        log_every=2,
        b_dec_init="zeros",
    )
    with caplog.at_level(logging.WARNING, logger="trainer.train"):
        train(cfg)
    assert any("Explained variance is" in record.message for record in caplog.records)


def explained_variance(sae, x_BD) -> float:
    with torch.no_grad():
        x_hat_BD, _ = sae(x_BD)
    return (
        1.0 - ((x_BD - x_hat_BD) ** 2).sum().item() / ((x_BD - x_BD.mean(dim=0)) ** 2).sum().item()
    )


@pytest.mark.parametrize(
    ("activation", "l1_coefficient", "max_l0"), [("topk", 0.0, 4.0), ("relu", 1.0, 8.0)]
)
def test_learns_sparse_features(sparse_store, tmp_path, activation, l1_coefficient, max_l0):
    cfg = make_config(
        sparse_store,
        tmp_path,
        d_sae=64,
        activation=activation,
        k=4,
        l1_coefficient=l1_coefficient,
        l1_warmup_steps=20,
        lr=3e-2,
        lr_warmup_steps=10,
        lr_decay_steps=40,
        batch_size=128,
        total_tokens=128 * 300,
        checkpoint_every=0,
        log_every=50,
    )
    sae = load_sae(train(cfg) / "sae")

    heldout = BatchStream(sparse_store, batch_size=128, seed=0, split="heldout")
    x_BD = heldout.batch_at(0).x_BD
    l0 = (sae.encode(x_BD) > 0).sum(dim=-1).float().mean().item()
    assert explained_variance(sae, x_BD) > 0.8
    assert l0 <= max_l0
    assert read_log(cfg.run_dir)[-1]["explained_variance"] > 0.8


def test_rejected_config_leaves_no_run_dir(small_store, tmp_path):
    cfg = make_config(small_store, tmp_path, variant="no-such-variant")
    with pytest.raises(ValueError, match="unknown variant 'no-such-variant'"):
        train(cfg)
    assert not cfg.run_dir.exists()
