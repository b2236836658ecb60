"""A persistent gallery index: features, metadata (SQLite), images and re-ranking structures.

Layout of ``INDEX_DIR``::

    CURRENT                  name of the live version ("v000003"), replaced atomically
    versions/v000003/        one immutable, complete version
        manifest.json        count, dim, feature segments, parameters, model
        structures.npz       neighbour graph, AIM G', k-reciprocal vectors, SGR schedule
        gallery.sqlite       one row per item: name, person id, camera, time, image file
    segments/<uuid>.npy      feature blocks (float32, unit rows), shared by versions
    images/<sha256>.<ext>    enrolled images, content-addressed; thumbs/<sha256>.jpg
    models/<sha256>.<ext>    the encoder the features came from

Writers (``build``, ``add``) hold an exclusive lock, write a new version under
``versions/.tmp-*``, rename it into place and only then replace ``CURRENT``. A writer killed at
any point leaves ``CURRENT`` naming the previous complete version; its leftovers (temporary
folders, unreferenced segments, images and thumbnails no committed row references) are removed
by the next writer, or by :func:`collect_garbage` (``vireid index gc``). The previous version is
kept so that a reader that loaded it a moment ago still finds its files.

``add`` updates the neighbour graph incrementally (new items against the gallery, O(N_new·G·d))
and re-derives the sparse structures from it (O(G·k²)); no G×G work is repeated.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from PIL import Image

from vireid.config import from_dict
from vireid.errors import InputError
from vireid.io import save_npy_atomic, save_npz_atomic, write_bytes_atomic, write_json_atomic, write_text_atomic
from vireid.retrieval.graph import NeighbourGraph
from vireid.retrieval.knn import IvfParams, NeighbourIndex
from vireid.serve.encoder import IMAGE_FORMATS
from vireid.serve.quantized import QuantizedGallery
from vireid.serve.rerank import (
    GalleryStructures,
    RerankParams,
    SGRSchedule,
    aim_on_candidates,
    build_structures,
    extend_graph,
    gallery_graph,
    l2_normalize_rows,
    rerank_distance,
    top_k,
)

FORMAT_VERSION = 1
#: How ``plain`` and ``aim`` pick the items they score exactly (see :meth:`GalleryIndex.open`).
FIRST_STAGES = ("int8", "scan", "ivf")
CURRENT = "CURRENT"
THUMBNAIL_SIZE = (96, 192)
_VERSION_RE = re.compile(r"^v\d{6}$")
_SHA_FILE_RE = re.compile(r"^[0-9a-f]{64}\.[a-z0-9]{1,5}$")
#: ``vireid.io.atomic_path``'s temporary name for a content-addressed file (".<sha>.<ext>.<random>.<ext>.tmp").
_SHA_TMP_RE = re.compile(r"^\.[0-9a-f]{64}\.[a-z0-9]{1,5}\.[A-Za-z0-9_]+\.[a-z0-9]{1,5}\.tmp$")
_IMAGE_SUFFIX = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "GIF": "gif", "TIFF": "tif", "WEBP": "webp"}

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


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


@dataclass
class NewImage:
    """An item to enrol: its metadata and, optionally, the image bytes to keep for display."""

    item: GalleryItem
    data: bytes | None = None


@dataclass
class SearchHit:
    index: int
    distance: float
    item: GalleryItem


@dataclass
class IndexSettings:
    """Stored in the manifest; fixed when the index is built."""

    params: RerankParams = field(default_factory=RerankParams)
    knn: str = "auto"
    seed: int = 0


# ----------------------------------------------------------------------------------- reading


class GalleryIndex:
    """One loaded version of an index (immutable in memory)."""

    def __init__(self, root: Path, version: str, manifest: dict[str, Any], feats: np.ndarray,
                 structures: GalleryStructures, scan_dtype: str, first_stage: str = "scan", candidates: int = 256,
                 nprobe: int = 32) -> None:
        self.root = root
        self.version = version
        self.manifest = manifest
        self.feats = feats
        self.structures = structures
        self.settings = _settings_from_manifest(manifest)
        self.scan_dtype = scan_dtype
        self._scan = torch.from_numpy(feats).half() if scan_dtype == "float16" else torch.from_numpy(feats)
        self.first_stage = first_stage
        self.candidates = candidates
        self._int8 = QuantizedGallery(feats) if first_stage == "int8" and self.count > 0 else None
        self._ivf = None
        if first_stage == "ivf" and self.count > 0:
            self._ivf = NeighbourIndex(feats, "ivf", ivf=IvfParams(query_nprobe=nprobe), seed=self.settings.seed)

    @classmethod
    def open(cls, root: str | os.PathLike[str], scan_dtype: str = "float32", first_stage: str = "int8",
             candidates: int = 256, nprobe: int = 32) -> "GalleryIndex":
        """Load the version named by ``CURRENT``.

        ``first_stage`` decides how ``plain`` and ``aim`` find the items they score exactly:

        * ``"int8"`` (default): a scan of an int8 copy of the gallery (:mod:`vireid.serve.quantized`,
          a quarter of the float32 bytes) keeps the ``candidates`` best items (at least twice the
          larger of ``topk`` and AIM's k1), which are then scored exactly in float32;
        * ``"scan"``: every gallery feature is scored exactly (``scan_dtype`` precision);
        * ``"ivf"``: ``candidates`` approximate neighbours from a faiss IVF index (``nprobe``
          lists per query), scored exactly.

        Results equal the full scan's whenever the candidates are the gallery's truly nearest
        items (the benchmark reports how often the final lists agree). ``sim``, ``mnnr`` and ``krr``
        always scan. ``scan_dtype="float16"`` halves the memory a full scan reads (similarities
        then carry ~1e-3 error).
        """
        root = Path(root)
        if scan_dtype not in ("float32", "float16"):
            raise InputError(f"scan dtype must be float32 or float16, got {scan_dtype!r}")
        if first_stage not in FIRST_STAGES:
            raise InputError(f"first stage must be one of {', '.join(FIRST_STAGES)}, got {first_stage!r}")
        if candidates < 1:
            raise InputError(f"candidates must be >= 1, got {candidates}")
        version = current_version(root)
        if version is None:
            raise InputError(f"{root}: not a vireid index (no {CURRENT} file)")
        folder = root / "versions" / version
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT_VERSION:
            raise InputError(f"{folder}: unsupported index format {manifest.get('format')!r}")
        feats = _load_segments(root, manifest)
        structures = _load_structures(folder / "structures.npz")
        return cls(root, version, manifest, feats, structures, scan_dtype, first_stage, candidates, nprobe)

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def model_file(self) -> Path | None:
        model = self.manifest.get("model")
        return self.root / model["file"] if model else None

    def _db(self) -> sqlite3.Connection:
        path = self.root / "versions" / self.version / "gallery.sqlite"
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)

    def items(self, indices: Sequence[int]) -> list[GalleryItem]:
        """Metadata of gallery rows ``indices`` (in that order)."""
        wanted = [int(i) for i in indices]
        if not wanted:
            return []
        with contextlib.closing(self._db()) as db:
            marks = ",".join("?" * len(wanted))
            rows = db.execute(f"SELECT idx, name, modality, pid, cam, time, source, image FROM items WHERE idx IN ({marks})",
                              wanted).fetchall()
        by_index = {row[0]: GalleryItem(*row[1:]) for row in rows}
        return [by_index[i] for i in wanted]

    def item(self, index: int) -> GalleryItem:
        if not 0 <= index < self.count:
            raise InputError(f"gallery id {index} out of range [0, {self.count})")
        return self.items([index])[0]

    def search(self, query: np.ndarray, method: str = "aim", topk: int = 20) -> list[SearchHit]:
        """The ``topk`` gallery items closest to one query feature under ``method``."""
        if query.shape != (self.dim,):
            raise InputError(f"query feature has shape {query.shape}, the index holds d={self.dim}")
        if topk < 1:
            raise InputError(f"topk must be >= 1, got {topk}")
        unit = l2_normalize_rows(query[None])[0]
        if self.first_stage != "scan" and method in ("plain", "aim") and self.count > 0:
            cand_index, cand_sim = self.first_stage_candidates(unit, topk)
            if method == "plain":
                rows, dist = cand_index, -cand_sim.astype(np.float64)
            else:
                rows, dist = aim_on_candidates(unit, self.feats, self.structures, self.settings.params.aim_k1,
                                               cand_index, cand_sim, keep=topk)
            best = top_k(dist, min(topk, len(rows)))
            return [SearchHit(int(rows[i]), float(dist[i]), item) for i, item in zip(best, self.items(rows[best]))]
        dist = rerank_distance(unit, self._scan, self.structures, method, self.settings.params)
        best = top_k(dist, min(topk, self.count))
        return [SearchHit(int(i), float(dist[i]), item) for i, item in zip(best, self.items(best))]

    def first_stage_candidates(self, unit: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows the first stage keeps for one unit query, and their exact float32 similarities."""
        want = min(max(self.candidates, 2 * max(topk, self.settings.params.aim_k1)), self.count)
        if self._ivf is not None:
            rows, sim = self._ivf.search(unit[None], want)
            return rows[0], sim[0]
        assert self._int8 is not None
        rows = self._int8.candidates(unit, want)
        return rows, np.einsum("ij,j->i", self.feats[rows], unit)  # few rows: no thread pool

    def image_path(self, item: GalleryItem, thumbnail: bool = False) -> Path | None:
        """The stored image (or its thumbnail) of an item; names are validated content hashes."""
        if item.image is None or not _SHA_FILE_RE.match(item.image):
            return None
        if thumbnail:
            return self.root / "thumbs" / (item.image.split(".")[0] + ".jpg")
        return self.root / "images" / item.image

    def verify(self) -> None:
        """Check that manifest, features, structures and metadata agree (raises InputError)."""
        n = self.count
        with contextlib.closing(self._db()) as db:
            rows = db.execute("SELECT COUNT(*), MIN(idx), MAX(idx) FROM items").fetchone()
        checks = {
            "features": self.feats.shape == (n, self.dim),
            "graph": self.structures.graph.n == n,
            "aim": self.structures.aim_gt.shape == (n, n),
            "metadata": rows[0] == n and (n == 0 or (rows[1] == 0 and rows[2] == n - 1)),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise InputError(f"{self.root} ({self.version}): inconsistent {', '.join(bad)}")


def current_version(root: Path) -> str | None:
    try:
        name = (root / CURRENT).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if not _VERSION_RE.match(name):
        raise InputError(f"{root / CURRENT}: invalid version name {name!r}")
    return name


def _settings_from_manifest(manifest: dict[str, Any]) -> IndexSettings:
    data = dict(manifest["settings"])
    return IndexSettings(params=from_dict(RerankParams, data.pop("params"), source="index manifest"), **data)


def _load_segments(root: Path, manifest: dict[str, Any]) -> np.ndarray:
    dim = int(manifest["dim"])
    parts = [np.load(root / "segments" / seg["file"], allow_pickle=False) for seg in manifest["segments"]]
    if not parts:
        return np.empty((0, dim), np.float32)
    return np.ascontiguousarray(np.concatenate(parts).astype(np.float32, copy=False))


def _csr_arrays(name: str, matrix: sp.csr_matrix) -> dict[str, np.ndarray]:
    return {f"{name}_indptr": matrix.indptr, f"{name}_indices": matrix.indices, f"{name}_data": matrix.data,
            f"{name}_shape": np.asarray(matrix.shape)}


def _csr_from(z: Any, name: str) -> sp.csr_matrix:
    return sp.csr_matrix((z[f"{name}_data"], z[f"{name}_indices"], z[f"{name}_indptr"]), shape=tuple(z[f"{name}_shape"]))


def _load_structures(path: Path) -> GalleryStructures:
    with np.load(path, allow_pickle=False) as z:
        return GalleryStructures(
            graph=NeighbourGraph(index=z["graph_index"], sim=z["graph_sim"]),
            min_sim=z["min_sim"],
            aim_gt=_csr_from(z, "aim_gt"), mnnr_vt=_csr_from(z, "mnnr_vt"), krr_vt=_csr_from(z, "krr_vt"),
            sgr=SGRSchedule(order=z["sgr_order"], bounds=z["sgr_bounds"]),
        )


# ----------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def _writer_lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def store_file(root: Path, folder: str, data: bytes, suffix: str) -> str:
    """Write ``data`` content-addressed under ``root/folder`` (atomic, idempotent); its file name."""
    name = f"{hashlib.sha256(data).hexdigest()}.{suffix}"
    path = root / folder / name
    if not path.exists():
        write_bytes_atomic(path, data)
    return name


def _store_image(root: Path, data: bytes) -> str:
    image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    suffix = _IMAGE_SUFFIX.get(image.format or "", "img")
    name = store_file(root, "images", data, suffix)
    thumb = root / "thumbs" / (name.split(".")[0] + ".jpg")
    if not thumb.exists():
        small = image.convert("RGB")
        small.thumbnail(THUMBNAIL_SIZE)
        out = io.BytesIO()
        small.save(out, format="JPEG", quality=85)
        write_bytes_atomic(thumb, out.getvalue())
    return name


def build_index(root: str | os.PathLike[str], feats: np.ndarray, images: Sequence[NewImage], *,
                settings: IndexSettings = IndexSettings(), model: dict[str, Any] | None = None,
                progress: Progress = _quiet) -> str:
    """Create a new version holding exactly ``images`` (replacing the current one); returns its name.

    ``feats`` (N, d): their features; ``model``: ``{"file": ..., ...}`` as written by
    :func:`store_model` (None for feature-only indexes, e.g. benchmarks).
    """
    root = Path(root)
    feats = _check_feats(feats, len(images))
    settings.params.validate()
    with _writer_lock(root):
        _collect_garbage(root)
        progress(f"neighbour graph of {len(feats)} items")
        graph = gallery_graph(feats, settings.params.graph_k(), settings.knn, settings.seed)
        return _commit(root, feats, [], graph, images, settings, model, progress)


def add_to_index(root: str | os.PathLike[str], feats: np.ndarray, images: Sequence[NewImage], *,
                 progress: Progress = _quiet) -> tuple[str, range]:
    """Append items to the current version (incremental graph update).

    Returns the new version's name and the gallery ids the items received.
    """
    root = Path(root)
    with _writer_lock(root):
        _collect_garbage(root)
        current = GalleryIndex.open(root, first_stage="scan")
        feats = _check_feats(feats, len(images), current.dim)
        settings = current.settings
        all_feats = np.concatenate([current.feats, feats])
        progress(f"updating the neighbour graph with {len(feats)} items")
        graph = extend_graph(current.structures.graph, all_feats, len(feats), settings.params.graph_k())
        version = _commit(root, all_feats, current.manifest["segments"], graph, images, settings,
                          current.manifest.get("model"), progress, previous=current)
        return version, range(current.count, current.count + len(images))


def _check_feats(feats: np.ndarray, n: int, dim: int | None = None) -> np.ndarray:
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.shape[0] != n or n == 0:
        raise InputError(f"expected features of shape ({n}, d) with n > 0, got {feats.shape}")
    if dim is not None and feats.shape[1] != dim:
        raise InputError(f"features have d={feats.shape[1]} but the index holds d={dim}")
    if not np.isfinite(feats).all():
        raise InputError("features contain non-finite values")
    return l2_normalize_rows(feats)


def _commit(root: Path, all_feats: np.ndarray, old_segments: list[dict[str, Any]], graph: NeighbourGraph,
            images: Sequence[NewImage], settings: IndexSettings, model: dict[str, Any] | None,
            progress: Progress, previous: GalleryIndex | None = None) -> str:
    n_new = len(images)
    progress("re-ranking structures")
    structures = build_structures(all_feats, graph, settings.params, settings.seed)
    progress("storing images")
    items = []
    for new in images:
        item = GalleryItem(**asdict(new.item))
        if new.data is not None:
            item.image = _store_image(root, new.data)
        items.append(item)
    segment = f"{uuid.uuid4().hex}.npy"
    save_npy_atomic(root / "segments" / segment, all_feats[len(all_feats) - n_new:])
    segments = [*old_segments, {"file": segment, "rows": n_new}]
    number = int(previous.version[1:]) + 1 if previous is not None else _next_version_number(root)
    name = f"v{number:06d}"
    tmp = root / "versions" / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    progress(f"writing version {name}")
    save_npz_atomic(tmp / "structures.npz", **_structure_arrays(structures))
    _write_metadata(tmp / "gallery.sqlite", previous, items)
    write_json_atomic(tmp / "manifest.json", {
        "format": FORMAT_VERSION, "version": name, "count": len(all_feats), "dim": int(all_feats.shape[1]),
        "segments": segments, "settings": {"params": asdict(settings.params), "knn": settings.knn, "seed": settings.seed},
        "model": model, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    final = root / "versions" / name
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    progress(f"switching {CURRENT} to {name}")
    write_text_atomic(root / CURRENT, name + "\n")
    _collect_garbage(root)
    progress(f"done: {name} holds {len(all_feats)} items")
    return name


def _next_version_number(root: Path) -> int:
    folder = root / "versions"
    numbers = [int(p.name[1:]) for p in folder.iterdir() if _VERSION_RE.match(p.name)] if folder.is_dir() else []
    return max(numbers, default=0) + 1


def _structure_arrays(s: GalleryStructures) -> dict[str, np.ndarray]:
    return {
        "graph_index": s.graph.index, "graph_sim": s.graph.sim, "min_sim": s.min_sim,
        **_csr_arrays("aim_gt", s.aim_gt), **_csr_arrays("mnnr_vt", s.mnnr_vt), **_csr_arrays("krr_vt", s.krr_vt),
        "sgr_order": s.sgr.order, "sgr_bounds": s.sgr.bounds,
    }


_SCHEMA = ("CREATE TABLE items (idx INTEGER PRIMARY KEY, name TEXT NOT NULL, modality TEXT NOT NULL, "
           "pid INTEGER, cam INTEGER, time TEXT, source TEXT, image TEXT)")


def _write_metadata(path: Path, previous: GalleryIndex | None, items: Sequence[GalleryItem]) -> None:
    """A new SQLite file: the previous version's rows (copied) followed by ``items``."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        if previous is not None:
            with contextlib.closing(previous._db()) as source:
                source.backup(db)
        else:
            db.execute(_SCHEMA)
        start = previous.count if previous is not None else 0
        db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
            (start + i, it.name, it.modality, it.pid, it.cam, it.time, it.source, it.image) for i, it in enumerate(items)])
        db.commit()
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _collect_garbage(root: Path) -> int:
    """Remove leftovers of interrupted writers (temporary and orphaned versions, unreferenced
    segments, images and thumbnails) and versions older than the previous one. Called with the
    writer lock held; files referenced by the live or the previous version are never touched.
    Returns the number of image and thumbnail files removed."""
    folder = root / "versions"
    for tmp in folder.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    current = current_version(root)
    versions = sorted(p.name for p in folder.iterdir() if _VERSION_RE.match(p.name)) if folder.is_dir() else []
    keep: set[str] = set()
    if current is not None:
        keep = {current, *[v for v in versions if v < current][-1:]}
    for name in versions:
        if name not in keep:  # older ones, and orphans renamed in just before a writer died
            shutil.rmtree(folder / name, ignore_errors=True)
    referenced = set()
    for name in keep:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            manifest = json.loads((folder / name / "manifest.json").read_text(encoding="utf-8"))
            referenced.update(seg["file"] for seg in manifest["segments"])
    segments = root / "segments"
    if segments.is_dir():
        for path in segments.iterdir():
            if path.name not in referenced:
                path.unlink(missing_ok=True)
    images = _referenced_images(folder, keep)
    return 0 if images is None else _remove_orphan_images(root, images)


def _referenced_images(versions: Path, names: set[str]) -> set[str] | None:
    """Image file names that rows of the versions ``names`` reference; None when one of their
    metadata files cannot be read (then nothing may be deleted)."""
    referenced: set[str] = set()
    for name in names:
        path = versions / name / "gallery.sqlite"
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                referenced.update(row[0] for row in db.execute("SELECT DISTINCT image FROM items WHERE image IS NOT NULL"))
        except sqlite3.Error:
            return None
    return referenced


def _remove_orphan_images(root: Path, referenced: set[str]) -> int:
    """Delete stored images and thumbnails that no row of a kept version references — files copied
    in by a writer killed before its commit — and the temporary files such a writer left. Only
    plain files directly inside ``images/`` and ``thumbs/`` whose names this module writes are
    considered (symbolic links are never followed, other names are left alone). Returns the count."""
    thumbs = {name.split(".")[0] + ".jpg" for name in referenced}
    removed = 0
    for sub, keep in (("images", referenced), ("thumbs", thumbs)):
        folder = root / sub
        if folder.is_symlink() or not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                ours = _SHA_FILE_RE.match(entry.name) or _SHA_TMP_RE.match(entry.name)
                if ours and entry.name not in keep and not entry.is_dir(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed += 1
    return removed


def collect_garbage(root: str | os.PathLike[str]) -> int:
    """Remove what interrupted writers left behind (temporary and orphaned versions, unreferenced
    feature segments, images and thumbnails), holding the writer lock. ``build`` and ``add`` do
    this first; ``vireid index gc`` runs it alone. Returns the number of image and thumbnail files
    removed."""
    root = Path(root)
    if current_version(root) is None:
        raise InputError(f"{root}: not a vireid index (no {CURRENT} file)")
    with _writer_lock(root):
        return _collect_garbage(root)


def store_model(root: str | os.PathLike[str], model_path: str | Path, info: dict[str, Any]) -> dict[str, Any]:
    """Copy the encoder file into the index (content-addressed); the manifest's ``model`` entry."""
    model_path = Path(model_path)
    if model_path.is_dir():
        raise InputError(f"{model_path}: give the checkpoint file (e.g. .../checkpoints/best.pt) or an .onnx file")
    data = model_path.read_bytes()
    name = store_file(Path(root), "models", data, model_path.suffix.lstrip(".") or "bin")
    return {"file": f"models/{name}", "source": str(model_path), **info}
