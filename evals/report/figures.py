"""The report's figures, drawn with matplotlib's Agg canvas and returned as PNG bytes.

Figures are built as ``matplotlib.figure.Figure`` objects on a ``FigureCanvasAgg``
without pyplot, so no global figure state or interactive backend is involved. Every
function returns None when there is nothing to draw.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evals.report.collect import MaskDensity
from evals.unlearning.schema import UnlearningEvalOutput

#: Training-log columns drawn, with their axis labels; a column missing from every log is skipped.
TRAINING_CURVES = (
    ("loss", "training loss"),
    ("explained_variance", "explained variance"),
    ("l0", "L0 (active latents per token)"),
    ("dead_fraction", "dead fraction"),
)


def new_figure(
    width: float, height: float, layout: Literal["constrained", "tight"] | None = None
) -> Figure:
    """Create a figure attached to an Agg canvas."""
    figure = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(figure)
    return figure


def to_png(figure: Figure, dpi: int) -> bytes:
    """Render a figure to PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def variant_colors(names: Sequence[str]) -> dict[str, Any]:
    """Give each variant a fixed color of matplotlib's default cycle, in report order."""
    cycle = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(names)}


def pareto_figure(
    unlearning: dict[str, UnlearningEvalOutput], colors: dict[str, Any], dpi: int
) -> bytes | None:
    """Draw WMDP-bio against pooled MMLU accuracy for every sweep point, with Wilson 95% error bars.

    The lower right corner is best: MMLU kept, WMDP-bio removed. The dashed line marks
    the MMLU accuracy a point needs to count in the unlearning score.
    """
    figure = new_figure(6.5, 5.0)
    axes = figure.add_subplot()
    drawn = False
    thresholds = set()
    for name, result in unlearning.items():
        thresholds.add(result.eval_config.get("mmlu_threshold"))
        x: list[float] = []
        y: list[float] = []
        x_err: list[list[float]] = [[], []]
        y_err: list[list[float]] = [[], []]
        for point in result.eval_result_details:
            mmlu, wmdp = point.mmlu, point.wmdp_bio
            if mmlu.accuracy is None or wmdp.accuracy is None:
                continue
            x.append(mmlu.accuracy)
            y.append(wmdp.accuracy)
            x_err[0].append(mmlu.accuracy - (mmlu.ci_low if mmlu.ci_low is not None else mmlu.accuracy))
            x_err[1].append((mmlu.ci_high if mmlu.ci_high is not None else mmlu.accuracy) - mmlu.accuracy)
            y_err[0].append(wmdp.accuracy - (wmdp.ci_low if wmdp.ci_low is not None else wmdp.accuracy))
            y_err[1].append((wmdp.ci_high if wmdp.ci_high is not None else wmdp.accuracy) - wmdp.accuracy)
        if not x:
            continue
        score = result.eval_result_metrics.unlearning.unlearning_score
        label = f"{name} (score {'n/a' if score is None else f'{score:.3f}'})"
        axes.errorbar(
            x, y, xerr=x_err, yerr=y_err, fmt="o", capsize=2, alpha=0.8,
            color=colors.get(name), label=label,
        )
        drawn = True
    if not drawn:
        return None
    for threshold in sorted(t for t in thresholds if isinstance(t, (int, float))):
        axes.axvline(threshold, color="grey", linestyle="--", linewidth=1, label=f"MMLU = {threshold:g}")
    axes.set_xlabel("MMLU accuracy (known questions, side-effect subjects)")
    axes.set_ylabel("WMDP-bio accuracy (known questions)")
    axes.set_title("Unlearning sweep (Wilson 95% intervals): lower right is better")
    axes.set_xlim(-0.02, 1.02)
    axes.set_ylim(-0.02, 1.02)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return to_png(figure, dpi)


