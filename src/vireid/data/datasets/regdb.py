"""RegDB adapter.

Layout (the dataset as distributed, with the community's index files)::

    ROOT/Visible/<id>/<file>.bmp
    ROOT/Thermal/<id>/<file>.bmp
    ROOT/idx/train_visible_{1..10}.txt, train_thermal_{1..10}.txt,
             test_visible_{1..10}.txt,  test_thermal_{1..10}.txt

Each index line is ``Visible/<id>/<file>.bmp <label>``; the label is the person id used for
training and evaluation, as in the reference code.  Visible images get camera 1, thermal
images camera 2 (the reference ``eval_regdb`` convention).  All 40 index files are checked up
front; ``trial`` picks the training split, and every trial's test list is kept in
:attr:`VIDataset.trial_tests` for the 10-trial protocol.
"""

from __future__ import annotations

import os
from pathlib import Path

from vireid.data.datasets import IMAGE_SUFFIXES, VIDataset, read_list_file, require_dir
from vireid.data.records import ImageRecord, Modality
from vireid.errors import InputError

REGDB_TRIALS = tuple(range(1, 11))
REGDB_FOLDERS = {Modality.VISIBLE: "Visible", Modality.INFRARED: "Thermal"}
REGDB_INDEX_NAMES = {Modality.VISIBLE: "visible", Modality.INFRARED: "thermal"}
REGDB_CAMERAS = {Modality.VISIBLE: 1, Modality.INFRARED: 2}


def load_regdb(root: str | os.PathLike[str], trial: int = 1) -> VIDataset:
    """Read RegDB at ``root``; ``trial`` (1..10) selects the training split and ``test``."""
    root = require_dir(Path(root), "RegDB root")
    if trial not in REGDB_TRIALS:
        raise InputError(f"RegDB trial must be one of 1..10, got {trial!r}")
    existing = set()
    for folder in REGDB_FOLDERS.values():
        existing |= _list_images(require_dir(root / folder, f"RegDB {folder}"), folder)
    require_dir(root / "idx", "RegDB index")
    splits: dict[tuple[str, int], list[ImageRecord]] = {}
    for split in ("train", "test"):
        for t in REGDB_TRIALS:
            records: list[ImageRecord] = []
            for modality in REGDB_FOLDERS:
                index = root / "idx" / f"{split}_{REGDB_INDEX_NAMES[modality]}_{t}.txt"
                records.extend(_read_index(index, root, existing, modality))
            splits[(split, t)] = records
    test = tuple(splits[("test", trial)])
    return VIDataset(
        name="regdb", root=root, train=tuple(splits[("train", trial)]), test=test,
        test_ids=tuple(sorted({r.pid for r in test})),
        trial_tests=tuple(tuple(splits[("test", t)]) for t in REGDB_TRIALS),
        info={"trial": trial},
    )


def _list_images(folder: Path, prefix: str) -> set[str]:
    found = set()
    for person in os.scandir(folder):
        if not person.is_dir() or person.name.startswith("."):
            continue
        if not person.name.isdigit():
            raise InputError(f"{person.path}: person folder name must be a number, got {person.name!r}")
        for image in os.scandir(person.path):
            if image.is_file() and Path(image.name).suffix.lower() in IMAGE_SUFFIXES:
                found.add(f"{prefix}/{person.name}/{image.name}")
    return found


def _read_index(index: Path, root: Path, existing: set[str], modality: Modality) -> list[ImageRecord]:
    folder = REGDB_FOLDERS[modality]
    records = []
    folder_of_label: dict[int, str] = {}
    for rel, label, number in read_list_file(index, root, existing):
        parts = rel.split("/")
        if len(parts) != 3 or parts[0] != folder:
            raise InputError(f"{index}, line {number}: expected a path '{folder}/<id>/<file>', got {rel!r}")
        person = folder_of_label.setdefault(label, parts[1])
        if person != parts[1]:
            raise InputError(
                f"{index}, line {number}: label {label} is used for both {folder}/{person} and {folder}/{parts[1]}")
        records.append(ImageRecord(root / rel, label, REGDB_CAMERAS[modality], modality))
    return records
