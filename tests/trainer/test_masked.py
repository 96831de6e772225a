"""Tests of MaskedSAE: masked forward pass, mask invariants under training, save and load."""

from __future__ import annotations

import json

import pytest
import torch

from stores.masks import MaskError, PackedMask
from tests.trainer.conftest import tiny_train_config
from trainer.pruning.fixed import FixedPruningHook
from trainer.pruning.options import FixedOptions
from trainer.saes import Variant, load_sae, register_variant
from trainer.saes.masked import MaskedSAE, MaskedSAEConfig, build_masked_sae_config
from trainer.saes.standard import StandardSAE, StandardSAEConfig
from trainer.train import train

D_IN, D_SAE = 8, 12


def random_mask(rows: int, cols: int, density: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(rows, cols, generator=generator) < density


def make_sae(decoder_mask: bool = False, activation: str = "relu", seed: int = 0) -> MaskedSAE:
    cfg = MaskedSAEConfig(d_in=D_IN, d_sae=D_SAE, decoder_mask=decoder_mask, activation=activation, k=3, b_dec_init="zeros")
    sae = MaskedSAE(cfg)
    sae.initialize(generator=torch.Generator().manual_seed(seed))
    return sae


def test_forward_matches_masked_standard_sae():
    sae = make_sae(decoder_mask=True)
    encoder_FD = random_mask(D_SAE, D_IN, 0.5, seed=1)
    decoder_FD = random_mask(D_SAE, D_IN, 0.5, seed=2)
    sae.set_encoder_mask(PackedMask.from_dense(encoder_FD))
    sae.set_decoder_mask(PackedMask.from_dense(decoder_FD))

    reference = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, b_dec_init="zeros"))
    with torch.no_grad():
        reference.W_enc_DF.copy_(sae.W_enc_DF * encoder_FD.T)
        reference.W_dec_FD.copy_(sae.W_dec_FD * decoder_FD)
        reference.b_enc_F.copy_(sae.b_enc_F)
        reference.b_dec_D.copy_(sae.b_dec_D)

    x_BD = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(3))
    x_hat_BD, f_BF = sae(x_BD)
    expected_x_hat_BD, expected_f_BF = reference(x_BD)
    assert torch.allclose(f_BF, expected_f_BF, atol=1e-6)
    assert torch.allclose(x_hat_BD, expected_x_hat_BD, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_pruned_weights_and_moments_stay_zero(activation):
    sae = make_sae(decoder_mask=True, activation=activation)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    encoder_FD = random_mask(D_SAE, D_IN, 0.4, seed=4)
    decoder_FD = random_mask(D_SAE, D_IN, 0.6, seed=5)
    generator = torch.Generator().manual_seed(6)

    for step in range(6):
        if step == 2:
            # Prune after Adam has nonzero moments everywhere.
            sae.set_encoder_mask(PackedMask.from_dense(encoder_FD))
            sae.set_decoder_mask(PackedMask.from_dense(decoder_FD))
            sae.apply_masks_(optimizer)
        x_BD = torch.randn(16, D_IN, generator=generator)
        x_hat_BD, f_BF = sae(x_BD)
        loss = sae.training_loss(x_BD, x_hat_BD, f_BF, l1_coefficient=0.1).loss
        optimizer.zero_grad()
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        sae.set_decoder_norm_to_unit_norm()
        if step < 2:
            continue

        for parameter, live in ((sae.W_enc_DF, encoder_FD.T), (sae.W_dec_FD, decoder_FD)):
            assert torch.all(parameter[~live] == 0)
            state = optimizer.state[parameter]
            assert torch.all(state["exp_avg"][~live] == 0)
            assert torch.all(state["exp_avg_sq"][~live] == 0)
            assert bool((parameter[live] != 0).any())


def test_regrown_connection_starts_at_zero():
    sae = make_sae()
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    encoder_FD = torch.ones(D_SAE, D_IN, dtype=torch.bool)
    encoder_FD[0, 0] = False
    generator = torch.Generator().manual_seed(7)

    def step() -> None:
        x_BD = torch.randn(16, D_IN, generator=generator) + 1.0
        x_hat_BD, f_BF = sae(x_BD)
        optimizer.zero_grad()
        sae.training_loss(x_BD, x_hat_BD, f_BF, l1_coefficient=0.0).loss.backward()
        optimizer.step()

    step()
    sae.set_encoder_mask(PackedMask.from_dense(encoder_FD))
    sae.apply_masks_(optimizer)
    step()
    sae.set_encoder_mask(PackedMask.ones(D_SAE, D_IN))
    assert sae.W_enc_DF[0, 0] == 0
    assert optimizer.state[sae.W_enc_DF]["exp_avg"][0, 0] == 0
    assert optimizer.state[sae.W_enc_DF]["exp_avg_sq"][0, 0] == 0
    step()
    assert sae.W_enc_DF[0, 0] != 0


def test_mask_densities_and_shape_errors():
    sae = make_sae(decoder_mask=False)
    encoder_FD = torch.zeros(D_SAE, D_IN, dtype=torch.bool)
    encoder_FD[:, :2] = True
    sae.set_encoder_mask(PackedMask.from_dense(encoder_FD))
    assert sae.mask_densities() == {"encoder_density": pytest.approx(2 / D_IN), "decoder_density": None}

    with pytest.raises(MaskError, match=r"shape \(8, 12\), this SAE needs \(12, 8\)"):
        sae.set_encoder_mask(PackedMask.ones(D_IN, D_SAE))
    with pytest.raises(MaskError, match="no decoder mask"):
        sae.set_decoder_mask(PackedMask.ones(D_SAE, D_IN))


def test_save_load_keeps_masks(tmp_path):
    sae = make_sae(decoder_mask=True)
    sae.set_encoder_mask(PackedMask.from_dense(random_mask(D_SAE, D_IN, 0.3, seed=8)))
    sae.set_decoder_mask(PackedMask.from_dense(random_mask(D_SAE, D_IN, 0.7, seed=9)))
    sae.apply_masks_()
    sae.save(tmp_path / "sae")

    loaded = load_sae(tmp_path / "sae")
    assert isinstance(loaded, MaskedSAE)
    assert loaded.encoder_mask == sae.encoder_mask
    assert loaded.decoder_mask == sae.decoder_mask
    x_BD = torch.randn(4, D_IN)
    assert torch.equal(loaded(x_BD)[0], sae(x_BD)[0])

    folded = sae.fold_normalization(2.0)
    assert folded.encoder_mask == sae.encoder_mask


def test_load_without_masks_is_an_error(tmp_path):
    sae = make_sae()
    sae.save(tmp_path / "sae")
    for path in sorted((tmp_path / "sae" / "masks").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    with pytest.raises(MaskError, match="No mask array"):
        load_sae(tmp_path / "sae")


def test_dense_gradients_match_unmasked_sae():
    sae = make_sae()
    encoder_FD = random_mask(D_SAE, D_IN, 0.5, seed=10)
    sae.set_encoder_mask(PackedMask.from_dense(encoder_FD))
    sae.apply_masks_()

    reference = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, b_dec_init="zeros"))
    reference.load_state_dict(sae.state_dict())
    x_BD = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(11)) + 0.5
    x_hat_BD, f_BF = reference(x_BD)
    reference.training_loss(x_BD, x_hat_BD, f_BF, l1_coefficient=0.3).loss.backward()

    grad_W_enc_DF, grad_W_dec_FD = sae.dense_gradients(x_BD, l1_coefficient=0.3)
    assert torch.allclose(grad_W_enc_DF, reference.W_enc_DF.grad, atol=1e-6)
    assert torch.allclose(grad_W_dec_FD, reference.W_dec_FD.grad, atol=1e-6)
    assert bool((grad_W_enc_DF[~encoder_FD.T] != 0).any())
    assert sae.W_enc_DF.grad is None


