"""One training process of the multi-process tests, instrumented.

    RANK=r WORLD_SIZE=w LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/ddp_worker.py SPEC.json

SPEC (JSON): ``config`` (a training YAML), ``resume`` (continue its run folder), ``out`` (folder
for ``rank<r>.json``), optional ``nan_at`` ([rank, global step]: that rank's images become NaN
at that step), ``stop_after`` (every rank raises before the step after this one: an interrupted run),
``fake_weights`` (a file that the patched ``torch.hub.download_url_to_file`` copies instead of
downloading). ``rank<r>.json`` holds every collective call with the devices of its tensors (and
its ``device`` argument), each step's labels / modality / loss, downloads, and the summary or error.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from vireid.engine.config import load_train_config
from vireid.engine.trainer import Trainer, resume_config, train

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "reduce", "all_gather_into_tensor", "reduce_scatter_tensor",
               "broadcast_object_list", "all_gather_object", "scatter", "gather", "barrier")


class Interrupted(RuntimeError):
    pass


def _tensors(values: object) -> list[torch.Tensor]:
    if isinstance(values, torch.Tensor):
        return [values]
    if isinstance(values, (list, tuple)):
        return [t for v in values for t in _tensors(v)]
    return []


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    record: dict = {"collectives": [], "steps": [], "downloads": []}

    for name in COLLECTIVES:
        original = getattr(dist, name)

        def recorded(*args, _original=original, _name=name, **kwargs):
            devices = [str(t.device) for t in _tensors(list(args) + list(kwargs.values()))]
            entry = {"op": _name, "devices": devices}
            if "device" in kwargs:
                entry["device_argument"] = str(kwargs["device"])
            record["collectives"].append(entry)
            return _original(*args, **kwargs)

        setattr(dist, name, recorded)

    if spec.get("fake_weights"):
        def fake_download(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
            record["downloads"].append(url)
            shutil.copyfile(spec["fake_weights"], dst)

        torch.hub.download_url_to_file = fake_download

    original_step = Trainer._train_step

    def step(self: Trainer, images: torch.Tensor, labels: torch.Tensor, modality: torch.Tensor) -> dict:
        if spec.get("stop_after") is not None and self.progress.global_step == spec["stop_after"]:
            raise Interrupted(f"stopped before step {self.progress.global_step + 1}")
        nan_at = spec.get("nan_at")
        if nan_at and rank == nan_at[0] and self.progress.global_step == nan_at[1]:
            images = images * float("nan")
        logs = original_step(self, images, labels, modality)
        record["steps"].append({"step": self.progress.global_step, "epoch": self.progress.epoch,
                                "labels": labels.tolist(), "modality": modality.tolist(), "loss": float(logs["loss"]),
                                "lr": [g["lr"] for g in self.optimizer.param_groups],
                                "model_device": str(next(self.model.parameters()).device)})
        return logs

    Trainer._train_step = step  # type: ignore[method-assign]

    try:
        if spec.get("resume"):
            cfg = resume_config(spec["run_dir"], spec.get("overrides", []))
        else:
            cfg = load_train_config(spec["config"], spec.get("overrides", []))
        record["summary"] = train(cfg, resume=bool(spec.get("resume")))
    except Exception as exc:  # recorded for the test to inspect
        record["error"] = f"{type(exc).__name__}: {exc}"
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record, default=str))
    sys.exit(1 if "error" in record else 0)


if __name__ == "__main__":
    main()
