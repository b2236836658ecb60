"""Training engine: config, loop, checkpoints, DDP, schedule, extraction helpers.

Public entry points:

* :func:`train` — run (or resume) a training run from a :class:`TrainConfig`;
* :func:`load_train_config` — YAML + ``--set`` overrides -> :class:`TrainConfig`;
* :func:`load_checkpoint_model` — ``(model, cfg)`` rebuilt from a checkpoint;
* :func:`extract_features` — batched ``model.extract`` over image records.

Imports are lazy so ``import vireid.engine`` does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "vireid.engine.config",
    "load_train_config": "vireid.engine.config",
    "train": "vireid.engine.trainer",
    "resume_config": "vireid.engine.trainer",
    "load_checkpoint_model": "vireid.engine.checkpoint",
    "load_checkpoint": "vireid.engine.checkpoint",
    "extract_features": "vireid.engine.extraction",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vireid.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
