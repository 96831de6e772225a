"""Build the report's sections (tables, figures, honesty flags) from the collected results.

Every section lists the variants whose result is missing ("not run") or unreadable,
so an absent number is never mistaken for a zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evals.crossval.schema import MetricSummary
from evals.report import figures
from evals.report.collect import ExperimentResults, VariantResults
from evals.report.collect import Section as ResultSection
from evals.report.conclusion import (
    Conclusion,
    crossval_estimates,
    describe_point,
    score_point,
    selectivity,
    stdev,
)
from evals.report.render import Image, Section, Table, Text
from evals.unlearning.schema import LossRise, SetAccuracy, UnlearningEvalOutput

MISSING = "n/a"


def fmt(value: float | int | None, digits: int = 4) -> str:
    """Format a number for a table cell; None becomes n/a."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if not np.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


def fmt_interval(value: float | None, low: float | None, high: float | None, digits: int = 3) -> str:
    """Format a value with its interval, ``0.500 [0.400, 0.600]``."""
    if value is None:
        return MISSING
    if low is None or high is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def fmt_accuracy(accuracy: SetAccuracy) -> str:
    """Format an accuracy with its Wilson interval and the questions behind it."""
    if accuracy.accuracy is None:
        return f"{MISSING} (n = 0)"
    return f"{fmt_interval(accuracy.accuracy, accuracy.ci_low, accuracy.ci_high)} (n = {accuracy.n})"


def fmt_rise(rise: LossRise | None) -> str:
    """Format a loss rise with its interval and the contexts behind it."""
    if rise is None or rise.mean_rise is None:
        return MISSING
    return f"{fmt_interval(rise.mean_rise, rise.ci_low, rise.ci_high)} (n = {rise.n_contexts})"


def absence_notes(variants: dict[str, VariantResults], attribute: str, step: str) -> list[Text]:
    """Say, per variant, that a result was not run or could not be read."""
    notes = []
    for name, variant in variants.items():
        section: ResultSection[Any] = getattr(variant, attribute)
        if section.status == "missing":
            notes.append(Text(f"{step}: not run for {name} ({section.path} not found).", kind="missing"))
        elif section.status == "invalid":
            notes.append(Text(f"{step}: could not read {section.path} for {name}: {section.error}", kind="warning"))
    return notes


def present(variants: dict[str, VariantResults], attribute: str) -> dict[str, Any]:
    """Return ``{variant: parsed value}`` for the variants whose section was read."""
    found = {}
    for name, variant in variants.items():
        section: ResultSection[Any] = getattr(variant, attribute)
        if section.ok:
            found[name] = section.value
    return found


# Overview and conclusion


def overview_section(results: ExperimentResults) -> Section:
    """Build the overview: which results exist for which variant."""
    columns = [
        ("core", "core"), ("unlearning", "unlearning"), ("sparse_probing", "sparse probing"),
        ("bounds", "bounds"), ("train_log", "training log"), ("pruning_log", "pruning log"),
        ("mask", "masks"),
    ]
    labels = {"ok": "yes", "missing": "not run", "invalid": "unreadable"}
    rows = []
    for name, variant in results.variants.items():
        rows.append([name] + [labels[getattr(variant, attribute).status] for attribute, _ in columns])
    blocks: list[Any] = [
        Text(f"Experiment directory: {results.experiment_dir}. Cross-validation: "
             f"{labels[results.crossval.status]} ({results.crossval.path})."),
        Table("Results found per variant", ["variant"] + [label for _, label in columns], rows, "table-overview"),
    ]
    return Section("Overview", "overview", blocks)


