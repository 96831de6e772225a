"""Tiny models, activation stores and SAEs for the core eval tests, all built offline."""

from __future__ import annotations

import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from pipeline.models import capture_residual
from stores.activations import StoreMetadata, create_store, float32_to_bfloat16_bits
from trainer.saes import StandardSAE, StandardSAEConfig

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
VOCAB_SIZE = 128
D_MODEL = 32
LAYER = 1
CONTEXT_SIZE = 16


def build_tokenizer() -> PreTrainedTokenizerFast:
    words = [f"w{i}" for i in range(VOCAB_SIZE - len(SPECIAL_TOKENS))]
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def build_model(family: str) -> torch.nn.Module:
    shared = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=D_MODEL,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        # Large weights make the model confident, so the data it samples is far from uniform.
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**shared)).eval()
    # Soft-capping is on so that the chunked LM head must reproduce it.
    config = Gemma3TextConfig(**shared, head_dim=8, sliding_window=8, final_logit_softcapping=5.0)
    return Gemma3ForCausalLM(config).eval()


def save_model(family: str, directory: Path) -> Path:
    build_model(family).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory


def build_contexts(n_contexts: int, seed: int) -> np.ndarray:
    """Random contexts that start with BOS and hold one EOS in the middle."""
    generator = np.random.default_rng(seed)
    contexts = generator.integers(
        len(SPECIAL_TOKENS), VOCAB_SIZE, size=(n_contexts, CONTEXT_SIZE), dtype=np.int32
    )
    contexts[:, 0] = BOS_ID
    contexts[:, CONTEXT_SIZE // 2] = EOS_ID
    return contexts


@torch.no_grad()
def sample_contexts(model: torch.nn.Module, n_contexts: int, seed: int) -> np.ndarray:
    """Contexts sampled from the model itself, so that it predicts them far better than chance.

    A random model predicts random tokens worse than a uniform guess, so zero ablation
    would lower the loss. On the model's own samples ablation raises it, as in a real model.
    """
    generator = torch.Generator().manual_seed(seed)
    contexts = torch.from_numpy(build_contexts(n_contexts, seed)).long()
    for position in range(1, CONTEXT_SIZE):
        if position == CONTEXT_SIZE // 2:
            continue
        logits = model(input_ids=contexts[:, :position]).logits[:, -1].float()
        logits[:, : len(SPECIAL_TOKENS)] = -math.inf
        contexts[:, position] = torch.multinomial(
            torch.softmax(logits, dim=-1), 1, generator=generator
        ).squeeze(-1)
    return contexts.numpy().astype(np.int32)


def write_store(model_dir: Path, store_dir: Path, acts_dtype: str = "bfloat16") -> Path:
    """Harvest layer LAYER of the saved model into a one-shard store; every other context is held out."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    contexts = sample_contexts(model, 12, seed=3)
    context_split = (np.arange(len(contexts)) % 2).astype(np.uint8)
    with torch.no_grad():
        acts_CTD = capture_residual(model, LAYER, torch.from_numpy(contexts).long()).float().numpy()

    keep_CT = ~np.isin(contexts, [PAD_ID, BOS_ID, EOS_ID, UNK_ID])
    context_index, positions = np.nonzero(keep_CT)
    acts_ND = acts_CTD[context_index, positions]
    split_N = context_split[context_index]
    train_acts = acts_ND[split_N == 0].astype(np.float64)
    norm_scale = float(np.sqrt(D_MODEL / np.mean(np.sum(train_acts**2, axis=1))))

    stored_acts = (
        float32_to_bfloat16_bits(acts_ND)
        if acts_dtype == "bfloat16"
        else acts_ND.astype(np.float32)
    )
    n_tokens = len(context_index)
    metadata = StoreMetadata(
        model=str(model_dir),
        layer=LAYER,
        d_model=D_MODEL,
        acts_dtype=acts_dtype,
        context_size=CONTEXT_SIZE,
        n_folds=2,
        corpora=[{"name": "random", "source": "test", "domain": "retain", "kind": "text"}],
        bos_token_id=BOS_ID,
        special_token_ids=[PAD_ID, BOS_ID, EOS_ID, UNK_ID],
        config_hash="core-eval-test",
    )
    store = create_store(store_dir, metadata)
    store.write_shard(
        0,
        {
            "acts": stored_acts,
            "token_ids": contexts[context_index, positions].astype(np.int32),
            "doc_ids": context_index.astype(np.int64),
            "positions": positions.astype(np.int32),
            "context_index": context_index.astype(np.int32),
            "domain": np.ones(n_tokens, dtype=np.uint8),
            "corpus": np.zeros(n_tokens, dtype=np.uint8),
            "fold": (context_index % 2).astype(np.uint8),
            "split": split_N.astype(np.uint8),
            "contexts": contexts,
            "context_corpus": np.zeros(len(contexts), dtype=np.uint8),
            "context_split": context_split,
        },
    )
    counts = {"split": {"train": int((split_N == 0).sum()), "heldout": int((split_N == 1).sum())}}
    store.finalize(norm_scale, counts)
    return store_dir


def save_sae(
    directory: Path,
    store_dir: Path,
    norm_scale: float,
    kind: str,
    d_in: int = D_MODEL,
    layer: int = LAYER,
) -> Path:
    """Save an SAE whose weights make it an exact identity (``kind="identity"``) or output zero (``"zero"``)."""
    cfg = StandardSAEConfig(
        d_in=d_in,
        d_sae=2 * d_in,
        norm_scale=norm_scale,
        metadata={"store": str(store_dir), "layer": layer},
        activation="relu",
    )
    sae = StandardSAE(cfg)
    if kind == "identity":
        # f = relu([x, -x]) and x_hat = relu(x) - relu(-x) = x, with unit-norm decoder rows.
        identity = torch.eye(d_in)
        with torch.no_grad():
            sae.W_enc_DF.copy_(torch.cat([identity, -identity], dim=1))
            sae.W_dec_FD.copy_(torch.cat([identity, -identity], dim=0))
    elif kind != "zero":
        raise ValueError(f"unknown SAE kind {kind!r}")
    sae.save(directory)
    return directory


@pytest.fixture(scope="session", params=["llama", "gemma3"])
def model_family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_setup(model_family: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A saved tiny model, a store harvested from it, and identity and zero SAEs in run directories."""
    root = tmp_path_factory.mktemp(f"core-{model_family}")
    model_dir = save_model(model_family, root / "model")
    store_dir = write_store(model_dir, root / "store")

    from stores.activations import ActivationStore

    norm_scale = ActivationStore.open(store_dir).metadata.norm_scale
    identity_dir = save_sae(root / "runs" / "identity" / "sae", store_dir, norm_scale, "identity")
    zero_dir = save_sae(root / "runs" / "zero" / "sae", store_dir, norm_scale, "zero")
    return {
        "root": root,
        "model_dir": model_dir,
        "store_dir": store_dir,
        "norm_scale": norm_scale,
        "identity_sae": identity_dir,
        "zero_sae": zero_dir,
    }
