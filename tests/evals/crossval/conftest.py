"""A harvested two-fold store of the unlearning tests' tiny model, with identity SAEs as two variants.

The unlearning tests' model puts forget words and every other token on opposite signs
of the first FORGET_DIMS residual coordinates, so an identity SAE's latents
0..FORGET_DIMS-1 fire on forget words only. The store is written by the real harvest,
so the folds of the WMDP-bio questions are the harvest's own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from evals.crossval.config import CrossvalConfig
from evals.crossval.main import clear_process_caches
from pipeline.config import HarvestConfig
from pipeline.data import CorpusSpec
from pipeline.harvest import run_harvest
from pipeline.models import ModelConfig
from tests.evals.unlearning.conftest import (
    D_MODEL,
    FORGET_WORDS,
    LAYER,
    MMLU_SUBJECTS,
    RETAIN_WORDS,
    identity_sae,
    make_questions,
    save_model,
    tiny_model,
    write_questions,
)
from trainer.saes import StandardSAE

__all__ = ["tiny_model"]

VARIANTS = ["standard", "fixed"]
N_WMDP_QUESTIONS = 40


def permuted_identity_sae(
    norm_scale: float, store_dir: Path, permutation: np.ndarray
) -> StandardSAE:
    """The identity SAE with its latents reordered: latent ``j`` is the identity SAE's latent ``permutation[j]``."""
    sae = identity_sae(norm_scale, store_dir)
    index = torch.from_numpy(permutation)
    with torch.no_grad():
        sae.W_enc_DF.copy_(sae.W_enc_DF[:, index].clone())
        sae.b_enc_F.copy_(sae.b_enc_F[index].clone())
        sae.W_dec_FD.copy_(sae.W_dec_FD[index].clone())
    sae.cfg.metadata["variant"] = "fixed"
    return sae


def write_run(
    runs_dir: Path, run_name: str, sae: StandardSAE, train_corpora: list[str] | None
) -> Path:
    """Save an SAE as ``<runs_dir>/<run_name>/sae`` with the training config that names its corpora."""
    run_dir = runs_dir / run_name
    sae.save(run_dir / "sae")
    (run_dir / "config.json").write_text(
        json.dumps({"train_corpora": train_corpora, "domains": None})
    )
    return run_dir


@pytest.fixture(scope="session")
def crossval_setup(tmp_path_factory: pytest.TempPathFactory, tiny_model: torch.nn.Module) -> dict:
    """Model, question files, a harvested store with two folds, and runs standard-noq and fixed-noq."""
    root = tmp_path_factory.mktemp("crossval")
    model_dir = save_model(root / "model")

    wmdp = make_questions(tiny_model, FORGET_WORDS, N_WMDP_QUESTIONS, seed=5, subject="wmdp-bio")
    mmlu = []
    for offset, subject in enumerate(MMLU_SUBJECTS):
        mmlu += make_questions(tiny_model, RETAIN_WORDS, 6, seed=10 + offset, subject=subject)
    wmdp_path = write_questions(root / "wmdp.jsonl", wmdp)
    mmlu_path = write_questions(root / "mmlu.jsonl", mmlu)
    generator = np.random.default_rng(7)
    wiki_path = root / "wiki.jsonl"
    wiki_path.write_text(
        "".join(
            json.dumps({"text": " ".join(generator.choice(RETAIN_WORDS, size=12))}) + "\n"
            for _ in range(30)
        )
    )

    harvest = HarvestConfig(
        model=ModelConfig(name=str(model_dir), layer=LAYER, dtype="float32", device="cpu"),
        store=str(root / "store"),
        corpora=[
            CorpusSpec(name="wmdp-bio", kind="mcq", domain="forget", local=str(wmdp_path)),
            CorpusSpec(name="wiki", kind="text", domain="retain", local=str(wiki_path)),
        ],
        context_size=16,
        batch_size=8,
        shard_contexts=8,
        n_folds=2,
        heldout_fraction=0.3,
    )
    store = run_harvest(harvest)
    norm_scale = float(store.metadata.norm_scale)

    runs_dir = root / "runs"
    permutation = np.random.default_rng(3).permutation(2 * D_MODEL)
    write_run(runs_dir, "standard-noq", identity_sae(norm_scale, store.path), ["wiki"])
    write_run(
        runs_dir, "fixed-noq", permuted_identity_sae(norm_scale, store.path, permutation), ["wiki"]
    )
    return {
        "root": root,
        "model_dir": model_dir,
        "store": store,
        "runs_dir": runs_dir,
        "permutation": permutation,
        "wmdp_path": wmdp_path,
        "mmlu_path": mmlu_path,
        "n_wmdp": N_WMDP_QUESTIONS,
    }


def small_config(setup: dict, name: str, **overrides) -> CrossvalConfig:
    """A two-variant cross-validation with a two-point sweep on the tiny setting."""
    unlearning = dict(
        device="cpu",
        wmdp_source=str(setup["wmdp_path"]),
        wmdp_hub=None,
        mmlu_source=str(setup["mmlu_path"]),
        mmlu_hub=None,
        retain_thresholds=[0.01],
        n_features_list=[2, 8],
        multipliers=[100.0],
        max_questions=None,
        n_loss_contexts=4,
        mcq_batch_size=128,
    )
    unlearning.update(overrides.pop("unlearning", {}))
    fields = dict(
        variants=list(VARIANTS),
        runs_dir=str(setup["runs_dir"]),
        name=name,
        unlearning=unlearning,
    )
    return CrossvalConfig(**{**fields, **overrides})


@pytest.fixture(autouse=True)
def fresh_process_caches():
    """Each test loads its own SAEs and model, so a test never reuses another test's state."""
    clear_process_caches()
    yield
    clear_process_caches()
