"""Training checkpoints without pickles: safetensors for tensors, JSON for the rest.

Layout of `<run_dir>/checkpoints/step_XXXXXXXX/`:

    sae.safetensors, sae_config.json   the SAE (`BaseSAE.save`)
    optimizer.safetensors              optimizer state tensors; param_groups and
                                       non-tensor state as JSON in the file's metadata
    rng.safetensors                    torch CPU RNG state, and CUDA RNG states if any
    rng.json                           NumPy Generator state (bit generator name and state)
    state.json                         step, tokens seen and the trainer's other state
    ...                                files of `extra_writers` (masks, caches as Zarr)
    _COMPLETE                          written last

The directory is written as `.tmp-step_XXXXXXXX-<uuid>` and renamed when complete, so
`latest_checkpoint` never returns a partial checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.saes.base import SAE_WEIGHTS_FILE, BaseSAE

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "_COMPLETE"
OPTIMIZER_FILE = "optimizer.safetensors"
TORCH_RNG_FILE = "rng.safetensors"
NUMPY_RNG_FILE = "rng.json"
STATE_FILE = "state.json"

_OPTIMIZER_METADATA_KEY = "knowsep_optimizer"
_CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8,})$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not match the run."""


def checkpoint_name(step: int) -> str:
    """Return the directory name of the checkpoint after `step` optimizer steps."""
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Return the complete checkpoints of a run, oldest first; incomplete ones are skipped."""
    directory = Path(run_dir) / CHECKPOINTS_DIR
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _CHECKPOINT_PATTERN.match(entry.name)
        if match and (entry / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Return the most recent complete checkpoint of a run, or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


# Optimizer state as tensors + JSON.


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors named `state.<param>.<key>` and JSON.

    Non-tensor per-parameter values (ints, floats, bools, None) go to the JSON part
    with the param_groups. Any other value raises TypeError.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            name = f"{param_id}.{key}"
            if torch.is_tensor(value):
                tensors[f"state.{name}"] = value.detach().contiguous().cpu()
            elif value is None or isinstance(value, (bool, int, float)):
                scalars[name] = value
            else:
                raise TypeError(f"optimizer state {name} has unsupported type {type(value).__name__}")
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild an `optimizer.state_dict()` from `flatten_optimizer_state` output."""
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = tensor
    for name, value in meta["scalars"].items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value

    # JSON turns tuples such as Adam's betas into lists; torch expects tuples there.
    param_groups = []
    for group in meta["param_groups"]:
        param_groups.append(
            {key: (tuple(value) if isinstance(value, list) and key != "params" else value) for key, value in group.items()}
        )
    return {"state": state, "param_groups": param_groups}


def _save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    tensors, meta = flatten_optimizer_state(optimizer.state_dict())
    save_file(tensors, str(path), metadata={_OPTIMIZER_METADATA_KEY: json.dumps(meta)})


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if _OPTIMIZER_METADATA_KEY not in metadata:
        raise CheckpointError(f"{path} has no optimizer metadata; it was not written by knowsep")
    tensors = _read_tensors(path)
    optimizer.load_state_dict(unflatten_optimizer_state(tensors, json.loads(metadata[_OPTIMIZER_METADATA_KEY])))


# RNG state.


def _save_rng(directory: Path, np_rng: np.random.Generator | None) -> None:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, rng_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{index}"] = rng_state
    save_file(tensors, str(directory / TORCH_RNG_FILE))
    numpy_state = None if np_rng is None else np_rng.bit_generator.state
    (directory / NUMPY_RNG_FILE).write_text(json.dumps({"numpy_generator": numpy_state}))


def _load_rng(directory: Path, np_rng: np.random.Generator | None) -> None:
    tensors = _read_tensors(directory / TORCH_RNG_FILE)
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[name] for name in sorted(tensors) if name.startswith("torch_cuda.")]
    if cuda_states:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "Checkpoint %s has CUDA RNG states for %d device(s), but %d are visible; they are not restored",
                directory,
                len(cuda_states),
                torch.cuda.device_count() if torch.cuda.is_available() else 0,
            )
    numpy_state = json.loads((directory / NUMPY_RNG_FILE).read_text())["numpy_generator"]
    if np_rng is not None and numpy_state is not None:
        np_rng.bit_generator.state = numpy_state


# Save and load.


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    sae: BaseSAE,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    np_rng: np.random.Generator | None = None,
    extra_writers: Sequence[Callable[[Path], None]] = (),
    keep: int = 3,
) -> Path:
    """Write the checkpoint after `step` steps and delete all but the `keep` newest.

    `state` is the trainer's JSON-serializable state; `step` is added to it. Each of
    `extra_writers` is called with the temporary checkpoint directory and writes its
    own files there (e.g. Zarr arrays of masks). Returns the final directory.
    """
    if keep < 1:
        raise CheckpointError(f"invalid keep {keep}: at least one checkpoint must be kept")
    checkpoints_dir = Path(run_dir) / CHECKPOINTS_DIR
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    _remove_temporary(checkpoints_dir)

    name = checkpoint_name(step)
    final = checkpoints_dir / name
    temporary = checkpoints_dir / f".tmp-{name}-{uuid.uuid4().hex}"
    try:
        temporary.mkdir()
        sae.save(temporary)
        _save_optimizer(optimizer, temporary / OPTIMIZER_FILE)
        _save_rng(temporary, np_rng)
        (temporary / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True) + "\n")
        for write in extra_writers:
            write(temporary)
        (temporary / COMPLETE_MARKER).write_text(json.dumps({"step": step}) + "\n")
        if final.exists():
            # The same step was checkpointed before (a resumed run reached it again) and
            # the new copy is complete, so the old one can go.
            shutil.rmtree(final)
        os.replace(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise

    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _remove_temporary(checkpoints_dir: Path) -> None:
    """Delete partial checkpoints that an interrupted run left behind."""
    for entry in checkpoints_dir.iterdir():
        if entry.name.startswith(".tmp-"):
            logger.info("Removing partial checkpoint %s", entry)
            shutil.rmtree(entry, ignore_errors=True)


def read_checkpoint_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Return `state.json` of a complete checkpoint."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{checkpoint_dir} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    return json.loads((checkpoint_dir / STATE_FILE).read_text())


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning a damaged or truncated file into a `CheckpointError`."""
    try:
        return load_file(str(path))
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise CheckpointError(
            f"checkpoint file {path} is damaged or unreadable ({error}); delete {path.parent} "
            "to resume from the previous checkpoint"
        ) from error


def load_checkpoint(
    checkpoint_dir: str | Path,
    sae: BaseSAE,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    np_rng: np.random.Generator | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into `sae` (in place), `optimizer` and the RNGs; return its state.

    The SAE's parameters are copied into the existing tensors, so an optimizer built on
    `sae.parameters()` keeps pointing at them.
    """
    checkpoint_dir = Path(checkpoint_dir)
    state = read_checkpoint_state(checkpoint_dir)

    tensors = _read_tensors(checkpoint_dir / SAE_WEIGHTS_FILE)
    expected = sae.state_dict()
    mismatched = sorted(
        name for name in set(expected) | set(tensors)
        if name not in tensors or name not in expected or tensors[name].shape != expected[name].shape
    )
    if mismatched:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} does not fit this SAE: tensors {mismatched} are missing or differ in shape"
        )
    sae.load_state_dict(tensors)

    if optimizer is not None:
        _load_optimizer(optimizer, checkpoint_dir / OPTIMIZER_FILE)
    if restore_rng:
        _load_rng(checkpoint_dir, np_rng)
    return state
