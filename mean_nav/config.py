"""Typed configs: dataclasses filled from YAML with errors that name the field.

Every subsystem declares its config as a dataclass and loads it with
`load_config(path, Cls)` or `from_dict(Cls, mapping)`. Ranges and units are declared
where the field is declared, with `bounded`:

    top_k: int = bounded(4, ge=1, le=1000)
    gate_chi2: float = bounded(13.8, gt=0, le=1e6)
    max_rate_hz: float = bounded(5.0, gt=0, le=1000, unit="Hz")

Checked for every field, declared or not: the type; finiteness (NaN and inf are refused
unless the field says `allow_nan`/`allow_inf`); integers within int64; no NUL byte in text.
Unknown keys, keys that are not names and missing required fields are refused. Every
failure is one MeanNavError naming `file: section.field`, the rule and what to do.

Text files from users and field systems are read with `read_text` (size limit, UTF-8 with
a clear error on bad bytes) and YAML with `parse_yaml` (alias expansion and nesting limits,
so a billion-laughs document fails in milliseconds instead of filling the memory).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from .errors import MeanNavError

T = TypeVar("T")

MAX_YAML_BYTES = 1 << 20          # configs, camera and flight YAML are a few kB
MAX_YAML_NODES = 100_000          # after alias expansion
MAX_YAML_DEPTH = 64
INT64 = 2 ** 63

_short_repr = reprlib.Repr()
_short_repr.maxstring = _short_repr.maxother = 60
_short_repr.maxlist = _short_repr.maxtuple = _short_repr.maxdict = 6
_short_repr.maxlevel = 3


def show(value: Any) -> str:
    """repr for error messages: bounded in size and time whatever the value."""
    return _short_repr.repr(value)


# ----------------------------------------------------------------------- declarations

@dataclasses.dataclass(frozen=True)
class Limits:
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    unit: str = ""
    allow_nan: bool = False
    allow_inf: bool = False

    def describe(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        parts = [f"{op} {bound:g}{unit}" for op, bound in
                 ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)) if bound is not None]
        return " and ".join(parts) or "finite"

    def problem(self, x: float) -> str | None:
        """Why number x breaks these limits, or None."""
        if isinstance(x, int) and not -INT64 <= x < INT64:
            return f"is far out of range (must be {self.describe()})"
        x = float(x)
        if math.isnan(x):
            return None if self.allow_nan else "must be a number, not NaN"
        if math.isinf(x) and not self.allow_inf:
            return "must be finite, not inf"
        ok = ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
              and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))
        return None if ok else f"must be {self.describe()}"

    def within(self, values) -> Any:
        """Boolean numpy mask of the finite values that lie within these limits."""
        import numpy as np

        v = np.asarray(values, float)
        ok = np.isfinite(v)
        for bound, inside in ((self.ge, np.greater_equal), (self.gt, np.greater),
                              (self.le, np.less_equal), (self.lt, np.less)):
            if bound is not None:
                ok &= inside(v, bound, where=ok, out=np.zeros(v.shape, bool))
        return ok

    def check(self, x: float, where: str) -> None:
        """MeanNavError `where <rule>, got x` unless x lies within these limits."""
        problem = self.problem(x)
        if problem:
            raise MeanNavError(f"{where} {problem}, got {show(x)}; fix the value")


DEFAULT_LIMITS = Limits()


def bounded(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, unit: str = "", allow_nan: bool = False,
            allow_inf: bool = False, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose numbers (the value, or each item of a list) must lie in a range."""
    limits = Limits(ge, gt, le, lt, unit, allow_nan, allow_inf)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"limits": limits})


def _limits(f: dataclasses.Field) -> Limits:
    return f.metadata.get("limits", DEFAULT_LIMITS)


# ----------------------------------------------------------------------------- files

def read_text(path: str | Path, what: str = "file", max_bytes: int = 256 << 20) -> str:
    """A text file as str: missing, oversized and non-UTF-8 files are one clear error."""
    path = Path(path)
    if not path.is_file():
        raise MeanNavError(f"{path}: {what} not found; check the path")
    size = path.stat().st_size
    if size > max_bytes:
        raise MeanNavError(f"{path}: {what} is {size} bytes, more than the {max_bytes} allowed; "
                           "is it the right file?")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MeanNavError(f"{path}: cannot read the {what} ({exc.strerror}); check its permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise MeanNavError(f"{path}: line {line}: byte {exc.start} is not UTF-8 text; the {what} is "
                           "damaged or in another encoding, save it as UTF-8") from None


