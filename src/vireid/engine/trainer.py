"""The training loop: read top to bottom (torchvision ``references/classification`` style).

``train(cfg)`` builds data, model, optimiser(s) and schedule, optionally resumes from
``RUN_DIR/checkpoints/last.pt``, trains ``cfg.epochs`` epochs, validates on identities held
out of the training set (when ``data.val_ids`` > 0), keeps ``last.pt`` / ``best.pt`` and writes
``summary.json``.

One step, on every process: the batch (all visible images, then all infrared ones) goes to the
device; the forward pass runs under autocast (``amp``) with the batch's modality layout declared,
so the streams are routed by slicing; the model's outputs are cast to float32 and the losses are
computed outside autocast; the backward pass goes through the gradient scaler (fp16), DDP
averages the gradients, the optimiser steps, and a min-max method's adversary takes its own
scaled step on the same schedule. Loss terms stay on the device: one reduction across processes
and one read back to the host per log window, which is also where a non-finite loss on any
process stops every process.

Run folder::

    RUN_DIR/config.yaml            the full resolved config
    RUN_DIR/log.txt                the run's log (what the console shows, without progress bars)
    RUN_DIR/checkpoints/last.pt    everything needed to continue exactly (see engine.checkpoint)
    RUN_DIR/checkpoints/best.pt    model + config at the best validation score
    RUN_DIR/tensorboard/           losses, lr, throughput, validation metrics
    RUN_DIR/summary.json           final summary (also returned by ``train``)
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn
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
from vireid.engine.schedule import EpochSchedule
from vireid.engine.validation import split_validation_identities, validation_metrics
from vireid.errors import InputError
from vireid.extras import MissingExtra, require
from vireid.io import write_json_atomic, write_text_atomic
from vireid.models.base import ReIDModel
from vireid.models.pretrained import PretrainedWeights, resolve_pretrained
from vireid.models.registry import create_model
from vireid.models.routing import sorted_counts, sorted_modality_layout
from vireid.progress import live_bars, log_above_bars, progress_bar

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LOG_FILE = "log.txt"


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


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto``: bf16 on a GPU that supports it, fp16 on one that does not, none on the CPU."""
    if amp != "auto":
        return amp
    if device.type != "cuda":
        return "none"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resume_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The config stored in ``RUN_DIR``'s last checkpoint, with ``--set`` overrides applied."""
    ckpt = load_checkpoint(Path(run_dir) / CHECKPOINT_DIR / LAST)
    data = apply_overrides(ckpt["config"], overrides)
    cfg = from_dict(TrainConfig, data, source=f"{run_dir} (stored config)")
    cfg.output_dir = str(run_dir)
    return cfg


@dataclass
class Progress:
    """Where training stands: the next step is ``step_in_epoch`` of ``epoch``.

    A step trains one batch on each of the ``world_size`` processes; ``global_batches`` counts
    batches of all processes (the TensorBoard axis, the same whatever the number of processes).
    """

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    global_batches: int = 0
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
    if device.type == "cuda":
        _configure_cuda_kernels(cfg.deterministic)
    distributed.init_distributed(info, device)
    try:
        return Trainer(cfg, info, device).run(resume)
    finally:
        distributed.shutdown_distributed()
        torch.set_num_threads(previous_threads)


