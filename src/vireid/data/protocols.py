"""Evaluation protocols: which images are queries and which gallery, trial by trial.

A protocol turns a dataset's test records into :class:`Trial` s of (query, gallery) records
plus a metric mode (``sysu`` / ``regdb`` / ``llcm`` / ``market``) that tells the evaluator
which gallery items to drop per query.  Every random choice is seeded per trial.

==============  ==========================================================================
name            selection
==============  ==========================================================================
``sysu``        SYSU-MM01 official (wuancong/SYSU-MM01 ``get_testing_set.m``): gallery from
                the authors' ``rand_perm_cam.mat``; all/indoor x 1/10 shots x 10 trials
``sysu-agw``    SYSU-MM01 as in AGW ``data_manager.py``: ``random.seed(trial)`` +
                ``random.choice`` per (identity, camera); single-shot
``regdb``       RegDB: trials 1..10 from the index files, visible->thermal or thermal->visible
``llcm``        LLCM (ZYK100/LLCM ``process_gallery_llcm``): all images of one modality query
                one seeded random image per (identity, camera) of the other
``market``      a fixed query / gallery split (custom data); same identity + camera removed
==============  ==========================================================================

:func:`protocol_feature_set` turns a protocol plus the features of its images into a
multi-trial :class:`vireid.features.FeatureSet`; see ``docs/protocols.md``.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from vireid.data.datasets import VIDataset
from vireid.data.records import ImageRecord, Modality
from vireid.errors import InputError
from vireid.features import FeatureSet

METRIC_MODES = ("sysu", "regdb", "llcm", "market")
SYSU_GALLERY_CAMERAS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}
SYSU_QUERY_CAMERAS = (3, 6)
SYSU_TRIALS = 10
SYSU_SHOTS = (1, 10)
REGDB_DIRECTIONS = {"visible-thermal": Modality.VISIBLE, "thermal-visible": Modality.INFRARED}
LLCM_DIRECTIONS = {"infrared-visible": Modality.INFRARED, "visible-infrared": Modality.VISIBLE}

SysuPermutations = dict[tuple[int, int], np.ndarray]
"""``(camera, pid) -> (trials, n)`` array; row t is a 1-based permutation of the n images of
that person in that camera, files in name order (the layout of ``rand_perm_cam.mat``)."""


@dataclass(frozen=True)
class Trial:
    """One evaluation run: query records searched against gallery records."""

    query: tuple[ImageRecord, ...]
    gallery: tuple[ImageRecord, ...]


@dataclass(frozen=True)
class Protocol:
    """Trials of (query, gallery) records, the metric mode and the parameters that made them."""

    name: str
    metric: str
    params: dict[str, Any]
    trials: tuple[Trial, ...]

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary: name, metric mode, parameters, trial count and sizes."""
        return {
            "protocol": self.name, "metric": self.metric, "params": dict(self.params),
            "trials": len(self.trials),
            "query_sizes": [len(t.query) for t in self.trials],
            "gallery_sizes": [len(t.gallery) for t in self.trials],
        }


def _group_by_pid_cam(records: Iterable[ImageRecord]) -> dict[tuple[int, int], list[ImageRecord]]:
    """(pid, cam) -> records sorted by path, as ``sorted(os.listdir(...))`` in the reference code."""
    groups: dict[tuple[int, int], list[ImageRecord]] = defaultdict(list)
    for record in records:
        groups[(record.pid, record.cam)].append(record)
    return {key: sorted(group, key=lambda r: str(r.path)) for key, group in groups.items()}


def _check_trials(trials: Sequence[int] | int | str, valid: range, what: str) -> tuple[int, ...]:
    """``trials`` as a tuple of ints: a list, one integer (``trials=3``) or ``"1,3,5"``."""
    try:
        if isinstance(trials, str):
            trials = tuple(int(t) for t in trials.split(",") if t.strip())
        elif isinstance(trials, int):
            trials = (trials,)
        else:
            trials = tuple(int(t) for t in trials)
    except (TypeError, ValueError):
        raise InputError(f"{what}: trials must be an integer or a list of integers, got {trials!r}") from None
    if not trials:
        raise InputError(f"{what}: no trials requested")
    bad = [t for t in trials if t not in valid]
    if bad:
        raise InputError(f"{what}: trial {bad[0]} out of range {valid.start}..{valid.stop - 1}")
    return trials


