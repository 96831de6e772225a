"""Collect the results of every variant of an experiment from disk.

An experiment directory contains one run directory per variant (``runs/demo/standard``,
``runs/demo/fixed``, ...). Each run may have eval results under ``evals/``, a training
log, a pruning log, and a saved SAE with masks and a separation report. Every piece is
optional: a missing one is recorded as ``missing`` so that the report shows "not run",
and a file that fails to parse is recorded as ``invalid`` with the error, so that the
report shows it instead of silently dropping it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from evals.bounds.schema import EVAL_TYPE_ID_BOUNDS, BoundsEvalOutput
from evals.common import EVALS_DIRNAME
from evals.core.schema import EVAL_TYPE_ID_CORE, CoreEvalOutput
from evals.crossval.schema import EVAL_TYPE_ID_CROSSVAL, CrossvalEvalOutput
from evals.report.config import ReportConfig
from evals.sparse_probing.schema import EVAL_TYPE_ID_SPARSE_PROBING, SparseProbingEvalOutput
from evals.unlearning.schema import EVAL_TYPE_ID_UNLEARNING, UnlearningEvalOutput
from stores.masks import MaskError, PackedMask, packed_width
from trainer.pruning.events import PRUNING_LOG_FILE
from trainer.pruning.tracking import SEPARATION_FILE
from trainer.saes.masked import ENCODER_MASK_NAME, MASKS_GROUP
from trainer.train import SAE_DIR, TRAIN_LOG_FILE

logger = logging.getLogger(__name__)

#: Variants listed first, in this order, when the config does not list them.
PREFERRED_ORDER = ("standard", "fixed", "adaptive")

#: Rows of the packed mask unpacked at once when the density image is built, which
#: bounds the dense copy at this many rows times d_model bytes.
MASK_ROWS_PER_CHUNK = 4096


T = TypeVar("T")


class ReportInputError(ValueError):
    """An experiment directory or variant list the report cannot read."""


@dataclass
class Section(Generic[T]):
    """One piece of a run's results: its parsed value, or why there is none.

    Attributes:
        status: ``ok`` (parsed), ``missing`` (the file does not exist: the step was not
            run) or ``invalid`` (the file exists but could not be read).
        path: File or directory the section was read from.
        value: The parsed result; None unless status is ``ok``.
        error: Why the file could not be read; None unless status is ``invalid``.
    """

    status: Literal["ok", "missing", "invalid"]
    path: Path
    value: T | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the section was read."""
        return self.status == "ok"


@dataclass
class MaskDensity:
    """A masked SAE's encoder mask, averaged over blocks for display.

    Attributes:
        grid_RC: Fraction of connections kept in each block, rows over latents and
            columns over input dimensions.
        row_density_F: Fraction of input dimensions each latent keeps, shape (d_sae,).
        shape: Shape (d_sae, d_model) of the full mask.
        density: Fraction of all connections kept.
    """

    grid_RC: np.ndarray
    row_density_F: np.ndarray
    shape: tuple[int, int]
    density: float


@dataclass
class VariantResults:
    """Everything found in one run directory.

    Attributes:
        name: Name of the run directory, used as the variant's label.
        run_dir: The run directory.
        core: The core eval result (``evals/core.json``).
        unlearning: The unlearning eval result (``evals/unlearning.json``).
        sparse_probing: The sparse probing result (``evals/sparse_probing.json``).
        bounds: The separation bounds result (``evals/separation_bounds.json``).
        train_log: Rows of ``train_log.jsonl``.
        pruning_log: Rows of ``pruning_log.jsonl``; missing for a dense variant.
        separation: ``sae/separation.json``, the training-time separation report.
        mask: Density image of ``sae/masks/encoder``; missing for a dense variant.
    """

    name: str
    run_dir: Path
    core: Section[CoreEvalOutput]
    unlearning: Section[UnlearningEvalOutput]
    sparse_probing: Section[SparseProbingEvalOutput]
    bounds: Section[BoundsEvalOutput]
    train_log: Section[list[dict[str, Any]]]
    pruning_log: Section[list[dict[str, Any]]]
    separation: Section[dict[str, Any]]
    mask: Section[MaskDensity]


@dataclass
class ExperimentResults:
    """The results of every variant of one experiment.

    Attributes:
        experiment_dir: The experiment directory.
        variants: Results by variant name, in report order.
        crossval: The cross-validation result: ``<experiment_dir>/crossval/evals/crossval.json``
            (where ``knowsep crossval`` writes it by default), else the only
            ``<experiment_dir>/*/evals/crossval.json``.
    """

    experiment_dir: Path
    variants: dict[str, VariantResults]
    crossval: Section[CrossvalEvalOutput]


