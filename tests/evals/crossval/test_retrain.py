"""Mode ``retrain``: one SAE per fold trained without that fold, then the stats-mode evaluation."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from evals.crossval import main as crossval_main
from evals.crossval import retrain as crossval_retrain
from evals.crossval.main import CrossvalError, plan_crossval, run
from evals.crossval.retrain import (
    RetrainError,
    fold_train_config,
    load_run_config,
    train_fold_sae,
)
from evals.unlearning.selection import select_latents
from stores.activations import ActivationStore, StoreMetadata, create_store
from tests.evals.crossval.conftest import small_config
from tests.evals.crossval.test_main import bruteforce_rates
from trainer import train as trainer_train
from trainer.config import TrainConfig
from trainer.saes import load_sae

D_MODEL = 16
#: The coordinate that only fold 0's tokens use.
FOLD0_DIM = D_MODEL - 1
FOLD0_VALUE = 8.0


def tiny_train_config(store: str | Path, runs_dir: Path, run_name: str, **overrides) -> TrainConfig:
    """A run of a few seconds: 20 steps of 32 tokens, a checkpoint every 10 steps."""
    values = dict(
        store=str(store),
        run_name=run_name,
        runs_dir=str(runs_dir),
        d_sae=64,
        batch_size=32,
        total_tokens=32 * 20,
        l1_coefficient=0.05,
        l1_warmup_steps=0,
        lr=3e-3,
        lr_warmup_steps=0,
        lr_decay_steps=0,
        checkpoint_every=10,
        log_every=10,
        dead_window=1000,
        shuffle_buffer_shards=2,
        progress_bar=False,
    )
    return TrainConfig(**{**values, **overrides})


def write_base_run(cfg: TrainConfig) -> Path:
    """Write only the run's config.json, which is all mode retrain reads of the run."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    return cfg.run_dir


