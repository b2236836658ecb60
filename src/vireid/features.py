"""The feature file: the hinge between models and everything after extraction.

A feature file is an ``.npz`` with

==================  ==============  ==============================================
key                 dtype, shape    meaning
==================  ==============  ==============================================
``query_feat``      float (Q, d)    query features (raw; methods normalise as needed)
``gallery_feat``    float (G, d)    gallery features
``query_id``        int64 (Q,)      person ids
``gallery_id``      int64 (G,)
``query_cam``       int64 (Q,)      camera ids
``gallery_cam``     int64 (G,)
==================  ==============  ==============================================

Optional keys:

* ``trial_query_index`` / ``trial_gallery_index`` int64 (T, n): for protocols with several
  trials, row t lists the query / gallery rows used by trial t (``-1`` pads ragged rows).
  Without them the file is a single trial over all rows.
* ``query_path`` / ``gallery_path`` str (Q,), (G,): image paths, for reports.
* ``gallery_feat_x``  float (G, d): XIV's features of the gallery's X-modality images (Eq. 2).
* extra method-specific arrays prefixed ``query_`` / ``gallery_``, documented by the method.
* ``meta_json`` str: JSON with provenance (checkpoint, protocol, parameters).
* ``val_query_feat``, ``val_gallery_feat``, ``val_query_id``, ``val_gallery_id``, ``val_query_cam``,
  ``val_gallery_cam`` and optionally ``val_trial_query_index`` / ``val_trial_gallery_index``: the
  same six (eight) arrays for the *validation identities* held out of training, queried and
  gallery-selected by the same protocol rule as the test set (``vireid extract`` writes them when the
  checkpoint's run held out validation identities). They are for choosing inference parameters
  (``vireid evaluate --tune-on val``) and are never evaluated as the test result. All six are present
  or none. In Python: :attr:`FeatureSet.validation`.

Distances everywhere are "smaller is closer".
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vireid.errors import InputError
from vireid.io import save_npz_atomic

REQUIRED_KEYS = ("query_feat", "gallery_feat", "query_id", "gallery_id", "query_cam", "gallery_cam")
TRIAL_KEYS = ("trial_query_index", "trial_gallery_index")
VALIDATION_PREFIX = "val_"
"""Prefix of the validation identities' arrays (``val_query_feat`` …) in a feature file."""


