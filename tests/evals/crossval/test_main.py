"""The cross-validation end to end on the tiny harvested store: layout, folds, resume and scheduling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from evals.crossval import main as crossval_main
from evals.crossval.folds import question_folds
from evals.crossval.main import (
    CrossvalError,
    count_firing,
    evaluate_fold,
    fold_rates,
    plan_crossval,
    read_fold_result,
    run,
    summarize,
)
from evals.unlearning.selection import select_latents
from tests.evals.crossval.conftest import VARIANTS, small_config, write_run
from tests.evals.unlearning.conftest import identity_sae
from trainer.saes import load_sae


@pytest.fixture(scope="module")
def result(crossval_setup: dict) -> tuple[Path, dict]:
    path = run(small_config(crossval_setup, "main"))
    return path, json.loads(path.read_text())


def test_run_writes_saebench_layout(result: tuple[Path, dict], crossval_setup: dict) -> None:
    path, output = result

    assert path == crossval_setup["runs_dir"] / "main" / "evals" / "crossval.json"
    assert output["eval_type_id"] == "crossval"
    for key in (
        "eval_config",
        "eval_id",
        "datetime_epoch_millis",
        "sae_bench_commit_hash",
        "sae_cfg_dict",
    ):
        assert key in output
    assert output["eval_config"]["folds"] == 2
    assert output["eval_config"]["run_names"] == {"standard": "standard-noq", "fixed": "fixed-noq"}
    assert set(output["eval_result_metrics"]["variants"]) == set(VARIANTS)
    assert [(row["variant"], row["fold"]) for row in output["eval_result_details"]] == [
        ("standard", 0),
        ("standard", 1),
        ("fixed", 0),
        ("fixed", 1),
    ]
    for variant in VARIANTS:
        for fold in (0, 1):
            assert (
                crossval_setup["runs_dir"] / "main" / "folds" / variant / f"fold_{fold}.json"
            ).is_file()


def test_fold_questions_follow_harvest(result: tuple[Path, dict], crossval_setup: dict) -> None:
    _, output = result
    metadata = crossval_setup["store"].metadata
    folds_Q = question_folds(
        crossval_setup["n_wmdp"], metadata.fold_seed, "wmdp-bio", metadata.n_folds
    )

    for row in output["eval_result_details"]:
        assert row["wmdp_bio"]["n_questions"] == int((folds_Q == row["fold"]).sum())
    summary = output["eval_result_metrics"]["variants"]["standard"]["n_wmdp_questions"]
    assert sum(summary["values"]) == crossval_setup["n_wmdp"]


def bruteforce_rates(store, sae, fold: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Forget rates over train tokens of the other folds and retain rates over all folds, with one big encode."""
    metadata = store.metadata
    fires, corpus, folds = [], [], []
    for info in store.shards:
        arrays = store.read_shard(info.index, ["corpus", "fold", "split"])
        train = arrays["split"] == 0
        acts_ND = torch.from_numpy(store.read_acts(info.index)[train])
        with torch.no_grad():
            fires.append((sae.encode(acts_ND * metadata.norm_scale) > 0).numpy())
        corpus.append(arrays["corpus"][train])
        folds.append(arrays["fold"][train])
    fires_NF, corpus_N, folds_N = (
        np.concatenate(fires),
        np.concatenate(corpus),
        np.concatenate(folds),
    )
    forget_N = (corpus_N == metadata.corpus_index("wmdp-bio")) & (folds_N != fold)
    retain_N = corpus_N == metadata.corpus_index("wiki")
    return fires_NF[forget_N].mean(axis=0), fires_NF[retain_N].mean(axis=0), int(forget_N.sum())


