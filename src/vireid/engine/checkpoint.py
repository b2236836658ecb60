"""Training checkpoints: atomic writes, ``weights_only`` loading, exact RNG state.

A checkpoint (``RUN_DIR/checkpoints/{last,best}.pt``) is a dict of tensors and plain Python
values only, so ``torch.load(path, weights_only=True)`` reads it:

=======================  ===========================================================
``model``                the unwrapped model's ``state_dict``
``optimizer``            ``state_dict`` of the optimiser (``adversary_optimizer`` too
                         for min-max methods, ``grad_scaler`` for fp16)
``sampler``              ``{"epoch", "position", "seed"}``: the next batch to train on
``rng``                  python / numpy / torch generator states, and the CUDA generator of
                         the saving process's device (restored on the current device only, so
                         a run resumes on any number of GPUs)
``progress``             ``{"epoch", "step_in_epoch", "global_step", "global_batches",
                         "world_size"}`` (``step_in_epoch`` counts steps of ``world_size``
                         processes; ``global_batches`` counts batches of all processes)
``config``               the ``TrainConfig`` as a plain dict
``num_classes``          classifier size (to rebuild the model)
``best`` / ``history``   best validation score so far and every validation result
=======================  ===========================================================
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vireid.config import from_dict
from vireid.errors import InputError
from vireid.io import atomic_path
from vireid.models.base import ReIDModel
from vireid.models.registry import create_model

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename (never half-written)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` onto the CPU."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_DIR / LAST
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign pickle: report, don't trace back
        raise InputError(f"{path}: not a readable vireid checkpoint ({type(exc).__name__}: {exc})") from None


def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Generator states as tensors and plain values (loadable with ``weights_only``); on a CUDA
    ``device``, that device's generator (not every visible GPU's: the number may differ on resume)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore :func:`capture_rng_state`'s states; the CUDA state goes to ``device`` (if CUDA)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per visible GPU
        cuda = cuda[0] if cuda else None
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """The checkpoint file ``path`` names and a one-line description of it.

    A run folder gives its validation-selected ``best.pt`` when the run kept one, else ``last.pt``.
    """
    path = Path(path)
    if path.is_dir():
        best, last = path / CHECKPOINT_DIR / BEST, path / CHECKPOINT_DIR / LAST
        path = best if best.is_file() else last
    ckpt = load_checkpoint(path)
    progress = ckpt.get("progress", {})
    where = f"epoch {progress.get('epoch', '?')}, step {progress.get('global_step', '?')}"
    best_entry = ckpt.get("best")
    if path.name == BEST and best_entry:
        metric = str(ckpt.get("config", {}).get("eval", {}).get("metric", "mAP"))
        score = best_entry.get(metric)
        scored = f", validation {metric} {100 * score:.2f}%" if isinstance(score, float) else ""
        return path, f"{path} (selected on the validation identities: {where}{scored})"
    return path, f"{path} ({where}; {'last' if path.name == LAST else 'given'} checkpoint)"


def load_checkpoint_model(path: str | Path) -> tuple[ReIDModel, Any]:
    """Rebuild the model from the config stored in a checkpoint (file or run folder).

    Returns ``(model in eval mode on the CPU, TrainConfig)``. No pretrained weights are read:
    the checkpoint holds all of them.
    """
    from vireid.engine.config import TrainConfig

    ckpt = load_checkpoint(path)
    cfg = from_dict(TrainConfig, ckpt["config"], source=f"{path} (stored config)")
    cfg.model.pretrained = None
    model = create_model(cfg.model, int(ckpt["num_classes"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg
