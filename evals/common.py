"""Output helpers shared by every eval: the SAEBench result layout and atomic JSON writes.

An eval result is one JSON file, ``runs/<run>/evals/<eval_type_id>.json``, with the
top-level keys of SAEBench's ``BaseEvalOutput``. Each eval subclasses
:class:`EvalOutput` with its own metric and detail models.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

MetricsT = TypeVar("MetricsT", bound=BaseModel)
DetailT = TypeVar("DetailT")

#: Name of the folder inside a run directory that contains eval results.
EVALS_DIRNAME = "evals"


class EvalOutput(BaseModel, Generic[MetricsT, DetailT]):
    """One eval result in SAEBench's layout.

    The ``sae_bench_*`` and ``sae_lens_*`` keys exist so that SAEBench tooling can read
    the file. knowsep SAEs come neither from SAEBench nor from an SAELens release, so
    they are ``None``.
    """

    model_config = ConfigDict(ser_json_inf_nan="null")

    eval_type_id: str = Field(description="Name of the eval, e.g. 'core'.")
    eval_config: dict[str, Any] = Field(description="The eval's config, as a dict.")
    eval_id: str = Field(description="A UUID4 that identifies this eval run.")
    datetime_epoch_millis: int = Field(
        description="When the result was written, in ms since the Unix epoch."
    )
    eval_result_metrics: MetricsT = Field(description="Scalar metrics, grouped by category.")
    eval_result_details: list[DetailT] = Field(
        default_factory=list,
        description="Per-item results (e.g. one entry per latent), or an empty list.",
    )
    eval_result_unstructured: Any | None = Field(
        default=None, description="Free-form results that fit neither metrics nor details."
    )
    sae_bench_commit_hash: str | None = Field(
        default=None, description="SAEBench commit, None outside SAEBench."
    )
    sae_lens_id: str | None = Field(
        default=None, description="SAELens SAE id, None for knowsep SAEs."
    )
    sae_lens_release_id: str | None = Field(
        default=None, description="SAELens release, None for knowsep SAEs."
    )
    sae_lens_version: str | None = Field(
        default=None, description="SAELens version, None outside SAELens."
    )
    sae_cfg_dict: dict[str, Any] = Field(
        default_factory=dict,
        description="The evaluated SAE's config, with model, layer and normalization.",
    )


def new_eval_id() -> str:
    """Return a fresh UUID4 string for ``eval_id``."""
    return str(uuid.uuid4())


def epoch_millis() -> int:
    """Return the current time in milliseconds since the Unix epoch."""
    return int(time.time() * 1000)


def default_output_path(run_dir: str | Path, eval_type_id: str) -> Path:
    """Return ``<run_dir>/evals/<eval_type_id>.json``."""
    return Path(run_dir) / EVALS_DIRNAME / f"{eval_type_id}.json"


def write_json_atomic(path: str | Path, payload: str | dict[str, Any]) -> Path:
    """Write JSON to ``path`` through a temporary file in the same folder and a rename.

    A reader sees either the old file or the complete new one, never a partial write.
    ``payload`` is a JSON string or a JSON-serializable dict.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = payload if isinstance(payload, str) else json.dumps(payload, indent=2, allow_nan=False)

    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def write_eval_output(output: EvalOutput[Any, Any], path: str | Path) -> Path:
    """Serialize an eval result (NaN and infinity become ``null``) and write it atomically."""
    return write_json_atomic(path, output.model_dump_json(indent=2))


#: Two-sided 95% standard normal quantile, used by the Wilson interval.
Z_95 = 1.959963984540054


def wilson_interval(n_correct: int, n_total: int) -> tuple[float | None, float | None]:
    """Return the Wilson score 95% interval of a binomial proportion, or ``(None, None)`` when ``n_total`` is 0.

    Unlike the normal approximation, the Wilson interval stays inside [0, 1] and has
    close to nominal coverage for small ``n_total`` and proportions near 0 or 1.
    """
    if n_total == 0:
        return None, None
    proportion = n_correct / n_total
    z_squared = Z_95**2
    denominator = 1.0 + z_squared / n_total
    centre = (proportion + z_squared / (2 * n_total)) / denominator
    half_width = (
        Z_95
        * math.sqrt(proportion * (1.0 - proportion) / n_total + z_squared / (4 * n_total**2))
        / denominator
    )
    return max(0.0, centre - half_width), min(1.0, centre + half_width)