def fold_marked_store(path: Path) -> ActivationStore:
    """A two-fold store in which only fold 0's tokens have a non-zero coordinate FOLD0_DIM."""
    metadata = StoreMetadata(
        model="synthetic",
        layer=0,
        d_model=D_MODEL,
        acts_dtype="float32",
        context_size=8,
        n_folds=2,
        corpora=[
            {"name": "bio", "source": "synthetic", "domain": "forget", "kind": "text"},
            {"name": "wiki", "source": "synthetic", "domain": "retain", "kind": "text"},
        ],
        config_hash="fold-marked",
    )
    store = create_store(path, metadata)
    generator = np.random.default_rng(0)
    sum_squares, n_train, n_rows = 0.0, 0, 128
    for index in range(2):
        doc_ids = index * n_rows // 4 + np.arange(n_rows) // 4
        fold = (doc_ids % 2).astype(np.uint8)
        acts = generator.normal(size=(n_rows, D_MODEL)).astype(np.float32)
        acts[:, FOLD0_DIM] = np.where(fold == 0, FOLD0_VALUE, 0.0)
        corpus = (np.arange(n_rows) % 2).astype(np.uint8)
        store.write_shard(
            index,
            {
                "acts": acts,
                "token_ids": generator.integers(0, 256, size=n_rows).astype(np.int32),
                "doc_ids": doc_ids.astype(np.int64),
                "positions": (np.arange(n_rows) % 8).astype(np.int32),
                "context_index": (np.arange(n_rows) // 8).astype(np.int32),
                "domain": corpus.copy(),
                "corpus": corpus,
                "fold": fold,
                "split": np.zeros(n_rows, dtype=np.uint8),
                "contexts": generator.integers(0, 256, size=(n_rows // 8, 8)).astype(np.int32),
                "context_corpus": np.zeros(n_rows // 8, dtype=np.uint8),
                "context_split": np.zeros(n_rows // 8, dtype=np.uint8),
            },
        )
        sum_squares += float((acts.astype(np.float64) ** 2).sum())
        n_train += n_rows
    store.finalize(float(np.sqrt(D_MODEL * n_train / sum_squares)), {"split": {"train": n_train}})
    return ActivationStore.open(path)


def recording_train_steps(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict]:
    """Record, per run name, the folds of every training batch and the largest |x| on FOLD0_DIM."""
    seen: dict[str, dict] = {}
    original = trainer_train._train_step

    def recorded(step, cfg, sae, optimizer, hook, batch, window):
        record = seen.setdefault(cfg.run_name, {"folds": set(), "max_fold0_dim": 0.0})
        record["folds"].update(batch.fold_B.tolist())
        record["max_fold0_dim"] = max(
            record["max_fold0_dim"], float(batch.x_BD[:, FOLD0_DIM].abs().max())
        )
        return original(step, cfg, sae, optimizer, hook, batch, window)

    monkeypatch.setattr(trainer_train, "_train_step", recorded)
    return seen


def test_fold_sae_never_sees_its_fold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = fold_marked_store(tmp_path / "store")
    base = tiny_train_config(store.path, tmp_path / "runs", "standard-noq")
    seen = recording_train_steps(monkeypatch)

    for fold in (0, 1):
        cfg = fold_train_config(
            base,
            run_name="standard-noq",
            fold=fold,
            runs_dir=str(tmp_path / "runs"),
            store=str(store.path),
        )
        sae_dir, trained = train_fold_sae(cfg, overwrite=False)
        assert trained
        stored = json.loads((cfg.run_dir / "config.json").read_text())
        assert stored["exclude_folds"] == [fold]
        assert stored["run_name"] == f"standard-noq-fold{fold}"
        assert (sae_dir / "sae.safetensors").is_file()

    assert seen["standard-noq-fold0"]["folds"] == {1}
    assert seen["standard-noq-fold1"]["folds"] == {0}
    # Only fold 0's tokens have a non-zero coordinate FOLD0_DIM, so its value in the
    # batches shows which SAE saw them, independently of the fold labels.
    assert seen["standard-noq-fold0"]["max_fold0_dim"] == 0.0
    assert seen["standard-noq-fold1"]["max_fold0_dim"] > 1.0


def test_finished_fold_run_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = fold_marked_store(tmp_path / "store")
    base = tiny_train_config(store.path, tmp_path / "runs", "standard-noq")
    cfg = fold_train_config(
        base,
        run_name="standard-noq",
        fold=1,
        runs_dir=str(tmp_path / "runs"),
        store=str(store.path),
    )
    train_fold_sae(cfg, overwrite=False)
    weights = (cfg.run_dir / "sae" / "sae.safetensors").read_bytes()
    seen = recording_train_steps(monkeypatch)

    sae_dir, trained = train_fold_sae(cfg, overwrite=False)

    assert not trained
    assert seen == {}
    assert (sae_dir / "sae.safetensors").read_bytes() == weights


def test_changed_fold_run_rejected(tmp_path: Path) -> None:
    store = fold_marked_store(tmp_path / "store")
    runs_dir = tmp_path / "runs"
    base = tiny_train_config(store.path, runs_dir, "standard-noq")
    cfg = fold_train_config(
        base, run_name="standard-noq", fold=0, runs_dir=str(runs_dir), store=str(store.path)
    )
    train_fold_sae(cfg, overwrite=False)
    changed = fold_train_config(
        tiny_train_config(store.path, runs_dir, "standard-noq", lr=1e-3),
        run_name="standard-noq",
        fold=0,
        runs_dir=str(runs_dir),
        store=str(store.path),
    )

    with pytest.raises(RetrainError, match=r"lr: 0.003 -> 0.001.*overwrite=true"):
        train_fold_sae(changed, overwrite=False)

    _, trained = train_fold_sae(changed, overwrite=True)
    assert trained
    assert load_run_config(changed.run_dir).lr == 1e-3


def test_fold_config_rejects_heldout_split(tmp_path: Path) -> None:
    base = tiny_train_config(tmp_path / "store", tmp_path / "runs", "standard-noq", split="heldout")
    with pytest.raises(RetrainError, match="split 'heldout'"):
        fold_train_config(base, run_name="standard-noq", fold=0, runs_dir="runs", store="store")


def test_missing_run_config_rejected(tmp_path: Path) -> None:
    with pytest.raises(RetrainError, match="needs the training config .*config.json"):
        load_run_config(tmp_path / "standard-noq")


# End to end on the harvested store


def retrain_config(setup: dict, runs_dir: Path, name: str, **overrides):
    return small_config(
        setup, name, mode="retrain", variants=["standard"], runs_dir=str(runs_dir), **overrides
    )


@pytest.fixture(scope="module")
def retrain_runs(crossval_setup: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runs directory whose standard-noq run is only a config.json, trained without wmdp-bio."""
    runs_dir = tmp_path_factory.mktemp("retrain-runs")
    write_base_run(
        tiny_train_config(
            crossval_setup["store"].path, runs_dir, "standard-noq", train_corpora=["wiki"]
        )
    )
    return runs_dir


@pytest.fixture(scope="module")
def retrain_result(crossval_setup: dict, retrain_runs: Path) -> dict:
    return json.loads(run(retrain_config(crossval_setup, retrain_runs, "retrain")).read_text())


def test_retrain_trains_one_sae_per_fold(retrain_result: dict, retrain_runs: Path) -> None:
    for fold in (0, 1):
        run_dir = retrain_runs / f"standard-noq-fold{fold}"
        stored = json.loads((run_dir / "config.json").read_text())
        assert stored["exclude_folds"] == [fold]
        assert stored["train_corpora"] == ["wiki"]
        assert (run_dir / "sae" / "sae.safetensors").is_file()

    weights = [
        load_sae(retrain_runs / f"standard-noq-fold{fold}" / "sae").W_enc_DF for fold in (0, 1)
    ]
    assert not torch.equal(weights[0], weights[1])
    assert not (retrain_runs / "standard-noq" / "sae").exists()


def test_retrain_rows_record_fold_saes(retrain_result: dict, retrain_runs: Path) -> None:
    rows = retrain_result["eval_result_details"]

    assert [row["fold"] for row in rows] == [0, 1]
    for row in rows:
        assert row["mode"] == "retrain"
        assert row["run_name"] == f"standard-noq-fold{row['fold']}"
        assert row["sae_path"] == str(retrain_runs / f"standard-noq-fold{row['fold']}" / "sae")
    assert retrain_result["eval_config"]["mode"] == "retrain"
    assert retrain_result["eval_config"]["fold_run_names"] == {
        "standard": ["standard-noq-fold0", "standard-noq-fold1"]
    }
    assert set(retrain_result["sae_cfg_dict"]) == {"standard/fold_0", "standard/fold_1"}


def test_retrain_selects_with_fold_sae(retrain_result: dict, crossval_setup: dict) -> None:
    store = crossval_setup["store"]
    for row in retrain_result["eval_result_details"]:
        sae = load_sae(row["sae_path"]).eval()
        forget_F, retain_F, n_forget = bruteforce_rates(store, sae, row["fold"])

        assert row["firing_rates"]["folds"] == [1 - row["fold"]]
        assert row["firing_rates"]["n_forget_tokens"] == n_forget
        for point in row["points"]:
            expected = select_latents(
                forget_F, retain_F, point["retain_threshold"], point["n_features"]
            )
            assert point["latent_ids"] == expected.tolist(), row["fold"]


def test_retrain_summary_matches_rows(retrain_result: dict) -> None:
    summary = retrain_result["eval_result_metrics"]["variants"]["standard"]
    scores = [row["metrics"]["unlearning_score"] for row in retrain_result["eval_result_details"]]

    assert summary["n_folds"] == 2
    assert summary["unlearning_score"]["values"] == scores
    assert summary["run_name"] == "standard-noq"
    assert "exclude_folds=[k]" in retrain_result["eval_result_unstructured"]["method"]


class CallLog:
    """Trainings and fold evaluations of one run, recorded through monkeypatched functions."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_fold: int | None = None) -> None:
        self.trained: list[tuple[str, bool]] = []
        self.evaluated: list[int] = []
        self.lock = threading.Lock()
        original_train = crossval_retrain.train
        original_evaluate = crossval_main.evaluate_fold

        def train(cfg, resume=False):
            with self.lock:
                self.trained.append((cfg.run_name, resume))
            return original_train(cfg, resume=resume)

        def evaluate_fold(job, rates):
            if job.fold == fail_fold:
                # Fail only after the other fold's result is written, so that the
                # interrupted run leaves exactly one finished fold behind.
                other = Path(job.result_path).with_name(f"fold_{1 - job.fold}.json")
                deadline = time.monotonic() + 60
                while not other.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                raise RuntimeError(f"interrupted on fold {job.fold}")
            with self.lock:
                self.evaluated.append(job.fold)
            return original_evaluate(job, rates)

        monkeypatch.setattr(crossval_retrain, "train", train)
        monkeypatch.setattr(crossval_main, "evaluate_fold", evaluate_fold)


def test_interrupted_retrain_resumes(
    crossval_setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs_dir = tmp_path / "runs"
    write_base_run(
        tiny_train_config(
            crossval_setup["store"].path, runs_dir, "standard-noq", train_corpora=["wiki"]
        )
    )
    cfg = retrain_config(crossval_setup, runs_dir, "resume", num_workers=2)

    with monkeypatch.context() as patch:
        interrupted = CallLog(patch, fail_fold=1)
        with pytest.raises(RuntimeError, match="interrupted on fold 1"):
            run(cfg)
    assert interrupted.evaluated == [0]
    assert sorted(name for name, _ in interrupted.trained) == [
        "standard-noq-fold0",
        "standard-noq-fold1",
    ]
    folds_dir = runs_dir / "resume" / "folds" / "standard"
    assert (folds_dir / "fold_0.json").is_file()
    assert not (folds_dir / "fold_1.json").exists()

    # Fold 1's SAE is finished, so only its evaluation runs again.
    resumed = CallLog(monkeypatch)
    output = json.loads(run(cfg).read_text())
    assert resumed.evaluated == [1]
    assert resumed.trained == []
    assert [row["fold"] for row in output["eval_result_details"]] == [0, 1]

    # A fold run interrupted after its last checkpoint resumes from it, to the same weights.
    fold_run = runs_dir / "standard-noq-fold1"
    weights = (fold_run / "sae" / "sae.safetensors").read_bytes()
    shutil.rmtree(fold_run / "sae")
    (folds_dir / "fold_1.json").unlink()
    resumed = CallLog(monkeypatch)
    again = json.loads(run(cfg).read_text())
    assert resumed.trained == [("standard-noq-fold1", True)]
    assert resumed.evaluated == [1]
    assert (fold_run / "sae" / "sae.safetensors").read_bytes() == weights
    assert again["eval_result_details"] == output["eval_result_details"]


def test_retrain_needs_run_config(crossval_setup: dict, tmp_path: Path) -> None:
    with pytest.raises(
        CrossvalError, match="variant standard: mode 'retrain' needs the training config"
    ):
        plan_crossval(retrain_config(crossval_setup, tmp_path / "runs", "missing"))


def test_retrain_rejects_run_with_questions(crossval_setup: dict, tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    write_base_run(tiny_train_config(crossval_setup["store"].path, runs_dir, "standard-noq"))

    with pytest.raises(CrossvalError, match="trained on corpus wmdp-bio"):
        plan_crossval(retrain_config(crossval_setup, runs_dir, "questions"))

    plan = plan_crossval(
        retrain_config(crossval_setup, runs_dir, "questions", allow_trained_on_questions=True)
    )
    assert [job.train_config.exclude_folds for job in plan.jobs] == [[0], [1]]
