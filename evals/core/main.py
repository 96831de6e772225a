"""Run the core eval of a saved SAE and write ``runs/<run>/evals/core.json``.

Two measurements:

1. Reconstruction and sparsity on held-out tokens of the activation store (split 1),
   in the store's normalized space ``x * norm_scale``. BOS and other special tokens are
   not in the store's per-token arrays, so they are never scored.
2. CE loss and KL on held-out contexts (``context_split`` 1) through the real model,
   with block ``layer``'s output replaced by the SAE reconstruction
   ``x_hat_raw = SAE(x * norm_scale) / norm_scale`` (computed in float32, cast back to
   the model dtype), or by zeros for the ablation baseline. Both replacements act on
   every position whose input token is not special, so BOS keeps its original residual
   as it does in training. A position is scored when neither its input nor its target
   is a special token.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from evals.common import default_output_path, epoch_millis, new_eval_id, write_eval_output
from evals.core.config import CoreEvalConfig
from evals.core.metrics import (
    CoreMetricAccumulator,
    DownstreamLossAccumulator,
    DownstreamMetrics,
    ReconstructionMetrics,
    firing_frequency_summary,
    max_cosine_similarity,
    next_token_mask,
)
from evals.core.schema import (
    EVAL_TYPE_ID_CORE,
    CoreEvalOutput,
    CoreFeatureMetric,
    CoreMetricCategories,
    MaskMetrics,
    MiscMetrics,
    ModelBehaviorPreservationMetrics,
    ModelPerformancePreservationMetrics,
    ReconstructionQualityMetrics,
    ShrinkageMetrics,
    SparsityMetrics,
    TokenStatsMetrics,
)
from pipeline.models import load_model, resolve_device, splice_residual
from stores.activations import ActivationStore
from trainer.export import load_any_sae
from trainer.saes import BaseSAE

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

#: Input/output norm ratio outside [1 / LIMIT, LIMIT] is reported as a likely scale mismatch.
NORM_RATIO_WARNING_LIMIT = 2.0

RECONSTRUCTION_SPACE_NOTE = (
    "Reconstruction, shrinkage and sparsity metrics are computed in the store's normalized space "
    "(x * norm_scale, with E||x * norm_scale||^2 = d_model on train tokens)."
)


class CoreEvalError(ValueError):
    """Inputs the core eval cannot evaluate: mismatched SAE and store, or no held-out data."""


@dataclasses.dataclass
class EvalInputs:
    """The SAE, its store and the facts shared by both measurements."""

    sae: BaseSAE
    store: ActivationStore
    store_path: str
    norm_scale: float
    device: torch.device


# Loading and checks


def load_inputs(cfg: CoreEvalConfig) -> EvalInputs:
    """Load the SAE in float32 and open its store, checking that they belong together."""
    device = resolve_device(cfg.device)
    # A SAELens directory (cfg.json + sae_weights.safetensors) loads as a raw-space SAE.
    sae = load_any_sae(cfg.sae_path, device=str(device))
    sae = sae.to(torch.float32).eval()
    sae.requires_grad_(False)

    store_path = cfg.store or sae.cfg.metadata.get("store")
    if not store_path:
        raise CoreEvalError(
            f"the SAE in {cfg.sae_path} does not record its activation store (metadata key 'store'); "
            "pass store=<path of the store it was trained on>"
        )
    store = ActivationStore.open(store_path)
    metadata = store.metadata

    if metadata.d_model != sae.cfg.d_in:
        raise CoreEvalError(
            f"store {store_path} has d_model {metadata.d_model}, but the SAE in {cfg.sae_path} has d_in "
            f"{sae.cfg.d_in}; evaluate the SAE on the store it was trained on"
        )
    sae_layer = sae.cfg.metadata.get("layer")
    if sae_layer is not None and int(sae_layer) != metadata.layer:
        raise CoreEvalError(
            f"store {store_path} contains layer {metadata.layer}, but the SAE in {cfg.sae_path} was trained on "
            f"layer {sae_layer}; evaluate the SAE on the store it was trained on"
        )
    if metadata.norm_scale is None:
        raise CoreEvalError(f"store {store_path} has no norm_scale; finish its harvest first")
    norm_scale = float(metadata.norm_scale)
    if sae.cfg.norm_scale is not None and not math.isclose(
        sae.cfg.norm_scale, norm_scale, rel_tol=1e-6
    ):
        raise CoreEvalError(
            f"the SAE in {cfg.sae_path} was trained with norm_scale {sae.cfg.norm_scale}, but store "
            f"{store_path} has norm_scale {norm_scale}; evaluate the SAE on the store it was trained on"
        )
    return EvalInputs(
        sae=sae, store=store, store_path=str(store_path), norm_scale=norm_scale, device=device
    )


def reconstruct_normalized(
    sae: BaseSAE, x_norm_BD: torch.Tensor, norm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x_hat_BD, f_BF)`` in the normalized space, for SAEs in either space."""
    if sae.cfg.activation_space == "raw":
        x_hat_raw_BD, f_BF = sae(x_norm_BD / norm_scale)
        return x_hat_raw_BD * norm_scale, f_BF
    return sae(x_norm_BD)


