"""Choice of the connections to prune or regrow.

Masks here are dense bool tensors with latents as rows, `[F, D]`, the orientation of
`PackedMask` masks. Rankings are total orders, so every choice is deterministic: ties
in the score are broken by a second key, then by the flat index.
"""

from __future__ import annotations

import torch


def lexicographic_rank(scores_FD: torch.Tensor, tiebreak_FD: torch.Tensor) -> torch.Tensor:
    """Return each entry's position (int64) in ascending order of (score, tiebreak)."""
    order_N = torch.argsort(tiebreak_FD.flatten(), stable=True)
    order_N = order_N[torch.argsort(scores_FD.flatten()[order_N], stable=True)]
    rank_N = torch.empty_like(order_N)
    rank_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
    return rank_N.view(scores_FD.shape)


def protected_connections(rank_FD: torch.Tensor, live_FD: torch.Tensor, min_connections: int) -> torch.Tensor:
    """Return the `min_connections` highest-ranked live connections of every latent.

    A latent with fewer live connections keeps all of them.
    """
    n_keep = min(min_connections, rank_FD.shape[1])
    key_FD = torch.where(live_FD, rank_FD, torch.full_like(rank_FD, -1))
    top_FK = key_FD.topk(n_keep, dim=1).indices
    protected_FD = torch.zeros_like(live_FD)
    protected_FD.scatter_(1, top_FK, True)
    return protected_FD & live_FD


def select_lowest(rank_FD: torch.Tensor, candidates_FD: torch.Tensor, n: int) -> torch.Tensor:
    """Return the `n` candidates of lowest rank (all of them when there are fewer)."""
    n_candidates = int(candidates_FD.sum())
    n = min(n, n_candidates)
    if n <= 0:
        return torch.zeros_like(candidates_FD)
    # Ranks are distinct, so the n-th smallest candidate rank splits them exactly.
    threshold = rank_FD[candidates_FD].kthvalue(n).values
    return candidates_FD & (rank_FD <= threshold)


def select_prunable(
    scores_FD: torch.Tensor,
    tiebreak_FD: torch.Tensor,
    live_FD: torch.Tensor,
    n: int,
    min_connections: int,
    frozen_rows_F: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the `n` lowest-scoring live connections that may be pruned.

    Every latent keeps its `min_connections` highest-scoring live connections, and
    latents in `frozen_rows_F` keep all of theirs, so fewer than `n` may come back.
    """
    rank_FD = lexicographic_rank(scores_FD, tiebreak_FD)
    candidates_FD = live_FD & ~protected_connections(rank_FD, live_FD, min_connections)
    if frozen_rows_F is not None:
        candidates_FD &= ~frozen_rows_F[:, None]
    return select_lowest(rank_FD, candidates_FD, n)


def select_largest(values_FD: torch.Tensor, candidates_FD: torch.Tensor, n: int) -> torch.Tensor:
    """Return the `n` candidates with the largest values (ties by flat index)."""
    rank_FD = lexicographic_rank(-values_FD, torch.zeros_like(values_FD))
    return select_lowest(rank_FD, candidates_FD, n)
