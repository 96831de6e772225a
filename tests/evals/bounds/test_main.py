"""The separation bounds eval end to end, on a tiny store and SAEs trained or built in the test."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from evals.bounds.config import BoundsConfigError, BoundsEvalConfig
from evals.bounds.main import BoundsEvalError, check_preactivations, normalized_weights, run
from tests.trainer.conftest import build_store, sparse_feature_acts, tiny_train_config
from trainer.saes import StandardSAE, StandardSAEConfig, load_sae
from trainer.train import train

D_MODEL = 16
D_SAE = 32
MULTIPLIERS = [25.0, 100.0]


def forget_feature_acts(rng: np.random.Generator, n_rows: int, d_model: int) -> np.ndarray:
    """Sparse feature activations plus, on half of the forget rows (even rows), a forget-only direction."""
    acts = sparse_feature_acts(rng, n_rows, d_model)
    direction_D = np.random.default_rng(99).normal(size=d_model)
    direction_D /= np.linalg.norm(direction_D)
    forget_rows = (np.arange(n_rows) % 2 == 0) & (rng.random(n_rows) < 0.5)
    acts[forget_rows] += 4.0 * direction_D.astype(np.float32)
    return acts


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A fixed-variant run (masked encoder, correlation cache) trained on a store with a forget-only direction."""
    root = tmp_path_factory.mktemp("bounds")
    store = build_store(
        root / "store", n_shards=4, rows_per_shard=512, d_model=D_MODEL, acts_fn=forget_feature_acts
    )
    cfg = tiny_train_config(
        store,
        root,
        run_name="fixed",
        variant="fixed",
        variant_options={"min_connections": 2, "prune_every": 4, "fvu_window": 3, "cache_every": 2},
        d_sae=D_SAE,
        seed=5,
        checkpoint_every=100,
        log_every=10,
    )
    run_dir = train(cfg)
    return {"root": root, "store": store, "run_dir": run_dir, "sae_dir": run_dir / "sae"}


def run_bounds(sae_dir: Path, **fields) -> dict:
    values = dict(
        sae_path=str(sae_dir),
        retain_threshold=0.5,
        n_features=4,
        multipliers=MULTIPLIERS,
        device="cpu",
    )
    values.update(fields)
    path = run(BoundsEvalConfig(**values))
    return {"path": path, **json.loads(path.read_text())}


def n_heldout_tokens(store) -> int:
    return sum(
        int((store.read_shard(info.index, ["split"])["split"] == 1).sum()) for info in store.shards
    )


def test_fixed_run_passes_every_bound(trained_run):
    result = run_bounds(trained_run["sae_dir"])
    assert result["path"] == trained_run["run_dir"] / "evals" / "separation_bounds.json"
    assert result["eval_type_id"] == "separation_bounds"
    assert result["sae_cfg_dict"]["variant"] == "fixed"
    metrics = result["eval_result_metrics"]
    summary = metrics["summary"]
    n_heldout = n_heldout_tokens(trained_run["store"])

    assert summary["stats_source"] == "store"
    assert 1 <= len(summary["selected_latents"]) <= 4
    assert summary["n_heldout_tokens"] == n_heldout
    assert summary["decoder_norm_min"] == pytest.approx(1.0, abs=1e-5)
    assert summary["decoder_norm_max"] == pytest.approx(1.0, abs=1e-5)
    assert summary["encoder_density"] == 0.25

    per_token = metrics["per_token_bound"]
    assert per_token["checks"] == n_heldout * len(MULTIPLIERS)
    assert per_token["violations"] == 0
    for entry in per_token["per_multiplier"]:
        assert entry["forget"]["checks"] + entry["retain"]["checks"] == n_heldout
        assert entry["n_active"] > 0
        assert entry["max_ratio"] <= 1.0 + 1e-4

    damage = metrics["expected_damage_bound"]
    assert damage["checks"] == len(MULTIPLIERS)
    assert damage["violations"] == 0
    for entry in damage["per_multiplier"]:
        assert entry["holds"]
        # The mean of the per-token bounds on the same tokens is never below the mean change.
        assert entry["empirical_mean"] <= entry["bound_on_heldout"] * (1 + 1e-6)

    firing = metrics["firing_bound"]
    assert firing["checks"] == len(summary["selected_latents"])
    assert firing["all_latents"]["checks"] == D_SAE
    assert firing["all_latents"]["violations"] == 0
    assert firing["empirical_separation"] <= firing["theoretical_separation"]

    assert summary["total_checks"] == per_token["checks"] + damage["checks"] + D_SAE
    assert summary["total_violations"] == 0
    assert summary["all_bounds_hold"]


