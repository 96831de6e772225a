"""Tests for the correlation pattern cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from stores.cache import (
    CACHE_FORMAT,
    INPUT_STAT_NAMES,
    ROW_STAT_NAMES,
    STAT_NAMES,
    CacheError,
    CorrelationCache,
    Stats,
    moved_rows,
    specificity,
)

D_MODEL = 6
D_SAE = 9
N_FOLDS = 4
MODEL = "tiny-llama"
LAYER = 1


def make_batch(n_tokens: int, seed: int, d_model: int = D_MODEL, d_sae: int = D_SAE):
    """Return x, sparse nonnegative f, domain and fold labels, all seeded."""
    generator = torch.Generator().manual_seed(seed)
    x_BD = torch.randn(n_tokens, d_model, generator=generator) * 2 + 0.5
    pre_BF = torch.randn(n_tokens, d_sae, generator=generator) - 0.7
    f_BF = torch.relu(pre_BF)
    domain_B = torch.randint(0, 2, (n_tokens,), generator=generator, dtype=torch.uint8)
    fold_B = torch.randint(0, N_FOLDS, (n_tokens,), generator=generator, dtype=torch.uint8)
    return x_BD, f_BF, domain_B, fold_B


def make_cache(n_folds: int | None = N_FOLDS) -> CorrelationCache:
    return CorrelationCache(D_MODEL, D_SAE, n_folds, model=MODEL, layer=LAYER)


def direct_sums(x_BD, f_BF, keep_B) -> dict[str, np.ndarray]:
    """Recompute every sum from the raw tokens selected by ``keep_B``, in numpy float64."""
    x = x_BD.numpy().astype(np.float64)[keep_B]
    f = f_BF.numpy().astype(np.float64)[keep_B]
    active = (f > 0).astype(np.float64)
    n_tokens = float(len(x))
    return {
        "n": np.array(n_tokens),
        "sx": x.sum(0),
        "sxx": x.T @ x,
        "n_rows": np.full(f.shape[1], n_tokens),
        "c": active.sum(0),
        "s1": f.sum(0),
        "s2": (f * f).sum(0),
        "G": f.T @ x,
        "H": active.T @ (x * x),
    }


def stats_as_dict(stats: Stats) -> dict[str, np.ndarray]:
    return {
        "n": stats.n.numpy(),
        "sx": stats.sx_D.numpy(),
        "sxx": stats.sxx_DD.numpy(),
        "n_rows": stats.n_rows_F.numpy(),
        "c": stats.c_F.numpy(),
        "s1": stats.s1_F.numpy(),
        "s2": stats.s2_F.numpy(),
        "G": stats.G_FD.numpy(),
        "H": stats.H_FD.numpy(),
    }


def assert_stats_close(actual: Stats, expected: dict[str, np.ndarray]) -> None:
    actual_sums = stats_as_dict(actual)
    for name in STAT_NAMES:
        np.testing.assert_allclose(
            actual_sums[name], expected[name], rtol=1e-12, atol=1e-9, err_msg=name
        )


def filled_cache(n_tokens: int = 300, seed: int = 0, batch_size: int = 64):
    x_BD, f_BF, domain_B, fold_B = make_batch(n_tokens, seed)
    cache = make_cache()
    for start in range(0, n_tokens, batch_size):
        batch = slice(start, start + batch_size)
        cache.update(x_BD[batch], f_BF[batch], domain_B[batch], fold_B[batch])
    return cache, (x_BD, f_BF, domain_B, fold_B)


# Union additivity.


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_tokens=st.integers(1, 200),
    batch_size=st.integers(1, 64),
    fold_groups=st.lists(
        st.sampled_from(range(N_FOLDS)), min_size=1, max_size=N_FOLDS, unique=True
    ),
    split=st.integers(1, N_FOLDS),
)
def test_union_of_folds_is_sum(seed, n_tokens, batch_size, fold_groups, split):
    x_BD, f_BF, domain_B, fold_B = make_batch(n_tokens, seed)
    cache = make_cache()
    for start in range(0, n_tokens, batch_size):
        batch = slice(start, start + batch_size)
        cache.update(x_BD[batch], f_BF[batch], domain_B[batch], fold_B[batch])

    first, second = fold_groups[:split], fold_groups[split:]
    union = cache.select(folds=fold_groups)
    expected = direct_sums(x_BD, f_BF, np.isin(fold_B.numpy(), fold_groups))

    assert_stats_close(union, expected)
    if second:
        assert_stats_close(cache.select(folds=first) + cache.select(folds=second), expected)


def test_union_of_folds_one_two_three():
    cache, (x_BD, f_BF, _, fold_B) = filled_cache()

    summed = cache.select(folds={1, 2}) + cache.select(folds={3})
    union = cache.select(folds={1, 2, 3})
    expected = direct_sums(x_BD, f_BF, np.isin(fold_B.numpy(), [1, 2, 3]))

    assert_stats_close(summed, stats_as_dict(union))
    assert_stats_close(union, expected)


def test_domain_selection_matches_direct():
    cache, (x_BD, f_BF, domain_B, fold_B) = filled_cache()

    forget = cache.select(domains=["forget"], folds=[0, 3])
    keep_B = (domain_B.numpy() == 0) & np.isin(fold_B.numpy(), [0, 3])

    assert_stats_close(forget, direct_sums(x_BD, f_BF, keep_B))


def test_single_bucket_mode_sums_every_fold():
    x_BD, f_BF, domain_B, _ = make_batch(120, seed=4)
    cache = make_cache(n_folds=None)

    cache.update(x_BD, f_BF, domain_B)

    assert_stats_close(
        cache.select(domains="retain"), direct_sums(x_BD, f_BF, domain_B.numpy() == 1)
    )
    with pytest.raises(CacheError, match="n_folds=None"):
        cache.select(folds=[0])


def test_weight_scales_every_sum():
    x_BD, f_BF, domain_B, fold_B = make_batch(50, seed=5)
    weighted = make_cache()
    repeated = make_cache()

    weighted.update(x_BD, f_BF, domain_B, fold_B, weight=2.0)
    repeated.update(x_BD, f_BF, domain_B, fold_B)
    repeated.update(x_BD, f_BF, domain_B, fold_B)

    for name in STAT_NAMES:
        torch.testing.assert_close(weighted.stats[name], repeated.stats[name], msg=name)


# Derived quantities.


def test_derived_quantities_match_numpy():
    cache, (x_BD, f_BF, domain_B, _) = filled_cache(n_tokens=400, seed=1)
    retain_B = domain_B.numpy() == 1
    x = x_BD.numpy().astype(np.float64)[retain_B]
    f = f_BF.numpy().astype(np.float64)[retain_B]

    stats = cache.select(domains=["retain"])

    np.testing.assert_allclose(stats.firing_rate_F.numpy(), (f > 0).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.mean_f_F.numpy(), f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.mean_x_D.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        stats.cov_x_DD.numpy(), np.cov(x, rowvar=False, bias=True), atol=1e-10
    )
    for i in range(D_SAE):
        active = f[:, i] > 0
        np.testing.assert_allclose(
            stats.active_input_energy_FD[i].numpy(), (x[active] ** 2).mean(0), rtol=1e-10
        )
        for j in range(D_MODEL):
            expected = np.corrcoef(f[:, i], x[:, j])[0, 1]
            assert stats.corr_FD[i, j].item() == pytest.approx(expected, abs=1e-9)


def test_derived_quantities_are_zero_without_data():
    x_BD, f_BF, domain_B, fold_B = make_batch(40, seed=2)
    f_BF[:, 3] = 0.0
    cache = make_cache()
    cache.update(x_BD, f_BF, domain_B, fold_B)

    stats = cache.select()
    empty = make_cache().select()

    assert stats.firing_rate_F[3].item() == 0.0
    assert torch.all(stats.active_input_energy_FD[3] == 0)
    assert torch.all(stats.corr_FD[3] == 0)
    assert torch.all(empty.firing_rate_F == 0)
    assert torch.all(empty.cov_x_DD == 0)
    assert torch.all(torch.isfinite(empty.corr_FD))


def test_specificity_formula():
    cache = make_cache()
    x_BD = torch.ones(4, D_MODEL)
    f_BF = torch.zeros(4, D_SAE)
    f_BF[0:2, 0] = 1.0  # latent 0 fires on both forget tokens only
    f_BF[2:4, 1] = 1.0  # latent 1 fires on both retain tokens only
    f_BF[[0, 2], 2] = 1.0  # latent 2 fires on half of each domain
    domain_B = torch.tensor([0, 0, 1, 1])
    fold_B = torch.zeros(4, dtype=torch.int64)
    cache.update(x_BD, f_BF, domain_B, fold_B)

    s_F = specificity(cache.select(domains=["forget"]), cache.select(domains=["retain"]), eps=0.0)

    assert s_F[0].item() == 1.0
    assert s_F[1].item() == -1.0
    assert s_F[2].item() == 0.0
    assert math.isnan(s_F[3].item())  # eps=0 and a latent that never fires
    s_default_F = specificity(cache.select(domains=["forget"]), cache.select(domains=["retain"]))
    assert s_default_F[3].item() == 0.0


# Moving average and pattern caching.


def test_decay_halves_everything():
    cache, _ = filled_cache()
    before = {name: tensor.clone() for name, tensor in cache.stats.items()}

    cache.decay(0.5)

    for name in STAT_NAMES:
        torch.testing.assert_close(cache.stats[name], before[name] * 0.5, msg=name)


def test_decay_rejects_factor_above_one():
    with pytest.raises(CacheError, match=r"\[0, 1\]"):
        make_cache().decay(1.5)


def test_refresh_rows_changes_only_given_rows():
    cache, _ = filled_cache()
    before = {name: tensor.clone() for name, tensor in cache.stats.items()}
    x_BD, f_BF, domain_B, fold_B = make_batch(80, seed=9)
    rows = [2, 5]
    other_rows = [i for i in range(D_SAE) if i not in rows]

    cache.refresh_rows(rows, x_BD, f_BF, domain_B, fold_B)

    for name in INPUT_STAT_NAMES:
        assert torch.equal(cache.stats[name], before[name]), name
    for name in ROW_STAT_NAMES:
        assert torch.equal(cache.stats[name][:, :, other_rows], before[name][:, :, other_rows]), (
            name
        )
        assert not torch.equal(cache.stats[name][:, :, rows], before[name][:, :, rows]), name


def test_refresh_rows_equals_fresh_statistics():
    cache, _ = filled_cache()
    x_BD, f_BF, domain_B, fold_B = make_batch(200, seed=10)
    fresh = make_cache()
    fresh.update(x_BD, f_BF, domain_B, fold_B)
    rows = torch.tensor([0, 4, 8])

    cache.refresh_rows(rows, x_BD, f_BF, domain_B, fold_B)

    for name in ROW_STAT_NAMES:
        torch.testing.assert_close(
            cache.stats[name][:, :, rows], fresh.stats[name][:, :, rows], msg=name
        )


def test_refresh_rows_keeps_buckets_without_tokens():
    cache, _ = filled_cache()
    before_G = cache.stats["G"].clone()
    x_BD, f_BF, _, _ = make_batch(30, seed=11)
    forget_B = torch.zeros(30, dtype=torch.int64)
    fold_two_B = torch.full((30,), 2, dtype=torch.int64)

    cache.refresh_rows([1], x_BD, f_BF, forget_B, fold_two_B)

    assert not torch.equal(cache.stats["G"][0, 2, 1], before_G[0, 2, 1])
    assert torch.equal(cache.stats["G"][1], before_G[1])
    assert torch.equal(cache.stats["G"][0, 0], before_G[0, 0])


def test_update_of_some_rows_keeps_others():
    cache, _ = filled_cache()
    before = {name: tensor.clone() for name, tensor in cache.stats.items()}
    x_BD, f_BF, domain_B, fold_B = make_batch(60, seed=12)

    cache.update(x_BD, f_BF, domain_B, fold_B, rows=[3])

    assert not torch.equal(cache.stats["n"], before["n"])
    assert not torch.equal(cache.stats["G"][:, :, 3], before["G"][:, :, 3])
    assert torch.equal(cache.stats["G"][:, :, :3], before["G"][:, :, :3])
    assert torch.equal(cache.stats["n_rows"][:, :, 4:], before["n_rows"][:, :, 4:])
    torch.testing.assert_close(cache.stats["n_rows"][:, :, 3], cache.stats["n"])


def test_skipped_rows_keep_rates_through_decay():
    cache, _ = filled_cache()
    rate_before_F = cache.select().firing_rate_F
    x_BD, f_BF, domain_B, fold_B = make_batch(60, seed=13)

    cache.decay(0.9)
    cache.update(x_BD, f_BF, domain_B, fold_B, rows=[0])

    rate_after_F = cache.select().firing_rate_F
    torch.testing.assert_close(rate_after_F[1:], rate_before_F[1:])


def test_moved_rows_uses_relative_change():
    W_then_DF = torch.ones(4, 5)
    W_then_DF[:, 4] = 0.0
    W_now_DF = W_then_DF.clone()
    W_now_DF[:, 1] *= 1.05  # 5% change
    W_now_DF[:, 2] *= 1.5  # 50% change
    W_now_DF[0, 4] = 1e-6  # a zero column that changed

    moved_F = moved_rows(W_now_DF, W_then_DF, tol=0.1)

    assert moved_F.tolist() == [2, 4]
    assert moved_rows(W_now_DF, W_then_DF, tol=0.01).tolist() == [1, 2, 4]


def test_moved_rows_rejects_shape_mismatch():
    with pytest.raises(CacheError, match="same encoder"):
        moved_rows(torch.ones(4, 5), torch.ones(4, 6), tol=0.1)


# Input validation.


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda x, f, d, k: (x[:, :-1], f, d, k), "x_BD must have shape"),
        (lambda x, f, d, k: (x, f[:-1], d, k), "f_BF must have shape"),
        (lambda x, f, d, k: (x, f, d + 2, k), "domain_B values"),
        (lambda x, f, d, k: (x, f, d, k + N_FOLDS), "fold_B values"),
        (lambda x, f, d, k: (x, f, d.float(), k), "integer tensor"),
        (lambda x, f, d, k: (x, f, d, None), "needs fold_B"),
        (lambda x, f, d, k: (x * float("nan"), f, d, k), "NaN or inf"),
    ],
)
def test_update_rejects_bad_batch(mutate, message):
    cache = make_cache()
    batch = mutate(*make_batch(10, seed=14))

    with pytest.raises(CacheError, match=message):
        cache.update(*batch)
    assert cache.n_updates == 0
    assert torch.all(cache.stats["n"] == 0)


def test_update_rejects_bad_rows():
    cache = make_cache()
    batch = make_batch(10, seed=15)

    with pytest.raises(CacheError, match="duplicates"):
        cache.update(*batch, rows=[1, 1])
    with pytest.raises(CacheError, match="Latent rows must be in"):
        cache.update(*batch, rows=[D_SAE])


def test_select_rejects_unknown_domain_and_fold():
    cache = make_cache()

    with pytest.raises(CacheError, match="Unknown domain"):
        cache.select(domains=["biology"])
    with pytest.raises(CacheError, match="out of range"):
        cache.select(folds=[N_FOLDS])


# Zarr files.


def test_save_load_round_trip(tmp_path):
    cache, _ = filled_cache()

    cache.save(tmp_path / "cache")
    loaded = CorrelationCache.load(
        tmp_path / "cache",
        expected_model=MODEL,
        expected_layer=LAYER,
        expected_d_model=D_MODEL,
        expected_d_sae=D_SAE,
    )

    assert loaded.n_folds == N_FOLDS
    assert loaded.n_updates == cache.n_updates
    for name in STAT_NAMES:
        assert torch.equal(loaded.stats[name], cache.stats[name]), name


def test_saved_attributes(tmp_path):
    cache, _ = filled_cache()

    cache.save(tmp_path / "cache")
    attributes = dict(zarr.open_group(str(tmp_path / "cache"), mode="r").attrs)

    assert attributes == {
        "format": CACHE_FORMAT,
        "version": 1,
        "model": MODEL,
        "layer": LAYER,
        "d_model": D_MODEL,
        "d_sae": D_SAE,
        "n_folds": N_FOLDS,
        "domains": ["forget", "retain"],
        "n_updates": cache.n_updates,
    }


def test_save_single_bucket_cache(tmp_path):
    cache = make_cache(n_folds=None)
    x_BD, f_BF, domain_B, _ = make_batch(20, seed=16)
    cache.update(x_BD, f_BF, domain_B)

    cache.save(tmp_path / "cache")
    loaded = CorrelationCache.load(tmp_path / "cache")

    assert loaded.n_folds is None
    assert torch.equal(loaded.stats["H"], cache.stats["H"])


def test_save_replaces_and_leaves_no_temp(tmp_path):
    cache, _ = filled_cache()
    cache.save(tmp_path / "cache")
    cache.decay(0.5)

    cache.save(tmp_path / "cache")

    assert [path.name for path in tmp_path.iterdir()] == ["cache"]
    assert torch.equal(CorrelationCache.load(tmp_path / "cache").stats["G"], cache.stats["G"])


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("expected_model", "other-model", "built for model 'tiny-llama', but model 'other-model'"),
        ("expected_layer", 3, "built for layer 1, but layer 3"),
        ("expected_d_model", 8, "built for d_model 6"),
        ("expected_d_sae", 16, "built for d_sae 9"),
    ],
)
def test_load_rejects_other_run(tmp_path, keyword, value, message):
    make_cache().save(tmp_path / "cache")

    with pytest.raises(CacheError, match=message):
        CorrelationCache.load(tmp_path / "cache", **{keyword: value})


def test_load_rejects_unknown_version(tmp_path):
    make_cache().save(tmp_path / "cache")
    group = zarr.open_group(str(tmp_path / "cache"), mode="r+")
    group.attrs["version"] = 99

    with pytest.raises(CacheError, match="version 99"):
        CorrelationCache.load(tmp_path / "cache")


def test_load_rejects_missing_path(tmp_path):
    with pytest.raises(CacheError, match="No correlation cache"):
        CorrelationCache.load(tmp_path / "absent")


def test_load_rejects_wrong_array_shape(tmp_path):
    make_cache().save(tmp_path / "cache")
    group = zarr.open_group(str(tmp_path / "cache"), mode="r+")
    group.attrs["d_sae"] = D_SAE + 1

    with pytest.raises(CacheError, match="array 'n_rows'.*expected float64"):
        CorrelationCache.load(tmp_path / "cache")


def test_load_rejects_missing_array(tmp_path):
    make_cache().save(tmp_path / "cache")
    metadata_path = tmp_path / "cache" / "H" / "zarr.json"
    metadata_path.unlink()

    with pytest.raises(CacheError, match="array 'H'"):
        CorrelationCache.load(tmp_path / "cache")


def test_load_rejects_corrupted_chunk(tmp_path):
    cache, _ = filled_cache()
    cache.save(tmp_path / "cache")
    chunk_files = sorted(
        path for path in (tmp_path / "cache" / "G" / "c").rglob("*") if path.is_file()
    )
    assert chunk_files
    chunk_files[0].write_bytes(b"\x00garbage" * 8)

    with pytest.raises(CacheError, match="Failed to decode the array 'G'") as error:
        CorrelationCache.load(tmp_path / "cache")
    assert str(tmp_path / "cache") in str(error.value)


def test_load_rejects_foreign_group(tmp_path):
    zarr.open_group(str(tmp_path / "cache"), mode="w", attributes={"format": "something.else"})

    with pytest.raises(CacheError, match="not a correlation cache"):
        CorrelationCache.load(tmp_path / "cache")


def test_load_rejects_missing_chunk(tmp_path):
    make_cache().save(tmp_path / "cache")
    chunk_files = sorted(
        path for path in (tmp_path / "cache" / "c" / "c").rglob("*") if path.is_file()
    )
    assert chunk_files
    chunk_files[0].unlink()

    with pytest.raises(CacheError, match="array 'c'.*missing 1 of"):
        CorrelationCache.load(tmp_path / "cache")


def test_update_with_no_rows_adds_inputs_only():
    cache = make_cache()
    x_BD, f_BF, domain_B, fold_B = make_batch(30, seed=17)

    cache.update(x_BD, f_BF, domain_B, fold_B, rows=[])

    assert cache.stats["n"].sum().item() == 30
    for name in ROW_STAT_NAMES:
        assert torch.all(cache.stats[name] == 0), name
