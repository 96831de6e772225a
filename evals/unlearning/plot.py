"""Pareto plot of the unlearning sweep: WMDP-bio accuracy against MMLU accuracy.

Each sweep point is one marker at (pooled MMLU accuracy, WMDP-bio accuracy), both on
the known sets, with Wilson 95% intervals as error bars. One series per result file
(labelled by the SAE's variant), so several variants compare on one figure. The best
corner is the bottom right: MMLU kept, WMDP-bio removed. The dashed line marks the
MMLU accuracy a point needs to count in the unlearning score.

Run ``python -m evals.unlearning.plot OUT.png RESULT.json [RESULT.json ...]``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger(__name__)


def _series(result: dict[str, Any]) -> dict[str, list[float]]:
    """Return the x, y values and their error bar lengths of one result's sweep points."""
    columns: dict[str, list[float]] = {
        name: [] for name in ("x", "y", "x_low", "x_high", "y_low", "y_high")
    }
    for point in result.get("eval_result_details", []):
        mmlu, wmdp = point["mmlu"], point["wmdp_bio"]
        if mmlu["accuracy"] is None or wmdp["accuracy"] is None:
            continue
        columns["x"].append(mmlu["accuracy"])
        columns["y"].append(wmdp["accuracy"])
        columns["x_low"].append(mmlu["accuracy"] - mmlu["ci_low"])
        columns["x_high"].append(mmlu["ci_high"] - mmlu["accuracy"])
        columns["y_low"].append(wmdp["accuracy"] - wmdp["ci_low"])
        columns["y_high"].append(wmdp["ci_high"] - wmdp["accuracy"])
    return columns


def plot_pareto(result_paths: Sequence[str | Path], output_path: str | Path) -> Path:
    """Draw the sweeps of one or more unlearning result files into one PNG, written atomically."""
    figure, axes = plt.subplots(figsize=(6, 5))
    threshold = None
    for path in result_paths:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
        if result.get("eval_type_id") != "unlearning":
            raise ValueError(
                f"{path} is not an unlearning result (eval_type_id {result.get('eval_type_id')!r})"
            )
        threshold = result.get("eval_config", {}).get("mmlu_threshold", threshold)
        variant = result.get("sae_cfg_dict", {}).get("variant") or Path(path).stem
        score = result["eval_result_metrics"]["unlearning"]["unlearning_score"]
        label = f"{variant} (score {'n/a' if score is None else f'{score:.3f}'})"
        columns = _series(result)
        axes.errorbar(
            columns["x"],
            columns["y"],
            xerr=[columns["x_low"], columns["x_high"]],
            yerr=[columns["y_low"], columns["y_high"]],
            fmt="o",
            capsize=2,
            alpha=0.8,
            label=label,
        )
    if threshold is not None:
        axes.axvline(
            threshold, color="grey", linestyle="--", linewidth=1, label=f"MMLU = {threshold}"
        )
    axes.set_xlabel("MMLU accuracy (known questions, side-effect subjects)")
    axes.set_ylabel("WMDP-bio accuracy (known questions)")
    axes.set_title("Unlearning sweep: lower right is better")
    axes.set_xlim(-0.02, 1.02)
    axes.set_ylim(-0.02, 1.02)
    axes.legend(fontsize=8)
    figure.tight_layout()

    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(
        prefix=f".{output_path.name}.", suffix=".png", dir=output_path.parent
    )
    os.close(handle)
    try:
        figure.savefig(tmp_name, dpi=120)
        os.replace(tmp_name, output_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    finally:
        plt.close(figure)
    logger.info(
        "Wrote the unlearning Pareto plot of %d result(s) to %s", len(result_paths), output_path
    )
    return output_path


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry: ``OUT.png RESULT.json [RESULT.json ...]``."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if len(arguments) < 2:
        raise SystemExit(
            "usage: python -m evals.unlearning.plot OUT.png RESULT.json [RESULT.json ...]"
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plot_pareto(arguments[1:], arguments[0])


if __name__ == "__main__":
    main()
