"""A persistent gallery index: features, metadata (SQLite), images and re-ranking structures.

Layout of ``INDEX_DIR``::

    versions/v000007.json    one committed version (the highest number is the live one)
    segments/<uuid>.npy      feature rows (float32, unit rows), shared by versions
    bases/<uuid>.npz         re-ranking structures of the first rows (a compacted GalleryState)
    deltas/<uuid>.npz        one enrolment: its feature rows and the structure rows it changed
    meta/<uuid>.sqlite       one row per item of a gallery generation (appended by enrolments)
    images/<sha256>.<ext>    enrolled images, content-addressed; thumbs/<sha256>.jpg
    models/<sha256>.<ext>    the encoder the features came from

A version is ``segments + base + deltas`` (rows ``0..count``) and a metadata file. Enrolment
(:func:`add_to_index`) costs O(items added): it appends the new rows to the metadata, writes one
small delta file and one manifest; nothing else is rewritten. A later :func:`compact` folds the
deltas into a new base (the service runs it in the background).

Writers (``build``, ``add``, ``compact``, ``restore``) hold an exclusive lock and commit by
renaming a complete manifest into ``versions/``: a writer killed at any point leaves the previous
version live, and its leftovers (rows past the live count, unreferenced files, temporary files,
images of a killed enrolment) are removed by the next writer or by :func:`collect_garbage`.
Readers hold a shared ``flock`` on their version's manifest for as long as they use it (a lease);
garbage collection removes only versions no reader holds, so a search that started on a version
finishes on it. A build that replaces a gallery keeps the replaced version until an explicit
``vireid index gc`` (:func:`restore_version` brings it back).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import sqlite3
import threading
import time
import uuid
import weakref
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vireid.errors import InputError
from vireid.io import PendingFile, atomic_path, fsync_folder, remove_stale_temporaries, save_npz_atomic, write_bytes_atomic
from vireid.retrieval.knn import IvfParams, NeighbourIndex
from vireid.retrieval.gallery_state import GalleryState, SingleQueryParams, StateDelta
from vireid.retrieval.single import aim_from_candidates, l2_normalize_rows, query_distance, top_k
from vireid.serve.encoder import IMAGE_FORMATS, decode_image
from vireid.serve.quantized import QuantizedGallery

FORMAT_VERSION = 2
#: How ``plain`` and ``aim`` pick the items they score exactly (see :meth:`GalleryIndex.open`).
FIRST_STAGES = ("int8", "scan", "ivf")
THUMBNAIL_SIZE = (96, 192)
INT64 = (-(2**63), 2**63 - 1)
#: Compaction folds the deltas into a new base beyond this many of them, or this overlay fraction.
COMPACT_DELTAS = 512
COMPACT_FRACTION = 0.1
_VERSION_RE = re.compile(r"^v(\d{6})\.json$")
_OWN_FILE_RE = re.compile(r"^[0-9a-f]{32}\.(npy|npz|sqlite|sqlite-wal|sqlite-shm)$")
_SHA_FILE_RE = re.compile(r"^[0-9a-f]{64}\.[a-z0-9]{1,5}$")
_IMAGE_SUFFIX = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "GIF": "gif", "TIFF": "tif", "WEBP": "webp"}
_FOLDERS = ("versions", "segments", "bases", "deltas", "meta", "images", "thumbs", "models")
WRITING_MARKER = "WRITING"

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


def check_int64(value: int | None, what: str) -> int | None:
    """``value`` if it fits a signed 64-bit integer (SQLite's INTEGER), else :class:`InputError`."""
    if value is not None and not INT64[0] <= value <= INT64[1]:
        raise InputError(f"{what} {value} is outside the 64-bit integer range")
    return value


@dataclass
class GalleryItem:
    """Metadata of one gallery image; ``pid`` / ``cam`` / ``time`` are None when unknown."""

    name: str
    modality: str = "visible"
    pid: int | None = None
    cam: int | None = None
    time: str | None = None
    source: str | None = None
    image: str | None = None
    sha256: str | None = None


@dataclass
class NewImage:
    """An item to enrol: its metadata, the image bytes to keep for display (optional) and the
    SHA-256 of its content (enrolling the same content twice adds it once)."""

    item: GalleryItem
    data: bytes | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        check_int64(self.item.pid, "person id")
        check_int64(self.item.cam, "camera id")
        if self.sha256 is None and self.data is not None:
            self.sha256 = hashlib.sha256(self.data).hexdigest()


#: What :meth:`GalleryIndex.search` adds to a method's re-ranked distance so that every method's
#: served distance is >= 0 (smaller = closer): ``plain`` ``−cos`` → ``1 − cos`` ∈ [0, 2]; ``aim``
#: (SAAI Eq. 10) ``−Q′·G′ᵀ − cos`` → ``2 − Q′·G′ᵀ − cos`` ∈ [0, 4] (unit rows: both terms lie in
#: [−1, 1]). The other methods' distances are >= 0 already. One constant per method: the ranking
#: is unchanged.
SERVED_DISTANCE_OFFSET = {"plain": 1.0, "aim": 2.0}


@dataclass
class SearchHit:
    """One ranked gallery item; ``distance`` is the method's distance shifted by
    :data:`SERVED_DISTANCE_OFFSET` (>= 0, smaller = closer, comparable within one method only)."""

    index: int
    distance: float
    item: GalleryItem


@dataclass
class IndexSettings:
    """Stored in the manifest; fixed when the index is built."""

    rerank: SingleQueryParams = field(default_factory=SingleQueryParams.resolve)
    knn: str = "auto"
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"rerank": self.rerank.to_dict(), "knn": self.knn, "seed": self.seed}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> IndexSettings:
        try:
            return cls(SingleQueryParams.from_dict(data["rerank"], source=source), str(data["knn"]), int(data["seed"]))
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{source}: malformed settings") from None


