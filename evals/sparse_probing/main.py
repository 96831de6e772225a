"""Run the sparse probing eval of a saved SAE and write ``runs/<run>/evals/sparse_probing.json``.

For each dataset:

1. Read the labelled texts and sample each class's train and test pools (``data.py``).
2. Tokenize each text as the activation store does (BOS, when the tokenizer has one,
   then the text without special tokens), truncated to ``context_length`` tokens.
3. Run the model up to the SAE's layer. At every real token (not BOS, padding or another
   special token) take the residual ``x`` and the SAE latents of that token, computed
   on ``x * norm_scale`` for an SAE trained on normalized activations and on ``x`` for
   one in raw space. Mean-pool both over the text's real tokens.
4. Check that the SAE latents carry information: some latent fires and some pooled
   latent varies across texts. A degenerate SAE raises ``DegenerateSAEError``, because
   its probes would report chance accuracy (0.5) that looks like a result.
5. For each class, fit the probes of ``probes.py`` on a balanced one-vs-rest task.

Accuracies are averaged over the classes of a dataset, then over datasets.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evals.common import (
    default_output_path,
    epoch_millis,
    new_eval_id,
    wilson_interval,
    write_eval_output,
)
from evals.sparse_probing.config import SAEBENCH_K_VALUES, ProbingDataset, SparseProbingEvalConfig
from evals.sparse_probing.data import (
    ClassPools,
    load_labelled_texts,
    one_vs_rest_task,
    sample_class_pools,
)
from evals.sparse_probing.probes import evaluate_probes
from evals.sparse_probing.schema import (
    EVAL_TYPE_ID_SPARSE_PROBING,
    SparseProbingEvalOutput,
    SparseProbingLlmMetrics,
    SparseProbingMetricCategories,
    SparseProbingResultDetail,
    SparseProbingSaeMetrics,
)
from pipeline.models import LoadedModel, capture_residual, load_model, resolve_device, resolve_layer
from trainer.export import load_any_sae
from trainer.saes import BaseSAE

logger = logging.getLogger(__name__)

#: A pooled latent whose standard deviation across texts is at most this fraction of its
#: mean magnitude (plus CONSTANT_LATENT_ATOL) counts as constant: float32 rounding of a
#: constant latent's mean stays far below it.
CONSTANT_LATENT_RTOL = 1e-4
CONSTANT_LATENT_ATOL = 1e-8


class SparseProbingError(ValueError):
    """Inputs the sparse probing eval cannot evaluate: a missing model or layer, or mismatched widths."""


class DegenerateSAEError(SparseProbingError):
    """An SAE whose latents are all dead or all constant on the probing texts."""


@dataclass
class EvalInputs:
    """The SAE, the model and the facts needed to encode residual activations."""

    sae: BaseSAE
    loaded: LoadedModel
    layer: int
    input_scale: float
    special_ids: list[int]
    device: torch.device


@dataclass
class PooledFeatures:
    """Mean-pooled features of every sampled text of one dataset."""

    llm_ND: np.ndarray
    sae_NF: np.ndarray
    n_tokens: int
    n_truncated: int
    fired_F: np.ndarray


# Loading


def load_inputs(cfg: SparseProbingEvalConfig) -> EvalInputs:
    """Load the SAE (knowsep or SAELens format) and its model, checking that they fit together."""
    device = resolve_device(cfg.device)
    sae = load_any_sae(cfg.sae_path, device=str(device))
    sae = sae.to(torch.float32).eval()
    sae.requires_grad_(False)

    model_name = cfg.model or sae.cfg.metadata.get("model")
    if not model_name:
        raise SparseProbingError(
            f"the SAE in {cfg.sae_path} does not record its model (metadata key 'model'); pass model=<name or directory>"
        )
    layer = sae.cfg.metadata.get("layer")
    if layer is None:
        raise SparseProbingError(
            f"the SAE in {cfg.sae_path} does not record its layer (metadata key 'layer', or an SAELens hook_name "
            "blocks.<layer>.hook_resid_post); sparse probing needs the block whose output it encodes"
        )

    if sae.cfg.activation_space == "raw":
        input_scale = 1.0
    elif sae.cfg.norm_scale is None:
        raise SparseProbingError(
            f"the SAE in {cfg.sae_path} takes normalized activations but has no norm_scale; "
            "train it with knowsep, which records the store's norm_scale"
        )
    else:
        input_scale = float(sae.cfg.norm_scale)

    loaded = load_model(str(model_name), dtype=cfg.dtype, device=str(device))
    if loaded.d_model != sae.cfg.d_in:
        raise SparseProbingError(
            f"model {model_name} has d_model {loaded.d_model}, but the SAE in {cfg.sae_path} has d_in "
            f"{sae.cfg.d_in}; pass the model the SAE was trained on"
        )
    layer = resolve_layer(int(layer), loaded.n_layers)

    special_ids = set(loaded.special_token_ids)
    if loaded.bos_token_id is not None:
        special_ids.add(int(loaded.bos_token_id))
    return EvalInputs(
        sae=sae,
        loaded=loaded,
        layer=layer,
        input_scale=input_scale,
        special_ids=sorted(special_ids),
        device=device,
    )


# Activations


def tokenize_texts(
    loaded: LoadedModel, texts: list[str], context_length: int
) -> tuple[list[list[int]], int]:
    """Tokenize like the activation store (BOS, then the text) and truncate; return ids and the truncated count."""
    encoded = loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]
    prefix = [] if loaded.bos_token_id is None else [int(loaded.bos_token_id)]
    sequences = []
    n_truncated = 0
    for ids in encoded:
        sequence = prefix + list(ids)
        if len(sequence) > context_length:
            n_truncated += 1
            sequence = sequence[:context_length]
        sequences.append(sequence)
    return sequences, n_truncated


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``(input_ids_BL, attention_mask_BL)``."""
    length = max(len(sequence) for sequence in sequences)
    input_ids_BL = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask_BL = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids_BL[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask_BL[row, : len(sequence)] = 1
    return input_ids_BL, attention_mask_BL


@torch.no_grad()
def pool_batch(
    inputs: EvalInputs,
    input_ids_BL: torch.Tensor,
    attention_mask_BL: torch.Tensor,
    sae_batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Return the mean-pooled residual ``[B, D]`` and latents ``[B, F]``, the latents that fired, and the token count."""
    device = inputs.loaded.device
    input_ids_BL = input_ids_BL.to(device)
    attention_mask_BL = attention_mask_BL.to(device)
    special_ids_S = torch.tensor(inputs.special_ids, dtype=torch.long, device=device)
    real_BL = attention_mask_BL.bool() & ~torch.isin(input_ids_BL, special_ids_S)
    n_real_B = real_BL.sum(dim=1)
    if bool((n_real_B == 0).any()):
        row = int(torch.nonzero(n_real_B == 0)[0, 0])
        raise SparseProbingError(
            f"a text has no token other than special tokens (ids {input_ids_BL[row].tolist()}); "
            "remove it from the dataset or raise context_length"
        )

    acts_BLD = capture_residual(
        inputs.loaded.model, inputs.layer, input_ids_BL, attention_mask_BL
    ).float()
    weights_BL1 = (real_BL.float() / n_real_B[:, None].float())[..., None]
    llm_BD = (acts_BLD * weights_BL1).sum(dim=1)

    sae = inputs.sae
    sae_device = sae.W_enc_DF.device
    sae_BF = torch.zeros(len(input_ids_BL), sae.cfg.d_sae, dtype=torch.float32, device=sae_device)
    fired_F = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae_device)
    for start in range(0, len(input_ids_BL), sae_batch_size):
        rows = slice(start, start + sae_batch_size)
        chunk_real_bL = real_BL[rows]
        x_TD = acts_BLD[rows][chunk_real_bL].to(sae_device) * inputs.input_scale
        f_TF = sae.encode(x_TD).float()
        fired_F |= (f_TF > 0).any(dim=0)
        row_T = torch.nonzero(chunk_real_bL)[:, 0].to(sae_device) + start
        sae_BF.index_add_(0, row_T, f_TF)
    sae_BF /= n_real_B.to(sae_device)[:, None].float()
    return llm_BD.cpu(), sae_BF.cpu(), fired_F.cpu(), int(n_real_B.sum())


def collect_pooled_features(
    inputs: EvalInputs, texts: list[str], cfg: SparseProbingEvalConfig
) -> PooledFeatures:
    """Run every text through the model and the SAE; rows follow ``texts``."""
    sequences, n_truncated = tokenize_texts(inputs.loaded, texts, cfg.context_length)
    tokenizer = inputs.loaded.tokenizer
    pad_id = next(
        (
            int(token_id)
            for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id)
            if token_id is not None
        ),
        0,
    )

    # Batches of similar lengths waste little compute on padding.
    order = sorted(range(len(sequences)), key=lambda index: len(sequences[index]))
    llm_ND = np.zeros((len(texts), inputs.sae.cfg.d_in), dtype=np.float32)
    sae_NF = np.zeros((len(texts), inputs.sae.cfg.d_sae), dtype=np.float32)
    fired_F = torch.zeros(inputs.sae.cfg.d_sae, dtype=torch.bool)
    n_tokens = 0
    for start in range(0, len(order), cfg.llm_batch_size):
        rows = order[start : start + cfg.llm_batch_size]
        input_ids_BL, attention_mask_BL = pad_batch([sequences[row] for row in rows], pad_id)
        llm_BD, sae_BF, batch_fired_F, batch_tokens = pool_batch(
            inputs, input_ids_BL, attention_mask_BL, cfg.sae_batch_size
        )
        llm_ND[rows] = llm_BD.numpy()
        sae_NF[rows] = sae_BF.numpy()
        fired_F |= batch_fired_F
        n_tokens += batch_tokens
    return PooledFeatures(
        llm_ND=llm_ND,
        sae_NF=sae_NF,
        n_tokens=n_tokens,
        n_truncated=n_truncated,
        fired_F=fired_F.numpy(),
    )


def check_sae_informative(features: PooledFeatures, dataset_name: str, sae_path: str) -> None:
    """Raise ``DegenerateSAEError`` when no latent fires, or when no pooled latent varies across texts."""
    n_texts, d_sae = features.sae_NF.shape
    n_alive = int(features.fired_F.sum())
    std_F = features.sae_NF.std(axis=0, dtype=np.float64)
    mean_F = np.abs(features.sae_NF.mean(axis=0, dtype=np.float64))
    varying = std_F > CONSTANT_LATENT_RTOL * mean_F + CONSTANT_LATENT_ATOL
    diagnosis = (
        f"{n_alive} of {d_sae} latents fired on the {features.n_tokens} tokens of {n_texts} texts of dataset "
        f"{dataset_name!r}, and the largest standard deviation of a mean-pooled latent across texts is "
        f"{float(std_F.max()):.3g}"
    )
    causes = (
        "Probes on these latents can only reach chance accuracy (0.5). Check that the SAE was trained on this "
        "model and layer, that its norm_scale matches its activation store, and its core eval (frac_alive, "
        "explained_variance)."
    )
    if n_alive == 0:
        raise DegenerateSAEError(f"the SAE in {sae_path} is dead: {diagnosis}. {causes}")
    if not varying.any():
        raise DegenerateSAEError(
            f"every latent of the SAE in {sae_path} is constant across texts: {diagnosis}. {causes}"
        )


# Probing


def probe_dataset(
    features: PooledFeatures,
    pools: ClassPools,
    cfg: SparseProbingEvalConfig,
    rng: np.random.Generator,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Fit every probe of every class's task; return the class-averaged metrics and the per-class ones."""
    per_class: dict[str, dict[str, float]] = {}
    not_converged = 0
    for label in pools.train_pools:
        train_rows, train_y = one_vs_rest_task(pools.train_pools, label, rng)
        test_rows, test_y = one_vs_rest_task(pools.test_pools, label, rng)
        for prefix, features_NX in (("llm", features.llm_ND), ("sae", features.sae_NF)):
            accuracies, failures = evaluate_probes(
                features_NX[train_rows],
                train_y,
                features_NX[test_rows],
                test_y,
                cfg.k_values,
                cfg.probe_max_iter,
            )
            not_converged += failures
            for name, accuracy in accuracies.items():
                per_class.setdefault(f"{prefix}_{name}", {})[label] = accuracy
    if not_converged:
        logger.warning(
            "%d probe fits stopped at probe_max_iter=%d before converging; raise probe_max_iter if accuracies look low",
            not_converged,
            cfg.probe_max_iter,
        )
    averaged = {name: float(np.mean(list(values.values()))) for name, values in per_class.items()}
    return averaged, per_class


def evaluate_dataset(
    inputs: EvalInputs, spec: ProbingDataset, cfg: SparseProbingEvalConfig, dataset_index: int
) -> tuple[SparseProbingResultDetail, dict[str, dict[str, float]]]:
    """Probe one labelled text set and return its detail row and per-class accuracies."""
    rng = np.random.default_rng([cfg.random_seed, dataset_index])
    texts_by_label = load_labelled_texts(spec)
    pools = sample_class_pools(
        texts_by_label,
        cfg.probe_train_set_size,
        cfg.probe_test_set_size,
        rng,
        dataset_name=spec.name,
    )
    logger.info(
        "sparse probing %s: %d classes, %d texts (train sets of %d, test sets of %d)",
        spec.name,
        len(texts_by_label),
        len(pools.texts),
        pools.probe_train_set_size,
        pools.probe_test_set_size,
    )

    features = collect_pooled_features(inputs, pools.texts, cfg)
    if features.n_truncated:
        logger.info(
            "sparse probing %s: %d of %d texts are longer than context_length %d and were truncated",
            spec.name,
            features.n_truncated,
            len(pools.texts),
            cfg.context_length,
        )
    check_sae_informative(features, spec.name, cfg.sae_path)
    averaged, per_class = probe_dataset(features, pools, cfg, rng)

    n_test_predictions = len(pools.train_pools) * pools.probe_test_set_size
    intervals: dict[str, list[float]] = {}
    for name, accuracy in averaged.items():
        if accuracy is None:
            continue
        low, high = wilson_interval(round(accuracy * n_test_predictions), n_test_predictions)
        if low is not None and high is not None:
            intervals[name] = [low, high]

    detail = SparseProbingResultDetail(
        dataset_name=f"{spec.name}_results",
        n_test_predictions=n_test_predictions,
        accuracy_intervals=intervals,
        classes=list(pools.train_pools),
        probe_train_set_size=pools.probe_train_set_size,
        probe_test_set_size=pools.probe_test_set_size,
        downsized=pools.downsized,
        n_texts=len(pools.texts),
        n_truncated_texts=features.n_truncated,
        n_tokens=features.n_tokens,
        sae_frac_alive=float(features.fired_F.mean()),
        **averaged,
    )
    return detail, per_class


# Output


def average_over_datasets(
    details: list[SparseProbingResultDetail],
) -> SparseProbingMetricCategories:
    """Average each metric over datasets; a metric no dataset has stays None."""

    def mean_of(name: str) -> float | None:
        values = [getattr(detail, name) for detail in details if getattr(detail, name) is not None]
        return float(np.mean(values)) if values else None

    llm_top_k = {
        f"llm_top_{k}_test_accuracy": mean_of(f"llm_top_{k}_test_accuracy")
        for k in SAEBENCH_K_VALUES
    }
    sae_top_k = {
        f"sae_top_{k}_test_accuracy": mean_of(f"sae_top_{k}_test_accuracy")
        for k in SAEBENCH_K_VALUES
    }
    return SparseProbingMetricCategories(
        llm=SparseProbingLlmMetrics(
            llm_test_accuracy=float(np.mean([detail.llm_test_accuracy for detail in details])),
            **llm_top_k,
        ),
        sae=SparseProbingSaeMetrics(sae_test_accuracy=mean_of("sae_test_accuracy"), **sae_top_k),
    )


def sae_config_dict(inputs: EvalInputs, model_name: str) -> dict[str, Any]:
    """Return the SAE's config plus the facts a reader needs to place it."""
    sae = inputs.sae
    return {
        **sae.cfg.to_dict(),
        "architecture": sae.architecture,
        "variant": sae.cfg.metadata.get("variant", sae.architecture),
        "model": model_name,
        "layer": inputs.layer,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "norm_scale": sae.cfg.norm_scale,
    }


def run(cfg: SparseProbingEvalConfig) -> Path:
    """Run the sparse probing eval and write its JSON result; return the path written."""
    inputs = load_inputs(cfg)
    model_name = inputs.loaded.name
    output_path = (
        Path(cfg.output)
        if cfg.output
        else default_output_path(Path(cfg.sae_path).parent, EVAL_TYPE_ID_SPARSE_PROBING)
    )
    resolved_cfg = dataclasses.replace(cfg, model=model_name, output=str(output_path))

    details = []
    per_class_by_dataset = {}
    for index, spec in enumerate(cfg.datasets):
        detail, per_class = evaluate_dataset(inputs, spec, cfg, index)
        details.append(detail)
        per_class_by_dataset[detail.dataset_name] = per_class

    metrics = average_over_datasets(details)
    output = SparseProbingEvalOutput(
        eval_config=dataclasses.asdict(resolved_cfg),
        eval_id=new_eval_id(),
        datetime_epoch_millis=epoch_millis(),
        eval_result_metrics=metrics,
        eval_result_details=details,
        eval_result_unstructured=per_class_by_dataset,
        sae_cfg_dict=sae_config_dict(inputs, model_name),
    )
    write_eval_output(output, output_path)

    top_k_summary = ", ".join(
        f"top-{k} llm {getattr(metrics.llm, f'llm_top_{k}_test_accuracy'):.3f} / "
        f"sae {getattr(metrics.sae, f'sae_top_{k}_test_accuracy'):.3f}"
        for k in cfg.k_values
    )
    logger.info(
        "sparse probing of %s: llm_test_accuracy %.3f, sae_test_accuracy %.3f, %s -> %s",
        cfg.sae_path,
        metrics.llm.llm_test_accuracy,
        metrics.sae.sae_test_accuracy,
        top_k_summary,
        output_path,
    )
    return output_path
