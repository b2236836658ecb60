"""``TrainConfig``: every setting of a training run, loaded from YAML (strict keys) + ``--set``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vireid.config import load_config
from vireid.data.transforms import TransformConfig
from vireid.errors import InputError
from vireid.models.registry import ModelConfig


@dataclass
class DataConfig:
    """Where the training images come from, how they are loaded, and the optional validation split.

    ``val_ids`` (default 0: train on every training identity, as the papers do) training
    identities, chosen with ``val_seed``, are held out of training and used for periodic
    evaluation and checkpoint selection: their infrared images query their visible images
    (``val_mode: ir_to_vis``) or the reverse. The test set is never touched during training.
    ``num_workers`` loader processes decode and augment images for training, validation and
    extraction; they persist across epochs.
    """

    dataset: str = "sysu"
    root: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    val_ids: int = 0
    val_seed: int = 0
    val_mode: Literal["ir_to_vis", "vis_to_ir"] = "ir_to_vis"
    num_workers: int = 2

    def validate(self) -> None:
        if not self.root:
            raise InputError("data.root is required (the dataset folder, or the CSV file for 'manifest')")
        if self.val_ids < 0 or self.num_workers < 0:
            raise InputError("data.val_ids and data.num_workers must be >= 0")


@dataclass
class SamplerConfig:
    """Identity-balanced cross-modality batches: ``num_ids`` × (``per_modality`` visible + infrared)."""

    num_ids: int = 8
    per_modality: int = 4
    epoch_length: Literal["images", "identities"] = "images"


@dataclass
class OptimConfig:
    """Optimiser. Parameters of the backbone get ``lr * backbone_lr_factor`` (AGW: 0.1)."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = True
    backbone_lr_factor: float = 0.1
    adversary_lr: float | None = None
    grad_clip: float | None = None

    def validate(self) -> None:
        if self.lr <= 0 or self.backbone_lr_factor < 0 or self.weight_decay < 0:
            raise InputError("optim: lr must be > 0, backbone_lr_factor and weight_decay >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise InputError(f"optim.grad_clip must be > 0 or null, got {self.grad_clip}")


@dataclass
class ScheduleConfig:
    """Linear warm-up from ``warmup_factor * lr`` over ``warmup_epochs`` (per step), then ×``gamma``
    at each epoch in ``milestones`` (AGW: 10 warm-up epochs, decay at 20 and 50)."""

    warmup_epochs: float = 10.0
    warmup_factor: float = 0.1
    milestones: list[int] = field(default_factory=lambda: [20, 50])
    gamma: float = 0.1

    def validate(self) -> None:
        if self.warmup_epochs < 0 or not 0 < self.warmup_factor <= 1:
            raise InputError("schedule: warmup_epochs must be >= 0 and warmup_factor in (0, 1]")
        if sorted(self.milestones) != list(self.milestones):
            raise InputError(f"schedule.milestones must be increasing, got {self.milestones}")


@dataclass
class EvalConfig:
    """Periodic validation: every ``period`` epochs (0: only after the last epoch); ``best`` is
    the checkpoint with the highest ``metric`` on the validation split."""

    period: int = 10
    metric: Literal["mAP", "rank1", "mINP"] = "mAP"
    batch_size: int = 64


@dataclass
class TrainConfig:
    """A whole training run.

    ``amp``: ``auto`` is bf16 autocast on a GPU that supports it, fp16 with gradient scaling on
    one that does not, and float32 on the CPU. ``compile``: ``torch.compile`` the model's forward
    pass. ``sync_bn``: synchronise BatchNorm statistics across processes (GPU only; off by default,
    since each process's batch already has the paper's composition). ``deterministic``:
    deterministic GPU kernels (slower; bit-exact resume on GPUs), otherwise cuDNN autotuning.
    """

    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    transforms: TransformConfig = field(default_factory=TransformConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    epochs: int = 80
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    compile: bool = False
    sync_bn: bool = False
    deterministic: bool = False
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    output_dir: str = "runs/baseline"
    checkpoint_every: int = 0
    log_every: int = 20
    progress_bar: bool = True

    def validate(self) -> None:
        self.data.validate()
        if self.epochs < 1:
            raise InputError(f"epochs must be >= 1, got {self.epochs}")
        if self.checkpoint_every < 0 or self.log_every < 1:
            raise InputError("checkpoint_every must be >= 0 and log_every >= 1")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be >= 1 or null, got {self.threads}")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)


def load_train_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a training YAML (``_base_`` includes allowed) and apply ``--set key=value`` overrides."""
    return load_config(TrainConfig, path, overrides)
