"""Render a synthetic dataset to disk, resumably, with a completion marker written last.

``ROOT/.vireid_synth.partial.json`` (the parameters) is written before the first image and
``ROOT/.vireid_synth.json`` after the last index file, so an interrupted render is never taken
for a complete one.  Every image is written to a hidden temporary name and renamed, so a file
under its final name is always whole; re-running with the same parameters resumes (existing
images are kept, since rendering is deterministic), with other parameters it refuses unless
``overwrite`` is set.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vireid import __version__
from vireid.data.records import Modality
from vireid.data.synthetic.identity import Identity, sample_identity
from vireid.data.synthetic.layouts import DEFAULT_IMAGES_PER_CAMERA, LAYOUT_CODES, ImageJob, LayoutPlan, plan_layout
from vireid.data.synthetic.params import TAG_IMAGE, Difficulty, stream
from vireid.data.synthetic.render import Grid, render_person_image
from vireid.data.synthetic.scene import CameraSpec, Scene, build_scene
from vireid.errors import InputError
from vireid.io import write_json_atomic, write_text_atomic

COMPLETE_MARKER = ".vireid_synth.json"
PARTIAL_MARKER = ".vireid_synth.partial.json"
JPEG_QUALITY = 92
PARALLEL_MIN_IMAGES = 200
"""Fewer images than this render in the calling process (starting workers would cost more)."""


@dataclass(frozen=True)
class SynthConfig:
    """What to render: layout, identities 1..num_ids, seed, image size and difficulty."""

    layout: str
    num_ids: int
    seed: int = 0
    images_per_camera: int | None = None
    """Images per (identity, camera); None: the layout's default (sysu 10, regdb 10, llcm 5)."""
    height: int = 128
    width: int = 64
    difficulty: Difficulty = field(default_factory=Difficulty)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUT_CODES:
            raise InputError(f"unknown synthetic layout {self.layout!r} (choose from {', '.join(LAYOUT_CODES)})")
        if self.height < 32 or self.width < 16:
            raise InputError(f"image size must be at least 32 x 16 (height x width), got {self.height} x {self.width}")
        if self.seed < 0:
            raise InputError(f"seed (--seed): expected a non-negative integer, got {self.seed}")

    @property
    def per_camera(self) -> int:
        return self.images_per_camera if self.images_per_camera is not None else DEFAULT_IMAGES_PER_CAMERA[self.layout]

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "num_ids": self.num_ids, "seed": self.seed,
                "images_per_camera": self.per_camera, "height": self.height, "width": self.width,
                "difficulty": self.difficulty.to_dict()}

    def plan(self) -> LayoutPlan:
        return plan_layout(self.layout, self.num_ids, self.seed, self.per_camera, self.difficulty)


@dataclass(frozen=True)
class RenderSummary:
    root: Path
    layout: str
    num_images: int
    rendered: int
    """Images rendered by this call (the rest existed from an interrupted run or a complete set)."""
    seconds: float


class ImageRenderer:
    """Renders the images of one configuration, caching identities and scenes."""

    def __init__(self, config: SynthConfig, cameras: dict[tuple[int, Modality], CameraSpec]) -> None:
        self.config = config
        self.cameras = cameras
        self.grid = Grid(config.height, config.width)
        self._identities: dict[int, Identity] = {}
        self._scenes: dict[int, Scene] = {}

    def identity(self, pid: int) -> Identity:
        if pid not in self._identities:
            self._identities[pid] = sample_identity(self.config.seed, pid, self.config.num_ids, self.config.difficulty)
        return self._identities[pid]

    def scene(self, camera: CameraSpec) -> Scene:
        if camera.scene_id not in self._scenes:
            self._scenes[camera.scene_id] = build_scene(
                self.config.seed, LAYOUT_CODES[self.config.layout], camera.scene_id, camera.indoor,
                self.config.height, self.config.width, self.config.difficulty.clutter)
        return self._scenes[camera.scene_id]

    def render(self, job: ImageJob, identity: Identity | None = None) -> np.ndarray:
        """The image of ``job``: a function of (seed, pid, camera, modality, index) only.

        ``identity`` replaces the sampled person (same pose, camera and noise), e.g. to show that
        changing a garment's colour leaves the infrared image unchanged.
        """
        camera = self.cameras[(job.cam, job.modality)]
        rng = stream(self.config.seed, TAG_IMAGE, LAYOUT_CODES[self.config.layout], job.pid, job.cam, int(job.modality), job.index)
        person = identity if identity is not None else self.identity(job.pid)
        return render_person_image(person, camera, self.scene(camera), rng, self.grid, self.config.difficulty, job.viewpoint)


