"""Dataset adapters: read a dataset in its real on-disk layout into image records.

Every adapter takes the dataset root as an argument, validates the whole tree up front and
raises one :class:`vireid.errors.InputError` naming the file (and line) that is missing or
malformed.  All adapters return a :class:`VIDataset`; :func:`build_dataset` selects one by name.

* ``sysu`` -- :func:`~vireid.data.datasets.sysu.load_sysu`: ``cam1..cam6/<pid>/<idx>.jpg``, ``exp/*_id.txt``
* ``regdb`` -- :func:`~vireid.data.datasets.regdb.load_regdb`: ``Visible/``, ``Thermal/``, ``idx/*_{1..10}.txt``
* ``llcm`` -- :func:`~vireid.data.datasets.llcm.load_llcm`: ``idx/train_{vis,nir}.txt``, ``idx/test_id.txt``,
  ``test_{vis,nir}/cam*/<pid>/``
* ``manifest`` -- :func:`~vireid.data.datasets.manifest.load_manifest`: a CSV file (path, person id, camera,
  modality, split)
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vireid.data.records import ImageRecord, relabel
from vireid.errors import InputError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})

DATASETS: dict[str, str] = {
    "sysu": "vireid.data.datasets.sysu:load_sysu",
    "regdb": "vireid.data.datasets.regdb:load_regdb",
    "llcm": "vireid.data.datasets.llcm:load_llcm",
    "manifest": "vireid.data.datasets.manifest:load_manifest",
}

_PID_DIR = re.compile(r"^\d{4}$")


@dataclass(frozen=True)
class VIDataset:
    """A dataset read from disk: training records and test records.

    ``train`` and ``test`` are ordered by person id, then camera, then file name (or in file
    order where the dataset prescribes one).  ``trial_tests`` holds per-trial test lists where
    the dataset defines them (RegDB: trials 1..10, index 0 is trial 1), ``query`` / ``gallery``
    a fixed query/gallery split where the dataset defines one (manifest); both are empty
    otherwise.
    """

    name: str
    root: Path
    train: tuple[ImageRecord, ...]
    test: tuple[ImageRecord, ...]
    test_ids: tuple[int, ...]
    trial_tests: tuple[tuple[ImageRecord, ...], ...] = ()
    query: tuple[ImageRecord, ...] = ()
    gallery: tuple[ImageRecord, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def train_labels(self) -> dict[int, int]:
        """Deterministic contiguous labels of the training identities (sorted pid -> 0..N-1)."""
        return relabel(list(self.train))

    @property
    def num_train_ids(self) -> int:
        return len({r.pid for r in self.train})

    def train_targets(self) -> list[int]:
        """The training label of every record of ``train``, in order."""
        labels = self.train_labels
        return [labels[r.pid] for r in self.train]


def build_dataset(name: str, root: str | os.PathLike[str], **options: Any) -> VIDataset:
    """Read dataset ``name`` (sysu, regdb, llcm, manifest) from ``root``.

    ``options`` go to the adapter (RegDB: ``trial``).  An unknown name or option raises
    :class:`InputError` suggesting the closest valid one.
    """
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}{_did_you_mean(name, DATASETS)} (choose from {', '.join(DATASETS)})")
    module_name, func_name = DATASETS[name].split(":")
    loader: Callable[..., VIDataset] = getattr(importlib.import_module(module_name), func_name)
    accepted = list(inspect.signature(loader).parameters)[1:]
    for key in options:
        if key not in accepted:
            raise InputError(
                f"dataset {name}: unknown option {key!r}{_did_you_mean(key, accepted)}"
                f" (accepted: {', '.join(accepted) or 'none'})")
    return loader(root, **options)


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else an :class:`InputError` naming it as ``what``."""
    if not path.is_dir():
        raise InputError(f"{path}: missing {what} folder")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise InputError(f"{path}: missing {what} file")
    return path


def read_id_line(path: Path) -> tuple[int, ...]:
    """Identities from a file holding one comma-separated line (``6,10,17``), as in SYSU-MM01 ``exp/``."""
    require_file(path, "identity list")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != 1:
        raise InputError(f"{path}: expected one comma-separated line of person ids, found {len(lines)} lines")
    ids = []
    for token in lines[0].split(","):
        token = token.strip()
        if not token.isdigit():
            raise InputError(f"{path}, line 1: {token!r} is not a person id (expected comma-separated integers)")
        ids.append(int(token))
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"{path}, line 1: person id {dup} is listed twice")
    return tuple(ids)


def person_dirs(folder: Path) -> dict[int, Path]:
    """The ``<pid:04d>`` sub-folders of ``folder``; any other sub-folder name is an error."""
    dirs: dict[int, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if not _PID_DIR.match(entry.name):
            raise InputError(f"{entry.path}: person folder name must be a 4-digit id like 0001, got {entry.name!r}")
        dirs[int(entry.name)] = Path(entry.path)
    return dirs


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (hidden files skipped)."""
    return sorted(
        Path(e.path) for e in os.scandir(folder)
        if e.is_file() and not e.name.startswith(".") and Path(e.name).suffix.lower() in IMAGE_SUFFIXES
    )


def read_list_file(path: Path, root: Path, existing: set[str] | None = None) -> list[tuple[str, int, int]]:
    """Lines ``<relative path> <label>`` of an index file as (path, label, line number).

    Empty lines are skipped.  Each path must exist under ``root`` (checked against
    ``existing``, a set of root-relative POSIX paths, when given).
    """
    require_file(path, "index")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise InputError(f"{path}, line {number}: expected '<image path> <non-negative integer label>', got {line.strip()!r}")
        rel = parts[0].replace("\\", "/").lstrip("/")
        found = rel in existing if existing is not None else (root / rel).is_file()
        if not found:
            raise InputError(f"{path}, line {number}: image {rel} does not exist under {root}")
        entries.append((rel, int(parts[1]), number))
    if not entries:
        raise InputError(f"{path}: index file lists no images")
    return entries


__all__ = [
    "DATASETS", "IMAGE_SUFFIXES", "VIDataset", "build_dataset", "image_files", "person_dirs",
    "read_id_line", "read_list_file", "require_dir", "require_file",
]
