"""Optional dependencies: the extra that installs each, and one clear line when one is missing.

``pip install vireid`` re-ranks, evaluates, trains and runs the demo; ``vireid[train]`` adds
TensorBoard logging, ``vireid[serve]`` the ONNX export and the search service, ``vireid[all]`` both.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from vireid.errors import InputError

#: importable module -> (the extra that installs it, its name on PyPI).
OPTIONAL: dict[str, tuple[str, str]] = {
    "tensorboard": ("train", "tensorboard"),
    "fastapi": ("serve", "fastapi"),
    "uvicorn": ("serve", "uvicorn"),
    "python_multipart": ("serve", "python-multipart"),
    "onnx": ("serve", "onnx"),
    "onnxruntime": ("serve", "onnxruntime"),
}


class MissingExtra(InputError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (a key of :data:`OPTIONAL`) or raise :class:`MissingExtra` naming ``purpose``."""
    extra, package = OPTIONAL[module]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{purpose} needs {package}, which is not installed: pip install 'vireid[{extra}]'") from None
