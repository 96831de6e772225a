"""A tiny setting in which forget and retain text use disjoint tokens, built offline.

The vocabulary has forget words ``f0..``, retain words ``r0..`` and template words.
The model's embedding puts +SIGNAL on the first FORGET_DIMS coordinates of every forget
word and -SIGNAL on those of every other word, and its blocks are initialized small,
so block 0's output keeps that sign. The SAE is an exact identity with latents
``relu(x)`` and ``relu(-x)``, so latents 0..FORGET_DIMS-1 fire on forget tokens only
and the matching negative latents on the rest only. Questions are chains of forget
words (WMDP-bio stand-ins) or retain words (MMLU stand-ins), and the correct choice is
the one the model scores highest, computed with a plain forward pass.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from pipeline.data import MCQuestion
from pipeline.models import capture_residual
from stores.activations import StoreMetadata, create_store
from trainer.saes import StandardSAE, StandardSAEConfig

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
TEMPLATE_WORDS = ["Question:", "Answer:", "A", "B", "C", "D", "A.", "B.", "C.", "D."]
N_WORDS = 24
FORGET_WORDS = [f"f{i}" for i in range(N_WORDS)]
RETAIN_WORDS = [f"r{i}" for i in range(N_WORDS)]
VOCAB = SPECIAL_TOKENS + TEMPLATE_WORDS + FORGET_WORDS + RETAIN_WORDS
D_MODEL = 32
FORGET_DIMS = 4
SIGNAL = 3.0
LAYER = 0
CONTEXT_SIZE = 16
MMLU_SUBJECTS = [
    "high_school_us_history",
    "college_computer_science",
    "high_school_geography",
    "human_aging",
    "college_biology",
]


def token_id(word: str) -> int:
    return VOCAB.index(word)


FORGET_IDS = [token_id(word) for word in FORGET_WORDS]
RETAIN_IDS = [token_id(word) for word in RETAIN_WORDS]


def build_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(
        models.WordLevel(vocab={word: index for index, word in enumerate(VOCAB)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def tiny_config_fields() -> dict[str, Any]:
    """Sizes and special token ids of a two-block decoder over VOCAB, for any Llama-like config."""
    return dict(
        vocab_size=len(VOCAB),
        hidden_size=D_MODEL,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def build_model(family: str = "llama") -> torch.nn.Module:
    """A two-block model that is nearly a bigram model with strong preferences."""
    shared = dict(tiny_config_fields(), initializer_range=0.02, tie_word_embeddings=False)
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shared))
    else:
        config = Gemma3TextConfig(
            **shared, head_dim=8, sliding_window=8, final_logit_softcapping=5.0
        )
        model = Gemma3ForCausalLM(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        embedding = torch.randn(len(VOCAB), D_MODEL, generator=generator)
        signs = -torch.ones(len(VOCAB))
        signs[FORGET_IDS] = 1.0
        embedding[:, :FORGET_DIMS] = SIGNAL * signs[:, None]
        if family != "llama":
            # Gemma scales embeddings by sqrt(hidden_size); undo it so that both families see the same residual.
            embedding /= math.sqrt(D_MODEL)
        model.get_input_embeddings().weight.copy_(embedding)
        model.get_output_embeddings().weight.copy_(
            torch.randn(len(VOCAB), D_MODEL, generator=generator)
        )
    return model.eval()


def save_model(directory: Path, family: str = "llama") -> Path:
    build_model(family).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory


@torch.no_grad()
def sample_contexts(
    model: torch.nn.Module, word_ids: list[int], n_contexts: int, seed: int
) -> np.ndarray:
    """Contexts of BOS then words sampled from the model restricted to ``word_ids``."""
    generator = torch.Generator().manual_seed(seed)
    contexts = torch.full((n_contexts, CONTEXT_SIZE), BOS_ID, dtype=torch.long)
    allowed = torch.full((len(VOCAB),), -math.inf)
    allowed[word_ids] = 0.0
    for position in range(1, CONTEXT_SIZE):
        logits = model(input_ids=contexts[:, :position]).logits[:, -1].float() + allowed
        contexts[:, position] = torch.multinomial(
            torch.softmax(logits, -1), 1, generator=generator
        )[:, 0]
    return contexts.numpy().astype(np.int32)


@torch.no_grad()
def choice_log_likelihood(
    model: torch.nn.Module, prompt_ids: list[int], choice_ids: list[int]
) -> float:
    """Mean log-likelihood of the choice tokens from a full forward with full-vocabulary logits."""
    input_ids = torch.tensor([prompt_ids + choice_ids])
    log_probs = torch.log_softmax(model(input_ids=input_ids).logits[0].double(), dim=-1)
    start = len(prompt_ids)
    return float(
        np.mean([log_probs[start + k - 1, choice_ids[k]].item() for k in range(len(choice_ids))])
    )


@torch.no_grad()
def make_questions(
    model: torch.nn.Module, words: list[str], n_questions: int, seed: int, subject: str
) -> list[MCQuestion]:
    """Questions of three words with three-word choices, answered by the choice the model scores highest.

    Every sequence has the same length, so one full forward (no padding) scores all choices.
    """
    generator = np.random.default_rng(seed)
    texts = [
        (
            " ".join(generator.choice(words, size=3)),
            [" ".join(generator.choice(words, size=3)) for _ in range(4)],
        )
        for _ in range(n_questions)
    ]
    sequences = []
    for question, choices in texts:
        prompt_ids = [BOS_ID, *[token_id(w) for w in f"Question: {question} Answer:".split()]]
        sequences += [prompt_ids + [token_id(w) for w in choice.split()] for choice in choices]
    input_ids = torch.tensor(sequences)
    log_probs = torch.log_softmax(model(input_ids=input_ids).logits.double(), dim=-1)
    targets = input_ids[:, -3:]
    scores = (
        log_probs[:, -4:-1].gather(-1, targets[..., None])[..., 0].mean(-1).view(n_questions, 4)
    )
    return [
        MCQuestion(
            doc_id=f"{subject}:{index}",
            question=question,
            choices=choices,
            answer=int(scores[index].argmax()),
            subject=subject,
        )
        for index, (question, choices) in enumerate(texts)
    ]


def write_questions(path: Path, questions: list[MCQuestion]) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for question in questions:
            record = {
                "question": question.question,
                "choices": question.choices,
                "answer": question.answer,
                "subject": question.subject,
            }
            handle.write(json.dumps(record) + "\n")
    return path


def identity_sae(norm_scale: float, store_dir: Path | None = None) -> StandardSAE:
    """An SAE with f = relu([x, -x]) and x_hat = x, with unit-norm decoder rows."""
    cfg = StandardSAEConfig(
        d_in=D_MODEL,
        d_sae=2 * D_MODEL,
        norm_scale=norm_scale,
        metadata={"store": str(store_dir), "layer": LAYER, "variant": "standard"}
        if store_dir
        else {},
        activation="relu",
    )
    sae = StandardSAE(cfg)
    identity = torch.eye(D_MODEL)
    with torch.no_grad():
        sae.W_enc_DF.copy_(torch.cat([identity, -identity], dim=1))
        sae.W_dec_FD.copy_(torch.cat([identity, -identity], dim=0))
    return sae.eval()


def write_store(model: torch.nn.Module, model_dir: Path, store_dir: Path) -> Path:
    """Harvest block LAYER into a one-shard float32 store: corpus 0 forget, corpus 1 retain; odd contexts held out."""
    forget_CT = sample_contexts(model, FORGET_IDS, 8, seed=3)
    retain_CT = sample_contexts(model, RETAIN_IDS, 8, seed=4)
    contexts = np.concatenate([forget_CT, retain_CT])
    context_corpus = np.repeat(np.array([0, 1], dtype=np.uint8), 8)
    context_split = (np.arange(len(contexts)) % 2).astype(np.uint8)
    with torch.no_grad():
        acts_CTD = capture_residual(model, LAYER, torch.from_numpy(contexts).long()).float().numpy()

    keep_CT = ~np.isin(contexts, [PAD_ID, BOS_ID, EOS_ID, UNK_ID])
    context_index, positions = np.nonzero(keep_CT)
    acts_ND = acts_CTD[context_index, positions].astype(np.float32)
    split_N = context_split[context_index]
    corpus_N = context_corpus[context_index]
    train_acts = acts_ND[split_N == 0].astype(np.float64)
    norm_scale = float(np.sqrt(D_MODEL / np.mean(np.sum(train_acts**2, axis=1))))

    metadata = StoreMetadata(
        model=str(model_dir),
        layer=LAYER,
        d_model=D_MODEL,
        acts_dtype="float32",
        context_size=CONTEXT_SIZE,
        n_folds=2,
        heldout_fraction=0.5,
        corpora=[
            {"name": "wmdp-bio", "source": "wmdp.jsonl", "domain": "forget", "kind": "mcq"},
            {"name": "wiki", "source": "wiki.jsonl", "domain": "retain", "kind": "text"},
        ],
        bos_token_id=BOS_ID,
        special_token_ids=[PAD_ID, BOS_ID, EOS_ID, UNK_ID],
        config_hash="unlearning-test",
    )
    store = create_store(store_dir, metadata)
    n_tokens = len(context_index)
    store.write_shard(
        0,
        {
            "acts": acts_ND,
            "token_ids": contexts[context_index, positions].astype(np.int32),
            "doc_ids": context_index.astype(np.int64),
            "positions": positions.astype(np.int32),
            "context_index": context_index.astype(np.int32),
            "domain": corpus_N.astype(np.uint8),
            "corpus": corpus_N.astype(np.uint8),
            "fold": (context_index % 2).astype(np.uint8),
            "split": split_N.astype(np.uint8),
            "contexts": contexts,
            "context_corpus": context_corpus,
            "context_split": context_split,
        },
    )
    store.finalize(
        norm_scale,
        {
            "split": {
                "train": int((split_N == 0).sum()),
                "heldout": int(n_tokens - (split_N == 0).sum()),
            }
        },
    )
    return store_dir


@pytest.fixture(scope="session")
def tiny_model() -> torch.nn.Module:
    return build_model("llama")


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def unlearning_setup(tmp_path_factory: pytest.TempPathFactory, tiny_model: torch.nn.Module) -> dict:
    """A saved model, its store, an identity SAE in a run directory, and question files."""
    root = tmp_path_factory.mktemp("unlearning")
    model_dir = save_model(root / "model")
    store_dir = write_store(tiny_model, model_dir, root / "store")

    from stores.activations import ActivationStore

    norm_scale = ActivationStore.open(store_dir).metadata.norm_scale
    sae_dir = root / "runs" / "identity" / "sae"
    identity_sae(norm_scale, store_dir).save(sae_dir)

    wmdp = make_questions(tiny_model, FORGET_WORDS, 24, seed=5, subject="wmdp-bio")
    mmlu = []
    for offset, subject in enumerate(MMLU_SUBJECTS):
        mmlu += make_questions(tiny_model, RETAIN_WORDS, 6, seed=10 + offset, subject=subject)
    return {
        "root": root,
        "model_dir": model_dir,
        "store_dir": store_dir,
        "norm_scale": norm_scale,
        "sae_dir": sae_dir,
        "wmdp_questions": wmdp,
        "mmlu_questions": mmlu,
        "wmdp_path": write_questions(root / "wmdp.jsonl", wmdp),
        "mmlu_path": write_questions(root / "mmlu.jsonl", mmlu),
    }
