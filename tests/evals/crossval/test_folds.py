"""Fold assignment, per-fold firing counts and the selection's use of the other folds only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from evals.crossval.folds import (
    FoldError,
    FoldFiringCounts,
    corpus_domains,
    count_shard_firing,
    fold_rates_from_cache,
    fold_rates_from_counts,
    heldout_contexts_by_fold,
    question_folds,
    sum_counts,
)
from evals.unlearning.selection import SelectionError, select_latents
from pipeline.harvest import HELDOUT_SPLIT
from stores.cache import CorrelationCache
from tests.evals.unlearning.conftest import identity_sae

D_SAE = 8


def crafted_counts(n_folds: int = 3) -> FoldFiringCounts:
    """Corpus 0 forget, corpus 1 retain, 100 tokens per (corpus, fold).

    Latent 3 fires on 30% of the forget tokens of every fold, latent 5 on none, and
    no latent fires on retain tokens.
    """
    counts_CKF = np.zeros((2, n_folds, D_SAE))
    counts_CKF[0, :, 3] = 30.0
    return FoldFiringCounts(counts_CKF, np.full((2, n_folds), 100, dtype=np.int64), "crafted")


def test_rates_ignore_own_fold() -> None:
    base = crafted_counts()
    # Fold 0's own forget tokens make latent 5 the most forget-specific latent.
    planted_CKF = base.counts_CKF.copy()
    planted_CKF[0, 0, 5] = 100.0
    planted = FoldFiringCounts(planted_CKF, base.tokens_CK, "planted")
    domains = ["forget", "retain"]

    rates_fold0 = fold_rates_from_counts(planted, domains, 0)
    rates_fold1 = fold_rates_from_counts(planted, domains, 1)

    np.testing.assert_array_equal(
        rates_fold0.forget_F, fold_rates_from_counts(base, domains, 0).forget_F
    )
    # Pooled over every fold, latent 5 (100 of 300 tokens) would beat latent 3 (90 of 300).
    pooled_F = planted_CKF[0].sum(axis=0) / 300
    assert select_latents(pooled_F, np.zeros(D_SAE), 0.01, 1).tolist() == [5]
    assert select_latents(rates_fold0.forget_F, rates_fold0.retain_F, 0.01, 1).tolist() == [3]
    # The other folds' selection does see fold 0, where latent 5 wins.
    assert select_latents(rates_fold1.forget_F, rates_fold1.retain_F, 0.01, 1).tolist() == [5]


def test_rates_token_mass() -> None:
    rates = fold_rates_from_counts(crafted_counts(), ["forget", "retain"], 2)

    assert rates.n_forget_tokens == 200.0
    assert rates.n_retain_tokens == 300.0
    assert rates.forget_F[3] == pytest.approx(0.3)
    assert rates.source == "store"


def test_rates_without_forget_tokens_raise() -> None:
    counts = crafted_counts()
    empty = FoldFiringCounts(counts.counts_CKF, np.array([[0, 0, 100], [100, 100, 100]]), "crafted")

    # Fold 2 is the only one with forget tokens, so its selection has none.
    with pytest.raises(SelectionError, match="fold 2"):
        fold_rates_from_counts(empty, ["forget", "retain"], 2)


def test_rates_fold_out_of_range() -> None:
    with pytest.raises(FoldError, match="out of range"):
        fold_rates_from_counts(crafted_counts(), ["forget", "retain"], 3)


def test_question_folds_match_harvest(crossval_setup: dict) -> None:
    store = crossval_setup["store"]
    metadata = store.metadata
    expected_Q = question_folds(
        crossval_setup["n_wmdp"], metadata.fold_seed, "wmdp-bio", metadata.n_folds
    )
    wmdp_corpus = metadata.corpus_index("wmdp-bio")

    seen = set()
    for info in store.shards:
        arrays = store.read_shard(info.index, ["corpus", "doc_ids", "fold"])
        rows = arrays["corpus"] == wmdp_corpus
        for doc_id, fold in zip(arrays["doc_ids"][rows], arrays["fold"][rows], strict=True):
            assert expected_Q[doc_id] == fold, f"question {doc_id}"
            seen.add(int(doc_id))
    assert len(seen) == crossval_setup["n_wmdp"]
    assert set(expected_Q.tolist()) == {0, 1}


def test_count_firing_matches_bruteforce(crossval_setup: dict) -> None:
    store = crossval_setup["store"]
    metadata = store.metadata
    sae = identity_sae(metadata.norm_scale, store.path)
    counts = sum_counts(
        [
            count_shard_firing(store, info.index, sae, metadata.norm_scale, batch_size=7)
            for info in store.shards
        ]
    )

    expected_CKF = np.zeros_like(counts.counts_CKF)
    expected_CK = np.zeros_like(counts.tokens_CK)
    for info in store.shards:
        arrays = store.read_shard(info.index, ["corpus", "fold", "split"])
        acts_ND = store.read_acts(info.index)
        fires_NF = np.concatenate([acts_ND > 0, acts_ND < 0], axis=1)
        for row in np.flatnonzero(arrays["split"] == 0):
            expected_CKF[arrays["corpus"][row], arrays["fold"][row]] += fires_NF[row]
            expected_CK[arrays["corpus"][row], arrays["fold"][row]] += 1

    np.testing.assert_array_equal(counts.counts_CKF, expected_CKF)
    np.testing.assert_array_equal(counts.tokens_CK, expected_CK)
    assert corpus_domains(metadata) == ["forget", "retain"]


def test_heldout_contexts_partition(crossval_setup: dict) -> None:
    store = crossval_setup["store"]
    contexts = heldout_contexts_by_fold(store, store.metadata.n_folds, max_contexts=1000, seed=0)

    assigned = {}
    for fold, by_domain in contexts.items():
        for domain, contexts_CT in by_domain.items():
            for context in contexts_CT:
                assert context.tobytes() not in assigned
                assigned[context.tobytes()] = (fold, domain)

    n_heldout = 0
    for info in store.shards:
        arrays = store.read_shard(
            info.index, ["contexts", "context_split", "context_index", "fold"]
        )
        for index in np.flatnonzero(arrays["context_split"] == HELDOUT_SPLIT):
            folds = arrays["fold"][arrays["context_index"] == index]
            majority = int(np.bincount(folds, minlength=2).argmax())
            assert assigned[arrays["contexts"][index].tobytes()][0] == majority
            n_heldout += 1
    assert len(assigned) == n_heldout
    assert all(len(contexts[fold]["forget"]) > 0 for fold in contexts)


def test_heldout_contexts_capped(crossval_setup: dict) -> None:
    store = crossval_setup["store"]
    first = heldout_contexts_by_fold(store, store.metadata.n_folds, max_contexts=1, seed=3)
    again = heldout_contexts_by_fold(store, store.metadata.n_folds, max_contexts=1, seed=3)

    for fold in first:
        for domain in first[fold]:
            assert len(first[fold][domain]) <= 1
            np.testing.assert_array_equal(first[fold][domain], again[fold][domain])


def write_fold_cache(path: Path, sae, n_folds: int) -> None:
    """A cache where latent 1 fires on forget tokens of fold 0 only and latent 0 on every forget token."""
    cache = CorrelationCache(sae.cfg.d_in, sae.cfg.d_sae, n_folds, model="tiny", layer=0)
    for fold in range(n_folds):
        x_BD = torch.randn(10, sae.cfg.d_in)
        f_BF = torch.zeros(10, sae.cfg.d_sae)
        f_BF[:, 0] = 1.0
        if fold == 0:
            f_BF[:, 1] = 1.0
        cache.update(x_BD, f_BF, torch.zeros(10, dtype=torch.long), torch.full((10,), fold))
        cache.update(
            x_BD, torch.zeros_like(f_BF), torch.ones(10, dtype=torch.long), torch.full((10,), fold)
        )
    cache.save(path)


def test_cache_rates_exclude_own_fold(crossval_setup: dict, tmp_path: Path) -> None:
    metadata = crossval_setup["store"].metadata
    sae = identity_sae(metadata.norm_scale)
    write_fold_cache(tmp_path / "cache.zarr", sae, metadata.n_folds)

    rates_fold0 = fold_rates_from_cache(tmp_path / "cache.zarr", sae, metadata, 0)
    rates_fold1 = fold_rates_from_cache(tmp_path / "cache.zarr", sae, metadata, 1)

    assert rates_fold0.forget_F[1] == 0.0
    assert rates_fold1.forget_F[1] == pytest.approx(1.0)
    assert rates_fold0.forget_F[0] == pytest.approx(1.0)
    assert rates_fold0.source == "cache"


def test_cache_missing_or_without_folds(crossval_setup: dict, tmp_path: Path) -> None:
    metadata = crossval_setup["store"].metadata
    sae = identity_sae(metadata.norm_scale)
    with pytest.raises(FoldError, match="no correlation cache"):
        fold_rates_from_cache(tmp_path / "missing.zarr", sae, metadata, 0)

    CorrelationCache(sae.cfg.d_in, sae.cfg.d_sae, None, model="tiny", layer=0).save(
        tmp_path / "one.zarr"
    )
    with pytest.raises(FoldError, match="fold bucket"):
        fold_rates_from_cache(tmp_path / "one.zarr", sae, metadata, 0)
