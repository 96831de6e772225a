"""Tests for bit-packed connection masks and their Zarr files."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
import zarr.storage
from hypothesis import given, settings
from hypothesis import strategies as st

import stores.masks
from stores.masks import MASK_FORMAT, MaskError, PackedMask, pack_bits, packed_width, unpack_bits

SHAPES = st.tuples(st.integers(1, 37), st.integers(1, 70))
DENSITIES = st.sampled_from([0.0, 0.05, 0.5, 0.95, 1.0])
SEEDS = st.integers(0, 2**31 - 1)
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)


def random_dense(shape: tuple[int, int], density: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) < density


def padding_bits(mask: PackedMask) -> int:
    """Return the OR of every row's padding bits (0 when they are all clear)."""
    used_bits = mask.cols % 8
    if used_bits == 0:
        return 0
    invalid = 0xFF ^ ((1 << used_bits) - 1)
    return int((mask.data[:, -1] & invalid).max())


def mask_chunk_files(array_dir: Path) -> list[Path]:
    return sorted(path for path in (array_dir / "c").rglob("*") if path.is_file())


# Properties over odd shapes.


@PROPERTY_SETTINGS
@given(shape=SHAPES, density=DENSITIES, seed=SEEDS)
def test_pack_unpack_round_trip(shape, density, seed):
    dense = random_dense(shape, density, seed)
    mask = PackedMask.from_dense(dense)

    assert mask.data.dtype == torch.uint8
    assert tuple(mask.data.shape) == (shape[0], packed_width(shape[1]))
    assert mask.shape == shape
    assert torch.equal(mask.to_dense(), dense)
    assert padding_bits(mask) == 0


@PROPERTY_SETTINGS
@given(shape=SHAPES, density=DENSITIES, seed=SEEDS)
def test_counts_match_dense_sums(shape, density, seed):
    dense = random_dense(shape, density, seed)
    mask = PackedMask.from_dense(dense)

    assert mask.count() == int(dense.sum())
    assert torch.equal(mask.row_counts(), dense.sum(dim=1))
    assert mask.density() == pytest.approx(float(dense.float().mean()))


@PROPERTY_SETTINGS
@given(shape=SHAPES, density=DENSITIES, seeds=st.tuples(SEEDS, SEEDS))
def test_logical_ops_match_dense(shape, density, seeds):
    dense_a = random_dense(shape, density, seeds[0])
    dense_b = random_dense(shape, 0.5, seeds[1])
    mask_a = PackedMask.from_dense(dense_a)
    mask_b = PackedMask.from_dense(dense_b)

    results = {
        "and": (mask_a & mask_b, dense_a & dense_b),
        "or": (mask_a | mask_b, dense_a | dense_b),
        "xor": (mask_a ^ mask_b, dense_a ^ dense_b),
        "invert": (~mask_a, ~dense_a),
        "difference": (mask_a.difference(mask_b), dense_a & ~dense_b),
    }
    for name, (packed, expected) in results.items():
        assert torch.equal(packed.to_dense(), expected), name
        assert padding_bits(packed) == 0, name

    assert mask_a.changed(mask_b) == int((dense_a != dense_b).sum())
    assert mask_a.changed(mask_a) == 0


@PROPERTY_SETTINGS
@given(shape=SHAPES, density=DENSITIES, seed=SEEDS)
def test_zarr_round_trip(shape, density, seed):
    mask = PackedMask.from_dense(random_dense(shape, density, seed))

    with tempfile.TemporaryDirectory() as tmp:
        mask.save(tmp, "enc")
        loaded = PackedMask.load(tmp, "enc", expected_shape=shape)

    assert loaded == mask
    assert padding_bits(loaded) == 0


# Packing layout and construction.


def test_bit_order_is_little_endian():
    dense = torch.zeros(2, 10, dtype=torch.bool)
    dense[0, 0] = True
    dense[0, 7] = True
    dense[1, 9] = True

    packed = pack_bits(dense)

    assert packed.tolist() == [[0b1000_0001, 0], [0, 0b10]]


