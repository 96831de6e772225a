"""Validation of the cross-validation config and its embedded unlearning settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from evals.crossval.config import CrossvalConfig, CrossvalConfigError


def test_defaults() -> None:
    cfg = CrossvalConfig()

    assert cfg.variants == ["standard", "fixed", "adaptive"]
    assert cfg.sae_path("fixed") == Path("runs") / "fixed-noq" / "sae"
    assert cfg.crossval_dir == Path("runs") / "crossval"
    unlearning = cfg.unlearning_config("runs/fixed-noq/sae")
    assert unlearning.n_features_list == [10]  # the cpu preset
    assert unlearning.random_seed == cfg.seed
    assert unlearning.plot is False


def test_run_names_override_suffix() -> None:
    cfg = CrossvalConfig(
        variants=["standard", "fixed"], run_suffix="", run_names={"fixed": "fixed-v2"}
    )

    assert cfg.run_name("standard") == "standard"
    assert cfg.run_name("fixed") == "fixed-v2"


def test_unlearning_strings_converted() -> None:
    # Command-line overrides arrive as strings.
    cfg = CrossvalConfig(
        unlearning={"max_questions": "16", "multipliers": "50,200", "controls": "true"}
    )
    unlearning = cfg.unlearning_config("sae")

    assert unlearning.max_questions == 16
    assert unlearning.multipliers == [50.0, 200.0]
    assert unlearning.controls is True


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mode": "bootstrap"}, "invalid mode"),
        ({"firing_rates": "auto"}, "invalid firing_rates"),
        ({"folds": 0}, "invalid folds"),
        ({"num_workers": 0}, "invalid num_workers"),
        ({"seed": -1}, "invalid seed"),
        ({"variants": []}, "variants is empty"),
        ({"variants": ["standard", "standard"]}, "more than once"),
        ({"variants": ["a/b"]}, "invalid variant"),
        ({"run_names": {"topk": "x"}}, "not in variants"),
        ({"run_names": {"standard": "../x"}}, "invalid run name"),
        ({"name": ""}, "invalid name"),
        ({"preset": "gpu"}, "unknown preset"),
        ({"unlearning": {"sae_path": "x"}}, "sets itself"),
        ({"unlearning": {"random_seed": 1}}, "sets itself"),
        ({"unlearning": {"multipliers": [-1.0]}}, "invalid multiplier"),
        ({"unlearning": {"max_questions": "many"}}, "invalid integer"),
        ({"unlearning": {"n_layers": 2}}, "unknown field"),
    ],
)
def test_invalid_values(fields: dict, message: str) -> None:
    with pytest.raises(CrossvalConfigError, match=message):
        CrossvalConfig(**fields)
