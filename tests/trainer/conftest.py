"""Tiny activation stores written through the store API, for the trainer tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stores.activations import (
    ActivationStore,
    StoreMetadata,
    create_store,
    float32_to_bfloat16_bits,
)
from trainer.config import TrainConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONTEXT_SIZE = 8
CORPORA = [
    {"name": "bio", "source": "synthetic", "domain": "forget", "kind": "text"},
    {"name": "wiki", "source": "synthetic", "domain": "retain", "kind": "text"},
]


def random_acts(rng: np.random.Generator, n_rows: int, d_model: int) -> np.ndarray:
    """Gaussian activations with a non-zero mean and scale, so that normalization matters."""
    return (rng.normal(size=(n_rows, d_model)) * 3.0 + 1.5).astype(np.float32)


def sparse_feature_acts(
    rng: np.random.Generator, n_rows: int, d_model: int, n_features: int = 32, active: int = 3
) -> np.ndarray:
    """Activations that are sparse sums of `n_features` fixed unit directions plus an offset.

    Each row adds `active` random directions with magnitudes in [1, 3], so an SAE with
    enough latents can reconstruct the rows almost exactly. The directions come from a
    fixed seed so that every shard shares them.
    """
    directions_KD = np.random.default_rng(1234).normal(size=(n_features, d_model))
    directions_KD /= np.linalg.norm(directions_KD, axis=1, keepdims=True)
    offset_D = np.random.default_rng(4321).normal(size=d_model)
    codes_NK = np.zeros((n_rows, n_features))
    for row in range(n_rows):
        chosen = rng.choice(n_features, size=active, replace=False)
        codes_NK[row, chosen] = rng.uniform(1.0, 3.0, size=active)
    return (codes_NK @ directions_KD + offset_D).astype(np.float32)


def build_store(
    path: Path,
    *,
    n_shards: int = 3,
    rows_per_shard: int = 96,
    d_model: int = 16,
    acts_dtype: str = "float32",
    seed: int = 0,
    acts_fn: Callable[[np.random.Generator, int, int], np.ndarray] = random_acts,
    split_fn: Callable[[np.ndarray], np.ndarray] | None = None,
) -> ActivationStore:
    """Write a complete store of `n_shards` shards with random labels and return it.

    Rows alternate between the two corpora (even rows "bio"/forget, odd rows
    "wiki"/retain). `split_fn(doc_ids) -> split codes` sets the split (default: every
    tenth document held out). The store's norm_scale is computed from its train rows.
    """
    rng = np.random.default_rng(seed)
    metadata = StoreMetadata(
        model="synthetic",
        layer=0,
        d_model=d_model,
        acts_dtype=acts_dtype,
        context_size=CONTEXT_SIZE,
        n_folds=2,
        corpora=[dict(corpus) for corpus in CORPORA],
        config_hash=f"test-{seed}",
    )
    store = create_store(path, metadata)

    sum_squares = 0.0
    n_train = 0
    for index in range(n_shards):
        n = rows_per_shard
        acts = acts_fn(rng, n, d_model)
        doc_ids = (index * n + np.arange(n)) // 4
        split = split_fn(doc_ids) if split_fn is not None else (doc_ids % 10 == 9).astype(np.uint8)
        corpus = (np.arange(n) % 2).astype(np.uint8)
        n_contexts = max(1, n // CONTEXT_SIZE)
        arrays = {
            "acts": float32_to_bfloat16_bits(acts) if acts_dtype == "bfloat16" else acts,
            "token_ids": rng.integers(0, 256, size=n).astype(np.int32),
            "doc_ids": doc_ids.astype(np.int64),
            "positions": (np.arange(n) % CONTEXT_SIZE).astype(np.int32),
            "context_index": np.minimum(np.arange(n) // CONTEXT_SIZE, n_contexts - 1).astype(
                np.int32
            ),
            "domain": corpus.copy(),
            "corpus": corpus,
            "fold": (doc_ids % 2).astype(np.uint8),
            "split": split.astype(np.uint8),
            "contexts": rng.integers(0, 256, size=(n_contexts, CONTEXT_SIZE)).astype(np.int32),
            "context_corpus": np.zeros(n_contexts, dtype=np.uint8),
            "context_split": np.zeros(n_contexts, dtype=np.uint8),
        }
        store.write_shard(index, arrays)
        # Rows with NaN or Inf (planted by a test) stay out of the norm statistics.
        train_rows = acts[(split == 0) & np.isfinite(acts).all(axis=1)].astype(np.float64)
        sum_squares += float((train_rows**2).sum())
        n_train += len(train_rows)

    norm_scale = float(np.sqrt(d_model * n_train / sum_squares)) if n_train else 1.0
    store.finalize(
        norm_scale, {"split": {"train": n_train, "heldout": n_shards * rows_per_shard - n_train}}
    )
    return ActivationStore.open(path)


@pytest.fixture
def small_store(tmp_path: Path) -> ActivationStore:
    """Three float32 shards of 96 Gaussian rows, d_model 16."""
    return build_store(tmp_path / "store")


@pytest.fixture
def sparse_store(tmp_path: Path) -> ActivationStore:
    """Four float32 shards of 512 rows built from 32 sparse feature directions, d_model 16."""
    return build_store(
        tmp_path / "sparse_store", n_shards=4, rows_per_shard=512, acts_fn=sparse_feature_acts
    )


def tiny_train_config(store: ActivationStore, tmp_path: Path, **overrides: Any) -> TrainConfig:
    """A TrainConfig for a tiny store: 32 latents, a few steps, frequent checkpoints, no progress bar."""
    values: dict[str, Any] = dict(
        store=str(store.path),
        runs_dir=str(tmp_path / "runs"),
        run_name="run",
        d_sae=32,
        l1_coefficient=0.5,
        l1_warmup_steps=5,
        lr=1e-2,
        lr_warmup_steps=3,
        lr_decay_steps=5,
        batch_size=64,
        total_tokens=64 * 30,
        checkpoint_every=5,
        keep_checkpoints=10,
        log_every=5,
        dead_window=256,
        progress_bar=False,
    )
    values.update(overrides)
    return TrainConfig(**values)
