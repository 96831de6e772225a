"""Tests of checkpoints: round trip, completeness, retention, extra writers, no pickles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainer.checkpoint import (
    COMPLETE_MARKER,
    CheckpointError,
    flatten_optimizer_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer_state,
)
from trainer.saes import StandardSAE, StandardSAEConfig


def trained_sae_and_optimizer(seed: int = 0, n_steps: int = 3) -> tuple[StandardSAE, torch.optim.Adam]:
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=8, d_sae=24, b_dec_init="zeros"))
    sae.initialize(generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2, betas=(0.8, 0.95))
    for _ in range(n_steps):
        x_BD = torch.randn(16, 8)
        x_hat_BD, f_BF = sae(x_BD)
        optimizer.zero_grad()
        sae.training_loss(x_BD, x_hat_BD, f_BF, 1.0).loss.backward()
        optimizer.step()
    return sae, optimizer


def assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    assert state_a["state"].keys() == state_b["state"].keys()
    for param_id, values in state_a["state"].items():
        for key, value in values.items():
            assert torch.equal(value, state_b["state"][param_id][key]), (param_id, key)


def test_optimizer_flatten_round_trip():
    _, optimizer = trained_sae_and_optimizer()
    tensors, meta = flatten_optimizer_state(optimizer.state_dict())
    assert set(tensors) == {f"state.{i}.{key}" for i in range(4) for key in ("step", "exp_avg", "exp_avg_sq")}
    json.dumps(meta)
    rebuilt = unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)))
    assert rebuilt["param_groups"][0]["betas"] == (0.8, 0.95)

    _, other = trained_sae_and_optimizer(seed=1, n_steps=1)
    other.load_state_dict(rebuilt)
    assert_same_optimizer_state(optimizer, other)


def test_checkpoint_round_trip(tmp_path):
    sae, optimizer = trained_sae_and_optimizer()
    np_rng = np.random.default_rng(7)
    np_rng.random(3)
    torch.manual_seed(99)
    expected_torch_draw = torch.rand(5)
    torch.manual_seed(99)
    path = save_checkpoint(tmp_path, 3, sae, optimizer, {"tokens_seen": 48}, np_rng=np_rng)
    expected_numpy_draw = np_rng.random(4)

    restored_sae, restored_optimizer = trained_sae_and_optimizer(seed=5, n_steps=2)
    restored_rng = np.random.default_rng(0)
    torch.manual_seed(0)
    state = load_checkpoint(path, restored_sae, restored_optimizer, np_rng=restored_rng)

    assert state == {"tokens_seen": 48, "step": 3}
    for name, tensor in sae.state_dict().items():
        assert torch.equal(restored_sae.state_dict()[name], tensor), name
    assert_same_optimizer_state(optimizer, restored_optimizer)
    assert np.array_equal(restored_rng.random(4), expected_numpy_draw)
    assert torch.equal(torch.rand(5), expected_torch_draw)


def test_checkpoint_has_no_pickles(tmp_path):
    sae, optimizer = trained_sae_and_optimizer()
    path = save_checkpoint(tmp_path, 1, sae, optimizer, {})
    names = sorted(entry.name for entry in path.iterdir())
    assert names == sorted(
        [COMPLETE_MARKER, "optimizer.safetensors", "rng.json", "rng.safetensors", "sae.safetensors", "sae_config.json", "state.json"]
    )


def test_incomplete_checkpoint_ignored(tmp_path):
    sae, optimizer = trained_sae_and_optimizer()
    complete = save_checkpoint(tmp_path, 5, sae, optimizer, {})
    incomplete = tmp_path / "checkpoints" / "step_00000010"
    incomplete.mkdir()
    (incomplete / "state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == complete
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(incomplete, sae)


def test_no_checkpoint_returns_none(tmp_path):
    assert latest_checkpoint(tmp_path) is None


def test_keeps_last_checkpoints(tmp_path):
    sae, optimizer = trained_sae_and_optimizer()
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, sae, optimizer, {}, keep=2)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step_00000006", "step_00000008"]


def test_extra_writers_run_before_marker(tmp_path):
    sae, optimizer = trained_sae_and_optimizer()
    seen_marker = []

    def write_mask(directory):
        seen_marker.append((directory / COMPLETE_MARKER).exists())
        (directory / "mask.json").write_text("[1, 0]")

    path = save_checkpoint(tmp_path, 1, sae, optimizer, {}, extra_writers=[write_mask])
    assert seen_marker == [False]
    assert (path / "mask.json").read_text() == "[1, 0]"


def test_failed_writer_leaves_no_checkpoint(tmp_path):
    sae, optimizer = trained_sae_and_optimizer()

    def failing_writer(directory):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 1, sae, optimizer, {}, extra_writers=[failing_writer])
    assert latest_checkpoint(tmp_path) is None
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_load_rejects_other_shape(tmp_path):
    sae, optimizer = trained_sae_and_optimizer()
    path = save_checkpoint(tmp_path, 1, sae, optimizer, {})
    other = StandardSAE(StandardSAEConfig(d_in=8, d_sae=12))
    with pytest.raises(CheckpointError, match="does not fit this SAE"):
        load_checkpoint(path, other)