def conclusion_section(conclusion: Conclusion) -> Section:
    """Build the conclusion section: the computed paragraph and the comparisons behind it."""
    blocks: list[Any] = [Text(conclusion.paragraph, kind="conclusion")]
    rows = []
    for comparison in conclusion.comparisons:
        rows.append([
            comparison.metric + (" (primary)" if comparison.metric == conclusion.primary_metric else ""),
            f"{comparison.reference} vs {comparison.baseline}",
            comparison.reference_estimate.describe() if comparison.reference_estimate else MISSING,
            comparison.baseline_estimate.describe() if comparison.baseline_estimate else MISSING,
            comparison.method,
            MISSING if comparison.p_value is None else f"{comparison.p_value:.3g}",
            comparison.outcome
            + (f": {comparison.reason}" if comparison.reason else "")
            + (f" ({comparison.qualifier})" if comparison.qualifier else ""),
        ])
    if rows:
        blocks.append(Table(
            "Comparisons (higher is better for both metrics)",
            ["metric", "comparison", "reference", "baseline", "test", "p", "outcome"],
            rows, "table-comparisons",
        ))
    blocks.append(Text(
        "Unlearning score: 1 - WMDP-bio accuracy on known questions at the sweep point that sets "
        "SAEBench's score, with the Wilson 95% interval of that accuracy. Loss selectivity: forget "
        "loss rise - retain loss rise (nats per token) at the strongest clamp of the sweep (largest "
        "multiplier, then most features), with an approximate 95% interval that combines both rises' "
        "intervals in quadrature. Cross-validated values are mean ± std over folds.", kind="note",
    ))
    return Section("Conclusion", "conclusion", blocks)


# Core metrics and sparse probing


def core_section(results: ExperimentResults) -> Section:
    """Build the core metrics table, one row per variant."""
    header = [
        "variant", "explained variance", "mse", "cossim", "l0", "l1", "frac alive",
        "ce loss score", "kl div score", "l2 ratio", "encoder density", "decoder density", "eval tokens",
    ]
    rows = []
    for name, core in present(results.variants, "core").items():
        metrics = core.eval_result_metrics
        performance, behavior = metrics.model_performance_preservation, metrics.model_behavior_preservation
        rows.append([
            name,
            fmt(metrics.reconstruction_quality.explained_variance),
            fmt(metrics.reconstruction_quality.mse, 6),
            fmt(metrics.reconstruction_quality.cossim),
            fmt(metrics.sparsity.l0, 2),
            fmt(metrics.sparsity.l1, 2),
            fmt(metrics.misc_metrics.frac_alive),
            fmt(performance.ce_loss_score if performance else None),
            fmt(behavior.kl_div_score if behavior else None),
            fmt(metrics.shrinkage.l2_ratio),
            fmt(metrics.masks.encoder_density),
            fmt(metrics.masks.decoder_density),
            fmt(metrics.token_stats.total_tokens_eval_sparsity_variance),
        ])
    blocks: list[Any] = []
    if rows:
        blocks.append(Table("Core metrics (held-out tokens, normalized space)", header, rows, "table-core"))
    blocks += absence_notes(results.variants, "core", "Core eval")
    return Section("Core metrics", "core", blocks)


def sparse_probing_section(results: ExperimentResults) -> Section:
    """Build the sparse probing table, one row per variant."""
    found = present(results.variants, "sparse_probing")
    keys = ["llm_test_accuracy", "sae_test_accuracy"] + [
        f"sae_top_{k}_test_accuracy" for k in (1, 2, 5, 10, 20, 50, 100)
    ]
    merged = {
        name: {**result.eval_result_metrics.llm.model_dump(), **result.eval_result_metrics.sae.model_dump()}
        for name, result in found.items()
    }
    keys = [key for key in keys if any(values.get(key) is not None for values in merged.values())]
    blocks: list[Any] = []
    if merged:
        rows = [[name] + [fmt(values.get(key)) for key in keys] for name, values in merged.items()]
        blocks.append(Table(
            "Sparse probing test accuracy (balanced one-vs-rest, 0.5 is chance)",
            ["variant"] + [key.replace("_test_accuracy", "") for key in keys], rows, "table-sparse-probing",
        ))
    blocks += absence_notes(results.variants, "sparse_probing", "Sparse probing")
    return Section("Sparse probing", "sparse-probing", blocks)


# Unlearning


