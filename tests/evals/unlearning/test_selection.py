"""Latent selection, random controls and firing rates from the store and the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evals.unlearning.selection import (
    SelectionError,
    check_latent_ids,
    firing_rates_from_cache,
    firing_rates_from_store,
    matched_random_latents,
    select_latents,
)
from stores.activations import ActivationStore
from stores.cache import CorrelationCache
from tests.evals.unlearning.conftest import D_MODEL, FORGET_DIMS, identity_sae


def test_select_latents_rule() -> None:
    forget_F = np.array([0.5, 0.9, 0.9, 0.0, 0.7, 0.8])
    retain_F = np.array([0.0, 0.02, 0.001, 0.0, 0.005, 0.0])

    # Latent 1 fails the retain threshold, latent 3 never fires on forget text.
    assert select_latents(forget_F, retain_F, 0.01, 3).tolist() == [2, 5, 4]
    assert select_latents(forget_F, retain_F, 0.01, 10).tolist() == [2, 5, 4, 0]
    assert select_latents(forget_F, retain_F, 0.001, 10).tolist() == [5, 0]


def test_select_latents_ties_by_id() -> None:
    forget_F = np.array([0.3, 0.3, 0.3])
    retain_F = np.zeros(3)

    assert select_latents(forget_F, retain_F, 0.01, 2).tolist() == [0, 1]


def test_select_latents_rejects_mismatched_rates() -> None:
    with pytest.raises(SelectionError, match="same length"):
        select_latents(np.zeros(3), np.zeros(4), 0.01, 1)


def test_latent_ids_out_of_range() -> None:
    assert check_latent_ids([0, 63], 64).tolist() == [0, 63]
    with pytest.raises(SelectionError, match=r"\[64\].*d_sae 64"):
        check_latent_ids([3, 64], 64)
    with pytest.raises(SelectionError, match=r"\[-1\]"):
        check_latent_ids([-1], 64)


def test_matched_controls_are_nearest_and_distinct() -> None:
    rates_F = np.array([0.10, 0.11, 0.09, 0.5, 0.001, 0.0, 0.12, 0.5, 0.002])
    selected = np.array([0, 4])

    nearest = matched_random_latents(selected, rates_F, np.random.default_rng(0), pool_size=1)
    pooled = matched_random_latents(selected, rates_F, np.random.default_rng(0), pool_size=2)

    # With a pool of one, each control is the live unselected latent with the closest log rate.
    assert nearest.tolist() == [1, 8]
    assert pooled[0] in (1, 2)
    assert len(set(pooled.tolist())) == 2
    assert not set(pooled.tolist()) & set(selected.tolist())


def test_matched_controls_skip_dead_latents() -> None:
    rates_F = np.array([0.0, 0.2, 0.0, 0.0, 0.9])

    controls = matched_random_latents(np.array([1]), rates_F, np.random.default_rng(0), pool_size=5)

    assert controls.tolist() == [4]


def test_matched_controls_reproducible() -> None:
    rates_F = np.random.default_rng(1).uniform(size=50)
    first = matched_random_latents(np.arange(5), rates_F, np.random.default_rng(7))
    second = matched_random_latents(np.arange(5), rates_F, np.random.default_rng(7))

    assert first.tolist() == second.tolist()


def test_store_rates_of_identity_sae(unlearning_setup: dict) -> None:
    store = ActivationStore.open(unlearning_setup["store_dir"])
    sae = identity_sae(unlearning_setup["norm_scale"])

    rates = firing_rates_from_store(store, sae, unlearning_setup["norm_scale"], batch_size=7)

    np.testing.assert_array_equal(rates.forget_F[:FORGET_DIMS], 1.0)
    np.testing.assert_array_equal(rates.retain_F[:FORGET_DIMS], 0.0)
    np.testing.assert_array_equal(rates.retain_F[D_MODEL : D_MODEL + FORGET_DIMS], 1.0)
    arrays = store.read_shard(0, ["acts", "domain", "split"])
    train = arrays["split"] == 0
    x_ND = torch.from_numpy(arrays["acts"][train]) * unlearning_setup["norm_scale"]
    fires_NF = (sae.encode(x_ND) > 0).numpy()
    retain = arrays["domain"][train] == 1
    np.testing.assert_allclose(rates.retain_F, fires_NF[retain].mean(axis=0))
    np.testing.assert_allclose(rates.forget_F, fires_NF[~retain].mean(axis=0))
    assert rates.n_forget_tokens + rates.n_retain_tokens == train.sum()


def test_cache_rates(tmp_path) -> None:
    sae = identity_sae(1.0)
    cache = CorrelationCache(D_MODEL, 2 * D_MODEL, n_folds=2, model="tiny", layer=0)
    x_BD = torch.randn(40, D_MODEL, generator=torch.Generator().manual_seed(0))
    f_BF = sae.encode(x_BD)
    domain_B = torch.arange(40) % 2
    cache.update(x_BD, f_BF, domain_B, fold_B=torch.arange(40) // 20)
    cache.save(tmp_path / "cache.zarr")

    rates = firing_rates_from_cache(tmp_path / "cache.zarr", sae, layer=0)

    fires_BF = (f_BF > 0).double().numpy()
    np.testing.assert_allclose(rates.forget_F, fires_BF[domain_B.numpy() == 0].mean(axis=0))
    np.testing.assert_allclose(rates.retain_F, fires_BF[domain_B.numpy() == 1].mean(axis=0))
    assert rates.source == "cache"
    assert rates.n_forget_tokens == 20
