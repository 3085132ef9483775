"""Typed configs: dataclasses filled from YAML with errors that name the field.

Every subsystem declares its config as a dataclass (fields with defaults) and loads it
with `load_config(path, Cls)` or `from_dict(Cls, mapping)`. Unknown fields, wrong types
and missing required fields raise MeanNavError naming `file: section.field`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import MeanNavError

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MeanNavError(f"{path}: config file not found; check the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise MeanNavError(f"{path}: not valid YAML ({exc}); fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MeanNavError(f"{path}: expected a mapping of fields at the top level")
    return data


def load_config(path: str | Path, cls: type[T]) -> T:
    return from_dict(cls, load_yaml(path), source=str(path))


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict (YAML/JSON-ready; Paths become strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def from_dict(cls: type[T], data: Any, source: str = "config", prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking names and types recursively."""
    where = f"{source}: {prefix.rstrip('.') or 'top level'}"
    if not isinstance(data, dict):
        raise MeanNavError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise MeanNavError(
            f"{source}: unknown field {prefix + unknown[0]!r}; valid fields here: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, source, f"{prefix}{name}")
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise MeanNavError(f"{source}: missing required field {prefix + missing[0]!r}")
    return cls(**kwargs)


def _convert(tp: Any, value: Any, source: str, field: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = MeanNavError(f"{source}: field {field!r} should be {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, source, field)
            except MeanNavError:
                continue
        raise bad
    if origin is typing.Literal:
        if value in args:
            return value
        raise MeanNavError(f"{source}: field {field!r} must be one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, f"{field}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad
            return tuple(_convert(a, v, source, f"{field}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_convert(item, v, source, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if tp is Path:
        if isinstance(value, str):
            return Path(value)
        raise bad
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
