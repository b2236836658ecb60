"""Gallery images to enrol: every image under a folder, or the rows of a CSV manifest.

Manifest columns (header row, any order): ``path`` (required; relative paths are resolved
against the manifest's folder) and optionally ``person_id``, ``camera``, ``time``, ``modality``
— the column names of :mod:`vireid.data.datasets.manifest`. Empty cells mean "unknown". A folder
is read without its hidden files and folders (``._x.jpg`` resource forks, ``.thumbs/``).
"""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

from vireid.data.records import Modality
from vireid.errors import InputError
from vireid.serve.index import GalleryItem, check_int64

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def gallery_sources(path: str | Path, modality: Modality) -> list[tuple[Path, GalleryItem]]:
    """(image file, metadata) pairs from a folder (recursive, sorted), one image file or a CSV manifest."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise InputError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        return [(f, _item(f, str(f.relative_to(path)), modality, None, None, None)) for f in files]
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return [(path, _item(path, path.name, modality, None, None, None))]
    if path.is_file():
        try:
            return _from_manifest(path, modality)
        except UnicodeDecodeError:
            raise InputError(f"{path}: neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a UTF-8 CSV manifest") from None
    raise InputError(f"{path}: no such folder or manifest")


def _item(file: Path, name: str, modality: Modality, pid: int | None, cam: int | None, when: str | None) -> GalleryItem:
    if when is None:
        when = dt.datetime.fromtimestamp(file.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return GalleryItem(name=name, modality=modality.label, pid=pid, cam=cam, time=when, source=str(file))


def _from_manifest(manifest: Path, modality: Modality) -> list[tuple[Path, GalleryItem]]:
    base = manifest.resolve().parent
    out = []
    with open(manifest, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        if "path" not in header:
            raise InputError(f"{manifest}, line 1: header lacks the column 'path' (found {', '.join(header) or 'nothing'})")
        reader.fieldnames = header
        for row in reader:
            line = reader.line_num
            cells = {k: (v or "").strip() for k, v in row.items() if k is not None}
            if not cells.get("path"):
                continue
            file = Path(cells["path"])
            file = file if file.is_absolute() else base / file
            if not file.is_file():
                raise InputError(f"{manifest}, line {line}: image {file} not found")
            row_modality = modality
            if cells.get("modality"):
                try:
                    row_modality = Modality.parse(cells["modality"])
                except ValueError as exc:
                    raise InputError(f"{manifest}, line {line}: {exc}") from None
            out.append((file, _item(file, cells["path"], row_modality, _int(cells, "person_id", manifest, line),
                                    _int(cells, "camera", manifest, line), cells.get("time") or None)))
    if not out:
        raise InputError(f"{manifest}: manifest lists no images")
    return out


def _int(cells: dict[str, str], key: str, manifest: Path, line: int) -> int | None:
    value = cells.get(key, "")
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        raise InputError(f"{manifest}, line {line}: column '{key}' must be an integer, got {value!r}") from None
    try:
        return check_int64(number, f"column '{key}'")
    except InputError as exc:
        raise InputError(f"{manifest}, line {line}: {exc}") from None
