"""Tests of TrainConfig: validation, TOML-style building, hashing and the lr schedule."""

from __future__ import annotations

import pytest

from knowsep.config import build, describe_fields
from trainer.config import TrainConfig, TrainConfigError, lr_at


def make_config(**overrides) -> TrainConfig:
    values = {"store": "store", "batch_size": 10, "total_tokens": 100, "lr": 1.0}
    values.update(overrides)
    return TrainConfig(**values)


def test_lr_schedule_values():
    cfg = make_config(lr_warmup_steps=4, lr_decay_steps=2)
    assert cfg.total_steps == 10
    expected = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5]
    assert [lr_at(step, cfg) for step in range(10)] == pytest.approx(expected)


def test_lr_schedule_decay_reaches_small_value():
    cfg = make_config(lr_warmup_steps=0, lr_decay_steps=5)
    assert [lr_at(step, cfg) for step in range(5, 10)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])


def test_lr_schedule_overlap_takes_smaller_factor():
    cfg = make_config(lr_warmup_steps=10, lr_decay_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(4, cfg) == pytest.approx(0.5)
    assert lr_at(6, cfg) == pytest.approx(0.4)


def test_lr_schedule_constant_without_warmup_or_decay():
    cfg = make_config(lr_warmup_steps=0, lr_decay_steps=0)
    assert {lr_at(step, cfg) for step in range(10)} == {1.0}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"total_tokens": 5}, "0 training steps"),
        ({"d_sae": 0}, "invalid d_sae"),
        ({"lr": 0.0}, "invalid lr"),
        ({"adam_beta2": 1.0}, "invalid adam_beta2"),
        ({"activation": "topk", "k": 5000, "d_sae": 64}, "invalid k"),
        ({"run_name": "a/b"}, "invalid run_name"),
        ({"seed": -1}, "invalid seed"),
        ({"lr_decay_steps": -1}, "invalid lr_decay_steps"),
        ({"device": "auto"}, "invalid device 'auto': use cpu, cuda or cuda:N"),
        ({"device": "gpu0"}, "invalid device 'gpu0'"),
    ],
)
def test_invalid_values_rejected(overrides, message):
    with pytest.raises(TrainConfigError, match=message):
        make_config(**overrides)


def test_hash_ignores_logging_fields():
    base = make_config()
    assert (
        make_config(log_every=7, checkpoint_every=3, runs_dir="elsewhere").config_hash()
        == base.config_hash()
    )
    assert make_config(lr=0.5).config_hash() != base.config_hash()
    assert make_config(train_corpora=["wiki"]).config_hash() != base.config_hash()


def test_build_from_toml_values():
    cfg = build(
        TrainConfig,
        {
            "store": "s",
            "total_tokens": "10_000",
            "batch_size": "100",
            "train_corpora": "bio,wiki",
            "activation": "topk",
        },
    )
    assert cfg.total_tokens == 10000
    assert cfg.total_steps == 100
    assert cfg.train_corpora == ["bio", "wiki"]
    assert cfg.activation == "topk"


def test_docstring_documents_every_field():
    help_text = describe_fields(TrainConfig)
    for name in TrainConfig.__dataclass_fields__:
        assert f"{name}:" in help_text, name
