"""Hand-computed checks of the core metric accumulators."""

import math

import pytest
import torch

from evals.core.metrics import (
    CoreMetricAccumulator,
    DownstreamLossAccumulator,
    firing_frequency_summary,
    max_cosine_similarity,
    next_token_mask,
)

# Four tokens in D = 2 with a non-zero mean mu = (2, 1).
# Squared deviations from mu: 5, 1, 5, 9 (sum 20). Squared norms: 0, 4, 16, 20 (sum 40).
X = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0], [2.0, 4.0]])
# Squared residuals: 0, 1, 0, 4 (sum 5).
X_HAT = torch.tensor([[0.0, 0.0], [2.0, 1.0], [4.0, 0.0], [2.0, 2.0]])
# Active latents per token: 0, 1, 2, 1. Latent 2 never fires.
F = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.5, 0.0], [0.0, 3.0, 0.0]])
MU = torch.tensor([2.0, 1.0])


def accumulate(x, x_hat, f, batch_size, legacy_mean=None):
    accumulator = CoreMetricAccumulator(d_sae=f.shape[1], legacy_mean_D=legacy_mean)
    for start in range(0, x.shape[0], batch_size):
        stop = start + batch_size
        accumulator.update(x[start:stop], x_hat[start:stop], f[start:stop])
    return accumulator.compute()


def test_reconstruction_metrics_by_hand():
    metrics = accumulate(X, X_HAT, F, batch_size=4, legacy_mean=MU)

    assert metrics.n_tokens == 4
    assert metrics.explained_variance == pytest.approx(1 - 5 / 20)
    assert metrics.explained_variance_legacy == pytest.approx((1 + 0 + 1 + (1 - 4 / 9)) / 4)
    assert metrics.mse == pytest.approx(5 / (4 * 2))

    cossim_by_token = [0.0, 4 / (2 * math.sqrt(5)), 1.0, 12 / (math.sqrt(20) * math.sqrt(8))]
    assert metrics.cossim == pytest.approx(sum(cossim_by_token) / 4)
    assert metrics.l2_norm_in == pytest.approx((0 + 2 + 4 + math.sqrt(20)) / 4)
    assert metrics.l2_norm_out == pytest.approx((0 + math.sqrt(5) + 4 + math.sqrt(8)) / 4)
    # The zero input takes the ||x|| < 1e-4 guard: its ratio is ||x_hat|| = 0.
    ratio_by_token = [0.0, math.sqrt(5) / 2, 1.0, math.sqrt(8) / math.sqrt(20)]
    assert metrics.l2_ratio == pytest.approx(sum(ratio_by_token) / 4)
    assert metrics.relative_reconstruction_bias == pytest.approx(
        (0 + 5 + 16 + 8) / (0 + 4 + 16 + 12)
    )


def test_sparsity_metrics_by_hand():
    metrics = accumulate(X, X_HAT, F, batch_size=2)

    assert metrics.l0 == pytest.approx((0 + 1 + 2 + 1) / 4)
    assert metrics.l1 == pytest.approx((0 + 1 + 2.5 + 3) / 4)
    assert metrics.frac_alive == pytest.approx(2 / 3)
    assert metrics.firing_frequency_F.tolist() == pytest.approx([0.5, 0.5, 0.0])


def test_l1_uses_absolute_values():
    f = F.clone()
    f[0, 2] = -0.5

    metrics = accumulate(X, X_HAT, f, batch_size=4)

    assert metrics.l1 == pytest.approx((0.5 + 1 + 2.5 + 3) / 4)
    assert metrics.frac_alive == pytest.approx(1.0)


def test_explained_variance_is_about_the_mean():
    metrics = accumulate(X, X_HAT, F, batch_size=4)
    uncentered = 1 - 5 / 40

    assert metrics.explained_variance == pytest.approx(0.75)
    assert metrics.explained_variance != pytest.approx(uncentered)


