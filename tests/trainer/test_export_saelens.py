"""SAELens export and import: the exported SAE, loaded by the real `sae_lens` package, computes
the same latents and reconstructions on raw activations as the knowsep SAE.

Tests that load with SAELens skip when `sae_lens` is not installed
(`pip install sae-lens`); the format and import tests run without it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.export import (
    SAELENS_CONFIG_FILE,
    SAELENS_WEIGHTS_FILE,
    SAELensFormatError,
    export_saelens,
    import_saelens,
    is_saelens_dir,
    load_any_sae,
)
from trainer.saes import BaseSAE, StandardSAE, StandardSAEConfig

D_IN = 16
D_SAE = 48
NORM_SCALE = 0.25
LAYER = 2
ATOL = 1e-5

requires_sae_lens = pytest.mark.skipif(
    importlib.util.find_spec("sae_lens") is None,
    reason="sae_lens is not installed; install it with `pip install sae-lens` to test loading with SAELens",
)


def randomize(sae: BaseSAE, seed: int) -> BaseSAE:
    """Give every parameter random values, with biases large enough to matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc_DF.copy_(torch.randn(D_IN, D_SAE, generator=generator) / D_IN**0.5)
        sae.W_dec_FD.copy_(torch.randn(D_SAE, D_IN, generator=generator))
        sae.set_decoder_norm_to_unit_norm()
        sae.b_enc_F.copy_(torch.randn(D_SAE, generator=generator) * 0.1)
        sae.b_dec_D.copy_(torch.randn(D_IN, generator=generator) * 0.5)
    return sae


def standard_sae(activation: str, seed: int = 0) -> StandardSAE:
    cfg = StandardSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        norm_scale=NORM_SCALE,
        activation=activation,
        k=6,
        metadata={"model": "tiny-model", "layer": LAYER, "variant": "standard", "context_size": 8},
    )
    return randomize(StandardSAE(cfg), seed)


def masked_sae(prune_decoder: bool) -> BaseSAE:
    masked = pytest.importorskip(
        "trainer.saes.masked", reason="the masked SAE module is not available"
    )
    from stores.masks import PackedMask

    cfg = masked.MaskedSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        norm_scale=NORM_SCALE,
        activation="relu",
        metadata={"model": "tiny-model", "layer": LAYER, "variant": "fixed"},
        decoder_mask=prune_decoder,
    )
    sae = randomize(masked.MaskedSAE(cfg), seed=3)
    generator = torch.Generator().manual_seed(4)
    sae.set_encoder_mask(PackedMask.from_dense(torch.rand(D_SAE, D_IN, generator=generator) < 0.5))
    if prune_decoder:
        sae.set_decoder_mask(
            PackedMask.from_dense(torch.rand(D_SAE, D_IN, generator=generator) < 0.5)
        )
    return sae


def raw_inputs(sae: BaseSAE, n: int = 200) -> torch.Tensor:
    """Raw activations: normalized-space Gaussians around b_dec, divided by norm_scale."""
    generator = torch.Generator().manual_seed(11)
    x_norm_BD = sae.b_dec_D.detach() + torch.randn(n, D_IN, generator=generator)
    return x_norm_BD / NORM_SCALE


