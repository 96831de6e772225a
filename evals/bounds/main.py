"""Run the separation bounds eval of a saved SAE and write ``runs/<run>/evals/separation_bounds.json``.

Steps:

1. Train-split statistics of the final SAE: forget and retain firing rates, retain
   mean activations, and the retain mean and covariance of the normalized input. They
   come from streaming the store's train split (``stats_source="store"``, exact) or
   from the correlation cache kept during training (``"cache"``, an estimate).
2. The clamp set ``C``, chosen by the unlearning eval's rule from those firing rates.
3. Cantelli's bound for every latent, from the retain moments of its pre-activation.
4. One pass over the held-out tokens (split 1). For every multiplier, the clamp's change
   ``||x' - x||`` is checked against the per-token bound on every token, and its mean
   over retain tokens against the expected damage bound. The retain firing rate of
   every latent is checked against its Cantelli bound.

The bounds (see `evals.bounds.bounds`) assume unit-norm decoder rows in the store's
normalized space. The eval measures the norms and reports them, and checks the bounds
with the decoder as it is, so a decoder whose rows are not unit-norm shows violations.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from evals.bounds.bounds import (
    FORGET_DOMAIN,
    RETAIN_DOMAIN,
    MeanAccumulator,
    PerTokenCheck,
    PerTokenSummary,
    TrainStatistics,
    TrainStatisticsAccumulator,
    cantelli_bound,
    clamp_delta,
    expected_damage_bound,
    per_token_bound,
    preactivation_moments,
    wilson_interval_array,
)
from evals.bounds.config import BoundsEvalConfig
from evals.bounds.schema import (
    EVAL_TYPE_ID_BOUNDS,
    BoundsEvalOutput,
    BoundsMetricCategories,
    BoundsSummary,
    DamageBoundMetrics,
    DamageMultiplierResult,
    FiringBoundMetrics,
    FiringBoundSummary,
    LatentBoundDetail,
    PerTokenBoundMetrics,
    PerTokenMultiplierResult,
    TokenCheckCounts,
)
from evals.common import default_output_path, epoch_millis, new_eval_id, write_eval_output
from evals.core.config import CoreEvalConfig
from evals.core.main import EvalInputs, load_inputs, sae_config_dict
from evals.unlearning.intervention import decoder_rows
from evals.unlearning.selection import CACHE_DIRNAME, select_latents
from stores.activations import ActivationStore
from stores.cache import CorrelationCache
from trainer.saes import BaseSAE

logger = logging.getLogger(__name__)

TRAIN_SPLIT = 0
HELDOUT_SPLIT = 1

#: A clamped decoder row whose norm differs from 1 by more than this is reported in the warnings.
DECODER_NORM_WARNING = 1e-3

#: The eval's own pre-activation formula must match the SAE's within this fraction of
#: the largest pre-activation, or the encoder is not the affine map the firing bound assumes.
PREACTIVATION_TOLERANCE = 1e-3

TOPK_NOTE = (
    "TopK SAE: f_i > 0 needs a_i > 0 and a place among the k largest pre-activations, so "
    "P(f_i > 0) <= P(a_i > 0) and Cantelli's bound on P(a_i > 0) still bounds the firing rate."
)


class BoundsEvalError(ValueError):
    """Inputs the separation bounds eval cannot evaluate."""


@dataclass
class EncoderWeights:
    """The SAE's effective encoder and decoder in the store's normalized space, in float64.

    Attributes:
        W_enc_DF: encoder weights times the encoder mask, so 0 outside each support.
        b_enc_F: encoder bias.
        b_dec_D: decoder bias, which the encoder subtracts from its input.
        decoder_norms_F: L2 norm of each decoder row (times the decoder mask, if any).
        support_F: encoder connections per latent, ``|S_i|``.
        encoder_density: fraction of encoder connections kept; None for a dense SAE.
    """

    W_enc_DF: torch.Tensor
    b_enc_F: torch.Tensor
    b_dec_D: torch.Tensor
    decoder_norms_F: torch.Tensor
    support_F: torch.Tensor
    encoder_density: float | None


@dataclass
class HeldoutResults:
    """Measurements of the pass over the held-out tokens, per multiplier and per latent.

    Attributes:
        per_token: per-token bound checks, by multiplier.
        damage: running mean of ``||x' - x||`` over retain tokens, by multiplier.
        heldout_bound_sum: sum of the per-token bounds over retain tokens, by multiplier.
        retain_firing_F: retain tokens on which each latent fires.
        retain_preactive_F: retain tokens on which each latent's pre-activation is > 0.
        n_tokens_2: held-out tokens per domain (forget, retain).
    """

    per_token: dict[float, PerTokenCheck]
    damage: dict[float, MeanAccumulator]
    heldout_bound_sum: dict[float, float]
    retain_firing_F: np.ndarray
    retain_preactive_F: np.ndarray
    n_tokens_2: np.ndarray


# Weights


def sae_input_scale(sae: BaseSAE, norm_scale: float) -> float:
    """Return the factor from the normalized space to the SAE's input: 1, or 1 / norm_scale for a raw-space SAE."""
    return 1.0 / norm_scale if sae.cfg.activation_space == "raw" else 1.0