def unlearning_section(results: ExperimentResults, colors: dict[str, Any], dpi: int) -> Section:
    """Build the unlearning summary, its honesty flags verbatim, the sweep table and the Pareto plot."""
    found: dict[str, UnlearningEvalOutput] = present(results.variants, "unlearning")
    blocks: list[Any] = []
    summary_rows, sweep_rows = [], []
    for name, result in found.items():
        metrics = result.eval_result_metrics.unlearning
        sets = result.eval_result_metrics.question_sets
        wmdp, mmlu = sets.get("wmdp-bio"), sets.get("mmlu")
        best = score_point(result)
        summary_rows.append([
            name,
            fmt(metrics.unlearning_score),
            describe_point(best) if best else "none counted",
            fmt(metrics.n_points_counted),
            fmt(metrics.reliable),
            fmt_interval(wmdp.base_accuracy, wmdp.base_ci_low, wmdp.base_ci_high) if wmdp else MISSING,
            fmt(wmdp.at_chance) if wmdp else MISSING,
            f"{wmdp.n_known} ({'too small' if wmdp.known_too_small else 'ok'})" if wmdp else MISSING,
            fmt_interval(mmlu.base_accuracy, mmlu.base_ci_low, mmlu.base_ci_high) if mmlu else MISSING,
            f"{mmlu.n_known} ({'too small' if mmlu.known_too_small else 'ok'})" if mmlu else MISSING,
        ])
        for point in result.eval_result_details:
            sweep_rows.append([
                name, f"{point.retain_threshold:g}", f"{point.n_features_selected}/{point.n_features}",
                f"{point.multiplier:g}", fmt_accuracy(point.wmdp_bio), fmt_accuracy(point.mmlu),
                fmt(point.counts_in_score),
            ])
        warnings = (result.eval_result_unstructured or {}).get("warnings", []) if isinstance(
            result.eval_result_unstructured, dict
        ) else []
        for warning in warnings:
            blocks.append(Text(f"{name}: {warning}", kind="warning"))
        for set_name, summary in sorted(sets.items()):
            if summary.at_chance or summary.known_too_small:
                flags = [flag for flag, on in (("at_chance", summary.at_chance),
                                               ("known_too_small", summary.known_too_small)) if on]
                blocks.append(Text(
                    f"{name}: question set {set_name} is flagged {' and '.join(flags)} "
                    f"(base accuracy {fmt_interval(summary.base_accuracy, summary.base_ci_low, summary.base_ci_high)}, "
                    f"{summary.n_known} known of {summary.n_questions}).", kind="warning",
                ))
    if summary_rows:
        blocks.insert(0, Table(
            "Unlearning score and the unmodified model's question sets (Wilson 95% intervals)",
            ["variant", "unlearning score", "score set by", "points counted", "reliable",
             "WMDP-bio base accuracy", "WMDP-bio at chance", "WMDP-bio known", "MMLU base accuracy", "MMLU known"],
            summary_rows, "table-unlearning-summary",
        ))
        blocks.append(Table(
            "Unlearning sweep: accuracy on known questions after the clamp (Wilson 95% intervals)",
            ["variant", "retain threshold", "features selected/requested", "multiplier",
             "WMDP-bio accuracy", "MMLU accuracy", "counts in score"],
            sweep_rows, "table-unlearning-sweep",
        ))
        png = figures.pareto_figure(found, colors, dpi)
        if png is not None:
            blocks.append(Image("unlearning_pareto", "WMDP-bio vs MMLU accuracy per sweep point, Wilson 95% error bars", png))
    blocks += absence_notes(results.variants, "unlearning", "Unlearning eval")
    return Section("Unlearning", "unlearning", blocks)


