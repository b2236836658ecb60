"""The training loop: read top to bottom (torchvision ``references/classification`` style).

``train(cfg)`` builds data, model, optimiser(s) and schedule, optionally resumes from
``RUN_DIR/checkpoints/last.pt``, trains ``cfg.epochs`` epochs, validates on identities held
out of the training set, keeps ``last.pt`` / ``best.pt`` and writes ``summary.json``.

Run folder::

    RUN_DIR/config.yaml            the full resolved config
    RUN_DIR/checkpoints/last.pt    everything needed to continue exactly (see engine.checkpoint)
    RUN_DIR/checkpoints/best.pt    model + config at the best validation score
    RUN_DIR/tensorboard/           losses, lr, validation metrics
    RUN_DIR/summary.json           final summary (also returned by ``train``)
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from vireid.config import apply_overrides, from_dict, to_dict
from vireid.data.image_dataset import ImageDataset
from vireid.data.records import ImageRecord, relabel
from vireid.data.sampler import CrossModalityBatchSampler
from vireid.data.transforms import TrainTransform
from vireid.engine import distributed
from vireid.engine.checkpoint import (
    BEST,
    CHECKPOINT_DIR,
    LAST,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from vireid.engine.config import TrainConfig
from vireid.engine.optim import make_optimizer, parameter_groups
from vireid.engine.schedule import build_scheduler
from vireid.engine.validation import split_validation_identities, validation_metrics
from vireid.errors import InputError
from vireid.io import write_json_atomic, write_text_atomic
from vireid.models.base import ReIDModel
from vireid.models.registry import create_model

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, info: distributed.DistInfo) -> torch.device:
    """``auto``: CUDA (``cuda:LOCAL_RANK``) when available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
    return device


def resume_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The config stored in ``RUN_DIR``'s last checkpoint, with ``--set`` overrides applied."""
    ckpt = load_checkpoint(Path(run_dir) / CHECKPOINT_DIR / LAST)
    data = apply_overrides(ckpt["config"], overrides)
    cfg = from_dict(TrainConfig, data, source=f"{run_dir} (stored config)")
    cfg.output_dir = str(run_dir)
    return cfg


@dataclass
class Progress:
    """Where training stands: the next batch is ``step_in_epoch`` of ``epoch``."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train as ``cfg`` says; ``resume``: continue from ``cfg.output_dir``'s last checkpoint.

    Under ``torchrun`` every process calls this; rank 0 writes files. Returns the summary.
    """
    info = distributed.dist_info_from_env()
    device = resolve_device(cfg.device, info)
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    distributed.init_distributed(info, device)
    try:
        return Trainer(cfg, info, device).run(resume)
    finally:
        distributed.shutdown_distributed()
        torch.set_num_threads(previous_threads)


def load_training_records(cfg: TrainConfig) -> list[ImageRecord]:
    from vireid.data.datasets import build_dataset

    dataset = build_dataset(cfg.data.dataset, cfg.data.root, **cfg.data.options)
    if not dataset.train:
        raise InputError(f"data: dataset {cfg.data.dataset!r} at {cfg.data.root} has no training images")
    return list(dataset.train)


