"""Fold assignment of questions and held-out contexts, and per-fold firing rates.

Folds come from the harvest: each document of a corpus goes to fold
``document_fold(fold_seed, corpus, doc_index, n_folds)``, and a multiple-choice corpus
is harvested question by question, so a WMDP-bio question's document index is its
0-based position in the question file.

Firing rates for the selection of fold k use the forget tokens of every other fold and
the retain tokens of every fold. Exact rates come from one pass of the store's
train-split tokens through the SAE, counted per (corpus, fold), so every fold's rates
are sums of the same counts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evals.unlearning.loss import DOMAIN_NAMES
from evals.unlearning.selection import FiringRates, SelectionError
from pipeline.harvest import HELDOUT_SPLIT, TRAIN_SPLIT, document_fold
from stores.activations import ActivationStore, StoreMetadata
from stores.cache import CorrelationCache
from trainer.saes import BaseSAE

logger = logging.getLogger(__name__)


class FoldError(ValueError):
    """Folds that cannot be formed or used for a selection."""


# Questions and contexts


def question_folds(n_questions: int, fold_seed: int, corpus: str, n_folds: int) -> np.ndarray:
    """Return the fold of each question of a file, as the harvest assigns it to the question's index."""
    return np.array(
        [document_fold(fold_seed, corpus, index, n_folds) for index in range(n_questions)],
        dtype=np.int64,
    )


def heldout_contexts_by_fold(
    store: ActivationStore, n_folds: int, max_contexts: int, seed: int
) -> dict[int, dict[str, np.ndarray]]:
    """Return up to ``max_contexts`` held-out contexts ``[C, T]`` per fold and domain.

    A packed context can hold the end of one document and the start of the next, so it
    goes to the fold that most of its tokens belong to (the lower fold on a tie). Each
    context thus lands in exactly one fold. `count_shard_firing` counts train-split
    tokens only, so no held-out context enters the exact firing rates of any fold.
    """
    corpus_domains = [corpus.get("domain") for corpus in store.metadata.corpora]
    pieces: dict[tuple[int, str], list[np.ndarray]] = {}
    for info in store.shards:
        arrays = store.read_shard(
            info.index, ["context_index", "fold", "contexts", "context_corpus", "context_split"]
        )
        n_contexts = len(arrays["contexts"])
        # votes_CK[c, k]: tokens of context c that belong to fold k.
        votes_CK = np.zeros((n_contexts, n_folds), dtype=np.int64)
        np.add.at(votes_CK, (arrays["context_index"], arrays["fold"].astype(np.int64)), 1)
        context_fold_C = votes_CK.argmax(axis=1)
        usable_C = (arrays["context_split"] == HELDOUT_SPLIT) & (votes_CK.sum(axis=1) > 0)
        for context in np.flatnonzero(usable_C):
            corpus_index = int(arrays["context_corpus"][context])
            domain = corpus_domains[corpus_index] if corpus_index < len(corpus_domains) else None
            if domain not in DOMAIN_NAMES:
                raise FoldError(
                    f"store {store.path} has contexts of corpus index {corpus_index}, which metadata.corpora "
                    "does not describe with a forget or retain domain; the store is damaged"
                )
            key = (int(context_fold_C[context]), str(domain))
            pieces.setdefault(key, []).append(arrays["contexts"][context])

    contexts: dict[int, dict[str, np.ndarray]] = {}
    for fold in range(n_folds):
        generator = np.random.default_rng([seed, fold])
        contexts[fold] = {}
        for domain in DOMAIN_NAMES:
            rows = pieces.get((fold, domain), [])
            all_CT = (
                np.stack(rows)
                if rows
                else np.empty((0, store.metadata.context_size), dtype=np.int32)
            )
            if len(all_CT) > max_contexts:
                keep = np.sort(generator.choice(len(all_CT), size=max_contexts, replace=False))
                all_CT = all_CT[keep]
            contexts[fold][domain] = all_CT
    return contexts


# Exact firing counts from the store


@dataclass(frozen=True)
class FoldFiringCounts:
    """Firing counts of one SAE on a store's train-split tokens, per corpus and fold.

    Attributes:
        counts_CKF: float64 ``[corpora, folds, d_sae]``: tokens on which each latent fires.
        tokens_CK: int64 ``[corpora, folds]``: tokens counted.
        path: The store they were counted on.
    """

    counts_CKF: np.ndarray
    tokens_CK: np.ndarray
    path: str

    def __add__(self, other: FoldFiringCounts) -> FoldFiringCounts:
        if self.counts_CKF.shape != other.counts_CKF.shape:
            raise FoldError(
                f"cannot add firing counts of shapes {self.counts_CKF.shape} and {other.counts_CKF.shape}"
            )
        return FoldFiringCounts(
            self.counts_CKF + other.counts_CKF, self.tokens_CK + other.tokens_CK, self.path
        )