def loss_rise_section(results: ExperimentResults) -> Section:
    """Build the table of loss rises on held-out forget and retain text per sweep point, with Student-t 95% intervals."""
    found: dict[str, UnlearningEvalOutput] = present(results.variants, "unlearning")
    rows = []
    skipped = []
    for name, result in found.items():
        for point in result.eval_result_details:
            if point.loss_rise is None:
                continue
            forget, retain = point.loss_rise.get("forget"), point.loss_rise.get("retain")
            values = selectivity(forget, retain) if forget and retain else None
            rows.append([
                name, f"{point.retain_threshold:g}", f"{point.n_features_selected}/{point.n_features}",
                f"{point.multiplier:g}", fmt_rise(forget), fmt_rise(retain),
                MISSING if values is None else fmt_interval(*values),
            ])
        if all(point.loss_rise is None for point in result.eval_result_details):
            skipped.append(name)
    blocks: list[Any] = []
    if rows:
        blocks.append(Table(
            "Next-token loss rise under the clamp, nats per token (95% intervals over contexts)",
            ["variant", "retain threshold", "features selected/requested", "multiplier",
             "forget rise", "retain rise", "selectivity (forget - retain)"],
            rows, "table-loss-rise",
        ))
    for name in skipped:
        blocks.append(Text(f"Loss rise: not measured for {name} (n_loss_contexts was 0).", kind="missing"))
    blocks += absence_notes(results.variants, "unlearning", "Loss rise (unlearning eval)")
    return Section("Loss rise", "loss-rise", blocks)


# Bounds


def bounds_section(results: ExperimentResults, colors: dict[str, Any], dpi: int) -> Section:
    """Build the bound checks, bound against measured per latent with tightness, and a scatter plot."""
    found = present(results.variants, "bounds")
    blocks: list[Any] = []
    summary_rows, damage_rows, latent_rows = [], [], []
    scatter: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, result in found.items():
        metrics = result.eval_result_metrics
        summary, per_token, damage, firing = (
            metrics.summary, metrics.per_token_bound, metrics.expected_damage_bound, metrics.firing_bound,
        )
        summary_rows.append([
            name,
            f"{summary.total_violations}/{summary.total_checks}",
            f"{per_token.violations}/{per_token.checks}",
            f"{damage.violations}/{damage.checks}",
            f"{firing.violations}/{firing.checks}",
            fmt(firing.theoretical_separation),
            fmt(firing.empirical_separation),
            fmt(firing.separation_tightness),
            fmt(firing.all_latents.median_tightness),
            fmt(summary.encoder_density),
        ])
        for entry in damage.per_multiplier:
            damage_rows.append([
                name, f"{entry.multiplier:g}",
                fmt_interval(entry.empirical_mean, entry.ci_low, entry.ci_high, 4),
                fmt(entry.bound), fmt(entry.tightness), fmt(entry.holds),
            ])
        bounds, measured = [], []
        for latent in result.eval_result_details:
            if latent.empirical_rate is not None:
                bounds.append(latent.cantelli_bound)
                measured.append(latent.empirical_rate)
            if latent.clamped:
                ci = latent.ci or [None, None]
                latent_rows.append([
                    name, str(latent.id), fmt(latent.support_size), fmt(latent.mu), fmt(latent.sigma),
                    fmt(latent.cantelli_bound), fmt_interval(latent.empirical_rate, ci[0], ci[1], 4),
                    fmt(latent.tightness), fmt(latent.violation),
                ])
        scatter[name] = (np.asarray(bounds, dtype=np.float64), np.asarray(measured, dtype=np.float64))
    if summary_rows:
        blocks.append(Table(
            "Separation bounds: violations/checks, and theoretical vs empirical separation of the clamp set",
            ["variant", "all bounds", "per-token", "expected damage", "firing (Cantelli)",
             "theoretical separation", "empirical separation", "tightness (empirical/bound)",
             "median tightness, all latents", "encoder density"],
            summary_rows, "table-bounds",
        ))
        blocks.append(Table(
            "Expected retain damage: empirical mean ||x' - x|| (95% interval) vs bound",
            ["variant", "multiplier", "empirical mean", "bound", "tightness", "holds"], damage_rows, "table-damage",
        ))
        blocks.append(Table(
            "Clamped latents: Cantelli bound vs held-out retain firing rate (Wilson 95% interval)",
            ["variant", "latent", "support size", "mu", "sigma", "bound", "measured rate", "tightness", "violation"],
            latent_rows, "table-latent-bounds",
        ))
        png = figures.bound_scatter_figure(
            scatter, colors, dpi, "Cantelli bound on retain firing rate",
            "held-out retain firing rate", "Firing bound vs measured retain rate, per latent",
        )
        if png is not None:
            blocks.append(Image(
                "bounds_scatter",
                "Per-latent Cantelli bound against measured held-out retain firing rate; a point above "
                "the dashed line would violate the bound",
                png,
            ))
    blocks += absence_notes(results.variants, "bounds", "Separation bounds eval")
    return Section("Theoretical vs empirical separation", "bounds", blocks)


