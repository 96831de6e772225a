"""Open a rendered report in headless Chromium: no console errors, tables and inline figures in the DOM, a screenshot.

The browser is pointed only at the local report file. Install Debian's chromium
(``apt-get install -y chromium``) to run these tests; they are skipped without it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evals.report.config import ReportConfig
from evals.report.main import run
from tests.evals.report.conftest import build_experiment, crossval_output

CHROMIUM = shutil.which("chromium")
WINDOW = (1280, 4000)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed; install it with `apt-get install -y chromium`"
)


def chromium(report: Path, profile: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium on the local report with networking features off."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
        f"--window-size={WINDOW[0]},{WINDOW[1]}", *arguments, report.resolve().as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def console_errors(stderr: str) -> list[str]:
    """Return Chromium's log lines for page console messages and failed loads."""
    return [
        line for line in stderr.splitlines()
        if "CONSOLE" in line or "net::ERR_" in line or "Uncaught" in line
    ]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    crossval = crossval_output({"adaptive": [0.5, 0.6, 0.55], "fixed": [0.2, 0.35, 0.25], "standard": [0.1, 0.15, 0.2]})
    experiment = build_experiment(root, crossval=crossval)
    return run(ReportConfig(experiment_dir=str(experiment), dpi=40))


def test_dom_has_tables_and_inline_figures(report: Path, tmp_path: Path) -> None:
    result = chromium(report, tmp_path / "profile", "--dump-dom")

    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert console_errors(result.stderr) == []
    for table_id in ("table-core", "table-unlearning-sweep", "table-loss-rise", "table-crossval", "table-bounds"):
        assert f'id="{table_id}"' in dom, table_id
    sources = re.findall(r'<img [^>]*src="([^"]*)"', dom)
    assert len(sources) == 5
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    assert "Verdict: adaptive separates significantly better" in dom


def test_screenshot_is_not_blank(report: Path, tmp_path: Path) -> None:
    screenshot = tmp_path / "report.png"

    result = chromium(report, tmp_path / "profile", f"--screenshot={screenshot}")

    assert result.returncode == 0, result.stderr[-2000:]
    assert console_errors(result.stderr) == []
    assert screenshot.stat().st_size > 50_000
    with Image.open(screenshot) as image:
        assert image.size == WINDOW
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    # Text, table borders and figures make many rows differ from a white page.
    non_white_rows = (pixels < 200).any(axis=1).mean()
    assert non_white_rows > 0.3
    assert pixels.std() > 10