def read_csv(path: str | Path, what: str, required: Sequence[str]) -> tuple[list[str], list[tuple[int, dict]]]:
    """A CSV file with a header row -> (columns, [(line number, row dict)]); the required
    columns must be present. Bad bytes and malformed CSV are one clear error."""
    path = Path(path)
    reader = csv.DictReader(io.StringIO(read_text(path, what), newline=""))
    try:
        header = list(reader.fieldnames or [])
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        raise MeanNavError(f"{path}: line {reader.line_num}: not valid CSV ({exc}); fix or delete the row") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise MeanNavError(f"{path}: column {missing[0]!r} is missing; the {what} needs {', '.join(required)}")
    return header, rows


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader whose documents are checked for size before Python objects are built."""


def _check_expansion(node: yaml.Node, source: str) -> None:
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node, depth: int) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise MeanNavError(f"{source}: YAML alias refers to itself; remove the recursive anchor")
        if depth > MAX_YAML_DEPTH:
            raise MeanNavError(f"{source}: YAML nested more than {MAX_YAML_DEPTH} levels deep; "
                               "is it the right file?")
        active.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(c, depth + 1) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in n.value)
        active.discard(key)
        if total > MAX_YAML_NODES:
            raise MeanNavError(f"{source}: YAML expands to more than {MAX_YAML_NODES} values (aliases?); "
                               "write the values out instead of nesting aliases")
        sizes[key] = total
        return total

    size(node, 0)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> Python objects (safe tags only), with size, alias and nesting limits."""
    if len(text) > MAX_YAML_BYTES:
        raise MeanNavError(f"{source}: {len(text)} characters of YAML, more than {MAX_YAML_BYTES} allowed; "
                           "is it the right file?")
    loader = None
    try:
        loader = _LimitedLoader(text)  # its reader refuses control characters here
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise MeanNavError(f"{source}: not valid YAML ({detail}); fix the syntax") from None
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. a 5000-digit integer
        raise MeanNavError(f"{source}: a YAML value cannot be read ({show(str(exc))}); fix the value") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML file whose top level is a mapping (empty file: {})."""
    path = Path(path)
    data = parse_yaml(read_text(path, what, max_bytes=MAX_YAML_BYTES), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MeanNavError(f"{path}: expected a mapping of fields at the top level, got "
                           f"{type(data).__name__}; write `name: value` lines")
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


# ------------------------------------------------------------------------ conversion

def from_dict(cls: type[T], data: Any, source: str = "config", prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking names, types and limits recursively."""
    where = f"{source}: {prefix.rstrip('.') or 'top level'}"
    if not isinstance(data, dict):
        raise MeanNavError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if not isinstance(key, str):
            raise MeanNavError(f"{where}: key {show(key)} is not a field name; "
                               f"valid fields here: {', '.join(fields)}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise MeanNavError(f"{source}: unknown field {show(prefix + unknown[0])}; "
                           f"valid fields here: {', '.join(fields)}")
    kwargs = {name: _convert(hints[name], value, source, f"{prefix}{name}", _limits(fields[name]))
              for name, value in data.items()}
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise MeanNavError(f"{source}: required field {prefix + missing[0]!r} is missing; add it")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a __post_init__ refusing a combination
        raise MeanNavError(f"{where}: {exc}") from None


def validate(obj: T, source: str = "config", prefix: str = "") -> T:
    """Check the declared limits (and finiteness) of a dataclass built in code, e.g. from
    command-line flags; returns obj."""
    for f in dataclasses.fields(obj):
        _check_built(getattr(obj, f.name), _limits(f), source, f"{prefix}{f.name}")
    return obj


def _check_built(value: Any, limits: Limits, source: str, field: str) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        validate(value, source, f"{field}.")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_built(v, limits, source, f"{field}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_number(value, limits, source, field)


def _check_number(value: int | float, limits: Limits, source: str, field: str) -> None:
    limits.check(value, f"{source}: field {field!r}")


def _convert(tp: Any, value: Any, source: str, field: str, limits: Limits = DEFAULT_LIMITS) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad() -> MeanNavError:
        return MeanNavError(f"{source}: field {field!r} should be {_type_name(tp)}, got "
                            f"{type(value).__name__} {show(value)}; fix the value")

    if tp is Any:
        _check_plain(value, limits, source, field)
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:
            return _convert(real[0], value, source, field, limits)
        for arg in real:
            try:
                return _convert(arg, value, source, field, limits)
            except MeanNavError:
                continue
        raise bad()
    if origin is typing.Literal:
        if type(value) in {type(a) for a in args} and value in args:
            return value
        raise MeanNavError(f"{source}: field {field!r} must be one of {list(args)}, got {show(value)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, f"{field}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise MeanNavError(f"{source}: field {field!r} needs {len(args)} values, got {len(value)}")
            return tuple(_convert(a, v, source, f"{field}[{i}]", limits)
                         for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_convert(item, v, source, f"{field}[{i}]", limits) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad()
        if not args:
            _check_plain(value, limits, source, field)
            return dict(value)
        key_type, value_type = args
        return {_convert(key_type, k, source, f"{field} key", limits):
                _convert(value_type, v, source, f"{field}[{show(k)}]", limits) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            _check_number(value, limits, source, field)
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_number(value, limits, source, field)
            return float(value)
        raise bad()
    if tp in (str, Path):
        if not isinstance(value, str):
            raise bad()
        if "\x00" in value:
            raise MeanNavError(f"{source}: field {field!r} contains a NUL character; fix the text")
        return Path(value) if tp is Path else value
    return value


def _check_plain(value: Any, limits: Limits, source: str, field: str) -> None:
    """Finiteness (and the field's limits) of every number inside a free-form value."""
    stack = [(value, field)]
    while stack:
        v, where = stack.pop()
        if isinstance(v, dict):
            stack += [(item, f"{where}[{show(k)}]") for k, item in v.items()]
        elif isinstance(v, (list, tuple)):
            stack += [(item, f"{where}[{i}]") for i, item in enumerate(v)]
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            _check_number(v, limits, source, where)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
