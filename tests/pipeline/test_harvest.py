"""Harvest: packing, store round trip, resume, distributed run and failure handling."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.harvest as harvest
import stores.activations as activations
from pipeline.config import HarvestConfig, HarvestConfigError
from pipeline.data import CorpusSpec, DataError
from pipeline.harvest import (
    HELDOUT_SPLIT,
    TRAIN_SPLIT,
    HarvestError,
    document_fold,
    document_split,
    harvest_config_hash,
    iter_planned_shards,
    resolve_corpora,
    run_harvest,
)
from pipeline.models import ModelConfig, capture_residual, load_model, load_tokenizer
from stores.activations import (
    ACTS_FIELDS,
    CONTEXT_FIELDS,
    TOKEN_FIELDS,
    ActivationStore,
    StoreError,
)
from tests.pipeline.conftest import make_text, write_jsonl

ALL_FIELDS = ACTS_FIELDS + TOKEN_FIELDS + CONTEXT_FIELDS


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("corpora")
    write_jsonl(
        directory / "bio.jsonl", [{"text": make_text(10 + 3 * i, seed=i)} for i in range(24)]
    )
    write_jsonl(
        directory / "wiki.jsonl", [{"text": make_text(40 + i, seed=100 + i)} for i in range(12)]
    )
    questions = [
        {
            "question": make_text(6, seed=200 + i),
            "choices": ["w1", "w2", "w3", "w4"],
            "answer": i % 4,
            "subject": "bio",
        }
        for i in range(10)
    ]
    write_jsonl(directory / "quiz.jsonl", questions)
    return directory


def make_config(model_dir: Path, corpus_dir: Path, store: Path, **overrides) -> HarvestConfig:
    values = dict(
        model=ModelConfig(name=str(model_dir), layer=1, dtype="float32", device="cpu"),
        store=str(store),
        corpora=[
            CorpusSpec(
                name="quiz", kind="mcq", domain="forget", local=str(corpus_dir / "quiz.jsonl")
            ),
            CorpusSpec(
                name="bio", kind="text", domain="forget", local=str(corpus_dir / "bio.jsonl")
            ),
            CorpusSpec(
                name="wiki", kind="text", domain="retain", local=str(corpus_dir / "wiki.jsonl")
            ),
        ],
        context_size=16,
        batch_size=4,
        shard_contexts=8,
        n_folds=3,
        heldout_fraction=0.25,
    )
    values.update(overrides)
    return HarvestConfig(**values)


def read_all(store: ActivationStore) -> list[dict[str, np.ndarray]]:
    return [store.read_shard(info.index, ALL_FIELDS) for info in store.shards]


def assert_stores_equal(left: ActivationStore, right: ActivationStore) -> None:
    assert [info.index for info in left.shards] == [info.index for info in right.shards]
    for index, (a, b) in enumerate(zip(read_all(left), read_all(right), strict=True)):
        for name in ALL_FIELDS:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"shard {index}, array {name}")
    assert left.metadata.norm_scale == right.metadata.norm_scale
    assert left.metadata.token_counts == right.metadata.token_counts
    assert left.metadata.config_hash == right.metadata.config_hash


@pytest.fixture(scope="module")
def clean_store(
    tiny_model_dir: Path, corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> ActivationStore:
    store_path = tmp_path_factory.mktemp("clean") / "store"
    return run_harvest(make_config(tiny_model_dir, corpus_dir, store_path))


def test_document_hashes_stable():
    assert document_fold(0, "bio", 7, 5) == document_fold(0, "bio", 7, 5)
    folds = [document_fold(0, "bio", i, 5) for i in range(500)]
    assert set(folds) == set(range(5))
    assert folds != [document_fold(1, "bio", i, 5) for i in range(500)]
    heldout = [document_split(0, "bio", i, 0.2) for i in range(2000)]
    assert 0.15 < np.mean(np.array(heldout) == HELDOUT_SPLIT) < 0.25
    assert all(document_split(0, "bio", i, 0.0) == TRAIN_SPLIT for i in range(100))


def test_harvest_metadata(clean_store: ActivationStore, tiny_model_dir: Path):
    metadata = ActivationStore.open(clean_store.path).metadata
    assert metadata.complete
    assert metadata.model == str(tiny_model_dir)
    assert metadata.layer == 1
    assert metadata.d_model == 32
    assert metadata.acts_dtype == "float32"
    assert metadata.bos_token_id == 1
    assert metadata.special_token_ids == [0, 1, 2, 3]
    assert [corpus["name"] for corpus in metadata.corpora] == ["quiz", "bio", "wiki"]
    assert [corpus["domain"] for corpus in metadata.corpora] == ["forget", "forget", "retain"]
    total = clean_store.n_tokens()
    counts = metadata.token_counts
    assert sum(counts["split"].values()) == total
    assert sum(counts["corpus"].values()) == total
    assert sum(n for folds in counts["domain"].values() for n in folds.values()) == total
    assert counts["split"]["heldout"] > 0


def test_special_tokens_excluded(clean_store: ActivationStore):
    for arrays in read_all(clean_store):
        assert not np.isin(arrays["token_ids"], [0, 1, 2, 3]).any()
        assert (arrays["contexts"][:, 0] == 1).all()
        assert (arrays["positions"] > 0).all()
        rows, positions = arrays["context_index"], arrays["positions"]
        np.testing.assert_array_equal(arrays["contexts"][rows, positions], arrays["token_ids"])


def test_contexts_never_mix_corpora_or_splits(clean_store: ActivationStore):
    for arrays in read_all(clean_store):
        rows = arrays["context_index"]
        np.testing.assert_array_equal(arrays["corpus"], arrays["context_corpus"][rows])
        np.testing.assert_array_equal(arrays["split"], arrays["context_split"][rows])
        np.testing.assert_array_equal(
            arrays["domain"], np.array([0, 0, 1], dtype=np.uint8)[arrays["corpus"]]
        )


def test_documents_round_trip(clean_store: ActivationStore, tiny_model_dir: Path, corpus_dir: Path):
    # Concatenating a document's stored tokens in store order gives its full tokenization,
    # and every token of a document has the document's fold and split.
    tokens: dict[tuple[int, int], list[int]] = defaultdict(list)
    labels: dict[tuple[int, int], set[tuple[int, int]]] = defaultdict(set)
    for arrays in read_all(clean_store):
        for corpus, doc, token, fold, split in zip(
            arrays["corpus"],
            arrays["doc_ids"],
            arrays["token_ids"],
            arrays["fold"],
            arrays["split"],
            strict=True,
        ):
            tokens[(int(corpus), int(doc))].append(int(token))
            labels[(int(corpus), int(doc))].add((int(fold), int(split)))

    tokenizer = load_tokenizer(str(tiny_model_dir))
    names = ["quiz", "bio", "wiki"]
    texts = {
        1: [
            json.loads(line)["text"] for line in (corpus_dir / "bio.jsonl").read_text().splitlines()
        ],
        2: [
            json.loads(line)["text"]
            for line in (corpus_dir / "wiki.jsonl").read_text().splitlines()
        ],
    }
    assert len([key for key in tokens if key[0] == 0]) == 10
    for corpus, corpus_texts in texts.items():
        for doc, text in enumerate(corpus_texts):
            assert tokens[(corpus, doc)] == tokenizer(text, add_special_tokens=False)["input_ids"]
    for (corpus, doc), seen in labels.items():
        expected_fold = document_fold(0, names[corpus], doc, 3)
        expected_split = document_split(0, names[corpus], doc, 0.25)
        assert seen == {(expected_fold, expected_split)}, f"corpus {names[corpus]} document {doc}"


def test_documents_separated_by_eos(clean_store: ActivationStore):
    n_boundaries = 0
    for arrays in read_all(clean_store):
        contexts = arrays["contexts"]
        for row in range(len(contexts)):
            mask = arrays["context_index"] == row
            positions = arrays["positions"][mask]
            docs = arrays["doc_ids"][mask]
            for before, after, position in zip(docs[:-1], docs[1:], positions[1:], strict=True):
                if before != after:
                    n_boundaries += 1
                    assert contexts[row, position - 1] == 2, (
                        f"row {row}: no EOS before position {position}"
                    )
                    assert position - 1 not in positions
    assert n_boundaries > 10


def test_acts_match_capture(clean_store: ActivationStore, tiny_model_dir: Path):
    loaded = load_model(str(tiny_model_dir), dtype="float32")
    for info in clean_store.shards[:3]:
        arrays = clean_store.read_shard(info.index, ALL_FIELDS)
        contexts = torch.from_numpy(arrays["contexts"]).long()
        # Padding (id 0) sits only at the end of a stream's last context and is masked out.
        mask = (contexts != 0).long()
        with torch.inference_mode():
            acts_CTD = capture_residual(loaded.model, 1, contexts, mask)
        expected = acts_CTD[arrays["context_index"], arrays["positions"]].numpy()
        np.testing.assert_allclose(arrays["acts"], expected, rtol=1e-5, atol=1e-5)


def test_norm_scale(clean_store: ActivationStore):
    squares, count = 0.0, 0
    for info in clean_store.shards:
        acts = clean_store.read_acts(info.index).astype(np.float64)
        train = clean_store.read_shard(info.index, ("split",))["split"] == TRAIN_SPLIT
        squares += float((acts[train] ** 2).sum())
        count += int(train.sum())
    assert clean_store.metadata.norm_scale == pytest.approx(
        math.sqrt(32 / (squares / count)), rel=1e-12
    )


def test_max_docs_and_max_tokens(tiny_model_dir: Path, corpus_dir: Path, tmp_path: Path):
    corpora = [
        CorpusSpec(name="bio", domain="forget", local=str(corpus_dir / "bio.jsonl"), max_docs=3),
        CorpusSpec(
            name="wiki", domain="retain", local=str(corpus_dir / "wiki.jsonl"), max_tokens=50
        ),
    ]
    store = run_harvest(
        make_config(
            tiny_model_dir, corpus_dir, tmp_path / "store", corpora=corpora, heldout_fraction=0.0
        )
    )
    counts = store.metadata.token_counts["corpus"]
    assert counts["bio"] == 10 + 13 + 16
    assert counts["wiki"] == 50
    docs = np.concatenate([a["doc_ids"][a["corpus"] == 0] for a in read_all(store)])
    assert set(docs.tolist()) == {0, 1, 2}


def test_plan_is_deterministic(tiny_model_dir: Path, corpus_dir: Path, tmp_path: Path):
    cfg = make_config(tiny_model_dir, corpus_dir, tmp_path / "store")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    first = list(iter_planned_shards(cfg, resolve_corpora(cfg), tokenizer))
    second = list(iter_planned_shards(cfg, resolve_corpora(cfg), tokenizer))
    assert len(first) == len(second) > 1
    for a, b in zip(first, second, strict=True):
        for field in dataclasses.fields(a):
            np.testing.assert_array_equal(getattr(a, field.name), getattr(b, field.name))
    assert all(len(shard.contexts_CT) == 8 for shard in first[:-1])


def test_config_hash_ignores_runtime_settings(
    tiny_model_dir: Path, corpus_dir: Path, tmp_path: Path
):
    cfg = make_config(tiny_model_dir, corpus_dir, tmp_path / "store")
    corpora = resolve_corpora(cfg)
    base = harvest_config_hash(cfg, 1, corpora)
    runtime = dataclasses.replace(cfg, batch_size=2, num_workers=2, store=str(tmp_path / "other"))
    assert harvest_config_hash(runtime, 1, corpora) == base
    assert harvest_config_hash(dataclasses.replace(cfg, context_size=32), 1, corpora) != base
    assert harvest_config_hash(dataclasses.replace(cfg, fold_seed=1), 1, corpora) != base
    assert harvest_config_hash(cfg, 0, corpora) != base


def test_changed_config_rejected(
    clean_store: ActivationStore, tiny_model_dir: Path, corpus_dir: Path
):
    cfg = make_config(tiny_model_dir, corpus_dir, clean_store.path, context_size=32)
    with pytest.raises(StoreError, match="pass overwrite=true"):
        run_harvest(cfg)


def test_complete_store_is_not_recomputed(
    clean_store: ActivationStore, tiny_model_dir: Path, corpus_dir: Path, monkeypatch, caplog
):
    def fail(*args, **kwargs):
        raise AssertionError("a complete store was harvested again")

    monkeypatch.setattr(harvest, "harvest_shard", fail)
    cfg = make_config(tiny_model_dir, corpus_dir, clean_store.path, batch_size=2)
    with caplog.at_level(logging.INFO, logger="pipeline.harvest"):
        store = run_harvest(cfg)
    assert store.metadata.complete
    assert "already complete" in caplog.text


def test_resume_after_kill(
    clean_store: ActivationStore,
    tiny_model_dir: Path,
    corpus_dir: Path,
    tmp_path: Path,
    monkeypatch,
    caplog,
):
    original = harvest.harvest_shard

    def killed_at_shard_3(model, layer, store_path, shard, *args):
        if shard.index == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(model, layer, store_path, shard, *args)

    cfg = make_config(tiny_model_dir, corpus_dir, tmp_path / "store")
    monkeypatch.setattr(harvest, "harvest_shard", killed_at_shard_3)
    with pytest.raises(KeyboardInterrupt):
        run_harvest(cfg)
    interrupted = ActivationStore.open(cfg.store, require_complete=False)
    assert not interrupted.metadata.complete
    # Shards of one window may run in any order, so shard 2 may or may not be done.
    done = [info.index for info in interrupted.shards]
    assert done[:2] == [0, 1]
    assert 3 not in done
    assert max(done) <= 3
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore.open(cfg.store)

    monkeypatch.setattr(harvest, "harvest_shard", original)
    with caplog.at_level(logging.INFO, logger="pipeline.harvest"):
        resumed = run_harvest(dataclasses.replace(cfg, batch_size=3))
    assert f"Skipped {len(done)} shard(s)" in caplog.text
    assert_stores_equal(resumed, clean_store)


def test_failed_write_leaves_no_shard(
    clean_store: ActivationStore,
    tiny_model_dir: Path,
    corpus_dir: Path,
    tmp_path: Path,
    monkeypatch,
):
    original = activations._write_text_atomic

    def fail_on_shard_marker(path: Path, text: str) -> None:
        if path.name == activations.COMPLETE_MARKER and "shard_00002" in str(path.parent):
            raise OSError("disk full")
        original(path, text)

    cfg = make_config(tiny_model_dir, corpus_dir, tmp_path / "store")
    monkeypatch.setattr(activations, "_write_text_atomic", fail_on_shard_marker)
    with pytest.raises(OSError, match="disk full"):
        run_harvest(cfg)
    shard_dir = Path(cfg.store) / "shards"
    names = sorted(entry.name for entry in shard_dir.iterdir())
    assert "shard_00002" not in names
    assert not [name for name in names if name.startswith(".tmp-")]
    assert names[:2] == ["shard_00000", "shard_00001"]
    assert set(names) <= {"shard_00000", "shard_00001", "shard_00003"}

    monkeypatch.setattr(activations, "_write_text_atomic", original)
    assert_stores_equal(run_harvest(cfg), clean_store)


def test_nan_reported_by_shard_and_row(
    tiny_model_dir: Path, corpus_dir: Path, tmp_path: Path, monkeypatch
):
    original = harvest.compute_shard_acts

    def nan_in_shard_2(loaded, layer, shard, *args):
        acts = original(loaded, layer, shard, *args)
        if shard.index == 2:
            acts[5, 3] = np.nan
        return acts

    monkeypatch.setattr(harvest, "compute_shard_acts", nan_in_shard_2)
    cfg = make_config(tiny_model_dir, corpus_dir, tmp_path / "store")
    with pytest.raises(StoreError, match=r"shard 2 of .* first at row 5"):
        run_harvest(cfg)
    assert not ActivationStore.open(cfg.store, require_complete=False).metadata.complete


def test_local_cluster_matches_local(
    clean_store: ActivationStore, tiny_model_dir: Path, corpus_dir: Path, tmp_path: Path
):
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        cfg = make_config(
            tiny_model_dir,
            corpus_dir,
            tmp_path / "store",
            scheduler_address=cluster.scheduler_address,
        )
        store = run_harvest(cfg)
    assert_stores_equal(store, clean_store)


def test_bfloat16_store(tiny_model_dir: Path, corpus_dir: Path, tmp_path: Path):
    cfg = make_config(
        tiny_model_dir,
        corpus_dir,
        tmp_path / "store",
        model=ModelConfig(name=str(tiny_model_dir), layer=0, dtype="bfloat16", device="cpu"),
    )
    store = run_harvest(cfg)
    assert store.metadata.acts_dtype == "bfloat16"
    assert store.read_shard(0, ("acts",))["acts"].dtype == np.uint16
    assert np.isfinite(store.read_acts(0)).all()
    assert store.metadata.norm_scale > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"context_size": 1}, "invalid context_size 1"),
        ({"batch_size": 0}, "invalid batch_size 0"),
        ({"heldout_fraction": 1.0}, "invalid heldout_fraction 1.0"),
        ({"corpora": []}, "corpora is empty"),
        (
            {
                "corpora": [
                    CorpusSpec(name="a", local="x.jsonl"),
                    CorpusSpec(name="a", local="y.jsonl"),
                ]
            },
            r"duplicate corpus names \['a'\]",
        ),
    ],
)
def test_invalid_config(
    tiny_model_dir: Path, corpus_dir: Path, tmp_path: Path, overrides: dict, message: str
):
    with pytest.raises(HarvestConfigError, match=message):
        run_harvest(make_config(tiny_model_dir, corpus_dir, tmp_path / "store", **overrides))


def test_layer_out_of_range_in_config(tiny_model_dir: Path, corpus_dir: Path, tmp_path: Path):
    cfg = make_config(
        tiny_model_dir,
        corpus_dir,
        tmp_path / "store",
        model=ModelConfig(name=str(tiny_model_dir), layer=3),
    )
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.2"):
        run_harvest(cfg)
    assert not (tmp_path / "store").exists()


def test_model_loaded_once_per_process(
    clean_store: ActivationStore,
    tiny_model_dir: Path,
    corpus_dir: Path,
    tmp_path: Path,
    monkeypatch,
):
    loads: list[str] = []
    original = harvest.load_model

    def counting_load_model(name: str, **kwargs):
        loads.append(name)
        return original(name, **kwargs)

    harvest.clear_model_cache()
    monkeypatch.setattr(harvest, "load_model", counting_load_model)
    store = run_harvest(make_config(tiny_model_dir, corpus_dir, tmp_path / "store", num_workers=2))
    assert len(store.shards) > 4
    assert loads == [str(tiny_model_dir)]
    assert_stores_equal(store, clean_store)


def test_blank_corpus_is_an_error(tiny_model_dir: Path, corpus_dir: Path, tmp_path: Path):
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "   "}])
    cfg = make_config(
        tiny_model_dir,
        corpus_dir,
        tmp_path / "store",
        corpora=[CorpusSpec(name="blank", kind="text", domain="retain", local=str(blank))],
    )
    with pytest.raises(HarvestError, match="corpus blank .* has 2 document\\(s\\) but no text"):
        run_harvest(cfg)


def test_malformed_last_corpus_fails_first(tiny_model_dir: Path, corpus_dir: Path, tmp_path: Path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "cut off\n', encoding="utf-8")
    cfg = make_config(tiny_model_dir, corpus_dir, tmp_path / "store")
    cfg.corpora.append(CorpusSpec(name="broken", kind="text", domain="retain", local=str(broken)))

    with pytest.raises(DataError, match="broken.jsonl, line 2"):
        run_harvest(cfg)

    # The check runs before the store is created, so no shard of the earlier corpora exists.
    assert not (tmp_path / "store").exists()
