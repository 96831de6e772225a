"""Benchmark the multiple-choice scorer of the unlearning eval against bare forward passes.

Run ``python bench/unlearning.py`` (a tiny random model, on the CPU) or
``python bench/unlearning.py --model gemma-3-270m --device cuda``. It logs a markdown
table with, per scoring mode, LM head precision and (cloze) prompt cache setting:

- the tokens the model reads: all four full sequences, or with the prompt cache each
  prompt once and the choices,
- questions per second of ``MultipleChoiceScorer.score`` on already tokenized
  questions, as every sweep point runs it,
- its efficiency against the bare forward passes over the four full sequences of each
  question, padded as the scorer pads them (no LM head): the work a scorer without a
  prompt cache cannot avoid. The target is at least 0.8,
- its efficiency against the bare forward passes the scorer itself runs (with the
  prompt cache, the prompt pass and the choice pass; no LM head), which shows what
  the LM head and the bookkeeping cost on top,
- for every setting but the reference (float32, no prompt cache), the largest
  difference of a choice score from the reference's, and the number of questions
  whose top-scoring choice differs.

Questions per second of tokenization (``prepare``), paid once per eval, come first.
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

from evals.unlearning.scoring import (  # noqa: E402
    MultipleChoiceScorer,
    PromptCacheBatch,
    cloze_prompt,
    letter_prompt,
)
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
    prompt_cache: bool,
    batch_size: int,
    repeats: int,
) -> dict[str, Any]:
    """Time scoring and the bare forward passes of one scoring mode, precision and prompt cache setting."""
    scorer = MultipleChoiceScorer(
        model,  # type: ignore[arg-type]
        tokenizer,
        mode,  # type: ignore[arg-type]
        batch_size=batch_size,
        logit_precision=precision,  # type: ignore[arg-type]
        prompt_cache=prompt_cache,
    )
    device = scorer.device
    prepared = scorer.prepare(questions)
    full_batches = list(scorer.padded_batches(prepared))
    own_batches = list(scorer.batches(prepared))
    decoder = scorer.decoder

    @torch.no_grad()
    def full_forward() -> None:
        for batch in full_batches:
            decoder(
                input_ids=batch.input_ids_BL,
                attention_mask=batch.attention_mask_BL,
                use_cache=False,
            )

    @torch.no_grad()
    def own_forward() -> None:
        for batch in own_batches:
            scorer.hidden_states(batch)

    score_seconds = median_seconds(lambda: scorer.score(prepared), device, repeats)
    full_seconds = median_seconds(full_forward, device, repeats)
    own_seconds = median_seconds(own_forward, device, repeats)
    n_tokens = 0
    for batch in own_batches:
        if isinstance(batch, PromptCacheBatch):
            n_tokens += int(batch.prompt_mask_QP.sum())
            n_tokens += int(batch.attention_mask_SK[:, batch.prompt_mask_QP.shape[1] :].sum())
        else:
            n_tokens += int(batch.attention_mask_BL.sum())
    n_questions = len(questions)
    return {
        "scores": scorer.score(prepared).scores_Q4,
        "score_qps": n_questions / score_seconds,
        "full_qps": n_questions / full_seconds,
        "own_qps": n_questions / own_seconds,
        "efficiency_full": full_seconds / score_seconds,
        "efficiency_own": own_seconds / score_seconds,
        "n_tokens": n_tokens,
    }


def prepare_qps(
    model: torch.nn.Module, tokenizer: Any, questions: list[MCQuestion], mode: str, repeats: int
) -> float:
    """Return the questions per second of tokenization (`prepare`)."""
    scorer = MultipleChoiceScorer(model, tokenizer, mode)  # type: ignore[arg-type]
    seconds = median_seconds(lambda: scorer.prepare(questions), scorer.device, repeats)
    return len(questions) / seconds


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
    parser.add_argument(
        "--prompt-cache",
        default="on,off",
        help="Comma-separated prompt cache settings for cloze (on, off).",
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
    modes = [mode.strip() for mode in args.modes.split(",")]
    for mode in modes:
        logger.info(
            "%s: tokenization %.1f questions/s",
            mode,
            prepare_qps(model, tokenizer, questions, mode, args.repeats),
        )
    logger.info(
        "\n| mode | LM head | prompt cache | tokens read | score q/s | full forward q/s "
        "| efficiency vs full forward | own forward q/s | efficiency vs own forward "
        "| max abs score difference from reference | changed predictions |"
    )
    logger.info("|---|---|---|---|---|---|---|---|---|---|---|")
    precisions = [precision.strip() for precision in args.precisions.split(",")]
    caches = [value.strip() == "on" for value in args.prompt_cache.split(",")]
    for mode in modes:
        settings = [
            (precision, cache)
            for precision in precisions
            for cache in (caches if mode == "cloze" else [False])
        ]
        results = {
            setting: bench_mode(
                model,
                tokenizer,
                questions,
                mode,
                *setting,
                batch_size=args.batch_size,
                repeats=args.repeats,
            )
            for setting in settings
        }
        reference = results.get(("float32", False))
        for (precision, cache), result in results.items():
            cache_label = "-"
            if mode == "cloze":
                cache_label = "on" if cache else "off"
            difference, changed = "-", "-"
            if reference is not None and result is not reference:
                difference = f"{np.abs(result['scores'] - reference['scores']).max():.1e}"
                changed = str(
                    int((result["scores"].argmax(1) != reference["scores"].argmax(1)).sum())
                )
            logger.info(
                "| %s | %s | %s | %d | %.2f | %.2f | %.2f | %.2f | %.2f | %s | %s |",
                mode,
                precision,
                cache_label,
                result["n_tokens"],
                result["score_qps"],
                result["full_qps"],
                result["efficiency_full"],
                result["own_qps"],
                result["efficiency_own"],
                difference,
                changed,
            )


if __name__ == "__main__":
    main()
