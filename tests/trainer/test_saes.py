"""Tests of the SAE modules: shapes, decoder constraint, TopK, L1 schedule, folding, I/O."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.saes import (
    SAE_CONFIG_FILE,
    SAEConfigError,
    StandardSAE,
    StandardSAEConfig,
    Variant,
    get_variant,
    load_sae,
    register_variant,
)
from trainer.saes.standard import geometric_median, l1_coefficient_at

D_IN = 12
D_SAE = 40


def make_sae(activation: str = "relu", k: int = 4, seed: int = 0, **overrides) -> StandardSAE:
    cfg = StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, activation=activation, k=k, **overrides)
    sae = StandardSAE(cfg)
    generator = torch.Generator().manual_seed(seed)
    sample_ND = torch.randn(64, D_IN, generator=generator) + 2.0
    sae.initialize(sample_ND, generator=generator)
    return sae


def perturb(sae: StandardSAE, seed: int = 1) -> None:
    """Give every parameter, b_enc and b_dec included, non-trivial values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    sae.set_decoder_norm_to_unit_norm()


def run_steps(sae: StandardSAE, n_steps: int, l1_coefficient: float = 1.0) -> None:
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(5)
    for _ in range(n_steps):
        x_BD = torch.randn(32, D_IN, generator=generator)
        x_hat_BD, f_BF = sae(x_BD)
        loss = sae.training_loss(x_BD, x_hat_BD, f_BF, l1_coefficient).loss
        optimizer.zero_grad()
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        sae.set_decoder_norm_to_unit_norm()


def test_forward_shapes():
    sae = make_sae()
    x_BD = torch.randn(7, D_IN)
    x_hat_BD, f_BF = sae(x_BD)
    assert x_hat_BD.shape == (7, D_IN)
    assert f_BF.shape == (7, D_SAE)
    assert sae.W_enc_DF.shape == (D_IN, D_SAE)
    assert sae.W_dec_FD.shape == (D_SAE, D_IN)
    assert sae.b_enc_F.shape == (D_SAE,)
    assert sae.b_dec_D.shape == (D_IN,)
    assert torch.equal(sae.decode(f_BF), x_hat_BD)


def test_initialization_ties_encoder_to_decoder():
    sae = make_sae()
    assert torch.allclose(sae.W_dec_FD.norm(dim=1), torch.ones(D_SAE), atol=1e-6)
    assert torch.equal(sae.W_enc_DF, sae.W_dec_FD.T)
    assert torch.equal(sae.b_enc_F, torch.zeros(D_SAE))


def test_b_dec_init_options():
    generator = torch.Generator().manual_seed(0)
    sample_ND = torch.randn(200, D_IN, generator=generator) + 3.0
    for init, expected_D in (
        ("mean", sample_ND.double().mean(dim=0).float()),
        ("geometric_median", geometric_median(sample_ND).float()),
        ("zeros", torch.zeros(D_IN)),
    ):
        sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, b_dec_init=init))
        sae.initialize(sample_ND, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(sae.b_dec_D, expected_D, atol=1e-5), init


def test_b_dec_init_needs_sample():
    sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, b_dec_init="mean"))
    with pytest.raises(SAEConfigError, match="needs a non-empty sample"):
        sae.initialize(None)


def test_geometric_median_resists_outlier():
    points_ND = torch.zeros(21, 3)
    points_ND[:, 0] = torch.arange(21, dtype=torch.float32) * 0.01
    points_ND[0] = torch.tensor([1000.0, 1000.0, 1000.0])
    median_D = geometric_median(points_ND)
    assert median_D.norm().item() < 1.0
    assert points_ND.mean(dim=0).norm().item() > 50.0


def test_decoder_rows_unit_norm_after_steps():
    sae = make_sae()
    run_steps(sae, 10)
    norms_F = sae.W_dec_FD.norm(dim=1)
    assert torch.allclose(norms_F, torch.ones(D_SAE), atol=1e-5)


def test_parallel_gradient_removed():
    torch.manual_seed(0)
    sae = make_sae()
    x_BD = torch.randn(16, D_IN)
    x_hat_BD, f_BF = sae(x_BD)
    sae.training_loss(x_BD, x_hat_BD, f_BF, 1.0).loss.backward()
    parallel_before_F = (sae.W_dec_FD.grad * sae.W_dec_FD).sum(dim=1)
    assert parallel_before_F.abs().max().item() > 1e-4
    sae.remove_gradient_parallel_to_decoder_directions()
    parallel_after_F = (sae.W_dec_FD.grad * sae.W_dec_FD).sum(dim=1)
    # float32 rounding leaves a residue proportional to the gradient's size.
    assert parallel_after_F.abs().max().item() < 1e-5 * sae.W_dec_FD.grad.norm().item()


def test_topk_l0_equals_k():
    k = 5
    sae = make_sae("topk", k=k)
    # A large positive b_enc makes every pre-activation positive, so exactly k latents fire.
    with torch.no_grad():
        sae.b_enc_F.fill_(100.0)
    f_BF = sae.encode(torch.randn(50, D_IN))
    l0_B = (f_BF > 0).sum(dim=-1)
    assert torch.equal(l0_B, torch.full((50,), k))


def test_topk_keeps_largest_preactivations():
    sae = make_sae("topk", k=3)
    x_BD = torch.randn(20, D_IN)
    pre_BF = sae.pre_activations(x_BD)
    f_BF = sae.encode(x_BD)
    top_indices_BK = pre_BF.topk(3, dim=-1).indices
    expected_BF = torch.zeros_like(pre_BF).scatter(-1, top_indices_BK, torch.relu(pre_BF.gather(-1, top_indices_BK)))
    assert torch.equal(f_BF, expected_BF)
    assert ((f_BF > 0).sum(dim=-1) <= 3).all()


