"""Export knowsep SAEs to SAELens's on-disk format, and import SAELens SAEs.

An SAELens SAE directory contains ``cfg.json`` and ``sae_weights.safetensors`` with the
tensors ``W_enc`` ``[d_in, d_sae]``, ``W_dec`` ``[d_sae, d_in]``, ``b_enc`` ``[d_sae]`` and
``b_dec`` ``[d_in]``. It encodes ``f = sigma((x - b_dec) W_enc + b_enc)`` when
``apply_b_dec_to_input`` is true. ``sae_lens.SAE.load_from_disk(path)`` loads it (tested
with sae-lens 6.54.12).

Export writes an SAE that takes the model's raw residual stream:

- masks are applied (each weight becomes ``W * M``, so pruned connections are exact zeros);
- the store's normalization is folded in (``BaseSAE.fold_normalization``: ``W_enc * s``,
  ``W_dec / s``, ``b_dec / s``), so ``normalize_activations`` is ``"none"``. The decoder
  rows then have norm ``1 / s``. SAELens does not need unit-norm rows for inference.

The config carries the SAELens 6 fields at the top level and the model and hook under
``metadata``. The model and hook fields are repeated at the top level, the layout of
files written before SAELens 6.0. The file records no ``sae_lens_version``, so SAELens 6
converts it as such a file, which moves those top-level fields into ``metadata``.

Import builds a knowsep ``StandardSAE`` (ReLU or TopK) in raw space, so that every
knowsep eval can take an SAELens directory: ``load_any_sae`` detects one by its
``cfg.json`` and ``sae_weights.safetensors`` files.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from trainer.saes import SAE_CONFIG_FILE, SAE_WEIGHTS_FILE, BaseSAE, load_sae
from trainer.saes.base import DTYPES
from trainer.saes.standard import StandardSAE, StandardSAEConfig

logger = logging.getLogger(__name__)

SAELENS_CONFIG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"

#: Hook of block L's residual output in TransformerLens names, knowsep's `layer = L`.
HOOK_NAME_TEMPLATE = "blocks.{layer}.hook_resid_post"
HOOK_NAME_PATTERN = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")

#: Relative tolerance of the check that the exported tensors reproduce the SAE's forward pass.
EXPORT_CHECK_RTOL = 1e-4
EXPORT_CHECK_TOKENS = 64


class SAELensFormatError(ValueError):
    """An SAE that cannot be exported to SAELens's format, or an SAELens directory that cannot be imported."""


# Export


def is_saelens_dir(path: str | Path) -> bool:
    """Return whether ``path`` contains an SAELens SAE (``cfg.json`` and ``sae_weights.safetensors``)."""
    path = Path(path)
    return (path / SAELENS_CONFIG_FILE).is_file() and (path / SAELENS_WEIGHTS_FILE).is_file()


@torch.no_grad()
def raw_space_copy(sae: BaseSAE) -> BaseSAE:
    """Return a float32 copy of ``sae`` with masks applied and normalization folded in.

    The copy takes raw activations. A masked SAE's weights become ``W * M``, which its
    forward pass uses anyway, so the copy computes the same function with dense weights.
    """
    copied = copy.deepcopy(sae).to(torch.float32)
    copied.cfg.dtype = "float32"

    apply_masks = getattr(copied, "apply_masks_", None)
    if callable(apply_masks):
        apply_masks()

    if copied.cfg.activation_space == "raw":
        return copied
    if copied.cfg.norm_scale is None:
        raise SAELensFormatError(
            "the SAE takes normalized activations but its config has no norm_scale, so it cannot be "
            "converted to raw activations; set norm_scale to the activation store's metadata norm_scale"
        )
    return copied.fold_normalization()


