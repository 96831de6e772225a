"""The report files: HTML with every table and inline figure, the markdown twin, sections not run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from evals.report.config import ReportConfig
from evals.report.main import run
from tests.evals.report.conftest import build_experiment, crossval_output

TABLE_IDS = (
    "table-overview", "table-comparisons", "table-core", "table-unlearning-summary", "table-unlearning-sweep",
    "table-loss-rise", "table-crossval", "table-crossval-sweep", "table-bounds", "table-damage",
    "table-latent-bounds", "table-sparse-probing", "table-masks", "table-training", "table-separation",
)
FIGURES = ("unlearning_pareto", "crossval", "bounds_scatter", "mask_density", "training_curves")


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("report")
    crossval = crossval_output({
        "adaptive": [0.5, 0.6, 0.55], "fixed": [0.2, 0.35, 0.25], "standard": [0.1, 0.15, 0.2],
    })
    experiment = build_experiment(tmp_path, crossval=crossval)
    return run(ReportConfig(experiment_dir=str(experiment), dpi=40))


def test_report_has_every_table(full_report: Path) -> None:
    text = full_report.read_text()

    for table_id in TABLE_IDS:
        assert f'<table id="{table_id}">' in text, table_id


def test_report_embeds_every_figure(full_report: Path) -> None:
    text = full_report.read_text()

    for name in FIGURES:
        assert f'id="figure-{name}"' in text, name
    sources = re.findall(r'<img [^>]*src="([^"]*)"', text)
    assert len(sources) == len(FIGURES)
    assert all(source.startswith("data:image/png;base64,") for source in sources)


def test_report_loads_nothing_external(full_report: Path) -> None:
    text = full_report.read_text()

    assert "<script" not in text
    assert "<link" not in text
    assert not re.search(r'(src|href)="(https?:|//|file:)', text)


def test_report_shows_values_and_flags(full_report: Path) -> None:
    text = full_report.read_text()

    assert "0.8123" in text  # explained variance of the core results
    assert "0.0123" in text  # retain rate of forget-specific latents in separation.json
    assert "0.700 [" in text  # adaptive's unlearning score with its interval
    assert "Verdict: adaptive separates significantly better than fixed and standard" in text
    assert "cross-validation over 3 folds" in text


def test_markdown_twin_links_pngs(full_report: Path) -> None:
    directory = full_report.parent
    markdown = (directory / "report.md").read_text()

    for name in FIGURES:
        assert f"]({name}.png)" in markdown
        assert (directory / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "**Core metrics (held-out tokens, normalized space)**" in markdown
    assert "| adaptive |" in markdown


def test_report_says_not_run(tmp_path: Path) -> None:
    experiment = build_experiment(tmp_path, with_bounds=False)
    (experiment / "fixed" / "evals" / "sparse_probing.json").unlink()

    text = run(ReportConfig(experiment_dir=str(experiment), dpi=40)).read_text()

    assert "Cross-validation: not run" in text
    assert "Separation bounds eval: not run for adaptive" in text
    assert "Sparse probing: not run for fixed" in text
    assert 'id="table-bounds"' not in text
    assert "single split, one eval run per variant" in text


def test_report_shows_unreadable_file(tmp_path: Path) -> None:
    experiment = build_experiment(tmp_path)
    (experiment / "fixed" / "evals" / "core.json").write_text("{broken")

    text = run(ReportConfig(experiment_dir=str(experiment), dpi=40)).read_text()

    assert "Core eval: could not read" in text
    assert "unreadable" in text


def test_report_copies_flags_verbatim(tmp_path: Path) -> None:
    experiment = build_experiment(tmp_path, at_chance=True)

    text = run(ReportConfig(experiment_dir=str(experiment), dpi=40)).read_text()

    assert "includes chance (0.25): adaptive test." in text
    assert "question set wmdp-bio is flagged at_chance" in text
    assert "reads the loss selectivity" in text


def test_report_replaces_previous_report(tmp_path: Path) -> None:
    experiment = build_experiment(tmp_path)
    output = tmp_path / "out"
    output.mkdir()
    (output / "stale.png").write_bytes(b"old")

    path = run(ReportConfig(experiment_dir=str(experiment), output_dir=str(output), dpi=40))

    assert path == output / "report.html"
    assert not (output / "stale.png").exists()
    assert [entry.name for entry in tmp_path.iterdir() if entry.name.startswith(".")] == []