def test_topk_loss_has_no_l1_term():
    sae = make_sae("topk", k=3)
    x_BD = torch.randn(20, D_IN)
    x_hat_BD, f_BF = sae(x_BD)
    losses = sae.training_loss(x_BD, x_hat_BD, f_BF, l1_coefficient=10.0)
    assert torch.equal(losses.loss, losses.mse_loss)
    assert losses.sparsity_loss.item() > 0


def test_relu_loss_formula():
    sae = make_sae()
    perturb(sae)
    x_BD = torch.randn(20, D_IN)
    x_hat_BD, f_BF = sae(x_BD)
    losses = sae.training_loss(x_BD, x_hat_BD, f_BF, l1_coefficient=0.7)
    mse_expected = ((x_BD - x_hat_BD) ** 2).sum(dim=1).mean()
    l1_expected = (f_BF * sae.W_dec_FD.norm(dim=1)).sum(dim=1).mean()
    assert torch.allclose(losses.mse_loss, mse_expected)
    assert torch.allclose(losses.sparsity_loss, l1_expected)
    assert torch.allclose(losses.loss, mse_expected + 0.7 * l1_expected)


def test_l1_warmup_schedule_values():
    assert l1_coefficient_at(0, 2.0, 4) == pytest.approx(0.5)
    assert l1_coefficient_at(1, 2.0, 4) == pytest.approx(1.0)
    assert l1_coefficient_at(3, 2.0, 4) == pytest.approx(2.0)
    assert l1_coefficient_at(100, 2.0, 4) == pytest.approx(2.0)
    assert l1_coefficient_at(0, 2.0, 0) == pytest.approx(2.0)


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_fold_normalization_equivalence(activation):
    sae = make_sae(activation, k=6, norm_scale=0.25)
    perturb(sae)
    assert sae.b_dec_D.abs().max().item() > 0.1
    b_dec_before_D = sae.b_dec_D.detach().clone()
    folded = sae.fold_normalization(0.25)
    x_raw_BD = torch.randn(30, D_IN, dtype=torch.float64).float() * 4.0 + 1.0

    x_hat_raw_BD, f_raw_BF = folded(x_raw_BD)
    x_hat_norm_BD, f_norm_BF = sae(0.25 * x_raw_BD)
    assert torch.allclose(x_hat_raw_BD, x_hat_norm_BD / 0.25, atol=1e-4, rtol=1e-5)
    assert torch.allclose(f_raw_BF, f_norm_BF, atol=1e-5)
    assert folded.cfg.activation_space == "raw"
    assert torch.equal(sae.b_dec_D, b_dec_before_D)
    assert torch.allclose(folded.b_dec_D, b_dec_before_D / 0.25)


def test_fold_normalization_rejects_bad_scale():
    sae = make_sae(norm_scale=0.25)
    with pytest.raises(SAEConfigError, match="differs"):
        sae.fold_normalization(0.5)
    with pytest.raises(SAEConfigError, match="invalid norm_scale"):
        make_sae().fold_normalization(-1.0)
    with pytest.raises(SAEConfigError, match="norm_scale is unknown"):
        make_sae().fold_normalization()
    folded = sae.fold_normalization()
    with pytest.raises(SAEConfigError, match="already takes raw"):
        folded.fold_normalization(0.25)
    with pytest.raises(SAEConfigError, match="raw activations"):
        folded.set_decoder_norm_to_unit_norm()


def test_save_load_round_trip(tmp_path):
    sae = make_sae("topk", k=7, norm_scale=0.5, metadata={"model": "synthetic", "layer": 3})
    perturb(sae)
    sae.save(tmp_path / "sae")
    config = json.loads((tmp_path / "sae" / SAE_CONFIG_FILE).read_text())
    assert config["architecture"] == "standard"
    assert config["metadata"] == {"model": "synthetic", "layer": 3}

    for loaded in (StandardSAE.load(tmp_path / "sae"), load_sae(tmp_path / "sae")):
        assert isinstance(loaded, StandardSAE)
        assert loaded.cfg == sae.cfg
        for name, tensor in sae.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not list((tmp_path / "sae").glob(".tmp-*"))


def test_load_rejects_shape_mismatch(tmp_path):
    sae = make_sae()
    sae.save(tmp_path / "sae")
    config_path = tmp_path / "sae" / SAE_CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["d_sae"] = D_SAE + 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(SAEConfigError, match="has shape .*, the config expects"):
        load_sae(tmp_path / "sae")


def test_load_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved SAE"):
        load_sae(tmp_path / "missing")


def test_config_validation():
    with pytest.raises(SAEConfigError, match="invalid k"):
        StandardSAEConfig(d_in=4, d_sae=8, activation="topk", k=9)
    with pytest.raises(SAEConfigError, match="invalid activation"):
        StandardSAEConfig(d_in=4, d_sae=8, activation="gelu")  # type: ignore[arg-type]
    with pytest.raises(SAEConfigError, match="invalid d_sae"):
        StandardSAEConfig(d_in=4, d_sae=0)
    with pytest.raises(SAEConfigError, match="invalid dtype"):
        StandardSAEConfig(d_in=4, d_sae=8, dtype="int8")


def test_variant_registry():
    assert get_variant("standard").sae_class is StandardSAE
    with pytest.raises(SAEConfigError, match="unknown variant 'nope'.*standard"):
        get_variant("nope")
    with pytest.raises(SAEConfigError, match="already registered"):
        register_variant(Variant(name="standard", sae_class=StandardSAE, make_hook=lambda context: None))