def _check_choice(value: str, choices: Iterable[str], what: str) -> str:
    choices = list(choices)
    if value not in choices:
        raise InputError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    return value


# --------------------------------------------------------------------------- SYSU-MM01


@functools.cache
def official_sysu_permutations() -> SysuPermutations:
    """The dataset authors' ``rand_perm_cam.mat`` shipped in ``vireid/data/official`` (MIT, see LICENSE.md)."""
    from scipy.io import loadmat

    with resources.as_file(resources.files("vireid.data") / "official" / "rand_perm_cam.mat") as path:
        cells = loadmat(str(path))["rand_perm_cam"]
    table: SysuPermutations = {}
    for cam_index in range(cells.shape[0]):
        per_pid = cells[cam_index, 0]
        for pid_index in range(per_pid.shape[0]):
            perm = np.asarray(per_pid[pid_index, 0])
            if perm.size:
                perm = perm.astype(np.int64)
                perm.setflags(write=False)
                table[(cam_index + 1, pid_index + 1)] = perm
    return table


def seeded_sysu_permutations(records: Iterable[ImageRecord], seed: int, trials: int = SYSU_TRIALS) -> SysuPermutations:
    """Permutations in the layout of ``rand_perm_cam.mat`` for a tree whose image counts differ
    from the real SYSU-MM01 (e.g. synthetic data): row t of each (camera, pid) is a permutation
    drawn from ``numpy.random.default_rng([seed, t])``."""
    groups = _group_by_pid_cam(records)
    rows = {key: [] for key in groups}
    for t in range(trials):
        rng = np.random.default_rng([seed, t])
        for pid, cam in sorted(groups):
            rows[(pid, cam)].append(rng.permutation(len(groups[(pid, cam)])) + 1)
    return {(cam, pid): np.stack(r) for (pid, cam), r in rows.items()}


