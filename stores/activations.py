"""Zarr v3 activation stores: one layer's residual stream, sharded, with per-token labels.

A store is a directory with ``metadata.json`` and one Zarr group per shard under
``shards/``. A shard is written under a temporary name, marked ``_COMPLETE`` and then
renamed into place, so readers only ever see whole shards and a killed harvest can
resume from the first missing shard.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
COMPLETE_MARKER = "_COMPLETE"
METADATA_FILE = "metadata.json"
DOMAINS = ("forget", "retain")
SPLITS = ("train", "heldout")

ACTS_FIELDS = ("acts",)
TOKEN_FIELDS = (
    "token_ids",
    "doc_ids",
    "positions",
    "context_index",
    "domain",
    "corpus",
    "fold",
    "split",
)
CONTEXT_FIELDS = ("contexts", "context_corpus", "context_split")

# Expected dtype of every array; `acts` depends on the store's acts_dtype.
FIELD_DTYPES: dict[str, np.dtype] = {
    "token_ids": np.dtype(np.int32),
    "doc_ids": np.dtype(np.int64),
    "positions": np.dtype(np.int32),
    "context_index": np.dtype(np.int32),
    "domain": np.dtype(np.uint8),
    "corpus": np.dtype(np.uint8),
    "fold": np.dtype(np.uint8),
    "split": np.dtype(np.uint8),
    "contexts": np.dtype(np.int32),
    "context_corpus": np.dtype(np.uint8),
    "context_split": np.dtype(np.uint8),
}

# bfloat16 has no numpy dtype, so its 16-bit pattern is stored as uint16; see `acts_to_float32`.
ACTS_STORAGE_DTYPES = {"bfloat16": np.dtype(np.uint16), "float32": np.dtype(np.float32)}


class StoreError(ValueError):
    """An activation store that is missing, incomplete, inconsistent or invalid."""


@dataclass
class StoreMetadata:
    """Description of an activation store, saved as ``metadata.json``.

    Attributes:
        model: Model name as given to ``load_model`` (embedded name, directory or hub id).
        layer: Block whose residual output was captured (0-based, ``hook_resid_post``).
        d_model: Width of the residual stream.
        acts_dtype: ``bfloat16`` (bit pattern in uint16) or ``float32``.
        context_size: Tokens per packed context, BOS included.
        n_folds: Number of cross-validation folds; every document belongs to one.
        fold_seed: Seed of the document-to-fold hash.
        heldout_fraction: Fraction of documents in the held-out split.
        corpora: One ``{"name", "source", "domain", "kind"}`` dict per corpus, in index order.
        domains: Names of the domain codes (index 0 is forget, 1 is retain).
        norm_scale: Scalar with ``E||norm_scale * x||^2 = d_model`` on train-split tokens.
        token_counts: Token counts: ``{"domain": {name: {fold: n}}, "split": {name: n}, "corpus": {name: n}}``.
        config_hash: Hash of every harvest setting that changes the stored content.
        bos_token_id: BOS id of the tokenizer, or None.
        special_token_ids: Token ids excluded from the per-token arrays.
        complete: True once every shard is written and the statistics are final.
        format_version: Version of this layout.
        extra: Free-form provenance (package versions, model dtype, device).
    """

    model: str
    layer: int
    d_model: int
    acts_dtype: str = "bfloat16"
    context_size: int = 128
    n_folds: int = 5
    fold_seed: int = 0
    heldout_fraction: float = 0.1
    corpora: list[dict[str, Any]] = field(default_factory=list)
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    norm_scale: float | None = None
    token_counts: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    bos_token_id: int | None = None
    special_token_ids: list[int] = field(default_factory=list)
    complete: bool = False
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "metadata") -> StoreMetadata:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and f.name not in data
        ]  # type: ignore[misc]
        if missing:
            raise StoreError(
                f"{source} is missing field(s) {', '.join(missing)}; the store is not a knowsep store or is damaged"
            )
        return cls(**{key: value for key, value in data.items() if key in names})

    def corpus_index(self, name: str) -> int:
        for index, corpus in enumerate(self.corpora):
            if corpus["name"] == name:
                return index
        known = ", ".join(corpus["name"] for corpus in self.corpora)
        raise StoreError(f"corpus {name!r} is not in this store; its corpora are: {known}")


@dataclass(frozen=True)
class ShardInfo:
    """A complete shard: its index, directory and number of token rows."""

    index: int
    path: Path
    n_tokens: int
    n_contexts: int


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def _write_text_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def acts_to_float32(acts: np.ndarray, acts_dtype: str) -> np.ndarray:
    """Decode stored activations to float32 (bfloat16 patterns become exact float32 values)."""
    if acts_dtype == "bfloat16":
        # A bfloat16 value is the upper half of the float32 with the same bits.
        return (acts.astype(np.uint32) << 16).view(np.float32)
    if acts_dtype == "float32":
        return acts.astype(np.float32, copy=False)
    raise StoreError(
        f"unknown acts_dtype {acts_dtype!r}; expected one of {', '.join(ACTS_STORAGE_DTYPES)}"
    )


def float32_to_bfloat16_bits(acts: np.ndarray) -> np.ndarray:
    """Encode float32 values as bfloat16 bit patterns (round to nearest even, NaN stays NaN)."""
    values = np.ascontiguousarray(acts, dtype=np.float32)
    bits = values.view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding) >> 16).astype(np.uint16)

    # Rounding would carry a NaN's mantissa into Inf, or wrap a negative NaN to +0, so
    # NaNs keep their sign and upper mantissa bits with the quiet bit set instead.
    quiet_nan = ((bits >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return np.where(np.isnan(values), quiet_nan, rounded)


def _array(group: zarr.Group, name: str) -> zarr.Array:
    """Return the array ``name`` of a shard group; a missing name raises KeyError."""
    member = group[name]
    if not isinstance(member, zarr.Array):
        raise KeyError(name)
    return member


class ActivationStore:
    """Read and write access to one activation store directory."""

    def __init__(self, path: str | Path, metadata: StoreMetadata):
        self.path = Path(path)
        self.metadata = metadata

    # Opening and creating

    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = True) -> ActivationStore:
        """Open a store; by default it must be finished (``metadata.complete``)."""
        path = Path(path)
        metadata_path = path / METADATA_FILE
        if not metadata_path.is_file():
            raise StoreError(
                f"activation store not found: {metadata_path} does not exist. Run `knowsep harvest` first or pass the right store path."
            )
        try:
            data = json.loads(metadata_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise StoreError(f"invalid metadata in {metadata_path}: {error}") from error
        metadata = StoreMetadata.from_dict(data, source=str(metadata_path))
        if metadata.format_version != FORMAT_VERSION:
            raise StoreError(
                f"store {path} has format version {metadata.format_version}, this knowsep reads version {FORMAT_VERSION}; re-harvest it"
            )
        if require_complete and not metadata.complete:
            raise StoreError(
                f"store {path} is incomplete (the harvest did not finish); rerun the same `knowsep harvest` to resume it"
            )
        return cls(path, metadata)

    @property
    def shards_dir(self) -> Path:
        return self.path / "shards"

    def write_metadata(self) -> None:
        _write_text_atomic(self.path / METADATA_FILE, self.metadata.to_json())

    # Shards

    @property
    def shards(self) -> list[ShardInfo]:
        """Complete shards in index order."""
        infos: list[ShardInfo] = []
        if not self.shards_dir.is_dir():
            return infos
        for entry in sorted(self.shards_dir.iterdir()):
            if not entry.name.startswith("shard_") or not (entry / COMPLETE_MARKER).is_file():
                continue
            marker = json.loads((entry / COMPLETE_MARKER).read_text(encoding="utf-8"))
            infos.append(
                ShardInfo(
                    int(entry.name.removeprefix("shard_")),
                    entry,
                    int(marker["n_tokens"]),
                    int(marker["n_contexts"]),
                )
            )
        return infos

    def is_complete(self, index: int) -> bool:
        return (self.shards_dir / shard_name(index) / COMPLETE_MARKER).is_file()

    def shard_path(self, index: int) -> Path:
        path = self.shards_dir / shard_name(index)
        if not (path / COMPLETE_MARKER).is_file():
            raise StoreError(
                f"shard {index} of {self.path} is missing or incomplete; rerun the harvest to complete it"
            )
        return path

    def _validate_arrays(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        expected = set(ACTS_FIELDS + TOKEN_FIELDS + CONTEXT_FIELDS)
        missing = sorted(expected - set(arrays))
        unknown = sorted(set(arrays) - expected)
        if missing or unknown:
            raise StoreError(
                f"shard {index}: missing arrays {missing}, unknown arrays {unknown}; "
                f"a shard holds exactly {', '.join(ACTS_FIELDS + TOKEN_FIELDS + CONTEXT_FIELDS)}"
            )

        n_tokens = len(arrays["token_ids"])
        acts = arrays["acts"]
        acts_dtype = ACTS_STORAGE_DTYPES.get(self.metadata.acts_dtype)
        if (
            acts.ndim != 2
            or acts.shape != (n_tokens, self.metadata.d_model)
            or acts.dtype != acts_dtype
        ):
            raise StoreError(
                f"shard {index}: acts has shape {acts.shape} and dtype {acts.dtype}; "
                f"expected ({n_tokens}, {self.metadata.d_model}) {acts_dtype}"
            )
        n_contexts = len(arrays["contexts"])
        for name, dtype in FIELD_DTYPES.items():
            array = arrays[name]
            length = n_contexts if name in CONTEXT_FIELDS else n_tokens
            if name != "contexts" and array.ndim != 1:
                raise StoreError(
                    f"shard {index}: {name} has shape {array.shape}; expected ({length},), one value per row"
                )
            if array.dtype != dtype or len(array) != length:
                raise StoreError(
                    f"shard {index}: {name} has dtype {array.dtype} and length {len(array)}; expected {dtype} and {length}"
                )
        if (
            arrays["contexts"].ndim != 2
            or arrays["contexts"].shape[1] != self.metadata.context_size
        ):
            raise StoreError(
                f"shard {index}: contexts has shape {arrays['contexts'].shape}; expected (C, {self.metadata.context_size})"
            )

    def write_shard(
        self, index: int, arrays: dict[str, np.ndarray], statistics: dict[str, Any] | None = None
    ) -> ShardInfo:
        """Write one shard atomically: temporary group, ``_COMPLETE`` marker, rename.

        ``statistics`` (JSON-serializable) is kept in the marker, so that the harvest can
        finish the store without reading every shard again; see `read_shard_statistics`.
        """
        self._validate_arrays(index, arrays)
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        final = self.shards_dir / shard_name(index)
        temporary = self.shards_dir / f".tmp-{shard_name(index)}-{uuid.uuid4().hex}"
        try:
            group = zarr.open_group(str(temporary), mode="w", zarr_format=3)
            for name, array in arrays.items():
                chunks = (min(len(array), 4096),) + array.shape[1:] if len(array) else array.shape
                compressor = BloscCodec(
                    cname="zstd",
                    clevel=3,
                    shuffle=BloscShuffle.bitshuffle if name == "acts" else BloscShuffle.shuffle,
                )
                target = group.create_array(
                    name,
                    shape=array.shape,
                    dtype=array.dtype,
                    chunks=chunks or (1,),
                    compressors=[compressor],
                )
                if array.size:
                    target[...] = array
            marker = {
                "n_tokens": len(arrays["token_ids"]),
                "n_contexts": len(arrays["contexts"]),
                "numcodecs": numcodecs.__version__,
            }
            if statistics is not None:
                marker["statistics"] = statistics
            _write_text_atomic(temporary / COMPLETE_MARKER, json.dumps(marker))
            if final.exists():
                # A complete shard with the same index can only come from the same
                # deterministic plan, so the old copy is replaced.
                shutil.rmtree(final)
            os.replace(temporary, final)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        return ShardInfo(index, final, len(arrays["token_ids"]), len(arrays["contexts"]))

    def read_shard_statistics(self, index: int) -> dict[str, Any] | None:
        """Return the statistics stored in a complete shard's marker, or None if it has none."""
        marker = json.loads((self.shard_path(index) / COMPLETE_MARKER).read_text(encoding="utf-8"))
        return marker.get("statistics")

    def remove_temporary(self) -> int:
        """Delete leftovers of interrupted shard writes; return how many were removed."""
        removed = 0
        if self.shards_dir.is_dir():
            for entry in self.shards_dir.iterdir():
                if entry.name.startswith(".tmp-"):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed += 1
        return removed

    def read_shard(
        self, index: int, fields: Sequence[str] = ACTS_FIELDS + TOKEN_FIELDS
    ) -> dict[str, np.ndarray]:
        """Read arrays of a complete shard. ``acts`` stays in its stored dtype; see `read_acts`."""
        path = self.shard_path(index)
        try:
            group = zarr.open_group(str(path), mode="r", zarr_format=3)
            return {name: np.asarray(_array(group, name)[...]) for name in fields}
        except KeyError as error:
            raise StoreError(
                f"shard {index} of {self.path} has no array {error}; valid arrays: {', '.join(ACTS_FIELDS + TOKEN_FIELDS + CONTEXT_FIELDS)}"
            ) from error

    def read_acts(self, index: int, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """Read a shard's activations as float32, unnormalized (multiply by ``norm_scale`` to normalize)."""
        group = zarr.open_group(str(self.shard_path(index)), mode="r", zarr_format=3)
        acts = _array(group, "acts")
        raw = acts[...] if rows is None else np.asarray(acts[...])[rows]
        return acts_to_float32(np.asarray(raw), self.metadata.acts_dtype)

    def check_finite(self, index: int) -> None:
        """Raise `StoreError` naming the shard and first row when activations contain NaN or Inf."""
        acts = self.read_acts(index)
        bad_rows = np.flatnonzero(~np.isfinite(acts).all(axis=1))
        if len(bad_rows):
            raise StoreError(
                f"shard {index} of {self.path} has NaN or Inf activations in {len(bad_rows)} row(s), first at row {int(bad_rows[0])}; "
                "the model overflowed in its dtype: harvest again with dtype=float32 or a smaller layer"
            )

    def n_tokens(self, shards: Iterable[ShardInfo] | None = None) -> int:
        return sum(info.n_tokens for info in (self.shards if shards is None else shards))

    def finalize(self, norm_scale: float, token_counts: dict[str, Any]) -> None:
        """Record the final statistics and mark the store complete."""
        if not np.isfinite(norm_scale) or norm_scale <= 0:
            raise StoreError(
                f"invalid norm_scale {norm_scale}; the store has no finite nonzero train activations"
            )
        self.metadata.norm_scale = float(norm_scale)
        self.metadata.token_counts = token_counts
        self.metadata.complete = True
        self.write_metadata()


def create_store(
    path: str | Path, metadata: StoreMetadata, *, overwrite: bool = False
) -> ActivationStore:
    """Create a store, or reopen an unfinished one with the same ``config_hash`` to resume it."""
    path = Path(path)
    if (path / METADATA_FILE).is_file() and overwrite:
        # The old metadata is not read, so that overwrite also replaces a damaged store.
        logger.info("Removing existing store %s (overwrite=True)", path)
        shutil.rmtree(path)
    elif (path / METADATA_FILE).is_file():
        existing = ActivationStore.open(path, require_complete=False)
        if existing.metadata.config_hash != metadata.config_hash:
            raise StoreError(
                f"store {path} was harvested with config hash {existing.metadata.config_hash}, "
                f"but this config hashes to {metadata.config_hash}; pass overwrite=true or choose another store path"
            )
        else:
            removed = existing.remove_temporary()
            if removed:
                logger.info("Removed %d partial shard(s) left by an interrupted harvest", removed)
            return existing
    elif path.exists() and any(path.iterdir()):
        raise StoreError(
            f"{path} exists and is not an activation store; choose an empty or new directory"
        )

    path.mkdir(parents=True, exist_ok=True)
    store = ActivationStore(path, metadata)
    store.write_metadata()
    return store