@torch.no_grad()
def normalized_weights(sae: BaseSAE, norm_scale: float) -> EncoderWeights:
    """Return the effective encoder and the decoder norms in the normalized space.

    A raw-space SAE (its normalization folded in) has ``W_enc = s W``, ``b_dec = b / s``
    and ``W_dec = W' / s`` for the normalized-space weights ``W``, ``b``, ``W'``, so they
    are mapped back with ``s = norm_scale``.
    """
    W_enc_DF = sae.W_enc_DF.detach().to(torch.float64)
    encoder_mask_DF = getattr(sae, "encoder_mask_DF", None)
    if encoder_mask_DF is not None:
        W_enc_DF = W_enc_DF * encoder_mask_DF.to(torch.float64)
    W_dec_FD = sae.W_dec_FD.detach().to(torch.float64)
    decoder_mask_FD = getattr(sae, "decoder_mask_FD", None)
    if decoder_mask_FD is not None:
        W_dec_FD = W_dec_FD * decoder_mask_FD.to(torch.float64)
    b_dec_D = sae.b_dec_D.detach().to(torch.float64)

    if sae.cfg.activation_space == "raw":
        W_enc_DF = W_enc_DF / norm_scale
        W_dec_FD = W_dec_FD * norm_scale
        b_dec_D = b_dec_D * norm_scale

    encoder_mask = getattr(sae, "encoder_mask", None)
    if encoder_mask is not None:
        support_F = encoder_mask.row_counts().to(torch.int64).cpu()
        encoder_density: float | None = float(encoder_mask.density())
    else:
        support_F = torch.full((sae.cfg.d_sae,), sae.cfg.d_in, dtype=torch.int64)
        encoder_density = None
    return EncoderWeights(
        W_enc_DF=W_enc_DF,
        b_enc_F=sae.b_enc_F.detach().to(torch.float64),
        b_dec_D=b_dec_D,
        decoder_norms_F=W_dec_FD.norm(dim=1).cpu(),
        support_F=support_F,
        encoder_density=encoder_density,
    )


def preactivation_function(sae: BaseSAE) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return the SAE's ``pre_activations`` method, which the firing bound needs."""
    function = getattr(sae, "pre_activations", None)
    if not callable(function):
        raise BoundsEvalError(
            f"the {sae.architecture!r} SAE has no pre_activations method, but the firing bound "
            "needs the encoder pre-activation; evaluate a standard or masked SAE"
        )
    return cast(Callable[[torch.Tensor], torch.Tensor], function)


@torch.no_grad()
def check_preactivations(
    sae: BaseSAE, weights: EncoderWeights, x_BD: torch.Tensor, input_scale: float
) -> None:
    """Raise `BoundsEvalError` unless the SAE's pre-activations match ``(x - b_dec) W_enc + b_enc``.

    The firing bound is derived for that affine map, so an architecture whose encoder
    differs (another masking, a gate) must not be reported as checked.
    """
    expected_BF = (x_BD.to(torch.float64) - weights.b_dec_D) @ weights.W_enc_DF + weights.b_enc_F
    actual_BF = preactivation_function(sae)(x_BD * input_scale).to(torch.float64)
    scale = max(1.0, float(expected_BF.abs().max()))
    error = float((actual_BF - expected_BF).abs().max())
    if error > PREACTIVATION_TOLERANCE * scale:
        raise BoundsEvalError(
            f"the pre-activations of the {sae.architecture!r} SAE differ from (x - b_dec) W_enc + b_enc "
            f"by up to {error:.3g} (largest pre-activation {scale:.3g}); the firing bound assumes that "
            "encoder, so this SAE cannot be checked"
        )