def sysu_official_queries(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    """Official probe set: every image in cams 3 and 6, camera-major, pid ascending, files in name order."""
    groups = _group_by_pid_cam(records)
    return [r for cam in SYSU_QUERY_CAMERAS for (pid, c) in sorted(groups, key=lambda k: k[0]) if c == cam
            for r in groups[(pid, c)]]


def sysu_agw_queries(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    """AGW ``process_query_sysu``: pid ascending, then cam 3, cam 6, files sorted."""
    groups = _group_by_pid_cam(records)
    return [r for pid in sorted({p for p, _ in groups}) for cam in SYSU_QUERY_CAMERAS
            for r in groups.get((pid, cam), [])]


def sysu_official_gallery(records: Iterable[ImageRecord], trial: int, mode: str = "all", shots: int = 1,
                          permutations: SysuPermutations | None = None) -> list[ImageRecord]:
    """Official gallery of trial ``trial`` (0-based; MATLAB ``run_time`` = trial + 1).

    SYSU-MM01 ``get_testing_set.m``: for each gallery camera in order, for each pid ascending,
    the images ``rand_perm_cam{cam}{pid}(run_time, 1:shots)``.
    """
    cams = SYSU_GALLERY_CAMERAS[_check_choice(mode, SYSU_GALLERY_CAMERAS, "SYSU mode")]
    table = official_sysu_permutations() if permutations is None else permutations
    return _official_gallery(_group_by_pid_cam(records), cams, trial, shots, table)


def _official_gallery(groups: Mapping[tuple[int, int], list[ImageRecord]], cams: Sequence[int], trial: int,
                      shots: int, table: SysuPermutations) -> list[ImageRecord]:
    gallery = []
    for cam in cams:
        for pid in sorted(p for p, c in groups if c == cam):
            files = groups[(pid, cam)]
            perm = table.get((cam, pid))
            if perm is None or perm.shape[1] != len(files):
                expected = "none" if perm is None else str(perm.shape[1])
                raise InputError(
                    f"cam{cam}/{pid:04d}: {len(files)} images, but the SYSU-MM01 permutation table expects "
                    f"{expected}; the official protocol needs the real image set (use permutations='seeded' "
                    f"for other trees, e.g. synthetic data)")
            if trial >= perm.shape[0]:
                raise InputError(f"SYSU permutation table has {perm.shape[0]} trials, trial {trial} requested")
            gallery.extend(files[i - 1] for i in perm[trial, :shots])
    return gallery


def sysu_agw_gallery(records: Iterable[ImageRecord], trial: int, mode: str = "all") -> list[ImageRecord]:
    """AGW ``process_gallery_sysu``: ``random.seed(trial)``, then for pid ascending, for each gallery
    camera, ``random.choice`` over the sorted files (a local ``random.Random(trial)`` draws the same)."""
    cams = SYSU_GALLERY_CAMERAS[_check_choice(mode, SYSU_GALLERY_CAMERAS, "SYSU mode")]
    return _seeded_choice_gallery(_group_by_pid_cam(records), cams, trial)


def _seeded_choice_gallery(groups: Mapping[tuple[int, int], list[ImageRecord]], cams: Sequence[int],
                           trial: int) -> list[ImageRecord]:
    rng = random.Random(trial)
    return [rng.choice(groups[(pid, cam)]) for pid in sorted({p for p, _ in groups}) for cam in cams
            if (pid, cam) in groups]


def sysu_official_protocol(records: Sequence[ImageRecord], *, mode: str = "all", shots: int = 1,
                           trials: Sequence[int] = range(SYSU_TRIALS), permutations: str = "official",
                           seed: int = 0) -> Protocol:
    """SYSU-MM01 official protocol over the test records; ``permutations`` is ``official``
    (the shipped ``rand_perm_cam.mat``) or ``seeded`` (:func:`seeded_sysu_permutations`)."""
    if shots not in SYSU_SHOTS:
        raise InputError(f"SYSU shots must be 1 (single-shot) or 10 (multi-shot), got {shots!r}")
    _check_choice(permutations, ("official", "seeded"), "SYSU permutations")
    table = official_sysu_permutations() if permutations == "official" else seeded_sysu_permutations(
        [r for r in records if r.cam not in SYSU_QUERY_CAMERAS], seed)
    trials = _check_trials(trials, range(SYSU_TRIALS), "SYSU protocol")
    cams = SYSU_GALLERY_CAMERAS[_check_choice(mode, SYSU_GALLERY_CAMERAS, "SYSU mode")]
    query = tuple(sysu_official_queries(records))
    groups = _group_by_pid_cam(records)
    params: dict[str, Any] = {"mode": mode, "shots": shots, "trials": list(trials), "permutations": permutations}
    if permutations == "seeded":
        params["seed"] = seed
    return Protocol("sysu", "sysu", params, tuple(
        Trial(query, tuple(_official_gallery(groups, cams, t, shots, table))) for t in trials))


def sysu_agw_protocol(records: Sequence[ImageRecord], *, mode: str = "all",
                      trials: Sequence[int] = range(SYSU_TRIALS)) -> Protocol:
    """SYSU-MM01 as evaluated by AGW ``test.py`` (seeds 0..9, single-shot)."""
    trials = _check_trials(trials, range(2**31), "SYSU AGW protocol")
    cams = SYSU_GALLERY_CAMERAS[_check_choice(mode, SYSU_GALLERY_CAMERAS, "SYSU mode")]
    query = tuple(sysu_agw_queries(records))
    groups = _group_by_pid_cam(records)
    return Protocol("sysu-agw", "sysu", {"mode": mode, "shots": 1, "trials": list(trials)}, tuple(
        Trial(query, tuple(_seeded_choice_gallery(groups, cams, t))) for t in trials))


# --------------------------------------------------------------------------- RegDB


def regdb_protocol(trial_tests: Sequence[Sequence[ImageRecord]], *, direction: str = "visible-thermal",
                   trials: Sequence[int] = range(1, 11)) -> Protocol:
    """RegDB: trial t (1..10) uses the test list of split t.  ``thermal-visible`` swaps the query
    and gallery records -- features, ids and cameras travel together."""
    query_modality = REGDB_DIRECTIONS[_check_choice(direction, REGDB_DIRECTIONS, "RegDB direction")]
    trials = _check_trials(trials, range(1, len(trial_tests) + 1), "RegDB protocol")
    built = []
    for t in trials:
        records = trial_tests[t - 1]
        built.append(Trial(tuple(r for r in records if r.modality == query_modality),
                           tuple(r for r in records if r.modality != query_modality)))
    return Protocol("regdb", "regdb", {"direction": direction, "trials": list(trials)}, tuple(built))


def regdb_trials_for_split(params: Mapping[str, Any], trained_split: int) -> tuple[dict[str, Any], str | None]:
    """RegDB protocol parameters for a model trained on split ``trained_split``, and a warning.

    Each RegDB split divides the 412 identities into training and test halves, so the test sets
    of the other nine splits contain identities this model was trained on. Without ``trials`` the
    protocol uses trial ``trained_split`` only; trials given explicitly are kept, with a warning
    naming those that are not the training split.
    """
    if "trials" not in params:
        return {**params, "trials": [trained_split]}, None
    others = [t for t in _check_trials(params["trials"], range(1, 11), "RegDB protocol") if t != trained_split]
    if not others:
        return dict(params), None
    return dict(params), (f"RegDB trial(s) {', '.join(map(str, others))} test identities this model trained on "
                          f"(it was trained on split {trained_split}); their results are not test results")


# --------------------------------------------------------------------------- LLCM


def llcm_protocol(records: Sequence[ImageRecord], *, direction: str = "infrared-visible",
                  trials: Sequence[int] = range(10)) -> Protocol:
    """LLCM: every test image of the query modality (pid, then camera, then file order) against one
    image per (pid, camera) of the other modality drawn by ``random.Random(trial)`` as in
    ``process_gallery_llcm``; the ``llcm`` metric drops same-identity same-camera gallery items."""
    query_modality = LLCM_DIRECTIONS[_check_choice(direction, LLCM_DIRECTIONS, "LLCM direction")]
    trials = _check_trials(trials, range(2**31), "LLCM protocol")
    query_side = [r for r in records if r.modality == query_modality]
    gallery_side = [r for r in records if r.modality != query_modality]
    query_groups = _group_by_pid_cam(query_side)
    query = tuple(r for key in sorted(query_groups) for r in query_groups[key])
    gallery_groups = _group_by_pid_cam(gallery_side)
    cams = sorted({cam for _, cam in gallery_groups})
    return Protocol("llcm", "llcm", {"direction": direction, "trials": list(trials)}, tuple(
        Trial(query, tuple(_seeded_choice_gallery(gallery_groups, cams, t))) for t in trials))


# --------------------------------------------------------------------------- Market-style


def market_protocol(query: Sequence[ImageRecord], gallery: Sequence[ImageRecord]) -> Protocol:
    """A fixed query/gallery split, one trial; the ``market`` metric drops gallery items of the
    query's identity taken by the query's camera."""
    if not query or not gallery:
        raise InputError("market protocol: the dataset defines no query/gallery split (manifest split column)")
    return Protocol("market", "market", {}, (Trial(tuple(query), tuple(gallery)),))


# --------------------------------------------------------------------------- registry

PROTOCOLS: dict[str, tuple[Callable[..., Protocol], Callable[[VIDataset], tuple[Any, ...]]]] = {
    "sysu": (sysu_official_protocol, lambda ds: (ds.test,)),
    "sysu-agw": (sysu_agw_protocol, lambda ds: (ds.test,)),
    "regdb": (regdb_protocol, lambda ds: (ds.trial_tests or (ds.test,),)),
    "llcm": (llcm_protocol, lambda ds: (ds.test,)),
    "market": (market_protocol, lambda ds: (ds.query, ds.gallery)),
}
"""name -> (protocol function, the dataset fields it takes as positional arguments)."""


def build_protocol(name: str, dataset: VIDataset, **params: Any) -> Protocol:
    """Protocol ``name`` over ``dataset``'s test records with keyword ``params`` (see the functions)."""
    func, arguments = _protocol_entry(name, params)
    return func(*arguments(dataset), **params)


def build_validation_protocol(name: str, records: Sequence[ImageRecord], *, query_modality: Modality = Modality.INFRARED,
                              **params: Any) -> Protocol:
    """Protocol ``name`` applied to the *validation* identities' ``records`` (held out of training).

    The same selection rule as on the test set, with the same ``params``: SYSU (official or AGW)
    and LLCM select queries and galleries from the records exactly as from test records; RegDB has
    one trial (the records are one split, both modalities, in the ``direction`` asked for); a
    ``market`` split has no query/gallery column for training records, so ``query_modality``
    (the run's ``data.val_mode``) queries the other modality.
    """
    func, _ = _protocol_entry(name, params)
    if name == "regdb":
        return regdb_protocol([records], **{k: v for k, v in params.items() if k != "trials"}, trials=(1,))
    if name == "market":
        query = [r for r in records if r.modality == query_modality]
        return market_protocol(query, [r for r in records if r.modality != query_modality])
    return func(records, **params)


def _protocol_entry(name: str, params: Mapping[str, Any]
                    ) -> tuple[Callable[..., Protocol], Callable[[VIDataset], tuple[Any, ...]]]:
    """The registry entry of ``name`` after checking the name and the parameter names."""
    if name not in PROTOCOLS:
        close = difflib.get_close_matches(name, list(PROTOCOLS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"unknown protocol {name!r}{hint} (choose from {', '.join(PROTOCOLS)})")
    func, arguments = PROTOCOLS[name]
    accepted = [p.name for p in inspect.signature(func).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for key in params:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"protocol {name}: unknown parameter {key!r}{hint} (accepted: {', '.join(accepted) or 'none'})")
    return func, arguments


# --------------------------------------------------------------------------- features


def protocol_images(protocol: Protocol) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """The distinct query images and the distinct gallery images over all trials, in first-seen
    order: the rows of the feature file :func:`protocol_feature_set` builds."""
    return _unique(r for t in protocol.trials for r in t.query), _unique(r for t in protocol.trials for r in t.gallery)


def _unique(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    return list(dict.fromkeys(records))


def protocol_feature_set(protocol: Protocol, query_feat: np.ndarray, gallery_feat: np.ndarray, *,
                         root: Path | None = None, meta: Mapping[str, Any] | None = None) -> FeatureSet:
    """A multi-trial :class:`FeatureSet` from the features of :func:`protocol_images`.

    Row i of ``query_feat`` / ``gallery_feat`` belongs to image i of ``protocol_images(protocol)``.
    Trial t's rows are stored in ``trial_query_index`` / ``trial_gallery_index`` (``-1`` pads
    ragged rows), image paths in ``query_path`` / ``gallery_path`` (relative to the folder ``root``
    when given), the protocol (name, metric, parameters) in ``meta['protocol']``.
    """
    queries, galleries = protocol_images(protocol)
    for side, feat, images in (("query", query_feat, queries), ("gallery", gallery_feat, galleries)):
        if feat.ndim != 2 or feat.shape[0] != len(images):
            raise InputError(
                f"{side}_feat has shape {feat.shape}, but protocol {protocol.name} has {len(images)} {side} images")
    q_row = {r: i for i, r in enumerate(queries)}
    g_row = {r: i for i, r in enumerate(galleries)}

    def index(rows: Mapping[ImageRecord, int], pick: Callable[[Trial], tuple[ImageRecord, ...]]) -> np.ndarray:
        width = max(len(pick(t)) for t in protocol.trials)
        out = np.full((len(protocol.trials), width), -1, dtype=np.int64)
        for i, trial in enumerate(protocol.trials):
            out[i, :len(pick(trial))] = [rows[r] for r in pick(trial)]
        return out

    def paths(images: list[ImageRecord]) -> np.ndarray:
        if root is None:
            return np.array([str(r.path) for r in images])
        outside = next((r.path for r in images if not r.path.is_relative_to(root)), None)
        if outside is not None:
            raise InputError(f"image {outside} is not under the folder {root} given as root")
        return np.array([r.path.relative_to(root).as_posix() for r in images])

    return FeatureSet(
        query_feat=query_feat, gallery_feat=gallery_feat,
        query_id=np.array([r.pid for r in queries], dtype=np.int64),
        gallery_id=np.array([r.pid for r in galleries], dtype=np.int64),
        query_cam=np.array([r.cam for r in queries], dtype=np.int64),
        gallery_cam=np.array([r.cam for r in galleries], dtype=np.int64),
        trial_query_index=index(q_row, lambda t: t.query),
        trial_gallery_index=index(g_row, lambda t: t.gallery),
        extras={"query_path": paths(queries), "gallery_path": paths(galleries)},
        meta={**(meta or {}), "protocol": {"name": protocol.name, "metric": protocol.metric, **protocol.params}},
    )
