"""Masked SAEs: the standard SAE with binary connection masks on its weights.

Encoder `f(x) = sigma((x - b_dec) (W_enc * M_enc^T) + b_enc)`, decoder
`x_hat = f (W_dec * M_dec) + b_dec`, with sigma ReLU (L1 penalty) or TopK as in
`StandardSAE`. Masks are `PackedMask`s with latents as rows, shape (d_sae, d_model):
`M_enc` is the transpose of `W_enc_DF`'s layout and `M_dec` has `W_dec_FD`'s. The
packed masks are the source of truth; a float copy in the weights' layout is rebuilt
whenever a mask changes and multiplies the weights in every forward pass.

Because the forward pass multiplies by the mask, a pruned weight gets a zero gradient,
so Adam keeps its moments at 0 and the weight at 0 (`apply_masks_` zeroes them when a
mask changes). The decoder renormalization keeps zeros at 0 as well.

`save` writes the masks as Zarr arrays `masks/encoder` and `masks/decoder` beside the
weights, and `load` reads and checks them. Variants "fixed" and "adaptive" (registered
here) train this SAE with the hooks of `trainer.pruning`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stores.masks import MaskError, PackedMask
from trainer.pruning.options import AdaptiveOptions, FixedOptions
from trainer.saes import HookContext, TrainingHook, Variant, register_variant
from trainer.saes.standard import StandardSAE, StandardSAEConfig

#: Zarr group of the masks inside a saved SAE or checkpoint directory.
MASKS_GROUP = "masks"
ENCODER_MASK_NAME = "encoder"
DECODER_MASK_NAME = "decoder"


@dataclass
class MaskedSAEConfig(StandardSAEConfig):
    """A masked SAE: the fields of StandardSAEConfig plus this one.

    decoder_mask: the SAE also masks its decoder (the encoder is always masked).
    """

    decoder_mask: bool = False


class MaskedSAE(StandardSAE):
    """A standard SAE whose encoder, and optionally decoder, connections are masked."""

    architecture = "masked"
    config_class = MaskedSAEConfig
    cfg: MaskedSAEConfig

    def __init__(self, cfg: MaskedSAEConfig) -> None:
        super().__init__(cfg)
        device = self.W_enc_DF.device
        # Non-persistent buffers follow `.to()` and deepcopy but stay out of
        # sae.safetensors: `save` writes the masks to Zarr.
        self.register_buffer(
            "encoder_mask_data_FB", PackedMask.ones(cfg.d_sae, cfg.d_in, device).data, persistent=False
        )
        self.register_buffer("encoder_mask_DF", torch.ones_like(self.W_enc_DF), persistent=False)
        if cfg.decoder_mask:
            self.register_buffer(
                "decoder_mask_data_FB", PackedMask.ones(cfg.d_sae, cfg.d_in, device).data, persistent=False
            )
            self.register_buffer("decoder_mask_FD", torch.ones_like(self.W_dec_FD), persistent=False)

    # Masks.

    @property
    def mask_shape(self) -> tuple[int, int]:
        """Shape (d_sae, d_model) of both masks."""
        return (self.cfg.d_sae, self.cfg.d_in)

    @property
    def encoder_mask(self) -> PackedMask:
        """The encoder mask, latents as rows."""
        return PackedMask(self.encoder_mask_data_FB, self.cfg.d_in)

    @property
    def decoder_mask(self) -> PackedMask | None:
        """The decoder mask, or None when the SAE has no decoder mask."""
        if not self.cfg.decoder_mask:
            return None
        return PackedMask(self.decoder_mask_data_FB, self.cfg.d_in)

    def _check_mask(self, mask: PackedMask, name: str) -> PackedMask:
        if mask.shape != self.mask_shape:
            raise MaskError(
                f"the {name} mask has shape {mask.shape}, this SAE needs {self.mask_shape} "
                "(d_sae, d_model); use the mask saved with this SAE"
            )
        return mask.to(self.encoder_mask_data_FB.device)

    @torch.no_grad()
    def set_encoder_mask(self, mask: PackedMask) -> None:
        """Replace the encoder mask and rebuild its dense copy. Weights are not touched."""
        mask = self._check_mask(mask, "encoder")
        self.encoder_mask_data_FB = mask.data.clone()
        self.encoder_mask_DF = mask.to_dense(self.W_enc_DF.dtype).T.contiguous()

    @torch.no_grad()
    def set_decoder_mask(self, mask: PackedMask) -> None:
        """Replace the decoder mask and rebuild its dense copy. Weights are not touched."""
        if not self.cfg.decoder_mask:
            raise MaskError("this SAE has no decoder mask; build it with decoder_mask=True (prune_decoder)")
        mask = self._check_mask(mask, "decoder")
        self.decoder_mask_data_FB = mask.data.clone()
        self.decoder_mask_FD = mask.to_dense(self.W_dec_FD.dtype)

    @torch.no_grad()
    def apply_masks_(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the pruned weights and, when given, their optimizer state.

        Every tensor of the parameter's optimizer state with the parameter's shape
        (Adam's exp_avg, exp_avg_sq and max_exp_avg_sq) is multiplied by the mask.
        """
        pairs = [(self.W_enc_DF, self.encoder_mask_DF)]
        if self.cfg.decoder_mask:
            pairs.append((self.W_dec_FD, self.decoder_mask_FD))
        for parameter, mask in pairs:
            parameter.mul_(mask)
            if optimizer is None:
                continue
            for value in optimizer.state.get(parameter, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
                    value.mul_(mask)

    def mask_densities(self) -> dict[str, float | None]:
        """Return the fraction of connections kept in each mask (None for no decoder mask)."""
        decoder_mask = self.decoder_mask
        return {
            "encoder_density": self.encoder_mask.density(),
            "decoder_density": None if decoder_mask is None else decoder_mask.density(),
        }

    # Forward pass.

    def pre_activations(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Return the encoder pre-activations `(x - b_dec) (W_enc * M_enc^T) + b_enc`."""
        return (x_BD - self.b_dec_D) @ (self.W_enc_DF * self.encoder_mask_DF) + self.b_enc_F

    def pre_activations_with_mask(self, x_BD: torch.Tensor, encoder_mask_FD: torch.Tensor) -> torch.Tensor:
        """Return the pre-activations under another encoder mask (dense bool, latents as rows)."""
        mask_DF = encoder_mask_FD.T.to(self.W_enc_DF.dtype)
        return (x_BD - self.b_dec_D) @ (self.W_enc_DF * mask_DF) + self.b_enc_F

    def activate(self, pre_BF: torch.Tensor) -> torch.Tensor:
        """Apply the SAE's activation (ReLU, or TopK then ReLU) to pre-activations."""
        if self.cfg.activation == "relu":
            return torch.relu(pre_BF)
        top_values_BK, top_indices_BK = pre_BF.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre_BF).scatter(-1, top_indices_BK, torch.relu(top_values_BK))

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activations(x_BD))

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        if not self.cfg.decoder_mask:
            return super().decode(f_BF)
        return f_BF @ (self.W_dec_FD * self.decoder_mask_FD) + self.b_dec_D

    def dense_gradients(self, x_BD: torch.Tensor, l1_coefficient: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the loss gradients of an unmasked copy of the weights on `x_BD`.

        Pruned weights are 0, so the unmasked copy computes the same loss, and its
        gradients `(grad_W_enc_DF, grad_W_dec_FD)` show how much each pruned connection
        would lower the loss if regrown. No parameter or `.grad` is modified.
        """
        with torch.enable_grad():
            W_enc_DF = self.W_enc_DF.detach().clone().requires_grad_(True)
            W_dec_FD = self.W_dec_FD.detach().clone().requires_grad_(True)
            b_enc_F = self.b_enc_F.detach()
            b_dec_D = self.b_dec_D.detach()
            f_BF = self.activate((x_BD - b_dec_D) @ W_enc_DF + b_enc_F)
            x_hat_BD = f_BF @ W_dec_FD + b_dec_D
            loss = (x_hat_BD - x_BD).pow(2).sum(dim=-1).mean()
            if self.cfg.activation == "relu":
                loss = loss + l1_coefficient * (f_BF * W_dec_FD.norm(dim=1)).sum(dim=-1).mean()
            grad_W_enc_DF, grad_W_dec_FD = torch.autograd.grad(loss, [W_enc_DF, W_dec_FD])
        return grad_W_enc_DF, grad_W_dec_FD

    # Save and load.

    def save_masks(self, directory: str | Path) -> None:
        """Write the masks as Zarr arrays under `<directory>/masks`."""
        group_dir = Path(directory) / MASKS_GROUP
        self.encoder_mask.save(group_dir, ENCODER_MASK_NAME)
        decoder_mask = self.decoder_mask
        if decoder_mask is not None:
            decoder_mask.save(group_dir, DECODER_MASK_NAME)

    def load_masks(self, directory: str | Path) -> None:
        """Read the masks that `save_masks` wrote, checking format, version and shape (MaskError)."""
        group_dir = Path(directory) / MASKS_GROUP
        device = self.encoder_mask_data_FB.device
        self.set_encoder_mask(PackedMask.load(group_dir, ENCODER_MASK_NAME, expected_shape=self.mask_shape, device=device))
        if self.cfg.decoder_mask:
            self.set_decoder_mask(
                PackedMask.load(group_dir, DECODER_MASK_NAME, expected_shape=self.mask_shape, device=device)
            )

    def save(self, directory: str | Path) -> Path:
        """Write the weights and config (`BaseSAE.save`) and the masks (`save_masks`)."""
        directory = super().save(directory)
        self.save_masks(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, device: str | None = None) -> MaskedSAE:
        """Load a masked SAE and its masks saved by `save`."""
        sae = super().load(directory, device=device)
        sae.load_masks(directory)
        return sae


def build_masked_sae_config(cfg: Any, options: FixedOptions, d_in: int, metadata: dict[str, Any]) -> MaskedSAEConfig:
    """Build a MaskedSAEConfig from the run config, the variant options and the store."""
    return MaskedSAEConfig(
        d_in=d_in,
        d_sae=cfg.d_sae,
        dtype=cfg.dtype,
        device=cfg.device,
        norm_scale=metadata.get("norm_scale"),
        metadata=metadata,
        activation=cfg.activation,
        k=cfg.k,
        l1_coefficient=cfg.l1_coefficient,
        l1_warmup_steps=cfg.l1_warmup_steps,
        b_dec_init=cfg.b_dec_init,
        decoder_mask=options.prune_decoder,
    )


def make_fixed_hook(context: HookContext) -> TrainingHook:
    """Build the gradual magnitude pruning hook (imported here to avoid an import cycle)."""
    from trainer.pruning.fixed import FixedPruningHook

    return FixedPruningHook(context)


def make_adaptive_hook(context: HookContext) -> TrainingHook:
    """Build the adaptive pruning hook (imported here to avoid an import cycle)."""
    from trainer.pruning.adaptive import AdaptivePruningHook

    return AdaptivePruningHook(context)


register_variant(
    Variant(
        name="fixed",
        sae_class=MaskedSAE,
        options_class=FixedOptions,
        build_sae_config=build_masked_sae_config,
        make_hook=make_fixed_hook,
    )
)
register_variant(
    Variant(
        name="adaptive",
        sae_class=MaskedSAE,
        options_class=AdaptiveOptions,
        build_sae_config=build_masked_sae_config,
        make_hook=make_adaptive_hook,
    )
)
