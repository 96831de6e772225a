"""Selection of the latents to clamp, and of random latents with matched firing rates.

SAEBench's rule: among latents whose retain firing rate is below ``retain_threshold``,
take the ``n_features`` with the highest forget firing rate. Latents that never fire
on forget tokens are never selected, so fewer than ``n_features`` may come back.

Firing rates (the fraction of tokens on which ``f_i > 0``) come from one of two sources:

- ``cache``: the correlation cache that training wrote beside the final SAE
  (``<sae>/cache.zarr``): ``c_i / n_rows_i`` summed over every fold. The cache is an
  exponential moving average over subsamples of training batches, taken while the
  encoder was still moving, so its rates approximate those of the final SAE.
- ``store``: exact counts, from streaming every train-split token (split 0) of the
  activation store through the final SAE, per domain. Held-out tokens are left for
  the evaluation itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stores.activations import ActivationStore
from stores.cache import CorrelationCache
from trainer.saes import BaseSAE

logger = logging.getLogger(__name__)

#: Folder of the correlation cache inside a saved SAE's directory (written by training).
CACHE_DIRNAME = "cache.zarr"

TRAIN_SPLIT = 0
FORGET_DOMAIN = 0
RETAIN_DOMAIN = 1


class SelectionError(ValueError):
    """Invalid latent ids or firing rates."""


@dataclass(frozen=True)
class FiringRates:
    """Per-latent firing rates on forget and retain tokens.

    Attributes:
        forget_F: Fraction of forget tokens on which each latent fires.
        retain_F: Fraction of retain tokens on which each latent fires.
        n_forget_tokens: Token mass behind ``forget_F`` (an EMA weight for the cache).
        n_retain_tokens: Token mass behind ``retain_F``.
        source: ``cache`` or ``store``.
        path: The cache or store they were computed from.
    """

    forget_F: np.ndarray
    retain_F: np.ndarray
    n_forget_tokens: float
    n_retain_tokens: float
    source: str
    path: str

    @property
    def pooled_F(self) -> np.ndarray:
        """Firing rate over forget and retain tokens together, weighted by their token counts."""
        total = self.n_forget_tokens + self.n_retain_tokens
        if total <= 0:
            return np.zeros_like(self.forget_F)
        return (self.forget_F * self.n_forget_tokens + self.retain_F * self.n_retain_tokens) / total


def check_latent_ids(latent_ids: np.ndarray | list[int], d_sae: int) -> np.ndarray:
    """Return the ids as int64, raising `SelectionError` when one is outside ``0 .. d_sae - 1``."""
    ids = np.asarray(latent_ids, dtype=np.int64).reshape(-1)
    invalid = ids[(ids < 0) | (ids >= d_sae)]
    if len(invalid):
        raise SelectionError(
            f"latent ids {invalid[:10].tolist()} are out of range for an SAE with d_sae {d_sae}; "
            f"use ids in 0..{d_sae - 1}"
        )
    return ids


def select_latents(
    forget_F: np.ndarray, retain_F: np.ndarray, retain_threshold: float, n_features: int
) -> np.ndarray:
    """Return up to ``n_features`` latent ids by SAEBench's rule, highest forget rate first.

    Ties in the forget rate go to the lower latent id, so the choice is deterministic.
    """
    if forget_F.shape != retain_F.shape or forget_F.ndim != 1:
        raise SelectionError(
            f"forget and retain rates must be vectors of the same length, got shapes "
            f"{forget_F.shape} and {retain_F.shape}"
        )
    if n_features < 1:
        raise SelectionError(f"invalid n_features {n_features}: it must be a positive integer")
    eligible = np.flatnonzero((retain_F < retain_threshold) & (forget_F > 0))
    order = np.lexsort((eligible, -forget_F[eligible]))
    return eligible[order][:n_features].astype(np.int64)


def matched_random_latents(
    selected: np.ndarray,
    rates_F: np.ndarray,
    rng: np.random.Generator,
    pool_size: int = 5,
) -> np.ndarray:
    """Draw one random control latent per selected latent, with a similar firing rate.

    For each selected latent, in order, the control is drawn uniformly from the
    ``pool_size`` unused latents whose rate in ``rates_F`` is closest to its own.
    Distances are taken on a log scale, so 0.001 and 0.002 count as close as 0.1 and 0.2. Controls are
    never selected latents and never repeat. Dead latents (rate 0) are used only when
    nothing else is left.
    """
    selected = np.asarray(selected, dtype=np.int64)
    available = np.ones(len(rates_F), dtype=bool)
    available[selected] = False
    log_rates_F = np.log(np.maximum(rates_F, 1e-12))
    controls = []
    for latent in selected:
        candidates = np.flatnonzero(available & (rates_F > 0))
        if len(candidates) == 0:
            candidates = np.flatnonzero(available)
        if len(candidates) == 0:
            raise SelectionError(
                f"no latent is left for a random control: the SAE has {len(rates_F)} latents and "
                f"{len(selected)} are selected"
            )
        distance = np.abs(log_rates_F[candidates] - log_rates_F[latent])
        nearest = candidates[np.lexsort((candidates, distance))][:pool_size]
        choice = int(rng.choice(nearest))
        controls.append(choice)
        available[choice] = False
    return np.asarray(controls, dtype=np.int64)


def firing_rates_from_cache(
    path: str | Path, sae: BaseSAE, *, model: str | None = None, layer: int | None = None
) -> FiringRates:
    """Read forget and retain firing rates, summed over every fold, from a correlation cache."""
    cache = CorrelationCache.load(
        path,
        expected_model=model,
        expected_layer=layer,
        expected_d_model=sae.cfg.d_in,
        expected_d_sae=sae.cfg.d_sae,
    )
    forget = cache.select(domains=["forget"])
    retain = cache.select(domains=["retain"])
    if float(forget.n) <= 0 or float(retain.n) <= 0:
        raise SelectionError(
            f"the correlation cache {path} has no forget or no retain tokens (token mass "
            f"{float(forget.n):g} and {float(retain.n):g}); pass firing_rates='store' to count them "
            "from the activation store"
        )
    return FiringRates(
        forget_F=forget.firing_rate_F.cpu().numpy(),
        retain_F=retain.firing_rate_F.cpu().numpy(),
        n_forget_tokens=float(forget.n),
        n_retain_tokens=float(retain.n),
        source="cache",
        path=str(path),
    )


@torch.no_grad()
def firing_rates_from_store(
    store: ActivationStore,
    sae: BaseSAE,
    norm_scale: float,
    *,
    batch_size: int = 4096,
    device: torch.device | str = "cpu",
) -> FiringRates:
    """Count exact firing rates of the SAE on every train-split token of the store, per domain."""
    counts_2F = torch.zeros((2, sae.cfg.d_sae), dtype=torch.float64, device=device)
    tokens_2 = np.zeros(2, dtype=np.int64)
    raw_space = sae.cfg.activation_space == "raw"
    for info in store.shards:
        labels = store.read_shard(info.index, ["domain", "split"])
        rows = np.flatnonzero(labels["split"] == TRAIN_SPLIT)
        if len(rows) == 0:
            continue
        acts_ND = store.read_acts(info.index, rows)
        domain_N = labels["domain"][rows]
        for start in range(0, len(rows), batch_size):
            x_BD = torch.from_numpy(acts_ND[start : start + batch_size]).to(device)
            f_BF = sae.encode(x_BD if raw_space else x_BD * norm_scale)
            domain_B = torch.from_numpy(domain_N[start : start + batch_size].astype(np.int64)).to(
                device
            )
            counts_2F.index_add_(0, domain_B, (f_BF > 0).double())
        tokens_2 += np.bincount(domain_N, minlength=2)[:2]

    if tokens_2[FORGET_DOMAIN] == 0 or tokens_2[RETAIN_DOMAIN] == 0:
        raise SelectionError(
            f"store {store.path} has {tokens_2[FORGET_DOMAIN]} forget and {tokens_2[RETAIN_DOMAIN]} retain "
            "train-split tokens; latent selection needs both. Harvest a forget and a retain corpus"
        )
    rates_2F = (counts_2F.cpu().numpy() / tokens_2[:, None]).astype(np.float64)
    logger.info(
        "Counted firing rates on %d forget and %d retain train tokens of %s",
        tokens_2[FORGET_DOMAIN],
        tokens_2[RETAIN_DOMAIN],
        store.path,
    )
    return FiringRates(
        forget_F=rates_2F[FORGET_DOMAIN],
        retain_F=rates_2F[RETAIN_DOMAIN],
        n_forget_tokens=float(tokens_2[FORGET_DOMAIN]),
        n_retain_tokens=float(tokens_2[RETAIN_DOMAIN]),
        source="store",
        path=str(store.path),
    )
