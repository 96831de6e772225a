"""The Pareto plot of one or several unlearning results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.unlearning.plot import _series, main, plot_pareto


def accuracy(value: float | None, n: int = 20) -> dict:
    if value is None:
        return {"n": 0, "n_correct": 0, "accuracy": None, "ci_low": None, "ci_high": None}
    return {
        "n": n,
        "n_correct": int(value * n),
        "accuracy": value,
        "ci_low": value - 0.1,
        "ci_high": min(1.0, value + 0.1),
    }


def write_result(path: Path, variant: str, points: list[tuple[float | None, float]]) -> Path:
    result = {
        "eval_type_id": "unlearning",
        "eval_config": {"mmlu_threshold": 0.99},
        "eval_result_metrics": {"unlearning": {"unlearning_score": 0.4}},
        "eval_result_details": [
            {"wmdp_bio": accuracy(wmdp), "mmlu": accuracy(mmlu)} for wmdp, mmlu in points
        ],
        "sae_cfg_dict": {"variant": variant},
    }
    path.write_text(json.dumps(result))
    return path


def test_series_skips_empty_sets(tmp_path: Path) -> None:
    result = json.loads(
        write_result(tmp_path / "a.json", "standard", [(0.5, 1.0), (None, 0.9)]).read_text()
    )

    columns = _series(result)

    assert columns["x"] == [1.0]
    assert columns["y"] == [0.5]
    assert columns["y_low"] == [pytest.approx(0.1)]


def test_plot_several_variants(tmp_path: Path) -> None:
    standard = write_result(tmp_path / "standard.json", "standard", [(0.6, 1.0), (0.3, 0.95)])
    adaptive = write_result(tmp_path / "adaptive.json", "adaptive", [(0.2, 1.0)])

    path = plot_pareto([standard, adaptive], tmp_path / "plots" / "pareto.png")

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [entry for entry in path.parent.iterdir() if entry.name.startswith(".")]


def test_plot_command_line(tmp_path: Path) -> None:
    result = write_result(tmp_path / "standard.json", "standard", [(0.6, 1.0)])

    main([str(tmp_path / "out.png"), str(result)])

    assert (tmp_path / "out.png").stat().st_size > 0


def test_plot_rejects_other_evals(tmp_path: Path) -> None:
    path = tmp_path / "core.json"
    path.write_text(json.dumps({"eval_type_id": "core"}))

    with pytest.raises(ValueError, match="not an unlearning result"):
        plot_pareto([path], tmp_path / "out.png")