@torch.no_grad()
def count_shard_firing(
    store: ActivationStore,
    shard_index: int,
    sae: BaseSAE,
    norm_scale: float,
    *,
    batch_size: int = 4096,
    device: torch.device | str = "cpu",
) -> FoldFiringCounts:
    """Count, per corpus and fold, the train-split tokens of one shard on which each latent fires."""
    metadata = store.metadata
    n_corpora, n_folds, d_sae = len(metadata.corpora), metadata.n_folds, sae.cfg.d_sae
    counts_GF = torch.zeros((n_corpora * n_folds, d_sae), dtype=torch.float64, device=device)
    tokens_CK = np.zeros((n_corpora, n_folds), dtype=np.int64)

    labels = store.read_shard(shard_index, ["corpus", "fold", "split"])
    rows = np.flatnonzero(labels["split"] == TRAIN_SPLIT)
    if len(rows) == 0:
        return FoldFiringCounts(
            counts_GF.cpu().numpy().reshape(n_corpora, n_folds, d_sae), tokens_CK, str(store.path)
        )

    # One group per (corpus, fold) pair, so one index_add_ fills every bucket of a batch.
    group_N = labels["corpus"][rows].astype(np.int64) * n_folds + labels["fold"][rows].astype(
        np.int64
    )
    tokens_CK = np.bincount(group_N, minlength=n_corpora * n_folds).reshape(n_corpora, n_folds)
    acts_ND = store.read_acts(shard_index, rows)
    raw_space = sae.cfg.activation_space == "raw"
    for start in range(0, len(rows), batch_size):
        x_BD = torch.from_numpy(acts_ND[start : start + batch_size]).to(device)
        f_BF = sae.encode(x_BD if raw_space else x_BD * norm_scale)
        group_B = torch.from_numpy(group_N[start : start + batch_size]).to(device)
        counts_GF.index_add_(0, group_B, (f_BF > 0).double())
    return FoldFiringCounts(
        counts_GF.cpu().numpy().reshape(n_corpora, n_folds, d_sae), tokens_CK, str(store.path)
    )


def sum_counts(parts: Sequence[FoldFiringCounts]) -> FoldFiringCounts:
    """Sum the counts of several shards."""
    if not parts:
        raise FoldError("no shard was counted: the store has no complete shard")
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def corpus_domains(metadata: StoreMetadata) -> list[str]:
    """Return the domain (``forget`` or ``retain``) of each corpus of the store, in corpus order."""
    domains = [str(corpus.get("domain")) for corpus in metadata.corpora]
    invalid = [name for name in domains if name not in DOMAIN_NAMES]
    if invalid:
        raise FoldError(
            f"store corpora have domains {invalid}; every corpus must be 'forget' or 'retain'"
        )
    return domains


def other_folds(fold: int, n_folds: int) -> list[int]:
    """Return every fold of the store except ``fold``."""
    if not 0 <= fold < n_folds:
        raise FoldError(
            f"fold {fold} is out of range for a store with {n_folds} folds; use 0..{n_folds - 1}"
        )
    return [other for other in range(n_folds) if other != fold]


def fold_rates_from_counts(
    counts: FoldFiringCounts, domains: Sequence[str], fold: int
) -> FiringRates:
    """Return the firing rates that select the latents of ``fold``: forget on the other folds, retain on all."""
    n_corpora, n_folds, _ = counts.counts_CKF.shape
    if len(domains) != n_corpora:
        raise FoldError(
            f"the counts cover {n_corpora} corpora, but {len(domains)} domains were given"
        )
    forget_C = np.array([domain == "forget" for domain in domains])
    retain_C = np.array([domain == "retain" for domain in domains])
    train_folds = other_folds(fold, n_folds)

    forget_counts_F = counts.counts_CKF[forget_C][:, train_folds].sum(axis=(0, 1))
    n_forget = int(counts.tokens_CK[forget_C][:, train_folds].sum())
    retain_counts_F = counts.counts_CKF[retain_C].sum(axis=(0, 1))
    n_retain = int(counts.tokens_CK[retain_C].sum())
    if n_forget == 0 or n_retain == 0:
        raise SelectionError(
            f"store {counts.path} has {n_forget} forget train-split tokens in folds {train_folds} and "
            f"{n_retain} retain train-split tokens; the selection for fold {fold} needs both"
        )
    return FiringRates(
        forget_F=forget_counts_F / n_forget,
        retain_F=retain_counts_F / n_retain,
        n_forget_tokens=float(n_forget),
        n_retain_tokens=float(n_retain),
        source="store",
        path=counts.path,
    )


# Approximate firing rates from the correlation cache


def fold_rates_from_cache(
    cache_path: str | Path, sae: BaseSAE, metadata: StoreMetadata, fold: int
) -> FiringRates:
    """Return the selection's firing rates for ``fold`` from the correlation cache's fold buckets."""
    if not Path(cache_path).exists():
        raise FoldError(
            f"no correlation cache at {cache_path}: only masked variants write one; "
            "use firing_rates='store' to count exact rates from the activation store"
        )
    cache = CorrelationCache.load(
        cache_path,
        expected_model=None,
        expected_layer=metadata.layer,
        expected_d_model=sae.cfg.d_in,
        expected_d_sae=sae.cfg.d_sae,
    )
    if cache.n_folds != metadata.n_folds:
        raise FoldError(
            f"the correlation cache {cache_path} keeps {cache.n_folds} fold bucket(s) but the store has "
            f"{metadata.n_folds} folds; train with a per-fold cache, or use firing_rates='store'"
        )
    train_folds = other_folds(fold, metadata.n_folds)
    forget = cache.select(domains=["forget"], folds=train_folds)
    retain = cache.select(domains=["retain"])
    if float(forget.n) <= 0 or float(retain.n) <= 0:
        raise SelectionError(
            f"the correlation cache {cache_path} has forget token mass {float(forget.n):g} in folds {train_folds} "
            f"and retain token mass {float(retain.n):g}; use firing_rates='store'"
        )
    return FiringRates(
        forget_F=forget.firing_rate_F.cpu().numpy().astype(np.float64),
        retain_F=retain.firing_rate_F.cpu().numpy().astype(np.float64),
        n_forget_tokens=float(forget.n),
        n_retain_tokens=float(retain.n),
        source="cache",
        path=str(cache_path),
    )