class IndexDamaged(InputError):
    """A file of the index cannot be read or contradicts the manifest."""


def _damaged(path: Path | str, what: str) -> IndexDamaged:
    return IndexDamaged(f"{path}: {what}; check the index with `vireid index verify`")


# ----------------------------------------------------------------------------------- versions and leases


def _versions(root: Path) -> list[tuple[int, Path]]:
    folder = root / "versions"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := _VERSION_RE.match(name))]
    return sorted(found)


def current_version(root: str | os.PathLike[str]) -> str | None:
    """Name of the live version (``v000007``), None when ``root`` holds no index."""
    root = Path(root)
    if (root / "CURRENT").is_file() and not (root / "versions").is_dir():
        raise InputError(f"{root}: index written by an older vireid (format 1); rebuild it with `vireid index build`")
    versions = _versions(root)
    return versions[-1][1].stem if versions else None


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, f"unreadable manifest ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise _damaged(path, f"unsupported manifest format {manifest.get('format') if isinstance(manifest, dict) else '?'}")
    required = ("version", "count", "dim", "metadata", "segments", "base", "base_count", "deltas", "settings")
    missing = [key for key in required if key not in manifest]
    if missing:
        raise _damaged(path, f"manifest lacks {', '.join(missing)}")
    return manifest


class _Lease:
    """A shared ``flock`` on a version's manifest: garbage collection leaves the version alone."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if not os.path.samestat(os.fstat(fd), os.stat(path)):
                raise FileNotFoundError(path)  # collected between open and lock
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    def release(self) -> None:
        self._finalizer()


def _take_if_unleased(path: Path) -> int | None:
    """An exclusive lock on an unleased version's manifest (fd), None when a reader holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


# ----------------------------------------------------------------------------------- in-memory features