def test_legacy_needs_a_mean():
    metrics = accumulate(X, X_HAT, F, batch_size=4)

    assert metrics.explained_variance_legacy is None


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_metrics_independent_of_batch_size(batch_size):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=generator) + 3.0
    x_hat = x + 0.3 * torch.randn(7, 5, generator=generator)
    f = torch.relu(torch.randn(7, 11, generator=generator))
    mean = x.double().mean(dim=0)

    reference = accumulate(x, x_hat, f, batch_size=7, legacy_mean=mean)
    split = accumulate(x, x_hat, f, batch_size=batch_size, legacy_mean=mean)

    assert split.mse == pytest.approx(reference.mse, rel=1e-12)
    assert split.explained_variance == pytest.approx(reference.explained_variance, rel=1e-12)
    assert split.explained_variance_legacy == pytest.approx(
        reference.explained_variance_legacy, rel=1e-12
    )
    assert split.cossim == pytest.approx(reference.cossim, rel=1e-12)
    assert split.l0 == reference.l0
    assert split.l1 == pytest.approx(reference.l1, rel=1e-12)
    assert torch.equal(split.firing_frequency_F, reference.firing_frequency_F)


def test_mse_matches_elementwise_mean():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=generator)
    x_hat = torch.randn(6, 4, generator=generator)
    f = torch.ones(6, 2)

    metrics = accumulate(x, x_hat, f, batch_size=6)

    assert metrics.mse == pytest.approx(
        torch.nn.functional.mse_loss(x.double(), x_hat.double()).item()
    )


def test_explained_variance_with_large_offset():
    # A dimension with a mean 1e6 times its spread must not lose the variance to cancellation.
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(64, 3, generator=generator, dtype=torch.float64)
    x = noise + torch.tensor([1e6, 0.0, 0.0], dtype=torch.float64)
    x_hat = x - 0.1 * noise
    f = torch.ones(64, 2)

    metrics = accumulate(x, x_hat, f, batch_size=5)

    centered_noise = noise - noise.mean(dim=0)
    expected = 1 - 0.01 * noise.square().sum().item() / centered_noise.square().sum().item()
    assert metrics.explained_variance == pytest.approx(expected, rel=1e-9)


def test_zero_variance_raises():
    x = torch.ones(3, 2)
    accumulator = CoreMetricAccumulator(d_sae=2)
    accumulator.update(x, x, torch.zeros(3, 2))

    with pytest.raises(ValueError, match="zero variance"):
        accumulator.compute()


def test_empty_accumulator_raises():
    with pytest.raises(ValueError, match="no tokens"):
        CoreMetricAccumulator(d_sae=2).compute()


def test_shape_mismatch_raises():
    accumulator = CoreMetricAccumulator(d_sae=3)

    with pytest.raises(ValueError, match="d_sae"):
        accumulator.update(X, X_HAT, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="x_hat"):
        accumulator.update(X, X_HAT[:, :1], F)


def test_firing_frequency_summary_by_hand():
    summary = firing_frequency_summary(torch.tensor([0.0, 0.005, 0.02, 0.5]))

    assert summary["freq_over_1_percent"] == pytest.approx(2 / 4)
    assert summary["freq_over_10_percent"] == pytest.approx(1 / 4)
    assert summary["normalized_freq_over_1_percent"] == pytest.approx(0.52 / 0.525)
    assert summary["normalized_freq_over_10_percent"] == pytest.approx(0.5 / 0.525)


def test_firing_frequency_summary_all_dead():
    summary = firing_frequency_summary(torch.zeros(4))

    assert summary["normalized_freq_over_1_percent"] == 0.0
    assert summary["freq_over_1_percent"] == 0.0


@pytest.mark.parametrize("chunk_size", [1, 2, 1024])
def test_max_cosine_similarity_by_hand(chunk_size):
    vectors = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [0.0, 0.0]])

    max_sims = max_cosine_similarity(vectors, chunk_size=chunk_size)

    assert max_sims.tolist() == pytest.approx(
        [1 / math.sqrt(2), 1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]
    )


