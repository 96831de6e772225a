"""Benchmark bit-packed masks and the correlation cache.

Run ``python bench/masks.py`` (``--device cuda`` on a GPU). It logs a markdown table of

- mask memory of ``PackedMask`` against bool and float32 masks,
- pack and unpack throughput in million connections per second (median of repeats),
- the cost of one correlation cache update on a batch of 4096 tokens and on a
  512-token subsample, per fold and with one bucket per domain (``n_folds=None``),
- one float32 training step of a plain ReLU SAE of the same size, because the cache's
  cost target is at most 10% of a training step.

An update reads and writes G and H of every bucket its tokens fall in, so its cost
has a floor of that memory traffic (2 x F x D float64 per bucket) however few tokens
it adds.

Timings depend on the machine and its load, so the table records the device, thread
count and load average next to the numbers.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

# Makes the script runnable from a checkout without installing knowsep.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stores.cache import CorrelationCache  # noqa: E402
from stores.masks import PackedMask  # noqa: E402

logger = logging.getLogger("bench.masks")

MASK_SHAPES = [(4096, 640), (16384, 2304)]
D_MODEL, D_SAE = 640, 4096
BATCH_SIZE, SUBSAMPLE_SIZE = 4096, 512
N_FOLDS = 5
# About 64 of 4096 latents fire per token, a typical L0 for SAEs of this width.
FIRING_FRACTION = 64 / D_SAE


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Return the median wall time of ``run`` over ``repeats`` calls, after one warm-up call."""
    run()
    synchronize(device)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def bench_memory() -> list[tuple[str, str]]:
    rows = []
    for n_rows, n_cols in MASK_SHAPES:
        packed_bytes = PackedMask.ones(n_rows, n_cols).nbytes
        bool_bytes = n_rows * n_cols
        float_bytes = 4 * n_rows * n_cols
        rows.append(
            (
                f"mask bytes {n_rows}x{n_cols}",
                f"packed {packed_bytes / 2**20:.2f} MiB, bool {bool_bytes / 2**20:.2f} MiB, "
                f"float32 {float_bytes / 2**20:.2f} MiB ({float_bytes / packed_bytes:.0f}x)",
            )
        )
    return rows


def bench_pack_unpack(device: torch.device, repeats: int) -> list[tuple[str, str]]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for n_rows, n_cols in MASK_SHAPES:
        dense_RC = (torch.rand(n_rows, n_cols, generator=generator) < 0.5).to(device)
        mask = PackedMask.from_dense(dense_RC)
        connections = n_rows * n_cols

        pack_s = median_seconds(partial(PackedMask.from_dense, dense_RC), device, repeats)
        unpack_s = median_seconds(mask.to_dense, device, repeats)
        count_s = median_seconds(mask.count, device, repeats)
        rows.append(
            (
                f"pack / unpack / count {n_rows}x{n_cols}",
                f"{connections / pack_s / 1e6:,.0f} / {connections / unpack_s / 1e6:,.0f} / "
                f"{connections / count_s / 1e6:,.0f} M connections/s",
            )
        )
    return rows


def random_batch(n_tokens: int, device: torch.device, generator: torch.Generator):
    x_BD = torch.randn(n_tokens, D_MODEL, generator=generator).to(device)
    # Shifting the pre-activations makes about FIRING_FRACTION of the latents fire.
    threshold = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - FIRING_FRACTION))
    f_BF = torch.relu(torch.randn(n_tokens, D_SAE, generator=generator) - threshold).to(device)
    domain_B = torch.randint(0, 2, (n_tokens,), generator=generator).to(device)
    fold_B = torch.randint(0, N_FOLDS, (n_tokens,), generator=generator).to(device)
    return x_BD, f_BF, domain_B, fold_B


