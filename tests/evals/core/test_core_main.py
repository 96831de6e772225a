"""End-to-end checks of the core eval on tiny Llama and Gemma 3 models."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from evals.core.config import CoreEvalConfig
from evals.core.main import (
    CoreEvalError,
    final_hidden_states,
    logits_from_hidden,
    run,
)
from evals.core.metrics import next_token_mask
from pipeline.models import load_model
from stores.activations import ActivationStore

from .conftest import LAYER, build_contexts, build_model, save_sae

SPECIAL_IDS = [0, 1, 2, 3]


def eval_config(sae_dir, **overrides) -> CoreEvalConfig:
    values = dict(
        sae_path=str(sae_dir),
        n_eval_tokens=1000,
        n_eval_contexts=6,
        batch_size=7,
        context_batch_size=4,
        logit_chunk_size=5,
        dtype="float32",
        device="cpu",
    )
    values.update(overrides)
    return CoreEvalConfig(**values)


def read_result(path):
    return json.loads(path.read_text())


def test_identity_sae_scores_one(tiny_setup):
    path = run(eval_config(tiny_setup["identity_sae"]))
    metrics = read_result(path)["eval_result_metrics"]
    performance = metrics["model_performance_preservation"]

    # The score is only informative when ablation clearly hurts the tiny model.
    assert performance["ce_loss_with_ablation"] > performance["ce_loss_without_sae"] + 1.0
    assert metrics["reconstruction_quality"]["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["reconstruction_quality"]["explained_variance_legacy"] == pytest.approx(
        1.0, abs=1e-6
    )
    assert metrics["reconstruction_quality"]["mse"] == pytest.approx(0.0, abs=1e-10)
    assert metrics["reconstruction_quality"]["cossim"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["shrinkage"]["l2_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert performance["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["model_behavior_preservation"]["kl_div_score"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["model_behavior_preservation"]["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-5)


def test_zero_sae_scores_zero(tiny_setup, caplog):
    with caplog.at_level(logging.WARNING, logger="evals.core.main"):
        path = run(eval_config(tiny_setup["zero_sae"]))
    result = read_result(path)
    metrics = result["eval_result_metrics"]

    assert metrics["model_performance_preservation"]["ce_loss_score"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert metrics["model_behavior_preservation"]["kl_div_score"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["misc_metrics"]["frac_alive"] == 0.0
    assert metrics["sparsity"]["l0"] == 0.0
    assert metrics["reconstruction_quality"]["explained_variance"] < 0.0
    assert any(
        "frac_alive = 0" in warning for warning in result["eval_result_unstructured"]["warnings"]
    )
    assert any("explained variance is negative" in record.message for record in caplog.records)


def test_output_layout(tiny_setup):
    sae_dir = tiny_setup["identity_sae"]
    path = run(eval_config(sae_dir))
    result = read_result(path)

    assert path == sae_dir.parent / "evals" / "core.json"
    assert result["eval_type_id"] == "core"
    assert set(result) == {
        "eval_type_id",
        "eval_config",
        "eval_id",
        "datetime_epoch_millis",
        "eval_result_metrics",
        "eval_result_details",
        "eval_result_unstructured",
        "sae_bench_commit_hash",
        "sae_lens_id",
        "sae_lens_release_id",
        "sae_lens_version",
        "sae_cfg_dict",
    }
    assert result["sae_lens_id"] is None
    assert result["eval_config"]["store"] == str(tiny_setup["store_dir"])
    assert result["sae_cfg_dict"]["variant"] == "standard"
    assert result["sae_cfg_dict"]["layer"] == LAYER
    assert result["sae_cfg_dict"]["d_sae"] == 64
    assert result["sae_cfg_dict"]["norm_scale"] == pytest.approx(tiny_setup["norm_scale"])
    assert result["eval_result_metrics"]["masks"] == {
        "encoder_density": None,
        "decoder_density": None,
    }
    assert len(result["eval_result_details"]) == 64
    assert [p.name for p in path.parent.iterdir()] == ["core.json"]


def test_token_counts_match_store(tiny_setup):
    store = ActivationStore.open(tiny_setup["store_dir"])
    arrays = store.read_shard(0, ["split", "contexts", "context_split"])
    heldout_contexts = torch.from_numpy(arrays["contexts"][arrays["context_split"] == 1]).long()
    expected_scored = int(next_token_mask(heldout_contexts, SPECIAL_IDS).sum())

    path = run(eval_config(tiny_setup["identity_sae"], n_eval_contexts=100))
    token_stats = read_result(path)["eval_result_metrics"]["token_stats"]

    assert token_stats["total_tokens_eval_sparsity_variance"] == int((arrays["split"] == 1).sum())
    assert token_stats["total_contexts_eval_reconstruction"] == len(heldout_contexts)
    assert token_stats["total_tokens_eval_reconstruction"] == expected_scored


def test_clean_loss_matches_model_forward(tiny_setup):
    store = ActivationStore.open(tiny_setup["store_dir"])
    arrays = store.read_shard(0, ["contexts", "context_split"])
    input_ids = torch.from_numpy(arrays["contexts"][arrays["context_split"] == 1]).long()
    loaded = load_model(str(tiny_setup["model_dir"]), dtype="float32", device="cpu")
    with torch.no_grad():
        logits = loaded.model(input_ids=input_ids).logits
    mask = next_token_mask(input_ids, SPECIAL_IDS)
    targets = torch.roll(input_ids, -1, dims=1)
    expected = torch.nn.functional.cross_entropy(logits[mask], targets[mask]).item()

    path = run(eval_config(tiny_setup["identity_sae"], n_eval_contexts=100))
    performance = read_result(path)["eval_result_metrics"]["model_performance_preservation"]

    assert performance["ce_loss_without_sae"] == pytest.approx(expected, rel=1e-5)


def test_chunked_head_matches_logits(model_family):
    model = build_model(model_family)
    input_ids = torch.from_numpy(build_contexts(2, seed=5)).long()

    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        chunked = logits_from_hidden(model, final_hidden_states(model, input_ids))

    torch.testing.assert_close(chunked, expected)


def test_skip_downstream_without_contexts(tiny_setup):
    path = run(
        eval_config(
            tiny_setup["identity_sae"],
            n_eval_contexts=0,
            output=str(tiny_setup["root"] / "skip.json"),
        )
    )
    metrics = read_result(path)["eval_result_metrics"]

    assert metrics["model_performance_preservation"] is None
    assert metrics["model_behavior_preservation"] is None
    assert metrics["token_stats"]["total_contexts_eval_reconstruction"] == 0


def test_sample_size_caps_tokens(tiny_setup):
    path = run(
        eval_config(
            tiny_setup["identity_sae"],
            n_eval_tokens=10,
            n_eval_contexts=0,
            output=str(tiny_setup["root"] / "small.json"),
        )
    )
    token_stats = read_result(path)["eval_result_metrics"]["token_stats"]

    assert token_stats["total_tokens_eval_sparsity_variance"] == 10


def test_d_model_mismatch_names_both(tiny_setup, tmp_path):
    sae_dir = save_sae(
        tmp_path / "sae", tiny_setup["store_dir"], tiny_setup["norm_scale"], "identity", d_in=16
    )

    with pytest.raises(CoreEvalError, match=r"d_model 32.*d_in\s+16"):
        run(eval_config(sae_dir))


def test_layer_mismatch_raises(tiny_setup, tmp_path):
    sae_dir = save_sae(
        tmp_path / "sae",
        tiny_setup["store_dir"],
        tiny_setup["norm_scale"],
        "identity",
        layer=LAYER + 1,
    )

    with pytest.raises(CoreEvalError, match="layer"):
        run(eval_config(sae_dir))


def test_norm_scale_mismatch_raises(tiny_setup, tmp_path):
    sae_dir = save_sae(
        tmp_path / "sae", tiny_setup["store_dir"], 2 * tiny_setup["norm_scale"], "identity"
    )

    with pytest.raises(CoreEvalError, match="norm_scale"):
        run(eval_config(sae_dir))


def test_folded_sae_matches_normalized(tiny_setup, tmp_path):
    from trainer.saes import load_sae

    normalized = load_sae(tiny_setup["identity_sae"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        normalized.W_dec_FD.add_(0.05 * torch.randn(normalized.W_dec_FD.shape, generator=generator))
        normalized.b_dec_D.add_(0.1)
    normalized_dir = normalized.save(tmp_path / "normalized" / "sae")
    folded_dir = normalized.fold_normalization().save(tmp_path / "folded" / "sae")

    normalized_metrics = read_result(run(eval_config(normalized_dir)))["eval_result_metrics"]
    folded_metrics = read_result(run(eval_config(folded_dir)))["eval_result_metrics"]

    for group, name in [
        ("reconstruction_quality", "explained_variance"),
        ("reconstruction_quality", "mse"),
        ("model_performance_preservation", "ce_loss_with_sae"),
    ]:
        assert folded_metrics[group][name] == pytest.approx(
            normalized_metrics[group][name], rel=1e-4
        )
    assert normalized_metrics["reconstruction_quality"]["explained_variance"] < 1.0 - 1e-4
    assert not math.isclose(
        normalized_metrics["model_behavior_preservation"]["kl_div_with_sae"], 0.0
    )
