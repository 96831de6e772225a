"""The `knowsep` command: help, config errors, run naming, the justfile, and one tiny end-to-end run."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evals.core.config import CoreEvalConfig
from knowsep.cli import app, build_core_eval_config, build_harvest_config, build_train_config
from knowsep.config import load_toml
from pipeline.config import HarvestConfig
from stores.activations import ActivationStore
from tests.pipeline.conftest import make_text, tiny_model_dir, write_jsonl  # noqa: F401
from trainer.config import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.toml"
DEMO = load_toml(DEMO_CONFIG)

runner = CliRunner()


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put back the root logger after each command, because `setup_logging` replaces its handlers."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


# Help and describe


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("harvest", "train", "eval", "crossval", "demo", "bench", "describe"):
        assert command in result.output, command


def test_eval_help_lists_core():
    result = runner.invoke(app, ["eval", "--help"])
    assert result.exit_code == 0
    assert "core" in result.output


@pytest.mark.parametrize(
    ("stage", "config_class"),
    [("harvest", HarvestConfig), ("train", TrainConfig), ("eval.core", CoreEvalConfig)],
)
def test_describe_documents_every_field(stage: str, config_class: type):
    result = runner.invoke(app, ["describe", stage])
    assert result.exit_code == 0
    assert result.output.strip() == (config_class.__doc__ or "").strip()
    for field in dataclasses.fields(config_class):
        assert f"{field.name}:" in result.output, f"{stage} does not document {field.name}"


def test_describe_train_fields():
    result = runner.invoke(app, ["describe", "train"])
    assert "store: path of the activation store" in result.output
    assert 'activation: "relu" (trained with an L1 penalty) or "topk"' in result.output


def test_describe_unknown_stage():
    result = runner.invoke(app, ["describe", "unlearning"])
    assert result.exit_code == 2
    assert "unknown stage 'unlearning'; choose one of harvest, train, eval.core" in result.output


# Failures: exit code 2 and one line


def test_crossval_missing_run(tmp_path):
    result = runner.invoke(app, ["crossval", "--config", str(DEMO_CONFIG), f"runs_dir={tmp_path}"])
    assert result.exit_code == 2
    assert "no SAE at" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["harvest"], ["train"], ["eval", "core"]])
def test_invalid_override_is_one_line(command: list[str]):
    result = runner.invoke(app, [*command, "--config", str(DEMO_CONFIG), "novalue"])
    assert result.exit_code == 2
    lines = error_lines(result.output)
    assert len(lines) == 1, lines
    assert "invalid override 'novalue': write it as field=value" in lines[0]
    assert "Traceback" not in result.output


def test_invalid_value_is_one_line():
    result = runner.invoke(app, ["train", "--config", str(DEMO_CONFIG), "activation=gelu"])
    assert result.exit_code == 2
    lines = error_lines(result.output)
    assert len(lines) == 1, lines
    assert "invalid value 'gelu' for activation: choose one of 'relu', 'topk'" in lines[0]


def test_missing_config_names_path(tmp_path: Path):
    missing = tmp_path / "missing.toml"
    result = runner.invoke(app, ["train", "--config", str(missing)])
    assert result.exit_code == 2
    lines = error_lines(result.output)
    assert len(lines) == 1, lines
    assert f"config file not found: {missing}" in lines[0]


def test_missing_required_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # No --config and no configs/demo.toml in the working directory: built-in defaults only.
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2
    assert "using the built-in defaults" in result.output
    lines = [line for line in error_lines(result.output) if "using the built-in defaults" not in line]
    assert len(lines) == 1, lines
    assert "missing required field(s) store for TrainConfig" in lines[0]


def test_unknown_benchmark_lists_available():
    result = runner.invoke(app, ["bench", "nosuch"])
    assert result.exit_code == 2
    assert "unknown benchmark 'nosuch'; available: " in result.output
    available = sorted(path.stem for path in (REPO_ROOT / "bench").glob("*.py") if not path.stem.startswith("_"))
    assert available
    assert f"available: {', '.join(available)}" in result.output


def test_demo_override_needs_stage_prefix():
    result = runner.invoke(app, ["demo", "--config", str(DEMO_CONFIG), "d_sae=8"])
    assert result.exit_code == 2
    assert "invalid demo override 'd_sae=8': prefix it with harvest., train. or eval.core." in result.output


# Building stage configs


def test_variant_names_run():
    cfg = build_train_config(DEMO_CONFIG, ["variant=fixed"])
    assert cfg.variant == "fixed"
    assert cfg.run_name == "fixed"
    assert cfg.store == DEMO["harvest"]["store"]
    assert cfg.runs_dir == DEMO["train"]["runs_dir"]


def test_explicit_run_name_kept():
    cfg = build_train_config(DEMO_CONFIG, ["variant=fixed", "run_name=mine"])
    assert cfg.variant == "fixed"
    assert cfg.run_name == "mine"


def test_default_run_is_standard():
    cfg = build_train_config(DEMO_CONFIG, [])
    assert cfg.variant == "standard"
    assert cfg.run_name == "standard"


def test_file_variant_names_run(tmp_path: Path):
    config = tmp_path / "c.toml"
    config.write_text('[harvest]\nstore = "s"\n\n[train]\nvariant = "fixed"\n')
    assert build_train_config(config, []).run_name == "fixed"

    config.write_text('[harvest]\nstore = "s"\n\n[train]\nvariant = "fixed"\nrun_name = "mine"\n')
    assert build_train_config(config, []).run_name == "mine"
    # A variant override renames the run, so that it cannot overwrite the file's run.
    assert build_train_config(config, ["variant=adaptive"]).run_name == "adaptive"


def test_variant_with_slash_rejected():
    with pytest.raises(ValueError, match="invalid run_name 'a/b'"):
        build_train_config(DEMO_CONFIG, ["variant=a/b"])


def test_cli_train_names_run_after_variant(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    seen: list[TrainConfig] = []

    def fake_train(cfg: TrainConfig, resume: bool = False) -> Path:
        seen.append(cfg)
        return tmp_path / cfg.run_name

    monkeypatch.setattr("trainer.train.train", fake_train)
    result = runner.invoke(app, ["train", "--config", str(DEMO_CONFIG), "variant=fixed"])
    assert result.exit_code == 0, result.output
    assert [cfg.run_name for cfg in seen] == ["fixed"]
    assert f"run: {tmp_path / 'fixed'}" in result.output


def test_harvest_config_takes_model_table():
    cfg = build_harvest_config(DEMO_CONFIG, ["model.layer=3", "context_size=64"])
    assert cfg.model.name == DEMO["model"]["name"]
    assert cfg.model.layer == 3
    assert cfg.context_size == 64
    assert [corpus.name for corpus in cfg.corpora] == [corpus["name"] for corpus in DEMO["harvest"]["corpora"]]


def test_core_eval_config_picks_run():
    cfg = build_core_eval_config(DEMO_CONFIG, ["variant=fixed", "n_eval_contexts=2"])
    assert cfg.sae_path == str(Path(DEMO["train"]["runs_dir"]) / "fixed" / "sae")
    assert cfg.n_eval_contexts == 2
    assert cfg.dtype == DEMO["model"]["dtype"]
    assert cfg.device == DEMO["model"]["device"]


def test_file_sae_path_needs_no_train_table(tmp_path: Path):
    config = tmp_path / "eval.toml"
    config.write_text('[eval.core]\nsae_path = "elsewhere/sae"\n')

    cfg = build_core_eval_config(config, [])

    assert cfg.sae_path == "elsewhere/sae"


def test_command_line_run_beats_file_sae_path(tmp_path: Path):
    config = tmp_path / "eval.toml"
    config.write_text(
        '[train]\nstore = "runs/store"\nruns_dir = "runs"\n\n[eval.core]\nsae_path = "elsewhere/sae"\n'
    )

    cfg = build_core_eval_config(config, ["variant=fixed"])

    assert cfg.sae_path == str(Path("runs") / "fixed" / "sae")


def test_command_line_sae_path_beats_run(tmp_path: Path):
    cfg = build_core_eval_config(DEMO_CONFIG, ["variant=fixed", "sae_path=mine/sae"])

    assert cfg.sae_path == "mine/sae"


# The justfile


def test_just_lists_recipes():
    just = shutil.which("just")
    if just is None:
        pytest.skip("`just` is not on PATH; install it with `pip install rust-just`")
    listing = subprocess.run(
        [just, "--list", "--justfile", str(REPO_ROOT / "justfile"), "--working-directory", str(REPO_ROOT)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    recipes = {line.split()[0] for line in listing.splitlines()[1:] if line.strip()}
    for recipe in ("harvest", "train", "crossval", "demo", "test", "bench"):
        assert recipe in recipes, recipe


# End to end on a tiny model


def write_tiny_config(root: Path, model_dir: Path) -> Path:
    """Write three tiny JSONL corpora and a TOML config that harvests, trains and evaluates on them."""
    bio = write_jsonl(root / "bio.jsonl", [{"text": make_text(30 + 5 * i, seed=i)} for i in range(16)])
    wiki = write_jsonl(root / "wiki.jsonl", [{"text": make_text(40 + i, seed=100 + i)} for i in range(16)])
    quiz = write_jsonl(
        root / "quiz.jsonl",
        [
            {"question": make_text(8, seed=200 + i), "choices": ["w1", "w2", "w3", "w4"], "answer": i % 4}
            for i in range(12)
        ],
    )
    config = root / "tiny.toml"
    config.write_text(
        f"""