def test_next_token_mask_excludes_specials():
    bos, eos = 1, 2
    input_ids = torch.tensor([[bos, 5, 6, eos, 7, 8]])

    mask = next_token_mask(input_ids, {bos, eos})

    # 0: input BOS; 1: 5 -> 6 scored; 2: target EOS; 3: input EOS; 4: 7 -> 8 scored; 5: no target.
    assert mask.tolist() == [[False, True, False, False, True, False]]


def two_position_logits():
    # Position 0: target 0. Original p = (1/2, 1/2), SAE p = (3/4, 1/4), ablation p = (1/8, 7/8).
    # Position 1: identical logits in all three runs, target 1, p = (1/2, 1/2).
    original = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    sae = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])
    ablation = torch.tensor([[0.0, math.log(7)], [0.0, 0.0]])
    targets = torch.tensor([0, 1])
    return original, sae, ablation, targets


@pytest.mark.parametrize("chunk_size", [1, 64])
def test_downstream_metrics_by_hand(chunk_size):
    accumulator = DownstreamLossAccumulator(chunk_size=chunk_size)
    accumulator.update(*two_position_logits())

    metrics = accumulator.compute()

    ln = math.log
    ce_original = (ln(2) + ln(2)) / 2
    ce_sae = (ln(4 / 3) + ln(2)) / 2
    ce_ablation = (ln(8) + ln(2)) / 2
    kl_sae = (0.5 * ln(0.5 / 0.75) + 0.5 * ln(0.5 / 0.25) + 0.0) / 2
    kl_ablation = (0.5 * ln(0.5 / 0.125) + 0.5 * ln(0.5 / 0.875) + 0.0) / 2
    assert metrics.n_tokens == 2
    assert metrics.ce_loss_without_sae == pytest.approx(ce_original)
    assert metrics.ce_loss_with_sae == pytest.approx(ce_sae)
    assert metrics.ce_loss_with_ablation == pytest.approx(ce_ablation)
    assert metrics.ce_loss_score == pytest.approx(ln(6) / ln(4))
    assert metrics.kl_div_with_sae == pytest.approx(kl_sae)
    assert metrics.kl_div_with_ablation == pytest.approx(kl_ablation)
    assert metrics.kl_div_score == pytest.approx(1 - ln(4 / 3) / ln(16 / 7))


def test_downstream_perfect_sae_scores_one():
    original, _, ablation, targets = two_position_logits()
    accumulator = DownstreamLossAccumulator()
    accumulator.update(original, original.clone(), ablation, targets)

    metrics = accumulator.compute()

    assert metrics.ce_loss_score == pytest.approx(1.0)
    assert metrics.kl_div_score == pytest.approx(1.0)
    assert metrics.kl_div_with_sae == pytest.approx(0.0, abs=1e-7)


def test_downstream_undefined_scores_are_none():
    original, _, _, targets = two_position_logits()
    accumulator = DownstreamLossAccumulator()
    accumulator.update(original, original, original, targets)

    metrics = accumulator.compute()

    assert metrics.ce_loss_score is None
    assert metrics.kl_div_score is None


def test_downstream_split_calls_match():
    original, sae, ablation, targets = two_position_logits()
    whole = DownstreamLossAccumulator()
    whole.update(original, sae, ablation, targets)
    parts = DownstreamLossAccumulator()
    parts.update(original[:1], sae[:1], ablation[:1], targets[:1])
    parts.update(original[1:], sae[1:], ablation[1:], targets[1:])

    assert parts.compute() == whole.compute()


def test_downstream_shape_mismatch_raises():
    original, sae, ablation, targets = two_position_logits()
    accumulator = DownstreamLossAccumulator()

    with pytest.raises(ValueError, match="logits_sae_NV"):
        accumulator.update(original, sae[:1], ablation, targets)
    with pytest.raises(ValueError, match="targets"):
        accumulator.update(original, sae, ablation, targets[:1])
