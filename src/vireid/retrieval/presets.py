"""The re-ranking method table: names, parameters (names, types, defaults), variants, presets.

The CLIs (``vireid rerank``, ``vireid evaluate --rerank``) and :func:`vireid.retrieval.api.rerank`
read everything from :data:`METHODS`; :func:`resolve_params` validates user values and turns
every problem into one :class:`~vireid.errors.InputError` line.

Presets carry the papers' settings per protocol: SAAI ``engine/__init__.py`` (AIM: SYSU all
single-shot 4/1, multi-shot 20/6, indoor single-shot 2/2, RegDB 8/2) and SIM's evaluation
scripts (SYSU λ 0.01, K 9, kq 12, kg 20, α 0.3; RegDB λ 0.1, K 5, kq 9, kg 20, α 0.7).
k-reciprocal re-ranking uses Zhong et al.'s 20/6/0.3 everywhere.

``MethodSpec.grid`` is the small grid that ``vireid evaluate --tune-on val`` searches on the
validation identities (the other parameters keep their preset or default values).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from vireid.errors import InputError

VARIANTS = ("reference", "paper")
PRESETS = ("sysu", "sysu-multishot", "sysu-indoor", "regdb")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method: its name, type (int or float), default and lower bound."""

    name: str
    kind: type
    default: int | float
    minimum: int | float
    help: str
    maximum: int | float | None = None


@dataclass(frozen=True)
class MethodSpec:
    """A re-ranking method: parameters, default variant and the presets' parameter values."""

    name: str
    summary: str
    params: tuple[ParamSpec, ...]
    default_variant: str
    presets: Mapping[str, Mapping[str, int | float]] = field(default_factory=dict)
    grid: Mapping[str, tuple[int | float, ...]] = field(default_factory=dict)
    """Values searched when parameters are chosen on validation identities (every combination)."""

    def param(self, name: str) -> ParamSpec:
        for spec in self.params:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def defaults(self) -> dict[str, int | float]:
        return {spec.name: spec.default for spec in self.params}


_K1_AIM = ParamSpec("k1", int, 30, 1, "affinities kept per row (SAAI Eq. 6)")
_K2_AIM = ParamSpec("k2", int, 6, 1, "gallery neighbours averaged, self included (SAAI Eq. 7); <= k1")
_LAM_SGR = ParamSpec("lam", float, 0.01, 0.0, "weight λ of gallery-gallery edges (SIM Eq. 1)")
_K_SGR = ParamSpec("K", int, 9, 1, "shortest paths averaged (SIM Eq. 5); <= k_graph")
_KGRAPH = ParamSpec("k_graph", int, 20, 1, "gallery neighbours of each gallery node, self included "
                   "(SIM Sec. 3.2, Algorithm 1 line 4)")
_KQ = ParamSpec("kq", int, 12, 1, "query nearest gallery neighbours (SIM Eq. 6)")
_KG = ParamSpec("kg", int, 20, 1, "gallery reciprocal-neighbour size (SIM Eq. 7)")
_ALPHA = ParamSpec("alpha", float, 0.3, 0.0, "weight α of the input (SGR) distance (SIM Eq. 8)", 1.0)

_SIM_SYSU = {"lam": 0.01, "K": 9, "k_graph": 20, "kq": 12, "kg": 20, "alpha": 0.3}
_SIM_REGDB = {"lam": 0.1, "K": 5, "k_graph": 20, "kq": 9, "kg": 20, "alpha": 0.7}


def _subset(values: Mapping[str, int | float], names: tuple[str, ...]) -> dict[str, int | float]:
    return {name: values[name] for name in names}


def _sim_presets(names: tuple[str, ...]) -> dict[str, dict[str, int | float]]:
    return {"sysu": _subset(_SIM_SYSU, names), "sysu-multishot": _subset(_SIM_SYSU, names),
            "sysu-indoor": _subset(_SIM_SYSU, names), "regdb": _subset(_SIM_REGDB, names)}


_KRR_PAPER = {"k1": 20, "k2": 6, "lam": 0.3}

_GRID_MNNR = {"kq": (4, 8, 12), "kg": (5, 10, 20), "alpha": (0.3, 0.6, 0.9)}