def test_details_follow_the_mask(trained_run):
    result = run_bounds(trained_run["sae_dir"], all_latent_details=True)
    details = result["eval_result_details"]
    sae = load_sae(trained_run["sae_dir"])
    support_F = sae.encoder_mask.row_counts().tolist()
    selected = result["eval_result_metrics"]["summary"]["selected_latents"]

    assert [detail["id"] for detail in details] == list(range(D_SAE))
    for detail in details:
        assert detail["support_size"] == support_F[detail["id"]]
        assert detail["clamped"] == (detail["id"] in selected)
        assert detail["trivial"] == (detail["mu"] >= 0)
        assert 0.0 <= detail["cantelli_bound"] <= 1.0
        if detail["trivial"]:
            assert detail["cantelli_bound"] == 1.0
        else:
            sigma2 = detail["sigma"] ** 2
            assert detail["cantelli_bound"] == pytest.approx(sigma2 / (sigma2 + detail["mu"] ** 2))
        low, high = detail["ci"]
        assert low <= detail["empirical_rate"] <= high
        # ReLU: f > 0 exactly when the pre-activation is > 0.
        assert detail["preactivation_rate"] == detail["empirical_rate"]


def test_cache_statistics_are_labelled(trained_run, tmp_path):
    result = run_bounds(
        trained_run["sae_dir"], stats_source="cache", output=str(tmp_path / "cache.json")
    )
    summary = result["eval_result_metrics"]["summary"]
    assert summary["stats_source"] == "cache"
    assert summary["total_checks"] > 0
    assert any("correlation cache" in note for note in result["eval_result_unstructured"]["notes"])


def test_broken_decoder_shows_violations(trained_run, tmp_path):
    sae = load_sae(trained_run["sae_dir"])
    with torch.no_grad():
        sae.W_dec_FD.mul_(2.0)
    broken_dir = sae.save(tmp_path / "broken" / "sae")

    result = run_bounds(broken_dir)
    metrics = result["eval_result_metrics"]
    assert metrics["summary"]["clamped_decoder_norm_min"] == pytest.approx(2.0, abs=1e-5)
    assert metrics["per_token_bound"]["violations"] > 0
    assert not metrics["summary"]["all_bounds_hold"]
    assert any(
        "assume norm 1" in warning for warning in result["eval_result_unstructured"]["warnings"]
    )


def test_raw_space_sae_gives_same_result(trained_run, tmp_path):
    sae = load_sae(trained_run["sae_dir"])
    folded_dir = sae.fold_normalization().save(tmp_path / "folded" / "sae")

    normalized = run_bounds(trained_run["sae_dir"], output=str(tmp_path / "normalized.json"))
    folded = run_bounds(folded_dir)
    assert folded["sae_cfg_dict"]["activation_space"] == "raw"

    normalized_metrics = normalized["eval_result_metrics"]
    folded_metrics = folded["eval_result_metrics"]
    assert (
        folded_metrics["summary"]["selected_latents"]
        == normalized_metrics["summary"]["selected_latents"]
    )
    assert folded_metrics["summary"]["decoder_norm_max"] == pytest.approx(1.0, abs=1e-5)
    for folded_entry, normalized_entry in zip(
        folded_metrics["expected_damage_bound"]["per_multiplier"],
        normalized_metrics["expected_damage_bound"]["per_multiplier"],
        strict=True,
    ):
        assert folded_entry["bound"] == pytest.approx(normalized_entry["bound"], rel=1e-4)
        assert folded_entry["empirical_mean"] == pytest.approx(
            normalized_entry["empirical_mean"], rel=1e-4
        )
    folded_details = {detail["id"]: detail for detail in folded["eval_result_details"]}
    for detail in normalized["eval_result_details"]:
        assert folded_details[detail["id"]]["mu"] == pytest.approx(detail["mu"], rel=1e-4, abs=1e-5)
        assert folded_details[detail["id"]]["sigma"] == pytest.approx(detail["sigma"], rel=1e-4)


def test_dense_sae_and_token_limit(trained_run, tmp_path):
    store = trained_run["store"]
    cfg = StandardSAEConfig(
        d_in=D_MODEL,
        d_sae=D_SAE,
        norm_scale=store.metadata.norm_scale,
        metadata={"store": str(store.path), "layer": 0},
    )
    sae = StandardSAE(cfg)
    sae.initialize(generator=torch.Generator().manual_seed(0), sample_ND=torch.randn(8, D_MODEL))
    with torch.no_grad():
        sae.b_enc_F.fill_(-1.0)
    sae_dir = sae.save(tmp_path / "dense" / "sae")

    result = run_bounds(sae_dir, max_heldout_tokens=50, max_train_tokens=300, retain_threshold=1.0)
    metrics = result["eval_result_metrics"]
    assert metrics["summary"]["variant"] == "standard"
    assert metrics["summary"]["encoder_density"] is None
    assert metrics["summary"]["n_heldout_tokens"] == 50
    assert (
        metrics["summary"]["n_train_forget_tokens"] + metrics["summary"]["n_train_retain_tokens"]
        == 300
    )
    assert metrics["per_token_bound"]["checks"] == 50 * len(MULTIPLIERS)
    assert metrics["per_token_bound"]["violations"] == 0
    assert all(detail["support_size"] == D_MODEL for detail in result["eval_result_details"])

    with pytest.raises(BoundsEvalError, match="no correlation cache"):
        run(BoundsEvalConfig(sae_path=str(sae_dir), stats_source="cache", device="cpu"))