@torch.no_grad()
def reference_outputs(sae: BaseSAE, x_raw_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """knowsep's latents and raw-space reconstruction of raw inputs, through the normalized SAE."""
    x_hat_norm_BD, f_BF = sae(x_raw_BD * NORM_SCALE)
    return f_BF, x_hat_norm_BD / NORM_SCALE


def save_and_export(sae: BaseSAE, root: Path) -> Path:
    sae.save(root / "sae")
    return export_saelens(root / "sae", root / "saelens")


def all_saes() -> list[tuple[str, callable]]:
    return [
        ("relu", lambda: standard_sae("relu")),
        ("topk", lambda: standard_sae("topk")),
        ("masked-encoder", lambda: masked_sae(prune_decoder=False)),
        ("masked-encoder-decoder", lambda: masked_sae(prune_decoder=True)),
    ]


# Loading the export with SAELens


@requires_sae_lens
@pytest.mark.parametrize("name,build", all_saes(), ids=[name for name, _ in all_saes()])
def test_saelens_load_matches_knowsep(tmp_path: Path, name: str, build) -> None:
    from sae_lens import SAE

    sae = build()
    out_dir = save_and_export(sae, tmp_path)
    loaded = SAE.load_from_disk(str(out_dir), device="cpu")
    x_raw_BD = raw_inputs(sae)
    f_expected_BF, x_hat_expected_BD = reference_outputs(sae, x_raw_BD)

    with torch.no_grad():
        f_BF = loaded.encode(x_raw_BD)
        x_hat_BD = loaded.decode(f_BF)

    assert (f_expected_BF > 0).any(dim=1).all(), "every input should activate some latent"
    torch.testing.assert_close(f_BF, f_expected_BF, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(x_hat_BD, x_hat_expected_BD, atol=ATOL * 10, rtol=1e-5)
    expected_architecture = "topk" if name == "topk" else "standard"
    assert loaded.cfg.architecture() == expected_architecture
    assert loaded.cfg.metadata.hook_name == f"blocks.{LAYER}.hook_resid_post"
    assert loaded.cfg.metadata.model_name == "tiny-model"


@requires_sae_lens
def test_saelens_topk_keeps_k(tmp_path: Path) -> None:
    from sae_lens import SAE

    out_dir = save_and_export(standard_sae("topk"), tmp_path)
    loaded = SAE.load_from_disk(str(out_dir), device="cpu")
    assert loaded.cfg.k == 6
    with torch.no_grad():
        f_BF = loaded.encode(raw_inputs(standard_sae("topk")))
    assert int((f_BF > 0).sum(dim=1).max()) <= 6


@requires_sae_lens
def test_import_of_saelens_saved_sae(tmp_path: Path) -> None:
    """An SAE written by SAELens itself, with apply_b_dec_to_input false, imports exactly."""
    from sae_lens import StandardSAE as SAELensStandardSAE
    from sae_lens import StandardSAEConfig as SAELensStandardSAEConfig

    torch.manual_seed(5)
    original = SAELensStandardSAE(
        SAELensStandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False)
    )
    with torch.no_grad():
        original.b_enc.normal_(0.0, 0.1)
        original.b_dec.normal_(0.0, 0.5)
    original.cfg.metadata.hook_name = f"blocks.{LAYER}.hook_resid_post"
    original.cfg.metadata.model_name = "tiny-model"
    original.save_model(tmp_path / "saelens")

    imported = import_saelens(tmp_path / "saelens")
    x_BD = torch.randn(100, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(
            imported.encode(x_BD), original.encode(x_BD), atol=ATOL, rtol=1e-5
        )
        torch.testing.assert_close(imported(x_BD)[0], original(x_BD), atol=ATOL, rtol=1e-5)
    assert imported.cfg.metadata["layer"] == LAYER
    assert imported.cfg.metadata["model"] == "tiny-model"


# Format, without SAELens


def test_export_files_and_config(tmp_path: Path) -> None:
    out_dir = save_and_export(standard_sae("topk"), tmp_path)
    config = json.loads((out_dir / SAELENS_CONFIG_FILE).read_text())
    tensors = load_file(str(out_dir / SAELENS_WEIGHTS_FILE))

    assert sorted(tensors) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    assert tuple(tensors["W_enc"].shape) == (D_IN, D_SAE)
    assert tuple(tensors["W_dec"].shape) == (D_SAE, D_IN)
    assert config["architecture"] == "topk"
    assert config["k"] == 6
    assert config["rescale_acts_by_decoder_norm"] is False
    assert config["normalize_activations"] == "none"
    assert config["apply_b_dec_to_input"] is True
    assert config["hook_name"] == f"blocks.{LAYER}.hook_resid_post"
    assert config["metadata"]["hook_name"] == config["hook_name"]
    assert config["metadata"]["knowsep"]["folded_norm_scale"] == NORM_SCALE
    assert not list(tmp_path.glob(".tmp-*")), "the staging directory must be renamed away"


def test_export_folds_normalization(tmp_path: Path) -> None:
    sae = standard_sae("relu")
    out_dir = save_and_export(sae, tmp_path)
    tensors = load_file(str(out_dir / SAELENS_WEIGHTS_FILE))

    torch.testing.assert_close(tensors["W_enc"], sae.W_enc_DF.detach() * NORM_SCALE)
    torch.testing.assert_close(tensors["b_dec"], sae.b_dec_D.detach() / NORM_SCALE)
    row_norms_F = tensors["W_dec"].norm(dim=1)
    torch.testing.assert_close(row_norms_F, torch.full((D_SAE,), 1 / NORM_SCALE))


def test_export_applies_masks(tmp_path: Path) -> None:
    sae = masked_sae(prune_decoder=True)
    out_dir = save_and_export(sae, tmp_path)
    tensors = load_file(str(out_dir / SAELENS_WEIGHTS_FILE))

    encoder_kept_DF = sae.encoder_mask.to_dense().T
    decoder_kept_FD = sae.decoder_mask.to_dense()
    assert bool((tensors["W_enc"][~encoder_kept_DF] == 0).all())
    assert bool((tensors["W_dec"][~decoder_kept_FD] == 0).all())
    assert int((tensors["W_enc"] != 0).sum()) == int(encoder_kept_DF.sum())
    config = json.loads((out_dir / SAELENS_CONFIG_FILE).read_text())
    assert config["metadata"]["knowsep"]["mask_densities"]["encoder_density"] == pytest.approx(
        float(encoder_kept_DF.float().mean())
    )


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_import_round_trip(tmp_path: Path, activation: str) -> None:
    sae = standard_sae(activation)
    out_dir = save_and_export(sae, tmp_path)
    imported = import_saelens(out_dir)
    x_raw_BD = raw_inputs(sae)
    f_expected_BF, x_hat_expected_BD = reference_outputs(sae, x_raw_BD)

    with torch.no_grad():
        x_hat_BD, f_BF = imported(x_raw_BD)
    torch.testing.assert_close(f_BF, f_expected_BF, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(x_hat_BD, x_hat_expected_BD, atol=ATOL * 10, rtol=1e-5)
    assert imported.cfg.activation_space == "raw"
    assert imported.cfg.norm_scale is None
    assert imported.cfg.activation == activation
    assert imported.cfg.metadata["layer"] == LAYER


def test_export_bfloat16_dtype(tmp_path: Path) -> None:
    sae = standard_sae("relu")
    sae.save(tmp_path / "sae")
    out_dir = export_saelens(tmp_path / "sae", tmp_path / "saelens", dtype="bfloat16")
    tensors = load_file(str(out_dir / SAELENS_WEIGHTS_FILE))
    assert tensors["W_enc"].dtype == torch.bfloat16
    assert json.loads((out_dir / SAELENS_CONFIG_FILE).read_text())["dtype"] == "bfloat16"
    assert import_saelens(out_dir).W_enc_DF.dtype == torch.bfloat16


def test_export_existing_directory_raises(tmp_path: Path) -> None:
    out_dir = save_and_export(standard_sae("relu"), tmp_path)
    with pytest.raises(SAELensFormatError, match="already exists"):
        export_saelens(tmp_path / "sae", out_dir)
    export_saelens(tmp_path / "sae", out_dir, overwrite=True)
    assert is_saelens_dir(out_dir)


def test_export_without_layer_raises(tmp_path: Path) -> None:
    sae = standard_sae("relu")
    sae.cfg.metadata = {"model": "tiny-model"}
    sae.save(tmp_path / "sae")
    with pytest.raises(SAELensFormatError, match="no 'layer'"):
        export_saelens(tmp_path / "sae", tmp_path / "saelens")
    assert not (tmp_path / "saelens").exists()


def rewrite_config(out_dir: Path, **changes) -> None:
    path = out_dir / SAELENS_CONFIG_FILE
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"architecture": "jumprelu"}, "'jumprelu'"),
        ({"normalize_activations": "expected_average_only_in"}, "normalize_activations"),
        (
            {"architecture": "topk", "k": 4, "rescale_acts_by_decoder_norm": True},
            "rescale_acts_by_decoder_norm",
        ),
        ({"d_sae": D_SAE + 1}, "has shape"),
    ],
)
def test_import_unsupported_config_raises(tmp_path: Path, changes: dict, message: str) -> None:
    out_dir = save_and_export(standard_sae("relu"), tmp_path)
    rewrite_config(out_dir, **changes)
    with pytest.raises(SAELensFormatError, match=message):
        import_saelens(out_dir)


def test_import_scaling_factor_raises(tmp_path: Path) -> None:
    out_dir = save_and_export(standard_sae("relu"), tmp_path)
    tensors = load_file(str(out_dir / SAELENS_WEIGHTS_FILE))
    tensors["scaling_factor"] = torch.full((D_SAE,), 2.0)
    save_file(tensors, str(out_dir / SAELENS_WEIGHTS_FILE))
    with pytest.raises(SAELensFormatError, match="scaling_factor"):
        import_saelens(out_dir)


def test_load_any_sae_detects_format(tmp_path: Path) -> None:
    out_dir = save_and_export(standard_sae("relu"), tmp_path)
    assert load_any_sae(tmp_path / "sae").cfg.activation_space == "normalized"
    assert load_any_sae(out_dir).cfg.activation_space == "raw"
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_any_sae(tmp_path / "missing")