# Reconstruction metrics on held-out tokens


def sample_heldout_rows(store: ActivationStore, n_tokens: int, seed: int) -> dict[int, np.ndarray]:
    """Sample up to ``n_tokens`` held-out rows uniformly over all shards, without replacement.

    Returns ``{shard index: sorted row indices}``.
    """
    shard_indices = []
    shard_rows = []
    for info in store.shards:
        split_N = store.read_shard(info.index, ["split"])["split"]
        rows = np.flatnonzero(split_N == 1)
        shard_indices.append(np.full(len(rows), info.index, dtype=np.int64))
        shard_rows.append(rows.astype(np.int64))
    all_shards = np.concatenate(shard_indices) if shard_indices else np.empty(0, dtype=np.int64)
    all_rows = np.concatenate(shard_rows) if shard_rows else np.empty(0, dtype=np.int64)
    if len(all_rows) == 0:
        raise CoreEvalError(
            f"store {store.path} has no held-out tokens (split 1); harvest it with heldout_fraction > 0"
        )

    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(all_rows), size=min(n_tokens, len(all_rows)), replace=False))
    selection = {}
    for shard_index in np.unique(all_shards[chosen]):
        in_shard = chosen[all_shards[chosen] == shard_index]
        selection[int(shard_index)] = np.sort(all_rows[in_shard])
    return selection


def iter_normalized_batches(
    store: ActivationStore,
    selection: dict[int, np.ndarray],
    norm_scale: float,
    batch_size: int,
    device: torch.device,
) -> Iterator[torch.Tensor]:
    """Yield the selected activations, normalized, as float32 ``[batch, d_model]`` tensors."""
    for shard_index, rows in selection.items():
        acts_ND = torch.from_numpy(store.read_acts(shard_index, rows))
        for start in range(0, len(rows), batch_size):
            yield (acts_ND[start : start + batch_size].to(device) * norm_scale).to(torch.float32)


@torch.no_grad()
def compute_reconstruction_metrics(
    inputs: EvalInputs, cfg: CoreEvalConfig
) -> ReconstructionMetrics:
    """Compute reconstruction and sparsity metrics on sampled held-out tokens.

    The tokens are read twice: once for their mean (the reference of the legacy explained
    variance), once through the SAE, so that memory stays at one shard.
    """
    selection = sample_heldout_rows(inputs.store, cfg.n_eval_tokens, cfg.random_seed)

    sum_D = torch.zeros(inputs.sae.cfg.d_in, dtype=torch.float64)
    n_tokens = 0
    for x_BD in iter_normalized_batches(
        inputs.store, selection, inputs.norm_scale, cfg.batch_size, inputs.device
    ):
        sum_D += x_BD.sum(dim=0, dtype=torch.float64).cpu()
        n_tokens += x_BD.shape[0]

    accumulator = CoreMetricAccumulator(d_sae=inputs.sae.cfg.d_sae, legacy_mean_D=sum_D / n_tokens)
    for x_BD in iter_normalized_batches(
        inputs.store, selection, inputs.norm_scale, cfg.batch_size, inputs.device
    ):
        x_hat_BD, f_BF = reconstruct_normalized(inputs.sae, x_BD, inputs.norm_scale)
        accumulator.update(x_BD, x_hat_BD, f_BF)
    return accumulator.compute()


