"""Load stage configs from TOML files and ``key=value`` command-line overrides.

Every stage has a dataclass config whose class docstring documents each field. A TOML
file may contain one table per stage (``[harvest]``, ``[train]``, ``[eval.core]``).
Overrides name a field of the stage's dataclass, or a dotted path into a nested
dataclass field (``model.layer=6``).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid config file, table, field or value."""


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, with an error that names the file when it is missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}. Pass an existing TOML file, e.g. configs/demo.toml.")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"invalid TOML in {path}: {error}") from error


def get_table(data: dict[str, Any], dotted: str) -> dict[str, Any]:
    """Return the nested table at ``dotted`` (e.g. ``eval.core``), or an empty dict."""
    table: Any = data
    for part in dotted.split("."):
        if not isinstance(table, dict) or part not in table:
            return {}
        table = table[part]
    if not isinstance(table, dict):
        raise ConfigError(f"[{dotted}] must be a table, got {type(table).__name__}")
    return table


def _convert(value: Any, annotation: Any, name: str) -> Any:
    """Convert a TOML value or an override string to the field's annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)

    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, name)
            except (ConfigError, ValueError, TypeError) as error:
                errors.append(str(error))
        raise ConfigError(f"invalid value {value!r} for {name}: {'; '.join(errors)}")

    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table, got {value!r}")
        return build(annotation, value, prefix=f"{name}.")

    if origin in (list, tuple):
        item_type = args[0] if args else Any
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        items = [_convert(item, item_type, f"{name}[{i}]") for i, item in enumerate(value)]
        return items if origin is list else tuple(items)

    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table, got {value!r}")
        return dict(value)

    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"invalid boolean {value!r} for {name}: use true or false")

    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"invalid integer {value!r} for {name}")
        if isinstance(value, str):
            value = value.replace("_", "")
        try:
            number = float(value) if isinstance(value, str) and ("e" in value.lower() or "." in value) else value
            converted = int(number)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"invalid integer {value!r} for {name}") from error
        if isinstance(number, float) and number != converted:
            raise ConfigError(f"invalid integer {value!r} for {name}: it has a fractional part")
        return converted

    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"invalid number {value!r} for {name}") from error

    if annotation is str or annotation is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return annotation(value)

    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"invalid value {value!r} for {name}: choose one of {', '.join(map(repr, args))}")
        return value

    return value


def build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a dict, converting each value to its field type."""
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown field(s) {', '.join(prefix + name for name in unknown)} for {cls.__name__}; "
            f"valid fields: {', '.join(sorted(fields))}"
        )
    required = [
        name
        for name, spec in fields.items()
        if spec.init
        and spec.default is dataclasses.MISSING
        and spec.default_factory is dataclasses.MISSING
        and name not in values
    ]
    if required:
        raise ConfigError(
            f"missing required field(s) {', '.join(prefix + name for name in required)} for {cls.__name__}; "
            f"set it in the config file or as an override, e.g. {prefix}{required[0]}=VALUE"
        )
    kwargs = {name: _convert(value, hints[name], prefix + name) for name, value in values.items()}
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a=1", "b.c=x"]`` into a nested dict of strings."""
    result: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"invalid override {item!r}: write it as field=value, e.g. variant=adaptive")
        table = result
        parts = key.split(".")
        for part in parts[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part}")
        table[parts[-1]] = value
    return result


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_stage_config(
    cls: type[T],
    section: str,
    config_path: str | Path | None = None,
    overrides: list[str] | None = None,
    shared: dict[str, Any] | None = None,
) -> T:
    """Build a stage config from the file's ``[section]`` table, then apply overrides.

    ``shared`` contains values taken from other tables (such as ``[model]``) that apply
    when the section does not set them itself.
    """
    values: dict[str, Any] = dict(shared or {})
    if config_path is not None:
        values = _merge(values, get_table(load_toml(config_path), section))
    values = _merge(values, parse_overrides(overrides or []))
    return build(cls, values)


def describe_fields(cls: type) -> str:
    """Return the dataclass docstring, which documents every field, for CLI help."""
    return (cls.__doc__ or "").strip()
