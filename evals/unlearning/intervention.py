"""The clamp intervention on SAE latents at one layer, keeping the SAE's error term.

For the clamped set ``C`` and multiplier ``c``, every token whose input is not a
special token gets

    x' = x + sum_{i in C, f_i(x) > 0} (-c - f_i(x)) d_i

where ``f`` is the SAE's encoding of the normalized residual ``x * norm_scale`` and
``d_i`` is latent ``i``'s decoder row mapped back to the raw scale (divided by
``norm_scale``). This equals SAEBench's "replace the reconstruction by the one with
clamped latents and add back the error ``x - x_hat``", because the decoder is affine.
Latents that do not fire stay untouched, so a token on which no clamped latent fires
passes through unchanged.

The decoder rows come from the SAE's own ``decode`` (``decode(e_i) - decode(0)``), so
masked variants use their masked decoder, and SAEs with folded normalization (raw
space) work too. BOS, padding and every other special-token position keep their
residual, as in training, where they were excluded.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from pipeline.models import splice_residual
from trainer.saes import BaseSAE


class InterventionError(ValueError):
    """An intervention that cannot be applied: bad multiplier or missing token ids."""


@torch.no_grad()
def decoder_rows(sae: BaseSAE, latent_ids: torch.Tensor) -> torch.Tensor:
    """Return ``rows_CD``: the change of ``sae.decode`` per unit of each latent, in the SAE's own space."""
    n_latents = len(latent_ids)
    dtype = sae.W_dec_FD.dtype
    device = sae.W_dec_FD.device
    one_hot_CF = torch.zeros((n_latents, sae.cfg.d_sae), dtype=dtype, device=device)
    one_hot_CF[torch.arange(n_latents, device=device), latent_ids.to(device)] = 1.0
    zero_1F = torch.zeros((1, sae.cfg.d_sae), dtype=dtype, device=device)
    return (sae.decode(one_hot_CF) - sae.decode(zero_1F)).float()


class LatentClamp:
    """Compute the clamp's change of the residual for a fixed latent set and multiplier.

    Args:
        sae: The SAE, in float32 or wider.
        latent_ids: Ids of the clamped latents (already checked against ``d_sae``).
        multiplier: ``c >= 0``; firing clamped latents are set to ``-c``.
        norm_scale: The store's scale; the SAE reads ``x * norm_scale`` unless its
            normalization is folded in (``activation_space == "raw"``).
    """

    def __init__(
        self, sae: BaseSAE, latent_ids: Iterable[int], multiplier: float, norm_scale: float
    ) -> None:
        if not (math.isfinite(multiplier) and multiplier >= 0):
            raise InterventionError(
                f"invalid multiplier {multiplier}: it must be finite and >= 0 (firing latents are clamped to -multiplier)"
            )
        if not (math.isfinite(norm_scale) and norm_scale > 0):
            raise InterventionError(f"invalid norm_scale {norm_scale}: it must be finite and > 0")
        self.sae = sae
        self.latent_ids_C = torch.as_tensor(
            list(latent_ids), dtype=torch.long, device=sae.W_dec_FD.device
        )
        self.multiplier = float(multiplier)
        self.raw_space = sae.cfg.activation_space == "raw"
        self.input_scale = 1.0 if self.raw_space else float(norm_scale)
        # Rows of a raw-space SAE already carry the 1 / norm_scale factor.
        self.rows_raw_CD = decoder_rows(sae, self.latent_ids_C) / self.input_scale

    @torch.no_grad()
    def delta(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Return the change ``x' - x`` (float32, raw scale) for raw residuals ``x_ND``."""
        if len(self.latent_ids_C) == 0:
            return torch.zeros_like(x_ND, dtype=torch.float32)
        sae_input_ND = x_ND.to(device=self.rows_raw_CD.device, dtype=self.sae.W_enc_DF.dtype)
        f_NF = self.sae.encode(sae_input_ND * self.input_scale)
        f_NC = f_NF[:, self.latent_ids_C].float()
        change_NC = torch.where(f_NC > 0, -self.multiplier - f_NC, torch.zeros_like(f_NC))
        return (change_NC @ self.rows_raw_CD).to(x_ND.device)

    def apply(self, hidden_BLD: torch.Tensor, keep_BL: torch.Tensor | None) -> torch.Tensor:
        """Return the clamped residual; positions where ``keep_BL`` is True are left as they are."""
        delta_BLD = self.delta(hidden_BLD.reshape(-1, hidden_BLD.shape[-1])).reshape(
            hidden_BLD.shape
        )
        if keep_BL is not None:
            delta_BLD = torch.where(keep_BL[..., None], torch.zeros_like(delta_BLD), delta_BLD)
        return (hidden_BLD.float() + delta_BLD).to(hidden_BLD.dtype)


@contextlib.contextmanager
def clamp_latents(
    model: torch.nn.Module,
    layer: int,
    sae: BaseSAE,
    latent_ids: Iterable[int],
    multiplier: float,
    *,
    norm_scale: float,
    special_token_ids: Iterable[int] = (),
) -> Iterator[LatentClamp]:
    """Apply the clamp to block ``layer``'s output during every forward pass inside the block.

    The token ids of each pass are read by a pre-hook on the base model, so that
    special-token positions keep their residual. A pass given ``inputs_embeds`` and no
    ``input_ids`` raises `InterventionError`, because its special tokens are unknown.
    """
    clamp = LatentClamp(sae, latent_ids, multiplier, norm_scale)
    special_S = torch.tensor(
        sorted({int(token_id) for token_id in special_token_ids}), dtype=torch.long
    )
    current: dict[str, torch.Tensor | None] = {"input_ids": None}

    def record_input_ids(
        module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], torch.Tensor):
            input_ids = args[0]
        current["input_ids"] = input_ids

    def clamp_residual(hidden_BLD: torch.Tensor) -> torch.Tensor:
        input_ids_BL = current["input_ids"]
        if input_ids_BL is None:
            raise InterventionError(
                "the clamp needs the token ids of the forward pass to skip special tokens; "
                "call the model with input_ids, not inputs_embeds"
            )
        if input_ids_BL.shape != hidden_BLD.shape[:2]:
            raise InterventionError(
                f"token ids of shape {tuple(input_ids_BL.shape)} do not match the residual's "
                f"{tuple(hidden_BLD.shape[:2])}; the clamp does not support generation with a KV cache"
            )
        keep_BL = torch.isin(input_ids_BL, special_S.to(input_ids_BL.device))
        return clamp.apply(hidden_BLD, keep_BL)

    get_decoder = getattr(model, "get_decoder", None)
    base_model = get_decoder() if callable(get_decoder) else model
    handle = base_model.register_forward_pre_hook(record_input_ids, with_kwargs=True)
    try:
        with splice_residual(model, layer, clamp_residual):
            yield clamp
    finally:
        handle.remove()
