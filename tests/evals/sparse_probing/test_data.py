"""Reading labelled text sets, per-class pools and one-vs-rest tasks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evals.sparse_probing.config import ProbingDataset
from evals.sparse_probing.data import (
    ProbingDataError,
    load_labelled_texts,
    one_vs_rest_task,
    sample_class_pools,
)
from tests.evals.sparse_probing.conftest import write_labelled_jsonl


def local_dataset(path: Path, **overrides) -> ProbingDataset:
    return ProbingDataset(name="synthetic", local=str(path), **overrides)


def test_load_groups_texts_by_label(tmp_path: Path) -> None:
    path = write_labelled_jsonl(tmp_path / "set.jsonl", {0: 5, 1: 7, 2: 3})
    texts_by_label = load_labelled_texts(local_dataset(path))
    assert list(texts_by_label) == ["0", "1", "2"]
    assert [len(texts) for texts in texts_by_label.values()] == [5, 7, 3]


def test_load_selected_classes(tmp_path: Path) -> None:
    path = write_labelled_jsonl(tmp_path / "set.jsonl", {0: 5, 1: 7, 2: 3})
    texts_by_label = load_labelled_texts(local_dataset(path, classes=["2", "0"]))
    assert sorted(texts_by_label) == ["0", "2"]


def test_load_single_class_raises(tmp_path: Path) -> None:
    path = write_labelled_jsonl(tmp_path / "set.jsonl", {1: 10})
    with pytest.raises(ProbingDataError, match="1 class"):
        load_labelled_texts(local_dataset(path))


def test_load_missing_class_raises(tmp_path: Path) -> None:
    path = write_labelled_jsonl(tmp_path / "set.jsonl", {0: 5, 1: 5})
    with pytest.raises(ProbingDataError, match=r"label\(s\) \['7'\]"):
        load_labelled_texts(local_dataset(path, classes=["0", "7"]))


def test_load_missing_label_field_raises(tmp_path: Path) -> None:
    path = write_labelled_jsonl(tmp_path / "set.jsonl", {0: 5, 1: 5}, label_field="topic")
    with pytest.raises(ProbingDataError, match="no field 'label'"):
        load_labelled_texts(local_dataset(path))


def test_load_skips_blank_texts(tmp_path: Path) -> None:
    records = [
        {"text": "w1 w2", "label": 0},
        {"text": "   ", "label": 0},
        {"text": "w3", "label": 1},
    ]
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert load_labelled_texts(local_dataset(path)) == {"0": ["w1 w2"], "1": ["w3"]}


def test_load_max_records(tmp_path: Path) -> None:
    path = write_labelled_jsonl(tmp_path / "set.jsonl", {0: 50, 1: 50})
    texts_by_label = load_labelled_texts(local_dataset(path, max_records=20))
    assert sum(len(texts) for texts in texts_by_label.values()) == 20


def test_dataset_without_source_raises() -> None:
    with pytest.raises(ValueError, match="neither a local file nor a hub"):
        ProbingDataset(name="nothing", local=None, hub=None)


def texts_by_label(counts: dict[str, int]) -> dict[str, list[str]]:
    return {label: [f"{label}-{i}" for i in range(count)] for label, count in counts.items()}


def test_pools_are_disjoint_and_sized() -> None:
    pools = sample_class_pools(
        texts_by_label({"a": 40, "b": 40, "c": 40}), 20, 10, np.random.default_rng(0)
    )
    assert (pools.train_per_class, pools.test_per_class) == (10, 5)
    assert (pools.probe_train_set_size, pools.probe_test_set_size) == (20, 10)
    assert not pools.downsized
    train = np.concatenate(list(pools.train_pools.values()))
    test = np.concatenate(list(pools.test_pools.values()))
    assert (
        len(set(train.tolist()) | set(test.tolist())) == len(train) + len(test) == len(pools.texts)
    )
    for label, indices in pools.train_pools.items():
        assert all(pools.texts[i].startswith(f"{label}-") for i in indices)


def test_pools_downsize_small_class() -> None:
    pools = sample_class_pools(texts_by_label({"a": 40, "b": 12}), 20, 10, np.random.default_rng(0))
    assert pools.downsized
    assert (pools.train_per_class, pools.test_per_class) == (8, 4)
    assert (pools.probe_train_set_size, pools.probe_test_set_size) == (16, 8)


def test_pools_single_text_class_raises() -> None:
    with pytest.raises(ProbingDataError, match="class 'b' has 1 text"):
        sample_class_pools(texts_by_label({"a": 40, "b": 1}), 20, 10, np.random.default_rng(0))


def test_one_vs_rest_task_balanced() -> None:
    pools = {"a": np.arange(0, 12), "b": np.arange(12, 24), "c": np.arange(24, 36)}
    indices, targets = one_vs_rest_task(pools, "b", np.random.default_rng(0))

    assert len(indices) == 24
    assert targets.sum() == 12
    assert set(indices[targets == 1].tolist()) == set(range(12, 24))
    negatives = indices[targets == 0]
    assert len(set(negatives.tolist())) == 12
    from_a = int((negatives < 12).sum())
    assert from_a == 6, "negatives are spread evenly over the other classes"
