"""Next-token loss on held-out forget and retain text, the continuous companion of the accuracies.

Contexts are the activation store's packed held-out contexts (``context_split`` 1),
grouped by domain through ``metadata.corpora[context_corpus]["domain"]``. A position is
scored when neither its input nor its target token is special (BOS, EOS, padding), as
in the core eval. Each context contributes its mean cross-entropy over scored
positions, and the rise under an intervention is compared context by context with the
unmodified model, so the 95% interval over contexts reflects the spread between texts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import stats

from evals.core.metrics import next_token_mask
from evals.lm_head import LMHead, LogitPrecision
from stores.activations import ActivationStore

if TYPE_CHECKING:
    from transformers import PreTrainedModel

HELDOUT_SPLIT = 1
DOMAIN_NAMES = ("forget", "retain")


@dataclass(frozen=True)
class MeanInterval:
    """A mean over units (contexts) with its two-sided 95% Student-t interval.

    Attributes:
        mean: The mean, or None when there are no units.
        ci_low: Lower end; None with fewer than two units.
        ci_high: Upper end; None with fewer than two units.
        n: Number of units.
    """

    mean: float | None
    ci_low: float | None
    ci_high: float | None
    n: int


def mean_interval(values: Sequence[float] | np.ndarray) -> MeanInterval:
    """Return the mean of ``values`` with a 95% Student-t interval (no interval below two values)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return MeanInterval(mean=None, ci_low=None, ci_high=None, n=0)
    mean = float(values.mean())
    if n < 2:
        return MeanInterval(mean=mean, ci_low=None, ci_high=None, n=1)
    half_width = float(stats.t.ppf(0.975, df=n - 1)) * float(values.std(ddof=1)) / math.sqrt(n)
    return MeanInterval(mean=mean, ci_low=mean - half_width, ci_high=mean + half_width, n=n)


def heldout_contexts_by_domain(
    store: ActivationStore, max_contexts: int, seed: int
) -> dict[str, np.ndarray]:
    """Return up to ``max_contexts`` held-out contexts ``[C, T]`` per domain, sampled with ``seed``."""
    corpus_domains = [corpus.get("domain") for corpus in store.metadata.corpora]
    pieces: dict[str, list[np.ndarray]] = {name: [] for name in DOMAIN_NAMES}
    for info in store.shards:
        arrays = store.read_shard(info.index, ["contexts", "context_corpus", "context_split"])
        heldout_C = arrays["context_split"] == HELDOUT_SPLIT
        for corpus_index in np.unique(arrays["context_corpus"][heldout_C]):
            if (
                corpus_index >= len(corpus_domains)
                or corpus_domains[corpus_index] not in DOMAIN_NAMES
            ):
                raise ValueError(
                    f"store {store.path} has contexts of corpus index {int(corpus_index)}, which "
                    f"metadata.corpora does not describe with a forget or retain domain; the store is damaged"
                )
            rows = heldout_C & (arrays["context_corpus"] == corpus_index)
            pieces[corpus_domains[corpus_index]].append(arrays["contexts"][rows])

    generator = np.random.default_rng(seed)
    contexts = {}
    for name in DOMAIN_NAMES:
        all_CT = (
            np.concatenate(pieces[name])
            if pieces[name]
            else np.empty((0, store.metadata.context_size), dtype=np.int32)
        )
        if len(all_CT) > max_contexts:
            all_CT = all_CT[
                np.sort(generator.choice(len(all_CT), size=max_contexts, replace=False))
            ]
        contexts[name] = all_CT
    return contexts


@torch.no_grad()
def context_losses(
    model: PreTrainedModel,
    contexts_CT: np.ndarray,
    special_token_ids: Sequence[int],
    *,
    batch_size: int = 4,
    logit_chunk_size: int = 512,
    logit_precision: LogitPrecision = "mixed",
    head: LMHead | None = None,
) -> np.ndarray:
    """Return each context's mean next-token cross-entropy (nats) over scored positions.

    A context without any scored position gets NaN; callers drop those. ``head`` reuses
    an `LMHead` built before (its precision then applies).
    """
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    if head is None:
        head = LMHead(model, logit_precision)
    losses_C = np.full(len(contexts_CT), np.nan, dtype=np.float64)
    for start in range(0, len(contexts_CT), batch_size):
        input_ids_BL = torch.from_numpy(contexts_CT[start : start + batch_size]).long().to(device)
        score_BL = next_token_mask(input_ids_BL, list(special_token_ids))
        targets_BL = torch.roll(input_ids_BL, shifts=-1, dims=1)
        hidden_BLD = decoder(
            input_ids=input_ids_BL, attention_mask=torch.ones_like(input_ids_BL), use_cache=False
        ).last_hidden_state

        rows_N, positions_N = torch.nonzero(score_BL, as_tuple=True)
        hidden_ND = hidden_BLD[rows_N, positions_N]
        targets_N = targets_BL[rows_N, positions_N]
        losses_N = -head.target_log_probs(hidden_ND, targets_N, chunk_size=logit_chunk_size)

        sums_B = torch.zeros(len(input_ids_BL), dtype=torch.float64, device=device)
        sums_B.index_add_(0, rows_N, losses_N)
        counts_B = torch.bincount(rows_N, minlength=len(input_ids_BL)).double()
        means_B = torch.where(counts_B > 0, sums_B / counts_B.clamp_min(1), torch.nan)
        losses_C[start : start + len(input_ids_BL)] = means_B.cpu().numpy()
    return losses_C