[model]
name = "{model_dir}"
layer = 1
dtype = "float32"
device = "cpu"

[harvest]
store = "{root / 'store'}"
context_size = 16
batch_size = 8
shard_contexts = 16
n_folds = 2
heldout_fraction = 0.3

[[harvest.corpora]]
name = "quiz"
kind = "mcq"
domain = "forget"
local = "{quiz}"

[[harvest.corpora]]
name = "bio"
domain = "forget"
local = "{bio}"

[[harvest.corpora]]
name = "wiki"
domain = "retain"
local = "{wiki}"

[train]
runs_dir = "{root / 'runs'}"
d_sae = 64
activation = "topk"
k = 4
batch_size = 64
total_tokens = 640
lr = 1e-3
lr_warmup_steps = 0
lr_decay_steps = 0
log_every = 2
checkpoint_every = 0
dead_window = 1_000
progress_bar = false

[eval.core]
n_eval_tokens = 200
n_eval_contexts = 4
batch_size = 64
""",
        encoding="utf-8",
    )
    return config


def test_harvest_train_eval_end_to_end(tmp_path: Path, tiny_model_dir: Path):  # noqa: F811
    config = write_tiny_config(tmp_path, tiny_model_dir)

    harvested = runner.invoke(app, ["harvest", "--config", str(config)])
    assert harvested.exit_code == 0, harvested.output
    assert f"store: {tmp_path / 'store'}" in harvested.output
    store = ActivationStore.open(tmp_path / "store")
    assert [corpus["name"] for corpus in store.metadata.corpora] == ["quiz", "bio", "wiki"]
    assert store.metadata.layer == 1
    assert store.n_tokens() > 0

    trained = runner.invoke(app, ["train", "--config", str(config)])
    assert trained.exit_code == 0, trained.output
    run_dir = tmp_path / "runs" / "standard"
    assert f"run: {run_dir}" in trained.output
    assert (run_dir / "sae" / "sae.safetensors").is_file()
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [2, 4, 6, 8, 10]

    evaluated = runner.invoke(app, ["eval", "core", "--config", str(config)])
    assert evaluated.exit_code == 0, evaluated.output
    output = run_dir / "evals" / "core.json"
    assert f"results: {output}" in evaluated.output
    result = json.loads(output.read_text())
    assert result["eval_type_id"] == "core"
    assert result["sae_cfg_dict"]["variant"] == "standard"
    assert result["eval_config"]["n_eval_contexts"] == 4
    metrics = result["eval_result_metrics"]
    assert math.isfinite(metrics["reconstruction_quality"]["explained_variance"])
    assert math.isfinite(metrics["model_performance_preservation"]["ce_loss_with_sae"])