METHODS: dict[str, MethodSpec] = {
    "plain": MethodSpec("plain", "−qᵀg of L2-normalised features", (), "reference"),
    "aim": MethodSpec(
        "aim", "SAAI affinity inference (Eq. 6–10)", (_K1_AIM, _K2_AIM), "reference",
        {"sysu": {"k1": 4, "k2": 1}, "sysu-multishot": {"k1": 20, "k2": 6}, "sysu-indoor": {"k1": 2, "k2": 2},
         "regdb": {"k1": 8, "k2": 2}},
        {"k1": (2, 4, 8, 20, 30), "k2": (1, 2, 6)},
    ),
    "sgr": MethodSpec("sgr", "SIM similarity graph reasoning (Eq. 1–5)", (_LAM_SGR, _K_SGR, _KGRAPH), "paper",
                      _sim_presets(("lam", "K", "k_graph")), {"lam": (0.01, 0.1, 0.3), "K": (1, 3, 5, 9)}),
    "mnnr": MethodSpec("mnnr", "SIM mutual nearest-neighbour reasoning (Eq. 6–8)", (_KQ, _KG, _ALPHA), "paper",
                       _sim_presets(("kq", "kg", "alpha")), _GRID_MNNR),
    "sim": MethodSpec("sim", "SIM: SGR then MNNR", (_LAM_SGR, _K_SGR, _KGRAPH, _KQ, _KG, _ALPHA), "paper",
                      _sim_presets(tuple(_SIM_SYSU)),
                      {"lam": (0.01, 0.1), "K": (1, 3, 9), "kq": (4, 12), "kg": (5, 20), "alpha": (0.3, 0.6, 0.9)}),
    "krr": MethodSpec(
        "krr", "k-reciprocal re-ranking (Zhong et al. 2017)",
        (ParamSpec("k1", int, 20, 1, "k of the k-reciprocal sets (Zhong Eq. 3–4)"),
         ParamSpec("k2", int, 6, 1, "neighbours of the local query expansion, self included (Eq. 11); <= k1+1"),
         ParamSpec("lam", float, 0.3, 0.0, "weight λ of the original distance (Eq. 12)", 1.0)),
        "reference", {name: dict(_KRR_PAPER) for name in PRESETS},
        {"k1": (5, 10, 20), "k2": (1, 3, 6), "lam": (0.1, 0.3, 0.6)},
    ),
}


def get_method(name: str) -> MethodSpec:
    """The method called ``name``; unknown names raise :class:`InputError` with a suggestion."""
    try:
        return METHODS[name]
    except KeyError:
        raise InputError(f"unknown re-ranking method {name!r}{_suggest(name, METHODS)} "
                         f"(choose from {', '.join(METHODS)})") from None


def resolve_variant(method: MethodSpec, variant: str | None) -> str:
    """``variant`` checked, or the method's default."""
    if variant is None:
        return method.default_variant
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r} for method {method.name} (choose from {', '.join(VARIANTS)})")
    return variant


def resolve_params(method: MethodSpec, params: Mapping[str, object] | None = None, preset: str | None = None, *,
                   num_gallery: int | None = None) -> dict[str, int | float]:
    """Defaults, then the preset's values, then ``params`` (strings are parsed), validated.

    Checks: unknown names (with a did-you-mean), non-numeric values, integers given as
    fractions, bounds, k larger than the gallery (or pool), ``K <= k_graph``, ``k2 <= k1``.
    """
    values = method.defaults()
    if preset is not None:
        if preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}{_suggest(preset, PRESETS)} (choose from {', '.join(PRESETS)})")
        values.update(method.presets.get(preset, {}))
    names = [spec.name for spec in method.params]
    for name, raw in (params or {}).items():
        if name not in names:
            valid = ", ".join(names) if names else "none"
            raise InputError(f"unknown parameter {name!r} for method {method.name}{_suggest(name, names)} "
                             f"(valid: {valid})")
        values[name] = _parse(method.param(name), raw, method.name)
    for spec in method.params:
        value = values[spec.name]
        if value < spec.minimum or (spec.maximum is not None and value > spec.maximum):
            upper = f", <= {spec.maximum}" if spec.maximum is not None else ""
            raise InputError(f"parameter {spec.name}={value} of method {method.name} must be >= {spec.minimum}{upper}")
    _check_relations(method.name, values, num_gallery)
    return values


def _check_relations(method: str, values: Mapping[str, int | float], num_gallery: int | None) -> None:
    def at_most(name: str, limit: int, what: str, extra: int = 0) -> None:
        if values[name] + extra > limit:
            shown = f"{name}+{extra}={values[name] + extra}" if extra else f"{name}={values[name]}"
            raise InputError(f"parameter {shown} of method {method} is larger than {what} ({limit})")

    if method == "aim":
        at_most("k2", int(values["k1"]), "k1")
    if method in ("sgr", "sim"):
        at_most("K", int(values["k_graph"]), "k_graph")
    if method == "krr":
        at_most("k2", int(values["k1"]) + 1, "k1+1")
    if num_gallery is None:
        return
    if method == "aim":
        at_most("k1", num_gallery, "the gallery size")
    if method in ("sgr", "sim"):
        at_most("k_graph", num_gallery, "the gallery size")
    if method in ("mnnr", "sim"):
        at_most("kq", num_gallery, "the gallery size", extra=1)
        at_most("kg", num_gallery, "the gallery size", extra=1)
    if method == "krr":
        at_most("k1", num_gallery, "the gallery size", extra=1)


def _parse(spec: ParamSpec, raw: object, method: str) -> int | float:
    if isinstance(raw, bool):
        raise InputError(f"parameter {spec.name} of method {method} must be a number, got {raw!r}")
    try:
        value = float(raw) if isinstance(raw, str) else raw
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"parameter {spec.name} of method {method} must be a number, got {raw!r}") from None
    if not math.isfinite(number):
        raise InputError(f"parameter {spec.name} of method {method} must be finite, got {raw!r}")
    if spec.kind is int:
        if number != int(number):
            raise InputError(f"parameter {spec.name} of method {method} must be an integer, got {raw!r}")
        return int(number)
    return number


def _suggest(name: str, choices: object) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)  # type: ignore[call-overload]
    return f" (did you mean {close[0]!r}?)" if close else ""
