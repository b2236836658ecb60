"""Optimisers with parameter groups: the backbone trains at ``lr * backbone_lr_factor``."""

from __future__ import annotations

from torch import nn
from torch.optim import SGD, Adam, AdamW, Optimizer

from vireid.engine.config import OptimConfig

BACKBONE_PREFIX = "backbone."


def parameter_groups(model: nn.Module, cfg: OptimConfig, exclude: set[int] | frozenset[int] = frozenset()) -> list[dict]:
    """Two groups: parameters under ``model.backbone`` (lr × factor) and the rest (heads, lr).

    Parameters whose ``id`` is in ``exclude`` (a min-max method's adversary) and frozen ones are
    left out. Each group records its ``base_lr`` name for logging in ``group["name"]``.
    """
    backbone, heads = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in exclude:
            continue
        (backbone if name.startswith(BACKBONE_PREFIX) else heads).append(param)
    groups = [{"params": backbone, "lr": cfg.lr * cfg.backbone_lr_factor, "name": "backbone"},
              {"params": heads, "lr": cfg.lr, "name": "heads"}]
    return [g for g in groups if g["params"]]


def make_optimizer(groups: list[dict], cfg: OptimConfig, lr: float | None = None) -> Optimizer:
    """SGD (momentum, optional Nesterov), Adam or AdamW over ``groups`` (``lr`` overrides their lr)."""
    if lr is not None:
        groups = [{**g, "lr": lr} for g in groups]
    if cfg.name == "sgd":
        return SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                   nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adam":
        return Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