def test_empty_clamp_set_is_reported(trained_run, tmp_path):
    result = run_bounds(
        trained_run["sae_dir"], retain_threshold=1e-9, output=str(tmp_path / "empty.json")
    )
    metrics = result["eval_result_metrics"]
    assert metrics["summary"]["selected_latents"] == []
    assert metrics["summary"]["clamped_decoder_norm_min"] is None
    assert metrics["per_token_bound"]["violations"] == 0
    assert metrics["per_token_bound"]["per_multiplier"][0]["n_active"] == 0
    assert metrics["expected_damage_bound"]["per_multiplier"][0]["bound"] == 0.0
    assert metrics["firing_bound"]["checks"] == 0
    assert metrics["firing_bound"]["theoretical_separation"] == 0.0
    assert result["eval_result_details"] == []
    assert any(
        "no latent was selected" in warning
        for warning in result["eval_result_unstructured"]["warnings"]
    )


def test_topk_sae_bounds_hold(trained_run, tmp_path):
    store = trained_run["store"]
    cfg = StandardSAEConfig(
        d_in=D_MODEL,
        d_sae=D_SAE,
        activation="topk",
        k=3,
        norm_scale=store.metadata.norm_scale,
        metadata={"store": str(store.path), "layer": 0},
    )
    sae = StandardSAE(cfg)
    sae.initialize(generator=torch.Generator().manual_seed(1), sample_ND=torch.randn(8, D_MODEL))
    with torch.no_grad():
        sae.b_enc_F.fill_(-0.5)
    result = run_bounds(
        sae.save(tmp_path / "topk" / "sae"), retain_threshold=1.0, all_latent_details=True
    )

    metrics = result["eval_result_metrics"]
    assert metrics["summary"]["activation"] == "topk"
    assert metrics["summary"]["total_violations"] == 0
    assert any("TopK" in note for note in result["eval_result_unstructured"]["notes"])
    details = result["eval_result_details"]
    # TopK fires on a subset of the tokens with a positive pre-activation.
    assert all(detail["preactivation_rate"] >= detail["empirical_rate"] for detail in details)
    assert any(detail["preactivation_rate"] > detail["empirical_rate"] for detail in details)


def test_foreign_encoder_is_rejected(trained_run):
    sae = load_sae(trained_run["sae_dir"])
    weights = normalized_weights(sae, trained_run["store"].metadata.norm_scale)
    x_BD = torch.randn(16, D_MODEL, generator=torch.Generator().manual_seed(2))
    check_preactivations(sae, weights, x_BD, 1.0)

    # An encoder that is not (x - b_dec) W_enc + b_enc, e.g. with a gate, must not pass.
    original = sae.pre_activations
    sae.pre_activations = lambda inputs_BD: original(inputs_BD) + 1.0
    with pytest.raises(BoundsEvalError, match="differ from"):
        check_preactivations(sae, weights, x_BD, 1.0)


def test_store_without_heldout_tokens(trained_run, tmp_path):
    store = build_store(
        tmp_path / "store", d_model=D_MODEL, split_fn=lambda doc_ids: np.zeros(len(doc_ids))
    )
    sae = load_sae(trained_run["sae_dir"])
    sae.cfg.metadata["store"] = str(store.path)
    sae.cfg.norm_scale = store.metadata.norm_scale
    sae_dir = sae.save(tmp_path / "sae")
    with pytest.raises(BoundsEvalError, match="no held-out tokens"):
        run(BoundsEvalConfig(sae_path=str(sae_dir), retain_threshold=1.0, device="cpu"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("multipliers", [], "multipliers is empty"),
        ("multipliers", [-1.0], "invalid multiplier"),
        ("multipliers", [25.0, 25.0], "duplicates"),
        ("retain_threshold", 0.0, "retain_threshold"),
        ("n_features", 0, "n_features"),
        ("stats_source", "other", "stats_source"),
        ("max_heldout_tokens", 0, "max_heldout_tokens"),
        ("relative_tolerance", -1e-3, "relative_tolerance"),
    ],
)
def test_config_rejects_invalid_values(field, value, message):
    with pytest.raises(BoundsConfigError, match=message):
        BoundsEvalConfig(sae_path="runs/x/sae", **{field: value})


def test_no_partial_output_on_failure(trained_run, tmp_path):
    output = tmp_path / "out.json"
    cache_less = tmp_path / "copy" / "sae"
    shutil.copytree(trained_run["sae_dir"], cache_less)
    shutil.rmtree(cache_less / "cache.zarr")
    with pytest.raises(BoundsEvalError):
        run(
            BoundsEvalConfig(
                sae_path=str(cache_less), stats_source="cache", output=str(output), device="cpu"
            )
        )
    assert not output.exists()
    assert list(tmp_path.glob("*.tmp")) == []