def training_curves_figure(
    train_logs: dict[str, list[dict[str, Any]]],
    pruning_logs: dict[str, list[dict[str, Any]]],
    colors: dict[str, Any],
    dpi: int,
) -> bytes | None:
    """Draw loss, explained variance, L0 and dead fraction against step, one line per variant.

    Each pruning event of a masked variant is a dotted vertical line in its color.
    """
    columns = [
        (key, label)
        for key, label in TRAINING_CURVES
        if any(key in row for rows in train_logs.values() for row in rows)
    ]
    if not columns:
        return None
    figure = new_figure(7.0, 2.4 * len(columns))
    axes_list = figure.subplots(len(columns), 1, sharex=True, squeeze=False)[:, 0]
    for axes, (key, label) in zip(axes_list, columns, strict=True):
        for name, rows in train_logs.items():
            points = [(row["step"], row[key]) for row in rows if "step" in row and row.get(key) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                axes.plot(steps, values, color=colors.get(name), label=name, linewidth=1.2)
            for event in pruning_logs.get(name, []):
                if "step" in event:
                    axes.axvline(event["step"], color=colors.get(name), linestyle=":", linewidth=0.8, alpha=0.6)
        if key == "loss":
            axes.set_yscale("log")
        axes.set_ylabel(label, fontsize=8)
        axes.grid(alpha=0.3)
    axes_list[0].legend(fontsize=8, title="dotted: pruning events", title_fontsize=7)
    axes_list[-1].set_xlabel("training step")
    figure.tight_layout()
    return to_png(figure, dpi)


def mask_density_figure(masks: dict[str, MaskDensity], dpi: int) -> bytes | None:
    """Draw each masked variant's encoder mask density by block, and its per-latent density.

    Top row: the (d_sae, d_model) mask averaged over blocks (latents down, input
    dimensions across), on one 0-1 color scale. Bottom row: the fraction of inputs each
    latent keeps, sorted, which shows how unevenly pruning spread over latents.
    """
    if not masks:
        return None
    n = len(masks)
    figure = new_figure(3.4 * n + 1.2, 6.4, layout="constrained")
    grid = figure.subplots(2, n, squeeze=False, gridspec_kw={"height_ratios": [3, 1.3]})
    image = None
    for column, (name, mask) in enumerate(masks.items()):
        top, bottom = grid[0, column], grid[1, column]
        d_sae, d_model = mask.shape
        image = top.imshow(
            mask.grid_RC, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest",
            extent=(0, d_model, d_sae, 0),
        )
        top.set_title(f"{name}: density {mask.density:.3f}", fontsize=9)
        top.set_xlabel("input dimension", fontsize=8)
        if column == 0:
            top.set_ylabel("latent", fontsize=8)
        sorted_F = np.sort(mask.row_density_F)[::-1]
        bottom.plot(np.arange(d_sae), sorted_F, color="C0", linewidth=1.0)
        bottom.set_ylim(-0.02, 1.02)
        bottom.set_xlabel("latents, sorted", fontsize=8)
        if column == 0:
            bottom.set_ylabel("fraction of inputs kept", fontsize=8)
        bottom.grid(alpha=0.3)
    assert image is not None
    figure.colorbar(image, ax=list(grid[0, :]), label="fraction of connections kept", shrink=0.9)
    return to_png(figure, dpi)


def mean_std_figure(
    title: str,
    metrics: dict[str, dict[str, tuple[float, float | None]]],
    colors: dict[str, Any],
    dpi: int,
) -> bytes | None:
    """Draw grouped bars of mean ± std, ``metrics[metric][variant] = (mean, std)``."""
    metric_names = [name for name, values in metrics.items() if values]
    if not metric_names:
        return None
    variants: list[str] = []
    for values in metrics.values():
        variants += [name for name in values if name not in variants]
    figure = new_figure(max(5.0, 1.6 * len(metric_names) + 2.0), 4.0)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(variants))
    for i, variant in enumerate(variants):
        positions, means, errors = [], [], []
        for j, metric in enumerate(metric_names):
            if variant in metrics[metric]:
                mean, std = metrics[metric][variant]
                positions.append(j + (i - (len(variants) - 1) / 2) * width)
                means.append(mean)
                errors.append(0.0 if std is None else std)
        axes.bar(positions, means, width=width, yerr=errors, capsize=3, color=colors.get(variant), label=variant)
    axes.set_xticks(range(len(metric_names)))
    axes.set_xticklabels(metric_names, fontsize=8, rotation=15)
    axes.axhline(0.0, color="black", linewidth=0.6)
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return to_png(figure, dpi)


def bound_scatter_figure(
    points: dict[str, tuple[np.ndarray, np.ndarray]], colors: dict[str, Any], dpi: int,
    x_label: str, y_label: str, title: str,
) -> bytes | None:
    """Scatter measured values against their bounds, one color per variant, with the line y = x.

    A point above the line would be a violated bound. Axes are logarithmic, because
    firing rates span orders of magnitude, and linear near 0 (symlog) when some value
    is 0, such as a latent that never fires on retain tokens.
    """
    drawn = {name: xy for name, xy in points.items() if len(xy[0])}
    if not drawn:
        return None
    figure = new_figure(5.5, 5.0)
    axes = figure.add_subplot()
    all_values = np.concatenate([np.concatenate(xy) for xy in drawn.values()])
    finite = all_values[np.isfinite(all_values)]
    for name, (bound, measured) in drawn.items():
        axes.scatter(bound, measured, s=14, alpha=0.7, color=colors.get(name), label=name)
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
        positive = finite[finite > 0]
        if low > 0:
            axes.set_xscale("log")
            axes.set_yscale("log")
        elif positive.size:
            threshold = float(positive.min())
            axes.set_xscale("symlog", linthresh=threshold)
            axes.set_yscale("symlog", linthresh=threshold)
        axes.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1, label="measured = bound")
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return to_png(figure, dpi)
