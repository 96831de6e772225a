"""Reading an experiment directory: present, missing and unreadable results, masks, cross-validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evals.report.collect import ReportInputError, collect, mask_density
from evals.report.config import ReportConfig, ReportConfigError
from tests.evals.report.conftest import (
    D_MODEL,
    D_SAE,
    build_experiment,
    crossval_output,
    write_mask,
)


def test_collect_reads_every_section(tmp_path: Path) -> None:
    experiment = build_experiment(tmp_path, crossval=crossval_output({"adaptive": [0.5, 0.6], "fixed": [0.1, 0.2]}))

    results = collect(ReportConfig(experiment_dir=str(experiment)))

    assert list(results.variants) == ["standard", "fixed", "adaptive"]
    adaptive = results.variants["adaptive"]
    for name in ("core", "unlearning", "sparse_probing", "bounds", "train_log", "pruning_log", "separation", "mask"):
        assert getattr(adaptive, name).status == "ok", name
    assert results.variants["standard"].mask.status == "missing"
    assert results.variants["standard"].pruning_log.status == "missing"
    assert results.crossval.status == "ok"


def test_crossval_folder_is_not_a_variant(tmp_path: Path) -> None:
    experiment = build_experiment(tmp_path, crossval=crossval_output({"adaptive": [0.5, 0.6]}))

    results = collect(ReportConfig(experiment_dir=str(experiment)))

    assert "crossval" not in results.variants


def test_collect_marks_missing_sections(tmp_path: Path) -> None:
    experiment = tmp_path / "exp"
    (experiment / "standard").mkdir(parents=True)
    (experiment / "standard" / "train_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')

    results = collect(ReportConfig(experiment_dir=str(experiment)))

    standard = results.variants["standard"]
    assert standard.train_log.status == "ok"
    for name in ("core", "unlearning", "sparse_probing", "bounds", "pruning_log", "separation", "mask"):
        assert getattr(standard, name).status == "missing", name
        assert getattr(standard, name).value is None
    assert results.crossval.status == "missing"


def test_collect_marks_invalid_files(tmp_path: Path) -> None:
    experiment = build_experiment(tmp_path, with_bounds=False)
    (experiment / "fixed" / "evals" / "core.json").write_text('{"eval_type_id": "core", "eval_result_metrics": {}}')
    (experiment / "adaptive" / "evals" / "unlearning.json").write_text("{not json")
    (experiment / "standard" / "evals" / "sparse_probing.json").write_text('{"eval_type_id": "core"}')
    (experiment / "adaptive" / "train_log.jsonl").write_text('{"step": 1}\n[1, 2]\n')

    results = collect(ReportConfig(experiment_dir=str(experiment)))

    fixed_core = results.variants["fixed"].core
    assert fixed_core.status == "invalid"
    assert "ValidationError" in (fixed_core.error or "")
    assert results.variants["adaptive"].unlearning.status == "invalid"
    probing = results.variants["standard"].sparse_probing
    assert probing.status == "invalid"
    assert "expected eval_type_id 'sparse_probing'" in (probing.error or "")
    train_log = results.variants["adaptive"].train_log
    assert train_log.status == "invalid"
    assert "line 2" in (train_log.error or "")


def test_collect_rejects_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ReportInputError, match="not found"):
        collect(ReportConfig(experiment_dir=str(tmp_path / "nowhere")))


def test_collect_rejects_empty_experiment(tmp_path: Path) -> None:
    (tmp_path / "exp" / "store").mkdir(parents=True)

    with pytest.raises(ReportInputError, match="no run directories"):
        collect(ReportConfig(experiment_dir=str(tmp_path / "exp")))


def test_collect_rejects_unknown_variant(tmp_path: Path) -> None:
    experiment = build_experiment(tmp_path)

    with pytest.raises(ReportInputError, match=r"\['other'\] not found"):
        collect(ReportConfig(experiment_dir=str(experiment), variants=["standard", "other"]))


def test_mask_density_matches_dense_mask(tmp_path: Path) -> None:
    dense_FD = write_mask(tmp_path, density=0.3).numpy()

    density = mask_density(tmp_path / "sae" / "masks", (4, 4))

    assert density.shape == (D_SAE, D_MODEL)
    assert density.density == pytest.approx(dense_FD.mean())
    np.testing.assert_allclose(density.row_density_F, dense_FD.mean(axis=1))
    expected_GC = dense_FD.reshape(4, D_SAE // 4, 4, D_MODEL // 4).mean(axis=(1, 3))
    np.testing.assert_allclose(density.grid_RC, expected_GC)


def test_mask_density_uneven_blocks(tmp_path: Path) -> None:
    dense_FD = write_mask(tmp_path, density=0.5).numpy()

    density = mask_density(tmp_path / "sae" / "masks", (5, 3))

    assert density.grid_RC.shape == (5, 3)
    # Block averages weighted by block size give back the overall density.
    row_edges = np.linspace(0, D_SAE, 6).round().astype(int)
    col_edges = np.linspace(0, D_MODEL, 4).round().astype(int)
    sizes = np.outer(np.diff(row_edges), np.diff(col_edges))
    assert (density.grid_RC * sizes).sum() == pytest.approx(dense_FD.sum())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"alpha": 0.7}, "invalid alpha"),
        ({"mask_grid": [0, 4]}, "invalid mask_grid"),
        ({"reference": "fixed"}, "also in baselines"),
        ({"variants": []}, "variants is empty"),
        ({"dpi": 5}, "invalid dpi"),
    ],
)
def test_config_rejects_invalid_values(fields: dict, message: str) -> None:
    with pytest.raises(ReportConfigError, match=message):
        ReportConfig(**fields)
