"""Method registry and factory (timm-style ``create_model``).

A method registers a builder and a typed parameter dataclass::

    @register_method("xiv", XIVParams)
    def build_xiv(cfg: ModelConfig, params: XIVParams, num_classes: int) -> ReIDModel: ...

``ModelConfig.params`` (a free mapping in YAML) is validated into the method's dataclass,
so unknown or misspelt parameters are errors naming the key.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from vireid.config import from_dict
from vireid.errors import InputError
from vireid.models.base import ReIDModel


@dataclass
class ModelConfig:
    """Backbone and method choice; ``params`` holds the method's own parameters."""

    method: str = "baseline"
    backbone: str = "resnet50"
    split: str = "stem"
    last_stride: int = 1
    pooling: Literal["gem", "avg"] = "gem"
    pretrained: str | None = "auto"
    channels_last: bool = False
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params_cls: type
    build: Callable[..., ReIDModel]


_METHODS: dict[str, MethodSpec] = {}

# Modules that register methods on import; imported lazily by ``create_model``.
_METHOD_MODULES = ("baseline", "xiv", "df2am", "saai", "ssft")


def register_method(name: str, params_cls: type) -> Callable[[Callable[..., ReIDModel]], Callable[..., ReIDModel]]:
    def decorator(build: Callable[..., ReIDModel]) -> Callable[..., ReIDModel]:
        if name in _METHODS and _METHODS[name].build is not build:
            raise ValueError(f"method {name!r} registered twice")
        _METHODS[name] = MethodSpec(name, params_cls, build)
        return build
    return decorator


def _import_methods() -> None:
    for module in _METHOD_MODULES:
        try:
            importlib.import_module(f"vireid.models.methods.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"vireid.models.methods.{module}":
                raise


def list_methods() -> list[str]:
    _import_methods()
    return sorted(_METHODS)


def method_params(cfg: ModelConfig) -> Any:
    """The method's typed parameters from ``cfg.params`` (errors name the key)."""
    _import_methods()
    if cfg.method not in _METHODS:
        raise InputError(f"model.method: unknown method {cfg.method!r}; available: {', '.join(sorted(_METHODS))}")
    spec = _METHODS[cfg.method]
    return from_dict(spec.params_cls, cfg.params, source=f"model.params ({cfg.method})", prefix="model.params.")


def create_model(cfg: ModelConfig, num_classes: int) -> ReIDModel:
    """Build the method model named by ``cfg.method``."""
    params = method_params(cfg)
    return _METHODS[cfg.method].build(cfg, params, num_classes)
