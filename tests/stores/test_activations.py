"""Activation store: round trip, bfloat16 encoding, atomic shards, resume and validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from stores.activations import (
    ACTS_FIELDS,
    CONTEXT_FIELDS,
    FIELD_DTYPES,
    METADATA_FILE,
    TOKEN_FIELDS,
    ActivationStore,
    StoreError,
    StoreMetadata,
    acts_to_float32,
    create_store,
    float32_to_bfloat16_bits,
)

ALL_FIELDS = ACTS_FIELDS + TOKEN_FIELDS + CONTEXT_FIELDS
D_MODEL = 8
CONTEXT_SIZE = 6
CORPORA = [
    {"name": "bio", "source": "synthetic", "domain": "forget", "kind": "text"},
    {"name": "wiki", "source": "synthetic", "domain": "retain", "kind": "text"},
]


def make_metadata(acts_dtype: str = "bfloat16", config_hash: str = "hash-a") -> StoreMetadata:
    return StoreMetadata(
        model="synthetic",
        layer=2,
        d_model=D_MODEL,
        acts_dtype=acts_dtype,
        context_size=CONTEXT_SIZE,
        n_folds=3,
        corpora=[dict(corpus) for corpus in CORPORA],
        config_hash=config_hash,
        bos_token_id=1,
        special_token_ids=[0, 1, 2],
    )


def bfloat16_bits_from_torch(values: np.ndarray) -> np.ndarray:
    """Reference bfloat16 encoding: torch's float32 -> bfloat16 conversion, read as uint16."""
    converted = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    return converted.view(torch.int16).numpy().view(np.uint16)


def make_arrays(
    seed: int, n_tokens: int = 40, n_contexts: int = 8, acts_dtype: str = "bfloat16"
) -> dict[str, np.ndarray]:
    """Random arrays of one shard, every value distinct enough that a mix-up shows."""
    rng = np.random.default_rng(seed)
    acts = (rng.normal(size=(n_tokens, D_MODEL)) * 4.0).astype(np.float32)
    return {
        "acts": bfloat16_bits_from_torch(acts) if acts_dtype == "bfloat16" else acts,
        "token_ids": rng.integers(3, 50_000, size=n_tokens).astype(np.int32),
        "doc_ids": rng.integers(0, 2**40, size=n_tokens).astype(np.int64),
        "positions": rng.integers(1, CONTEXT_SIZE, size=n_tokens).astype(np.int32),
        "context_index": rng.integers(0, n_contexts, size=n_tokens).astype(np.int32),
        "domain": rng.integers(0, 2, size=n_tokens).astype(np.uint8),
        "corpus": rng.integers(0, 2, size=n_tokens).astype(np.uint8),
        "fold": rng.integers(0, 3, size=n_tokens).astype(np.uint8),
        "split": rng.integers(0, 2, size=n_tokens).astype(np.uint8),
        "contexts": rng.integers(0, 50_000, size=(n_contexts, CONTEXT_SIZE)).astype(np.int32),
        "context_corpus": rng.integers(0, 2, size=n_contexts).astype(np.uint8),
        "context_split": rng.integers(0, 2, size=n_contexts).astype(np.uint8),
    }


def leftover_temporaries(store: ActivationStore) -> list[str]:
    if not store.shards_dir.is_dir():
        return []
    return [entry.name for entry in store.shards_dir.iterdir() if entry.name.startswith(".tmp-")]


# Round trip


@pytest.mark.parametrize("acts_dtype", ["bfloat16", "float32"])
def test_round_trip_bit_exact(tmp_path: Path, acts_dtype: str):
    store = create_store(tmp_path / "store", make_metadata(acts_dtype))
    written = {
        0: make_arrays(seed=0, acts_dtype=acts_dtype),
        1: make_arrays(seed=1, n_tokens=25, n_contexts=5, acts_dtype=acts_dtype),
    }
    for index, arrays in written.items():
        info = store.write_shard(index, arrays)
        assert info.n_tokens == len(arrays["token_ids"])
        assert info.n_contexts == len(arrays["contexts"])
    store.finalize(0.5, {"split": {"train": 40, "heldout": 25}})

    reopened = ActivationStore.open(tmp_path / "store")
    assert [(info.index, info.n_tokens, info.n_contexts) for info in reopened.shards] == [
        (0, 40, 8),
        (1, 25, 5),
    ]
    assert reopened.n_tokens() == 65
    for index, arrays in written.items():
        read = reopened.read_shard(index, ALL_FIELDS)
        assert set(read) == set(ALL_FIELDS)
        for name in ALL_FIELDS:
            assert read[name].dtype == arrays[name].dtype, name
            assert read[name].shape == arrays[name].shape, name
            assert np.array_equal(read[name], arrays[name]), name