def save_image(path: Path, image: np.ndarray, image_format: str) -> None:
    """Write through a hidden temporary file and rename, so ``path`` only ever holds a whole image."""
    tmp = path.with_name(f".{path.name}.tmp")
    options = {"quality": JPEG_QUALITY} if image_format == "JPEG" else {}
    Image.fromarray(image).save(tmp, format=image_format, **options)
    os.replace(tmp, path)


def _render_jobs(config: SynthConfig, cameras: dict[tuple[int, Modality], CameraSpec], image_format: str,
                 root: str, jobs: list[ImageJob]) -> int:
    renderer = ImageRenderer(config, cameras)
    for job in jobs:
        save_image(Path(root) / job.relpath, renderer.render(job), image_format)
    return len(jobs)


def _marker_params(path: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found.get("params") if isinstance(found, dict) else None


def _check_target(root: Path, params: dict[str, Any], overwrite: bool, managed: tuple[str, ...]) -> bool:
    """Prepare ``root``; True when its marker says it holds this exact complete set."""
    for marker in (COMPLETE_MARKER, PARTIAL_MARKER):
        path = root / marker
        if not path.is_file():
            continue
        found = _marker_params(path) or {}
        if found == params:
            return marker == COMPLETE_MARKER
        if not overwrite:
            changed = sorted(k for k in set(params) | set(found) if found.get(k) != params.get(k))
            raise InputError(
                f"{root}: holds a synthetic set rendered with other parameters ({', '.join(changed)} differ); "
                f"choose another output folder or overwrite it (--overwrite)")
        for name in managed:
            shutil.rmtree(root / name, ignore_errors=True)
        for stale in (COMPLETE_MARKER, PARTIAL_MARKER):
            (root / stale).unlink(missing_ok=True)
        return False
    if root.exists() and any(not entry.name.startswith(".") for entry in os.scandir(root)):
        raise InputError(f"{root}: folder is not empty and holds no vireid synthetic set; choose an empty or new folder")
    return False


def render_dataset(config: SynthConfig, out: str | os.PathLike[str], workers: int = 0, overwrite: bool = False) -> RenderSummary:
    """Render ``config`` into ``out`` in the real dataset's layout (see :mod:`vireid.data.synthetic.layouts`).

    ``workers``: processes (0 = up to two, as many as CPUs allow).  Deterministic: the same
    config gives byte-identical files whatever the number of workers.
    """
    start = time.perf_counter()
    root = Path(out)
    plan = config.plan()
    params = config.to_dict()
    if root.exists() and not root.is_dir():
        raise InputError(f"{root}: output path exists and is not a folder")
    marked_complete = _check_target(root, params, overwrite, plan.managed)
    todo = [job for job in plan.jobs if not (root / job.relpath).is_file()]
    if marked_complete and not todo and all((root / rel).is_file() for rel in plan.index_files):
        return RenderSummary(root, config.layout, len(plan.jobs), 0, time.perf_counter() - start)
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / PARTIAL_MARKER, {"params": params, "vireid": __version__})
    (root / COMPLETE_MARKER).unlink(missing_ok=True)
    for folder in sorted(set(plan.folders) | {str(Path(job.relpath).parent) for job in plan.jobs}):
        (root / folder).mkdir(parents=True, exist_ok=True)
    workers = workers or min(2, os.cpu_count() or 1)
    if workers <= 1 or len(todo) < PARALLEL_MIN_IMAGES:
        _render_jobs(config, plan.cameras, plan.image_format, str(root), todo)
    else:
        chunks = [todo[i::workers * 4] for i in range(workers * 4)]
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(_render_jobs, config, plan.cameras, plan.image_format, str(root), chunk) for chunk in chunks if chunk]
            for future in futures:
                future.result()
    for rel, text in plan.index_files.items():
        write_text_atomic(root / rel, text)
    write_json_atomic(root / COMPLETE_MARKER, {
        "params": params, "vireid": __version__, "num_images": len(plan.jobs),
        "splits": {name: list(ids) for name, ids in plan.splits.items()},
    })
    (root / PARTIAL_MARKER).unlink(missing_ok=True)
    return RenderSummary(root, config.layout, len(plan.jobs), len(todo), time.perf_counter() - start)