class CheckingFixedHook(FixedPruningHook):
    """Checks every masked-SAE invariant after each training step."""

    checked_steps = 0
    events = 0

    def prune_event(self, done, optimizer, batch):
        alive_before_F = (self.sae.encode(batch.x_BD) > 0).any(dim=0)
        event = super().prune_event(done, optimizer, batch)
        alive_after_F = (self.sae.encode(batch.x_BD) > 0).any(dim=0)
        assert not bool((alive_before_F & ~alive_after_F).any())
        CheckingFixedHook.events += event is not None
        return event

    def after_optimizer_step(self, step, sae, optimizer, batch, f_BF):
        super().after_optimizer_step(step, sae, optimizer, batch, f_BF)
        live_DF = sae.encoder_mask.to_dense().T
        assert torch.all(sae.W_enc_DF[~live_DF] == 0)
        state = optimizer.state[sae.W_enc_DF]
        assert torch.all(state["exp_avg"][~live_DF] == 0)
        assert torch.all(state["exp_avg_sq"][~live_DF] == 0)
        assert int(sae.encoder_mask.row_counts().min()) >= self.options.min_connections
        CheckingFixedHook.checked_steps += 1


register_variant(
    Variant(
        name="fixed-checking-test",
        sae_class=MaskedSAE,
        options_class=FixedOptions,
        build_sae_config=build_masked_sae_config,
        make_hook=CheckingFixedHook,
    )
)


def test_invariants_hold_in_training(sparse_store, tmp_path):
    CheckingFixedHook.checked_steps = 0
    CheckingFixedHook.events = 0
    cfg = tiny_train_config(
        sparse_store,
        tmp_path,
        run_name="checked",
        variant="fixed-checking-test",
        variant_options={"min_connections": 3, "prune_every": 3, "target_density": 0.2, "cache_every": 2},
        l1_warmup_steps=0,
        lr_warmup_steps=0,
        lr_decay_steps=0,
        seed=3,
        checkpoint_every=0,
        log_every=10,
    )
    run_dir = train(cfg)
    assert CheckingFixedHook.checked_steps == 30
    assert CheckingFixedHook.events >= 5

    sae = load_sae(run_dir / "sae")
    assert sae.cfg.metadata["variant"] == "fixed-checking-test"
    # The target keeps round(0.2 * 32 * 16) = 102 of 512 connections.
    assert sae.mask_densities()["encoder_density"] == 102 / 512
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["encoder_density"] == 102 / 512