def bench_cache(device: torch.device, repeats: int) -> list[tuple[str, str]]:
    generator = torch.Generator().manual_seed(1)
    x_BD, f_BF, domain_B, fold_B = random_batch(BATCH_SIZE, device, generator)
    sub = slice(0, SUBSAMPLE_SIZE)
    label = f"d={D_MODEL}, m={D_SAE}"
    results = []
    subsample_seconds: dict[str, float] = {}

    for n_folds in (N_FOLDS, None):
        cache = CorrelationCache(D_MODEL, D_SAE, n_folds, model="bench", layer=0, device=device)
        buckets = f"{2 * cache.n_buckets} buckets, {cache.nbytes / 1e6:,.0f} MB"
        if n_folds is not None:
            full_s = median_seconds(
                partial(cache.update, x_BD, f_BF, domain_B, fold_B), device, repeats
            )
            results.append(
                (
                    f"cache update, {BATCH_SIZE} tokens, {label}, {buckets}",
                    f"{full_s * 1e3:,.0f} ms",
                )
            )
        subsample_s = median_seconds(
            partial(cache.update, x_BD[sub], f_BF[sub], domain_B[sub], fold_B[sub]),
            device,
            repeats,
        )
        results.append(
            (
                f"cache update, {SUBSAMPLE_SIZE}-token subsample, {buckets}",
                f"{subsample_s * 1e3:,.0f} ms",
            )
        )
        subsample_seconds[buckets] = subsample_s

        # Pattern caching updates only the latents whose encoder row moved.
        moved_F = torch.randperm(D_SAE, generator=generator)[: D_SAE // 10].to(device)
        moved_s = median_seconds(
            partial(cache.update, x_BD[sub], f_BF[sub], domain_B[sub], fold_B[sub], rows=moved_F),
            device,
            repeats,
        )
        results.append(
            (
                f"cache update, {SUBSAMPLE_SIZE}-token subsample, 10% of rows, {buckets}",
                f"{moved_s * 1e3:,.0f} ms",
            )
        )
        del cache

    step_s = median_seconds(sae_training_step(x_BD, device), device, repeats)
    results.append(
        (f"float32 ReLU SAE training step, {BATCH_SIZE} tokens, {label}", f"{step_s * 1e3:,.0f} ms")
    )
    shares = [
        f"{seconds / step_s:.0%} ({buckets})" for buckets, seconds in subsample_seconds.items()
    ]
    results.append(("subsample update / training step", ", ".join(shares)))
    return results


def sae_training_step(x_BD: torch.Tensor, device: torch.device) -> Callable[[], None]:
    """Build one forward, backward and Adam step of a plain ReLU SAE, as a time reference."""
    generator = torch.Generator().manual_seed(2)
    W_enc_DF = (torch.randn(D_MODEL, D_SAE, generator=generator) / D_MODEL**0.5).to(device)
    W_enc_DF.requires_grad_(True)
    W_dec_FD = W_enc_DF.detach().T.clone().requires_grad_(True)
    b_enc_F = torch.zeros(D_SAE, device=device, requires_grad=True)
    b_dec_D = torch.zeros(D_MODEL, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([W_enc_DF, W_dec_FD, b_enc_F, b_dec_D], lr=1e-4)
    x_BD = x_BD.float()

    def step() -> None:
        f_BF = torch.relu((x_BD - b_dec_D) @ W_enc_DF + b_enc_F)
        x_hat_BD = f_BF @ W_dec_FD + b_dec_D
        loss = (x_hat_BD - x_BD).pow(2).sum(dim=-1).mean() + 1e-3 * f_BF.sum(dim=-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)

    results = bench_memory()
    results += bench_pack_unpack(device, args.repeats)
    results += bench_cache(device, args.repeats)

    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"CPU, {torch.get_num_threads()} threads"
    # Other processes on a shared machine slow every timing, so the load is recorded.
    hardware += f"; load average {os.getloadavg()[0]:.1f} at the end"
    lines = [
        f"Device: {hardware}; torch {torch.__version__}; median of {args.repeats} repeats.",
        "",
        "| measurement | result |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in results),
    ]
    logger.info("\n%s", "\n".join(lines))


if __name__ == "__main__":
    main()
