"""Correlation pattern cache: float64 sufficient statistics of SAE latents and inputs.

Statistics are accumulated separately per domain (forget, retain) and per fold, as sums.
Because they are sums, the statistics of any union of folds is the sum over those folds,
so cross-validation selects latents without re-reading activations.

Per (domain, fold) bucket, with ``x`` the SAE input and ``f`` the latent activations:

========  ===========  ======================================================
name      shape        sum over the bucket's tokens
========  ===========  ======================================================
n         scalar       1 (token count, times the update weight)
sx        [D]          x_j
sxx       [D, D]       x_j x_k
n_rows    [F]          1, counted per latent row (see below)
c         [F]          1{f_i > 0}
s1        [F]          f_i
s2        [F]          f_i^2
G         [F, D]       f_i x_j
H         [F, D]       1{f_i > 0} x_j^2
========  ===========  ======================================================

``x`` is the SAE input in the store's normalized space, not ``x - b_dec``: ``b_dec``
moves during training, so statistics of ``x`` stay comparable across steps.
NOTE: ``H`` therefore gives E[x_j^2 | f_i > 0], not the centred E[(x_j - b_dec_j)^2 |
f_i > 0] that the encoder multiplies. Recovering the centred value needs one more
[F, D] sum, of 1{f_i > 0} x_j, which the cache does not keep.

``n_rows[i]`` is the token mass behind latent row ``i``. It equals ``n`` unless rows
were updated on their own (``update(rows=...)`` or ``refresh_rows``), which is how the
"pattern caching" recipe skips latents whose encoder row has not moved:

    cache.decay(alpha)                                  # exponential moving average
    moved_F = moved_rows(W_enc_DF, W_enc_at_refresh_DF, tol)
    cache.update(x_BD, f_BF, domain_B, fold_B, rows=moved_F)
    W_enc_at_refresh_DF[:, moved_F] = W_enc_DF[:, moved_F]

Rows that were skipped keep their sums, scaled by every decay together with their
``n_rows``, so their rates and conditional means are unchanged.

NOTE: memory is dominated by G and H, 2 x F x D float64 per (domain, fold) bucket:
about 420 MB for D = 640, F = 4096, 2 domains and 5 folds, and about 6 GB for
Gemma-2-2B (D = 2304, F = 16384). Build the cache with ``n_folds=None`` to keep one
bucket per domain (about 1.2 GB there) when per-fold statistics are not needed.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
import zarr.codecs

from stores.masks import atomic_directory

logger = logging.getLogger(__name__)

CACHE_FORMAT = "knowsep.correlation_cache"
CACHE_VERSION = 1
DOMAINS = ("forget", "retain")

# Arrays are chunked so that one chunk stays near 8 MiB.
_TARGET_CHUNK_BYTES = 8 * 2**20

# Names of the per-bucket sums, in save order.
STAT_NAMES = ("n", "sx", "sxx", "n_rows", "c", "s1", "s2", "G", "H")
INPUT_STAT_NAMES = ("n", "sx", "sxx")
ROW_STAT_NAMES = ("n_rows", "c", "s1", "s2", "G", "H")


class CacheError(ValueError):
    """Invalid cache input, or a saved cache that does not match the request."""


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Divide elementwise, returning 0 where the denominator is not positive."""
    positive = denominator > 0
    quotient = numerator / torch.where(positive, denominator, torch.ones_like(denominator))
    return torch.where(positive, quotient, torch.zeros_like(quotient))