def test_metadata_round_trip(tmp_path: Path):
    store = create_store(tmp_path / "store", make_metadata())
    store.write_shard(0, make_arrays(seed=0))
    counts = {"domain": {"forget": {"0": 3}}, "split": {"train": 30, "heldout": 10}}
    store.finalize(0.25, counts)

    metadata = ActivationStore.open(tmp_path / "store").metadata
    expected = make_metadata()
    expected.norm_scale = 0.25
    expected.token_counts = counts
    expected.complete = True
    assert metadata == expected


@pytest.mark.parametrize("acts_dtype", ["bfloat16", "float32"])
def test_read_acts_decodes_float32(tmp_path: Path, acts_dtype: str):
    store = create_store(tmp_path / "store", make_metadata(acts_dtype))
    arrays = make_arrays(seed=4, acts_dtype=acts_dtype)
    store.write_shard(0, arrays)

    acts = store.read_acts(0)
    expected = (
        torch.from_numpy(arrays["acts"].view(np.int16)).view(torch.bfloat16).float().numpy()
        if acts_dtype == "bfloat16"
        else arrays["acts"]
    )
    assert acts.dtype == np.float32
    assert np.array_equal(acts, expected)
    rows = np.array([3, 0, 7])
    assert np.array_equal(store.read_acts(0, rows), expected[rows])
    assert np.array_equal(store.read_acts(0, slice(5, 9)), expected[5:9])


def test_empty_shard_round_trip(tmp_path: Path):
    store = create_store(tmp_path / "store", make_metadata())
    store.write_shard(0, make_arrays(seed=0, n_tokens=0, n_contexts=0))

    assert [(info.n_tokens, info.n_contexts) for info in store.shards] == [(0, 0)]
    read = store.read_shard(0, ALL_FIELDS)
    assert read["acts"].shape == (0, D_MODEL)
    assert read["contexts"].shape == (0, CONTEXT_SIZE)


# bfloat16 encoding


def special_float32_values() -> np.ndarray:
    """Ties, values that round up to the next exponent or to Inf, zeros, subnormals, Inf and NaN."""
    bit_patterns = [
        0x3F808000,  # tie with an even upper half: rounds down
        0x3F818000,  # tie with an odd upper half: rounds up
        0x3F808001,  # just above a tie: rounds up
        0x3F807FFF,  # just below a tie: rounds down
        0xBF818000,  # negative tie, odd: rounds away from zero
        0x3FFFFFFF,  # carries into the exponent
        0x7F7FFFFF,  # max float32: rounds to +Inf
        0xFF7FFFFF,  # min float32: rounds to -Inf
        0x00000000,
        0x80000000,  # -0.0 keeps its sign
        0x00000001,  # smallest subnormal
        0x807FFFFF,  # largest negative subnormal
        0x7F800000,  # +Inf
        0xFF800000,  # -Inf
        0x7FC00000,  # quiet NaN
        0xFFC00000,  # negative quiet NaN
        0x7F800001,  # NaN that naive rounding turns into +Inf
        0xFFFFFFFF,  # negative NaN that naive rounding wraps to +0.0
        0x7FFFFFFF,  # NaN that naive rounding turns into -0.0
    ]
    return np.array(bit_patterns, dtype=np.uint32).view(np.float32)


def random_float32_values(n: int = 200_000) -> np.ndarray:
    """Every kind of float32: uniform random bit patterns, so about 0.4 % are NaN."""
    return np.random.default_rng(0).integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("values", [special_float32_values(), random_float32_values()], ids=["special", "random"])
def test_bfloat16_bits_match_torch(values: np.ndarray):
    ours = float32_to_bfloat16_bits(values)
    reference = bfloat16_bits_from_torch(values)
    nan = np.isnan(values)

    assert ours.dtype == np.uint16
    assert ours.shape == values.shape
    assert np.array_equal(ours[~nan], reference[~nan])


@pytest.mark.parametrize("values", [special_float32_values(), random_float32_values()], ids=["special", "random"])
def test_bfloat16_nan_stays_nan(values: np.ndarray):
    decoded = acts_to_float32(float32_to_bfloat16_bits(values), "bfloat16")
    nan = np.isnan(values)

    assert nan.any()
    assert np.isnan(decoded[nan]).all()
    assert not np.isnan(decoded[~nan]).any()
    assert np.array_equal(np.signbit(decoded[nan]), np.signbit(values[nan]))