def test_selection_uses_other_folds(result: tuple[Path, dict], crossval_setup: dict) -> None:
    _, output = result
    store = crossval_setup["store"]

    for row in output["eval_result_details"]:
        sae = load_sae(crossval_setup["runs_dir"] / f"{row['variant']}-noq" / "sae").eval()
        forget_F, retain_F, n_forget = bruteforce_rates(store, sae, row["fold"])

        assert row["firing_rates"]["folds"] == [1 - row["fold"]]
        assert row["firing_rates"]["n_forget_tokens"] == n_forget
        for point in row["points"]:
            expected = select_latents(
                forget_F, retain_F, point["retain_threshold"], point["n_features"]
            )
            assert point["latent_ids"] == expected.tolist(), (row["variant"], row["fold"])


def test_forget_latents_selected(result: tuple[Path, dict], crossval_setup: dict) -> None:
    _, output = result
    permutation = crossval_setup["permutation"]

    for row in output["eval_result_details"]:
        for point in row["points"]:
            ids = point["latent_ids"]
            identity_ids = ids if row["variant"] == "standard" else permutation[ids].tolist()
            # Only the forget-specific latents 0..3 of the identity SAE pass the retain threshold.
            assert set(identity_ids) <= {0, 1, 2, 3}


def test_summary_matches_fold_rows(result: tuple[Path, dict]) -> None:
    _, output = result
    for variant, summary in output["eval_result_metrics"]["variants"].items():
        rows = [row for row in output["eval_result_details"] if row["variant"] == variant]
        scores = [row["metrics"]["unlearning_score"] for row in rows]

        assert summary["unlearning_score"]["values"] == scores
        assert summary["unlearning_score"]["mean"] == pytest.approx(np.mean(scores))
        assert summary["unlearning_score"]["std"] == pytest.approx(np.std(scores, ddof=1))
        assert summary["n_folds"] == 2
        for index, point in enumerate(summary["sweep_points"]):
            accuracies = [row["points"][index]["wmdp_bio"]["accuracy"] for row in rows]
            rises = [row["points"][index]["loss_rise"]["forget"]["mean_rise"] for row in rows]
            assert point["n_features"] == rows[0]["points"][index]["n_features"]
            assert point["wmdp_bio_accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
            assert point["wmdp_bio_accuracy"]["std"] == pytest.approx(np.std(accuracies, ddof=1))
            assert point["forget_loss_rise"]["mean"] == pytest.approx(np.mean(rises))


def test_summarize_skips_missing_values() -> None:
    summary = summarize([0.2, None, 0.6])

    assert summary.mean == pytest.approx(0.4)
    assert summary.std == pytest.approx(np.std([0.2, 0.6], ddof=1))
    assert summary.n_folds == 2
    assert summary.values == [0.2, None, 0.6]
    assert summarize([0.5]).std is None
    assert summarize([None]).mean is None


def test_loss_rise_measured_per_fold(result: tuple[Path, dict]) -> None:
    _, output = result
    for row in output["eval_result_details"]:
        assert row["loss"]["n_forget_contexts"] > 0
        assert row["loss"]["n_retain_contexts"] > 0
        assert row["loss"]["n_forget_contexts"] <= 4


def counting_evaluate_fold(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    calls: list[tuple[str, int]] = []
    original = crossval_main.evaluate_fold

    def counted(job, rates):
        calls.append((job.variant, job.fold))
        return original(job, rates)

    monkeypatch.setattr(crossval_main, "evaluate_fold", counted)
    return calls


def test_resume_skips_finished_folds(crossval_setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_evaluate_fold(monkeypatch)
    cfg = small_config(crossval_setup, "resume")

    first = json.loads(run(cfg).read_text())
    assert len(calls) == 4

    calls.clear()
    again = json.loads(run(cfg).read_text())
    assert calls == []
    assert again["eval_result_details"] == first["eval_result_details"]

    (crossval_setup["runs_dir"] / "resume" / "folds" / "fixed" / "fold_1.json").unlink()
    resumed = json.loads(run(cfg).read_text())
    assert calls == [("fixed", 1)]
    assert resumed["eval_result_metrics"] == first["eval_result_metrics"]


def test_changed_settings_rejected_on_resume(
    crossval_setup: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting_evaluate_fold(monkeypatch)
    run(small_config(crossval_setup, "changed"))
    changed = small_config(crossval_setup, "changed", unlearning={"multipliers": [50.0]})

    with pytest.raises(CrossvalError, match="config hash"):
        run(changed)

    calls.clear()
    output = json.loads(
        run(
            small_config(
                crossval_setup, "changed", unlearning={"multipliers": [50.0]}, overwrite=True
            )
        ).read_text()
    )
    assert len(calls) == 4
    assert {
        point["multiplier"] for row in output["eval_result_details"] for point in row["points"]
    } == {50.0}


def comparable(row: dict) -> dict:
    return {key: value for key, value in row.items() if key != "config_hash"}


def test_dask_threads_match_sequential(crossval_setup: dict) -> None:
    cfg = small_config(crossval_setup, "threads", num_workers=2)
    output = json.loads(run(cfg).read_text())

    plan = plan_crossval(cfg)
    sequential = []
    for job in plan.jobs:
        rates = fold_rates(job, count_firing(job))
        sequential.append(evaluate_fold(job, rates).model_dump(mode="json"))

    assert len(sequential) == len(output["eval_result_details"])
    for expected, row in zip(sequential, output["eval_result_details"], strict=True):
        assert comparable(row) == comparable(expected)


def test_distributed_cluster_matches_local(crossval_setup: dict, result: tuple[Path, dict]) -> None:
    from distributed import LocalCluster

    _, local = result
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        path = run(
            small_config(crossval_setup, "cluster", scheduler_address=cluster.scheduler_address)
        )
    output = json.loads(path.read_text())

    for expected, row in zip(
        local["eval_result_details"], output["eval_result_details"], strict=True
    ):
        assert comparable(row) == comparable(expected)


def test_partial_folds(crossval_setup: dict) -> None:
    output = json.loads(
        run(small_config(crossval_setup, "partial", folds=1, variants=["standard"])).read_text()
    )

    assert [row["fold"] for row in output["eval_result_details"]] == [0]
    assert output["eval_result_details"][0]["firing_rates"]["folds"] == [1]
    assert output["eval_result_metrics"]["variants"]["standard"]["unlearning_score"]["std"] is None


def test_folds_larger_than_store_rejected(crossval_setup: dict) -> None:
    with pytest.raises(CrossvalError, match=r"folds 3 is larger than the store's n_folds 2"):
        run(small_config(crossval_setup, "too-many", folds=3))


def test_missing_run_rejected(crossval_setup: dict) -> None:
    with pytest.raises(CrossvalError, match="no SAE at .*adaptive-noq"):
        run(small_config(crossval_setup, "missing", variants=["adaptive"]))


def test_run_trained_on_questions_rejected(crossval_setup: dict) -> None:
    store = crossval_setup["store"]
    runs_dir = crossval_setup["runs_dir"]
    write_run(runs_dir, "standard-all", identity_sae(store.metadata.norm_scale, store.path), None)
    try:
        cfg = small_config(
            crossval_setup, "all", variants=["standard"], run_names={"standard": "standard-all"}
        )
        with pytest.raises(CrossvalError, match="trained on corpus wmdp-bio"):
            plan_crossval(cfg)

        allowed = small_config(
            crossval_setup,
            "all",
            variants=["standard"],
            run_names={"standard": "standard-all"},
            allow_trained_on_questions=True,
        )
        assert len(plan_crossval(allowed).jobs) == 2
    finally:
        shutil.rmtree(runs_dir / "standard-all")


def test_cache_rates_need_cache(crossval_setup: dict) -> None:
    with pytest.raises(ValueError, match="no correlation cache"):
        run(small_config(crossval_setup, "cache", variants=["standard"], firing_rates="cache"))
    assert not (
        crossval_setup["runs_dir"] / "cache" / "folds" / "standard" / "fold_0.json"
    ).exists()


def test_read_fold_result_rejects_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "fold_0.json"
    path.write_text("{")
    with pytest.raises(CrossvalError, match="delete the file"):
        read_fold_result(path)