def test_unpack_to_float_dtype():
    dense = random_dense((4, 11), 0.5, seed=3)

    unpacked = unpack_bits(pack_bits(dense), 11, dtype=torch.float32)

    assert unpacked.dtype == torch.float32
    assert torch.equal(unpacked, dense.float())


def test_from_dense_accepts_zero_one_floats():
    dense = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])

    mask = PackedMask.from_dense(dense)

    assert torch.equal(mask.to_dense(torch.float32), dense)


def test_from_dense_rejects_other_values():
    with pytest.raises(MaskError, match="only 0 and 1"):
        PackedMask.from_dense(torch.tensor([[0.0, 0.5]]))


def test_from_dense_rejects_wrong_rank():
    with pytest.raises(MaskError, match="2-D"):
        PackedMask.from_dense(torch.ones(3, dtype=torch.bool))


def test_from_dense_rejects_empty_shape():
    with pytest.raises(MaskError, match="at least one row"):
        PackedMask.from_dense(torch.ones(0, 4, dtype=torch.bool))


def test_constructor_rejects_padding_bits():
    with pytest.raises(MaskError, match="padding bits"):
        PackedMask(torch.tensor([[0xFF]], dtype=torch.uint8), cols=3)


def test_constructor_rejects_wrong_width():
    with pytest.raises(MaskError, match="bytes per row"):
        PackedMask(torch.zeros(2, 3, dtype=torch.uint8), cols=8)


def test_ones_sets_every_connection():
    mask = PackedMask.ones(5, 13)

    assert mask.count() == 65
    assert mask.density() == 1.0
    assert padding_bits(mask) == 0
    assert torch.equal(mask.to_dense(), torch.ones(5, 13, dtype=torch.bool))


def test_invert_of_ones_is_empty():
    mask = ~PackedMask.ones(3, 9)

    assert mask.count() == 0
    assert padding_bits(mask) == 0


def test_nbytes_is_one_bit_per_connection():
    mask = PackedMask.ones(4096, 640)

    assert mask.nbytes == 4096 * 640 // 8


def test_ops_reject_shape_mismatch():
    with pytest.raises(MaskError, match="shapes differ"):
        PackedMask.ones(3, 9) & PackedMask.ones(3, 10)


def test_equality_compares_shape_and_bits():
    mask = PackedMask.ones(3, 9)
    other = mask.clone()
    other.data[0, 0] = 0

    assert mask == mask.clone()
    assert mask != other
    assert mask != PackedMask.ones(3, 10)


def test_to_keeps_bits():
    mask = PackedMask.from_dense(random_dense((6, 17), 0.3, seed=1))

    moved = mask.to("cpu")

    assert moved == mask
    assert moved.device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    dense = random_dense((33, 70), 0.4, seed=2)
    cpu_mask = PackedMask.from_dense(dense)

    cuda_mask = PackedMask.from_dense(dense.cuda())

    assert cuda_mask.device.type == "cuda"
    assert torch.equal(cuda_mask.data.cpu(), cpu_mask.data)
    assert torch.equal(cuda_mask.to_dense().cpu(), dense)
    assert cuda_mask.count() == cpu_mask.count()
    assert torch.equal((~cuda_mask).data.cpu(), (~cpu_mask).data)


# Zarr files.


def test_saved_attributes(tmp_path):
    PackedMask.ones(4, 12).save(tmp_path, "enc")

    attributes = dict(zarr.open_array(str(tmp_path / "enc"), mode="r").attrs)

    assert attributes == {
        "format": MASK_FORMAT,
        "version": 1,
        "rows": 4,
        "cols": 12,
        "bit_order": "little",
    }


def test_save_replaces_existing_mask(tmp_path):
    PackedMask.ones(4, 12).save(tmp_path, "enc")
    empty = ~PackedMask.ones(4, 12)

    empty.save(tmp_path, "enc")

    assert PackedMask.load(tmp_path, "enc") == empty
    assert sorted(path.name for path in tmp_path.iterdir()) == ["enc", "zarr.json"]