def dense_sae_from_tensors(
    tensors: dict[str, torch.Tensor],
    activation: str,
    k: int,
    metadata: dict[str, Any],
    dtype: str = "float32",
) -> StandardSAE:
    """Build a raw-space ``StandardSAE`` on the CPU from SAELens-named tensors."""
    d_in, d_sae = tensors["W_enc"].shape
    cfg = StandardSAEConfig(
        d_in=int(d_in),
        d_sae=int(d_sae),
        dtype=dtype,
        activation_space="raw",
        norm_scale=None,
        metadata=metadata,
        activation=activation,  # type: ignore[arg-type]
        k=k,
    )
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_enc_DF.copy_(tensors["W_enc"])
        sae.b_enc_F.copy_(tensors["b_enc"])
        sae.W_dec_FD.copy_(tensors["W_dec"])
        sae.b_dec_D.copy_(tensors["b_dec"])
    return sae


@torch.no_grad()
def check_export_matches(source: BaseSAE, exported: StandardSAE) -> None:
    """Raise when the dense exported SAE does not reproduce the source's latents and reconstructions.

    The inputs are Gaussian samples around ``b_dec`` at the scale of the normalized
    space, so that a usual number of latents fire.
    """
    generator = torch.Generator().manual_seed(0)
    scale = 1.0 / (source.cfg.norm_scale or 1.0)
    noise_BD = torch.randn(EXPORT_CHECK_TOKENS, source.cfg.d_in, generator=generator) * scale
    x_BD = source.b_dec_D.detach().float().cpu() + noise_BD
    source = source.to("cpu")

    f_source_BF = source.encode(x_BD)
    f_exported_BF = exported.encode(x_BD)
    x_hat_source_BD = source.decode(f_source_BF)
    x_hat_exported_BD = exported.decode(f_exported_BF)
    for name, expected, actual in (
        ("latents", f_source_BF, f_exported_BF),
        ("reconstructions", x_hat_source_BD, x_hat_exported_BD),
    ):
        tolerance = EXPORT_CHECK_RTOL * max(expected.abs().max().item(), 1e-12)
        error = (expected - actual).abs().max().item()
        if error > tolerance:
            raise SAELensFormatError(
                f"the exported weights do not reproduce the {type(source).__name__}'s {name} (max abs "
                f"error {error:.3g}, tolerance {tolerance:.3g}); its forward pass is not that of a dense "
                "ReLU or TopK SAE with masked weights, so it cannot be exported to SAELens's format"
            )