def test_bfloat16_decode_matches_torch():
    values = random_float32_values()
    bits = float32_to_bfloat16_bits(values)
    decoded = acts_to_float32(bits, "bfloat16")
    reference = torch.from_numpy(values.copy()).to(torch.bfloat16).float().numpy()
    finite_or_inf = ~np.isnan(values)

    assert decoded.dtype == np.float32
    assert np.array_equal(decoded[finite_or_inf], reference[finite_or_inf])
    assert np.array_equal(np.signbit(decoded[finite_or_inf]), np.signbit(reference[finite_or_inf]))


def test_bfloat16_keeps_shape_of_2d_input():
    values = np.random.default_rng(1).normal(size=(5, 7)).astype(np.float64)
    bits = float32_to_bfloat16_bits(values)
    assert bits.shape == (5, 7)
    assert np.array_equal(bits, bfloat16_bits_from_torch(values.astype(np.float32)))


def test_unknown_acts_dtype_rejected():
    with pytest.raises(StoreError, match="float16.*bfloat16, float32"):
        acts_to_float32(np.zeros(3, dtype=np.uint16), "float16")


# Atomic shards


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = create_store(tmp_path / "store", make_metadata())
    store.write_shard(0, make_arrays(seed=0))
    original_setitem = zarr.Array.__setitem__
    calls = {"n": 0}

    def failing_setitem(self, selection, value):
        # Fail on the third array, after some arrays of the shard are already on disk.
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("simulated disk failure")
        return original_setitem(self, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", failing_setitem)
    with pytest.raises(OSError, match="simulated disk failure"):
        store.write_shard(1, make_arrays(seed=1))

    assert calls["n"] == 3
    assert not store.is_complete(1)
    assert not (store.shards_dir / "shard_00001").exists()
    assert leftover_temporaries(store) == []
    assert [info.index for info in ActivationStore.open(store.path, require_complete=False).shards] == [0]
    with pytest.raises(StoreError, match="shard 1 .*missing or incomplete"):
        store.read_shard(1)

    monkeypatch.setattr(zarr.Array, "__setitem__", original_setitem)
    arrays = make_arrays(seed=1)
    store.write_shard(1, arrays)
    assert store.is_complete(1)
    assert [info.index for info in store.shards] == [0, 1]
    assert np.array_equal(store.read_shard(1, ("acts",))["acts"], arrays["acts"])


def test_shard_without_marker_is_invisible(tmp_path: Path):
    store = create_store(tmp_path / "store", make_metadata())
    store.write_shard(0, make_arrays(seed=0))
    # A shard directory that lost its marker, and a temporary group left by a killed process.
    store.write_shard(1, make_arrays(seed=1))
    (store.shards_dir / "shard_00001" / "_COMPLETE").unlink()
    killed = store.shards_dir / ".tmp-shard_00002-0123abcd"
    killed.mkdir()
    (killed / "zarr.json").write_text("{}")

    assert [info.index for info in store.shards] == [0]
    assert store.is_complete(0)
    assert not store.is_complete(1)
    assert not store.is_complete(2)


def test_resume_removes_temporary_shards(tmp_path: Path):
    store = create_store(tmp_path / "store", make_metadata())
    store.write_shard(0, make_arrays(seed=0))
    killed = store.shards_dir / ".tmp-shard_00001-0123abcd"
    killed.mkdir()
    (killed / "zarr.json").write_text("{}")

    resumed = create_store(tmp_path / "store", make_metadata())
    assert leftover_temporaries(resumed) == []
    assert [info.index for info in resumed.shards] == [0]
    resumed.write_shard(1, make_arrays(seed=1))
    assert [info.index for info in resumed.shards] == [0, 1]


def test_rewriting_shard_replaces_it(tmp_path: Path):
    store = create_store(tmp_path / "store", make_metadata())
    store.write_shard(0, make_arrays(seed=0))
    replacement = make_arrays(seed=7, n_tokens=12, n_contexts=3)
    store.write_shard(0, replacement)

    assert [(info.index, info.n_tokens) for info in store.shards] == [(0, 12)]
    assert np.array_equal(store.read_shard(0, ("doc_ids",))["doc_ids"], replacement["doc_ids"])
    assert leftover_temporaries(store) == []


# Creating, resuming and opening


def test_create_resumes_same_hash(tmp_path: Path):
    store = create_store(tmp_path / "store", make_metadata())
    store.write_shard(0, make_arrays(seed=0))

    resumed = create_store(tmp_path / "store", make_metadata())
    assert resumed.metadata.config_hash == "hash-a"
    assert not resumed.metadata.complete
    assert [info.index for info in resumed.shards] == [0]


def test_create_rejects_other_hash(tmp_path: Path):
    store = create_store(tmp_path / "store", make_metadata(config_hash="hash-a"))
    store.write_shard(0, make_arrays(seed=0))

    with pytest.raises(StoreError) as raised:
        create_store(tmp_path / "store", make_metadata(config_hash="hash-b"))
    message = str(raised.value)
    assert "hash-a" in message
    assert "hash-b" in message
    assert "overwrite" in message
    assert store.is_complete(0)
    assert ActivationStore.open(store.path, require_complete=False).metadata.config_hash == "hash-a"


def test_create_overwrite(tmp_path: Path):
    store = create_store(tmp_path / "store", make_metadata(config_hash="hash-a"))
    store.write_shard(0, make_arrays(seed=0))
    store.finalize(1.0, {})

    fresh = create_store(tmp_path / "store", make_metadata(config_hash="hash-b"), overwrite=True)
    assert fresh.shards == []
    reopened = ActivationStore.open(tmp_path / "store", require_complete=False)
    assert reopened.metadata.config_hash == "hash-b"
    assert not reopened.metadata.complete


def test_create_overwrite_of_damaged_metadata(tmp_path: Path):
    directory = tmp_path / "store"
    directory.mkdir()
    (directory / METADATA_FILE).write_text("{not json")

    store = create_store(directory, make_metadata(), overwrite=True)
    assert store.metadata.config_hash == "hash-a"
    assert ActivationStore.open(directory, require_complete=False).metadata.config_hash == "hash-a"


def test_create_rejects_non_store_directory(tmp_path: Path):
    directory = tmp_path / "notes"
    directory.mkdir()
    (directory / "notes.txt").write_text("keep me")

    with pytest.raises(StoreError, match="not an activation store"):
        create_store(directory, make_metadata())
    assert (directory / "notes.txt").read_text() == "keep me"


def test_create_in_empty_directory(tmp_path: Path):
    directory = tmp_path / "empty"
    directory.mkdir()
    store = create_store(directory, make_metadata())
    assert (directory / METADATA_FILE).is_file()
    assert store.shards == []


def test_open_missing_store(tmp_path: Path):
    with pytest.raises(StoreError, match="not found.*Run `knowsep harvest` first"):
        ActivationStore.open(tmp_path / "nowhere")


def test_open_incomplete_store(tmp_path: Path):
    store = create_store(tmp_path / "store", make_metadata())
    store.write_shard(0, make_arrays(seed=0))

    with pytest.raises(StoreError, match="incomplete.*rerun the same `knowsep harvest`"):
        ActivationStore.open(store.path)
    assert ActivationStore.open(store.path, require_complete=False).shards[0].n_tokens == 40


def test_open_invalid_metadata(tmp_path: Path):
    directory = tmp_path / "store"
    directory.mkdir()
    (directory / METADATA_FILE).write_text("{not json")
    with pytest.raises(StoreError, match="invalid metadata"):
        ActivationStore.open(directory)

    (directory / METADATA_FILE).write_text(json.dumps({"model": "m"}))
    with pytest.raises(StoreError, match="missing field.*layer, d_model"):
        ActivationStore.open(directory)


def test_open_other_format_version(tmp_path: Path):
    store = create_store(tmp_path / "store", make_metadata())
    store.metadata.format_version = 99
    store.write_metadata()
    with pytest.raises(StoreError, match="format version 99.*re-harvest"):
        ActivationStore.open(store.path, require_complete=False)


def test_metadata_write_leaves_no_temporary(tmp_path: Path):
    store = create_store(tmp_path / "store", make_metadata())
    store.finalize(1.0, {})
    assert sorted(entry.name for entry in store.path.iterdir()) == [METADATA_FILE]


def test_corpus_index(tmp_path: Path):
    metadata = make_metadata()
    assert metadata.corpus_index("wiki") == 1
    with pytest.raises(StoreError, match="'mmlu' is not in this store.*bio, wiki"):
        metadata.corpus_index("mmlu")


# Validation of written arrays


def with_change(name: str, value: np.ndarray | None) -> dict[str, np.ndarray]:
    arrays = make_arrays(seed=0)
    if value is None:
        del arrays[name]
    else:
        arrays[name] = value
    return arrays


INVALID_SHARDS = {
    "missing array": (with_change("fold", None), r"missing arrays \['fold'\], unknown arrays \[\]"),
    "unknown array": (
        {**make_arrays(seed=0), "labels": np.zeros(40, dtype=np.uint8)},
        r"missing arrays \[\], unknown arrays \['labels'\]; a shard holds exactly acts, token_ids",
    ),
    "acts float32 in bfloat16 store": (
        with_change("acts", np.zeros((40, D_MODEL), dtype=np.float32)),
        "acts has shape .* and dtype float32; expected .* uint16",
    ),
    "acts wrong width": (
        with_change("acts", np.zeros((40, D_MODEL + 1), dtype=np.uint16)),
        r"acts has shape \(40, 9\)",
    ),
    "acts wrong length": (
        with_change("acts", np.zeros((39, D_MODEL), dtype=np.uint16)),
        r"acts has shape \(39, 8\).*expected \(40, 8\)",
    ),
    "acts one-dimensional": (
        with_change("acts", np.zeros(40, dtype=np.uint16)),
        r"acts has shape \(40,\)",
    ),
    "token_ids int64": (
        with_change("token_ids", np.zeros(40, dtype=np.int64)),
        "token_ids has dtype int64 .* expected int32",
    ),
    "doc_ids wrong length": (
        with_change("doc_ids", np.zeros(41, dtype=np.int64)),
        "doc_ids has dtype int64 and length 41; expected int64 and 40",
    ),
    "fold two-dimensional": (
        with_change("fold", np.zeros((40, 2), dtype=np.uint8)),
        r"fold has shape \(40, 2\); expected \(40,\)",
    ),
    "context_split wrong length": (
        with_change("context_split", np.zeros(7, dtype=np.uint8)),
        "context_split has dtype uint8 and length 7; expected uint8 and 8",
    ),
    "contexts wrong width": (
        with_change("contexts", np.zeros((8, CONTEXT_SIZE + 2), dtype=np.int32)),
        r"contexts has shape \(8, 8\); expected \(C, 6\)",
    ),
}


@pytest.mark.parametrize("case", list(INVALID_SHARDS), ids=list(INVALID_SHARDS))
def test_invalid_shard_rejected(tmp_path: Path, case: str):
    arrays, message = INVALID_SHARDS[case]
    store = create_store(tmp_path / "store", make_metadata())

    with pytest.raises(StoreError, match="shard 4: " + message):
        store.write_shard(4, arrays)
    assert not store.is_complete(4)
    assert leftover_temporaries(store) == []


def test_field_dtypes_cover_every_array():
    assert set(FIELD_DTYPES) == set(TOKEN_FIELDS + CONTEXT_FIELDS)


def test_read_unknown_array(tmp_path: Path):
    store = create_store(tmp_path / "store", make_metadata())
    store.write_shard(0, make_arrays(seed=0))
    with pytest.raises(StoreError, match="no array 'labels'.*valid arrays: acts, token_ids"):
        store.read_shard(0, ("labels",))


# Finite checks and finalize


@pytest.mark.parametrize("acts_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_check_finite_names_shard_and_row(tmp_path: Path, acts_dtype: str, bad_value: float):
    store = create_store(tmp_path / "store", make_metadata(acts_dtype))
    store.write_shard(0, make_arrays(seed=0, acts_dtype=acts_dtype))
    acts = np.random.default_rng(2).normal(size=(40, D_MODEL)).astype(np.float32)
    acts[17, 5] = bad_value
    acts[30, 0] = bad_value
    arrays = make_arrays(seed=2, acts_dtype=acts_dtype)
    arrays["acts"] = float32_to_bfloat16_bits(acts) if acts_dtype == "bfloat16" else acts
    store.write_shard(1, arrays)

    store.check_finite(0)
    with pytest.raises(StoreError, match="shard 1 .* in 2 row\\(s\\), first at row 17"):
        store.check_finite(1)


@pytest.mark.parametrize("norm_scale", [np.nan, np.inf, -np.inf, 0.0, -1.0])
def test_finalize_rejects_invalid_norm_scale(tmp_path: Path, norm_scale: float):
    store = create_store(tmp_path / "store", make_metadata())
    store.write_shard(0, make_arrays(seed=0))

    with pytest.raises(StoreError, match="invalid norm_scale"):
        store.finalize(norm_scale, {"split": {"train": 40}})
    reopened = ActivationStore.open(store.path, require_complete=False)
    assert not reopened.metadata.complete
    assert reopened.metadata.norm_scale is None


def test_finalize_marks_complete(tmp_path: Path):
    store = create_store(tmp_path / "store", make_metadata())
    store.write_shard(0, make_arrays(seed=0))
    store.finalize(np.float64(0.125), {"split": {"train": 40}})

    metadata = json.loads((store.path / METADATA_FILE).read_text())
    assert metadata["complete"] is True
    assert metadata["norm_scale"] == 0.125
    assert type(ActivationStore.open(store.path).metadata.norm_scale) is float
