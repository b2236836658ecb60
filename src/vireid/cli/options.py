"""Parsing helpers shared by the sub-commands."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from vireid.errors import InputError


def parse_key_values(items: Iterable[str], option: str) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{"k": v}``, values read as YAML scalars (``10`` -> int, ``indoor`` -> str)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{option} {item!r}: expected NAME=VALUE")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[key.strip()] = value
    return out
