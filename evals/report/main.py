"""Build the comparison report of an experiment: ``run(cfg) -> Path`` of ``report.html``.

The report directory contains ``report.html`` (self-contained: figures inline, no
JavaScript), ``report.md`` and the figures as PNG files for the markdown. It is built
in a temporary sibling directory and renamed into place, so a reader never sees a
half-written report, and a failed build leaves the previous report untouched.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from evals.report import sections as build
from evals.report.collect import ExperimentResults, collect
from evals.report.conclusion import Conclusion, conclude
from evals.report.config import ReportConfig
from evals.report.figures import variant_colors
from evals.report.render import Section, images, render_html, render_markdown

logger = logging.getLogger(__name__)

HTML_FILE = "report.html"
MARKDOWN_FILE = "report.md"


def compute_conclusion(cfg: ReportConfig, results: ExperimentResults) -> Conclusion:
    """Run the conclusion's tests on the collected unlearning and cross-validation results."""
    unlearning = build.present(results.variants, "unlearning")
    crossval = results.crossval.value if results.crossval.ok else None
    baselines = [name for name in cfg.baselines]
    return conclude(cfg.reference, baselines, unlearning, crossval, cfg.alpha)


def build_sections(cfg: ReportConfig, results: ExperimentResults) -> list[Section]:
    """Build every section of the report, in reading order."""
    colors = variant_colors(list(results.variants))
    conclusion = compute_conclusion(cfg, results)
    logger.info("report conclusion: %s", conclusion.paragraph)
    return [
        build.overview_section(results),
        build.conclusion_section(conclusion),
        build.core_section(results),
        build.unlearning_section(results, colors, cfg.dpi),
        build.loss_rise_section(results),
        build.crossval_section(results, colors, cfg.dpi),
        build.bounds_section(results, colors, cfg.dpi),
        build.sparse_probing_section(results),
        build.masks_section(results, cfg.dpi),
        build.training_section(results, colors, cfg.dpi),
    ]


def write_report_dir(target: Path, title: str, report_sections: list[Section]) -> None:
    """Write the report files to a temporary sibling directory, then swap it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, which makes the directory private) keeps the usual umask permissions.
    tmp_dir = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        (tmp_dir / HTML_FILE).write_text(render_html(title, report_sections), encoding="utf-8")
        (tmp_dir / MARKDOWN_FILE).write_text(render_markdown(title, report_sections), encoding="utf-8")
        for image in images(report_sections):
            (tmp_dir / f"{image.name}.png").write_bytes(image.png)

        # os.replace cannot replace a non-empty directory, so the old report is moved
        # aside first and removed only after the new one is in place.
        old_dir = None
        if target.exists():
            old_dir = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old_dir)
        os.replace(tmp_dir, target)
        if old_dir is not None:
            shutil.rmtree(old_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def run(cfg: ReportConfig) -> Path:
    """Collect an experiment's results, write the report, and return the path of ``report.html``."""
    results = collect(cfg)
    title = cfg.title or f"knowsep report: {Path(cfg.experiment_dir).resolve().name}"
    report_sections = build_sections(cfg, results)
    target = cfg.resolved_output_dir
    write_report_dir(target, title, report_sections)
    logger.info("Wrote the report of %d variant(s) to %s", len(results.variants), target / HTML_FILE)
    return target / HTML_FILE
