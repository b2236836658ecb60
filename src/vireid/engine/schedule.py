"""Learning-rate schedule: linear warm-up, then multi-step decay, evaluated per iteration.

The schedule is a function of training progress in epochs, so it holds no state of its own:
after a resume -- with any number of processes -- the rate follows from where training stands.
Every optimiser of the run (the main one and a min-max method's adversary) follows it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from torch.optim import Optimizer

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


class EpochSchedule:
    """Sets ``lr = base_lr * lr_factor`` in every parameter group of ``optimizers``.

    ``base_lr`` is each group's ``lr`` when the schedule is built (kept as ``initial_lr``).
    """

    def __init__(self, optimizers: Sequence[Optimizer], cfg: ScheduleConfig, steps_per_epoch: int) -> None:
        self.optimizers = list(optimizers)
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])

    def set_position(self, epoch: int, step_in_epoch: int) -> float:
        """Set the rates for the step about to run; returns the factor."""
        factor = lr_factor(epoch * self.steps_per_epoch + step_in_epoch, self.steps_per_epoch, self.cfg)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
        return factor