@dataclass
class Stats:
    """Sufficient statistics summed over a set of (domain, fold) buckets, in float64.

    Statistics add: the ``Stats`` of a union of disjoint buckets is the sum of theirs.
    Derived quantities return 0 where their denominator is 0 (a latent that never fired,
    a bucket without tokens, a constant input).

    Attributes:
        n: token mass (count times update weight), a 0-d tensor.
        sx_D: sum of x_j.
        sxx_DD: sum of x_j x_k.
        n_rows_F: token mass behind each latent row's statistics.
        c_F: firing count, the sum of 1{f_i > 0}.
        s1_F: sum of f_i.
        s2_F: sum of f_i^2.
        G_FD: cross moments, the sum of f_i x_j.
        H_FD: active-conditioned input energy, the sum of 1{f_i > 0} x_j^2.
    """

    n: torch.Tensor
    sx_D: torch.Tensor
    sxx_DD: torch.Tensor
    n_rows_F: torch.Tensor
    c_F: torch.Tensor
    s1_F: torch.Tensor
    s2_F: torch.Tensor
    G_FD: torch.Tensor
    H_FD: torch.Tensor

    def __add__(self, other: Stats) -> Stats:
        if not isinstance(other, Stats):
            return NotImplemented
        if self.G_FD.shape != other.G_FD.shape:
            raise CacheError(
                f"Cannot add statistics of shapes {tuple(self.G_FD.shape)} and "
                f"{tuple(other.G_FD.shape)}. They come from different SAEs or models."
            )
        return Stats(
            n=self.n + other.n,
            sx_D=self.sx_D + other.sx_D,
            sxx_DD=self.sxx_DD + other.sxx_DD,
            n_rows_F=self.n_rows_F + other.n_rows_F,
            c_F=self.c_F + other.c_F,
            s1_F=self.s1_F + other.s1_F,
            s2_F=self.s2_F + other.s2_F,
            G_FD=self.G_FD + other.G_FD,
            H_FD=self.H_FD + other.H_FD,
        )

    @property
    def firing_rate_F(self) -> torch.Tensor:
        """Firing rate r(i) = c_i / n_rows_i."""
        return _safe_divide(self.c_F, self.n_rows_F)

    @property
    def mean_f_F(self) -> torch.Tensor:
        """Mean activation E[f_i] over all tokens, zeros included."""
        return _safe_divide(self.s1_F, self.n_rows_F)

    @property
    def var_f_F(self) -> torch.Tensor:
        """Population variance of f_i, clamped at 0 against rounding."""
        mean_sq_F = _safe_divide(self.s2_F, self.n_rows_F)
        return (mean_sq_F - self.mean_f_F**2).clamp_min(0.0)

    @property
    def mean_x_D(self) -> torch.Tensor:
        """Mean input E[x_j]."""
        return _safe_divide(self.sx_D, self.n)

    @property
    def cov_x_DD(self) -> torch.Tensor:
        """Population covariance of the input, E[x x^T] - E[x] E[x]^T."""
        mean_x_D = self.mean_x_D
        return _safe_divide(self.sxx_DD, self.n) - torch.outer(mean_x_D, mean_x_D)

    @property
    def active_input_energy_FD(self) -> torch.Tensor:
        """E[x_j^2 | f_i > 0] = H_ij / c_i."""
        return _safe_divide(self.H_FD, self.c_F[:, None])

    @property
    def corr_FD(self) -> torch.Tensor:
        """Pearson correlation corr(f_i, x_j).

        E[f_i x_j] comes from latent row i's tokens and E[x_j], Var[x_j] from all
        tokens, so the value is exact when ``n_rows_F == n`` and an estimate after rows
        were updated on their own.
        """
        mean_fx_FD = _safe_divide(self.G_FD, self.n_rows_F[:, None])
        cov_FD = mean_fx_FD - self.mean_f_F[:, None] * self.mean_x_D[None, :]
        var_x_D = torch.diagonal(self.cov_x_DD).clamp_min(0.0)
        scale_FD = torch.sqrt(self.var_f_F[:, None] * var_x_D[None, :])
        return _safe_divide(cov_FD, scale_FD)


def specificity(forget: Stats, retain: Stats, eps: float = 1e-8) -> torch.Tensor:
    """Return the forget specificity s_i = (r_F(i) - r_R(i)) / (r_F(i) + r_R(i) + eps).

    s_i is in [-1, 1]: 1 for a latent that fires only on forget tokens, -1 for one that
    fires only on retain tokens, and 0 for one that never fires.
    """
    rate_forget_F = forget.firing_rate_F
    rate_retain_F = retain.firing_rate_F
    return (rate_forget_F - rate_retain_F) / (rate_forget_F + rate_retain_F + eps)