def _configure_cuda_kernels(deterministic: bool) -> None:
    """cuDNN autotuning for fixed-size batches, or deterministic kernels (bit-exact resume)."""
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


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
        self.amp = resolve_amp(cfg.amp, device)
        if self.amp == "fp16" and device.type != "cuda":
            raise InputError("amp: fp16 needs a CUDA device; use 'bf16' or 'none' on the CPU")
        if cfg.sync_bn and info.enabled and device.type != "cuda":
            raise InputError("sync_bn: synchronised BatchNorm needs CUDA devices; set sync_bn: false on the CPU")

        records = load_training_records(cfg)
        self.train_records, self.val_records = split_validation_identities(records, cfg.data.val_ids, cfg.data.val_seed)
        self.labels = relabel(self.train_records)
        self.sampler = CrossModalityBatchSampler(
            self.train_records, cfg.sampler.num_ids, cfg.sampler.per_modality, seed=cfg.seed,
            epoch_length=cfg.sampler.epoch_length, rank=info.rank, world_size=info.world_size)
        self.dataset = ImageDataset(self.train_records, cfg.transforms.height, cfg.transforms.width,
                                    TrainTransform(cfg.transforms), self.labels)
        workers = cfg.data.num_workers
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=workers,
                                 pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                 generator=torch.Generator().manual_seed(cfg.seed))

        # ImageNet weights: one process per machine downloads them if needed, the others wait
        self.pretrained: PretrainedWeights | None = distributed.local_leader_first(
            lambda leader: resolve_pretrained(cfg.model.backbone, cfg.model.pretrained, download=leader,
                                              progress=leader and cfg.progress_bar and live_bars()), info, device)
        model_cfg = replace(cfg.model, pretrained=self.pretrained.file if self.pretrained else None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = create_model(model_cfg, len(self.labels))
        if cfg.sync_bn and info.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.model: ReIDModel = model.to(device=device, memory_format=self.memory_format)

        self.adversary = list(self.model.adversary_parameters())
        adversary_ids = {id(p) for p in self.adversary}
        self.optimizer = make_optimizer(parameter_groups(self.model, cfg.optim, adversary_ids), cfg.optim)
        self.adversary_optimizer = (
            make_optimizer([{"params": self.adversary, "name": "adversary"}], cfg.optim,
                           cfg.optim.adversary_lr or cfg.optim.lr)
            if self.adversary else None)
        self.optimizers = [o for o in (self.optimizer, self.adversary_optimizer) if o is not None]
        self.schedule = EpochSchedule(self.optimizers, cfg.schedule, len(self.sampler))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == "fp16")

        self.ddp: nn.Module = self.model
        if info.enabled:
            if self.adversary:
                names = [n for n, p in self.model.named_parameters() if id(p) in adversary_ids]
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, names)
            self.ddp = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.forward_model: nn.Module = torch.compile(self.ddp) if cfg.compile else self.ddp  # type: ignore[assignment]
        self.progress = Progress()
        self.writer = None
        self.data_wait_s = 0.0
        self.train_time_s = 0.0
        self.steps_run = 0

    # ------------------------------------------------------------------ the loop
    def run(self, resume: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        with _run_log(self.run_dir / LOG_FILE if self.info.is_main else None, console_bars=cfg.progress_bar):
            if resume:
                self._load(self.run_dir / CHECKPOINT_DIR / LAST)
            if self.info.is_main:
                write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
                self.writer = _summary_writer(self.run_dir / "tensorboard",
                                              self.progress.global_batches + 1 if resume else None)
            self._log_start(resume)
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
                log.info("done: %d epochs, %d steps in %.1f s (%.1f img/s); summary in %s", summary["epochs"],
                         summary["global_step"], wall, summary["images_per_s"] or 0.0, self.run_dir / "summary.json")
        return summary

    def _train_one_epoch(self) -> int:
        cfg, progress, world = self.cfg, self.progress, self.info.world_size
        self.ddp.train()
        self.sampler.set_state(progress.epoch, progress.step_in_epoch)
        steps = len(self.sampler)
        bar = _progress_bar(steps, progress.step_in_epoch, f"epoch {progress.epoch + 1}/{cfg.epochs}",
                            enabled=cfg.progress_bar and self.info.is_main)
        window = LossWindow()
        images_seen, epoch_start, tick = 0, time.perf_counter(), time.perf_counter()
        batches: Iterator = iter(self.loader)
        while True:
            wait_start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            self.data_wait_s += time.perf_counter() - wait_start
            images, labels, modality, _cams = batch
            self.schedule.set_position(progress.epoch, progress.step_in_epoch)
            window.add(self._train_step(images, labels, modality))
            progress.step_in_epoch += 1
            progress.global_step += 1
            progress.global_batches += world
            self.steps_run += 1
            images_seen += len(images) * world
            last_step = progress.step_in_epoch == steps
            checkpoint_due = bool(cfg.checkpoint_every) and progress.global_step % cfg.checkpoint_every == 0
            if window.steps == cfg.log_every or last_step or checkpoint_due:
                elapsed = time.perf_counter() - tick
                rate = window.steps * len(images) * world / max(elapsed, 1e-9)
                means = window.flush(self.info, stop_on_any=self.amp != "fp16", where=self._where())
                self._log_scalars(means, rate)
                bar.set_postfix(loss=f"{means['loss']:.3f}", img_s=f"{rate:.1f}")
                tick = time.perf_counter()
            bar.update(1)
            if checkpoint_due and not last_step and self.info.is_main:
                self._save_last()
        bar.close()
        self.train_time_s += time.perf_counter() - epoch_start
        return images_seen

    def _train_step(self, images: Tensor, labels: Tensor, modality: Tensor) -> dict[str, Tensor]:
        """One optimisation step (and, for min-max methods, one adversary step), as in models/base.py.

        Returns the step's loss terms as detached device tensors (no host synchronisation).
        """
        cfg = self.cfg
        layout = sorted_counts(modality)  # the sampler's batch layout, read on the host copy
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        modality = modality.to(self.device, non_blocking=True)
        with sorted_modality_layout(layout):
            with self._autocast():
                outputs = self.forward_model(images, modality)
            outputs = float32_outputs(outputs)
            loss, terms = self.model.compute_loss(outputs, labels, modality)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.optim.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                         cfg.optim.grad_clip)
            self.scaler.step(self.optimizer)
            logs = {"loss": loss.detach(), **terms}
            if self.adversary_optimizer is not None:
                adversary_loss = self.model.adversary_loss(outputs, labels, modality)
                self.adversary_optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(adversary_loss).backward()
                distributed.average_gradients(self.adversary, self.info)
                self.scaler.step(self.adversary_optimizer)
                logs["adversary_loss"] = adversary_loss.detach()
        self.scaler.update()
        return logs

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp])

    def _where(self) -> str:
        p = self.progress
        return f"epoch {p.epoch + 1}, step {p.step_in_epoch}"

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
                    channels_last=self.cfg.model.channels_last, num_workers=self.cfg.data.num_workers)
            entry = {"epoch": self.progress.epoch, "step": self.progress.global_step, **metrics}
            self.progress.history.append(entry)
            if self.writer is not None:
                for key, value in metrics.items():
                    self.writer.add_scalar(f"val/{key}", value, self.progress.global_batches)
            metric = self.cfg.eval.metric
            if self.progress.best is None or metrics[metric] > self.progress.best[metric]:
                self.progress.best = entry
                self._save_best()
            log.info("epoch %d validation: %s", self.progress.epoch,
                     ", ".join(f"{k} {100 * v:.2f}%" for k, v in metrics.items()))
        self.progress.history = distributed.broadcast_object(self.progress.history, self.info, self.device)
        self.progress.best = distributed.broadcast_object(self.progress.best, self.info, self.device)
        self.ddp.train()

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        p = self.progress
        self.sampler.set_state(p.epoch, p.step_in_epoch)
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": capture_rng_state(self.device),
            "progress": {"epoch": p.epoch, "step_in_epoch": p.step_in_epoch, "global_step": p.global_step,
                         "global_batches": p.global_batches, "world_size": self.info.world_size},
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
            "progress": {"epoch": p.epoch, "step_in_epoch": 0, "global_step": p.global_step,
                         "global_batches": p.global_batches, "world_size": self.info.world_size},
            "best": p.best,
        })

    def _load(self, path: Path) -> None:
        """Continue from ``path``, on any number of processes: a step of the saved run trained
        ``saved world size`` batches, so the position in the epoch is converted into steps of
        this run (rounded up to a whole step: at most world size - 1 batches are skipped)."""
        ckpt = load_checkpoint(path)
        if int(ckpt["num_classes"]) != len(self.labels):
            raise InputError(f"{path}: checkpoint has {ckpt['num_classes']} classes, the data gives {len(self.labels)}")
        self.model.load_state_dict(ckpt["model"])
        base_lrs = [[g["initial_lr"] for g in o.param_groups] for o in self.optimizers]
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.adversary_optimizer is not None:
            self.adversary_optimizer.load_state_dict(ckpt["adversary_optimizer"])
        for optimizer, lrs in zip(self.optimizers, base_lrs):  # the config's rates (--set optim.lr=...)
            for group, lr in zip(optimizer.param_groups, lrs):
                group["initial_lr"] = lr
        if ckpt.get("grad_scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["grad_scaler"])
        self.sampler.load_state_dict({**ckpt["sampler"], "position": 0})  # checks the seed; position below
        restore_rng_state(ckpt["rng"], self.device)
        p = ckpt["progress"]
        saved_world = int(p.get("world_size", 1))
        world = self.info.world_size
        consumed = int(p["step_in_epoch"]) * saved_world
        step = math.ceil(consumed / world)
        if step * world != consumed:
            log.warning("resuming on %d processes a run saved on %d: %d batch(es) of epoch %d are skipped",
                        world, saved_world, step * world - consumed, int(p["epoch"]) + 1)
        self.progress = Progress(int(p["epoch"]), step, int(p["global_step"]),
                                 int(p.get("global_batches", int(p["global_step"]) * saved_world)),
                                 ckpt["best"], list(ckpt["history"]))
        log.info("resumed %s at epoch %d, step %d (saved on %d process(es), continuing on %d)", path,
                 self.progress.epoch + 1, self.progress.step_in_epoch, saved_world, world)

    # ------------------------------------------------------------------ logging
    def _log_start(self, resume: bool) -> None:
        cfg = self.cfg
        source = (f"{self.pretrained.source} ({self.pretrained.file}, sha256 {self.pretrained.sha256[:12]}…)"
                  if self.pretrained else "none (random initialisation)")
        log.info("%s %s: %s on %s, %d process(es), amp %s; %d identities, %d images; batch %d ids x (%d + %d) "
                 "per process, %d steps per epoch; pretrained weights: %s",
                 "resuming" if resume else "training", self.run_dir, cfg.model.method, cfg.model.backbone,
                 self.info.world_size, self.amp, len(self.labels), len(self.train_records), cfg.sampler.num_ids,
                 cfg.sampler.per_modality, cfg.sampler.per_modality, len(self.sampler), source)

    def _log_scalars(self, means: dict[str, float], rate: float) -> None:
        p = self.progress
        log.info("epoch %d step %d/%d: %s, %.1f img/s", p.epoch + 1, p.step_in_epoch, len(self.sampler),
                 ", ".join(f"{k} {v:.4f}" for k, v in means.items()), rate)
        if self.writer is None:
            return
        step = p.global_batches
        for key, value in means.items():
            self.writer.add_scalar(f"train/{key}", value, step)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                self.writer.add_scalar(f"lr/{group.get('name', 'group')}", group["lr"], step)
        self.writer.add_scalar("train/images_per_s", rate, step)

    def _summary(self, wall: float, images_seen: int) -> dict[str, Any]:
        p = self.progress
        ckpt_dir = self.run_dir / CHECKPOINT_DIR
        memory = (torch.cuda.max_memory_allocated(self.device) / 2**30) if self.device.type == "cuda" else None
        return {
            "run_dir": str(self.run_dir),
            "method": self.cfg.model.method,
            "backbone": self.cfg.model.backbone,
            "pretrained": self.pretrained.to_dict() if self.pretrained else None,
            "amp": self.amp,
            "device": str(self.device),
            "epochs": p.epoch,
            "global_step": p.global_step,
            "global_batches": p.global_batches,
            "steps_per_epoch": len(self.sampler),
            "batch_size_per_process": self.sampler.batch_size,
            "num_train_ids": len(self.labels),
            "num_train_images": len(self.train_records),
            "num_val_ids": len({r.pid for r in self.val_records}),
            "world_size": self.info.world_size,
            "wall_time_s": wall,
            "images_per_s": images_seen / wall if wall > 0 and images_seen else None,
            "step_time_s": self.train_time_s / self.steps_run if self.steps_run else None,
            "data_wait_fraction": self.data_wait_s / self.train_time_s if self.train_time_s > 0 else None,
            "max_gpu_memory_gib": memory,
            "best": p.best,
            "history": p.history,
            "last_checkpoint": str(ckpt_dir / LAST),
            "best_checkpoint": str(ckpt_dir / BEST) if p.best is not None else None,
        }


def float32_outputs(outputs: dict[str, Any]) -> dict[str, Any]:
    """The model's floating-point outputs in float32, for losses computed outside autocast."""
    return {k: v.float() if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in outputs.items()}


class LossWindow:
    """Sums of each step's loss terms, kept on the device; :meth:`flush` reduces them across
    processes and reads them back to the host once (the only synchronisation a step needs)."""

    def __init__(self) -> None:
        self.keys: list[str] | None = None
        self.sums: Tensor | None = None
        self.steps = 0

    def add(self, terms: dict[str, Tensor]) -> None:
        keys = sorted(terms)
        if self.keys is None:
            self.keys = keys
        elif keys != self.keys:
            raise ValueError(f"loss terms changed from {self.keys} to {keys} within a log window")
        values = torch.stack([terms[k].detach().float().reshape(()) for k in keys])
        step = torch.cat([values, (~torch.isfinite(values).all()).float().reshape(1)])
        self.sums = step if self.sums is None else self.sums + step
        self.steps += 1

    def flush(self, info: distributed.DistInfo, *, stop_on_any: bool = True, where: str = "") -> dict[str, float]:
        """Means over the window's steps and all processes; raises ``FloatingPointError`` on every
        process when a loss was non-finite on any (``stop_on_any``) or on every step of every
        process (fp16, where the gradient scaler skips such steps)."""
        assert self.sums is not None and self.keys is not None
        totals = distributed.sum_across_ranks(self.sums, info).tolist()
        count = self.steps * info.world_size
        nonfinite = int(totals[-1])
        keys = self.keys
        self.keys, self.sums, self.steps = None, None, 0
        if nonfinite and (stop_on_any or nonfinite == count):
            raise FloatingPointError(f"non-finite loss in {nonfinite} of the last {count} process steps (before "
                                     f"{where}): lower optim.lr or check the data")
        means = {k: v / count for k, v in zip(keys, totals[:-1])}
        if nonfinite:
            means["nonfinite_steps"] = float(nonfinite)
        return means


@contextlib.contextmanager
def _run_log(path: Path | None, console_bars: bool = False) -> Iterator[None]:
    """The ``vireid`` loggers' INFO records also go to ``path`` (rank 0's run log) for the run;
    ``console_bars``: console log lines are written above the progress bars."""
    logger = logging.getLogger("vireid")
    previous = logger.level
    handler = None
    if path is not None:
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        logger.addHandler(handler)
    try:
        with log_above_bars(logger) if console_bars else contextlib.nullcontext():
            yield
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(previous)


def _summary_writer(folder: Path, purge_step: int | None) -> Any:
    """TensorBoard writer, or ``None`` (one warning) without the ``train`` extra. On resume, events
    after the checkpoint (``purge_step`` onwards, logged by the interrupted run and about to be
    logged again) are dropped, every earlier one is kept."""
    try:
        require("tensorboard", "TensorBoard logging")
    except MissingExtra as exc:
        log.warning("%s; training goes on without it", exc)
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder), purge_step=purge_step)


def _progress_bar(total: int, initial: int, desc: str, enabled: bool) -> Any:
    return progress_bar(total=total, initial=initial, desc=desc, unit="batch", leave=False, enabled=enabled)
