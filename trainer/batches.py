"""Shuffled training batches of normalized activations, read shard group by shard group.

The stream is an endless sequence of rows: epoch after epoch, each epoch visits the
selected rows of every shard once. In epoch `e` the shards are permuted with a
generator seeded by `(seed, e)`, cut into groups of `shuffle_buffer_shards` shards,
and the rows of each group are permuted with a generator seeded by `(seed, e, group)`.
Batch `t` is rows `[t * batch_size, (t + 1) * batch_size)` of that sequence, so it is a
pure function of `(seed, t)`: resuming at step `t` locates its group by arithmetic on
the per-shard row counts and loads only that group. A batch may span two groups or two
epochs. Only one group is in memory at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stores.activations import SPLITS, ActivationStore, ShardInfo, StoreError

logger = logging.getLogger(__name__)

# Arrays read with the activations; `split`, `domain` and `corpus` also select rows.
LABEL_FIELDS = ("split", "domain", "corpus", "fold")

# Tags that keep the two kinds of generator seeds apart.
_SHARD_ORDER_TAG = 0
_ROW_ORDER_TAG = 1


class BatchError(ValueError):
    """A batch stream that cannot produce valid batches (no rows, bad values, wrong width)."""


@dataclass
class Batch:
    """One training batch.

    step: the 0-based training step the batch belongs to.
    x_BD: activations multiplied by the store's norm_scale, on the stream's device.
    domain_B, corpus_B, fold_B: per-token labels (int64, on the stream's device).
    shard_B, row_B: shard index and row within the shard of each token, for messages.
    """

    step: int
    x_BD: torch.Tensor
    domain_B: torch.Tensor
    corpus_B: torch.Tensor
    fold_B: torch.Tensor
    shard_B: np.ndarray
    row_B: np.ndarray


@dataclass
class _Group:
    """The selected rows of one shard group, already in their shuffled order."""

    acts_ND: np.ndarray
    shard_N: np.ndarray
    row_N: np.ndarray
    labels: dict[str, np.ndarray]


class BatchStream:
    """A deterministic, resumable stream of shuffled batches from an activation store.

    Args:
        store: a complete activation store (its metadata contains norm_scale).
        batch_size: tokens per batch.
        seed: seed of the data order (a non-negative integer).
        split: "train" or "heldout".
        domains: domain names to keep (e.g. ["retain"]); None or empty keeps all.
        corpora: corpus names to keep; None or empty keeps all.
        exclude_folds: folds whose tokens are left out (cross-validation with one SAE
            per fold); None or empty keeps all.
        shuffle_buffer_shards: shards loaded and shuffled together.
        device, dtype: where and in which dtype batches are returned.
        expected_d_in: when given, the store's d_model must equal it (the SAE's d_in).
    """

    def __init__(
        self,
        store: ActivationStore,
        batch_size: int,
        seed: int,
        split: str = "train",
        domains: Sequence[str] | None = None,
        corpora: Sequence[str] | None = None,
        *,
        exclude_folds: Sequence[int] | None = None,
        shuffle_buffer_shards: int = 4,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        expected_d_in: int | None = None,
    ) -> None:
        metadata = store.metadata
        if batch_size < 1:
            raise BatchError(f"invalid batch_size {batch_size}: it must be a positive integer")
        if seed < 0:
            raise BatchError(f"invalid seed {seed}: it must be a non-negative integer")
        if shuffle_buffer_shards < 1:
            raise BatchError(f"invalid shuffle_buffer_shards {shuffle_buffer_shards}: it must be >= 1")
        if expected_d_in is not None and metadata.d_model != expected_d_in:
            raise BatchError(
                f"store {store.path} has d_model {metadata.d_model}, but the SAE's d_in is {expected_d_in}; "
                "train on a store of the same model and layer, or build the SAE with d_in = the store's d_model"
            )
        if metadata.norm_scale is None or not metadata.complete:
            raise BatchError(
                f"store {store.path} is not finalized (no norm_scale); finish the harvest before training on it"
            )
        if split not in SPLITS:
            raise BatchError(f"invalid split {split!r}: choose one of {', '.join(SPLITS)}")

        self.store = store
        self.batch_size = batch_size
        self.seed = seed
        self.split = split
        self.domains = list(domains or [])
        self.corpora = list(corpora or [])
        self.exclude_folds = sorted(set(exclude_folds or []))
        invalid_folds = [fold for fold in self.exclude_folds if not 0 <= fold < metadata.n_folds]
        if invalid_folds:
            raise BatchError(
                f"invalid exclude_folds {invalid_folds}: the store has folds 0 to {metadata.n_folds - 1}"
            )
        self.shuffle_buffer_shards = shuffle_buffer_shards
        self.device = torch.device(device)
        self.dtype = dtype
        self.norm_scale = float(metadata.norm_scale)

        self._split_code = SPLITS.index(split)
        self._domain_codes = self._resolve_domains(self.domains)
        self._corpus_codes = self._resolve_corpora(self.corpora)
        self.shards: list[ShardInfo] = store.shards
        if not self.shards:
            raise BatchError(f"store {store.path} has no complete shards; run or resume the harvest")

        self.shard_rows = np.array([self._count_selected(info) for info in self.shards], dtype=np.int64)
        self.rows_per_epoch = int(self.shard_rows.sum())
        if self.rows_per_epoch == 0:
            raise BatchError(
                f"no tokens in store {store.path} match split={split!r}, domains={self.domains or 'all'}, "
                f"corpora={self.corpora or 'all'}, exclude_folds={self.exclude_folds or 'none'}; the store's token counts are {metadata.token_counts}. "
                "Choose a split, domain or corpus that holds tokens"
            )
        if self.rows_per_epoch < batch_size:
            logger.warning(
                "Only %d tokens match the selection, fewer than batch_size %d: every batch repeats tokens",
                self.rows_per_epoch,
                batch_size,
            )
        self._epoch_layouts: dict[int, tuple[list[np.ndarray], np.ndarray]] = {}

    # Row selection.

    def _resolve_domains(self, names: list[str]) -> np.ndarray | None:
        if not names:
            return None
        known = list(self.store.metadata.domains)
        unknown = [name for name in names if name not in known]
        if unknown:
            raise BatchError(f"unknown domain(s) {unknown}; the store's domains are {known}")
        return np.array([known.index(name) for name in names], dtype=np.uint8)

    def _resolve_corpora(self, names: list[str]) -> np.ndarray | None:
        if not names:
            return None
        try:
            codes = [self.store.metadata.corpus_index(name) for name in names]
        except StoreError as error:
            raise BatchError(str(error)) from error
        return np.array(codes, dtype=np.uint8)

    def _select(self, labels: dict[str, np.ndarray]) -> np.ndarray:
        """Return a boolean mask of the rows matching split, domains and corpora."""
        keep_N = labels["split"] == self._split_code
        if self._domain_codes is not None:
            keep_N &= np.isin(labels["domain"], self._domain_codes)
        if self._corpus_codes is not None:
            keep_N &= np.isin(labels["corpus"], self._corpus_codes)
        if self.exclude_folds:
            keep_N &= ~np.isin(labels["fold"], np.array(self.exclude_folds, dtype=np.uint8))
        return keep_N

    def _count_selected(self, info: ShardInfo) -> int:
        labels = self.store.read_shard(info.index, LABEL_FIELDS)
        return int(self._select(labels).sum())

    # Data order.

    def _epoch_layout(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Return the epoch's shard groups (positions in `self.shards`) and their row-count ends."""
        if epoch not in self._epoch_layouts:
            rng = np.random.default_rng([self.seed, _SHARD_ORDER_TAG, epoch, 0])
            order = rng.permutation(len(self.shards))
            groups = [order[i : i + self.shuffle_buffer_shards] for i in range(0, len(order), self.shuffle_buffer_shards)]
            ends = np.cumsum([self.shard_rows[group].sum() for group in groups])
            # Only the current and the next epoch are ever needed.
            self._epoch_layouts = {key: value for key, value in self._epoch_layouts.items() if key >= epoch - 1}
            self._epoch_layouts[epoch] = (groups, ends)
        return self._epoch_layouts[epoch]

    def locate(self, position: int) -> tuple[int, int, int]:
        """Return `(epoch, group, offset in group)` of row `position` of the endless sequence."""
        epoch, within = divmod(position, self.rows_per_epoch)
        _, ends = self._epoch_layout(epoch)
        group = int(np.searchsorted(ends, within, side="right"))
        start = int(ends[group - 1]) if group > 0 else 0
        return epoch, group, within - start

    def _load_group(self, epoch: int, group: int) -> _Group:
        groups, _ = self._epoch_layout(epoch)
        acts_parts, shard_parts, row_parts = [], [], []
        label_parts: dict[str, list[np.ndarray]] = {name: [] for name in LABEL_FIELDS}
        for position in groups[group]:
            info = self.shards[position]
            arrays = self.store.read_shard(info.index, ("acts", *LABEL_FIELDS))
            if arrays["acts"].ndim != 2 or arrays["acts"].shape[1] != self.store.metadata.d_model:
                raise BatchError(
                    f"shard {info.index} of {self.store.path} has acts of shape {arrays['acts'].shape}, "
                    f"but the store's d_model is {self.store.metadata.d_model}; the store is damaged, harvest it again"
                )
            rows_N = np.flatnonzero(self._select(arrays))
            acts_parts.append(arrays["acts"][rows_N])
            shard_parts.append(np.full(len(rows_N), info.index, dtype=np.int64))
            row_parts.append(rows_N.astype(np.int64))
            for name in LABEL_FIELDS:
                label_parts[name].append(arrays[name][rows_N])

        rng = np.random.default_rng([self.seed, _ROW_ORDER_TAG, epoch, group])
        order_N = rng.permutation(sum(len(rows) for rows in row_parts))
        return _Group(
            acts_ND=np.concatenate(acts_parts)[order_N],
            shard_N=np.concatenate(shard_parts)[order_N],
            row_N=np.concatenate(row_parts)[order_N],
            labels={name: np.concatenate(parts)[order_N] for name, parts in label_parts.items()},
        )

    # Batches.

    def _to_tensor(self, acts_BD: np.ndarray) -> torch.Tensor:
        """Decode stored activations to float32 and normalize them."""
        if self.store.metadata.acts_dtype == "bfloat16":
            x_BD = torch.from_numpy(np.ascontiguousarray(acts_BD).view(np.int16)).view(torch.bfloat16).float()
        else:
            x_BD = torch.from_numpy(np.ascontiguousarray(acts_BD, dtype=np.float32))
        return x_BD * self.norm_scale

    def _check_finite(self, x_BD: torch.Tensor, shard_B: np.ndarray, row_B: np.ndarray) -> None:
        finite_B = torch.isfinite(x_BD).all(dim=1)
        if bool(finite_B.all()):
            return
        first = int(torch.nonzero(~finite_B)[0, 0])
        raise BatchError(
            f"NaN or Inf activations in shard {int(shard_B[first])}, row {int(row_B[first])} of store "
            f"{self.store.path} ({int((~finite_B).sum())} bad row(s) in this batch); "
            "run ActivationStore.check_finite on the store's shards and harvest again in float32"
        )

    def _build_batch(self, step: int, parts: list[tuple[_Group, int, int]]) -> Batch:
        acts_BD = np.concatenate([group.acts_ND[start:stop] for group, start, stop in parts])
        shard_B = np.concatenate([group.shard_N[start:stop] for group, start, stop in parts])
        row_B = np.concatenate([group.row_N[start:stop] for group, start, stop in parts])
        x_BD = self._to_tensor(acts_BD)
        self._check_finite(x_BD, shard_B, row_B)

        labels = {
            name: torch.from_numpy(np.concatenate([group.labels[name][start:stop] for group, start, stop in parts]).astype(np.int64))
            for name in ("domain", "corpus", "fold")
        }
        return Batch(
            step=step,
            x_BD=x_BD.to(device=self.device, dtype=self.dtype),
            domain_B=labels["domain"].to(self.device),
            corpus_B=labels["corpus"].to(self.device),
            fold_B=labels["fold"].to(self.device),
            shard_B=shard_B,
            row_B=row_B,
        )

    def iter_from(self, step: int = 0) -> Iterator[Batch]:
        """Yield the batches of steps `step, step + 1, ...` without end."""
        if step < 0:
            raise BatchError(f"invalid step {step}: it must be >= 0")
        position = step * self.batch_size
        loaded_key: tuple[int, int] | None = None
        loaded: _Group | None = None
        while True:
            parts: list[tuple[_Group, int, int]] = []
            needed = self.batch_size
            while needed > 0:
                epoch, group, offset = self.locate(position)
                if loaded_key != (epoch, group):
                    # Release the previous group before reading the next. A batch that spans
                    # both keeps the previous one alive until it is built.
                    loaded = None
                    loaded = self._load_group(epoch, group)
                    loaded_key = (epoch, group)
                assert loaded is not None
                n_rows_taken = min(needed, len(loaded.row_N) - offset)
                parts.append((loaded, offset, offset + n_rows_taken))
                position += n_rows_taken
                needed -= n_rows_taken
            yield self._build_batch(step, parts)
            step += 1

    def batch_at(self, step: int) -> Batch:
        """Return the batch of training step `step`, loading only the groups it spans."""
        return next(self.iter_from(step))

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)
