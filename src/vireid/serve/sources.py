"""Gallery images to enrol: every image under a folder, or the rows of a CSV manifest.

Manifest columns (header row, any order): ``path`` (required; relative paths are resolved
against the manifest's folder) and optionally ``person_id``, ``camera``, ``time``, ``modality``
— the column names of :mod:`vireid.data.datasets.manifest`. Empty cells mean "unknown". A folder
is read without its hidden files and folders (``._x.jpg`` resource forks, ``.thumbs/``).

Images read from a folder (or given one by one) take their person id and camera from the two
common dataset layouts when these are unambiguous (:func:`identity_from_path`); otherwise both
stay unknown. A manifest's columns are taken as written.
"""

from __future__ import annotations

import csv
import datetime as dt
import re
from pathlib import Path, PurePath

from vireid.data.records import Modality
from vireid.errors import InputError
from vireid.serve.index import GalleryItem, check_int64

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: Market-1501 / DukeMTMC-reID file names: ``0002_c1s1_000451_03.jpg``, ``0005_c2_f0046985.jpg``.
_MARKET_NAME = re.compile(r"^(-1|\d{4})_c(\d+)(?:s\d+)?_")
#: SYSU-MM01 (and LLCM test) folders: ``cam3/0001/0004.jpg``.
_CAMERA_FOLDER = re.compile(r"^cam(\d+)$")
_PERSON_FOLDER = re.compile(r"^\d{4}$")


def gallery_sources(path: str | Path, modality: Modality) -> list[tuple[Path, GalleryItem]]:
    """(image file, metadata) pairs from a folder (recursive, sorted), one image file or a CSV manifest."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise InputError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        return [(f, _item(f, str(f.relative_to(path)), modality, *identity_from_path(f.relative_to(path)), None))
                for f in files]
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return [(path, _item(path, path.name, modality, *identity_from_path(PurePath(path.name)), None))]
    if path.is_file():
        try:
            return _from_manifest(path, modality)
        except UnicodeDecodeError:
            raise InputError(f"{path}: neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a UTF-8 CSV manifest") from None
    raise InputError(f"{path}: no such folder or manifest")


def identity_from_path(relative: PurePath) -> tuple[int | None, int | None]:
    """(person id, camera) of an image from its path below the gallery folder, None where unknown.

    * Market-1501 / DukeMTMC-reID names ``PPPP_cC…`` (``0002_c1s1_000451_03.jpg`` → 2, 1); Market's
      ``0000`` (distractors) and ``-1`` (junk) are no person: the camera is kept, the id left unknown;
    * SYSU-MM01 folders ``camC/PPPP/file`` (``cam3/0001/0004.jpg`` → 1, 3).

    When both layouts apply and disagree, both values stay unknown; nothing else is guessed.
    """
    found: list[tuple[int | None, int]] = []
    name = _MARKET_NAME.match(relative.name)
    if name is not None:
        pid = int(name.group(1))
        found.append((pid if pid > 0 else None, int(name.group(2))))
    parents = relative.parts[:-1]
    if len(parents) >= 2 and _PERSON_FOLDER.match(parents[-1]):
        camera = _CAMERA_FOLDER.match(parents[-2])
        if camera is not None:
            found.append((int(parents[-1]) or None, int(camera.group(1))))
    if not found or any(f != found[0] for f in found[1:]):
        return None, None
    return found[0]


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