def moved_rows(
    W_enc_now_DF: torch.Tensor, W_enc_at_last_refresh_DF: torch.Tensor, tol: float
) -> torch.Tensor:
    """Return the latents whose encoder column moved by more than ``tol``, relatively.

    The change of latent i is ``||w_now_i - w_then_i|| / ||w_then_i||`` (L2 over
    d_model). A latent whose old column was zero counts as moved when it changed at
    all. Append ``b_enc_F`` as one more row of both matrices to track the bias too.

    Returns:
        int64 latent indices, ascending, on the weights' device.
    """
    if W_enc_now_DF.shape != W_enc_at_last_refresh_DF.shape:
        raise CacheError(
            f"Encoder weights have shapes {tuple(W_enc_now_DF.shape)} and "
            f"{tuple(W_enc_at_last_refresh_DF.shape)}. Pass two snapshots of the same encoder."
        )
    now_DF = W_enc_now_DF.detach().to(torch.float64)
    then_DF = W_enc_at_last_refresh_DF.detach().to(now_DF.device, torch.float64)

    change_F = torch.linalg.vector_norm(now_DF - then_DF, dim=0)
    reference_F = torch.linalg.vector_norm(then_DF, dim=0)
    relative_F = torch.where(
        reference_F > 0,
        change_F / torch.where(reference_F > 0, reference_F, torch.ones_like(reference_F)),
        torch.where(change_F > 0, math.inf, 0.0),
    )
    return torch.nonzero(relative_F > tol).flatten()