# Masks and training


def masks_section(results: ExperimentResults, dpi: int) -> Section:
    """Build the mask density maps and pruning summaries of the masked variants."""
    masks = present(results.variants, "mask")
    blocks: list[Any] = []
    rows = []
    for name, variant in results.variants.items():
        events = variant.pruning_log.value if variant.pruning_log.ok else None
        mask = masks.get(name)
        if mask is None and events is None:
            continue
        last = events[-1] if events else {}
        rows.append([
            name,
            f"{mask.shape[0]} x {mask.shape[1]}" if mask else MISSING,
            fmt(mask.density) if mask else MISSING,
            fmt(float(mask.row_density_F.min())) if mask else MISSING,
            fmt(float(mask.row_density_F.max())) if mask else MISSING,
            fmt(len(events)) if events is not None else MISSING,
            fmt(sum(int(event.get("pruned", 0)) for event in events)) if events else MISSING,
            fmt(sum(int(event.get("regrown", 0)) for event in events)) if events else MISSING,
            # The adaptive variant logs the density after regrowth separately.
            fmt(last.get("density_after_feedback", last.get("density"))) if events else MISSING,
        ])
    if rows:
        blocks.append(Table(
            "Encoder masks and pruning",
            ["variant", "mask shape", "density", "min latent density", "max latent density",
             "pruning events", "pruned", "regrown", "density after last event"],
            rows, "table-masks",
        ))
    png = figures.mask_density_figure(masks, dpi)
    if png is not None:
        blocks.append(Image(
            "mask_density", "Encoder mask density by block of latents x input dimensions, and per latent", png,
        ))
    else:
        blocks.append(Text("No masked variant has a saved encoder mask (sae/masks/encoder).", kind="missing"))
    for name, variant in results.variants.items():
        if variant.mask.status == "invalid":
            blocks.append(Text(f"Masks of {name}: could not read {variant.mask.path}: {variant.mask.error}", kind="warning"))
    return Section("Masks", "masks", blocks)


def training_section(results: ExperimentResults, colors: dict[str, Any], dpi: int) -> Section:
    """Build the training curves and the last logged row of each variant."""
    logs = present(results.variants, "train_log")
    pruning = present(results.variants, "pruning_log")
    blocks: list[Any] = []

    rows = []
    for name, rows_logged in logs.items():
        if not rows_logged:
            continue
        last = rows_logged[-1]
        rows.append([
            name, fmt(last.get("step")), fmt(last.get("tokens")), fmt(last.get("loss")),
            fmt(last.get("explained_variance")), fmt(last.get("l0"), 2), fmt(last.get("dead_fraction")),
        ])
    if rows:
        blocks.append(Table(
            "Last logged training step (training batches, not held-out data)",
            ["variant", "step", "tokens", "loss", "explained variance", "l0", "dead fraction"], rows, "table-training",
        ))

    separation_rows = []
    for name, report in present(results.variants, "separation").items():
        separation_rows.append([
            name, fmt(report.get("tau"), 2), fmt(report.get("n_latents_fired")), fmt(report.get("n_forget_specific")),
            fmt(report.get("forget_specific_forget_firing_rate_mean")),
            fmt(report.get("forget_specific_retain_firing_rate_mean")),
            fmt(report.get("retain_firing_rate_mean")),
        ])
    if separation_rows:
        blocks.append(Table(
            "Training-time separation (sae/separation.json: moving average over training batches, not held-out data)",
            ["variant", "tau", "latents fired", "forget-specific latents (s >= tau)",
             "their mean forget rate", "their mean retain rate", "mean retain rate, all latents"],
            separation_rows, "table-separation",
        ))

    png = figures.training_curves_figure(logs, pruning, colors, dpi)
    if png is not None:
        blocks.append(Image("training_curves", "Training curves per variant; dotted lines mark pruning events", png))

    blocks += absence_notes(results.variants, "train_log", "Training log")
    for name, variant in results.variants.items():
        if variant.pruning_log.status == "invalid":
            blocks.append(Text(f"Pruning log of {name}: could not read: {variant.pruning_log.error}", kind="warning"))
    return Section("Training", "training", blocks)


