"""Bit-packed binary connection masks, stored as Zarr v3 arrays.

A mask of shape ``(rows, cols)`` is held as a ``uint8`` tensor ``[rows, ceil(cols / 8)]``
with 8 connections per byte along ``cols``, in little-endian bit order: bit ``b`` of
byte ``j`` is column ``8 * j + b``. The padding bits of each row's last byte are always
zero, so byte-wise equality, logical operations and popcounts need no masking. One bit
per connection is 32x smaller than a float32 mask and 8x smaller than a bool mask.

Pack and unpack use only tensor shifts and reductions, so they run on the tensor's
device (CPU or CUDA) without a Python loop over elements.

For per-latent operations (connections per latent, a minimum number of connections)
store the mask with latents as rows, e.g. ``(d_sae, d_model)`` for the encoder, so that
``row_counts()`` returns connections per latent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
import zarr.codecs
import zarr.storage

logger = logging.getLogger(__name__)

MASK_FORMAT = "knowsep.packed_mask"
MASK_VERSION = 1
BITS_PER_BYTE = 8

# Packed arrays are chunked along rows so that one chunk stays near 4 MiB.
_TARGET_CHUNK_BYTES = 4 * 2**20

# Number of set bits of every byte value, indexed by the byte.
_POPCOUNT_TABLE = torch.tensor([bin(value).count("1") for value in range(256)], dtype=torch.uint8)


class MaskError(ValueError):
    """Invalid mask input or an unreadable saved mask."""


def packed_width(cols: int) -> int:
    """Return the number of bytes per packed row for ``cols`` columns."""
    return (cols + BITS_PER_BYTE - 1) // BITS_PER_BYTE


def pack_bits(dense_RC: torch.Tensor) -> torch.Tensor:
    """Pack a 2-D bool or 0/1 tensor into ``uint8 [rows, ceil(cols / 8)]``, little-endian.

    Raises:
        MaskError: if the tensor is not 2-D, has an empty dimension or contains values
            other than 0 and 1.
    """
    if dense_RC.dim() != 2:
        raise MaskError(
            f"A mask must be 2-D (rows, cols), got shape {tuple(dense_RC.shape)}. "
            "Reshape it before packing."
        )
    rows, cols = dense_RC.shape
    _check_mask_shape(rows, cols)

    if dense_RC.dtype == torch.bool:
        bits_RC = dense_RC.to(torch.uint8)
    else:
        is_binary = ((dense_RC == 0) | (dense_RC == 1)).all()
        if not bool(is_binary):
            raise MaskError(
                f"A {dense_RC.dtype} mask must contain only 0 and 1. "
                "Threshold it (e.g. `weights != 0`) before packing."
            )
        bits_RC = dense_RC.to(torch.uint8)

    # Padding columns are zero, which keeps the padding bits of the last byte zero.
    n_bytes = packed_width(cols)
    padded_RC = torch.zeros(
        rows, n_bytes * BITS_PER_BYTE, dtype=torch.uint8, device=dense_RC.device
    )
    padded_RC[:, :cols] = bits_RC

    shifts = torch.arange(BITS_PER_BYTE, dtype=torch.uint8, device=dense_RC.device)
    bits_RB8 = padded_RC.view(rows, n_bytes, BITS_PER_BYTE)
    return (bits_RB8 << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(
    packed_RB: torch.Tensor, cols: int, dtype: torch.dtype = torch.bool
) -> torch.Tensor:
    """Unpack ``uint8 [rows, ceil(cols / 8)]`` into a ``[rows, cols]`` tensor of ``dtype``."""
    rows, n_bytes = packed_RB.shape
    shifts = torch.arange(BITS_PER_BYTE, dtype=torch.uint8, device=packed_RB.device)
    bits_RB8 = (packed_RB.unsqueeze(-1) >> shifts) & 1
    return bits_RB8.view(rows, n_bytes * BITS_PER_BYTE)[:, :cols].to(dtype)


def _check_mask_shape(rows: int, cols: int) -> None:
    if rows < 1 or cols < 1:
        raise MaskError(
            f"A mask needs at least one row and one column, got shape ({rows}, {cols})."
        )


def _padding_byte_mask(cols: int) -> int:
    """Return the byte whose set bits are the valid columns of a row's last byte."""
    used_bits = cols % BITS_PER_BYTE
    return 0xFF if used_bits == 0 else (1 << used_bits) - 1