class CorrelationCache:
    """Float64 sufficient statistics per (domain, fold) bucket. See the module docstring.

    Args:
        d_model: input width D.
        d_sae: number of latents F.
        n_folds: number of folds, or ``None`` to keep one bucket per domain that sums
            every fold (``fold_B`` is then ignored and ``select`` takes no folds).
        model: name of the model the activations come from, checked on load.
        layer: layer the activations come from, checked on load.
        device: device that stores the statistics and runs the matmuls.

    Attributes:
        stats: the sums by name (``STAT_NAMES``), each a float64 tensor of shape
            ``[2, n_buckets, *shape in the module table]``. The first index is the
            domain (0 forget, 1 retain, as in the activation store) and the second the fold.
        n_updates: calls to ``update`` and ``refresh_rows`` so far.
    """

    def __init__(
        self,
        d_model: int,
        d_sae: int,
        n_folds: int | None = 5,
        *,
        model: str,
        layer: int,
        device: torch.device | str = "cpu",
    ) -> None:
        if d_model < 1 or d_sae < 1:
            raise CacheError(f"d_model and d_sae must be positive, got {d_model} and {d_sae}.")
        if n_folds is not None and n_folds < 1:
            raise CacheError(
                f"n_folds must be at least 1, got {n_folds}. Use n_folds=None for one bucket."
            )
        self.d_model = d_model
        self.d_sae = d_sae
        self.n_folds = n_folds
        self.model = model
        self.layer = layer
        self.n_updates = 0
        self.stats = {
            name: torch.zeros(shape, dtype=torch.float64, device=device)
            for name, shape in self._stat_shapes().items()
        }

    @property
    def n_buckets(self) -> int:
        """Fold buckets per domain: ``n_folds``, or 1 when ``n_folds`` is None."""
        return 1 if self.n_folds is None else self.n_folds

    @property
    def device(self) -> torch.device:
        return self.stats["n"].device

    @property
    def nbytes(self) -> int:
        """Bytes held by all statistics."""
        return sum(tensor.numel() * tensor.element_size() for tensor in self.stats.values())

    def _stat_shapes(self) -> dict[str, tuple[int, ...]]:
        prefix = (len(DOMAINS), self.n_buckets)
        d_model, d_sae = self.d_model, self.d_sae
        return {
            "n": prefix,
            "sx": (*prefix, d_model),
            "sxx": (*prefix, d_model, d_model),
            "n_rows": (*prefix, d_sae),
            "c": (*prefix, d_sae),
            "s1": (*prefix, d_sae),
            "s2": (*prefix, d_sae),
            "G": (*prefix, d_sae, d_model),
            "H": (*prefix, d_sae, d_model),
        }

    def to(self, device: torch.device | str) -> CorrelationCache:
        """Move the statistics to ``device`` in place and return the cache."""
        self.stats = {name: tensor.to(device) for name, tensor in self.stats.items()}
        return self

    def update(
        self,
        x_BD: torch.Tensor,
        f_BF: torch.Tensor,
        domain_B: torch.Tensor,
        fold_B: torch.Tensor | None = None,
        weight: float = 1.0,
        rows: torch.Tensor | Sequence[int] | None = None,
    ) -> None:
        """Add a batch of tokens to the statistics of their (domain, fold) buckets.

        Args:
            x_BD: SAE inputs in the store's normalized space.
            f_BF: latent activations of those inputs.
            domain_B: 0 for forget, 1 for retain.
            fold_B: fold of each token, ignored when the cache has ``n_folds=None``.
            weight: multiplies every sum of this batch, counts included.
            rows: latents whose row statistics are updated (all when None). The input
                statistics always take the whole batch.
        """
        rows_R = self._prepare_rows(rows)
        x_BD, f_BR, bucket_B = self._prepare_batch(x_BD, f_BF, domain_B, fold_B, weight, rows_R)

        for bucket in torch.unique(bucket_B).tolist():
            domain, fold = divmod(bucket, self.n_buckets)
            in_bucket_B = bucket_B == bucket
            self._add_input_stats(domain, fold, x_BD[in_bucket_B], weight)
            self._add_row_stats(domain, fold, rows_R, x_BD[in_bucket_B], f_BR[in_bucket_B], weight)
        self.n_updates += 1

    def refresh_rows(
        self,
        rows: torch.Tensor | Sequence[int],
        x_BD: torch.Tensor,
        f_BF: torch.Tensor,
        domain_B: torch.Tensor,
        fold_B: torch.Tensor | None = None,
        weight: float = 1.0,
    ) -> None:
        """Replace the statistics of latent ``rows`` by those of this batch alone.

        Use it for latents whose encoder row moved so far that their history describes
        another latent. Only the buckets that have tokens in the batch are replaced, so
        a bucket the batch misses keeps its old values. Input statistics (n, sx, sxx)
        and every other row are unchanged.
        """
        rows_R = self._prepare_rows(rows)
        assert rows_R is not None
        x_BD, f_BR, bucket_B = self._prepare_batch(x_BD, f_BF, domain_B, fold_B, weight, rows_R)

        for bucket in torch.unique(bucket_B).tolist():
            domain, fold = divmod(bucket, self.n_buckets)
            for name in ROW_STAT_NAMES:
                self.stats[name][domain, fold].index_fill_(0, rows_R, 0.0)
            in_bucket_B = bucket_B == bucket
            self._add_row_stats(domain, fold, rows_R, x_BD[in_bucket_B], f_BR[in_bucket_B], weight)
        self.n_updates += 1

    def decay(self, factor: float) -> None:
        """Multiply every statistic, counts included, by ``factor`` in [0, 1].

        Calling it before each ``update`` makes the cache an exponential moving average.
        """
        if not (0.0 <= factor <= 1.0):
            raise CacheError(f"The decay factor must be in [0, 1], got {factor}.")
        for tensor in self.stats.values():
            tensor.mul_(factor)

    def select(
        self,
        domains: Iterable[str] = DOMAINS,
        folds: Iterable[int] | None = None,
    ) -> Stats:
        """Sum the statistics over the given domains and folds (all folds when None)."""
        domain_indices = self._domain_indices(domains)
        fold_indices = self._fold_indices(folds)

        summed: dict[str, torch.Tensor] = {}
        for name, tensor in self.stats.items():
            total = torch.zeros(tensor.shape[2:], dtype=torch.float64, device=self.device)
            for domain in domain_indices:
                for fold in fold_indices:
                    total += tensor[domain, fold]
            summed[name] = total

        return Stats(
            n=summed["n"],
            sx_D=summed["sx"],
            sxx_DD=summed["sxx"],
            n_rows_F=summed["n_rows"],
            c_F=summed["c"],
            s1_F=summed["s1"],
            s2_F=summed["s2"],
            G_FD=summed["G"],
            H_FD=summed["H"],
        )

    def _domain_indices(self, domains: Iterable[str]) -> list[int]:
        if isinstance(domains, str):
            domains = [domains]
        indices = []
        for domain in domains:
            if domain not in DOMAINS:
                raise CacheError(f"Unknown domain {domain!r}. Use one of {list(DOMAINS)}.")
            indices.append(DOMAINS.index(domain))
        if not indices:
            raise CacheError("select() needs at least one domain.")
        return sorted(set(indices))

    def _fold_indices(self, folds: Iterable[int] | None) -> list[int]:
        if folds is None:
            return list(range(self.n_buckets))
        if self.n_folds is None:
            raise CacheError(
                f"This cache keeps one bucket for all folds (n_folds=None), so folds={folds!r} "
                "cannot be selected. Pass folds=None, or build the cache with n_folds set."
            )
        indices = sorted(set(int(fold) for fold in folds))
        if not indices:
            raise CacheError("select() needs at least one fold, or folds=None for all.")
        invalid = [fold for fold in indices if not 0 <= fold < self.n_folds]
        if invalid:
            raise CacheError(
                f"Folds {invalid} are out of range for a cache with n_folds={self.n_folds}. "
                f"Use folds in 0..{self.n_folds - 1}."
            )
        return indices

    def _prepare_batch(
        self,
        x_BD: torch.Tensor,
        f_BF: torch.Tensor,
        domain_B: torch.Tensor,
        fold_B: torch.Tensor | None,
        weight: float,
        rows_R: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validate a batch and return x, the ``rows_R`` columns of f and each token's bucket.

        x and f are returned in float64 on the cache's device.
        """
        if x_BD.dim() != 2 or x_BD.shape[1] != self.d_model:
            raise CacheError(
                f"x_BD must have shape (batch, {self.d_model}), got {tuple(x_BD.shape)}."
            )
        batch_size = x_BD.shape[0]
        if tuple(f_BF.shape) != (batch_size, self.d_sae):
            raise CacheError(
                f"f_BF must have shape ({batch_size}, {self.d_sae}), got {tuple(f_BF.shape)}."
            )
        if not (math.isfinite(weight) and weight > 0):
            raise CacheError(f"The update weight must be a positive finite number, got {weight}.")

        # Selecting rows before the float64 copy keeps pattern-caching updates cheap.
        f_BR = f_BF.detach()
        if rows_R is not None:
            f_BR = f_BR[:, rows_R.to(f_BR.device)]
        x_BD = x_BD.detach().to(self.device, torch.float64)
        f_BR = f_BR.to(self.device, torch.float64)
        if not bool(torch.isfinite(x_BD).all()) or not bool(torch.isfinite(f_BR).all()):
            raise CacheError(
                "x_BD or f_BF contains NaN or inf. The statistics would be lost for good, "
                "so the batch was rejected. Check the activations and the SAE."
            )

        domain_B = self._check_labels(domain_B, batch_size, len(DOMAINS), "domain_B")
        if self.n_folds is None:
            return x_BD, f_BR, domain_B
        if fold_B is None:
            raise CacheError(
                f"This cache keeps {self.n_folds} folds, so update() needs fold_B. "
                "Pass the store's fold array, or build the cache with n_folds=None."
            )
        fold_B = self._check_labels(fold_B, batch_size, self.n_folds, "fold_B")
        return x_BD, f_BR, domain_B * self.n_folds + fold_B

    def _check_labels(
        self, labels_B: torch.Tensor, batch_size: int, n_values: int, name: str
    ) -> torch.Tensor:
        labels_B = torch.as_tensor(labels_B, device=self.device)
        if labels_B.shape != (batch_size,) or labels_B.is_floating_point():
            raise CacheError(
                f"{name} must be an integer tensor of shape ({batch_size},), got "
                f"{labels_B.dtype} of shape {tuple(labels_B.shape)}."
            )
        labels_B = labels_B.to(torch.int64)
        if batch_size and not (0 <= int(labels_B.min()) and int(labels_B.max()) < n_values):
            raise CacheError(
                f"{name} values must be in 0..{n_values - 1}, got values in "
                f"{int(labels_B.min())}..{int(labels_B.max())}."
            )
        return labels_B

    def _prepare_rows(self, rows: torch.Tensor | Sequence[int] | None) -> torch.Tensor | None:
        if rows is None:
            return None
        rows_R = torch.as_tensor(rows, dtype=torch.int64, device=self.device).flatten()
        if rows_R.numel() == 0:
            return rows_R
        if not (0 <= int(rows_R.min()) and int(rows_R.max()) < self.d_sae):
            raise CacheError(
                f"Latent rows must be in 0..{self.d_sae - 1}, got values in "
                f"{int(rows_R.min())}..{int(rows_R.max())}."
            )
        # Repeated rows would add the same batch twice through index_add_.
        if torch.unique(rows_R).numel() != rows_R.numel():
            raise CacheError("Latent rows contain duplicates. Pass each row once.")
        return rows_R

    def _add_input_stats(self, domain: int, fold: int, x_BD: torch.Tensor, weight: float) -> None:
        self.stats["n"][domain, fold] += weight * x_BD.shape[0]
        self.stats["sx"][domain, fold].add_(x_BD.sum(dim=0), alpha=weight)
        self.stats["sxx"][domain, fold].addmm_(x_BD.T, x_BD, alpha=weight)

    def _add_row_stats(
        self,
        domain: int,
        fold: int,
        rows_R: torch.Tensor | None,
        x_BD: torch.Tensor,
        f_BR: torch.Tensor,
        weight: float,
    ) -> None:
        if rows_R is not None and rows_R.numel() == 0:
            return
        active_BR = (f_BR > 0).to(torch.float64)

        row_sums = {
            "n_rows": f_BR.new_full((f_BR.shape[1],), float(x_BD.shape[0])),
            "c": active_BR.sum(dim=0),
            "s1": f_BR.sum(dim=0),
            "s2": (f_BR * f_BR).sum(dim=0),
        }
        for name, row_sum in row_sums.items():
            target = self.stats[name][domain, fold]
            if rows_R is None:
                target.add_(row_sum, alpha=weight)
            else:
                target.index_add_(0, rows_R, row_sum, alpha=weight)

        # The [F, D] cross moments dominate the cost: two float64 matmuls of B x F x D.
        # addmm_ accumulates in place, without an [F, D] temporary per bucket.
        G_FD = self.stats["G"][domain, fold]
        H_FD = self.stats["H"][domain, fold]
        if rows_R is None:
            G_FD.addmm_(f_BR.T, x_BD, alpha=weight)
            H_FD.addmm_(active_BR.T, x_BD * x_BD, alpha=weight)
        else:
            G_FD.index_add_(0, rows_R, f_BR.T @ x_BD, alpha=weight)
            H_FD.index_add_(0, rows_R, active_BR.T @ (x_BD * x_BD), alpha=weight)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the cache as a Zarr v3 group at ``path``, atomically (temp dir, rename)."""
        path = Path(path)
        attributes: dict[str, Any] = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "model": self.model,
            "layer": self.layer,
            "d_model": self.d_model,
            "d_sae": self.d_sae,
            "n_folds": self.n_folds,
            "domains": list(DOMAINS),
            "n_updates": self.n_updates,
        }
        with atomic_directory(path) as tmp_dir:
            group = zarr.open_group(str(tmp_dir), mode="w", attributes=attributes)
            for name in STAT_NAMES:
                values = self.stats[name].cpu().numpy()
                array = group.create_array(
                    name,
                    shape=values.shape,
                    dtype="float64",
                    chunks=_chunk_shape(values.shape),
                    # Float64 sums barely compress, so chunks only carry a checksum.
                    compressors=[zarr.codecs.Crc32cCodec()],
                    config={"write_empty_chunks": True},
                )
                array[...] = values
        logger.info(
            "Saved correlation cache (%d updates, %.1f MB) to %s",
            self.n_updates,
            self.nbytes / 1e6,
            path,
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        expected_model: str | None = None,
        expected_layer: int | None = None,
        expected_d_model: int | None = None,
        expected_d_sae: int | None = None,
        device: torch.device | str = "cpu",
    ) -> CorrelationCache:
        """Read a cache written by ``save``, checking every ``expected_*`` value given.

        Raises:
            CacheError: for a missing or foreign group, an unknown version, another
                model, layer, d_model or d_sae, arrays of the wrong shape, or a missing
                or corrupted chunk.
        """
        path = Path(path)
        try:
            group = zarr.open_group(str(path), mode="r")
        except FileNotFoundError as error:
            raise CacheError(
                f"No correlation cache was found at {str(path)!r}. Check the path."
            ) from error
        attributes: dict[str, Any] = dict(group.attrs)

        if attributes.get("format") != CACHE_FORMAT:
            raise CacheError(
                f"{str(path)!r} is not a correlation cache: its format attribute is "
                f"{attributes.get('format')!r}, expected {CACHE_FORMAT!r}."
            )
        if attributes.get("version") != CACHE_VERSION:
            raise CacheError(
                f"{str(path)!r} has correlation cache version {attributes.get('version')!r}, "
                f"but this knowsep reads version {CACHE_VERSION}. Rebuild the cache."
            )
        _check_expected(path, "model", attributes.get("model"), expected_model)
        _check_expected(path, "layer", attributes.get("layer"), expected_layer)
        _check_expected(path, "d_model", attributes.get("d_model"), expected_d_model)
        _check_expected(path, "d_sae", attributes.get("d_sae"), expected_d_sae)
        if tuple(attributes.get("domains", ())) != DOMAINS:
            raise CacheError(
                f"{str(path)!r} has domains {attributes.get('domains')!r}, expected "
                f"{list(DOMAINS)}. Rebuild the cache."
            )

        for key in ("d_model", "d_sae", "layer", "n_updates"):
            if not isinstance(attributes.get(key), int):
                raise CacheError(
                    f"{str(path)!r} has an invalid {key} attribute {attributes.get(key)!r}. "
                    "The cache is corrupted, rebuild it."
                )
        n_folds = attributes.get("n_folds")
        if n_folds is not None and not isinstance(n_folds, int):
            raise CacheError(
                f"{str(path)!r} has an invalid n_folds attribute {n_folds!r}. Rebuild the cache."
            )

        cache = cls(
            attributes["d_model"],
            attributes["d_sae"],
            n_folds,
            model=str(attributes.get("model")),
            layer=attributes["layer"],
            device=device,
        )
        cache.n_updates = int(attributes["n_updates"])
        for name, shape in cache._stat_shapes().items():
            cache.stats[name] = _read_stat_array(group, path, name, shape).to(device)
        logger.info("Loaded correlation cache (%d updates) from %s", cache.n_updates, path)
        return cache


