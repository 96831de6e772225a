"""TOML loading, override parsing and type conversion of stage configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from knowsep.config import (
    ConfigError,
    build,
    describe_fields,
    get_table,
    load_stage_config,
    load_toml,
    parse_overrides,
)


@dataclass
class Corpus:
    """A corpus.

    Attributes:
        name: Corpus name.
        max_docs: Maximum documents, or None for all.
    """

    name: str
    max_docs: int | None = None


@dataclass
class Model:
    """A model.

    Attributes:
        name: Model name.
        layer: Block index, or None for the middle block.
    """

    name: str = "tiny"
    layer: int | None = None


@dataclass
class Stage:
    """A stage with one field of every supported kind.

    Attributes:
        steps: An integer.
        lr: A float.
        verbose: A boolean.
        path: A path.
        seed: An optional integer.
        activation: One of relu or topk.
        tags: A list of strings.
        widths: A list of integers.
        options: A free-form table.
        model: A nested dataclass.
        corpora: A list of nested dataclasses.
    """

    steps: int = 10
    lr: float = 1e-3
    verbose: bool = False
    path: Path = Path("out")
    seed: int | None = 0
    activation: Literal["relu", "topk"] = "relu"
    tags: list[str] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    model: Model = field(default_factory=Model)
    corpora: list[Corpus] = field(default_factory=list)


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# TOML files


def test_load_toml(tmp_path: Path):
    path = write_toml(tmp_path / "c.toml", '[train]\nsteps = 5\n[eval.core]\nn = 2\n')
    assert load_toml(path) == {"train": {"steps": 5}, "eval": {"core": {"n": 2}}}


def test_missing_toml_names_path(tmp_path: Path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"config file not found: {missing}"):
        load_toml(missing)


def test_directory_is_not_a_toml_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_toml(tmp_path)


def test_invalid_toml_names_path(tmp_path: Path):
    path = write_toml(tmp_path / "bad.toml", "[train\nsteps = 5\n")
    with pytest.raises(ConfigError, match=f"invalid TOML in {path}") as raised:
        load_toml(path)
    assert "line 1" in str(raised.value)


def test_get_table():
    data = {"eval": {"core": {"n": 2}}, "model": {"name": "m"}, "store": "s"}
    assert get_table(data, "eval.core") == {"n": 2}
    assert get_table(data, "model") == {"name": "m"}
    assert get_table(data, "harvest") == {}
    assert get_table(data, "eval.sparse_probing") == {}
    with pytest.raises(ConfigError, match=r"\[store\] must be a table, got str"):
        get_table(data, "store")


# Overrides


def test_parse_overrides():
    parsed = parse_overrides(["steps=1", "model.layer=3", "model.name=m", "--dry-run=true", "tags="])
    assert parsed == {
        "steps": "1",
        "model": {"layer": "3", "name": "m"},
        "dry_run": "true",
        "tags": "",
    }


def test_override_value_keeps_equals_sign():
    assert parse_overrides(["path=a=b"]) == {"path": "a=b"}


@pytest.mark.parametrize("item", ["novalue", "=3", ""])
def test_invalid_override(item: str):
    with pytest.raises(ConfigError, match=f"invalid override {item!r}: write it as field=value"):
        parse_overrides([item])


def test_conflicting_overrides():
    with pytest.raises(ConfigError, match="conflicts with an earlier override of model"):
        parse_overrides(["model=tiny", "model.layer=3"])


# Type conversion


def test_convert_from_strings():
    cfg = build(
        Stage,
        {
            "steps": "1_000",
            "lr": "3e-4",
            "verbose": "yes",
            "path": "runs/x",
            "seed": "none",
            "activation": "topk",
            "tags": "a, b,,c",
            "widths": "8,16",
        },
    )
    assert cfg.steps == 1000
    assert cfg.lr == pytest.approx(3e-4)
    assert cfg.verbose is True
    assert cfg.path == Path("runs/x")
    assert cfg.seed is None
    assert cfg.activation == "topk"
    assert cfg.tags == ["a", "b", "c"]
    assert cfg.widths == [8, 16]


def test_convert_from_toml_values():
    cfg = build(Stage, {"steps": 2_000_000, "lr": 1, "verbose": False, "seed": 7, "widths": [1, 2]})
    assert cfg.steps == 2_000_000
    assert type(cfg.lr) is float
    assert cfg.verbose is False
    assert cfg.seed == 7
    assert cfg.widths == [1, 2]


@pytest.mark.parametrize(("text", "expected"), [("1e3", 1000), ("2.0", 2), ("-4", -4), ("1_024", 1024)])
def test_int_conversion(text: str, expected: int):
    assert build(Stage, {"steps": text}).steps == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2.5", "invalid integer '2.5' for steps: it has a fractional part"),
        ("ten", "invalid integer 'ten' for steps"),
        (True, "invalid integer True for steps"),
    ],
)
def test_invalid_int(value: Any, message: str):
    with pytest.raises(ConfigError, match=message):
        build(Stage, {"steps": value})


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("On", True), ("0", False), ("NO", False)])
def test_bool_conversion(text: str, expected: bool):
    assert build(Stage, {"verbose": text}).verbose is expected


def test_invalid_bool():
    with pytest.raises(ConfigError, match="invalid boolean 'maybe' for verbose: use true or false"):
        build(Stage, {"verbose": "maybe"})


def test_invalid_float():
    with pytest.raises(ConfigError, match="invalid number 'fast' for lr"):
        build(Stage, {"lr": "fast"})


def test_optional_int_rejects_text():
    with pytest.raises(ConfigError, match="invalid value 'x' for seed: invalid integer 'x' for seed"):
        build(Stage, {"seed": "x"})


@pytest.mark.parametrize("text", ["None", "null", "NONE"])
def test_none_conversion(text: str):
    assert build(Stage, {"seed": text}).seed is None


def test_literal_names_choices():
    with pytest.raises(ConfigError, match="invalid value 'gelu' for activation: choose one of 'relu', 'topk'"):
        build(Stage, {"activation": "gelu"})


def test_string_field_rejects_number():
    with pytest.raises(ConfigError, match="path must be a string, got 3"):
        build(Stage, {"path": 3})


def test_dict_field():
    assert build(Stage, {"options": {"a": 1}}).options == {"a": 1}
    with pytest.raises(ConfigError, match="options must be a table, got 'a'"):
        build(Stage, {"options": "a"})


def test_nested_dataclass_from_table():
    cfg = build(Stage, {"model": {"name": "big", "layer": "6"}})
    assert cfg.model == Model(name="big", layer=6)


def test_nested_dataclass_rejects_scalar():
    with pytest.raises(ConfigError, match="model must be a table, got 'big'"):
        build(Stage, {"model": "big"})


def test_nested_unknown_field_has_prefix():
    with pytest.raises(ConfigError, match="unknown field\\(s\\) model.depth for Model; valid fields: layer, name"):
        build(Stage, {"model": {"depth": 3}})


def test_list_of_dataclasses_from_array_of_tables(tmp_path: Path):
    path = write_toml(
        tmp_path / "c.toml",
        '[[stage.corpora]]\nname = "a"\nmax_docs = 5\n\n[[stage.corpora]]\nname = "b"\n',
    )
    cfg = load_stage_config(Stage, "stage", path)
    assert cfg.corpora == [Corpus(name="a", max_docs=5), Corpus(name="b")]


def test_list_item_error_names_index():
    with pytest.raises(ConfigError, match=r"corpora\[1\].max_docs"):
        build(Stage, {"corpora": [{"name": "a"}, {"name": "b", "max_docs": "many"}]})


def test_unknown_field_lists_valid_fields():
    with pytest.raises(ConfigError) as raised:
        build(Stage, {"stpes": 3, "lr": 1.0})
    message = str(raised.value)
    assert "unknown field(s) stpes for Stage" in message
    assert "valid fields: activation, corpora, lr, model, options, path, seed, steps, tags, verbose, widths" in message


# Stage configs from file, shared tables and overrides


def test_stage_config_precedence(tmp_path: Path):
    path = write_toml(
        tmp_path / "c.toml",
        '[model]\nname = "shared"\n\n[stage]\nsteps = 5\nlr = 0.5\n\n[stage.model]\nlayer = 2\n',
    )
    cfg = load_stage_config(
        Stage,
        "stage",
        path,
        ["lr=0.25", "model.name=override"],
        shared={"steps": 1, "verbose": True, "model": {"name": "shared", "layer": 9}},
    )
    # The file's [stage] table beats shared values, and overrides beat both.
    assert cfg.steps == 5
    assert cfg.verbose is True
    assert cfg.lr == 0.25
    assert cfg.model == Model(name="override", layer=2)


def test_stage_config_without_file():
    cfg = load_stage_config(Stage, "stage", None, ["steps=3"])
    assert cfg.steps == 3
    assert cfg.lr == 1e-3


def test_stage_config_missing_section(tmp_path: Path):
    path = write_toml(tmp_path / "c.toml", "[other]\nsteps = 5\n")
    assert load_stage_config(Stage, "stage", path) == Stage()


def test_describe_fields():
    text = describe_fields(Stage)
    assert text.startswith("A stage with one field of every supported kind.")
    assert "corpora: A list of nested dataclasses." in text