def saelens_config(
    sae: BaseSAE, *, model_name: str, layer: int, source: str | None = None
) -> dict[str, Any]:
    """Return the ``cfg.json`` content of a raw-space knowsep ReLU or TopK SAE."""
    activation = getattr(sae.cfg, "activation", None)
    if activation not in ("relu", "topk"):
        raise SAELensFormatError(
            f"cannot export a {sae.architecture!r} SAE with activation {activation!r}: SAELens export "
            "supports ReLU ('standard') and TopK ('topk') SAEs"
        )
    hook_name = HOOK_NAME_TEMPLATE.format(layer=layer)
    context_size = sae.cfg.metadata.get("context_size")
    model_fields = {
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_layer": layer,
        "hook_head_index": None,
        # Store contexts start with BOS, and training skips BOS and every other special token.
        "prepend_bos": True,
        "exclude_special_tokens": True,
        "context_size": context_size,
    }
    config: dict[str, Any] = {
        "architecture": "standard" if activation == "relu" else "topk",
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": sae.cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if activation == "topk":
        # TopK ranks the raw pre-activations, as knowsep does. Rescaling them by the
        # decoder norms would change the latent values.
        config["k"] = int(sae.cfg.k)  # type: ignore[attr-defined]
        config["rescale_acts_by_decoder_norm"] = False
    config.update(model_fields)

    densities = getattr(sae, "mask_densities", None)
    config["metadata"] = {
        **model_fields,
        "knowsep": {
            "architecture": sae.architecture,
            "variant": sae.cfg.metadata.get("variant", sae.architecture),
            "folded_norm_scale": sae.cfg.norm_scale,
            "mask_densities": densities() if callable(densities) else None,
            "store": sae.cfg.metadata.get("store"),
            "source": source,
        },
    }
    return config


def export_saelens(
    sae_dir: str | Path,
    out_dir: str | Path,
    *,
    model_name: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export the knowsep SAE saved in ``sae_dir`` to SAELens's format in ``out_dir``.

    Args:
        sae_dir: Directory of a saved knowsep SAE of any registered architecture.
        out_dir: Directory to create with ``cfg.json`` and ``sae_weights.safetensors``.
        model_name: ``model_name`` written to the config; None uses the SAE's metadata
            ``model`` (the store's model name, e.g. a knowsep embedded name, which
            SAELens and TransformerLens may not know).
        dtype: Dtype of the written weights; None keeps the SAE's.
        overwrite: Replace an existing ``out_dir``.

    Returns the output directory. The files are written to a temporary sibling
    directory, which is renamed to ``out_dir`` only when complete.
    """
    sae = load_sae(sae_dir, device="cpu")
    return export_saelens_sae(
        sae, out_dir, model_name=model_name, dtype=dtype, overwrite=overwrite, source=str(sae_dir)
    )


def export_saelens_sae(
    sae: BaseSAE,
    out_dir: str | Path,
    *,
    model_name: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    source: str | None = None,
) -> Path:
    """Export an in-memory knowsep SAE to SAELens's format; see ``export_saelens``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise SAELensFormatError(
            f"{out_dir} already exists; pass --overwrite (overwrite=True in Python) or choose another directory"
        )
    export_dtype = dtype or sae.cfg.dtype
    if export_dtype not in DTYPES:
        raise SAELensFormatError(
            f"invalid dtype {export_dtype!r}: choose one of {', '.join(DTYPES)}"
        )

    model_name = model_name or sae.cfg.metadata.get("model")
    if not model_name:
        raise SAELensFormatError(
            "the SAE's metadata has no 'model'; pass model_name (the model the SAE reads, e.g. google/gemma-3-270m)"
        )
    layer = sae.cfg.metadata.get("layer")
    if layer is None:
        raise SAELensFormatError(
            "the SAE's metadata has no 'layer', so its hook cannot be named; export an SAE trained by knowsep"
        )

    raw_sae = raw_space_copy(sae)
    tensors = {
        "W_enc": raw_sae.W_enc_DF.detach().cpu(),
        "W_dec": raw_sae.W_dec_FD.detach().cpu(),
        "b_enc": raw_sae.b_enc_F.detach().cpu(),
        "b_dec": raw_sae.b_dec_D.detach().cpu(),
    }
    activation = getattr(raw_sae.cfg, "activation", None)
    config = saelens_config(raw_sae, model_name=str(model_name), layer=int(layer), source=source)
    check_export_matches(
        raw_sae, dense_sae_from_tensors(tensors, str(activation), config.get("k", 1), {})
    )
    config["dtype"] = export_dtype
    weights = {
        name: tensor.to(DTYPES[export_dtype]).contiguous() for name, tensor in tensors.items()
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        save_file(weights, str(staging / SAELENS_WEIGHTS_FILE))
        (staging / SAELENS_CONFIG_FILE).write_text(
            json.dumps(config, indent=2) + "\n", encoding="utf-8"
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        "Exported %s SAE (d_in %d, d_sae %d, %s) to SAELens format in %s",
        config["architecture"],
        config["d_in"],
        config["d_sae"],
        config["metadata"]["knowsep"]["variant"],
        out_dir,
    )
    return out_dir


# Import


def read_saelens_config(path: str | Path) -> dict[str, Any]:
    """Read ``cfg.json`` of an SAELens directory, with pre-6.0 key names mapped to 6.x names."""
    path = Path(path)
    if not is_saelens_dir(path):
        raise FileNotFoundError(
            f"no SAELens SAE in {path}: expected {SAELENS_CONFIG_FILE} and {SAELENS_WEIGHTS_FILE}"
        )
    config = json.loads((path / SAELENS_CONFIG_FILE).read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise SAELensFormatError(f"{path / SAELENS_CONFIG_FILE} does not contain a JSON object")

    metadata = config.get("metadata") or {}
    for key in ("model_name", "hook_name", "hook_layer", "hook_head_index"):
        if config.get(key) is None and metadata.get(key) is not None:
            config[key] = metadata[key]
    if "hook_name" not in config and "hook_point" in config:
        config["hook_name"] = config["hook_point"]
    if "activation_fn" not in config and "activation_fn_str" in config:
        config["activation_fn"] = config["activation_fn_str"]

    # SAELens before 6.0 wrote TopK as architecture "standard" with activation_fn "topk".
    architecture = config.get("architecture", "standard")
    if config.get("activation_fn") == "topk":
        architecture = "topk"
        config.setdefault("k", (config.get("activation_fn_kwargs") or {}).get("k"))
    config["architecture"] = architecture
    return config


def knowsep_dtype(name: Any) -> str:
    """Map an SAELens dtype string (``float32``, ``torch.bfloat16``, ...) to knowsep's name."""
    text = str(name).removeprefix("torch.")
    if text not in DTYPES:
        raise SAELensFormatError(
            f"unsupported SAELens dtype {name!r}: use one of {', '.join(DTYPES)}"
        )
    return text


def layer_of_hook(hook_name: str | None, hook_layer: Any) -> int | None:
    """Return knowsep's layer for a residual-output hook, or None for other hooks."""
    if hook_name is None:
        return None
    match = HOOK_NAME_PATTERN.match(hook_name)
    if match is None:
        # NOTE: knowsep reads only block outputs (hook_resid_post). An SAE on another
        # hook imports with layer None, and evals that need a layer reject it.
        logger.warning(
            "SAELens hook %s is not a block's hook_resid_post; the imported SAE has no layer",
            hook_name,
        )
        return None
    layer = int(match.group(1))
    if hook_layer is not None and int(hook_layer) != layer:
        raise SAELensFormatError(f"hook_name {hook_name!r} and hook_layer {hook_layer} disagree")
    return layer


def check_supported(config: dict[str, Any], path: Path) -> tuple[str, int]:
    """Return ``(activation, k)`` of an importable config, or raise naming the unsupported field."""
    architecture = config["architecture"]
    if architecture not in ("standard", "topk"):
        raise SAELensFormatError(
            f"{path} contains an SAELens {architecture!r} SAE; import supports 'standard' (ReLU) and 'topk'"
        )
    activation_fn = config.get("activation_fn", "relu" if architecture == "standard" else "topk")
    if architecture == "standard" and activation_fn != "relu":
        raise SAELensFormatError(
            f"{path}: activation_fn {activation_fn!r} is unsupported; import supports 'relu'"
        )
    normalize = config.get("normalize_activations", "none")
    if normalize not in ("none", None, False):
        raise SAELensFormatError(
            f"{path}: normalize_activations {normalize!r} is unsupported; fold the normalization into the "
            "weights first (SAELens: fold_activation_norm_scaling_factor) so that it is 'none'"
        )
    reshape = config.get("reshape_activations", "none")
    if reshape not in ("none", None):
        raise SAELensFormatError(
            f"{path}: reshape_activations {reshape!r} is unsupported; import supports 'none'"
        )
    if architecture == "topk":
        if config.get("rescale_acts_by_decoder_norm"):
            raise SAELensFormatError(
                f"{path}: rescale_acts_by_decoder_norm is true, which knowsep's TopK does not implement; "
                "fold the decoder norms first (SAELens: fold_W_dec_norm) and set it to false"
            )
        k = config.get("k")
        if not isinstance(k, int) or k < 1:
            raise SAELensFormatError(f"{path}: a TopK SAE needs an integer k >= 1, got {k!r}")
        return "topk", k
    return "relu", 1


@torch.no_grad()
def import_saelens(path: str | Path, *, device: str | None = None) -> StandardSAE:
    """Load an SAELens ReLU or TopK SAE directory as a knowsep ``StandardSAE`` in raw space.

    The SAE takes the model's raw activations (``activation_space`` "raw"), and its
    ``norm_scale`` is None because no normalization is folded into it. Evals that read
    normalized store activations divide them by the store's ``norm_scale`` first.
    With ``apply_b_dec_to_input`` false, ``b_dec @ W_enc`` is added to ``b_enc`` so that
    knowsep's encoder, which always subtracts ``b_dec``, gives the same latents.
    """
    path = Path(path)
    config = read_saelens_config(path)
    activation, k = check_supported(config, path)
    dtype = knowsep_dtype(config.get("dtype", "float32"))

    tensors = load_file(str(path / SAELENS_WEIGHTS_FILE), device="cpu")
    for scale_name in ("scaling_factor", "finetuning_scaling_factor"):
        scale = tensors.pop(scale_name, None)
        if scale is not None and not torch.all(scale == 1):
            raise SAELensFormatError(
                f"{path}: {scale_name} is not all ones; fold it into W_dec first "
                "(SAELens: fold_activation_norm_scaling_factor / fold the finetuning scale)"
            )
    expected = {"W_enc", "W_dec", "b_enc", "b_dec"}
    if set(tensors) != expected:
        raise SAELensFormatError(
            f"{path / SAELENS_WEIGHTS_FILE} has tensors {sorted(tensors)}; a standard or TopK SAE has {sorted(expected)}"
        )
    d_in, d_sae = int(config["d_in"]), int(config["d_sae"])
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise SAELensFormatError(
                f"{path / SAELENS_WEIGHTS_FILE}: {name} has shape {tuple(tensors[name].shape)}, "
                f"the config (d_in {d_in}, d_sae {d_sae}) expects {shape}"
            )
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise SAELensFormatError(
                f"{path / SAELENS_WEIGHTS_FILE}: {name} contains NaN or infinite values"
            )
    tensors = {name: tensor.to(torch.float64) for name, tensor in tensors.items()}
    if not config.get("apply_b_dec_to_input", True):
        tensors["b_enc"] = tensors["b_enc"] + tensors["b_dec"] @ tensors["W_enc"]

    hook_name = config.get("hook_name")
    metadata = {
        "model": config.get("model_name"),
        "layer": layer_of_hook(hook_name, config.get("hook_layer")),
        "hook_name": hook_name,
        "context_size": config.get("context_size")
        or (config.get("metadata") or {}).get("context_size"),
        "saelens_path": str(path),
        "saelens_architecture": config["architecture"],
        "variant": f"saelens-{config['architecture']}",
    }
    sae = dense_sae_from_tensors(tensors, activation, k, metadata, dtype=dtype)
    if device is not None:
        sae.cfg.device = device
        sae = sae.to(device)
    return sae


def load_any_sae(path: str | Path, *, device: str | None = None) -> BaseSAE:
    """Load a knowsep SAE directory (``sae_config.json``) or an SAELens one (``cfg.json``)."""
    path = Path(path)
    if (path / SAE_CONFIG_FILE).is_file() and (path / SAE_WEIGHTS_FILE).is_file():
        return load_sae(path, device=device)
    if is_saelens_dir(path):
        logger.info("Loading %s as an SAELens SAE", path)
        return import_saelens(path, device=device)
    raise FileNotFoundError(
        f"no saved SAE in {path}: expected {SAE_CONFIG_FILE} and {SAE_WEIGHTS_FILE} (knowsep) or "
        f"{SAELENS_CONFIG_FILE} and {SAELENS_WEIGHTS_FILE} (SAELens)"
    )