def _check_expected(path: Path, key: str, found: object, expected: object | None) -> None:
    if expected is not None and found != expected:
        raise CacheError(
            f"The correlation cache at {str(path)!r} was built for {key} {found!r}, but "
            f"{key} {expected!r} was requested. Rebuild the cache for this {key} or load "
            "the cache that belongs to this run."
        )


def _read_stat_array(
    group: zarr.Group, path: Path, name: str, shape: tuple[int, ...]
) -> torch.Tensor:
    location = f"array {name!r} of the correlation cache at {str(path)!r}"
    try:
        array = group[name]
    except KeyError as error:
        raise CacheError(
            f"The {location} is missing. The cache is incomplete, rebuild it."
        ) from error
    if not isinstance(array, zarr.Array) or array.shape != shape or array.dtype != np.float64:
        raise CacheError(
            f"The {location} has shape {getattr(array, 'shape', None)} and dtype "
            f"{getattr(array, 'dtype', None)}, expected float64 {shape}. The cache is "
            "corrupted or was written by other code, rebuild it."
        )
    if array.nchunks_initialized != array.nchunks:
        raise CacheError(
            f"The {location} is missing {array.nchunks - array.nchunks_initialized} of "
            f"{array.nchunks} chunks. The cache is corrupted, rebuild it."
        )
    try:
        values = array[...]
    except (ValueError, RuntimeError) as error:
        raise CacheError(
            f"Failed to decode the {location}: {error}. The cache is corrupted. Rebuild it."
        ) from error
    return torch.from_numpy(np.ascontiguousarray(values))


def _chunk_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunk one (domain, fold) bucket at a time, splitting its first axis near 8 MiB."""
    bucket_shape = shape[2:]
    if not bucket_shape:
        return shape
    row_bytes = 8 * math.prod(bucket_shape[1:])
    rows_per_chunk = max(1, min(bucket_shape[0], _TARGET_CHUNK_BYTES // row_bytes))
    return (1, 1, rows_per_chunk, *bucket_shape[1:])
