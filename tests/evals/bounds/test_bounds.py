"""The bound formulas on synthetic data whose truth is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from evals.bounds.bounds import (
    BoundsError,
    MeanAccumulator,
    PerTokenCheck,
    TrainStatisticsAccumulator,
    cantelli_bound,
    clamp_delta,
    expected_damage_bound,
    per_token_bound,
    preactivation_moments,
    wilson_interval_array,
)
from evals.common import wilson_interval
from evals.unlearning.intervention import LatentClamp
from stores.masks import PackedMask
from trainer.saes import StandardSAE, StandardSAEConfig
from trainer.saes.masked import MaskedSAE, MaskedSAEConfig

D_MODEL = 8
D_SAE = 24


def gaussian_tail(mu: float, sigma: float) -> float:
    """P(N(mu, sigma^2) > 0)."""
    return 0.5 * math.erfc(-mu / (sigma * math.sqrt(2.0)))


def random_covariance(generator: torch.Generator, d_model: int) -> torch.Tensor:
    factor_DD = torch.randn(d_model, d_model, generator=generator, dtype=torch.float64)
    return factor_DD @ factor_DD.T / d_model + 0.1 * torch.eye(d_model, dtype=torch.float64)


def random_dense_sae(seed: int, activation: str = "relu") -> StandardSAE:
    sae = StandardSAE(
        StandardSAEConfig(d_in=D_MODEL, d_sae=D_SAE, activation=activation, k=4, b_dec_init="zeros")
    )
    generator = torch.Generator().manual_seed(seed)
    sae.initialize(generator=generator)
    with torch.no_grad():
        sae.b_enc_F.copy_(torch.rand(D_SAE, generator=generator) - 0.3)
        sae.b_dec_D.copy_(torch.randn(D_MODEL, generator=generator))
    return sae


def random_masked_sae(seed: int) -> MaskedSAE:
    """A masked SAE with random encoder and decoder masks and unit-norm masked decoder rows."""
    sae = MaskedSAE(
        MaskedSAEConfig(d_in=D_MODEL, d_sae=D_SAE, decoder_mask=True, b_dec_init="zeros")
    )
    generator = torch.Generator().manual_seed(seed)
    sae.initialize(generator=generator)
    encoder_FD = torch.rand(D_SAE, D_MODEL, generator=generator) < 0.5
    decoder_FD = torch.rand(D_SAE, D_MODEL, generator=generator) < 0.6
    # Every latent keeps a connection in each mask.
    encoder_FD[:, 0] = True
    decoder_FD[:, 0] = True
    sae.set_encoder_mask(PackedMask.from_dense(encoder_FD))
    sae.set_decoder_mask(PackedMask.from_dense(decoder_FD))
    sae.apply_masks_()
    sae.set_decoder_norm_to_unit_norm()
    with torch.no_grad():
        sae.b_enc_F.copy_(torch.rand(D_SAE, generator=generator) - 0.3)
    return sae


def clamp_rows(sae: StandardSAE, latents: torch.Tensor) -> torch.Tensor:
    """Effective decoder rows of ``latents``, as the intervention computes them."""
    one_hot_CF = torch.zeros(len(latents), D_SAE)
    one_hot_CF[torch.arange(len(latents)), latents] = 1.0
    return (sae.decode(one_hot_CF) - sae.decode(torch.zeros(1, D_SAE))).double()


def check_per_token(
    sae: StandardSAE, x_BD: torch.Tensor, latents: torch.Tensor, multiplier: float
) -> PerTokenCheck:
    with torch.no_grad():
        f_BC = sae.encode(x_BD)[:, latents]
        rows_CD = clamp_rows(sae, latents)
    check = PerTokenCheck(relative_tolerance=1e-4)
    domain_B = torch.arange(len(x_BD)) % 2
    check.update(
        clamp_delta(f_BC, rows_CD, multiplier).norm(dim=-1),
        per_token_bound(f_BC, multiplier),
        domain_B,
    )
    return check


# Bound 3: Cantelli on Gaussian inputs.


@pytest.mark.parametrize("offset", [-0.5, -1.0, -2.0, -4.0])
def test_cantelli_above_gaussian_tail(offset):
    generator = torch.Generator().manual_seed(0)
    cov_DD = random_covariance(generator, D_MODEL)
    mean_D = torch.randn(D_MODEL, generator=generator, dtype=torch.float64)
    b_dec_D = torch.randn(D_MODEL, generator=generator, dtype=torch.float64)
    w_D = torch.randn(D_MODEL, generator=generator, dtype=torch.float64)
    sigma = math.sqrt(float(w_D @ cov_DD @ w_D))
    # Choose the bias so that mu = offset * sigma exactly.
    bias = offset * sigma - float((mean_D - b_dec_D) @ w_D)

    mu_F, var_F = preactivation_moments(
        w_D[:, None], torch.tensor([bias], dtype=torch.float64), b_dec_D, mean_D, cov_DD
    )
    assert float(mu_F[0]) == pytest.approx(offset * sigma, rel=1e-12)
    assert float(var_F[0]) == pytest.approx(sigma**2, rel=1e-12)

    bound = float(cantelli_bound(mu_F, var_F)[0])
    exact = gaussian_tail(offset * sigma, sigma)
    assert bound == pytest.approx(1.0 / (1.0 + offset**2), rel=1e-12)
    assert bound >= exact
    # Tightness: the Gaussian tail over Cantelli's bound, a function of mu / sigma only.
    assert exact / bound == pytest.approx(gaussian_tail(offset, 1.0) * (1.0 + offset**2), rel=1e-9)


def test_cantelli_holds_on_gaussian_samples():
    generator = torch.Generator().manual_seed(1)
    cov_DD = random_covariance(generator, D_MODEL)
    mean_D = torch.randn(D_MODEL, generator=generator, dtype=torch.float64)
    W_DF = torch.randn(D_MODEL, 4, generator=generator, dtype=torch.float64)
    b_dec_D = torch.zeros(D_MODEL, dtype=torch.float64)
    sigma_F = torch.sqrt(torch.einsum("df,de,ef->f", W_DF, cov_DD, W_DF))
    b_enc_F = -torch.tensor([0.5, 1.0, 1.5, 2.5], dtype=torch.float64) * sigma_F - mean_D @ W_DF

    n_samples = 40_000
    chol_DD = torch.linalg.cholesky(cov_DD)
    x_ND = (
        mean_D
        + torch.randn(n_samples, D_MODEL, generator=generator, dtype=torch.float64) @ chol_DD.T
    )
    rates_F = ((x_ND @ W_DF + b_enc_F) > 0).double().mean(dim=0).numpy()

    mu_F, var_F = preactivation_moments(W_DF, b_enc_F, b_dec_D, mean_D, cov_DD)
    bound_F = cantelli_bound(mu_F, var_F).numpy()
    for index in range(4):
        exact = gaussian_tail(float(mu_F[index]), float(sigma_F[index]))
        assert rates_F[index] <= bound_F[index]
        # Four standard errors: the sampled rate estimates the exact tail.
        assert abs(rates_F[index] - exact) <= 4.0 * math.sqrt(exact * (1.0 - exact) / n_samples)


def test_cantelli_edge_cases():
    mu_F = torch.tensor([1.0, 0.0, -1.0, -2.0])
    var_F = torch.tensor([4.0, 4.0, 0.0, 4.0])
    bound_F = cantelli_bound(mu_F, var_F)
    assert bound_F.tolist() == [1.0, 1.0, 0.0, 0.5]


def test_pruning_reduces_variance_as_computed():
    cov_DD = torch.tensor(
        [[2.0, 0.5, 0.3], [0.5, 1.0, -0.2], [0.3, -0.2, 3.0]], dtype=torch.float64
    )
    mean_D = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    zeros_D = torch.zeros(3, dtype=torch.float64)
    w_D = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    pruned_D = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    bias = torch.tensor([-1.0], dtype=torch.float64)

    mu_full, var_full = preactivation_moments(w_D[:, None], bias, zeros_D, mean_D, cov_DD)
    mu_pruned, var_pruned = preactivation_moments(pruned_D[:, None], bias, zeros_D, mean_D, cov_DD)

    # By hand: w^T S w = 2 + 4 + 3 + 2 (2 * 1 * 2 * 0.5) - 0.6 (2 * 1 * -1 * 0.3) + 0.8 (2 * 2 * -1 * -0.2) = 11.2.
    assert float(var_full[0]) == pytest.approx(11.2, rel=1e-12)
    # On the support {0, 1}: 2 + 4 + 2 = 8.
    assert float(var_pruned[0]) == pytest.approx(8.0, rel=1e-12)
    # mu: 1 * 1 + 2 * -1 - 1 = -2 with every connection, 1 - 1 = 0 without the last.
    assert float(mu_full[0]) == pytest.approx(-2.0, rel=1e-12)
    assert float(mu_pruned[0]) == pytest.approx(0.0, abs=1e-12)
    # Same mean, smaller variance: a tighter bound.
    bias_shifted = torch.tensor([-3.0], dtype=torch.float64)
    _, var_a = preactivation_moments(w_D[:, None], bias_shifted, zeros_D, zeros_D, cov_DD)
    _, var_b = preactivation_moments(pruned_D[:, None], bias_shifted, zeros_D, zeros_D, cov_DD)
    mu = torch.tensor([-3.0], dtype=torch.float64)
    assert float(cantelli_bound(mu, var_b)[0]) == pytest.approx(8.0 / 17.0)
    assert float(cantelli_bound(mu, var_a)[0]) == pytest.approx(11.2 / 20.2)


def test_masked_sae_moments_match_samples():
    sae = random_masked_sae(seed=2)
    generator = torch.Generator().manual_seed(3)
    x_ND = torch.randn(20_000, D_MODEL, generator=generator, dtype=torch.float64) * 2.0 + 0.5
    W_DF = (sae.W_enc_DF * sae.encoder_mask_DF).double().detach()
    mu_F, var_F = preactivation_moments(
        W_DF,
        sae.b_enc_F.double().detach(),
        sae.b_dec_D.double().detach(),
        x_ND.mean(0),
        torch.cov(x_ND.T, correction=0),
    )
    with torch.no_grad():
        pre_NF = sae.pre_activations(x_ND.float()).double()
    torch.testing.assert_close(mu_F, pre_NF.mean(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(var_F, pre_NF.var(0, correction=0), rtol=1e-4, atol=1e-4)


# Bound 1: per token.


@pytest.mark.parametrize("kind", ["dense", "masked", "topk"])
def test_per_token_bound_holds(kind):
    sae = (
        random_masked_sae(4)
        if kind == "masked"
        else random_dense_sae(4, "topk" if kind == "topk" else "relu")
    )
    x_BD = torch.randn(512, D_MODEL, generator=torch.Generator().manual_seed(5)) * 2.0
    for multiplier in (0.0, 25.0, 100.0):
        check = check_per_token(sae, x_BD, torch.tensor([0, 3, 5, 7, 11]), multiplier)
        summary = check.summary()
        assert summary.checks == 512
        assert summary.violations == 0
        assert summary.n_active > 0
        assert summary.max_ratio <= 1.0 + 1e-4
        assert check.summary(0).checks + check.summary(1).checks == 512


def test_broken_decoder_violates_bound():
    sae = random_dense_sae(6)
    with torch.no_grad():
        sae.W_dec_FD.mul_(2.0)
    x_BD = torch.randn(256, D_MODEL, generator=torch.Generator().manual_seed(7)) * 2.0
    summary = check_per_token(sae, x_BD, torch.tensor([1, 2]), 25.0).summary()
    assert summary.n_active > 0
    assert summary.violations > 0
    assert summary.max_ratio > 1.5


def test_single_latent_bound_is_tight():
    sae = random_dense_sae(8)
    x_BD = torch.randn(256, D_MODEL, generator=torch.Generator().manual_seed(9)) * 2.0
    summary = check_per_token(sae, x_BD, torch.tensor([2]), 25.0).summary()
    # One unit-norm row: ||(c + f) d|| = c + f, so the ratio is 1 up to float32 rounding.
    assert summary.n_active > 0
    assert summary.mean_tightness == pytest.approx(1.0, abs=1e-5)


def test_tolerance_decides_violation():
    check = PerTokenCheck(relative_tolerance=1e-4)
    bound_B = torch.tensor([1.0, 1.0, 0.0, 2.0], dtype=torch.float64)
    measured_B = torch.tensor([1.0 + 5e-5, 1.0 + 2e-4, 0.0, 1.0], dtype=torch.float64)
    check.update(measured_B, bound_B, torch.tensor([0, 1, 0, 1]))
    assert check.summary().violations == 1
    assert check.summary(1).violations == 1
    assert check.summary().n_active == 3
    assert check.summary().max_ratio == pytest.approx(1.0 + 2e-4)
    assert check.summary().mean_tightness == pytest.approx((1.0 + 5e-5 + 1.0 + 2e-4 + 0.5) / 3)


def test_clamp_delta_matches_intervention():
    sae = random_masked_sae(10)
    norm_scale = 0.7
    latents = [0, 4, 9]
    clamp = LatentClamp(sae, latents, 50.0, norm_scale)
    x_raw_BD = torch.randn(64, D_MODEL, generator=torch.Generator().manual_seed(11)) * 3.0
    with torch.no_grad():
        f_BC = sae.encode(x_raw_BD * norm_scale)[:, latents]
    delta_BD = clamp_delta(f_BC, clamp_rows(sae, torch.tensor(latents)), 50.0)
    # The intervention works on the raw scale, the bounds on the normalized one.
    torch.testing.assert_close(
        clamp.delta(x_raw_BD).double() * norm_scale, delta_BD, rtol=1e-5, atol=1e-4
    )


# Bound 2: expected retain damage.


def test_expected_damage_bound_holds_and_matches_direct():
    generator = torch.Generator().manual_seed(12)
    n_tokens, n_latents = 4000, 6
    active_NC = torch.rand(n_tokens, n_latents, generator=generator) < 0.1
    f_NC = torch.where(
        active_NC, torch.rand(n_tokens, n_latents, generator=generator) * 5.0, 0.0
    ).double()
    rows_CD = torch.randn(n_latents, D_MODEL, generator=generator, dtype=torch.float64)
    rows_CD /= rows_CD.norm(dim=1, keepdim=True)

    for multiplier in (10.0, 100.0):
        measured_N = clamp_delta(f_NC, rows_CD, multiplier).norm(dim=-1)
        rate_C = (f_NC > 0).double().mean(dim=0)
        mean_f_C = f_NC.mean(dim=0)
        bound = expected_damage_bound(rate_C, mean_f_C, multiplier)

        direct = sum(multiplier * float(rate_C[i]) + float(mean_f_C[i]) for i in range(n_latents))
        assert bound == pytest.approx(direct, rel=1e-12)
        # The bound is the mean of the per-token bounds.
        assert bound == pytest.approx(float(per_token_bound(f_NC, multiplier).mean()), rel=1e-12)
        assert float(measured_N.mean()) <= bound


def test_expected_damage_bound_rejects_shapes():
    with pytest.raises(BoundsError, match="one shape"):
        expected_damage_bound(torch.zeros(3), torch.zeros(4), 1.0)


def test_mean_accumulator_matches_student_t():
    values = np.random.default_rng(13).normal(1e6, 2.0, size=1001)
    accumulator = MeanAccumulator()
    for start in range(0, len(values), 100):
        accumulator.update(torch.from_numpy(values[start : start + 100]))
    interval = accumulator.interval()
    half_width = stats.t.ppf(0.975, df=1000) * values.std(ddof=1) / math.sqrt(1001)
    assert interval.n == 1001
    assert interval.mean == pytest.approx(values.mean(), rel=1e-14)
    assert interval.ci_low == pytest.approx(values.mean() - half_width, rel=1e-12)
    assert interval.ci_high == pytest.approx(values.mean() + half_width, rel=1e-12)


def test_mean_accumulator_small_samples():
    accumulator = MeanAccumulator()
    assert accumulator.interval().mean is None
    accumulator.update(torch.tensor([2.0]))
    interval = accumulator.interval()
    assert interval.mean == 2.0
    assert interval.ci_low is None


# Shared statistics.


def test_wilson_array_matches_scalar():
    successes = np.array([0, 1, 17, 99, 100])
    low, high = wilson_interval_array(successes, 100)
    for index, count in enumerate(successes):
        expected_low, expected_high = wilson_interval(int(count), 100)
        assert low[index] == pytest.approx(expected_low, abs=1e-15)
        assert high[index] == pytest.approx(expected_high, abs=1e-15)
    nan_low, _ = wilson_interval_array(successes, 0)
    assert np.isnan(nan_low).all()


def test_train_statistics_match_numpy():
    generator = np.random.default_rng(14)
    x_ND = generator.normal(50.0, 1.5, size=(600, D_MODEL))
    f_NF = np.maximum(generator.normal(-0.5, 1.0, size=(600, D_SAE)), 0.0)
    domain_N = generator.integers(0, 2, size=600)
    accumulator = TrainStatisticsAccumulator(D_MODEL, D_SAE)
    for start in range(0, 600, 128):
        batch = slice(start, start + 128)
        accumulator.update(
            torch.from_numpy(x_ND[batch]),
            torch.from_numpy(f_NF[batch]),
            torch.from_numpy(domain_N[batch]),
        )
    statistics = accumulator.result()

    retain = domain_N == 1
    np.testing.assert_allclose(statistics.retain_mean_x_D.numpy(), x_ND[retain].mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        statistics.retain_cov_x_DD.numpy(), np.cov(x_ND[retain].T, bias=True), atol=1e-10
    )
    np.testing.assert_allclose(statistics.retain_rate_F.numpy(), (f_NF[retain] > 0).mean(0))
    np.testing.assert_allclose(statistics.forget_rate_F.numpy(), (f_NF[~retain] > 0).mean(0))
    np.testing.assert_allclose(statistics.retain_mean_f_F.numpy(), f_NF[retain].mean(0), rtol=1e-12)
    assert statistics.n_retain == retain.sum()


def test_train_statistics_need_both_domains():
    accumulator = TrainStatisticsAccumulator(D_MODEL, D_SAE)
    accumulator.update(
        torch.zeros(4, D_MODEL), torch.zeros(4, D_SAE), torch.ones(4, dtype=torch.int64)
    )
    with pytest.raises(BoundsError, match="0 forget"):
        accumulator.result()