@dataclass
class FeatureSet:
    """Query and gallery features with their labels (see module docstring)."""

    query_feat: np.ndarray
    gallery_feat: np.ndarray
    query_id: np.ndarray
    gallery_id: np.ndarray
    query_cam: np.ndarray
    gallery_cam: np.ndarray
    trial_query_index: np.ndarray | None = None
    trial_gallery_index: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    validation: FeatureSet | None = None
    """Features of the validation identities (held out of training), for choosing inference
    parameters; never part of the test evaluation (``val_*`` keys in the file)."""

    @property
    def num_trials(self) -> int:
        if self.trial_gallery_index is not None:
            return int(self.trial_gallery_index.shape[0])
        if self.trial_query_index is not None:
            return int(self.trial_query_index.shape[0])
        return 1

    def trial_rows(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """The query rows and gallery rows of trial ``t`` (all rows when there are no trial indices)."""
        return (_trial_rows(self.trial_query_index, t, len(self.query_id)),
                _trial_rows(self.trial_gallery_index, t, len(self.gallery_id)))

    def trial(self, t: int) -> "FeatureSet":
        """The single-trial view of trial ``t`` (rows selected, no trial indices)."""
        return self.select_rows(*self.trial_rows(t))

    def select_rows(self, q_rows: np.ndarray, g_rows: np.ndarray, *,
                    trial_query_index: np.ndarray | None = None,
                    trial_gallery_index: np.ndarray | None = None) -> "FeatureSet":
        """A new set of the query rows ``q_rows`` and gallery rows ``g_rows`` (per-row extras follow)."""
        extras = {}
        for key, arr in self.extras.items():
            if key.startswith("query_") and arr.shape[:1] == self.query_id.shape:
                extras[key] = arr[q_rows]
            elif key.startswith("gallery_") and arr.shape[:1] == self.gallery_id.shape:
                extras[key] = arr[g_rows]
            else:
                extras[key] = arr
        return FeatureSet(
            self.query_feat[q_rows], self.gallery_feat[g_rows], self.query_id[q_rows],
            self.gallery_id[g_rows], self.query_cam[q_rows], self.gallery_cam[g_rows],
            trial_query_index=trial_query_index, trial_gallery_index=trial_gallery_index,
            extras=extras, meta=dict(self.meta), validation=self.validation,
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {k: getattr(self, k) for k in REQUIRED_KEYS}
        if self.trial_query_index is not None:
            arrays["trial_query_index"] = self.trial_query_index
        if self.trial_gallery_index is not None:
            arrays["trial_gallery_index"] = self.trial_gallery_index
        arrays.update(self.extras)
        if self.meta:
            arrays["meta_json"] = np.array(json.dumps(self.meta, default=str))
        if self.validation is not None:
            for key in (*REQUIRED_KEYS, *TRIAL_KEYS):
                value = getattr(self.validation, key)
                if value is not None:
                    arrays[VALIDATION_PREFIX + key] = value
        return arrays


def _trial_rows(index: np.ndarray | None, t: int, n: int) -> np.ndarray:
    if index is None:
        return np.arange(n)
    row = index[t]
    return row[row >= 0]


def save_features(path: str | os.PathLike[str], features: FeatureSet) -> None:
    """Validate and write atomically."""
    validate_features(features, source=str(path))
    save_npz_atomic(path, **features.to_arrays())


def load_features(path: str | os.PathLike[str]) -> FeatureSet:
    """Read and validate a feature file; bad content raises :class:`InputError` naming the key."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: feature file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        raise InputError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc}); "
                         f"truncated or damaged?") from None
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise InputError(f"{path}: missing key(s) {', '.join(missing)} (required: {', '.join(REQUIRED_KEYS)})")
    meta: dict[str, Any] = {}
    if "meta_json" in arrays:
        try:
            meta = json.loads(str(arrays.pop("meta_json")))
        except json.JSONDecodeError:
            raise InputError(f"{path}: key meta_json is not valid JSON") from None
    validation = _pop_validation(arrays, path)
    fs = FeatureSet(
        query_feat=arrays.pop("query_feat"), gallery_feat=arrays.pop("gallery_feat"),
        query_id=arrays.pop("query_id"), gallery_id=arrays.pop("gallery_id"),
        query_cam=arrays.pop("query_cam"), gallery_cam=arrays.pop("gallery_cam"),
        trial_query_index=arrays.pop("trial_query_index", None),
        trial_gallery_index=arrays.pop("trial_gallery_index", None),
        extras=arrays, meta=meta, validation=validation,
    )
    validate_features(fs, source=str(path))
    return fs


def _pop_validation(arrays: dict[str, np.ndarray], path: Path) -> FeatureSet | None:
    """The ``val_*`` arrays as a FeatureSet (removed from ``arrays``); all six required keys or none."""
    present = [key for key in REQUIRED_KEYS if VALIDATION_PREFIX + key in arrays]
    if not present:
        stray = [key for key in TRIAL_KEYS if VALIDATION_PREFIX + key in arrays]
        if stray:
            raise InputError(f"{path}: key {VALIDATION_PREFIX + stray[0]} without validation features "
                             f"({VALIDATION_PREFIX}query_feat …)")
        return None
    missing = [VALIDATION_PREFIX + key for key in REQUIRED_KEYS if key not in present]
    if missing:
        raise InputError(f"{path}: validation features are incomplete: missing key(s) {', '.join(missing)}")
    values = {key: arrays.pop(VALIDATION_PREFIX + key) for key in REQUIRED_KEYS}
    trials = {key: arrays.pop(VALIDATION_PREFIX + key, None) for key in TRIAL_KEYS}
    return FeatureSet(**values, **trials)


def validate_features(fs: FeatureSet, *, source: str, prefix: str = "") -> None:
    """Shapes, dtypes, finiteness and non-emptiness; one :class:`InputError` naming the key
    (validation features too, their keys named with ``val_``)."""
    for side in ("query", "gallery"):
        feat = getattr(fs, f"{side}_feat")
        if feat.ndim != 2:
            raise InputError(f"{source}: key {prefix}{side}_feat must be 2-D (n, d), got shape {feat.shape}")
        if not np.issubdtype(feat.dtype, np.floating):
            raise InputError(f"{source}: key {prefix}{side}_feat must be floating point, got {feat.dtype}")
        if feat.shape[0] == 0:
            raise InputError(f"{source}: key {prefix}{side}_feat is empty (no {side} images)")
        for key in (f"{side}_id", f"{side}_cam"):
            arr = getattr(fs, key)
            if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                raise InputError(f"{source}: key {prefix}{key} must be a 1-D integer array, got {arr.dtype} {arr.shape}")
            if len(arr) != feat.shape[0]:
                raise InputError(
                    f"{source}: key {prefix}{key} has {len(arr)} entries but {prefix}{side}_feat has {feat.shape[0]} rows")
        if feat.shape[1] == 0:
            raise InputError(f"{source}: key {prefix}{side}_feat has zero feature dimensions (shape {feat.shape})")
        bad = ~np.isfinite(feat)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise InputError(f"{source}: key {prefix}{side}_feat has a non-finite value ({feat[row, col]}) at row {row}, column {col}")
        big = np.abs(feat) > np.finfo(np.float32).max
        if big.any():
            row, col = np.argwhere(big)[0]
            raise InputError(f"{source}: key {prefix}{side}_feat has a value beyond float32 ({feat[row, col]}) at row {row}, "
                             f"column {col}")
        zero = np.flatnonzero(~np.any(feat != 0, axis=1))
        if len(zero):
            raise InputError(f"{source}: key {prefix}{side}_feat row {zero[0]} is all zero ({len(zero)} such row(s)): "
                             f"a zero feature has no direction to compare")
    if fs.query_feat.shape[1] != fs.gallery_feat.shape[1]:
        raise InputError(
            f"{source}: feature dimensions differ: {prefix}query_feat has d={fs.query_feat.shape[1]}, "
            f"{prefix}gallery_feat has d={fs.gallery_feat.shape[1]}")
    for key, n in (("trial_query_index", len(fs.query_id)), ("trial_gallery_index", len(fs.gallery_id))):
        idx = getattr(fs, key)
        if idx is None:
            continue
        if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
            raise InputError(f"{source}: key {prefix}{key} must be a 2-D integer array (trials, n)")
        if idx.size and (idx.max() >= n or idx.min() < -1):
            raise InputError(f"{source}: key {prefix}{key} has indices outside [-1, {n - 1}]")
    if fs.trial_query_index is not None and fs.trial_gallery_index is not None:
        if fs.trial_query_index.shape[0] != fs.trial_gallery_index.shape[0]:
            raise InputError(f"{source}: {prefix}trial_query_index and {prefix}trial_gallery_index have different trial counts")
    if fs.validation is not None:
        validate_features(fs.validation, source=source, prefix=VALIDATION_PREFIX)
        if fs.validation.query_feat.shape[1] != fs.query_feat.shape[1]:
            raise InputError(f"{source}: key {VALIDATION_PREFIX}query_feat has d={fs.validation.query_feat.shape[1]}, "
                             f"query_feat has d={fs.query_feat.shape[1]}")