class PackedMask:
    """A binary ``(rows, cols)`` mask stored as one bit per connection.

    ``data`` is the ``uint8 [rows, ceil(cols / 8)]`` packed tensor, little-endian along
    ``cols``, with zero padding bits. Build one with ``from_dense`` or ``ones``.
    """

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, data_RB: torch.Tensor, cols: int) -> None:
        if data_RB.dtype != torch.uint8 or data_RB.dim() != 2:
            raise MaskError(
                f"Packed mask data must be a 2-D uint8 tensor, got {data_RB.dtype} with "
                f"shape {tuple(data_RB.shape)}. Build masks with PackedMask.from_dense."
            )
        rows = data_RB.shape[0]
        _check_mask_shape(rows, cols)
        if data_RB.shape[1] != packed_width(cols):
            raise MaskError(
                f"Packed mask data has {data_RB.shape[1]} bytes per row but {cols} columns "
                f"need {packed_width(cols)}. Pass the column count the mask was packed with."
            )

        padding_bits_R = data_RB[:, -1] & (0xFF ^ _padding_byte_mask(cols))
        if bool(padding_bits_R.any()):
            raise MaskError(
                f"Packed mask data has nonzero padding bits beyond column {cols}. "
                "The data is corrupted or was packed with another column count."
            )

        self.data = data_RB
        self.cols = cols

    @classmethod
    def from_dense(cls, dense_RC: torch.Tensor) -> PackedMask:
        """Pack a 2-D bool or 0/1 tensor on its own device."""
        return cls(pack_bits(dense_RC), dense_RC.shape[1])

    @classmethod
    def ones(cls, rows: int, cols: int, device: torch.device | str = "cpu") -> PackedMask:
        """Build a mask with every connection set."""
        _check_mask_shape(rows, cols)
        data_RB = torch.full((rows, packed_width(cols)), 0xFF, dtype=torch.uint8, device=device)
        data_RB[:, -1] = _padding_byte_mask(cols)
        return cls(data_RB, cols)

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed tensor."""
        return self.data.numel() * self.data.element_size()

    def to_dense(self, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """Unpack into a ``[rows, cols]`` tensor of ``dtype`` on the mask's device."""
        return unpack_bits(self.data, self.cols, dtype)

    def to(self, device: torch.device | str) -> PackedMask:
        """Return the mask on ``device``, sharing the packed tensor if it is already there."""
        return PackedMask(self.data.to(device), self.cols)

    def clone(self) -> PackedMask:
        return PackedMask(self.data.clone(), self.cols)

    def count(self) -> int:
        """Count the set connections."""
        return int(self._popcounts_RB().sum(dtype=torch.int64))

    def row_counts(self) -> torch.Tensor:
        """Count the set connections of each row, as ``int64 [rows]`` on the mask's device."""
        return self._popcounts_RB().sum(dim=1, dtype=torch.int64)

    def density(self) -> float:
        """Fraction of connections that are set."""
        return self.count() / (self.rows * self.cols)

    def difference(self, other: PackedMask) -> PackedMask:
        """Return the connections set here but not in ``other`` (``self & ~other``)."""
        self._check_compatible(other)
        return PackedMask(self.data & ~other.data, self.cols)

    def changed(self, other: PackedMask) -> int:
        """Count the connections whose state differs between the two masks."""
        return (self ^ other).count()

    def __and__(self, other: PackedMask) -> PackedMask:
        self._check_compatible(other)
        return PackedMask(self.data & other.data, self.cols)

    def __or__(self, other: PackedMask) -> PackedMask:
        self._check_compatible(other)
        return PackedMask(self.data | other.data, self.cols)

    def __xor__(self, other: PackedMask) -> PackedMask:
        self._check_compatible(other)
        return PackedMask(self.data ^ other.data, self.cols)

    def __invert__(self) -> PackedMask:
        # Inverting sets the padding bits, so the last byte is masked back to valid columns.
        inverted_RB = ~self.data
        inverted_RB[:, -1] &= _padding_byte_mask(self.cols)
        return PackedMask(inverted_RB, self.cols)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PackedMask):
            return NotImplemented
        if self.shape != other.shape:
            return False
        return bool(torch.equal(self.data, other.data.to(self.device)))

    def __repr__(self) -> str:
        return f"PackedMask(rows={self.rows}, cols={self.cols}, device={self.device})"

    def _popcounts_RB(self) -> torch.Tensor:
        table = _POPCOUNT_TABLE.to(self.device)
        return table[self.data.to(torch.int32)]

    def _check_compatible(self, other: PackedMask) -> None:
        if not isinstance(other, PackedMask):
            raise TypeError(f"Expected a PackedMask, got {type(other).__name__}.")
        if self.shape != other.shape:
            raise MaskError(
                f"Mask shapes differ: {self.shape} vs {other.shape}. "
                "Combine only masks of the same weight matrix."
            )
        if self.device != other.device:
            raise MaskError(
                f"Masks are on different devices: {self.device} vs {other.device}. "
                "Move one with `.to(device)` first."
            )

    def save(self, group_or_path: zarr.Group | str | os.PathLike[str], name: str) -> None:
        """Write the mask as the Zarr v3 array ``name`` inside a group.

        ``group_or_path`` is a group or its directory, created when missing. On a local
        directory the array is written to a temporary directory and renamed into place,
        so a reader never sees a half-written mask.
        """
        attributes = {
            "format": MASK_FORMAT,
            "version": MASK_VERSION,
            "rows": self.rows,
            "cols": self.cols,
            "bit_order": "little",
        }
        data_RB = self.data.cpu().numpy()
        rows_per_chunk = max(1, min(self.rows, _TARGET_CHUNK_BYTES // data_RB.shape[1]))
        array_kwargs: dict[str, Any] = dict(
            shape=data_RB.shape,
            dtype="uint8",
            chunks=(rows_per_chunk, data_RB.shape[1]),
            compressors=[zarr.codecs.ZstdCodec(level=3), zarr.codecs.Crc32cCodec()],
            attributes=attributes,
            # Every chunk is written, even an all-zero one, so a missing chunk file
            # marks a corrupted mask instead of reading back as zeros.
            config={"write_empty_chunks": True},
        )

        group_dir = local_group_dir(group_or_path)
        if group_dir is None:
            # NOTE: a group on a non-local store (memory, fsspec) is written in place,
            # without the atomic rename.
            assert isinstance(group_or_path, zarr.Group)
            array = group_or_path.create_array(name, overwrite=True, **array_kwargs)
            array[...] = data_RB
            return

        zarr.open_group(str(group_dir), mode="a")
        with atomic_directory(group_dir / name) as tmp_dir:
            array = zarr.create_array(str(tmp_dir), **array_kwargs)
            array[...] = data_RB
        logger.debug("Saved %s mask %s to %s", self.shape, name, group_dir / name)

    @classmethod
    def load(
        cls,
        group_or_path: zarr.Group | str | os.PathLike[str],
        name: str,
        *,
        expected_shape: tuple[int, int] | None = None,
        device: torch.device | str = "cpu",
    ) -> PackedMask:
        """Read a mask written by ``save`` and check its format, version and shape.

        Raises:
            MaskError: for a missing array, another format, an unknown version, a shape
                other than ``expected_shape``, a missing or corrupted chunk, or nonzero
                padding bits.
        """
        location = _describe_location(group_or_path, name)
        array = _open_mask_array(group_or_path, name, location)
        attributes = dict(array.attrs)

        if attributes.get("format") != MASK_FORMAT:
            raise MaskError(
                f"{location} is not a packed mask: its format attribute is "
                f"{attributes.get('format')!r}, expected {MASK_FORMAT!r}."
            )
        if attributes.get("version") != MASK_VERSION:
            raise MaskError(
                f"{location} has packed mask version {attributes.get('version')!r}, but this "
                f"knowsep reads version {MASK_VERSION}. Upgrade knowsep or save the mask again."
            )
        if attributes.get("bit_order") != "little":
            raise MaskError(
                f"{location} has bit order {attributes.get('bit_order')!r}, expected 'little'."
            )

        rows, cols = attributes.get("rows"), attributes.get("cols")
        if not isinstance(rows, int) or not isinstance(cols, int):
            raise MaskError(
                f"{location} has invalid rows/cols attributes ({rows!r}, {cols!r}). "
                "The file is corrupted, save the mask again."
            )
        if expected_shape is not None and (rows, cols) != tuple(expected_shape):
            raise MaskError(
                f"{location} has shape ({rows}, {cols}) but ({expected_shape[0]}, "
                f"{expected_shape[1]}) was expected. Load the mask that belongs to this "
                "weight matrix or check the SAE's d_model and d_sae."
            )
        if array.shape != (rows, packed_width(cols)) or array.dtype != np.uint8:
            raise MaskError(
                f"{location} contains a {array.dtype} array of shape {array.shape}, but a "
                f"({rows}, {cols}) mask is uint8 of shape ({rows}, {packed_width(cols)}). "
                "The file is corrupted, save the mask again."
            )
        if array.nchunks_initialized != array.nchunks:
            raise MaskError(
                f"{location} is missing {array.nchunks - array.nchunks_initialized} of "
                f"{array.nchunks} chunks. The file is corrupted, save the mask again."
            )

        try:
            data_RB = array[...]
        except (ValueError, RuntimeError) as error:
            raise MaskError(
                f"Failed to decode {location}: {error}. The file is corrupted. Save the mask again."
            ) from error

        try:
            return cls(torch.from_numpy(np.ascontiguousarray(data_RB)).to(device), cols)
        except MaskError as error:
            raise MaskError(f"{location}: {error}") from error


def local_group_dir(group_or_path: zarr.Group | str | os.PathLike[str]) -> Path | None:
    """Return the directory of a group given as a path or a local-store group.

    Returns ``None`` for a group on a non-local store.
    """
    if isinstance(group_or_path, zarr.Group):
        store = group_or_path.store
        if not isinstance(store, zarr.storage.LocalStore):
            return None
        return Path(store.root) / group_or_path.path
    return Path(group_or_path)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory, then rename it to ``target``.

    The temporary directory sits beside ``target`` so the rename stays on one file
    system, and it is removed when the block raises. An existing ``target`` is replaced.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex}"
    try:
        yield tmp_dir
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise

    # A directory cannot be renamed onto a non-empty one, so the old one moves aside first.
    # NOTE: a crash between the two renames leaves no target, only the old copy under a
    # `.old-` name beside it.
    old_dir = None
    if target.exists():
        old_dir = target.parent / f".old-{target.name}-{uuid.uuid4().hex}"
        os.replace(target, old_dir)
    os.replace(tmp_dir, target)
    if old_dir is not None:
        shutil.rmtree(old_dir)


def _describe_location(group_or_path: zarr.Group | str | os.PathLike[str], name: str) -> str:
    group_dir = local_group_dir(group_or_path)
    if group_dir is None:
        return f"mask array {name!r} in group {group_or_path!r}"
    return f"mask array {str(group_dir / name)!r}"


def _open_mask_array(
    group_or_path: zarr.Group | str | os.PathLike[str], name: str, location: str
) -> zarr.Array:
    group_dir = local_group_dir(group_or_path)
    try:
        if group_dir is None:
            assert isinstance(group_or_path, zarr.Group)
            node = group_or_path[name]
        else:
            node = zarr.open_array(str(group_dir / name), mode="r")
    except (FileNotFoundError, KeyError) as error:
        raise MaskError(
            f"No {location} was found. Check the path and name, or save the mask first."
        ) from error
    except ValueError as error:
        raise MaskError(
            f"Failed to read the metadata of {location}: {error}. Save the mask again."
        ) from error
    if not isinstance(node, zarr.Array):
        raise MaskError(f"{location} is a group, not a mask array. Check the name.")
    return node