# Token streams


def sample_split_rows(
    store: ActivationStore, split: int, max_tokens: int | None, seed: int
) -> dict[int, np.ndarray]:
    """Return ``{shard index: sorted rows}`` of ``split``: all rows, or ``max_tokens`` sampled uniformly."""
    shard_indices = []
    shard_rows = []
    for info in store.shards:
        split_N = store.read_shard(info.index, ["split"])["split"]
        rows = np.flatnonzero(split_N == split)
        shard_indices.append(np.full(len(rows), info.index, dtype=np.int64))
        shard_rows.append(rows.astype(np.int64))
    all_shards = np.concatenate(shard_indices) if shard_indices else np.empty(0, dtype=np.int64)
    all_rows = np.concatenate(shard_rows) if shard_rows else np.empty(0, dtype=np.int64)
    if len(all_rows) == 0:
        name = "train" if split == TRAIN_SPLIT else "held-out"
        raise BoundsEvalError(
            f"store {store.path} has no {name} tokens (split {split}); harvest it with 0 < "
            "heldout_fraction < 1"
        )

    if max_tokens is not None and max_tokens < len(all_rows):
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(len(all_rows), size=max_tokens, replace=False))
        all_shards = all_shards[chosen]
        all_rows = all_rows[chosen]
    return {int(index): all_rows[all_shards == index] for index in np.unique(all_shards)}


def iter_batches(
    store: ActivationStore,
    selection: dict[int, np.ndarray],
    norm_scale: float,
    batch_size: int,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x_BD, domain_B)``: normalized float32 activations and int64 domains (0 forget, 1 retain)."""
    for shard_index, rows in selection.items():
        acts_ND = torch.from_numpy(store.read_acts(shard_index, rows))
        domain_N = torch.from_numpy(
            store.read_shard(shard_index, ["domain"])["domain"][rows].astype(np.int64)
        )
        for start in range(0, len(rows), batch_size):
            x_BD = (acts_ND[start : start + batch_size].to(device) * norm_scale).to(torch.float32)
            yield x_BD, domain_N[start : start + batch_size].to(device)


# Train-split statistics


@torch.no_grad()
def statistics_from_store(inputs: EvalInputs, cfg: BoundsEvalConfig) -> TrainStatistics:
    """Stream the store's train split through the SAE and count the statistics exactly."""
    sae = inputs.sae
    input_scale = sae_input_scale(sae, inputs.norm_scale)
    selection = sample_split_rows(inputs.store, TRAIN_SPLIT, cfg.max_train_tokens, cfg.random_seed)
    accumulator = TrainStatisticsAccumulator(sae.cfg.d_in, sae.cfg.d_sae, device=inputs.device)
    for x_BD, domain_B in iter_batches(
        inputs.store, selection, inputs.norm_scale, cfg.batch_size, inputs.device
    ):
        accumulator.update(x_BD, sae.encode(x_BD * input_scale), domain_B)
    statistics = accumulator.result()
    logger.info(
        "Counted train statistics on %d forget and %d retain tokens of %s",
        statistics.n_forget,
        statistics.n_retain,
        inputs.store_path,
    )
    return statistics


def statistics_from_cache(inputs: EvalInputs, cfg: BoundsEvalConfig) -> TrainStatistics:
    """Read the statistics from the correlation cache that training saved beside the SAE."""
    path = Path(cfg.cache_path) if cfg.cache_path else Path(cfg.sae_path) / CACHE_DIRNAME
    if not path.exists():
        raise BoundsEvalError(
            f"no correlation cache at {path}: training writes one only with track_separation on. "
            "Pass stats_source='store' to count the statistics from the store, or cache_path=<path>"
        )
    metadata = inputs.store.metadata
    cache = CorrelationCache.load(
        path,
        expected_model=metadata.model,
        expected_layer=metadata.layer,
        expected_d_model=inputs.sae.cfg.d_in,
        expected_d_sae=inputs.sae.cfg.d_sae,
        device=inputs.device,
    )
    forget = cache.select(domains=["forget"])
    retain = cache.select(domains=["retain"])
    if float(forget.n) <= 0 or float(retain.n) <= 0:
        raise BoundsEvalError(
            f"the correlation cache {path} has no forget or no retain tokens (token mass "
            f"{float(forget.n):g} and {float(retain.n):g}); pass stats_source='store'"
        )
    cov_DD = retain.cov_x_DD
    return TrainStatistics(
        forget_rate_F=forget.firing_rate_F,
        retain_rate_F=retain.firing_rate_F,
        retain_mean_f_F=retain.mean_f_F,
        retain_mean_x_D=retain.mean_x_D,
        retain_cov_x_DD=(cov_DD + cov_DD.T) / 2,
        n_forget=float(forget.n),
        n_retain=float(retain.n),
        source="cache",
    )


