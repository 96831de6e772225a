"""The ``knowsep`` command: thin wrappers that build stage configs and call the library.

Every command takes ``--config FILE`` (a TOML file with ``[model]``, ``[harvest]``,
``[train]`` and ``[eval.core]`` tables) and any number of ``field=value`` overrides of
its stage's config, so ``knowsep train variant=adaptive`` and the justfile recipes
read the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from knowsep.config import ConfigError, get_table, load_stage_config, load_toml, parse_overrides
from knowsep.logs import setup_logging

logger = logging.getLogger("knowsep")

DEFAULT_CONFIG = "configs/demo.toml"

app = typer.Typer(
    help="Train sparse autoencoders whose pruned connections separate hazardous from general knowledge, and evaluate the separation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
eval_app = typer.Typer(help="Evaluate a trained SAE; results are SAEBench-layout JSON under the run directory.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

ConfigOption = typer.Option(
    None, "--config", "-c", help=f"TOML config file; {DEFAULT_CONFIG} when it exists, else built-in defaults."
)
OverridesArgument = typer.Argument(
    None,
    help="field=value overrides of the stage config (see `knowsep describe STAGE`); lists are comma-separated, e.g. multipliers=2,10,50.",
)
VerboseOption = typer.Option(False, "--verbose", "-v", help="Log debug messages.")
DemoConfigOption = typer.Option(Path(DEFAULT_CONFIG), "--config", "-c", help="Demo config.")
BenchNameArgument = typer.Argument(..., help="harvest, masks or train")
BenchArgsArgument = typer.Argument(None, help="Arguments passed to the benchmark script.")

T = TypeVar("T")


def _config_path(config: Path | None) -> Path | None:
    if config is not None:
        return config
    default = Path(DEFAULT_CONFIG)
    if default.is_file():
        return default
    logger.warning(
        "no --config given and %s not found in %s: using the built-in defaults (model gemma-3-270m, data paths "
        "relative to this directory). Run from the repository root or pass --config",
        DEFAULT_CONFIG,
        Path.cwd(),
    )
    return None


def _run(action: Callable[[], T]) -> T:
    """Run a command body and turn the library's input errors into one line and exit code 2."""
    try:
        return action()
    except (ValueError, FileNotFoundError) as error:
        # Every knowsep input error (config, data, store, model, checkpoint) is a
        # ValueError subclass with a message that names the value and the fix.
        logger.error("%s", error)
        logger.debug("traceback", exc_info=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        logger.error("interrupted; rerun the same command (with --resume for train) to continue")
        raise typer.Exit(code=130) from None


def _model_table(config_path: Path | None) -> dict[str, Any]:
    return get_table(load_toml(config_path), "model") if config_path else {}


def build_harvest_config(config_path: Path | None, overrides: list[str]):
    from pipeline.config import HarvestConfig

    shared = {"model": _model_table(config_path)}
    cfg = load_stage_config(HarvestConfig, "harvest", config_path, overrides, shared=shared)
    cfg.validate()
    return cfg


def build_train_config(config_path: Path | None, overrides: list[str]):
    from trainer.config import TrainConfig

    file_values = get_table(load_toml(config_path), "train") if config_path else {}
    override_values = parse_overrides(overrides)
    shared: dict[str, Any] = {}
    if "store" not in file_values and config_path is not None:
        store = get_table(load_toml(config_path), "harvest").get("store")
        if store:
            shared["store"] = store

    cfg = load_stage_config(TrainConfig, "train", config_path, overrides, shared=shared)

    # A run is named after its variant unless the user names it, so that
    # `just train variant=fixed` (or a [train] table with variant = "fixed") does not
    # overwrite the standard run. A variant override beats a run_name from the file.
    named_by_user = "run_name" in override_values or (
        "run_name" in file_values and "variant" not in override_values
    )
    if not named_by_user:
        # replace() runs __post_init__ again, which checks the new run_name.
        cfg = dataclasses.replace(cfg, run_name=cfg.variant)
    return cfg


RUN_SELECTORS = ("variant", "run_name", "runs_dir")


def build_eval_config(
    cls: type[T],
    section: str,
    config_path: Path | None,
    overrides: list[str],
    defaults: dict[str, Any] | None = None,
) -> T:
    """Build an eval config; ``variant=``/``run_name=`` pick the run whose SAE is evaluated.

    The model's dtype and device come from ``[model]``. ``sae_path`` defaults to
    ``<runs_dir>/<run_name>/sae`` of the ``[train]`` table, unless the file's table sets
    it; a run picked on the command line overrides the file. ``defaults`` (such as a
    preset) apply below the file's table and the overrides.
    """
    shared: dict[str, Any] = dict(defaults or {})
    model = _model_table(config_path)
    field_names = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in ("dtype", "device"):
        if key in model and key in field_names:
            shared[key] = model[key]

    # The SAE comes from, in order: sae_path on the command line, a run picked on the
    # command line, sae_path in the file's table, the [train] table's run.
    selectors = [item for item in overrides if item.split("=")[0] in RUN_SELECTORS]
    file_table = get_table(load_toml(config_path), section) if config_path else {}
    run_sae_path = None
    if "sae_path" not in parse_overrides(overrides) and (selectors or "sae_path" not in file_table):
        train_cfg = build_train_config(config_path, selectors)
        run_sae_path = str(Path(train_cfg.runs_dir) / train_cfg.run_name / "sae")
        shared["sae_path"] = run_sae_path

    eval_overrides = [item for item in overrides if item.split("=")[0] not in RUN_SELECTORS]
    cfg = load_stage_config(cls, section, config_path, eval_overrides, shared=shared)
    if selectors and run_sae_path is not None:
        cfg = dataclasses.replace(cfg, sae_path=run_sae_path)  # type: ignore[type-var]
    return cfg


def build_core_eval_config(config_path: Path | None, overrides: list[str]):
    from evals.core.config import CoreEvalConfig

    return build_eval_config(CoreEvalConfig, "eval.core", config_path, overrides)


def build_unlearning_eval_config(config_path: Path | None, overrides: list[str]):
    from evals.unlearning.config import PRESETS, UnlearningEvalConfig

    # `preset=cpu` selects a smaller sweep; other overrides still apply on top.
    preset_items = [item for item in overrides if item.split("=")[0] == "preset"]
    others = [item for item in overrides if item.split("=")[0] != "preset"]
    preset = preset_items[-1].partition("=")[2] if preset_items else "saebench"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    return build_eval_config(UnlearningEvalConfig, "eval.unlearning", config_path, others, defaults=PRESETS[preset])


def build_bounds_eval_config(config_path: Path | None, overrides: list[str]):
    from evals.bounds.config import BoundsEvalConfig

    return build_eval_config(BoundsEvalConfig, "eval.bounds", config_path, overrides)


def build_sparse_probing_eval_config(config_path: Path | None, overrides: list[str]):
    from evals.sparse_probing.config import SparseProbingEvalConfig

    return build_eval_config(SparseProbingEvalConfig, "eval.sparse_probing", config_path, overrides)


@app.callback()
def main(verbose: bool = VerboseOption) -> None:
    setup_logging(logging.DEBUG if verbose else logging.INFO)


@app.command()
def harvest(config: Path | None = ConfigOption, overrides: list[str] | None = OverridesArgument) -> None:
    """Stream the corpora through the model and shard one layer's activations into a Zarr store.

    Fields: see `knowsep describe harvest`. A killed harvest resumes when rerun with
    the same settings.
    """
    from pipeline.harvest import run_harvest

    config_path = _config_path(config)
    cfg = _run(lambda: build_harvest_config(config_path, overrides or []))
    store = _run(lambda: run_harvest(cfg))
    typer.echo(f"store: {store.path}")


@app.command()
def train(
    config: Path | None = ConfigOption,
    overrides: list[str] | None = OverridesArgument,
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's latest complete checkpoint."),
) -> None:
    """Train one SAE variant (standard, fixed, adaptive) on an activation store.

    Fields: see `knowsep describe train`.
    """
    from trainer.train import train as run_train

    config_path = _config_path(config)
    cfg = _run(lambda: build_train_config(config_path, overrides or []))
    run_dir = _run(lambda: run_train(cfg, resume=resume))
    typer.echo(f"run: {run_dir}")


@eval_app.command("core")
def eval_core(config: Path | None = ConfigOption, overrides: list[str] | None = OverridesArgument) -> None:
    """SAEBench core metrics on held-out tokens: reconstruction, sparsity, CE loss and KL with the SAE spliced in.

    Fields: see `knowsep describe eval.core`. `variant=NAME` or `run_name=NAME` picks the run.
    """
    from evals.core.main import run as run_core

    config_path = _config_path(config)
    cfg = _run(lambda: build_core_eval_config(config_path, overrides or []))
    output = _run(lambda: run_core(cfg))
    typer.echo(f"results: {output}")


@eval_app.command("unlearning")
def eval_unlearning(config: Path | None = ConfigOption, overrides: list[str] | None = OverridesArgument) -> None:
    """Clamp forget-specific latents and measure WMDP-bio against MMLU accuracy over a sweep.

    Fields: see `knowsep describe eval.unlearning`. `preset=cpu` runs a small sweep;
    `variant=NAME` or `run_name=NAME` picks the run.
    """
    from evals.unlearning.main import run as run_unlearning

    config_path = _config_path(config)
    cfg = _run(lambda: build_unlearning_eval_config(config_path, overrides or []))
    output = _run(lambda: run_unlearning(cfg))
    typer.echo(f"results: {output}")


@eval_app.command("bounds")
def eval_bounds(config: Path | None = ConfigOption, overrides: list[str] | None = OverridesArgument) -> None:
    """Verify the separation bounds (per-token, expected retain damage, Cantelli firing) on held-out tokens.

    Fields: see `knowsep describe eval.bounds`. `variant=NAME` or `run_name=NAME` picks the run.
    """
    from evals.bounds.main import run as run_bounds

    config_path = _config_path(config)
    cfg = _run(lambda: build_bounds_eval_config(config_path, overrides or []))
    output = _run(lambda: run_bounds(cfg))
    typer.echo(f"results: {output}")


@eval_app.command("sparse-probing")
def eval_sparse_probing(config: Path | None = ConfigOption, overrides: list[str] | None = OverridesArgument) -> None:
    """SAEBench sparse probing: one-vs-rest probes on top-k SAE latents against the raw activations.

    Fields: see `knowsep describe eval.sparse_probing`. `variant=NAME` or `run_name=NAME` picks the run.
    """
    from evals.sparse_probing.main import run as run_probing

    config_path = _config_path(config)
    cfg = _run(lambda: build_sparse_probing_eval_config(config_path, overrides or []))
    output = _run(lambda: run_probing(cfg))
    typer.echo(f"results: {output}")


@app.command()
def export(
    sae_dir: Path = typer.Argument(..., help="Directory of a knowsep SAE, e.g. runs/demo/adaptive/sae."),
    out_dir: Path = typer.Argument(..., help="Directory to write cfg.json and sae_weights.safetensors to."),
    model_name: str | None = typer.Option(None, "--model-name", help="Model name written for SAELens, e.g. google/gemma-3-270m; default: the store's model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing export."),
) -> None:
    """Export an SAE to SAELens's format, with masks applied and the normalization folded in."""
    from trainer.export import export_saelens

    output = _run(lambda: export_saelens(sae_dir, out_dir, model_name=model_name, overwrite=overwrite))
    typer.echo(f"exported: {output}")


def build_crossval_config(config_path: Path | None, overrides: list[str]):
    from evals.crossval.config import CrossvalConfig

    shared: dict[str, Any] = {}
    if config_path is not None:
        shared["runs_dir"] = build_train_config(config_path, []).runs_dir
    model = _model_table(config_path)
    unlearning = {key: model[key] for key in ("dtype", "device") if key in model}
    if unlearning:
        shared["unlearning"] = unlearning
    return load_stage_config(CrossvalConfig, "crossval", config_path, overrides, shared=shared)


@app.command()
def crossval(config: Path | None = ConfigOption, overrides: list[str] | None = OverridesArgument) -> None:
    """Cross-validate the variants over folds of WMDP-bio questions: select latents on k-1 folds, evaluate on the last.

    Fields: see `knowsep describe crossval`. `folds=5` sets the number of folds.
    """
    from evals.crossval.main import run as run_crossval

    config_path = _config_path(config)
    cfg = _run(lambda: build_crossval_config(config_path, overrides or []))
    output = _run(lambda: run_crossval(cfg))
    typer.echo(f"results: {output}")


def build_report_config(config_path: Path | None, overrides: list[str]):
    from evals.report.config import ReportConfig

    return load_stage_config(ReportConfig, "report", config_path, overrides)


@app.command()
def report(config: Path | None = ConfigOption, overrides: list[str] | None = OverridesArgument) -> None:
    """Compare the variants of an experiment in one self-contained HTML page and a markdown twin.

    Fields: see `knowsep describe report`.
    """
    from evals.report.main import run as run_report

    config_path = _config_path(config)
    cfg = _run(lambda: build_report_config(config_path, overrides or []))
    output = _run(lambda: run_report(cfg))
    typer.echo(f"report: {output}")


@app.command()
def describe(stage: str = typer.Argument(..., help="harvest, train, eval.core, eval.unlearning, eval.sparse_probing, eval.bounds, crossval or report")) -> None:
    """Print every field of a stage's config, with its default and meaning."""
    from evals.bounds.config import BoundsEvalConfig
    from evals.core.config import CoreEvalConfig
    from evals.crossval.config import CrossvalConfig
    from evals.report.config import ReportConfig
    from evals.sparse_probing.config import SparseProbingEvalConfig
    from evals.unlearning.config import UnlearningEvalConfig
    from pipeline.config import HarvestConfig
    from trainer.config import TrainConfig

    classes = {
        "harvest": HarvestConfig,
        "train": TrainConfig,
        "eval.core": CoreEvalConfig,
        "eval.unlearning": UnlearningEvalConfig,
        "eval.sparse_probing": SparseProbingEvalConfig,
        "eval.bounds": BoundsEvalConfig,
        "crossval": CrossvalConfig,
        "report": ReportConfig,
    }
    # The command is `eval sparse-probing`, the config table `[eval.sparse_probing]`: accept both spellings.
    stage = stage.replace("-", "_")
    if stage not in classes:
        logger.error("unknown stage %r; choose one of %s", stage, ", ".join(classes))
        raise typer.Exit(code=2)
    typer.echo((classes[stage].__doc__ or "").strip())


@app.command()
def demo(
    config: Path = DemoConfigOption,
    overrides: list[str] | None = OverridesArgument,
) -> None:
    """Harvest, train the standard SAE and run the core eval on the embedded model, then print a summary.

    Overrides use a stage prefix: harvest.store=..., train.total_tokens=..., eval.core.n_eval_contexts=...
    """
    from evals.core.main import run as run_core
    from pipeline.harvest import run_harvest
    from trainer.train import train as run_train

    by_stage: dict[str, list[str]] = {"harvest": [], "train": [], "eval.core": []}
    for item in overrides or []:
        stage = next((name for name in ("eval.core", "harvest", "train") if item.startswith(name + ".")), None)
        if stage is None:
            logger.error("invalid demo override %r: prefix it with harvest., train. or eval.core.", item)
            raise typer.Exit(code=2)
        by_stage[stage].append(item[len(stage) + 1:])

    started = time.perf_counter()
    timings: dict[str, float] = {}

    harvest_cfg = _run(lambda: build_harvest_config(config, by_stage["harvest"]))
    train_cfg = _run(lambda: build_train_config(config, [f"store={harvest_cfg.store}", *by_stage["train"]]))
    core_overrides = [f"sae_path={Path(train_cfg.runs_dir) / train_cfg.run_name / 'sae'}", *by_stage["eval.core"]]
    core_cfg = _run(lambda: build_core_eval_config(config, core_overrides))

    step_start = time.perf_counter()
    store = _run(lambda: run_harvest(harvest_cfg))
    timings["harvest"] = time.perf_counter() - step_start

    step_start = time.perf_counter()
    run_dir = Path(train_cfg.runs_dir) / train_cfg.run_name
    if (run_dir / "sae" / "sae_config.json").is_file():
        logger.info("Reusing the trained SAE in %s; delete %s to train it again", run_dir / "sae", run_dir)
    else:
        resume = (run_dir / "checkpoints").is_dir()
        _run(lambda: run_train(train_cfg, resume=resume))
    timings["train"] = time.perf_counter() - step_start

    step_start = time.perf_counter()
    output = _run(lambda: run_core(core_cfg))
    timings["core eval"] = time.perf_counter() - step_start
    timings["total"] = time.perf_counter() - started

    typer.echo(format_demo_summary(store.metadata, json.loads(Path(output).read_text()), timings, output))


def format_demo_summary(metadata: Any, result: dict[str, Any], timings: dict[str, float], output: Path) -> str:
    """Render the demo's closing table from the store metadata and the core eval JSON."""
    metrics = result["eval_result_metrics"]
    sae_cfg = result["sae_cfg_dict"]
    split_counts = metadata.token_counts.get("split", {})
    rows = [
        ("model / layer", f"{metadata.model} / {metadata.layer} (d_model {metadata.d_model})"),
        ("tokens harvested", f"{sum(split_counts.values()):,} ({split_counts.get('train', 0):,} train, {split_counts.get('heldout', 0):,} held-out)"),
        ("SAE", f"{sae_cfg.get('variant', '?')}, d_sae {sae_cfg.get('d_sae')}, {sae_cfg.get('activation', '')}"),
        ("explained_variance", _fmt(metrics["reconstruction_quality"]["explained_variance"])),
        ("mse (per element)", _fmt(metrics["reconstruction_quality"]["mse"])),
        ("cossim", _fmt(metrics["reconstruction_quality"]["cossim"])),
        ("l0", _fmt(metrics["sparsity"]["l0"])),
        ("frac_alive", _fmt(metrics["misc_metrics"]["frac_alive"])),
        ("ce_loss_score", _fmt(metrics["model_performance_preservation"]["ce_loss_score"])),
        ("ce_loss without / with SAE / ablated",
         " / ".join(_fmt(metrics["model_performance_preservation"][key]) for key in ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation"))),
        ("kl_div_score", _fmt(metrics["model_behavior_preservation"]["kl_div_score"])),
        ("time (harvest / train / eval / total)", " / ".join(f"{timings[key]:.0f} s" for key in ("harvest", "train", "core eval", "total"))),
        ("results", str(output)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["", "knowsep demo summary", "-" * (width + 40)]
    lines += [f"{name.ljust(width)}  {value}" for name, value in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


@app.command()
def bench(
    what: str = BenchNameArgument,
    args: list[str] | None = BenchArgsArgument,
) -> None:
    """Run a benchmark script from bench/ (see docs/benchmarks.md)."""
    import runpy

    script = Path(__file__).resolve().parent.parent / "bench" / f"{what}.py"
    if not script.is_file():
        available = sorted(path.stem for path in script.parent.glob("*.py") if not path.stem.startswith("_"))
        logger.error("unknown benchmark %r; available: %s", what, ", ".join(available) or "none")
        raise typer.Exit(code=2)
    sys.argv = [str(script), *(args or [])]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    app()
