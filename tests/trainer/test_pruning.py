"""Tests of the cubic schedule, connection selection, the "fixed" variant and its resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stores.cache import CacheError, CorrelationCache
from stores.masks import MaskError, PackedMask
from tests.trainer.conftest import tiny_train_config
from trainer.checkpoint import latest_checkpoint
from trainer.config import TrainConfig
from trainer.pruning.fixed import FixedPruningHook
from trainer.pruning.options import FixedOptions, PruningConfigError
from trainer.pruning.schedule import cubic_density, is_pruning_step, pruning_steps, resolve_window
from trainer.pruning.selection import (
    lexicographic_rank,
    protected_connections,
    select_lowest,
    select_prunable,
)
from trainer.saes import HookContext, Variant, load_sae, register_variant
from trainer.saes.masked import MaskedSAE, MaskedSAEConfig, build_masked_sae_config
from trainer.train import train

CRASH_VARIANT = "fixed-crash-test"


class SimulatedCrash(RuntimeError):
    """Stands in for a killed process."""


class CrashingFixedHook(FixedPruningHook):
    crash_after_step: int | None = None

    def after_optimizer_step(self, step, sae, optimizer, batch, f_BF):
        super().after_optimizer_step(step, sae, optimizer, batch, f_BF)
        if CrashingFixedHook.crash_after_step == step + 1:
            raise SimulatedCrash(f"simulated crash after step {step + 1}")


register_variant(
    Variant(
        name=CRASH_VARIANT,
        sae_class=MaskedSAE,
        options_class=FixedOptions,
        build_sae_config=build_masked_sae_config,
        make_hook=CrashingFixedHook,
    )
)


@pytest.fixture(autouse=True)
def reset_crash():
    CrashingFixedHook.crash_after_step = None
    yield
    CrashingFixedHook.crash_after_step = None


def make_config(store, tmp_path, **overrides) -> TrainConfig:
    options = {"min_connections": 2, "prune_every": 4, "fvu_window": 3, "cache_every": 2}
    return tiny_train_config(
        store, tmp_path, **{"variant": "fixed", "variant_options": options, "seed": 5, **overrides}
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# Schedule.


def test_cubic_density_values():
    # rho_t = 0.25 + 0.75 (1 - (t - 10) / 10)^3 for t in [10, 20].
    assert cubic_density(0, 0.25, 10, 20) == 1.0
    assert cubic_density(10, 0.25, 10, 20) == 1.0
    assert cubic_density(12, 0.25, 10, 20) == pytest.approx(0.25 + 0.75 * 0.512)
    assert cubic_density(15, 0.25, 10, 20) == pytest.approx(0.34375)
    assert cubic_density(19, 0.25, 10, 20) == pytest.approx(0.25 + 0.75 * 0.001)
    assert cubic_density(20, 0.25, 10, 20) == 0.25
    assert cubic_density(99, 0.25, 10, 20) == 0.25


def test_pruning_steps_end_on_t1():
    assert pruning_steps(10, 20, 4) == [14, 18, 20]
    assert not is_pruning_step(10, 10, 20, 4)
    assert is_pruning_step(20, 10, 20, 4)
    assert not is_pruning_step(22, 10, 20, 4)


def test_resolve_window_defaults_and_errors():
    assert resolve_window(None, None, 100) == (10, 70)
    assert resolve_window(5, None, 100) == (5, 70)
    with pytest.raises(PruningConfigError, match="start_step=50, end_step=40"):
        resolve_window(50, 40, 100)
    with pytest.raises(PruningConfigError, match="end_step=200 for a run of 100 steps"):
        resolve_window(0, 200, 100)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_target_density_outside_range_is_an_error(density):
    with pytest.raises(PruningConfigError, match=f"invalid target_density {density}"):
        FixedOptions(target_density=density)


def test_target_density_one_is_valid():
    assert FixedOptions(target_density=1.0).target_density == 1.0


def test_min_connections_above_target_is_an_error(small_store, tmp_path):
    # d_model 16 and target 0.25 allow at most 4 connections per latent.
    cfg = make_config(
        small_store,
        tmp_path,
        variant_options={"min_connections": 8},
        batch_size=32,
        total_tokens=320,
    )
    with pytest.raises(PruningConfigError, match="lower min_connections to at most 4"):
        train(cfg)


# Selection.


def test_selection_keeps_min_connections_per_row():
    scores_FD = torch.tensor([[0.1, 0.2, 0.3, 0.4], [5.0, 6.0, 7.0, 8.0]], dtype=torch.float64)
    live_FD = torch.ones(2, 4, dtype=torch.bool)
    chosen_FD = select_prunable(
        scores_FD, torch.zeros_like(scores_FD), live_FD, n=5, min_connections=2
    )
    # Row 0 contains the four lowest scores, but keeps its two best.
    expected_FD = torch.tensor([[True, True, False, False], [True, True, False, False]])
    assert torch.equal(chosen_FD, expected_FD)


def test_selection_breaks_ties_by_second_key():
    scores_FD = torch.zeros(1, 4, dtype=torch.float64)
    tiebreak_FD = torch.tensor([[3.0, 1.0, 2.0, 0.5]], dtype=torch.float64)
    rank_FD = lexicographic_rank(scores_FD, tiebreak_FD)
    assert rank_FD.tolist() == [[3, 1, 2, 0]]
    live_FD = torch.ones(1, 4, dtype=torch.bool)
    assert protected_connections(rank_FD, live_FD, 1).tolist() == [[True, False, False, False]]
    assert select_lowest(rank_FD, live_FD, 2).tolist() == [[False, True, False, True]]


def test_selection_skips_dead_and_frozen():
    scores_FD = torch.arange(8, dtype=torch.float64).view(2, 4)
    live_FD = torch.tensor([[False, True, True, True], [True, True, True, True]])
    frozen_F = torch.tensor([False, True])
    chosen_FD = select_prunable(scores_FD, torch.zeros_like(scores_FD), live_FD, 10, 1, frozen_F)
    assert chosen_FD.tolist() == [[False, True, True, False], [False, False, False, False]]


def test_guard_keeps_alive_latent_whole(small_store, tmp_path):
    """A latent that fires only through many small weights is not silenced by pruning them."""
    cfg = make_config(small_store, tmp_path, d_sae=4, variant_options={"min_connections": 2})
    sae = MaskedSAE(MaskedSAEConfig(d_in=16, d_sae=4, b_dec_init="zeros"))
    with torch.no_grad():
        sae.W_enc_DF.fill_(1.0)
        sae.W_enc_DF[:, 0] = 0.1
        sae.b_enc_F.copy_(torch.tensor([-1.2, 0.0, 0.0, 0.0]))
    context = HookContext(
        cfg,
        FixedOptions(min_connections=2, track_separation=False),
        sae,
        small_store,
        np.random.default_rng(0),
        tmp_path / "hook_run",
    )
    hook = FixedPruningHook(context)
    optimizer = torch.optim.Adam(sae.parameters())
    x_BD = torch.ones(3, 16)
    assert bool((sae.encode(x_BD)[:, 0] > 0).all())

    magnitude_FD = sae.W_enc_DF.detach().abs().T.double()
    pruned_FD, kept_whole = hook.prune_encoder(
        optimizer, magnitude_FD, torch.zeros_like(magnitude_FD), 8, x_BD
    )

    assert kept_whole == 1
    assert int(pruned_FD[0].sum()) == 0
    assert int(pruned_FD.sum()) == 8
    assert bool((sae.encode(x_BD) > 0).any(dim=0).all())


# The fixed variant in training.


def test_fixed_reaches_target_and_logs(sparse_store, tmp_path):
    run_dir = train(make_config(sparse_store, tmp_path))
    sae = load_sae(run_dir / "sae")
    # round(0.25 * 32 * 16) = 128 connections stay.
    assert sae.encoder_mask.count() == 128
    assert int(sae.encoder_mask.row_counts().min()) >= 2
    assert sae.cfg.metadata["variant"] == "fixed"

    # The window is (3, 21): events every 4 steps and at 21.
    events = read_jsonl(run_dir / "pruning_log.jsonl")
    assert [event["step"] for event in events] == [7, 11, 15, 19, 21]
    # The event at 21 ends the after window of the event at 19 after 2 of its 3 steps.
    assert [event["logged_step"] for event in events] == [10, 14, 18, 21, 24]
    assert [event["fvu_after_steps"] for event in events] == [3, 3, 3, 2, 3]
    densities = [event["density"] for event in events]
    assert densities == sorted(densities, reverse=True)
    assert densities[-1] == 0.25
    for event in events:
        assert event["scheduled_density"] == pytest.approx(
            round(cubic_density(event["step"], 0.25, 3, 21) * 512) / 512
        )
        assert event["fvu_before"] > 0
        assert event["fvu_after"] > 0

    separation = json.loads((run_dir / "sae" / "separation.json").read_text())
    assert separation["variant"] == "fixed"
    assert separation["d_sae"] == 32
    assert separation["cache_token_mass"]["forget"] > 0
    assert separation["cache_token_mass"]["retain"] > 0
    cache = CorrelationCache.load(
        run_dir / "sae" / "cache.zarr", expected_model="synthetic", expected_layer=0
    )
    assert cache.n_updates == 15


def test_decoder_pruning(sparse_store, tmp_path):
    options = {
        "min_connections": 2,
        "prune_every": 4,
        "prune_decoder": True,
        "track_separation": False,
    }
    run_dir = train(make_config(sparse_store, tmp_path, variant_options=options))
    sae = load_sae(run_dir / "sae")
    assert sae.mask_densities() == {"encoder_density": 0.25, "decoder_density": 0.25}
    assert torch.all(sae.W_dec_FD[~sae.decoder_mask.to_dense()] == 0)
    assert not (run_dir / "sae" / "separation.json").exists()


def test_standard_variant_writes_separation_report(small_store, tmp_path):
    cfg = make_config(
        small_store,
        tmp_path,
        variant="standard",
        variant_options={"cache_every": 1},
        total_tokens=64 * 4,
    )
    run_dir = train(cfg)
    separation = json.loads((run_dir / "sae" / "separation.json").read_text())
    assert separation["variant"] == "standard"
    assert separation["cache_updates"] == 4
    log = read_jsonl(run_dir / "train_log.jsonl")
    assert log[-1]["cache_ms"] >= 0
    assert 0 <= log[-1]["cache_fraction"] <= 1


def test_fixed_resume_is_bit_identical(sparse_store, tmp_path):
    whole_dir = train(make_config(sparse_store, tmp_path, run_name="whole", variant=CRASH_VARIANT))

    # Step 12 lies inside the after window of the event at step 11.
    CrashingFixedHook.crash_after_step = 12
    cfg = make_config(sparse_store, tmp_path, run_name="split", variant=CRASH_VARIANT)
    with pytest.raises(SimulatedCrash):
        train(cfg)
    assert latest_checkpoint(cfg.run_dir).name == "step_00000010"
    CrashingFixedHook.crash_after_step = None
    resumed_dir = train(cfg, resume=True)

    whole = load_sae(whole_dir / "sae")
    resumed = load_sae(resumed_dir / "sae")
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert resumed.encoder_mask == whole.encoder_mask
    assert read_jsonl(resumed_dir / "pruning_log.jsonl") == read_jsonl(
        whole_dir / "pruning_log.jsonl"
    )
    whole_cache = CorrelationCache.load(whole_dir / "sae" / "cache.zarr")
    resumed_cache = CorrelationCache.load(resumed_dir / "sae" / "cache.zarr")
    for name, tensor in whole_cache.stats.items():
        assert torch.equal(resumed_cache.stats[name], tensor), name


def _crashed_run(store, tmp_path) -> tuple[TrainConfig, Path]:
    CrashingFixedHook.crash_after_step = 7
    cfg = make_config(store, tmp_path, variant=CRASH_VARIANT)
    with pytest.raises(SimulatedCrash):
        train(cfg)
    CrashingFixedHook.crash_after_step = None
    return cfg, latest_checkpoint(cfg.run_dir)


def test_resume_rejects_mask_of_wrong_shape(small_store, tmp_path):
    cfg, checkpoint = _crashed_run(small_store, tmp_path)
    PackedMask.ones(16, 32).save(checkpoint / "masks", "encoder")
    with pytest.raises(MaskError, match=r"has shape \(16, 32\) but \(32, 16\) was expected"):
        train(cfg, resume=True)


def test_resume_rejects_mask_of_other_version(small_store, tmp_path):
    cfg, checkpoint = _crashed_run(small_store, tmp_path)
    metadata_path = checkpoint / "masks" / "encoder" / "zarr.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["attributes"]["version"] = 99
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(MaskError, match="packed mask version 99"):
        train(cfg, resume=True)


def test_resume_rejects_cache_of_other_model(small_store, tmp_path):
    cfg, checkpoint = _crashed_run(small_store, tmp_path)
    shutil.rmtree(checkpoint / "cache.zarr")
    CorrelationCache(16, 32, None, model="other-model", layer=0).save(checkpoint / "cache.zarr")
    with pytest.raises(CacheError, match="built for model 'other-model'"):
        train(cfg, resume=True)


def test_resume_rejects_cache_of_other_layer(small_store, tmp_path):
    cfg, checkpoint = _crashed_run(small_store, tmp_path)
    shutil.rmtree(checkpoint / "cache.zarr")
    CorrelationCache(16, 32, None, model="synthetic", layer=3).save(checkpoint / "cache.zarr")
    with pytest.raises(CacheError, match="built for layer 3"):
        train(cfg, resume=True)