class Trainer:
    """One training run; :meth:`run` is the loop."""

    def __init__(self, cfg: TrainConfig, info: distributed.DistInfo, device: torch.device) -> None:
        self.cfg = cfg
        self.info = info
        self.device = device
        self.run_dir = cfg.run_dir
        if cfg.amp == "fp16" and device.type != "cuda":
            raise InputError("amp: fp16 needs a CUDA device; use 'bf16' or 'none' on the CPU")

        records = load_training_records(cfg)
        self.train_records, self.val_records = split_validation_identities(records, cfg.data.val_ids, cfg.data.val_seed)
        self.labels = relabel(self.train_records)
        self.sampler = CrossModalityBatchSampler(
            self.train_records, cfg.sampler.num_ids, cfg.sampler.per_modality, seed=cfg.seed,
            epoch_length=cfg.sampler.epoch_length, rank=info.rank, world_size=info.world_size)
        self.dataset = ImageDataset(self.train_records, cfg.transforms.height, cfg.transforms.width,
                                    TrainTransform(cfg.transforms), self.labels)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = create_model(cfg.model, len(self.labels))
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.model: ReIDModel = model.to(device=device, memory_format=self.memory_format)
        adversary = list(self.model.adversary_parameters())
        adversary_ids = {id(p) for p in adversary}
        self.optimizer = make_optimizer(parameter_groups(self.model, cfg.optim, adversary_ids), cfg.optim)
        self.adversary_optimizer = (
            make_optimizer([{"params": adversary, "name": "adversary"}], cfg.optim, cfg.optim.adversary_lr or cfg.optim.lr)
            if adversary else None)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, len(self.sampler))
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self.ddp: nn.Module = self.model
        if info.enabled:
            if adversary:
                names = [n for n, p in self.model.named_parameters() if id(p) in adversary_ids]
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, names)
            self.ddp = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.progress = Progress()
        self.writer = None

    # ------------------------------------------------------------------ the loop
    def run(self, resume: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        if resume:
            self._load(self.run_dir / CHECKPOINT_DIR / LAST)
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
            self.writer = _summary_writer(self.run_dir / "tensorboard", self.progress.global_step)
        start = time.perf_counter()
        images_seen = 0
        while self.progress.epoch < cfg.epochs:
            images_seen += self._train_one_epoch()
            self.progress.epoch += 1
            self.progress.step_in_epoch = 0
            if self._validation_due():
                self._validate()
            if self.info.is_main:
                self._save_last()
            distributed.barrier(self.info)
        wall = time.perf_counter() - start
        summary = self._summary(wall, images_seen)
        if self.info.is_main:
            write_json_atomic(self.run_dir / "summary.json", summary)
            if self.writer is not None:
                self.writer.close()
        return summary

    def _train_one_epoch(self) -> int:
        cfg, progress = self.cfg, self.progress
        self.ddp.train()
        self.sampler.set_state(progress.epoch, progress.step_in_epoch)
        loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=cfg.data.num_workers,
                            pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed + progress.epoch))
        bar = _progress_bar(len(self.sampler), progress.step_in_epoch, f"epoch {progress.epoch + 1}/{cfg.epochs}",
                            enabled=cfg.progress_bar and self.info.is_main)
        window: dict[str, float] = {}
        window_steps, images_seen, tick = 0, 0, time.perf_counter()
        for images, labels, modality, _cams in loader:
            logs = self._train_step(images, labels, modality)
            progress.step_in_epoch += 1
            progress.global_step += 1
            images_seen += len(images) * self.info.world_size
            for key, value in logs.items():
                window[key] = window.get(key, 0.0) + value
            window_steps += 1
            if window_steps == cfg.log_every or progress.step_in_epoch == len(self.sampler):
                elapsed = time.perf_counter() - tick
                means = distributed.mean_across_ranks({k: v / window_steps for k, v in window.items()}, self.info)
                rate = window_steps * len(images) * self.info.world_size / max(elapsed, 1e-9)
                self._log_scalars(means, rate)
                bar.set_postfix(loss=f"{means['loss']:.3f}", img_s=f"{rate:.1f}")
                window, window_steps, tick = {}, 0, time.perf_counter()
            bar.update(1)
            if (cfg.checkpoint_every and progress.global_step % cfg.checkpoint_every == 0
                    and progress.step_in_epoch < len(self.sampler) and self.info.is_main):
                self._save_last()
        bar.close()
        return images_seen

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor, modality: torch.Tensor) -> dict[str, float]:
        """One optimisation step (and, for min-max methods, one adversary step), as in models/base.py."""
        cfg = self.cfg
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        modality = modality.to(self.device, non_blocking=True)
        with self._autocast():
            outputs = self.ddp(images, modality)
            loss, terms = self.model.compute_loss(outputs, labels, modality)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.progress.global_step}: lower optim.lr or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        logs = {"loss": float(loss.detach())} | {k: float(v) for k, v in terms.items()}
        if self.adversary_optimizer is not None:
            with self._autocast():
                adversary_loss = self.model.adversary_loss(outputs, labels, modality)
            self.adversary_optimizer.zero_grad(set_to_none=True)
            adversary_loss.backward()
            self._average_adversary_gradients()
            self.adversary_optimizer.step()
            logs["adversary_loss"] = float(adversary_loss.detach())
        return logs

    def _average_adversary_gradients(self) -> None:
        """Adversary parameters are outside DDP's reducer: all-reduce their gradients by hand."""
        if not self.info.enabled:
            return
        for group in self.adversary_optimizer.param_groups:  # type: ignore[union-attr]
            for param in group["params"]:
                if param.grad is not None:
                    torch.distributed.all_reduce(param.grad)
                    param.grad /= self.info.world_size

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.cfg.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.cfg.amp])

    # ------------------------------------------------------------------ validation
    def _validation_due(self) -> bool:
        if not self.val_records:
            return False
        epoch, period = self.progress.epoch, self.cfg.eval.period
        return epoch == self.cfg.epochs or (period > 0 and epoch % period == 0)

    def _validate(self) -> None:
        if self.info.is_main:
            with self._autocast():
                metrics = validation_metrics(
                    self.model, self.val_records, self.cfg.transforms, mode=self.cfg.data.val_mode,
                    device=self.device, batch_size=self.cfg.eval.batch_size,
                    channels_last=self.cfg.model.channels_last)
            entry = {"epoch": self.progress.epoch, "step": self.progress.global_step, **metrics}
            self.progress.history.append(entry)
            if self.writer is not None:
                for key, value in metrics.items():
                    self.writer.add_scalar(f"val/{key}", value, self.progress.global_step)
            metric = self.cfg.eval.metric
            if self.progress.best is None or metrics[metric] > self.progress.best[metric]:
                self.progress.best = entry
                self._save_best()
            log.info("epoch %d validation: %s", self.progress.epoch,
                     ", ".join(f"{k} {100 * v:.2f}%" for k, v in metrics.items()))
        self.progress.history = distributed.broadcast_object(self.progress.history, self.info)  # type: ignore[assignment]
        self.progress.best = distributed.broadcast_object(self.progress.best, self.info)  # type: ignore[assignment]
        self.ddp.train()

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        p = self.progress
        self.sampler.set_state(p.epoch, p.step_in_epoch)
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": capture_rng_state(),
            "progress": {"epoch": p.epoch, "step_in_epoch": p.step_in_epoch, "global_step": p.global_step},
            "best": p.best,
            "history": p.history,
            "config": to_dict(self.cfg),
            "num_classes": len(self.labels),
        }
        if self.adversary_optimizer is not None:
            state["adversary_optimizer"] = self.adversary_optimizer.state_dict()
        return state

    def _save_last(self) -> None:
        save_checkpoint(self.run_dir / CHECKPOINT_DIR / LAST, self._state())

    def _save_best(self) -> None:
        p = self.progress
        save_checkpoint(self.run_dir / CHECKPOINT_DIR / BEST, {
            "model": self.model.state_dict(), "config": to_dict(self.cfg), "num_classes": len(self.labels),
            "progress": {"epoch": p.epoch, "step_in_epoch": 0, "global_step": p.global_step}, "best": p.best,
        })

    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        if int(ckpt["num_classes"]) != len(self.labels):
            raise InputError(f"{path}: checkpoint has {ckpt['num_classes']} classes, the data gives {len(self.labels)}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["grad_scaler"])
        if self.adversary_optimizer is not None:
            self.adversary_optimizer.load_state_dict(ckpt["adversary_optimizer"])
        self.sampler.load_state_dict(ckpt["sampler"])
        restore_rng_state(ckpt["rng"])
        p = ckpt["progress"]
        self.progress = Progress(int(p["epoch"]), int(p["step_in_epoch"]), int(p["global_step"]),
                                 ckpt["best"], list(ckpt["history"]))
        log.info("resumed %s at epoch %d, step %d", path, self.progress.epoch, self.progress.step_in_epoch)

    # ------------------------------------------------------------------ logging
    def _log_scalars(self, means: dict[str, float], rate: float) -> None:
        if self.writer is None:
            return
        step = self.progress.global_step
        for key, value in means.items():
            self.writer.add_scalar(f"train/{key}", value, step)
        for group in self.optimizer.param_groups:
            self.writer.add_scalar(f"lr/{group.get('name', 'group')}", group["lr"], step)
        self.writer.add_scalar("train/images_per_s", rate, step)

    def _summary(self, wall: float, images_seen: int) -> dict[str, Any]:
        p = self.progress
        ckpt_dir = self.run_dir / CHECKPOINT_DIR
        return {
            "run_dir": str(self.run_dir),
            "method": self.cfg.model.method,
            "backbone": self.cfg.model.backbone,
            "epochs": p.epoch,
            "global_step": p.global_step,
            "steps_per_epoch": len(self.sampler),
            "num_train_ids": len(self.labels),
            "num_train_images": len(self.train_records),
            "num_val_ids": len({r.pid for r in self.val_records}),
            "world_size": self.info.world_size,
            "wall_time_s": wall,
            "images_per_s": images_seen / wall if wall > 0 and images_seen else None,
            "best": p.best,
            "history": p.history,
            "last_checkpoint": str(ckpt_dir / LAST),
            "best_checkpoint": str(ckpt_dir / BEST) if p.best is not None else None,
        }


def _summary_writer(folder: Path, purge_step: int) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder), purge_step=purge_step or None)


def _progress_bar(total: int, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="batch", dynamic_ncols=True, leave=False,
                disable=not enabled)
