"""Typed configuration: YAML files validated into dataclasses.

Rules:
- every key must be a field of the target dataclass; an unknown or misspelt key is an
  :class:`~vireid.errors.InputError` naming the file, the dotted key and the closest valid key;
- values are checked against the field's annotation (int, float, str, bool, Literal, Enum,
  ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]`` and nested dataclasses);
- a file may start from another with ``_base_: other.yaml`` (path relative to the file);
  mappings merge recursively, the including file wins;
- ``--set key.sub=value`` overrides are parsed as YAML scalars and validated the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vireid.errors import InputError

T = TypeVar("T")

BASE_KEY = "_base_"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, resolving ``_base_`` includes."""
    return _load_yaml(Path(path), seen=())


def _load_yaml(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise InputError(f"{path}: circular _base_ include")
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: invalid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    merged = _load_yaml(path.parent / str(base), seen + (path,))
    return deep_merge(merged, data)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (value parsed as YAML) to a nested mapping."""
    out = deep_merge({}, data)
    for item in overrides:
        if "=" not in item:
            raise InputError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise InputError(f"--set {item!r}: empty key component")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "config", prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    if not isinstance(data, Mapping):
        raise InputError(f"{source}: {prefix or '<root>'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            valid = ", ".join(sorted(fields))
            raise InputError(f"{source}: unknown key '{dotted}'{hint} (valid keys here: {valid})")
        kwargs[key] = _convert(hints[key], value, source=source, key=dotted)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise InputError(f"{source}: {prefix or '<root>'}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except InputError as exc:
            raise InputError(f"{source}: {exc}") from None
    return obj


def _convert(tp: Any, value: Any, *, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail(expected: str) -> InputError:
        return InputError(f"{source}: key '{key}': expected {expected}, got {value!r}")

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, source=source, key=key)
            except InputError as exc:
                errors.append(str(exc))
        raise fail(" or ".join(_type_name(a) for a in args))
    if origin is typing.Literal:
        if value not in args:
            raise fail("one of " + ", ".join(repr(a) for a in args))
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, source=source, prefix=key + ".")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise fail("one of " + ", ".join(repr(m.value) for m in tp)) from None
    if tp is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise fail(f"a list of {len(args)} items")
            return tuple(_convert(a, v, source=source, key=f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, source=source, key=f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise fail("a mapping")
        val_tp = args[1] if args else Any
        return {str(k): _convert(val_tp, v, source=source, key=f"{key}.{k}") for k, v in value.items()}
    if tp is Path:
        if not isinstance(value, str):
            raise fail("a path string")
        return Path(value)
    raise InputError(f"{source}: key '{key}': unsupported annotation {tp!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", repr(tp))


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain YAML/JSON-able structure (Enums by value, Paths as strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_config(cls: type[T], path: str | Path | None, overrides: Iterable[str] = ()) -> T:
    """Load YAML ``path`` (or start empty), apply ``--set`` overrides, validate into ``cls``."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return from_dict(cls, data, source=str(path) if path is not None else "--set")
