"""LLCM adapter (Zhang & Wang, CVPR 2023; layout of the ZYK100/LLCM release).

Layout::

    ROOT/idx/train_vis.txt, train_nir.txt   lines '<relative path> <label>'
    ROOT/idx/test_id.txt                     one comma-separated line of test person ids
    ROOT/test_vis/cam<N>/<pid:04d>/<file>    visible test images
    ROOT/test_nir/cam<N>/<pid:04d>/<file>    near-infrared test images

Training images take the label of their index line as person id and their camera from the
file name (``0001_c01_s185535_f7010_nir.jpg`` -> camera 1) or, failing that, from a ``cam<N>``
folder in their path.  Test images take person id and camera from their folders; only the
identities of ``test_id.txt`` are read, as in the reference ``process_query_llcm``.
LLCM cameras record both modalities, so a camera number means the same place in both.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vireid.data.datasets import (
    VIDataset, image_files, person_dirs, read_id_line, read_list_file, require_dir,
)
from vireid.data.records import ImageRecord, Modality
from vireid.errors import InputError

LLCM_TEST_FOLDERS = {Modality.VISIBLE: "test_vis", Modality.INFRARED: "test_nir"}
LLCM_TRAIN_INDEX = {Modality.VISIBLE: "train_vis.txt", Modality.INFRARED: "train_nir.txt"}
_CAMERA_IN_NAME = re.compile(r"_c(\d+)_")
_CAMERA_FOLDER = re.compile(r"^cam(\d+)$")


def load_llcm(root: str | os.PathLike[str]) -> VIDataset:
    """Read LLCM at ``root``; raises :class:`InputError` naming any missing or malformed part."""
    root = require_dir(Path(root), "LLCM root")
    require_dir(root / "idx", "LLCM index")
    train: list[ImageRecord] = []
    for modality, name in LLCM_TRAIN_INDEX.items():
        index = root / "idx" / name
        for rel, label, number in read_list_file(index, root):
            train.append(ImageRecord(root / rel, label, _train_camera(rel, index, number), modality))
    train.sort(key=lambda r: (r.pid, r.modality, r.cam, str(r.path)))
    test_ids = read_id_line(root / "idx" / "test_id.txt")
    wanted = set(test_ids)
    test: list[ImageRecord] = []
    for modality, folder in LLCM_TEST_FOLDERS.items():
        for cam, cam_dir in _camera_dirs(require_dir(root / folder, f"LLCM {folder}")):
            for pid, pid_dir in person_dirs(cam_dir).items():
                if pid in wanted:
                    test.extend(ImageRecord(p, pid, cam, modality) for p in image_files(pid_dir))
    present = {r.pid for r in test}
    missing = [pid for pid in test_ids if pid not in present]
    if missing:
        raise InputError(
            f"{root / 'idx' / 'test_id.txt'}: person {missing[0]} has no images in test_vis/cam*/{missing[0]:04d} "
            f"or test_nir/cam*/{missing[0]:04d} ({len(missing)} listed id(s) without images)")
    test.sort(key=lambda r: (r.pid, r.modality, r.cam, str(r.path)))
    return VIDataset(
        name="llcm", root=root, train=tuple(train), test=tuple(test), test_ids=tuple(sorted(test_ids)),
        info={"train_ids": len({r.pid for r in train}), "test_ids": len(test_ids)},
    )


def _train_camera(rel: str, index: Path, number: int) -> int:
    match = _CAMERA_IN_NAME.search(Path(rel).name)
    if match:
        return int(match.group(1))
    for part in Path(rel).parts[:-1]:
        folder = _CAMERA_FOLDER.match(part)
        if folder:
            return int(folder.group(1))
    raise InputError(
        f"{index}, line {number}: cannot tell the camera of {rel} (expected '_c<N>_' in the file name "
        f"or a 'cam<N>' folder)")


def _camera_dirs(folder: Path) -> list[tuple[int, Path]]:
    cams = []
    for entry in os.scandir(folder):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        match = _CAMERA_FOLDER.match(entry.name)
        if not match:
            raise InputError(f"{entry.path}: camera folder name must be cam<N>, got {entry.name!r}")
        cams.append((int(match.group(1)), Path(entry.path)))
    if not cams:
        raise InputError(f"{folder}: no cam<N> camera folders")
    return sorted(cams)