# CE loss and KL on held-out contexts


def sample_heldout_contexts(store: ActivationStore, n_contexts: int, seed: int) -> np.ndarray:
    """Sample up to ``n_contexts`` held-out contexts uniformly over all shards; shape ``[C, T]``."""
    candidates = []
    for info in store.shards:
        arrays = store.read_shard(info.index, ["contexts", "context_split"])
        candidates.append(arrays["contexts"][arrays["context_split"] == 1])
    contexts_CT = (
        np.concatenate(candidates)
        if candidates
        else np.empty((0, store.metadata.context_size), dtype=np.int32)
    )
    if len(contexts_CT) == 0:
        raise CoreEvalError(
            f"store {store.path} has no held-out contexts (context_split 1); harvest it with "
            "heldout_fraction > 0, or pass n_eval_contexts=0 to skip CE loss and KL"
        )

    rng = np.random.default_rng(seed)
    chosen = np.sort(
        rng.choice(len(contexts_CT), size=min(n_contexts, len(contexts_CT)), replace=False)
    )
    return contexts_CT[chosen]


def final_hidden_states(model: torch.nn.Module, input_ids_BL: torch.Tensor) -> torch.Tensor:
    """Run the model without its LM head and return the hidden state the head reads (after the final norm)."""
    decoder = cast("PreTrainedModel", model).get_decoder()
    if decoder is model:
        raise CoreEvalError(
            f"{type(model).__name__}.get_decoder() returns the model itself, so the LM head cannot be "
            "applied in chunks; use a causal LM whose base model is separate from its head"
        )
    output = decoder(
        input_ids=input_ids_BL, attention_mask=torch.ones_like(input_ids_BL), use_cache=False
    )
    return output.last_hidden_state


def logits_from_hidden(model: torch.nn.Module, hidden_ND: torch.Tensor) -> torch.Tensor:
    """Apply the LM head (and the final logit soft-capping of Gemma-style models) to hidden states."""
    causal_lm = cast("PreTrainedModel", model)
    logits_NV = causal_lm.get_output_embeddings()(hidden_ND)
    softcap = getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)
    if softcap:
        logits_NV = torch.tanh(logits_NV / softcap) * softcap
    return logits_NV.float()


