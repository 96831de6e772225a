"""The clamp intervention: its formula, special tokens, masked decoders and the controls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evals.unlearning.intervention import InterventionError, LatentClamp, clamp_latents
from evals.unlearning.loss import context_losses, mean_interval
from evals.unlearning.scoring import MultipleChoiceScorer
from evals.unlearning.selection import matched_random_latents
from pipeline.models import capture_residual, decoder_layers
from stores.masks import PackedMask
from tests.evals.unlearning.conftest import (
    BOS_ID,
    D_MODEL,
    FORGET_DIMS,
    FORGET_IDS,
    FORGET_WORDS,
    RETAIN_IDS,
    RETAIN_WORDS,
    build_tokenizer,
    identity_sae,
    make_questions,
    sample_contexts,
)
from trainer.saes import StandardSAE, StandardSAEConfig
from trainer.saes.masked import MaskedSAE, MaskedSAEConfig

SPECIAL_IDS = [0, 1, 2, 3]


def random_sae(seed: int, norm_scale: float = 0.5) -> StandardSAE:
    torch.manual_seed(seed)
    sae = StandardSAE(
        StandardSAEConfig(d_in=8, d_sae=16, norm_scale=norm_scale, b_dec_init="zeros")
    )
    sae.initialize()
    with torch.no_grad():
        sae.b_enc_F.normal_(0, 0.5)
        sae.b_dec_D.normal_(0, 0.5)
    return sae.eval()


def test_clamp_delta_formula() -> None:
    sae = random_sae(0)
    x_ND = torch.randn(50, 8, generator=torch.Generator().manual_seed(1)) * 3
    latents = [1, 4, 9]

    delta_ND = LatentClamp(sae, latents, multiplier=7.0, norm_scale=0.5).delta(x_ND)

    f_NF = sae.encode(x_ND * 0.5)
    expected_ND = torch.zeros_like(x_ND)
    for latent in latents:
        fires_N = f_NF[:, latent] > 0
        expected_ND += (
            torch.where(fires_N, -7.0 - f_NF[:, latent], 0.0)[:, None] * sae.W_dec_FD[latent] / 0.5
        )
    torch.testing.assert_close(delta_ND, expected_ND, atol=1e-5, rtol=1e-5)
    assert (delta_ND.abs().sum(dim=1) > 0).any()


def test_clamp_sets_latents_and_keeps_error() -> None:
    sae = random_sae(2)
    x_ND = torch.randn(40, 8, generator=torch.Generator().manual_seed(3)) * 3
    latents = [0, 5]

    x_new_ND = x_ND + LatentClamp(sae, latents, multiplier=4.0, norm_scale=0.5).delta(x_ND)

    # SAEBench's form: the clamped reconstruction plus the unchanged error term, in the normalized space.
    f_NF = sae.encode(x_ND * 0.5)
    clamped_NF = f_NF.clone()
    clamped_NF[:, latents] = torch.where(f_NF[:, latents] > 0, -4.0, f_NF[:, latents])
    error_ND = x_ND * 0.5 - sae.decode(f_NF)
    torch.testing.assert_close(
        x_new_ND * 0.5, sae.decode(clamped_NF) + error_ND, atol=1e-5, rtol=1e-5
    )


def test_clamp_same_for_folded_sae() -> None:
    sae = random_sae(4, norm_scale=0.25)
    x_ND = torch.randn(30, 8, generator=torch.Generator().manual_seed(5)) * 6

    normalized = LatentClamp(sae, [2, 3], 10.0, norm_scale=0.25).delta(x_ND)
    folded = LatentClamp(sae.fold_normalization(), [2, 3], 10.0, norm_scale=0.25).delta(x_ND)

    torch.testing.assert_close(normalized, folded, atol=1e-5, rtol=1e-5)


def test_clamp_uses_masked_decoder() -> None:
    torch.manual_seed(6)
    cfg = MaskedSAEConfig(d_in=8, d_sae=16, norm_scale=0.5, b_dec_init="zeros", decoder_mask=True)
    sae = MaskedSAE(cfg)
    sae.initialize()
    generator = torch.Generator().manual_seed(7)
    sae.set_encoder_mask(PackedMask.from_dense(torch.rand(16, 8, generator=generator) > 0.3))
    decoder_mask_FD = torch.rand(16, 8, generator=generator) > 0.5
    sae.set_decoder_mask(PackedMask.from_dense(decoder_mask_FD))
    x_ND = torch.randn(30, 8, generator=generator) * 3

    delta_ND = LatentClamp(sae, [1], 5.0, norm_scale=0.5).delta(x_ND)

    # The pruned decoder weights are still non-zero (no apply_masks_), so only the mask removes them.
    f_N = sae.encode(x_ND * 0.5)[:, 1]
    row_D = sae.W_dec_FD[1].detach() * decoder_mask_FD[1] / 0.5
    expected_ND = torch.where(f_N > 0, -5.0 - f_N, 0.0)[:, None] * row_D
    assert (f_N > 0).any()
    torch.testing.assert_close(delta_ND, expected_ND, atol=1e-5, rtol=1e-5)


def test_clamp_per_token_bound() -> None:
    sae = random_sae(9)
    x_ND = torch.randn(200, 8, generator=torch.Generator().manual_seed(10)) * 3
    latents = [0, 3, 7, 11]

    delta_norm_ND = LatentClamp(sae, latents, 20.0, norm_scale=0.5).delta(x_ND) * 0.5

    f_NC = sae.encode(x_ND * 0.5)[:, latents]
    bound_N = torch.where(f_NC > 0, 20.0 + f_NC, 0.0).sum(dim=1)
    assert (delta_norm_ND.norm(dim=1) <= bound_N + 1e-4).all()


def test_invalid_multiplier_rejected() -> None:
    with pytest.raises(InterventionError, match="multiplier -1"):
        LatentClamp(random_sae(0), [0], -1.0, norm_scale=1.0)


def test_clamp_skips_special_tokens_and_cleans_up(tiny_model: torch.nn.Module) -> None:
    input_ids = torch.tensor([[BOS_ID, FORGET_IDS[0], RETAIN_IDS[0], FORGET_IDS[1], 2]])
    with torch.no_grad():
        before = capture_residual(tiny_model, 0, input_ids)
        sae = identity_sae(0.5)
        captured = []
        handle = decoder_layers(tiny_model)[1].register_forward_pre_hook(
            lambda module, args: captured.append(args[0].clone())
        )
        try:
            with clamp_latents(
                tiny_model, 0, sae, [0], 30.0, norm_scale=0.5, special_token_ids=SPECIAL_IDS
            ):
                tiny_model(input_ids=input_ids)
            tiny_model(input_ids=input_ids)
        finally:
            handle.remove()

    clamped, restored = captured[0][0], captured[1][0]
    # BOS (0), the retain word (2) and EOS (4) keep their residual; forget words get x_0 = -30 / norm_scale.
    torch.testing.assert_close(clamped[[0, 2, 4]], before[0, [0, 2, 4]])
    assert clamped[1, 0].item() == pytest.approx(-60.0, rel=1e-5)
    assert clamped[3, 0].item() == pytest.approx(-60.0, rel=1e-5)
    torch.testing.assert_close(clamped[[1, 3], 1:], before[0, [1, 3], 1:])
    torch.testing.assert_close(restored, before[0])


def test_clamp_rejects_inputs_embeds(tiny_model: torch.nn.Module) -> None:
    embeds = tiny_model.get_input_embeddings()(torch.tensor([[BOS_ID, FORGET_IDS[0]]]))
    with clamp_latents(tiny_model, 0, identity_sae(0.5), [0], 1.0, norm_scale=0.5):
        with pytest.raises(InterventionError, match="input_ids"):
            tiny_model(inputs_embeds=embeds)


def effects(
    model, sae, norm_scale, latents, multiplier, scorer, prepared, contexts, baselines
) -> dict:
    """Known-set accuracies and mean loss rises under a clamp."""
    with clamp_latents(
        model, 0, sae, latents, multiplier, norm_scale=norm_scale, special_token_ids=SPECIAL_IDS
    ):
        result = {
            name: float(scorer.score(items).correct_Q.mean()) for name, items in prepared.items()
        }
        for domain, contexts_CT in contexts.items():
            rise_C = context_losses(model, contexts_CT, SPECIAL_IDS) - baselines[domain]
            result[f"{domain}_rise"] = mean_interval(rise_C)
    return result


def test_positive_and_negative_controls(tiny_model: torch.nn.Module) -> None:
    tokenizer = build_tokenizer()
    forget_CT = sample_contexts(tiny_model, FORGET_IDS, 6, seed=21)
    retain_CT = sample_contexts(tiny_model, RETAIN_IDS, 6, seed=22)
    with torch.no_grad():
        acts_ND = capture_residual(
            tiny_model, 0, torch.from_numpy(np.concatenate([forget_CT, retain_CT])).long()
        )
    acts_ND = acts_ND[:, 1:].reshape(-1, D_MODEL)
    norm_scale = float(np.sqrt(D_MODEL / acts_ND.double().pow(2).sum(-1).mean().item()))
    sae = identity_sae(norm_scale)

    scorer = MultipleChoiceScorer(tiny_model, tokenizer, "cloze")
    prepared = {
        "forget": scorer.prepare(
            make_questions(tiny_model, FORGET_WORDS, 16, seed=23, subject="wmdp-bio")
        ),
        "retain": scorer.prepare(
            make_questions(tiny_model, RETAIN_WORDS, 16, seed=24, subject="mmlu")
        ),
    }
    for items in prepared.values():
        assert scorer.score(items).correct_Q.all()
    contexts = {"forget": forget_CT, "retain": retain_CT}
    baselines = {
        domain: context_losses(tiny_model, contexts_CT, SPECIAL_IDS)
        for domain, contexts_CT in contexts.items()
    }

    # Latents 0..FORGET_DIMS-1 fire on forget tokens only. The controls fire as often over all
    # tokens (about half of them) but on both domains.
    latents = list(range(FORGET_DIMS))
    pooled_rates_F = (sae.encode(acts_ND * norm_scale) > 0).double().mean(dim=0).numpy()
    controls = matched_random_latents(np.array(latents), pooled_rates_F, np.random.default_rng(0))
    selected = effects(
        tiny_model, sae, norm_scale, latents, 100.0, scorer, prepared, contexts, baselines
    )
    control = effects(
        tiny_model, sae, norm_scale, controls.tolist(), 100.0, scorer, prepared, contexts, baselines
    )

    # Positive control: forget loss rises far, known forget questions are lost, retain is untouched.
    assert selected["forget_rise"].ci_low > 1.0
    assert selected["retain_rise"].mean == 0.0
    assert selected["forget"] <= 0.5
    assert selected["retain"] == 1.0
    # Negative control: matched random latents raise forget loss less and hit retain text too.
    assert control["forget_rise"].mean < selected["forget_rise"].mean
    assert control["retain_rise"].mean > 0.0
    assert control["retain"] < 1.0
    selected_selectivity = selected["forget_rise"].mean - selected["retain_rise"].mean
    control_selectivity = control["forget_rise"].mean - control["retain_rise"].mean
    assert selected_selectivity > control_selectivity
