"""Parsing helpers shared by the sub-commands."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from vireid.errors import InputError


def parse_key_values(items: Iterable[str], option: str, *, typed: bool = True) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{"k": v}``.

    ``typed``: values read as YAML scalars (``10`` -> int, ``indoor`` -> str); otherwise kept as
    stripped strings for a validator that parses them itself (re-ranking parameters).
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise InputError(f"{option} {item!r}: expected NAME=VALUE, e.g. k1=20")
        value: Any = raw.strip()
        if typed:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                pass
        out[key.strip()] = value
    return out
