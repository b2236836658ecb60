"""SYSU-MM01 adapter.

Layout (the dataset as distributed)::

    ROOT/cam1 .. cam6/<pid:04d>/<idx:04d>.jpg
    ROOT/exp/train_id.txt, val_id.txt, test_id.txt     one comma-separated line each

Cameras 1, 2, 4, 5 are visible, 3 and 6 near-infrared.  The training set is the train + val
identities (395 in the real set), the test set every image of the test identities (96).
Person folders of identities in no list are ignored, as in the reference code.
"""

from __future__ import annotations

import os
from pathlib import Path

from vireid.data.datasets import VIDataset, image_files, person_dirs, read_id_line, require_dir
from vireid.data.records import ImageRecord, Modality
from vireid.errors import InputError

SYSU_CAMERAS = (1, 2, 3, 4, 5, 6)
SYSU_VISIBLE_CAMERAS = (1, 2, 4, 5)
SYSU_INFRARED_CAMERAS = (3, 6)
SYSU_SPLITS = ("train", "val", "test")


def sysu_modality(cam: int) -> Modality:
    return Modality.INFRARED if cam in SYSU_INFRARED_CAMERAS else Modality.VISIBLE


def load_sysu(root: str | os.PathLike[str]) -> VIDataset:
    """Read SYSU-MM01 at ``root``; raises :class:`InputError` naming any missing or malformed part."""
    root = require_dir(Path(root), "SYSU-MM01 root")
    split_ids = {split: read_id_line(root / "exp" / f"{split}_id.txt") for split in SYSU_SPLITS}
    train_ids = set(split_ids["train"]) | set(split_ids["val"])
    leaked = sorted(train_ids & set(split_ids["test"]))
    if leaked:
        raise InputError(
            f"{root / 'exp' / 'test_id.txt'}: person id {leaked[0]} is also a train/val id "
            f"({len(leaked)} overlapping id(s))")
    folders = {cam: person_dirs(require_dir(root / f"cam{cam}", f"camera cam{cam}")) for cam in SYSU_CAMERAS}

    def records_of(ids: set[int]) -> list[ImageRecord]:
        records = []
        for pid in sorted(ids):
            for cam in SYSU_CAMERAS:
                folder = folders[cam].get(pid)
                if folder is not None:
                    records.extend(ImageRecord(p, pid, cam, sysu_modality(cam)) for p in image_files(folder))
        return records

    train = records_of(train_ids)
    test = records_of(set(split_ids["test"]))
    for split, ids in split_ids.items():
        present = {r.pid for r in (test if split == "test" else train)}
        missing = [pid for pid in ids if pid not in present]
        if missing:
            raise InputError(
                f"{root / 'exp' / f'{split}_id.txt'}: person {missing[0]} has no images in any "
                f"cam1..cam6/{missing[0]:04d} folder ({len(missing)} listed id(s) without images)")
    return VIDataset(
        name="sysu", root=root, train=tuple(train), test=tuple(test),
        test_ids=tuple(sorted(split_ids["test"])),
        info={"train_ids": len(train_ids), "test_ids": len(split_ids["test"])},
    )
