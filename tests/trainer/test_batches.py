"""Tests of BatchStream: determinism, resume without replay, selection, decoding, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stores.activations import ActivationStore, acts_to_float32
from tests.trainer.conftest import build_store
from trainer.batches import BatchError, BatchStream


def make_stream(store: ActivationStore, **overrides) -> BatchStream:
    options = {"batch_size": 40, "seed": 3, "shuffle_buffer_shards": 2}
    options.update(overrides)
    return BatchStream(store, **options)


def expected_rows(store: ActivationStore, shard: int, rows: np.ndarray) -> torch.Tensor:
    acts = store.read_shard(shard, ("acts",))["acts"][rows]
    return torch.from_numpy(acts_to_float32(acts, store.metadata.acts_dtype)) * store.metadata.norm_scale


def test_same_seed_same_batches(small_store):
    first = [batch.x_BD for _, batch in zip(range(12), make_stream(small_store), strict=False)]
    second = [batch.x_BD for _, batch in zip(range(12), make_stream(small_store), strict=False)]
    for step, (a_BD, b_BD) in enumerate(zip(first, second, strict=True)):
        assert torch.equal(a_BD, b_BD), step


def test_other_seed_other_order(small_store):
    a_BD = make_stream(small_store, seed=3).batch_at(0).x_BD
    b_BD = make_stream(small_store, seed=4).batch_at(0).x_BD
    assert not torch.equal(a_BD, b_BD)


def test_resume_matches_without_replay(small_store, monkeypatch):
    uninterrupted = [batch for _, batch in zip(range(15), make_stream(small_store), strict=False)]

    stream = make_stream(small_store)
    loaded_groups = []
    original = stream._load_group

    def spy(epoch, group):
        loaded_groups.append((epoch, group))
        return original(epoch, group)

    monkeypatch.setattr(stream, "_load_group", spy)
    resumed = stream.iter_from(11)
    for step in range(11, 15):
        batch = next(resumed)
        assert batch.step == step
        assert torch.equal(batch.x_BD, uninterrupted[step].x_BD), step
        assert np.array_equal(batch.row_B, uninterrupted[step].row_B), step

    # Steps 11..14 cover rows 440..599; the train rows per epoch are fewer than 300, so
    # only groups of epochs 1 and 2 may be read, never a group of epoch 0.
    assert loaded_groups
    assert all(epoch >= 1 for epoch, _ in loaded_groups), loaded_groups
    assert len(loaded_groups) <= 4


def test_epoch_visits_each_row_once(small_store):
    stream = make_stream(small_store, batch_size=1)
    seen = [(int(batch.shard_B[0]), int(batch.row_B[0])) for _, batch in zip(range(stream.rows_per_epoch), stream, strict=False)]
    assert len(set(seen)) == stream.rows_per_epoch

    expected = set()
    for info in small_store.shards:
        split = small_store.read_shard(info.index, ("split",))["split"]
        expected |= {(info.index, int(row)) for row in np.flatnonzero(split == 0)}
    assert set(seen) == expected


def test_batch_values_match_store(small_store):
    batch = make_stream(small_store).batch_at(5)
    for i in range(batch.x_BD.shape[0]):
        row_D = expected_rows(small_store, int(batch.shard_B[i]), np.array([batch.row_B[i]]))[0]
        assert torch.equal(batch.x_BD[i], row_D), i


def test_batches_are_normalized(small_store):
    stream = make_stream(small_store, batch_size=stream_rows(small_store))
    x_BD = stream.batch_at(0).x_BD
    mean_square_norm = x_BD.pow(2).sum(dim=1).mean().item()
    assert mean_square_norm == pytest.approx(small_store.metadata.d_model, rel=1e-4)


def stream_rows(store: ActivationStore) -> int:
    return make_stream(store).rows_per_epoch


def test_bfloat16_store_decoding(tmp_path):
    store = build_store(tmp_path / "bf16", acts_dtype="bfloat16")
    batch = make_stream(store).batch_at(2)
    for i in range(batch.x_BD.shape[0]):
        shard, row = int(batch.shard_B[i]), int(batch.row_B[i])
        bits = store.read_shard(shard, ("acts",))["acts"][row]
        via_torch_D = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float()
        assert torch.equal(batch.x_BD[i], via_torch_D * store.metadata.norm_scale), i


def test_corpus_and_domain_filters(small_store):
    for corpora, domains, expected_corpus in ((["wiki"], None, 1), (None, ["forget"], 0)):
        stream = make_stream(small_store, corpora=corpora, domains=domains)
        for _, batch in zip(range(8), stream, strict=False):
            assert (batch.corpus_B == expected_corpus).all()
            for shard, row in zip(batch.shard_B, batch.row_B, strict=True):
                labels = small_store.read_shard(int(shard), ("corpus", "split"))
                assert labels["corpus"][row] == expected_corpus
                assert labels["split"][row] == 0


def test_exclude_folds_filter(small_store):
    stream = make_stream(small_store, exclude_folds=[0])
    seen_folds = set()
    for _, batch in zip(range(8), stream, strict=False):
        for shard, row in zip(batch.shard_B, batch.row_B, strict=True):
            seen_folds.add(int(small_store.read_shard(int(shard), ("fold",))["fold"][row]))
    assert seen_folds
    assert not seen_folds & {0}
    full_rows = make_stream(small_store).rows_per_epoch
    assert stream.rows_per_epoch < full_rows


def test_exclude_folds_out_of_range(small_store):
    n_folds = small_store.metadata.n_folds
    with pytest.raises(BatchError, match=f"invalid exclude_folds \\[{n_folds}\\]"):
        make_stream(small_store, exclude_folds=[n_folds])


def test_heldout_split(small_store):
    stream = make_stream(small_store, split="heldout", batch_size=4)
    batch = stream.batch_at(0)
    for shard, row in zip(batch.shard_B, batch.row_B, strict=True):
        assert small_store.read_shard(int(shard), ("split",))["split"][row] == 1


def test_empty_selection_error(tmp_path):
    store = build_store(tmp_path / "no_heldout", split_fn=lambda doc_ids: np.zeros(len(doc_ids), dtype=np.uint8))
    with pytest.raises(BatchError, match="no tokens in store .* split='heldout'"):
        make_stream(store, split="heldout")


def test_unknown_corpus_and_domain(small_store):
    with pytest.raises(BatchError, match="corpus 'pile' is not in this store"):
        make_stream(small_store, corpora=["pile"])
    with pytest.raises(BatchError, match="unknown domain"):
        make_stream(small_store, domains=["chemistry"])


def test_d_model_mismatch_error(small_store):
    with pytest.raises(BatchError, match="d_model 16, but the SAE's d_in is 32"):
        make_stream(small_store, expected_d_in=32)


def test_nan_names_shard_and_row(tmp_path):
    def acts_with_nan(rng, n_rows, d_model):
        acts = rng.normal(size=(n_rows, d_model)).astype(np.float32)
        acts[17, 3] = np.nan
        return acts

    store = build_store(tmp_path / "nan", n_shards=1, acts_fn=acts_with_nan, split_fn=lambda d: np.zeros(len(d), dtype=np.uint8))
    stream = make_stream(store, batch_size=96)
    with pytest.raises(BatchError, match="NaN or Inf activations in shard 0, row 17 "):
        stream.batch_at(0)


def test_labels_on_batch(small_store):
    batch = make_stream(small_store).batch_at(1)
    assert batch.domain_B.dtype == torch.int64
    assert batch.domain_B.shape == (40,)
    for i, (shard, row) in enumerate(zip(batch.shard_B, batch.row_B, strict=True)):
        labels = small_store.read_shard(int(shard), ("domain", "fold"))
        assert batch.domain_B[i].item() == labels["domain"][row]
        assert batch.fold_B[i].item() == labels["fold"][row]