def test_failed_save_leaves_old_mask(tmp_path, monkeypatch):
    original = PackedMask.ones(4, 12)
    original.save(tmp_path, "enc")

    def fail_create_array(*args, **kwargs):
        raise RuntimeError("simulated disk failure")

    monkeypatch.setattr(stores.masks.zarr, "create_array", fail_create_array)
    with pytest.raises(RuntimeError, match="simulated"):
        (~original).save(tmp_path, "enc")

    monkeypatch.undo()
    assert PackedMask.load(tmp_path, "enc") == original
    assert sorted(path.name for path in tmp_path.iterdir()) == ["enc", "zarr.json"]


def test_save_into_local_group(tmp_path):
    group = zarr.open_group(str(tmp_path / "masks"), mode="w")
    mask = PackedMask.from_dense(random_dense((7, 21), 0.5, seed=4))

    mask.save(group, "enc")

    assert PackedMask.load(group, "enc") == mask
    assert PackedMask.load(tmp_path / "masks", "enc") == mask


def test_save_into_memory_group():
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    mask = PackedMask.from_dense(random_dense((7, 21), 0.5, seed=5))

    mask.save(group, "dec")

    assert PackedMask.load(group, "dec") == mask


def test_load_rejects_wrong_shape(tmp_path):
    PackedMask.ones(4, 12).save(tmp_path, "enc")

    with pytest.raises(MaskError, match=r"shape \(4, 12\) but \(4, 13\) was expected"):
        PackedMask.load(tmp_path, "enc", expected_shape=(4, 13))


def test_load_rejects_unknown_version(tmp_path):
    PackedMask.ones(4, 12).save(tmp_path, "enc")
    array = zarr.open_array(str(tmp_path / "enc"), mode="r+")
    array.attrs["version"] = 2

    with pytest.raises(MaskError, match="version 2"):
        PackedMask.load(tmp_path, "enc")


def test_load_rejects_other_format(tmp_path):
    zarr.create_array(str(tmp_path / "enc"), shape=(4, 2), dtype="uint8")

    with pytest.raises(MaskError, match="not a packed mask"):
        PackedMask.load(tmp_path, "enc")


def test_load_rejects_missing_array(tmp_path):
    PackedMask.ones(4, 12).save(tmp_path, "enc")

    with pytest.raises(MaskError, match="No mask array"):
        PackedMask.load(tmp_path, "dec")


def test_load_rejects_corrupted_chunk(tmp_path):
    PackedMask.from_dense(random_dense((9, 30), 0.5, seed=6)).save(tmp_path, "enc")
    chunk_files = mask_chunk_files(tmp_path / "enc")
    assert chunk_files
    chunk_files[0].write_bytes(b"not a zstd frame" * 4)

    with pytest.raises(MaskError, match="Failed to decode") as error:
        PackedMask.load(tmp_path, "enc")
    assert str(tmp_path / "enc") in str(error.value)


def test_load_rejects_missing_chunk(tmp_path):
    (~PackedMask.ones(9, 30)).save(tmp_path, "enc")
    chunk_files = mask_chunk_files(tmp_path / "enc")
    assert chunk_files
    chunk_files[0].unlink()

    with pytest.raises(MaskError, match="missing 1 of"):
        PackedMask.load(tmp_path, "enc")


def test_load_rejects_padding_bits(tmp_path):
    PackedMask.ones(3, 12).save(tmp_path, "enc")
    array = zarr.open_array(str(tmp_path / "enc"), mode="r+")
    data = array[...]
    data[1, -1] = 0xFF
    array[...] = data

    with pytest.raises(MaskError, match="padding bits"):
        PackedMask.load(tmp_path, "enc")


def test_load_rejects_inconsistent_attributes(tmp_path):
    PackedMask.ones(3, 12).save(tmp_path, "enc")
    metadata_path = tmp_path / "enc" / "zarr.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["attributes"]["cols"] = 40
    metadata_path.write_text(json.dumps(metadata))

    with pytest.raises(MaskError, match="contains a uint8 array of shape"):
        PackedMask.load(tmp_path, "enc")


def test_loaded_data_matches_numpy_packbits(tmp_path):
    dense = random_dense((5, 19), 0.5, seed=7)
    PackedMask.from_dense(dense).save(tmp_path, "enc")

    stored = zarr.open_array(str(tmp_path / "enc"), mode="r")[...]

    assert np.array_equal(stored, np.packbits(dense.numpy(), axis=1, bitorder="little"))
