"""A tiny saved model, labelled text sets with separable classes, and SAEs for the sparse probing tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from tests.evals.core.conftest import D_MODEL, LAYER, save_model
from trainer.saes import StandardSAE, StandardSAEConfig

NORM_SCALE = 0.7
N_CLASSES = 3
WORDS_PER_CLASS = 4
#: Words w90..w123 appear in every class, so each text mixes class words with shared ones.
SHARED_WORDS = list(range(90, 124))


def class_text(label: int, n_words: int, rng: np.random.Generator) -> str:
    """A text whose words are class-specific (``w{4 * label}`` to ``w{4 * label + 3}``) with probability 0.8, else shared.

    A random model at initializer_range 0.5 mixes tokens strongly, so the classes need
    this much signal for probes on its residual stream to reach high accuracy.
    """
    own = rng.integers(label * WORDS_PER_CLASS, (label + 1) * WORDS_PER_CLASS, size=n_words)
    shared = rng.choice(SHARED_WORDS, size=n_words)
    use_own = rng.random(n_words) < 0.8
    return " ".join(f"w{word}" for word in np.where(use_own, own, shared))


def write_labelled_jsonl(
    path: Path,
    texts_per_class: dict[int, int],
    seed: int = 0,
    min_words: int = 3,
    max_words: int = 9,
    label_field: str = "label",
) -> Path:
    """Write ``{"text", label_field}`` records, ``texts_per_class[label]`` for each label, interleaved."""
    rng = np.random.default_rng(seed)
    records = []
    for label, count in texts_per_class.items():
        for _ in range(count):
            n_words = int(rng.integers(min_words, max_words + 1))
            records.append({"text": class_text(label, n_words, rng), label_field: label})
    order = rng.permutation(len(records))
    path.write_text("".join(json.dumps(records[i]) + "\n" for i in order), encoding="utf-8")
    return path


def save_sae(directory: Path, model_dir: Path, kind: str) -> Path:
    """Save an SAE that is an exact identity ("identity"), all zero ("zero") or constant ("constant").

    The identity SAE has ``W_enc = [I, -I]``, so its latents ``relu([x, -x])`` keep every
    bit of the input. The constant SAE has a zero encoder and a positive bias, so every
    latent fires with the same value on every token.
    """
    cfg = StandardSAEConfig(
        d_in=D_MODEL,
        d_sae=2 * D_MODEL,
        norm_scale=NORM_SCALE,
        metadata={"model": str(model_dir), "layer": LAYER, "variant": "standard"},
        activation="relu",
    )
    sae = StandardSAE(cfg)
    identity = torch.eye(D_MODEL)
    with torch.no_grad():
        sae.W_dec_FD.copy_(torch.cat([identity, -identity], dim=0))
        if kind == "identity":
            sae.W_enc_DF.copy_(torch.cat([identity, -identity], dim=1))
        elif kind == "constant":
            sae.b_enc_F.fill_(0.5)
        elif kind != "zero":
            raise ValueError(f"unknown SAE kind {kind!r}")
    sae.save(directory)
    return directory


@pytest.fixture(scope="session")
def probing_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved tiny Llama, a separable 3-class JSONL set and identity, zero and constant SAEs."""
    root = tmp_path_factory.mktemp("sparse-probing")
    model_dir = save_model("llama", root / "model")
    return {
        "root": root,
        "model_dir": model_dir,
        "dataset": write_labelled_jsonl(
            root / "separable.jsonl", {label: 60 for label in range(N_CLASSES)}
        ),
        "identity_sae": save_sae(root / "runs" / "identity" / "sae", model_dir, "identity"),
        "zero_sae": save_sae(root / "runs" / "zero" / "sae", model_dir, "zero"),
        "constant_sae": save_sae(root / "runs" / "constant" / "sae", model_dir, "constant"),
    }
