"""The sparse probing eval end to end on a tiny model, separable labelled texts and hand-built SAEs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evals.sparse_probing.config import ProbingDataset, SparseProbingEvalConfig
from evals.sparse_probing.main import (
    DegenerateSAEError,
    collect_pooled_features,
    load_inputs,
    run,
    tokenize_texts,
)
from evals.sparse_probing.schema import SparseProbingEvalOutput
from tests.evals.sparse_probing.conftest import N_CLASSES, write_labelled_jsonl
from trainer.export import export_saelens

K_VALUES = [1, 2, 5]


def make_config(sae_path: Path, dataset: Path, **overrides) -> SparseProbingEvalConfig:
    values = dict(
        sae_path=str(sae_path),
        datasets=[ProbingDataset(name="synthetic", local=str(dataset))],
        probe_train_set_size=80,
        probe_test_set_size=40,
        k_values=K_VALUES,
        dtype="float32",
        device="cpu",
        llm_batch_size=64,
    )
    values.update(overrides)
    return SparseProbingEvalConfig(**values)


@pytest.fixture(scope="module")
def identity_result(probing_setup: dict[str, Path]) -> dict:
    path = run(make_config(probing_setup["identity_sae"], probing_setup["dataset"]))
    return json.loads(path.read_text())


def test_output_layout(identity_result: dict, probing_setup: dict[str, Path]) -> None:
    SparseProbingEvalOutput.model_validate(identity_result)
    assert identity_result["eval_type_id"] == "sparse_probing"
    metrics = identity_result["eval_result_metrics"]
    assert list(metrics) == ["llm", "sae"]
    for k in K_VALUES:
        assert metrics["llm"][f"llm_top_{k}_test_accuracy"] is not None
        assert metrics["sae"][f"sae_top_{k}_test_accuracy"] is not None
    for k in (10, 20, 50, 100):
        assert metrics["llm"][f"llm_top_{k}_test_accuracy"] is None
        assert metrics["sae"][f"sae_top_{k}_test_accuracy"] is None
    assert identity_result["sae_cfg_dict"]["variant"] == "standard"
    assert identity_result["sae_cfg_dict"]["layer"] == 1
    expected_path = probing_setup["root"] / "runs" / "identity" / "evals" / "sparse_probing.json"
    assert expected_path.is_file()


def test_details_per_dataset(identity_result: dict) -> None:
    (detail,) = identity_result["eval_result_details"]
    assert detail["dataset_name"] == "synthetic_results"
    assert detail["classes"] == [str(label) for label in range(N_CLASSES)]
    assert (detail["probe_train_set_size"], detail["probe_test_set_size"]) == (80, 40)
    assert detail["downsized"] is False
    assert detail["n_texts"] == N_CLASSES * 60
    assert detail["sae_frac_alive"] == 1.0
    assert (
        detail["llm_test_accuracy"]
        == identity_result["eval_result_metrics"]["llm"]["llm_test_accuracy"]
    )
    per_class = identity_result["eval_result_unstructured"]["synthetic_results"]
    assert sorted(per_class["sae_top_1_test_accuracy"]) == ["0", "1", "2"]


def test_accuracy_intervals(identity_result: dict) -> None:
    (detail,) = identity_result["eval_result_details"]
    assert detail["n_test_predictions"] == N_CLASSES * 40
    intervals = detail["accuracy_intervals"]
    assert "sae_top_1_test_accuracy" in intervals
    assert "llm_top_100_test_accuracy" not in intervals
    for name, (low, high) in intervals.items():
        assert low <= detail[name] <= high, name
        assert high - low < 0.3, name


def test_separable_classes_beat_chance(identity_result: dict) -> None:
    metrics = identity_result["eval_result_metrics"]
    assert metrics["llm"]["llm_test_accuracy"] > 0.85
    assert metrics["sae"]["sae_test_accuracy"] > 0.85
    assert metrics["sae"]["sae_top_5_test_accuracy"] > 0.75
    assert metrics["sae"]["sae_top_1_test_accuracy"] > 0.6


def test_saelens_directory_gives_same_accuracies(
    identity_result: dict, probing_setup: dict[str, Path], tmp_path: Path
) -> None:
    saelens_dir = export_saelens(probing_setup["identity_sae"], tmp_path / "saelens")
    path = run(
        make_config(saelens_dir, probing_setup["dataset"], output=str(tmp_path / "result.json"))
    )
    result = json.loads(path.read_text())
    for group in ("llm", "sae"):
        for name, value in identity_result["eval_result_metrics"][group].items():
            assert result["eval_result_metrics"][group][name] == pytest.approx(value, abs=0.03), (
                name
            )
    assert result["sae_cfg_dict"]["variant"] == "saelens-standard"


def test_zero_sae_raises(probing_setup: dict[str, Path], tmp_path: Path) -> None:
    cfg = make_config(
        probing_setup["zero_sae"], probing_setup["dataset"], output=str(tmp_path / "zero.json")
    )
    with pytest.raises(DegenerateSAEError, match=r"is dead: 0 of 64 latents fired"):
        run(cfg)
    assert not (tmp_path / "zero.json").exists()


def test_constant_sae_raises(probing_setup: dict[str, Path], tmp_path: Path) -> None:
    cfg = make_config(
        probing_setup["constant_sae"],
        probing_setup["dataset"],
        output=str(tmp_path / "constant.json"),
    )
    with pytest.raises(DegenerateSAEError, match=r"constant across texts: 64 of 64 latents fired"):
        run(cfg)


def test_single_class_dataset_raises(probing_setup: dict[str, Path], tmp_path: Path) -> None:
    dataset = write_labelled_jsonl(tmp_path / "one.jsonl", {2: 30})
    with pytest.raises(ValueError, match="1 class"):
        run(make_config(probing_setup["identity_sae"], dataset, output=str(tmp_path / "one.json")))


def test_small_dataset_downsized_and_truncated(
    probing_setup: dict[str, Path], tmp_path: Path
) -> None:
    # Class 1 has 30 texts, fewer than the 60 needed, and every text is longer than 8 tokens.
    dataset = write_labelled_jsonl(
        tmp_path / "small.jsonl", {0: 60, 1: 30}, min_words=10, max_words=14
    )
    cfg = make_config(
        probing_setup["identity_sae"],
        dataset,
        context_length=8,
        k_values=[1],
        output=str(tmp_path / "small.json"),
    )
    (detail,) = json.loads(run(cfg).read_text())["eval_result_details"]
    assert detail["downsized"] is True
    assert (detail["probe_train_set_size"], detail["probe_test_set_size"]) == (40, 20)
    assert detail["n_texts"] == 60
    assert detail["n_truncated_texts"] == 60
    assert detail["n_tokens"] == 60 * 7, "BOS is excluded, so each truncated text pools 7 tokens"


def test_tokenize_texts_prepends_bos_and_truncates(probing_setup: dict[str, Path]) -> None:
    inputs = load_inputs(make_config(probing_setup["identity_sae"], probing_setup["dataset"]))
    sequences, n_truncated = tokenize_texts(
        inputs.loaded, ["w1 w2", "w1 w2 w3 w4 w5"], context_length=4
    )
    bos = inputs.loaded.bos_token_id
    assert [sequence[0] for sequence in sequences] == [bos, bos]
    assert [len(sequence) for sequence in sequences] == [3, 4]
    assert n_truncated == 1


def test_invalid_k_value_raises(probing_setup: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"invalid k_values \[3\]"):
        make_config(probing_setup["identity_sae"], probing_setup["dataset"], k_values=[1, 3])


def test_pooled_features_ignore_padding(probing_setup: dict[str, Path]) -> None:
    """A text's pooled features do not change when it is padded next to a longer text."""
    texts = ["w1 w2 w3", "w5 w6 w7 w8 w9 w10 w11 w12 w13 w14"]
    alone_cfg = make_config(
        probing_setup["identity_sae"], probing_setup["dataset"], llm_batch_size=1
    )
    alone = collect_pooled_features(load_inputs(alone_cfg), texts, alone_cfg)
    batched_cfg = make_config(
        probing_setup["identity_sae"], probing_setup["dataset"], llm_batch_size=2
    )
    batched = collect_pooled_features(load_inputs(batched_cfg), texts, batched_cfg)

    np.testing.assert_allclose(batched.llm_ND, alone.llm_ND, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(batched.sae_NF, alone.sae_NF, rtol=1e-4, atol=1e-5)
    assert batched.n_tokens == alone.n_tokens == 3 + 10


def test_metrics_average_over_datasets(probing_setup: dict[str, Path], tmp_path: Path) -> None:
    second = write_labelled_jsonl(tmp_path / "second.jsonl", {0: 30, 1: 30}, seed=7)
    cfg = make_config(
        probing_setup["identity_sae"],
        probing_setup["dataset"],
        datasets=[
            ProbingDataset(name="first", local=str(probing_setup["dataset"])),
            ProbingDataset(name="second", local=str(second)),
        ],
        probe_train_set_size=40,
        probe_test_set_size=20,
        k_values=[2],
        output=str(tmp_path / "two.json"),
    )
    result = json.loads(run(cfg).read_text())
    details = result["eval_result_details"]

    assert [detail["dataset_name"] for detail in details] == ["first_results", "second_results"]
    for group, name in (("llm", "llm_test_accuracy"), ("sae", "sae_top_2_test_accuracy")):
        expected = (details[0][name] + details[1][name]) / 2
        assert result["eval_result_metrics"][group][name] == pytest.approx(expected)
    assert result["eval_config"]["model"] == str(probing_setup["model_dir"])