# Held-out pass


@torch.no_grad()
def measure_heldout(
    inputs: EvalInputs,
    cfg: BoundsEvalConfig,
    weights: EncoderWeights,
    selected_C: torch.Tensor,
) -> HeldoutResults:
    """Check the per-token bound on every sampled held-out token and count retain firing."""
    sae = inputs.sae
    input_scale = sae_input_scale(sae, inputs.norm_scale)
    # The change is measured in the normalized space, so a raw-space SAE's rows (norm 1 / norm_scale) are rescaled.
    rows_CD = decoder_rows(sae, selected_C).to(torch.float64) / input_scale
    d_sae = sae.cfg.d_sae

    per_token = {c: PerTokenCheck(cfg.relative_tolerance) for c in cfg.multipliers}
    damage = {c: MeanAccumulator() for c in cfg.multipliers}
    heldout_bound_sum = {c: 0.0 for c in cfg.multipliers}
    retain_firing_F = torch.zeros(d_sae, dtype=torch.float64, device=inputs.device)
    retain_preactive_F = torch.zeros(d_sae, dtype=torch.float64, device=inputs.device)
    n_tokens_2 = np.zeros(2, dtype=np.int64)

    selection = sample_split_rows(
        inputs.store, HELDOUT_SPLIT, cfg.max_heldout_tokens, cfg.random_seed
    )
    pre_activations = preactivation_function(sae)
    first_batch = True
    for x_BD, domain_B in iter_batches(
        inputs.store, selection, inputs.norm_scale, cfg.batch_size, inputs.device
    ):
        if first_batch:
            check_preactivations(sae, weights, x_BD, input_scale)
            first_batch = False
        f_BF = sae.encode(x_BD * input_scale)
        pre_BF = pre_activations(x_BD * input_scale)
        retain_B = domain_B == RETAIN_DOMAIN
        n_tokens_2 += np.bincount(domain_B.cpu().numpy(), minlength=2)[:2]
        retain_firing_F += (f_BF[retain_B] > 0).sum(dim=0).to(torch.float64)
        retain_preactive_F += (pre_BF[retain_B] > 0).sum(dim=0).to(torch.float64)

        f_BC = f_BF[:, selected_C]
        for multiplier in cfg.multipliers:
            measured_B = clamp_delta(f_BC, rows_CD, multiplier).norm(dim=-1)
            bound_B = per_token_bound(f_BC, multiplier)
            per_token[multiplier].update(measured_B, bound_B, domain_B)
            damage[multiplier].update(measured_B[retain_B])
            heldout_bound_sum[multiplier] += float(bound_B[retain_B].sum())

    return HeldoutResults(
        per_token=per_token,
        damage=damage,
        heldout_bound_sum=heldout_bound_sum,
        retain_firing_F=retain_firing_F.cpu().numpy(),
        retain_preactive_F=retain_preactive_F.cpu().numpy(),
        n_tokens_2=n_tokens_2,
    )


# Metrics


def token_counts(summary: PerTokenSummary) -> TokenCheckCounts:
    return TokenCheckCounts(**dataclasses.asdict(summary))


def per_token_metrics(cfg: BoundsEvalConfig, heldout: HeldoutResults) -> PerTokenBoundMetrics:
    """Group the per-token checks by multiplier and domain."""
    results = []
    for multiplier in cfg.multipliers:
        check = heldout.per_token[multiplier]
        results.append(
            PerTokenMultiplierResult(
                multiplier=multiplier,
                **dataclasses.asdict(check.summary()),
                forget=token_counts(check.summary(FORGET_DOMAIN)),
                retain=token_counts(check.summary(RETAIN_DOMAIN)),
            )
        )
    return PerTokenBoundMetrics(
        checks=sum(result.checks for result in results),
        violations=sum(result.violations for result in results),
        relative_tolerance=cfg.relative_tolerance,
        per_multiplier=results,
    )


