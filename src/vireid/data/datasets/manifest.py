"""Custom data: a CSV manifest listing every image.

The first row is a header naming (in any order) the columns::

    path,person_id,camera,modality,split
    images/0001_c1_01.jpg,1,1,visible,train
    /data/night/q1.png,7,3,infrared,query

* ``path``: image file; relative paths are resolved against the manifest's folder;
* ``person_id``, ``camera``: non-negative integers;
* ``modality``: ``visible`` or ``infrared`` (also ``rgb`` / ``ir`` / ``thermal`` / ``nir``);
* ``split``: ``train``, ``query`` or ``gallery``.

Other columns are ignored.  Every error names the manifest and the line.
"""

from __future__ import annotations

import csv
import difflib
import os
from pathlib import Path

from vireid.data.datasets import VIDataset, require_file
from vireid.data.records import ImageRecord, Modality
from vireid.errors import InputError

MANIFEST_COLUMNS = ("path", "person_id", "camera", "modality", "split")
MANIFEST_SPLITS = ("train", "query", "gallery")


def load_manifest(root: str | os.PathLike[str]) -> VIDataset:
    """Read the CSV manifest at ``root`` (a file); images must exist."""
    manifest = require_file(Path(root), "manifest")
    base = manifest.resolve().parent
    splits: dict[str, list[ImageRecord]] = {s: [] for s in MANIFEST_SPLITS}
    seen: dict[Path, int] = {}
    with open(manifest, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        for column in MANIFEST_COLUMNS:
            if column not in header:
                close = difflib.get_close_matches(column, header, n=1)
                hint = f" (found {close[0]!r})" if close else ""
                raise InputError(
                    f"{manifest}, line 1: header lacks column {column!r}{hint}; "
                    f"required columns: {', '.join(MANIFEST_COLUMNS)}")
        col = {name: header.index(name) for name in MANIFEST_COLUMNS}
        for row in reader:
            number = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < len(header):
                raise InputError(f"{manifest}, line {number}: expected {len(header)} columns, got {len(row)}")
            record, split = _parse_row(row, col, base, manifest, number)
            if record.path in seen:
                raise InputError(f"{manifest}, line {number}: image {record.path} is already listed on line {seen[record.path]}")
            seen[record.path] = number
            splits[split].append(record)
    if not seen:
        raise InputError(f"{manifest}: manifest lists no images")
    query, gallery = tuple(splits["query"]), tuple(splits["gallery"])
    if bool(query) != bool(gallery):
        present, empty = ("query", "gallery") if query else ("gallery", "query")
        raise InputError(f"{manifest}: lists {present} images but no {empty} images")
    return VIDataset(
        name="manifest", root=manifest, train=tuple(splits["train"]), test=query + gallery,
        test_ids=tuple(sorted({r.pid for r in query + gallery})), query=query, gallery=gallery,
        info={split: len(records) for split, records in splits.items()},
    )


def _parse_row(row: list[str], col: dict[str, int], base: Path, manifest: Path, number: int) -> tuple[ImageRecord, str]:
    def cell(name: str) -> str:
        return row[col[name]].strip()

    values = {}
    for name in ("person_id", "camera"):
        if not cell(name).isdigit():
            raise InputError(f"{manifest}, line {number}: {name} must be a non-negative integer, got {cell(name)!r}")
        values[name] = int(cell(name))
        if values[name] > 2**63 - 1:
            raise InputError(f"{manifest}, line {number}: {name} {cell(name)} is outside the 64-bit integer range")
    try:
        modality = Modality.parse(cell("modality"))
    except ValueError:
        raise InputError(
            f"{manifest}, line {number}: modality must be visible or infrared, got {cell('modality')!r}") from None
    split = cell("split").lower()
    if split not in MANIFEST_SPLITS:
        raise InputError(f"{manifest}, line {number}: split must be train, query or gallery, got {cell('split')!r}")
    if not cell("path"):
        raise InputError(f"{manifest}, line {number}: empty path")
    path = Path(cell("path"))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise InputError(f"{manifest}, line {number}: image {path} does not exist")
    return ImageRecord(path, values["person_id"], values["camera"], modality), split
