"""Sparse probing config: defaults, validation and building from TOML-style tables."""

from __future__ import annotations

import pytest

from evals.sparse_probing.config import ProbingDataset, SparseProbingEvalConfig
from knowsep.config import ConfigError, build


def test_default_dataset_is_ag_news() -> None:
    (dataset,) = SparseProbingEvalConfig(sae_path="runs/x/sae").datasets
    assert dataset.name == "fancyzhx/ag_news"
    assert dataset.local == "../shared/data/ag_news/ag_news_test.jsonl"
    assert (dataset.text_field, dataset.label_field) == ("text", "label")


def test_build_from_table() -> None:
    table = {
        "sae_path": "runs/x/sae",
        "datasets": [
            {
                "name": "topics",
                "local": "topics.jsonl",
                "label_field": "topic",
                "classes": ["a", "b"],
            }
        ],
        "k_values": "5, 1",
        "probe_train_set_size": "200",
    }
    cfg = build(SparseProbingEvalConfig, table)
    (dataset,) = cfg.datasets
    assert isinstance(dataset, ProbingDataset)
    assert dataset.hub is None, "a custom dataset must not fall back to another hub dataset"
    assert dataset.classes == ["a", "b"]
    assert cfg.k_values == [1, 5]
    assert cfg.probe_train_set_size == 200


def test_build_unknown_dataset_field_raises() -> None:
    with pytest.raises(ConfigError, match="datasets"):
        build(
            SparseProbingEvalConfig,
            {"sae_path": "s", "datasets": [{"name": "a", "local": "a.jsonl", "labels": "x"}]},
        )


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"probe_train_set_size": 1}, "probe_train_set_size"),
        ({"context_length": 0}, "context_length"),
        ({"k_values": []}, "k_values is empty"),
        ({"k_values": [1, 3]}, r"invalid k_values \[3\]"),
        ({"dtype": "int8"}, "invalid dtype"),
        ({"datasets": []}, "datasets is empty"),
        (
            {
                "datasets": [
                    ProbingDataset(name="a", local="a"),
                    ProbingDataset(name="a", local="b"),
                ]
            },
            "repeat",
        ),
    ],
)
def test_invalid_config_raises(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SparseProbingEvalConfig(sae_path="runs/x/sae", **overrides)


def test_single_class_selection_raises() -> None:
    with pytest.raises(ValueError, match="at least two distinct labels"):
        ProbingDataset(name="a", local="a.jsonl", classes=["1", "1"])