def damage_metrics(
    cfg: BoundsEvalConfig,
    heldout: HeldoutResults,
    statistics: TrainStatistics,
    selected_C: torch.Tensor,
) -> DamageBoundMetrics:
    """Compare the mean retain change with the bound from the train statistics, per multiplier."""
    selected = selected_C.to(statistics.retain_rate_F.device)
    retain_rate_C = statistics.retain_rate_F[selected]
    retain_mean_f_C = statistics.retain_mean_f_F[selected]
    n_retain = int(heldout.n_tokens_2[RETAIN_DOMAIN])

    results = []
    for multiplier in cfg.multipliers:
        interval = heldout.damage[multiplier].interval()
        bound = expected_damage_bound(retain_rate_C, retain_mean_f_C, multiplier)
        if interval.mean is None:
            holds = True
        else:
            lowest = interval.ci_low if interval.ci_low is not None else interval.mean
            holds = lowest <= bound
        results.append(
            DamageMultiplierResult(
                multiplier=multiplier,
                n_tokens=interval.n,
                empirical_mean=interval.mean,
                ci_low=interval.ci_low,
                ci_high=interval.ci_high,
                bound=bound,
                bound_on_heldout=heldout.heldout_bound_sum[multiplier] / n_retain
                if n_retain
                else None,
                tightness=None if interval.mean is None or bound == 0 else interval.mean / bound,
                holds=holds,
            )
        )
    return DamageBoundMetrics(
        checks=len(results),
        violations=sum(not result.holds for result in results),
        per_multiplier=results,
    )


@dataclass
class LatentBounds:
    """Cantelli's bound and its held-out check for every latent, as numpy arrays."""

    mu_F: np.ndarray
    sigma_F: np.ndarray
    bound_F: np.ndarray
    trivial_F: np.ndarray
    rate_F: np.ndarray
    ci_low_F: np.ndarray
    ci_high_F: np.ndarray
    preactive_rate_F: np.ndarray
    violation_F: np.ndarray
    n_retain: int


def latent_bounds(
    weights: EncoderWeights, statistics: TrainStatistics, heldout: HeldoutResults
) -> LatentBounds:
    """Compute every latent's Cantelli bound and check it against its held-out retain rate."""
    mu_F, var_F = preactivation_moments(
        weights.W_enc_DF,
        weights.b_enc_F,
        weights.b_dec_D,
        statistics.retain_mean_x_D,
        statistics.retain_cov_x_DD,
    )
    bound_F = cantelli_bound(mu_F, var_F).cpu().numpy()
    n_retain = int(heldout.n_tokens_2[RETAIN_DOMAIN])
    if n_retain:
        rate_F = heldout.retain_firing_F / n_retain
        preactive_rate_F = heldout.retain_preactive_F / n_retain
    else:
        rate_F = np.full(len(bound_F), np.nan)
        preactive_rate_F = np.full(len(bound_F), np.nan)
    ci_low_F, ci_high_F = wilson_interval_array(heldout.retain_firing_F, n_retain)
    # NaN (no retain tokens) compares False, so nothing counts as violated without data.
    violation_F = ci_low_F > bound_F
    return LatentBounds(
        mu_F=mu_F.cpu().numpy(),
        sigma_F=np.sqrt(var_F.cpu().numpy()),
        bound_F=bound_F,
        trivial_F=(mu_F >= 0).cpu().numpy(),
        rate_F=rate_F,
        ci_low_F=ci_low_F,
        ci_high_F=ci_high_F,
        preactive_rate_F=preactive_rate_F,
        violation_F=violation_F,
        n_retain=n_retain,
    )