def read_json(path: Path) -> Any:
    """Parse a JSON file; NaN and infinities in it are rejected as invalid JSON."""

    def reject_constant(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject_constant)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse a JSON-lines file into a list of objects, naming the line of a bad record."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"line {line_number}: {error}") from error
            if not isinstance(row, dict):
                raise ValueError(f"line {line_number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def load_section(path: Path, parse: Callable[[Path], T]) -> Section[T]:
    """Read one file into a Section; a missing file is ``missing``, a failed parse ``invalid``."""
    if not path.exists():
        return Section(status="missing", path=path)
    try:
        return Section(status="ok", path=path, value=parse(path))
    except (OSError, ValueError, ValidationError, MaskError) as error:
        # NOTE: a pydantic ValidationError lists every invalid field, which can be long;
        # the report shows it whole, because a shortened message could hide the cause.
        logger.warning("could not read %s: %s", path, error)
        return Section(status="invalid", path=path, error=f"{type(error).__name__}: {error}")


def eval_result_parser(model: type[BaseModel], eval_type_id: str) -> Callable[[Path], Any]:
    """Return a parser that validates a result JSON against its pydantic schema."""

    def parse(path: Path) -> Any:
        payload = read_json(path)
        if not isinstance(payload, dict) or payload.get("eval_type_id") != eval_type_id:
            found = payload.get("eval_type_id") if isinstance(payload, dict) else type(payload).__name__
            raise ValueError(f"expected eval_type_id {eval_type_id!r}, found {found!r}")
        return model.model_validate(payload)

    return parse


def read_json_object(path: Path) -> dict[str, Any]:
    """Parse a JSON file that must hold an object."""
    payload = read_json(path)
    if not isinstance(payload, dict):
        raise ValueError(f"expected a JSON object, got {type(payload).__name__}")
    return payload


def mask_density(directory: Path, grid: tuple[int, int]) -> MaskDensity:
    """Average a saved encoder mask over blocks of latents and input dimensions.

    The packed rows are unpacked ``MASK_ROWS_PER_CHUNK`` at a time, so the dense mask
    of a large SAE is never held whole. Blocks are as even as ``np.array_split`` makes
    them; with fewer latents or dimensions than grid cells, each cell is one of them.
    """
    mask = PackedMask.load(directory, ENCODER_MASK_NAME)
    rows, cols = mask.shape
    n_grid_rows, n_grid_cols = min(grid[0], rows), min(grid[1], cols)
    row_edges = np.linspace(0, rows, n_grid_rows + 1).round().astype(np.int64)
    col_edges = np.linspace(0, cols, n_grid_cols + 1).round().astype(np.int64)

    data_RB = mask.data.cpu().numpy()
    assert data_RB.shape[1] == packed_width(cols)
    row_counts_F = np.zeros(rows, dtype=np.int64)
    block_counts_RC = np.zeros((rows, n_grid_cols), dtype=np.int64)
    for start in range(0, rows, MASK_ROWS_PER_CHUNK):
        stop = min(rows, start + MASK_ROWS_PER_CHUNK)
        dense_RC = np.unpackbits(data_RB[start:stop], axis=1, count=cols, bitorder="little")
        row_counts_F[start:stop] = dense_RC.sum(axis=1)
        block_counts_RC[start:stop] = np.add.reduceat(dense_RC, col_edges[:-1], axis=1)

    # Sum the per-row block counts over row blocks, then divide by each block's size.
    counts_GC = np.add.reduceat(block_counts_RC, row_edges[:-1], axis=0)
    sizes_GC = np.outer(np.diff(row_edges), np.diff(col_edges))
    return MaskDensity(
        grid_RC=counts_GC / sizes_GC,
        row_density_F=row_counts_F / cols,
        shape=(rows, cols),
        density=float(row_counts_F.sum() / (rows * cols)),
    )


def is_run_dir(path: Path) -> bool:
    """Return whether a directory is a run: it has a training log or a saved SAE, or evals other than a cross-validation."""
    if not path.is_dir():
        return False
    if (path / TRAIN_LOG_FILE).exists() or (path / SAE_DIR).exists():
        return True
    evals_dir = path / EVALS_DIRNAME
    return evals_dir.is_dir() and any(
        entry.name != f"{EVAL_TYPE_ID_CROSSVAL}.json" for entry in evals_dir.glob("*.json")
    )


def find_variants(experiment_dir: Path, requested: list[str] | None) -> list[str]:
    """Return the run directories to report, in report order."""
    if requested is not None:
        missing = [name for name in requested if not (experiment_dir / name).is_dir()]
        if missing:
            raise ReportInputError(
                f"variant directories {missing} not found in {experiment_dir}; "
                "train them first or remove them from variants"
            )
        return list(requested)
    found = sorted(path.name for path in experiment_dir.iterdir() if is_run_dir(path))
    preferred = [name for name in PREFERRED_ORDER if name in found]
    return preferred + [name for name in found if name not in preferred]


def collect_variant(run_dir: Path, mask_grid: tuple[int, int]) -> VariantResults:
    """Read every result of one run directory."""
    evals_dir = run_dir / EVALS_DIRNAME
    sae_dir = run_dir / SAE_DIR
    masks_dir = sae_dir / MASKS_GROUP
    return VariantResults(
        name=run_dir.name,
        run_dir=run_dir,
        core=load_section(
            evals_dir / f"{EVAL_TYPE_ID_CORE}.json",
            eval_result_parser(CoreEvalOutput, EVAL_TYPE_ID_CORE),
        ),
        unlearning=load_section(
            evals_dir / f"{EVAL_TYPE_ID_UNLEARNING}.json",
            eval_result_parser(UnlearningEvalOutput, EVAL_TYPE_ID_UNLEARNING),
        ),
        sparse_probing=load_section(
            evals_dir / f"{EVAL_TYPE_ID_SPARSE_PROBING}.json",
            eval_result_parser(SparseProbingEvalOutput, EVAL_TYPE_ID_SPARSE_PROBING),
        ),
        bounds=load_section(
            evals_dir / f"{EVAL_TYPE_ID_BOUNDS}.json",
            eval_result_parser(BoundsEvalOutput, EVAL_TYPE_ID_BOUNDS),
        ),
        train_log=load_section(run_dir / TRAIN_LOG_FILE, read_jsonl),
        pruning_log=load_section(run_dir / PRUNING_LOG_FILE, read_jsonl),
        separation=load_section(sae_dir / SEPARATION_FILE, read_json_object),
        mask=load_section(
            masks_dir / ENCODER_MASK_NAME, lambda _: mask_density(masks_dir, mask_grid)
        ),
    )


def find_crossval(experiment_dir: Path) -> Section[CrossvalEvalOutput]:
    """Read the experiment's cross-validation result, or record it as missing."""
    default = experiment_dir / "crossval" / EVALS_DIRNAME / f"{EVAL_TYPE_ID_CROSSVAL}.json"
    parse = eval_result_parser(CrossvalEvalOutput, EVAL_TYPE_ID_CROSSVAL)
    if default.exists():
        return load_section(default, parse)
    found = sorted(experiment_dir.glob(f"*/{EVALS_DIRNAME}/{EVAL_TYPE_ID_CROSSVAL}.json"))
    if len(found) > 1:
        raise ReportInputError(
            f"several cross-validation results in {experiment_dir}: {[str(path) for path in found]}; "
            "keep one, or move the others out of the experiment directory"
        )
    if found:
        return load_section(found[0], parse)
    return Section(status="missing", path=default)


def collect(cfg: ReportConfig) -> ExperimentResults:
    """Read the results of every variant of ``cfg.experiment_dir``."""
    experiment_dir = Path(cfg.experiment_dir)
    if not experiment_dir.is_dir():
        raise ReportInputError(
            f"experiment directory {experiment_dir} not found; train the variants first "
            "(e.g. `just experiment`) or set experiment_dir"
        )
    names = find_variants(experiment_dir, cfg.variants)
    if not names:
        raise ReportInputError(
            f"no run directories in {experiment_dir}: none of its subdirectories has a "
            f"{TRAIN_LOG_FILE}, an {EVALS_DIRNAME}/ or an {SAE_DIR}/ folder"
        )

    grid = (cfg.mask_grid[0], cfg.mask_grid[1])
    variants = {name: collect_variant(experiment_dir / name, grid) for name in names}
    results = ExperimentResults(
        experiment_dir=experiment_dir, variants=variants, crossval=find_crossval(experiment_dir)
    )
    for name, variant in variants.items():
        found = [
            label
            for label, section in (
                ("core", variant.core),
                ("unlearning", variant.unlearning),
                ("sparse_probing", variant.sparse_probing),
                ("bounds", variant.bounds),
                ("train_log", variant.train_log),
                ("mask", variant.mask),
            )
            if section.ok
        ]
        logger.info("report: %s has %s", name, ", ".join(found) or "no results")
    return results
