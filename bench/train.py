"""Benchmark SAE training throughput of each variant, the cache refresh cost and mask memory.

Run ``python bench/train.py`` (``--device cuda`` on a GPU; ``--d-model 640 --d-sae 4096
--batch-size 4096`` for the Gemma 3 270M demo size). It writes a synthetic activation
store (Gaussian rows, half forget, half retain) to a temporary directory, trains every
variant on it through ``trainer.train.train`` with the same seed, hence the same
batches, and logs a markdown table of

- tokens per second of each variant and its ratio to the standard SAE (target for the
  masked variants: at least 0.85), without the correlation cache and with it;
- the cache refresh time as a fraction of a training step (target: at most 0.10);
- mask memory of ``PackedMask`` against bool and float32 masks, and pack / unpack
  throughput at this SAE's mask shape.

Step times are the ``step_ms`` the hooks log (wall time between the ends of two steps,
data loading and pruning events included), median over log windows after the first
(warm-up), and the fastest of ``--rounds`` interleaved runs. Pruning runs over the first quarter of the steps, so most steps
run at the target density.

Timings depend on the machine and its load, so the table records the device, thread
count and load average next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Makes the script runnable from a checkout without installing knowsep.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stores.activations import StoreMetadata, create_store  # noqa: E402
from stores.masks import PackedMask  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.train import TRAIN_LOG_FILE, train  # noqa: E402

logger = logging.getLogger("bench.train")

#: Log windows per run. The first one contains warm-up and is not timed.
LOG_WINDOWS = 5


def write_synthetic_store(path: Path, d_model: int, n_tokens: int, seed: int = 0) -> Path:
    """Write a one-shard float32 store of Gaussian rows, alternating forget and retain tokens."""
    rng = np.random.default_rng(seed)
    context_size = 64
    metadata = StoreMetadata(
        model="synthetic",
        layer=0,
        d_model=d_model,
        acts_dtype="float32",
        context_size=context_size,
        n_folds=5,
        corpora=[
            {"name": "forget", "source": "synthetic", "domain": "forget", "kind": "text"},
            {"name": "retain", "source": "synthetic", "domain": "retain", "kind": "text"},
        ],
        config_hash=f"bench-{d_model}-{n_tokens}-{seed}",
    )
    store = create_store(path, metadata)

    acts_ND = rng.normal(size=(n_tokens, d_model)).astype(np.float32)
    domain_N = (np.arange(n_tokens) % 2).astype(np.uint8)
    # Forget tokens get a shifted mean, so latents can tell the domains apart.
    acts_ND[domain_N == 0, : d_model // 4] += 1.0
    doc_ids_N = np.arange(n_tokens) // 32
    n_contexts = max(1, n_tokens // context_size)

    store.write_shard(
        0,
        {
            "acts": acts_ND,
            "token_ids": rng.integers(0, 256, size=n_tokens).astype(np.int32),
            "doc_ids": doc_ids_N.astype(np.int64),
            "positions": (np.arange(n_tokens) % context_size).astype(np.int32),
            "context_index": np.minimum(np.arange(n_tokens) // context_size, n_contexts - 1).astype(np.int32),
            "domain": domain_N,
            "corpus": domain_N.copy(),
            "fold": (doc_ids_N % 5).astype(np.uint8),
            "split": np.zeros(n_tokens, dtype=np.uint8),
            "contexts": rng.integers(0, 256, size=(n_contexts, context_size)).astype(np.int32),
            "context_corpus": np.zeros(n_contexts, dtype=np.uint8),
            "context_split": np.zeros(n_contexts, dtype=np.uint8),
        },
    )

    norm_scale = float(np.sqrt(d_model * n_tokens / float((acts_ND.astype(np.float64) ** 2).sum())))
    store.finalize(norm_scale, {"split": {"train": n_tokens, "heldout": 0}})
    return path


def run_variant(args: argparse.Namespace, store: Path, runs_dir: Path, name: str, variant: str, options: dict[str, Any]) -> dict[str, float]:
    """Train one variant; return its median step_ms and, with the cache, its refresh share of the steps."""
    cfg = TrainConfig(
        store=str(store),
        runs_dir=str(runs_dir),
        run_name=name,
        variant=variant,
        variant_options=options,
        d_sae=args.d_sae,
        activation="topk",
        k=args.k,
        lr=4e-4,
        lr_warmup_steps=0,
        lr_decay_steps=0,
        l1_warmup_steps=0,
        batch_size=args.batch_size,
        total_tokens=args.batch_size * args.steps,
        seed=0,
        checkpoint_every=0,
        log_every=max(1, args.steps // LOG_WINDOWS),
        device=args.device,
        dead_window=args.batch_size * args.steps,
        progress_bar=False,
    )
    run_dir = train(cfg)
    records = [json.loads(line) for line in (run_dir / TRAIN_LOG_FILE).read_text().splitlines()][1:]
    result = {"step_ms": statistics.median(record["step_ms"] for record in records)}
    if "cache_ms" in records[0]:
        # Windows without a refresh log 0 ms, so the fraction is a ratio of sums, not a median.
        result["cache_fraction"] = sum(record["cache_ms"] for record in records) / sum(
            record["step_ms"] for record in records
        )
        refreshed = [record["cache_rows_per_refresh"] for record in records if record["cache_ms"] > 0]
        result["cache_rows"] = statistics.mean(refreshed) if refreshed else 0.0
    return result


def bench_masks(d_sae: int, d_model: int, device: torch.device, repeats: int) -> list[tuple[str, str]]:
    """Measure mask memory and pack / unpack throughput at the SAE's mask shape."""
    mask = PackedMask.ones(d_sae, d_model, device)
    rows = [
        (
            f"mask bytes {d_sae}x{d_model}",
            f"packed {mask.nbytes:,}, bool {d_sae * d_model:,}, float32 {4 * d_sae * d_model:,} "
            f"({4 * d_sae * d_model / mask.nbytes:.0f}x smaller than float32)",
        )
    ]
    dense_FD = torch.rand(d_sae, d_model, generator=torch.Generator().manual_seed(0)).lt(0.25).to(device)
    timings: dict[str, list[float]] = {"pack": [], "unpack": []}
    # The first call pays for one-time set-up, so it is not timed.
    PackedMask.from_dense(dense_FD).to_dense()
    for _ in range(repeats):
        start = time.perf_counter()
        packed = PackedMask.from_dense(dense_FD)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings["pack"].append(time.perf_counter() - start)
        start = time.perf_counter()
        packed.to_dense()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings["unpack"].append(time.perf_counter() - start)
    connections = d_sae * d_model
    rows.append(
        (
            f"pack / unpack {d_sae}x{d_model}",
            f"{connections / statistics.median(timings['pack']) / 1e6:,.0f} / "
            f"{connections / statistics.median(timings['unpack']) / 1e6:,.0f} M connections/s",
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda)")
    parser.add_argument("--d-model", type=int, default=64, help="input width of the synthetic store")
    parser.add_argument("--d-sae", type=int, default=512, help="SAE latents")
    parser.add_argument("--k", type=int, default=16, help="latents per token of the TopK SAEs")
    parser.add_argument("--batch-size", type=int, default=512, help="tokens per step")
    parser.add_argument("--steps", type=int, default=24, help="training steps per variant")
    parser.add_argument(
        "--rounds", type=int, default=2, help="runs of every variant, interleaved; the fastest of each counts"
    )
    parser.add_argument("--density", type=float, default=0.25, help="target density of the masked variants")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of pack and unpack")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Short runs of random data trip the trainer's explained-variance warning; only errors matter here.
    for name in ("trainer", "stores"):
        logging.getLogger(name).setLevel(logging.ERROR)
    device = torch.device(args.device)

    pruning = {
        "target_density": args.density,
        "start_step": 0,
        "end_step": max(1, args.steps // 4),
        "prune_every": max(1, args.steps // 20),
        "min_connections": max(1, min(8, int(args.density * args.d_model))),
    }
    no_cache = {"track_separation": False}
    runs = [
        ("standard", "standard", no_cache),
        ("fixed", "fixed", {**pruning, **no_cache}),
        ("standard + cache", "standard", {}),
        ("fixed + cache", "fixed", pruning),
        ("adaptive + cache", "adaptive", pruning),
    ]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="knowsep-bench-train-") as temporary:
        store = write_synthetic_store(Path(temporary) / "store", args.d_model, n_tokens=args.batch_size * 8)
        # Interleaving the rounds spreads changes of the machine's load over every variant.
        for round_index in range(args.rounds):
            for name, variant, options in runs:
                run_name = f"{name.replace(' + ', '-')}-{round_index}"
                result = run_variant(args, store, Path(temporary) / "runs", run_name, variant, options)
                logger.info("%s, round %d: %.1f ms per step", name, round_index, result["step_ms"])
                if name not in results or result["step_ms"] < results[name]["step_ms"]:
                    results[name] = result

    table = []
    for name, _, _ in runs:
        reference = results["standard + cache" if "cache" in name else "standard"]["step_ms"]
        step_ms = results[name]["step_ms"]
        cache = results[name].get("cache_fraction")
        table.append(
            f"| {name} | {step_ms:.1f} | {args.batch_size / step_ms * 1e3:,.0f} | {reference / step_ms:.2f} | "
            + ("-" if cache is None else f"{cache:.1%} ({results[name]['cache_rows']:.0f} of {args.d_sae} rows)")
            + " |"
        )

    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"CPU, {torch.get_num_threads()} threads"
    # Other processes on a shared machine slow every timing, so the load is recorded.
    hardware += f"; load average {os.getloadavg()[0]:.1f} at the end"
    lines = [
        f"Device: {hardware}; torch {torch.__version__}; d_model {args.d_model}, d_sae {args.d_sae}, "
        f"TopK k={args.k}, batch {args.batch_size}, {args.steps} steps, target density {args.density}, "
        f"fastest of {args.rounds} round(s).",
        "",
        "| variant | step ms | tokens/s | vs standard | cache refresh / step (rows per refresh) |",
        "|---|---|---|---|---|",
        *table,
        "",
        "| measurement | result |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in bench_masks(args.d_sae, args.d_model, device, args.repeats)),
    ]
    logger.info("\n%s", "\n".join(lines))


if __name__ == "__main__":
    main()
