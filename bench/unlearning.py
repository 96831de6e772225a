"""Benchmark the multiple-choice scorer of the unlearning eval against bare forward passes.

Run ``python bench/unlearning.py`` (a tiny random model, on the CPU) or
``python bench/unlearning.py --model gemma-3-270m --device cuda``. It logs a markdown
table with, per scoring mode:

- questions per second of ``MultipleChoiceScorer.score`` on already tokenized
  questions, as every sweep point runs it,
- questions per second of the bare base-model forward passes over the same padded
  batches (no gathering, no LM head, no log-softmax),
- their ratio, the scorer's efficiency; the target is at least 0.8,
- questions per second of tokenization (``prepare``), paid once per eval,
- for each LM head precision other than ``float32`` (see ``evals/lm_head.py``), the
  largest difference of a choice score from the float32 head's, and the number of
  questions whose top-scoring choice differs.

The questions are the first ``--n-questions`` of WMDP-bio. The tiny model is a random
2-block Llama whose word-level vocabulary is built from those questions. Timings are
medians of ``--repeats`` runs after one warm-up, and depend on the machine and its load,
so the table records the device, thread count and load average next to the numbers.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Makes the script runnable from a checkout without installing knowsep.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.unlearning.scoring import MultipleChoiceScorer, cloze_prompt, letter_prompt  # noqa: E402
from pipeline.data import DEFAULT_DATA_PREFIX, MCQuestion, load_mcq, resolve_local_path  # noqa: E402
from pipeline.models import load_model  # noqa: E402

logger = logging.getLogger("bench.unlearning")

TINY_SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Return the median wall time of ``run`` over ``repeats`` calls, after one warm-up call."""
    run()
    synchronize(device)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        synchronize(device)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def build_tiny_model(questions: list[MCQuestion]) -> tuple[torch.nn.Module, Any]:
    """Build a random 2-block Llama (d_model 64) with a word-level tokenizer over the questions' words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words: set[str] = set()
    for question in questions:
        texts = [cloze_prompt(question), letter_prompt(question), *question.choices, "A B C D"]
        for text in texts:
            words.update(text.split())
    vocab = TINY_SPECIAL_TOKENS + sorted(words)
    backend = Tokenizer(
        models.WordLevel({word: index for index, word in enumerate(vocab)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def bench_mode(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: list[MCQuestion],
    mode: str,
    precision: str,
    batch_size: int,
    repeats: int,
) -> dict[str, Any]:
    """Time tokenization, scoring and the bare forward passes of one scoring mode and precision."""
    scorer = MultipleChoiceScorer(
        model,  # type: ignore[arg-type]
        tokenizer,
        mode,  # type: ignore[arg-type]
        batch_size=batch_size,
        logit_precision=precision,  # type: ignore[arg-type]
    )
    device = scorer.device
    prepare_seconds = median_seconds(lambda: scorer.prepare(questions), device, repeats)
    prepared = scorer.prepare(questions)
    batches = list(scorer.padded_batches(prepared))
    decoder = model.get_decoder()

    @torch.no_grad()
    def bare_forward() -> None:
        for batch in batches:
            decoder(
                input_ids=batch.input_ids_BL,
                attention_mask=batch.attention_mask_BL,
                use_cache=False,
            )

    score_seconds = median_seconds(lambda: scorer.score(prepared), device, repeats)
    bare_seconds = median_seconds(bare_forward, device, repeats)
    n_questions = len(questions)
    return {
        "scores": scorer.score(prepared).scores_Q4,
        "prepare_qps": n_questions / prepare_seconds,
        "score_qps": n_questions / score_seconds,
        "bare_qps": n_questions / bare_seconds,
        "efficiency": bare_seconds / score_seconds,
        "n_sequences": sum(len(item.sequences) for item in prepared),
        "n_tokens": sum(int(batch.attention_mask_BL.sum()) for batch in batches),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (random, built here) or a name or directory for load_model.",
    )
    parser.add_argument(
        "--questions",
        default=f"{DEFAULT_DATA_PREFIX}/wmdp-bio/wmdp_bio.jsonl",
        help="Question file (.jsonl).",
    )
    parser.add_argument("--n-questions", type=int, default=64, help="Questions scored per run.")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="Maximum sequences per forward pass."
    )
    parser.add_argument("--modes", default="cloze,letter", help="Comma-separated scoring modes.")
    parser.add_argument(
        "--precisions",
        default="mixed,float32",
        help="Comma-separated LM head precisions (mixed, float32).",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N.")
    parser.add_argument(
        "--dtype",
        default="float32",
        help="Model dtype for load_model: float32, bfloat16 or float16.",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="Timed runs per measurement (median reported)."
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    questions = list(
        load_mcq(str(resolve_local_path(args.questions)), max_questions=args.n_questions)
    )
    if args.model == "tiny":
        model, tokenizer = build_tiny_model(questions)
        model = model.to(args.device)
    else:
        loaded = load_model(args.model, dtype=args.dtype, device=args.device)
        model, tokenizer = loaded.model, loaded.tokenizer

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    logger.info(
        "model %s, %d questions, batch %d sequences, device %s, %d threads, load average %.2f\n",
        args.model,
        len(questions),
        args.batch_size,
        args.device,
        torch.get_num_threads(),
        load,
    )
    logger.info(
        "| mode | LM head | sequences | tokens | prepare q/s | score q/s | bare forward q/s "
        "| efficiency | max abs score difference from float32 | changed predictions |"
    )
    logger.info("|---|---|---|---|---|---|---|---|---|---|")
    precisions = [precision.strip() for precision in args.precisions.split(",")]
    for mode in args.modes.split(","):
        results = {
            precision: bench_mode(
                model, tokenizer, questions, mode.strip(), precision, args.batch_size, args.repeats
            )
            for precision in precisions
        }
        reference = results.get("float32")
        for precision, result in results.items():
            difference, changed = "-", "-"
            if reference is not None and precision != "float32":
                difference = f"{np.abs(result['scores'] - reference['scores']).max():.1e}"
                changed = str(
                    int((result["scores"].argmax(1) != reference["scores"].argmax(1)).sum())
                )
            logger.info(
                "| %s | %s | %d | %d | %.1f | %.1f | %.1f | %.2f | %s | %s |",
                mode,
                precision,
                result["n_sequences"],
                result["n_tokens"],
                result["prepare_qps"],
                result["score_qps"],
                result["bare_qps"],
                result["efficiency"],
                difference,
                changed,
            )


if __name__ == "__main__":
    main()