class FeatureBuffer:
    """Feature rows of the versions one process loads in turn: an append-only array with spare
    capacity. A version reads the first ``count`` rows; an enrolment writes only past the rows
    written so far, so the versions in use never see a row change."""

    def __init__(self, rows: np.ndarray, spare: int | None = None) -> None:
        n, dim = rows.shape
        capacity = n + (max(1024, n // 4) if spare is None else spare)
        self.array = np.empty((capacity, dim), rows.dtype)
        self.array[:n] = rows
        self.filled = n
        self._lock = threading.Lock()

    def extended(self, rows: np.ndarray, at: int) -> FeatureBuffer:
        """A buffer holding the first ``at`` rows and then ``rows``: this one when they fit after
        the rows written so far, else a copy with more room."""
        with self._lock:
            if at == self.filled and at + len(rows) <= len(self.array):
                self.array[at:at + len(rows)] = rows
                self.filled += len(rows)
                return self
        return FeatureBuffer(np.concatenate([self.array[:at], rows.astype(self.array.dtype)]))


class _FirstStage:
    """The int8 (or IVF) copy of the first ``rows`` gallery rows; later rows are scanned exactly."""

    def __init__(self, feats: np.ndarray, kind: str, nprobe: int, seed: int) -> None:
        self.rows = len(feats)
        self.kind = kind
        self.int8 = QuantizedGallery(feats) if kind == "int8" and self.rows else None
        self.ivf = (NeighbourIndex(feats, "ivf", ivf=IvfParams(query_nprobe=nprobe), seed=seed)
                    if kind == "ivf" and self.rows else None)

    def candidates(self, unit: np.ndarray, want: int) -> np.ndarray:
        if self.int8 is not None:
            return self.int8.candidates(unit, want)
        assert self.ivf is not None
        rows, _ = self.ivf.search(unit[None], min(want, self.rows))
        return rows[0][rows[0] >= 0]


# ----------------------------------------------------------------------------------- metadata


_SCHEMA = ("CREATE TABLE IF NOT EXISTS items (idx INTEGER PRIMARY KEY, name TEXT NOT NULL, modality TEXT NOT NULL, "
           "pid INTEGER, cam INTEGER, time TEXT, source TEXT, image TEXT, sha256 TEXT)",
           "CREATE INDEX IF NOT EXISTS items_sha256 ON items(sha256)")
_COLUMNS = "idx, name, modality, pid, cam, time, source, image, sha256"
_readers = threading.local()


def _reader(path: Path) -> sqlite3.Connection:
    """This thread's read-only connection to a metadata file (opened once)."""
    cache = getattr(_readers, "connections", None)
    if cache is None:
        cache = _readers.connections = {}
    key = str(path)
    if key not in cache:
        if not path.is_file():
            raise _damaged(path, "metadata file missing")
        cache[key] = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    return cache[key]


def _writer_db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    for statement in _SCHEMA:
        db.execute(statement)
    return db


def _read_items(path: Path, wanted: list[int]) -> list[GalleryItem]:
    found: dict[int, GalleryItem] = {}
    try:
        db = _reader(path)
        for start in range(0, len(wanted), 900):
            part = wanted[start:start + 900]
            marks = ",".join("?" * len(part))
            for row in db.execute(f"SELECT {_COLUMNS} FROM items WHERE idx IN ({marks})", part):
                found[row[0]] = GalleryItem(*row[1:])
    except sqlite3.Error as exc:
        _readers.connections.pop(str(path), None)
        raise _damaged(path, f"metadata unreadable ({exc})") from None
    missing = [i for i in wanted if i not in found]
    if missing:
        raise _damaged(path, f"metadata lacks gallery id {missing[0]}")
    return [found[i] for i in wanted]


# ----------------------------------------------------------------------------------- reading


class GalleryIndex:
    """One loaded version of an index (immutable in memory; holds a lease on its manifest)."""

    def __init__(self, root: Path, manifest: dict[str, Any], state: GalleryState, buffer: FeatureBuffer,
                 scan_dtype: str, first_stage: str, candidates: int, nprobe: int, lease: _Lease | None,
                 stage: _FirstStage | None = None, half: FeatureBuffer | None = None) -> None:
        self.root = root
        self.manifest = manifest
        self.version = str(manifest["version"])
        self.state = state
        self.settings = IndexSettings.from_dict(manifest["settings"], source=str(self._manifest_path()))
        self._buffer = buffer
        self.scan_dtype = scan_dtype
        self.first_stage = first_stage
        self.candidates = candidates
        self.nprobe = nprobe
        self._lease = lease
        self._half = half
        if scan_dtype == "float16" and (half is None or half.filled < self.count):
            half = FeatureBuffer(self.feats.astype(np.float16)) if half is None else \
                half.extended(self.feats[half.filled:].astype(np.float16), half.filled)
            self._half = half
        if stage is not None and (stage.kind != first_stage or stage.rows > self.count):
            stage = None
        if first_stage != "scan" and stage is None:
            stage = _FirstStage(self.feats, first_stage, nprobe, self.settings.seed)
        self._stage = stage if first_stage != "scan" else None

    @classmethod
    def open(cls, root: str | os.PathLike[str], scan_dtype: str = "float32", first_stage: str = "int8",
             candidates: int = 256, nprobe: int = 32, *, previous: GalleryIndex | None = None) -> GalleryIndex:
        """Load the live version (taking a lease on it).

        ``first_stage`` decides how ``plain`` and ``aim`` find the items they score exactly:

        * ``"int8"`` (default): a scan of an int8 copy of the gallery (:mod:`vireid.serve.quantized`,
          a quarter of the float32 bytes) keeps the ``candidates`` best items (at least twice the
          larger of ``topk`` and AIM's k1), which are then scored exactly in float32; rows enrolled
          after the copy was made are scored exactly;
        * ``"scan"``: every gallery feature is scored exactly (``scan_dtype`` precision);
        * ``"ivf"``: ``candidates`` approximate neighbours from a faiss IVF index (``nprobe``
          lists per query), scored exactly.

        ``sgr``, ``mnnr``, ``sim`` and ``krr`` always scan. ``previous``: a version of the same index
        loaded earlier by this process; what it shares with the new one is reused, not re-read.
        """
        root = Path(root)
        if scan_dtype not in ("float32", "float16"):
            raise InputError(f"scan dtype must be float32 or float16, got {scan_dtype!r}")
        if first_stage not in FIRST_STAGES:
            raise InputError(f"first stage must be one of {', '.join(FIRST_STAGES)}, got {first_stage!r}")
        if candidates < 1:
            raise InputError(f"candidates must be >= 1, got {candidates}")
        for _ in range(20):  # a version can be collected between listing and locking it: list again
            name = current_version(root)
            if name is None:
                raise InputError(f"{root}: not a vireid index (no versions/)")
            path = root / "versions" / f"{name}.json"
            try:
                lease = _Lease(path)
            except FileNotFoundError:
                continue
            manifest = _read_manifest(path)
            return cls._load(root, manifest, lease, scan_dtype, first_stage, candidates, nprobe, previous)
        raise InputError(f"{root}: the live version kept changing while it was being opened")

    @classmethod
    def _load(cls, root: Path, manifest: dict[str, Any], lease: _Lease | None, scan_dtype: str, first_stage: str,
              candidates: int, nprobe: int, previous: GalleryIndex | None) -> GalleryIndex:
        settings = IndexSettings.from_dict(manifest["settings"], source=str(root / "versions" / f"{manifest['version']}.json"))
        dim, count = int(manifest["dim"]), int(manifest["count"])
        reuse = previous is not None and _extends(previous.manifest, manifest)
        if reuse:
            assert previous is not None
            state, buffer = previous.state, previous._buffer
            at = previous.count
            for entry in manifest["deltas"][len(previous.manifest["deltas"]):]:
                feats, delta = _load_delta(root, entry, dim)
                buffer = buffer.extended(feats, at)
                state = state.apply(delta)
                at += len(feats)
            stage, half = previous._stage, previous._half
        else:
            rows = _load_segments(root, manifest, dim)
            state = _load_base(root, manifest, settings)
            parts = [rows]
            for entry in manifest["deltas"]:
                feats, delta = _load_delta(root, entry, dim)
                parts.append(feats)
                state = state.apply(delta)
            buffer = FeatureBuffer(np.concatenate(parts) if len(parts) > 1 else rows)
            stage, half = None, None
        if state.n != count or buffer.filled < count:
            raise _damaged(root / "versions" / f"{manifest['version']}.json",
                           f"holds {state.n} structure rows for {count} items")
        return cls(root, manifest, state, buffer, scan_dtype, first_stage, candidates, nprobe, lease, stage, half)

    def _manifest_path(self) -> Path:
        return self.root / "versions" / f"{self.version}.json"

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def feats(self) -> np.ndarray:
        """(count, d) unit feature rows."""
        return self._buffer.array[: self.count]

    @property
    def model_file(self) -> Path | None:
        model = self.manifest.get("model")
        return self.root / model["file"] if model else None

    @property
    def metadata_path(self) -> Path:
        return self.root / self.manifest["metadata"]

    def items(self, indices: Sequence[int]) -> list[GalleryItem]:
        """Metadata of gallery rows ``indices`` (in that order)."""
        wanted = [int(i) for i in indices]
        return _read_items(self.metadata_path, wanted) if wanted else []

    def item(self, index: int) -> GalleryItem:
        if not 0 <= index < self.count:
            raise InputError(f"gallery id {index} out of range [0, {self.count})")
        return self.items([index])[0]

    def known(self, hashes: Sequence[str]) -> dict[str, int]:
        """Gallery ids of the items whose content has one of these SHA-256 hashes."""
        out: dict[str, int] = {}
        hashes = list(dict.fromkeys(h for h in hashes if h))
        try:
            db = _reader(self.metadata_path)
            for start in range(0, len(hashes), 900):
                part = hashes[start:start + 900]
                rows = db.execute(f"SELECT sha256, MIN(idx) FROM items WHERE idx < ? AND sha256 IN "
                                  f"({','.join('?' * len(part))}) GROUP BY sha256", [self.count, *part])
                out.update({sha: int(idx) for sha, idx in rows})
        except sqlite3.Error as exc:
            raise _damaged(self.metadata_path, f"metadata unreadable ({exc})") from None
        return out

    def search(self, query: np.ndarray, method: str = "aim", topk: int = 20) -> list[SearchHit]:
        """The ``topk`` gallery items closest to one query feature under ``method``, with their
        served distances (:data:`SERVED_DISTANCE_OFFSET`)."""
        query = np.asarray(query)
        if query.shape != (self.dim,):
            raise InputError(f"query feature has shape {query.shape}, the index holds d={self.dim}")
        if topk < 1:
            raise InputError(f"topk must be >= 1, got {topk}")
        unit = l2_normalize_rows(query[None])[0]
        offset = SERVED_DISTANCE_OFFSET.get(method, 0.0)
        if self._stage is not None and method in ("plain", "aim"):
            cand_index, cand_sim = self.first_stage_candidates(unit, topk)
            if method == "plain":
                rows, dist = cand_index, -cand_sim.astype(np.float64)
            else:
                rows, dist = aim_from_candidates(unit, self.feats, self.state, cand_index, cand_sim, keep=topk)
            best = top_k(dist, min(topk, len(rows)))
            return [SearchHit(int(rows[i]), float(dist[i]) + offset, item) for i, item in zip(best, self.items(rows[best]))]
        dist = query_distance(method, self.similarity(unit), self.state)
        best = top_k(dist, min(topk, self.count))
        return [SearchHit(int(i), float(dist[i]) + offset, item) for i, item in zip(best, self.items(best))]

    def similarity(self, unit: np.ndarray) -> np.ndarray:
        """Cosine similarities ``g·q`` (float64) to every item — the O(G·d) pass, run by torch
        (its thread pool stays efficient under load). With ``scan_dtype="float16"`` the pass reads
        a half-precision copy (similarities within ~1e-3)."""
        rows = self._half.array[: self.count] if self._half is not None and self.scan_dtype == "float16" else self.feats
        gallery = torch.from_numpy(rows)
        with torch.no_grad():
            return (gallery @ torch.from_numpy(np.ascontiguousarray(unit)).to(gallery.dtype)).double().numpy()

    def first_stage_candidates(self, unit: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows the first stage keeps for one unit query, and their exact float32 similarities."""
        assert self._stage is not None
        want = min(max(self.candidates, 2 * max(topk, int(self.state.effective.aim["k1"]))), self.count)
        rows = self._stage.candidates(unit, min(want, self._stage.rows))
        tail = np.arange(self._stage.rows, self.count)
        rows = np.concatenate([rows, tail]) if len(tail) else rows
        sim = np.einsum("ij,j->i", self.feats[rows], unit)  # few rows: no thread pool
        if len(rows) > want:
            keep = np.argpartition(-sim, want - 1)[:want]
            rows, sim = rows[keep], sim[keep]
        return rows, sim

    def image_path(self, item: GalleryItem, thumbnail: bool = False) -> Path | None:
        """The stored image (or its thumbnail, made again if it was lost) of an item; names are
        validated content hashes."""
        if item.image is None or not _SHA_FILE_RE.match(item.image):
            return None
        image = self.root / "images" / item.image
        if thumbnail and image.is_file():
            return ensure_thumbnail(self.root, item.image)
        return self.root / "thumbs" / (item.image.split(".")[0] + ".jpg") if thumbnail else image

    def needs_compaction(self) -> bool:
        return len(self.manifest["deltas"]) >= COMPACT_DELTAS or self.state.overlay_fraction() > COMPACT_FRACTION

    def warm_up(self) -> None:
        """Build the lookups the first enrolment and the first searches would otherwise build."""
        self.state.warm_up()


def _extends(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """``new`` is ``old`` plus deltas (same base, segments and metadata)."""
    return (old["base"] == new["base"] and old["segments"] == new["segments"] and old["metadata"] == new["metadata"]
            and new["deltas"][: len(old["deltas"])] == old["deltas"] and old["dim"] == new["dim"]
            and old["settings"] == new["settings"])


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {key: z[key] for key in z.files}
    except FileNotFoundError:
        raise _damaged(path, "file missing") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise _damaged(path, f"unreadable ({type(exc).__name__})") from None


def _check_rows(path: Path, rows: np.ndarray, expected: int, dim: int) -> np.ndarray:
    if rows.dtype != np.float32 or rows.shape != (expected, dim):
        raise _damaged(path, f"holds {rows.dtype} {rows.shape}, expected float32 ({expected}, {dim})")
    if not np.isfinite(rows).all():
        raise _damaged(path, "holds non-finite features")
    return rows


def _load_segments(root: Path, manifest: dict[str, Any], dim: int) -> np.ndarray:
    parts = []
    for entry in manifest["segments"]:
        path = root / entry["file"]
        try:
            rows = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise _damaged(path, "file missing") from None
        except (OSError, ValueError, EOFError) as exc:
            raise _damaged(path, f"unreadable ({type(exc).__name__})") from None
        parts.append(_check_rows(path, rows, int(entry["rows"]), dim))
    rows = np.concatenate(parts) if parts else np.empty((0, dim), np.float32)
    if len(rows) != int(manifest["base_count"]):
        raise _damaged(root / "versions" / f"{manifest['version']}.json", "segments and base disagree")
    return rows


def _load_base(root: Path, manifest: dict[str, Any], settings: IndexSettings) -> GalleryState:
    path = root / manifest["base"]
    arrays = _load_npz(path)
    try:
        state = GalleryState.from_base_arrays(arrays, settings.rerank)
    except (KeyError, ValueError, IndexError, InputError) as exc:
        raise _damaged(path, f"inconsistent structures ({type(exc).__name__})") from None
    if state.n != int(manifest["base_count"]):
        raise _damaged(path, f"holds {state.n} rows, the manifest says {manifest['base_count']}")
    return state


def _load_delta(root: Path, entry: dict[str, Any], dim: int) -> tuple[np.ndarray, StateDelta]:
    path = root / entry["file"]
    arrays = _load_npz(path)
    try:
        feats = _check_rows(path, arrays.pop("feats"), int(entry["rows"]), dim)
        return feats, StateDelta.from_arrays(arrays)
    except (KeyError, ValueError, IndexError) as exc:
        raise _damaged(path, f"inconsistent delta ({type(exc).__name__})") from None


# ----------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def _writer_lock(root: Path) -> Iterator[None]:
    try:
        root.mkdir(parents=True, exist_ok=True)
        fh = open(root / "lock", "a+")
    except OSError as exc:
        raise InputError(f"{root}: cannot write the index ({exc.strerror})") from None
    with fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def store_file(root: Path, folder: str, data: bytes, suffix: str, *, sync_folder: bool = True) -> str:
    """Write ``data`` content-addressed under ``root/folder`` (atomic, idempotent); its file name.
    Leftovers of killed writers there are collected by :func:`collect_garbage`, not looked for here
    (the folder may hold a file per gallery item)."""
    name = f"{hashlib.sha256(data).hexdigest()}.{suffix}"
    path = root / folder / name
    if not path.exists():
        write_bytes_atomic(path, data, sync_folder=sync_folder, clean_stale=False)
    return name


def ensure_thumbnail(root: Path, image_name: str, image: Image.Image | None = None) -> Path:
    """The thumbnail of a stored image, made now if it is missing. Thumbnails are not synced to
    disk when written: after a power failure one may be missing and is simply made again."""
    path = root / "thumbs" / (image_name.split(".")[0] + ".jpg")
    if not path.is_file() or path.stat().st_size == 0:
        if image is None:
            image = decode_image((root / "images" / image_name).read_bytes(), image_name)
        image.thumbnail(THUMBNAIL_SIZE)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        write_bytes_atomic(path, out.getvalue(), clean_stale=False, durable=False)
    return path


def _store_image(root: Path, data: bytes) -> str:
    """The image (durable; its folder is synced by the caller) and its thumbnail, content-addressed."""
    image = decode_image(data, "enrolled image")
    suffix = _IMAGE_SUFFIX.get(Image.open(io.BytesIO(data), formats=IMAGE_FORMATS).format or "", "img")
    name = store_file(root, "images", data, suffix, sync_folder=False)
    ensure_thumbnail(root, name, image)
    return name


def _store_images(root: Path, images: Sequence[NewImage]) -> list[GalleryItem]:
    items = []
    for new in images:
        item = GalleryItem(**asdict(new.item))
        item.sha256 = new.sha256
        if new.data is not None:
            item.image = _store_image(root, new.data)
        items.append(item)
    if any(new.data is not None for new in images):
        fsync_folder(root / "images")
    return items


def _check_feats(feats: np.ndarray, n: int, dim: int | None = None) -> np.ndarray:
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.shape[0] != n or n == 0 or feats.shape[1] == 0:
        raise InputError(f"expected features of shape ({n}, d) with n > 0 and d > 0, got {feats.shape}")
    if dim is not None and feats.shape[1] != dim:
        raise InputError(f"features have d={feats.shape[1]} but the index holds d={dim}")
    with np.errstate(over="ignore", invalid="ignore"):
        as32 = feats.astype(np.float32)
    if not np.isfinite(as32).all():
        raise InputError("features contain non-finite values (or values beyond float32)")
    zero = np.flatnonzero(~np.any(as32 != 0, axis=1))
    if len(zero):
        raise InputError(f"feature row {zero[0]} is all zero (no direction to compare)")
    return l2_normalize_rows(as32)


def _new_name(folder: str, suffix: str) -> str:
    return f"{folder}/{uuid.uuid4().hex}.{suffix}"


def _commit(root: Path, manifest: dict[str, Any]) -> str:
    """Write ``manifest`` as the next version (the commit point); returns its name."""
    versions = _versions(root)
    number = versions[-1][0] + 1 if versions else 1
    name = f"v{number:06d}"
    manifest["version"] = name
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with atomic_path(root / "versions" / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return name


def _dedupe(images: Sequence[NewImage], known: dict[str, int]) -> tuple[list[int], list[int | None]]:
    """Positions of the images to add, and for each image the id it already has (or None)."""
    seen: dict[str, int] = {}
    fresh, existing = [], []
    for i, new in enumerate(images):
        sha = new.sha256
        if sha is not None and sha in known:
            existing.append(known[sha])
        elif sha is not None and sha in seen:
            existing.append(-1 - seen[sha])  # the id of an earlier image of this request
        else:
            if sha is not None:
                seen[sha] = i
            fresh.append(i)
            existing.append(None)
    return fresh, existing


def build_index(root: str | os.PathLike[str], feats: np.ndarray, images: Sequence[NewImage], *,
                settings: IndexSettings | None = None, model: dict[str, Any] | None = None,
                replace: bool = False, progress: Progress = _quiet) -> str:
    """Create a version holding exactly ``images`` (content duplicates once); returns its name.

    ``feats`` (N, d): their features; ``model``: ``{"file": ..., ...}`` as written by
    :func:`store_model` (None for feature-only indexes, e.g. benchmarks). An existing index is
    refused unless ``replace``; the replaced version then stays until :func:`collect_garbage`
    with ``everything=True`` (``vireid index gc``) and can be brought back by :func:`restore_version`.
    """
    root = Path(root)
    settings = settings or IndexSettings()
    feats = _check_feats(feats, len(images))
    with _writer_lock(root):
        previous = current_version(root)
        if previous is not None and not replace:
            raise InputError(f"{root} already holds an index (live version {previous}); pass --replace to make "
                             f"the new gallery live (the current one stays recoverable until `vireid index gc`)")
        for folder in _FOLDERS:
            (root / folder).mkdir(parents=True, exist_ok=True)
        _collect(root, everything=False)
        fresh, _ = _dedupe(images, {})
        feats, images = feats[fresh], [images[i] for i in fresh]
        progress(f"neighbour graph of {len(feats)} items")
        state = GalleryState.build(feats, settings.rerank, knn=settings.knn, seed=settings.seed)
        progress("storing images")
        marker = _mark_writing(root)
        items = _store_images(root, images)
        generation = uuid.uuid4().hex
        metadata = f"meta/{generation}.sqlite"
        _append_items(root / metadata, 0, items)
        segment, base = _new_name("segments", "npy"), _new_name("bases", "npz")
        progress("writing structures")
        with atomic_path(root / segment, suffix=".npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, feats)
        save_npz_atomic(root / base, **state.base_arrays())
        keep = []
        if previous is not None:
            old = _read_manifest(root / "versions" / f"{previous}.json")
            keep = [previous, *[v for v in old.get("keep", []) if (root / "versions" / f"{v}.json").is_file()]]
        manifest = {
            "format": FORMAT_VERSION, "version": None, "count": len(feats), "dim": int(feats.shape[1]),
            "generation": generation, "metadata": metadata, "segments": [{"file": segment, "rows": len(feats)}],
            "base": base, "base_count": len(feats), "deltas": [], "settings": settings.to_dict(), "model": model,
            "keep": keep,
        }
        name = _commit(root, manifest)
        marker.unlink()
        progress(f"committed {name}")
        _collect(root, everything=False)
        progress(f"done: {name} holds {len(feats)} items")
        return name


def _mark_writing(root: Path) -> Path:
    """The marker of a writer storing images: a killed writer's images are collected by the next."""
    marker = root / WRITING_MARKER
    marker.touch()
    return marker


def _append_items(path: Path, start: int, items: Sequence[GalleryItem]) -> None:
    """Rows ``start..`` of a metadata file (rows from ``start`` on, left by a killed writer, are replaced)."""
    try:
        with contextlib.closing(_writer_db(path)) as db:
            db.execute("DELETE FROM items WHERE idx >= ?", (start,))
            db.executemany(f"INSERT INTO items ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [
                (start + i, it.name, it.modality, it.pid, it.cam, it.time, it.source, it.image, it.sha256)
                for i, it in enumerate(items)])
            db.commit()
    except sqlite3.Error as exc:
        raise InputError(f"{path}: cannot write the metadata ({exc})") from None


def add_to_index(root: str | os.PathLike[str], feats: np.ndarray, images: Sequence[NewImage], *,
                 current: GalleryIndex | None = None, progress: Progress = _quiet) -> tuple[GalleryIndex, list[int]]:
    """Append items to the live version: O(items added) work and bytes (see the module docstring).

    ``current``: the live version as this process holds it (saves re-reading it). Items whose
    content is already in the gallery are not added again. Returns the new version (loaded) and
    the gallery id of every item, in order.
    """
    root = Path(root)
    with _writer_lock(root):
        live = current_version(root)
        if current is None or current.version != live:
            current = GalleryIndex.open(root, first_stage=current.first_stage if current else "scan",
                                        scan_dtype=current.scan_dtype if current else "float32",
                                        candidates=current.candidates if current else 256,
                                        nprobe=current.nprobe if current else 32, previous=current)
        feats = _check_feats(feats, len(images), current.dim)
        marker = root / WRITING_MARKER
        if marker.exists():  # a writer was killed while storing images: collect them first
            _collect(root, everything=False, images=True)
        fresh, existing = _dedupe(images, current.known([new.sha256 for new in images if new.sha256]))
        start = current.count
        new_id = {position: start + j for j, position in enumerate(fresh)}
        ids: list[int] = []
        for i, have in enumerate(existing):
            if have is None:
                ids.append(new_id[i])
            elif have < 0:
                ids.append(ids[-1 - have])
            else:
                ids.append(have)
        if not fresh:
            return current, ids
        feats, images = feats[fresh], [images[i] for i in fresh]
        progress(f"updating the neighbour graph with {len(feats)} items")
        buffer = current._buffer.extended(feats, start)
        state, delta = current.state.extend(buffer.array, len(feats))
        marker = _mark_writing(root)
        items = _store_images(root, images)
        _append_items(current.metadata_path, start, items)
        manifest = {**current.manifest, "count": start + len(feats),
                    "keep": [v for v in current.manifest.get("keep", []) if (root / "versions" / f"{v}.json").is_file()]}
        if delta is None:  # neighbourhood sizes changed with the gallery size: a new base
            progress("writing structures")
            segment, base = _new_name("segments", "npy"), _new_name("bases", "npz")
            with atomic_path(root / segment, suffix=".npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, buffer.array[current.manifest["base_count"]:start + len(feats)])
            save_npz_atomic(root / base, **state.base_arrays())
            manifest.update(segments=[*current.manifest["segments"],
                                      {"file": segment, "rows": start + len(feats) - current.manifest["base_count"]}],
                            base=base, base_count=start + len(feats), deltas=[])
        else:
            file = _new_name("deltas", "npz")
            save_npz_atomic(root / file, feats=feats, **delta.arrays())
            manifest["deltas"] = [*current.manifest["deltas"], {"file": file, "rows": len(feats)}]
        progress("committing")
        name = _commit(root, manifest)
        marker.unlink()
        lease = _Lease(root / "versions" / f"{name}.json")
        loaded = GalleryIndex(root, manifest, state, buffer, current.scan_dtype, current.first_stage,
                              current.candidates, current.nprobe, lease, current._stage, current._half)
        _collect(root, everything=False)
        progress(f"done: {name} holds {loaded.count} items")
        return loaded, ids


def compact(root: str | os.PathLike[str], snapshot: GalleryIndex, progress: Progress = _quiet) -> GalleryIndex | None:
    """Fold ``snapshot``'s deltas into a new base (the heavy part runs without the writer lock);
    commit it under the deltas written since. Returns the live version after compaction, loaded,
    or None when another writer rebuilt or compacted the index meanwhile."""
    root = Path(root)
    progress(f"compacting {snapshot.version} ({len(snapshot.manifest['deltas'])} deltas)")
    state = snapshot.state.compacted()
    state.warm_up()
    stage = (_FirstStage(snapshot.feats, snapshot.first_stage, snapshot.nprobe, snapshot.settings.seed)
             if snapshot.first_stage != "scan" else None)
    first = int(snapshot.manifest["base_count"])
    segment, base = _new_name("segments", "npy"), _new_name("bases", "npz")
    with PendingFile(root / segment, ".npy") as segment_file, PendingFile(root / base, ".npz") as base_file:
        with open(segment_file.tmp, "wb") as fh:
            np.save(fh, snapshot.feats[first:])
        with open(base_file.tmp, "wb") as fh:
            np.savez(fh, **state.base_arrays())
        segment_file.sync()
        base_file.sync()
        with _writer_lock(root):
            live = GalleryIndex.open(root, first_stage="scan", previous=snapshot)
            if not _extends(snapshot.manifest, live.manifest):
                return None
            segment_file.publish()
            base_file.publish()
            later = live.manifest["deltas"][len(snapshot.manifest["deltas"]):]
            manifest = {**live.manifest, "base": base, "base_count": snapshot.count, "deltas": later,
                        "segments": [*snapshot.manifest["segments"], {"file": segment, "rows": snapshot.count - first}]}
            for entry in later:
                _, delta = _load_delta(root, entry, snapshot.dim)
                state = state.apply(delta)
            name = _commit(root, manifest)
            lease = _Lease(root / "versions" / f"{name}.json")
            loaded = GalleryIndex(root, manifest, state, live._buffer, snapshot.scan_dtype, snapshot.first_stage,
                                  snapshot.candidates, snapshot.nprobe, lease, stage, snapshot._half)
            _collect(root, everything=False)
    progress(f"compacted into {name}")
    return loaded


def restore_version(root: str | os.PathLike[str], version: str) -> str:
    """Make a kept earlier version live again, as a new version with its own copy of the
    metadata (later enrolments never touch the old version's rows). Returns the new name."""
    root = Path(root)
    if not re.fullmatch(r"v\d{6}", version):
        raise InputError(f"version must look like v000003, got {version!r}")
    with _writer_lock(root):
        path = root / "versions" / f"{version}.json"
        if not path.is_file():
            kept = ", ".join(p.stem for _, p in _versions(root)) or "none"
            raise InputError(f"{root}: no version {version} (kept versions: {kept})")
        old = _read_manifest(path)
        live = current_version(root)
        generation = uuid.uuid4().hex
        metadata = f"meta/{generation}.sqlite"
        source, target = root / old["metadata"], root / metadata
        try:
            with contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src, \
                    contextlib.closing(_writer_db(target)) as dst:
                src.backup(dst)
                dst.execute("DELETE FROM items WHERE idx >= ?", (int(old["count"]),))
                dst.commit()
        except sqlite3.Error as exc:
            raise _damaged(source, f"metadata unreadable ({exc})") from None
        current = _read_manifest(root / "versions" / f"{live}.json") if live else {}
        keep = [v for v in [live, *current.get("keep", [])] if v and v != version
                and (root / "versions" / f"{v}.json").is_file()]
        manifest = {**old, "generation": generation, "metadata": metadata, "keep": keep, "restored_from": version}
        name = _commit(root, manifest)
        _collect(root, everything=False)
        return name


# ----------------------------------------------------------------------------------- garbage collection


def _collect(root: Path, *, everything: bool, images: bool = False) -> dict[str, int]:
    """Remove versions nobody holds (all but the live one and, unless ``everything``, the versions it
    keeps for recovery), the files no remaining version references, and temporary files of killed
    writers; with ``images`` (or ``everything``) also stored images and thumbnails no remaining
    version's rows reference. Called with the writer lock held."""
    removed = {"versions": 0, "files": 0, "images": 0}
    versions = _versions(root)
    for folder in _FOLDERS if images or everything else ("versions", "segments", "bases", "deltas", "meta", "models"):
        removed["files"] += remove_stale_temporaries(root / folder)  # images/ may hold a file per item: not always
    if not versions:
        return removed
    live = versions[-1][1]
    try:
        keep = set() if everything else set(_read_manifest(live).get("keep", []))
    except InputError:
        return removed  # a damaged live manifest: touch nothing
    for _, path in versions[:-1]:
        if path.stem in keep:
            continue
        fd = _take_if_unleased(path)
        if fd is not None:
            try:
                path.unlink()
                removed["versions"] += 1
            finally:
                os.close(fd)
    manifests = []
    for _, path in _versions(root):
        try:
            manifests.append(_read_manifest(path))
        except FileNotFoundError:
            continue
        except InputError:
            return removed  # cannot tell what a damaged manifest references: delete nothing
    referenced = set()
    for manifest in manifests:
        referenced.add(manifest["metadata"])
        referenced.add(manifest["base"])
        referenced.update(entry["file"] for entry in manifest["segments"] + manifest["deltas"])
    for folder in ("segments", "bases", "deltas", "meta"):
        path = root / folder
        if not path.is_dir():
            continue
        for name in os.listdir(path):
            stem = f"{folder}/{name.split('-')[0]}" if name.endswith(("-wal", "-shm")) else f"{folder}/{name}"
            if _OWN_FILE_RE.match(name) and stem not in referenced:
                (path / name).unlink(missing_ok=True)
                removed["files"] += 1
    if images or everything:
        wanted = _referenced_images(root, manifests)
        if wanted is not None:
            removed["images"] = _remove_orphan_images(root, wanted)
            (root / WRITING_MARKER).unlink(missing_ok=True)
    return removed


def _referenced_images(root: Path, manifests: list[dict[str, Any]]) -> set[str] | None:
    """Image file names that rows of the versions reference; None when one of their metadata
    files cannot be read (then nothing may be deleted)."""
    referenced: set[str] = set()
    for manifest in manifests:
        path = root / manifest["metadata"]
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                referenced.update(row[0] for row in db.execute(
                    "SELECT DISTINCT image FROM items WHERE image IS NOT NULL AND idx < ?", (int(manifest["count"]),)))
        except sqlite3.Error:
            return None
    return referenced


def _remove_orphan_images(root: Path, referenced: set[str]) -> int:
    """Delete stored images and thumbnails that no row of a kept version references — files copied
    in by a writer killed before its commit. Only plain files directly inside ``images/`` and
    ``thumbs/`` whose names this module writes are considered (symbolic links are never followed,
    other names are left alone). Returns the count."""
    thumbs = {name.split(".")[0] + ".jpg" for name in referenced}
    removed = 0
    for sub, keep in (("images", referenced), ("thumbs", thumbs)):
        folder = root / sub
        if folder.is_symlink() or not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if _SHA_FILE_RE.match(entry.name) and entry.name not in keep and not entry.is_dir(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed += 1
    return removed


def collect_garbage(root: str | os.PathLike[str], *, everything: bool = True) -> dict[str, int]:
    """``vireid index gc``: remove every version no reader holds except the live one (with
    ``everything``, also the versions kept for recovery after a replacing build), the files no
    remaining version references, temporary files and images of killed writers. Returns counts."""
    root = Path(root)
    if current_version(root) is None:
        raise InputError(f"{root}: not a vireid index (no versions/)")
    with _writer_lock(root):
        return _collect(root, everything=everything, images=True)


def store_model(root: str | os.PathLike[str], model_path: str | Path, info: dict[str, Any]) -> dict[str, Any]:
    """Copy the encoder file into the index (content-addressed); the manifest's ``model`` entry."""
    model_path = Path(model_path)
    if model_path.is_dir():
        raise InputError(f"{model_path}: give the checkpoint file (e.g. .../checkpoints/best.pt) or an .onnx file")
    try:
        data = model_path.read_bytes()
    except OSError as exc:
        raise InputError(f"{model_path}: cannot read ({exc.strerror})") from None
    name = store_file(Path(root), "models", data, model_path.suffix.lstrip(".") or "bin")
    return {"file": f"models/{name}", "source": str(model_path), **info}


# ----------------------------------------------------------------------------------- verification


def verify_index(root: str | os.PathLike[str], *, images: bool = True) -> dict[str, Any]:
    """Read every file the live version references and check that they agree (raises
    :class:`IndexDamaged` naming the first bad file). Returns a summary."""
    root = Path(root)
    index = GalleryIndex.open(root, first_stage="scan")
    count = index.count
    path = index.metadata_path
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        with contextlib.closing(db):
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise _damaged(path, f"SQLite integrity check: {check}")
            n, low, high = db.execute("SELECT COUNT(*), MIN(idx), MAX(idx) FROM items WHERE idx < ?", (count,)).fetchone()
            stored = [row[0] for row in db.execute("SELECT image FROM items WHERE idx < ? AND image IS NOT NULL", (count,))]
    except sqlite3.Error as exc:
        raise _damaged(path, f"metadata unreadable ({exc})") from None
    if n != count or (count and (low != 0 or high != count - 1)):
        raise _damaged(path, f"holds {n} rows for {count} items")
    missing = 0
    if images:
        for name in stored:
            path = index.image_path(GalleryItem(name="", image=name))
            if path is None or not path.is_file():
                missing += 1
        if missing:
            raise _damaged(root / "images", f"{missing} stored image(s) missing")
    model = index.model_file
    if model is not None and not model.is_file():
        raise _damaged(model, "model file missing")
    return {"version": index.version, "count": count, "dim": index.dim, "images": len(stored),
            "deltas": len(index.manifest["deltas"]), "versions": [p.stem for _, p in _versions(root)]}