def make_sae_splice(
    sae: BaseSAE, norm_scale: float, replace_BL1: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return the splice function that swaps the residual for its reconstruction where ``replace_BL1``."""

    def replace_with_reconstruction(hidden_BLD: torch.Tensor) -> torch.Tensor:
        x_norm_ND = hidden_BLD.reshape(-1, hidden_BLD.shape[-1]).float() * norm_scale
        x_hat_norm_ND, _ = reconstruct_normalized(sae, x_norm_ND, norm_scale)
        x_hat_BLD = (x_hat_norm_ND / norm_scale).reshape(hidden_BLD.shape).to(hidden_BLD.dtype)
        return torch.where(replace_BL1, x_hat_BLD, hidden_BLD)

    return replace_with_reconstruction


def make_zero_splice(replace_BL1: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return the splice function that sets the residual to zero where ``replace_BL1``."""

    def replace_with_zeros(hidden_BLD: torch.Tensor) -> torch.Tensor:
        return torch.where(replace_BL1, torch.zeros_like(hidden_BLD), hidden_BLD)

    return replace_with_zeros


@torch.no_grad()
def compute_downstream_metrics(
    inputs: EvalInputs, cfg: CoreEvalConfig, model_name: str
) -> tuple[DownstreamMetrics, int]:
    """Compute CE loss and KL with the SAE and with zero ablation; return them and the number of contexts."""
    store_metadata = inputs.store.metadata
    contexts_CT = sample_heldout_contexts(inputs.store, cfg.n_eval_contexts, cfg.random_seed)

    loaded = load_model(model_name, dtype=cfg.dtype, device=str(inputs.device))
    if loaded.d_model != store_metadata.d_model:
        raise CoreEvalError(
            f"model {model_name} has d_model {loaded.d_model}, but store {inputs.store_path} has d_model "
            f"{store_metadata.d_model}; pass the model the store was harvested from"
        )
    layer = store_metadata.layer
    special_ids = set(store_metadata.special_token_ids) | set(loaded.special_token_ids)
    for token_id in (store_metadata.bos_token_id, loaded.bos_token_id):
        if token_id is not None:
            special_ids.add(int(token_id))
    special_ids_S = torch.tensor(sorted(special_ids), dtype=torch.long, device=loaded.device)

    accumulator = DownstreamLossAccumulator(chunk_size=cfg.logit_chunk_size)
    model = loaded.model
    for start in range(0, len(contexts_CT), cfg.context_batch_size):
        input_ids_BL = (
            torch.from_numpy(contexts_CT[start : start + cfg.context_batch_size])
            .long()
            .to(loaded.device)
        )
        score_BL = next_token_mask(input_ids_BL, sorted(special_ids))
        replace_BL1 = ~torch.isin(input_ids_BL, special_ids_S)[..., None]
        targets_BL = torch.roll(input_ids_BL, shifts=-1, dims=1)

        hidden_original_BLD = final_hidden_states(model, input_ids_BL)
        with splice_residual(
            model, layer, make_sae_splice(inputs.sae, inputs.norm_scale, replace_BL1)
        ):
            hidden_sae_BLD = final_hidden_states(model, input_ids_BL)
        with splice_residual(model, layer, make_zero_splice(replace_BL1)):
            hidden_ablation_BLD = final_hidden_states(model, input_ids_BL)

        hidden_original_ND = hidden_original_BLD[score_BL]
        hidden_sae_ND = hidden_sae_BLD[score_BL]
        hidden_ablation_ND = hidden_ablation_BLD[score_BL]
        targets_N = targets_BL[score_BL]
        for chunk_start in range(0, len(targets_N), cfg.logit_chunk_size):
            chunk = slice(chunk_start, chunk_start + cfg.logit_chunk_size)
            accumulator.update(
                logits_from_hidden(model, hidden_original_ND[chunk]),
                logits_from_hidden(model, hidden_sae_ND[chunk]),
                logits_from_hidden(model, hidden_ablation_ND[chunk]),
                targets_N[chunk],
            )

    if accumulator.n_tokens == 0:
        raise CoreEvalError(
            f"the {len(contexts_CT)} held-out contexts of {inputs.store_path} have no scorable next-token "
            "prediction (every input or target is a special token)"
        )
    return accumulator.compute(), len(contexts_CT)


# Weight statistics and diagnosis


@torch.no_grad()
def compute_weight_statistics(sae: BaseSAE) -> dict[str, torch.Tensor | None]:
    """Return per-latent weight statistics (on CPU): encoder norm and bias, cosine similarities.

    They are computed on the SAE's device, because the maximum cosine similarities cost
    two ``F x F x D`` matrix products.
    """
    encoder_FD = sae.W_enc_DF.T.float()
    decoder_FD = sae.W_dec_FD.float()
    several_latents = sae.cfg.d_sae >= 2
    statistics = {
        "encoder_norm_F": encoder_FD.norm(dim=-1),
        "encoder_bias_F": sae.b_enc_F.float(),
        "encoder_decoder_cosine_sim_F": torch.nn.functional.cosine_similarity(
            encoder_FD, decoder_FD, dim=-1
        ),
        "max_encoder_cosine_sim_F": max_cosine_similarity(encoder_FD) if several_latents else None,
        "max_decoder_cosine_sim_F": max_cosine_similarity(decoder_FD) if several_latents else None,
    }
    return {name: None if tensor is None else tensor.cpu() for name, tensor in statistics.items()}


def read_mask_densities(sae: BaseSAE) -> MaskMetrics:
    """Read ``sae.mask_densities()`` when the SAE has masks; a dense SAE gives None densities."""
    mask_densities = getattr(sae, "mask_densities", None)
    if not callable(mask_densities):
        return MaskMetrics(encoder_density=None, decoder_density=None)
    densities = mask_densities()
    return MaskMetrics(
        encoder_density=densities.get("encoder_density"),
        decoder_density=densities.get("decoder_density"),
    )


def diagnose(
    reconstruction: ReconstructionMetrics, downstream: DownstreamMetrics | None
) -> list[str]:
    """Return a warning with a likely cause for each result that signals a broken SAE."""
    warnings = []
    if reconstruction.frac_alive == 0.0:
        warnings.append(
            f"no latent fired on any of the {reconstruction.n_tokens} held-out tokens (frac_alive = 0), so the "
            "reconstruction is the constant b_dec: the SAE is dead. Lower the L1 coefficient or the learning "
            "rate, or check that training ran on this store."
        )
    if reconstruction.explained_variance < 0.0:
        ratio = reconstruction.l2_ratio
        if reconstruction.frac_alive == 0.0:
            cause = "every latent is dead"
        elif ratio > NORM_RATIO_WARNING_LIMIT or ratio < 1.0 / NORM_RATIO_WARNING_LIMIT:
            cause = (
                f"the reconstructions are {ratio:.3g} times as long as the inputs, so the SAE most likely sees "
                "activations at another scale than in training (a norm_scale mismatch, or a raw/normalized mix-up)"
            )
        else:
            cause = (
                "the SAE does worse than predicting the mean activation: it is undertrained, diverged, or was "
                "trained on another layer or model"
            )
        warnings.append(
            f"explained variance is negative ({reconstruction.explained_variance:.4g}, mse "
            f"{reconstruction.mse:.4g}): {cause}."
        )
    if (
        downstream is not None
        and downstream.ce_loss_score is not None
        and downstream.ce_loss_score < 0.0
    ):
        warnings.append(
            f"ce_loss_score is negative ({downstream.ce_loss_score:.4g}): splicing in the SAE raises the loss "
            f"({downstream.ce_loss_with_sae:.4g} nats) above zero ablation ({downstream.ce_loss_with_ablation:.4g})."
        )
    return warnings


# Output


def build_feature_details(
    reconstruction: ReconstructionMetrics, weights: dict[str, torch.Tensor | None]
) -> list[CoreFeatureMetric]:
    """Return one ``CoreFeatureMetric`` per latent."""

    def value_at(name: str, index: int) -> float | None:
        tensor = weights[name]
        return None if tensor is None else float(tensor[index])

    def required(name: str) -> torch.Tensor:
        tensor = weights[name]
        if tensor is None:
            raise CoreEvalError(f"weight statistic {name} is missing")
        return tensor

    encoder_bias_F = required("encoder_bias_F")
    encoder_norm_F = required("encoder_norm_F")
    cosine_sim_F = required("encoder_decoder_cosine_sim_F")

    details = []
    for index in range(len(reconstruction.firing_frequency_F)):
        details.append(
            CoreFeatureMetric(
                index=index,
                feature_density=float(reconstruction.firing_frequency_F[index]),
                encoder_bias=float(encoder_bias_F[index]),
                encoder_norm=float(encoder_norm_F[index]),
                encoder_decoder_cosine_sim=float(cosine_sim_F[index]),
                max_encoder_cosine_sim=value_at("max_encoder_cosine_sim_F", index),
                max_decoder_cosine_sim=value_at("max_decoder_cosine_sim_F", index),
            )
        )
    return details


def build_metrics(
    reconstruction: ReconstructionMetrics,
    downstream: DownstreamMetrics | None,
    n_contexts: int,
    weights: dict[str, torch.Tensor | None],
    masks: MaskMetrics,
) -> CoreMetricCategories:
    """Group the computed numbers into SAEBench's core categories."""

    def mean_or_none(tensor: torch.Tensor | None) -> float | None:
        return None if tensor is None else tensor.mean().item()

    behavior = None
    performance = None
    if downstream is not None:
        behavior = ModelBehaviorPreservationMetrics(
            kl_div_score=downstream.kl_div_score,
            kl_div_with_ablation=downstream.kl_div_with_ablation,
            kl_div_with_sae=downstream.kl_div_with_sae,
        )
        performance = ModelPerformancePreservationMetrics(
            ce_loss_score=downstream.ce_loss_score,
            ce_loss_with_ablation=downstream.ce_loss_with_ablation,
            ce_loss_with_sae=downstream.ce_loss_with_sae,
            ce_loss_without_sae=downstream.ce_loss_without_sae,
        )

    return CoreMetricCategories(
        model_behavior_preservation=behavior,
        model_performance_preservation=performance,
        reconstruction_quality=ReconstructionQualityMetrics(
            explained_variance=reconstruction.explained_variance,
            explained_variance_legacy=reconstruction.explained_variance_legacy,
            mse=reconstruction.mse,
            cossim=reconstruction.cossim,
        ),
        shrinkage=ShrinkageMetrics(
            l2_norm_in=reconstruction.l2_norm_in,
            l2_norm_out=reconstruction.l2_norm_out,
            l2_ratio=reconstruction.l2_ratio,
            relative_reconstruction_bias=reconstruction.relative_reconstruction_bias,
        ),
        sparsity=SparsityMetrics(l0=reconstruction.l0, l1=reconstruction.l1),
        misc_metrics=MiscMetrics(
            **firing_frequency_summary(reconstruction.firing_frequency_F),
            average_max_encoder_cosine_sim=mean_or_none(weights["max_encoder_cosine_sim_F"]),
            average_max_decoder_cosine_sim=mean_or_none(weights["max_decoder_cosine_sim_F"]),
            frac_alive=reconstruction.frac_alive,
        ),
        masks=masks,
        token_stats=TokenStatsMetrics(
            total_tokens_eval_reconstruction=0 if downstream is None else downstream.n_tokens,
            total_tokens_eval_sparsity_variance=reconstruction.n_tokens,
            total_contexts_eval_reconstruction=n_contexts,
        ),
    )


def sae_config_dict(inputs: EvalInputs) -> dict[str, Any]:
    """Return the SAE's config plus the facts a reader needs to place it."""
    sae = inputs.sae
    metadata = inputs.store.metadata
    return {
        **sae.cfg.to_dict(),
        "architecture": sae.architecture,
        "variant": sae.cfg.metadata.get("variant", sae.architecture),
        "model": metadata.model,
        "layer": metadata.layer,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "norm_scale": inputs.norm_scale,
    }


def run(cfg: CoreEvalConfig) -> Path:
    """Run the core eval and write its JSON result; return the path written."""
    inputs = load_inputs(cfg)
    model_name = cfg.model or inputs.store.metadata.model
    output_path = (
        Path(cfg.output)
        if cfg.output
        else default_output_path(Path(cfg.sae_path).parent, EVAL_TYPE_ID_CORE)
    )
    resolved_cfg = dataclasses.replace(
        cfg, store=inputs.store_path, model=model_name, output=str(output_path)
    )

    reconstruction = compute_reconstruction_metrics(inputs, cfg)
    downstream = None
    n_contexts = 0
    if cfg.n_eval_contexts > 0:
        downstream, n_contexts = compute_downstream_metrics(inputs, cfg, model_name)

    weights = compute_weight_statistics(inputs.sae)
    warnings = diagnose(reconstruction, downstream)
    for warning in warnings:
        logger.warning("core eval of %s: %s", cfg.sae_path, warning)

    output = CoreEvalOutput(
        eval_config=dataclasses.asdict(resolved_cfg),
        eval_id=new_eval_id(),
        datetime_epoch_millis=epoch_millis(),
        eval_result_metrics=build_metrics(
            reconstruction, downstream, n_contexts, weights, read_mask_densities(inputs.sae)
        ),
        eval_result_details=build_feature_details(reconstruction, weights)
        if cfg.feature_details
        else [],
        eval_result_unstructured={
            "reconstruction_space": RECONSTRUCTION_SPACE_NOTE,
            "warnings": warnings,
        },
        sae_cfg_dict=sae_config_dict(inputs),
    )
    write_eval_output(output, output_path)

    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    logger.info(
        "core eval of %s: explained_variance %s, mse %s, l0 %.2f, frac_alive %s, ce_loss_score %s, "
        "kl_div_score %s (%d tokens, %d contexts) -> %s",
        cfg.sae_path,
        number(reconstruction.explained_variance),
        number(reconstruction.mse),
        reconstruction.l0,
        number(reconstruction.frac_alive),
        number(None if downstream is None else downstream.ce_loss_score),
        number(None if downstream is None else downstream.kl_div_score),
        reconstruction.n_tokens,
        n_contexts,
        output_path,
    )
    return output_path
