"""Learning-rate schedule: linear warm-up, then multi-step decay, evaluated per iteration."""

from __future__ import annotations

import bisect

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from vireid.engine.config import ScheduleConfig


def lr_factor(step: int, steps_per_epoch: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the base lr at global ``step``.

    Warm-up (AGW): linear from ``warmup_factor`` to 1 over ``warmup_epochs`` epochs; after it,
    ``gamma ** (number of milestones <= current epoch)``.
    """
    epoch_float = step / steps_per_epoch
    if epoch_float < cfg.warmup_epochs:
        return cfg.warmup_factor + (1.0 - cfg.warmup_factor) * epoch_float / cfg.warmup_epochs
    epoch = step // steps_per_epoch
    return cfg.gamma ** bisect.bisect_right(cfg.milestones, epoch)


def build_scheduler(optimizer: Optimizer, cfg: ScheduleConfig, steps_per_epoch: int) -> LambdaLR:
    """A ``LambdaLR`` stepped once per iteration; its state is just the step count."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg))