def firing_summary(bounds: LatentBounds, latents: np.ndarray) -> FiringBoundSummary:
    """Summarize the firing bound checks of ``latents``."""
    bound = bounds.bound_F[latents]
    rate = bounds.rate_F[latents]
    informative = ~bounds.trivial_F[latents] & (bound > 0) & np.isfinite(rate)
    ratios = rate[informative] / bound[informative]
    return FiringBoundSummary(
        checks=int(len(latents)) if bounds.n_retain else 0,
        violations=int(bounds.violation_F[latents].sum()),
        n_trivial=int(bounds.trivial_F[latents].sum()),
        mean_tightness=float(ratios.mean()) if len(ratios) else None,
        median_tightness=float(np.median(ratios)) if len(ratios) else None,
        max_tightness=float(ratios.max()) if len(ratios) else None,
    )


def firing_metrics(bounds: LatentBounds, selected: np.ndarray) -> FiringBoundMetrics:
    """Summarize the firing bound on the clamp set, with the separation sums, and on all latents."""
    theoretical = float(bounds.bound_F[selected].sum())
    empirical = float(np.nansum(bounds.rate_F[selected]))
    return FiringBoundMetrics(
        **firing_summary(bounds, selected).model_dump(),
        theoretical_separation=theoretical,
        empirical_separation=empirical,
        separation_tightness=empirical / theoretical if theoretical > 0 else None,
        n_heldout_retain_tokens=bounds.n_retain,
        all_latents=firing_summary(bounds, np.arange(len(bounds.bound_F))),
    )


def optional_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def latent_details(
    bounds: LatentBounds,
    statistics: TrainStatistics,
    weights: EncoderWeights,
    latents: np.ndarray,
    selected: np.ndarray,
) -> list[LatentBoundDetail]:
    """Return one detail entry per latent of ``latents``, in that order."""
    forget_rate_F = statistics.forget_rate_F.cpu().numpy()
    retain_rate_F = statistics.retain_rate_F.cpu().numpy()
    selected_set = set(selected.tolist())
    details = []
    for latent in latents.tolist():
        rate = optional_float(bounds.rate_F[latent])
        bound = float(bounds.bound_F[latent])
        has_ci = bool(np.isfinite(bounds.ci_low_F[latent]))
        details.append(
            LatentBoundDetail(
                id=latent,
                clamped=latent in selected_set,
                support_size=int(weights.support_F[latent]),
                mu=float(bounds.mu_F[latent]),
                sigma=float(bounds.sigma_F[latent]),
                cantelli_bound=bound,
                trivial=bool(bounds.trivial_F[latent]),
                train_retain_rate=float(retain_rate_F[latent]),
                train_forget_rate=float(forget_rate_F[latent]),
                empirical_rate=rate,
                ci=[float(bounds.ci_low_F[latent]), float(bounds.ci_high_F[latent])]
                if has_ci
                else None,
                preactivation_rate=optional_float(bounds.preactive_rate_F[latent]),
                tightness=None if rate is None or bound == 0 else rate / bound,
                violation=bool(bounds.violation_F[latent]),
            )
        )
    return details


def collect_warnings(weights: EncoderWeights, selected: np.ndarray) -> list[str]:
    """Return the problems that make a result uninformative or expected to fail."""
    warnings = []
    if len(selected) == 0:
        warnings.append(
            "no latent was selected: none fires on forget tokens below the retain threshold, so the "
            "clamp changes nothing and the per-token and damage bounds are 0 = 0. Raise retain_threshold"
        )
        return warnings
    clamped_norms = weights.decoder_norms_F[torch.from_numpy(selected)]
    deviation = float((clamped_norms - 1.0).abs().max())
    if deviation > DECODER_NORM_WARNING:
        warnings.append(
            f"clamped decoder rows have norms in [{float(clamped_norms.min()):.6g}, "
            f"{float(clamped_norms.max()):.6g}] in the normalized space, but the per-token and "
            "damage bounds assume norm 1; expect violations"
        )
    return warnings


def collect_notes(sae: BaseSAE, statistics: TrainStatistics) -> list[str]:
    """Return the facts a reader needs next to the numbers: the space, TopK and the statistics source."""
    notes = [
        "All norms, activations and moments are in the store's normalized space x * norm_scale, "
        "where the SAE's decoder rows have unit norm."
    ]
    if getattr(sae.cfg, "activation", "relu") == "topk":
        notes.append(TOPK_NOTE)
    if statistics.source == "cache":
        notes.append(
            "Train statistics come from the correlation cache, an exponential moving average over "
            "training batches taken while the encoder still moved; stats_source='store' gives exact "
            "statistics of the final SAE."
        )
    else:
        notes.append(
            "Train statistics are exact counts of the final SAE on the store's train split."
        )
    return notes


