"""Benchmark the harvest against the bare forward pass it is built on.

Runs `run_harvest` on one text corpus and times it against `capture_residual` alone
over the same contexts, batch size and dtype. The harvest adds tokenization, packing,
dask scheduling, shard writes and the final statistics pass. The target is a ratio
(harvest throughput / bare forward throughput) of at least 0.9.

    python bench/harvest.py --model gemma-3-270m --layer 6 --tokens 20000

Prints a table and a markdown row for the benchmark page. Throughput counts every
context position (BOS and padding included), since that is what the model computes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# Running `python bench/harvest.py` puts bench/ on sys.path, not the repository root.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pipeline.config import HarvestConfig  # noqa: E402
from pipeline.data import CorpusSpec, default_corpora  # noqa: E402
from pipeline.harvest import get_worker_model, iter_planned_shards, resolve_corpora, run_harvest  # noqa: E402
from pipeline.models import ModelConfig, capture_residual, resolve_layer  # noqa: E402

logger = logging.getLogger("bench.harvest")

WARMUP_BATCHES = 3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="gemma-3-270m", help="embedded model name, model directory or hub id"
    )
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        help="block whose output is harvested (default: the middle block)",
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32", "float16"],
        help="model dtype",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")

    parser.add_argument("--tokens", type=int, default=20_000, help="document tokens to harvest")
    parser.add_argument(
        "--corpus",
        default=None,
        help="local .jsonl text corpus (default: WikiText-2 from the data directory)",
    )
    parser.add_argument(
        "--context-size", type=int, default=128, help="tokens per context, BOS included"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="contexts per forward pass")
    parser.add_argument("--shard-contexts", type=int, default=256, help="contexts per store shard")
    parser.add_argument(
        "--num-workers", type=int, default=1, help="shards in flight in the harvest (HarvestConfig.num_workers)"
    )

    parser.add_argument(
        "--store",
        default=None,
        help="store directory (default: a temporary directory, deleted afterwards)",
    )
    return parser.parse_args()


def corpus_spec(args: argparse.Namespace) -> CorpusSpec:
    if args.corpus is not None:
        return CorpusSpec(
            name=Path(args.corpus).stem,
            kind="text",
            domain="retain",
            local=args.corpus,
            max_tokens=args.tokens,
        )
    wikitext = next(spec for spec in default_corpora() if spec.name == "wikitext-2")
    return dataclasses.replace(wikitext, max_tokens=args.tokens)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_bare_forward(cfg: HarvestConfig, layer: int) -> tuple[int, float]:
    """Time `capture_residual` over the harvest's contexts; return (positions, seconds).

    The loop runs in a pool thread, as the harvest's shards do on dask's threaded
    scheduler, so both runs call torch under the same threading conditions.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_time_bare_forward, cfg, layer).result()


def _time_bare_forward(cfg: HarvestConfig, layer: int) -> tuple[int, float]:
    loaded = get_worker_model(cfg.model)
    shards = list(iter_planned_shards(cfg, resolve_corpora(cfg), loaded.tokenizer))
    batches = []
    for shard in shards:
        for start in range(0, len(shard.contexts_CT), cfg.batch_size):
            input_ids_BL = (
                torch.from_numpy(shard.contexts_CT[start : start + cfg.batch_size])
                .long()
                .to(loaded.device)
            )
            mask_BL = (
                torch.from_numpy(shard.valid_CT[start : start + cfg.batch_size])
                .long()
                .to(loaded.device)
            )
            batches.append((input_ids_BL, mask_BL))

    with torch.inference_mode():
        # Untimed batches, so lazy initialisation (kernels, allocator) is not counted.
        for batch in batches[:WARMUP_BATCHES]:
            capture_residual(loaded.model, layer, *batch)
        synchronize(loaded.device)
        started = time.perf_counter()
        for input_ids_BL, mask_BL in batches:
            capture_residual(loaded.model, layer, input_ids_BL, mask_BL)
        synchronize(loaded.device)
    elapsed = time.perf_counter() - started
    return sum(ids.numel() for ids, _ in batches), elapsed


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args()

    with tempfile.TemporaryDirectory(prefix="knowsep-bench-") as scratch:
        cfg = HarvestConfig(
            model=ModelConfig(
                name=args.model, layer=args.layer, dtype=args.dtype, device=args.device
            ),
            store=args.store or str(Path(scratch) / "store"),
            corpora=[corpus_spec(args)],
            context_size=args.context_size,
            batch_size=args.batch_size,
            shard_contexts=args.shard_contexts,
            num_workers=args.num_workers,
            overwrite=True,
        )
        # The harvest reuses this process's cached model, so loading it is timed by neither.
        loaded = get_worker_model(cfg.model)
        layer = resolve_layer(args.layer, loaded.n_layers)

        # The bare forward is timed before and after the harvest and the faster run is
        # kept, so a slow first pass cannot flatter the harvest's ratio.
        positions, bare_before = time_bare_forward(cfg, layer)
        started = time.perf_counter()
        store = run_harvest(cfg)
        harvest_seconds = time.perf_counter() - started
        _, bare_after = time_bare_forward(cfg, layer)
        bare_seconds = min(bare_before, bare_after)
        n_contexts = sum(info.n_contexts for info in store.shards)
        stored_tokens = store.n_tokens()

    harvest_positions = n_contexts * args.context_size
    if harvest_positions != positions:
        raise RuntimeError(
            f"the harvest computed {harvest_positions} positions but the bare run {positions}; the plans differ"
        )

    bare_rate = positions / bare_seconds
    harvest_rate = positions / harvest_seconds
    ratio = harvest_rate / bare_rate
    device = str(loaded.device)
    logger.info("%-14s %10s %9s %12s", "run", "positions", "seconds", "positions/s")
    logger.info("%-14s %10d %9.2f %12.0f", "bare forward", positions, bare_seconds, bare_rate)
    logger.info("%-14s %10d %9.2f %12.0f", "run_harvest", positions, harvest_seconds, harvest_rate)
    logger.info(
        "bare forward runs: %.2f s before the harvest, %.2f s after", bare_before, bare_after
    )
    logger.info("ratio %.3f (target >= 0.9); %d token rows stored", ratio, stored_tokens)

    print(
        "| model | layer | dtype | device | context | batch | positions | bare tok/s | harvest tok/s | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.model} | {layer} | {args.dtype} | {device} | {args.context_size} | {args.batch_size} | "
        f"{positions} | {bare_rate:.0f} | {harvest_rate:.0f} | {ratio:.3f} |"
    )


if __name__ == "__main__":
    main()