# Cross-validation


def fmt_mean_std(summary: MetricSummary, digits: int = 3) -> str:
    """Format a metric over folds as ``mean ± std (n folds)``."""
    if summary.mean is None:
        return MISSING
    std = MISSING if summary.std is None else f"{summary.std:.{digits}f}"
    return f"{summary.mean:.{digits}f} ± {std} (n = {summary.n_folds})"


def crossval_section(results: ExperimentResults, colors: dict[str, Any], dpi: int) -> Section:
    """Build the cross-validated metrics as mean ± std over folds, with a bar chart."""
    section = results.crossval
    if section.status == "missing":
        return Section("Cross-validation", "crossval", [
            Text(f"Cross-validation: not run ({section.path} not found).", kind="missing"),
        ])
    if not section.ok:
        return Section("Cross-validation", "crossval", [
            Text(f"Cross-validation: could not read {section.path}: {section.error}", kind="warning"),
        ])
    output = section.value
    assert output is not None
    summaries = output.eval_result_metrics.variants
    blocks: list[Any] = [Text(
        f"Mode {output.eval_config.get('mode', MISSING)}: for each fold of the WMDP-bio documents, latents "
        "are selected with the other folds' statistics and evaluated on this fold's questions and text. "
        "Values are mean ± sample standard deviation over folds.", kind="note",
    )]
    rows = []
    for name, summary in summaries.items():
        rows.append([
            name, summary.run_name, fmt(summary.n_folds), fmt(summary.n_reliable_folds),
            fmt_mean_std(summary.unlearning_score), fmt_mean_std(summary.best_point.wmdp_bio_accuracy),
            fmt_mean_std(summary.best_point.mmlu_accuracy), fmt_mean_std(summary.n_wmdp_known, 1),
        ])
    blocks.append(Table(
        "Cross-validated unlearning (best point per fold: optimistic, see the sweep table)",
        ["variant", "run", "folds", "reliable folds", "unlearning score", "WMDP-bio accuracy at best point",
         "MMLU accuracy at best point", "known WMDP-bio questions"], rows, "table-crossval",
    ))

    point_rows = []
    for name, summary in summaries.items():
        for point in summary.sweep_points:
            point_rows.append([
                name, f"{point.retain_threshold:g}", fmt(point.n_features), f"{point.multiplier:g}",
                fmt_mean_std(point.wmdp_bio_accuracy), fmt_mean_std(point.mmlu_accuracy),
                fmt_mean_std(point.forget_loss_rise), fmt_mean_std(point.retain_loss_rise),
                fmt(point.n_folds_counted),
            ])
    if point_rows:
        blocks.append(Table(
            "Cross-validated sweep points (fixed in advance, so unbiased)",
            ["variant", "retain threshold", "features", "multiplier", "WMDP-bio accuracy", "MMLU accuracy",
             "forget loss rise", "retain loss rise", "folds counted"], point_rows, "table-crossval-sweep",
        ))

    estimates = crossval_estimates(output)
    bars = {
        metric: {
            name: (estimate.value, stdev(estimate.fold_values or []))
            for name, estimate in by_variant.items()
        }
        for metric, by_variant in estimates.items()
    }
    png = figures.mean_std_figure("Cross-validated separation, mean ± std over folds", bars, colors, dpi)
    if png is not None:
        blocks.append(Image(
            "crossval", "Unlearning score and loss selectivity (strongest clamp) per variant, mean ± std over folds", png,
        ))

    warnings: dict[str, list[str]] = {}
    for fold in output.eval_result_details:
        for warning in fold.warnings:
            warnings.setdefault(warning, []).append(f"{fold.variant} fold {fold.fold}")
    for warning, where in warnings.items():
        blocks.append(Text(f"{', '.join(where)}: {warning}", kind="warning"))
    return Section("Cross-validation", "crossval", blocks)