def run(cfg: BoundsEvalConfig) -> Path:
    """Run the separation bounds eval and write its JSON result; return the path written."""
    inputs = load_inputs(CoreEvalConfig(sae_path=cfg.sae_path, store=cfg.store, device=cfg.device))
    sae = inputs.sae
    preactivation_function(sae)
    output_path = (
        Path(cfg.output)
        if cfg.output
        else default_output_path(Path(cfg.sae_path).parent, EVAL_TYPE_ID_BOUNDS)
    )
    resolved_cfg = dataclasses.replace(cfg, store=inputs.store_path, output=str(output_path))

    weights = normalized_weights(sae, inputs.norm_scale)
    if cfg.stats_source == "store":
        statistics = statistics_from_store(inputs, cfg)
    else:
        statistics = statistics_from_cache(inputs, cfg)

    selected = select_latents(
        statistics.forget_rate_F.cpu().numpy(),
        statistics.retain_rate_F.cpu().numpy(),
        cfg.retain_threshold,
        cfg.n_features,
    )
    selected_C = torch.from_numpy(selected).to(inputs.device)
    logger.info("Clamp set for the bounds: %s", selected.tolist())

    heldout = measure_heldout(inputs, cfg, weights, selected_C)
    bounds = latent_bounds(weights, statistics, heldout)

    per_token = per_token_metrics(cfg, heldout)
    damage = damage_metrics(cfg, heldout, statistics, selected_C)
    firing = firing_metrics(bounds, selected)
    total_checks = per_token.checks + damage.checks + firing.all_latents.checks
    total_violations = per_token.violations + damage.violations + firing.all_latents.violations

    clamped_norms = weights.decoder_norms_F[torch.from_numpy(selected)]
    config_dict = sae_config_dict(inputs)
    summary = BoundsSummary(
        variant=str(config_dict["variant"]),
        activation=str(getattr(sae.cfg, "activation", "relu")),
        selected_latents=selected.tolist(),
        n_features=cfg.n_features,
        retain_threshold=cfg.retain_threshold,
        multipliers=list(cfg.multipliers),
        stats_source=statistics.source,
        n_train_forget_tokens=statistics.n_forget,
        n_train_retain_tokens=statistics.n_retain,
        n_heldout_tokens=int(heldout.n_tokens_2.sum()),
        decoder_norm_min=float(weights.decoder_norms_F.min()),
        decoder_norm_max=float(weights.decoder_norms_F.max()),
        clamped_decoder_norm_min=float(clamped_norms.min()) if len(selected) else None,
        clamped_decoder_norm_max=float(clamped_norms.max()) if len(selected) else None,
        encoder_density=weights.encoder_density,
        total_checks=total_checks,
        total_violations=total_violations,
        all_bounds_hold=total_violations == 0,
    )

    detail_latents = np.arange(sae.cfg.d_sae) if cfg.all_latent_details else selected
    warnings = collect_warnings(weights, selected)
    for warning in warnings:
        logger.warning("separation bounds of %s: %s", cfg.sae_path, warning)
    notes = collect_notes(sae, statistics)

    output = BoundsEvalOutput(
        eval_config=resolved_cfg.to_dict(),
        eval_id=new_eval_id(),
        datetime_epoch_millis=epoch_millis(),
        eval_result_metrics=BoundsMetricCategories(
            summary=summary,
            per_token_bound=per_token,
            expected_damage_bound=damage,
            firing_bound=firing,
        ),
        eval_result_details=latent_details(bounds, statistics, weights, detail_latents, selected),
        eval_result_unstructured={"warnings": warnings, "notes": notes},
        sae_cfg_dict=config_dict,
    )
    write_eval_output(output, output_path)
    logger.info(
        "separation bounds of %s (%s, %d latents clamped): %d checks, %d violations "
        "(per-token %d/%d, damage %d/%d, firing %d/%d) -> %s",
        cfg.sae_path,
        summary.variant,
        len(selected),
        total_checks,
        total_violations,
        per_token.violations,
        per_token.checks,
        damage.violations,
        damage.checks,
        firing.all_latents.violations,
        firing.all_latents.checks,
        output_path,
    )
    return output_path
