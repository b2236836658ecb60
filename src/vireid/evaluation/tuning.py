"""Re-ranking evaluated per trial, and its parameters chosen on the validation identities.

:func:`evaluate_rerank` re-ranks every trial of a feature file with one resolved setting.
:func:`tune_rerank` searches a method's small grid (``MethodSpec.grid`` in
:mod:`vireid.retrieval.presets`) on the *validation* features alone — the identities a run
held out of training (``FeatureSet.validation``) — and returns the best point by a stated
metric; the test set is evaluated afterwards, once, with the chosen values
(:func:`preset_and_tuned`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vireid.errors import InputError
from vireid.progress import progress_bar
from vireid.evaluation.evaluator import ProtocolEvaluation, evaluate_features
from vireid.evaluation.metrics import MAX_RANK, EvalResult, Protocol
from vireid.evaluation.report import evaluation_to_dict
from vireid.features import VALIDATION_PREFIX, FeatureSet
from vireid.retrieval import RerankSettings, rerank, resolve_rerank
from vireid.retrieval.presets import get_method

TUNE_METRICS: dict[str, Callable[[EvalResult], float]] = {
    "mAP": lambda result: float(result.mAP),
    "r1": lambda result: result.rank(1),
    "mINP": lambda result: float(result.mINP),
}
"""Metrics a grid search can maximise (mean over the validation trials)."""


def smallest_gallery(features: FeatureSet) -> int:
    """The smallest gallery over the trials (the bound on every k of a re-ranker)."""
    return min(len(features.trial_rows(t)[1]) for t in range(features.num_trials))


def evaluate_rerank(features: FeatureSet, protocol: str | Protocol, settings: RerankSettings, *,
                    max_rank: int = MAX_RANK) -> ProtocolEvaluation:
    """Every trial of ``features`` re-ranked with ``settings`` (the trial's own gallery), evaluated."""
    def distance(trial: FeatureSet) -> np.ndarray:
        return rerank(settings.method, trial.query_feat, trial.gallery_feat, variant=settings.variant,
                      params=settings.params, dtype=settings.dtype)

    return evaluate_features(features, protocol, distance_fn=distance, distance_info=settings.to_dict(),
                             max_rank=max_rank)


@dataclass
class Tuning:
    """A grid search on the validation features: every point's scores and the chosen one."""

    method: str
    variant: str
    metric: str
    base: dict[str, int | float]
    grid: dict[str, list[int | float]]
    points: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    base_score: float | None = None
    num_trials: int = 0

    @property
    def best(self) -> dict[str, Any]:
        """The first point with the highest score (grid order: the base point first)."""
        return max(self.points, key=lambda point: point["score"])

    @property
    def chosen(self) -> dict[str, int | float]:
        return dict(self.best["params"])

    def to_dict(self) -> dict[str, Any]:
        """JSON: method, variant, metric, validation trials used, the searched grid, base (preset)
        values, chosen values, and every evaluated point (parameters, metric value, rank-1, mAP,
        mINP on validation)."""
        return {"method": self.method, "variant": self.variant, "metric": self.metric, "on": "val",
                "validation_trials": self.num_trials, "grid": self.grid, "base": self.base, "chosen": self.chosen,
                "validation_score": self.best["score"], "base_validation_score": self.base_score,
                "points": self.points, "skipped": self.skipped}


def grid_points(base: Mapping[str, int | float], grid: Mapping[str, Sequence[int | float]]
                ) -> list[dict[str, int | float]]:
    """``base`` first, then every combination of ``grid`` on top of ``base`` (duplicates dropped)."""
    names = list(grid)
    points = [dict(base)] + [{**base, **dict(zip(names, values))} for values in itertools.product(*grid.values())]
    unique: list[dict[str, int | float]] = []
    for point in points:
        if point not in unique:
            unique.append(point)
    return unique


def tune_rerank(validation: FeatureSet, protocol: str | Protocol, method: str, *, metric: str = "mAP",
                variant: str | None = None, preset: str | None = None, fixed: Mapping[str, object] | None = None,
                grid: Mapping[str, Sequence[int | float]] | None = None, dtype: object = np.float32,
                max_trials: int | None = None, progress: bool = False) -> Tuning:
    """Grid search of ``method`` on ``validation`` (only the validation identities are read).

    Every point is the preset's (or default) values with the grid's values on top; ``fixed``
    parameters are never searched. The base point (no grid values) is evaluated first, so a
    tie keeps it. Points invalid for the validation gallery (a k larger than it, ``K > k_graph``,
    …) are skipped and listed. The score is ``metric`` (``mAP``, ``r1`` or ``mINP``) averaged
    over the validation trials (the first ``max_trials`` of them when given); the highest wins.
    """
    if metric not in TUNE_METRICS:
        raise InputError(f"unknown tuning metric {metric!r} (choose from {', '.join(TUNE_METRICS)})")
    if max_trials is not None and max_trials < validation.num_trials:
        if max_trials < 1:
            raise InputError(f"max_trials must be >= 1, got {max_trials}")
        validation = dataclasses.replace(validation, trial_query_index=_first(validation.trial_query_index, max_trials),
                                         trial_gallery_index=_first(validation.trial_gallery_index, max_trials))
    spec = get_method(method)
    fixed = dict(fixed or {})
    base = resolve_rerank(method, variant=variant, params=fixed, preset=preset, dtype=dtype)
    searched = {name: list(values) for name, values in (spec.grid if grid is None else grid).items()
                if name not in fixed}
    tuning = Tuning(spec.name, base.variant, metric, dict(base.params), searched, num_trials=validation.num_trials)
    num_gallery = smallest_gallery(validation)
    candidates = grid_points(base.params, searched)
    for params in progress_bar(candidates, desc=f"tuning {spec.name} on val", enabled=progress):
        try:
            settings = resolve_rerank(spec.name, num_gallery=num_gallery, variant=base.variant, params=params,
                                      dtype=dtype)
        except InputError as exc:
            tuning.skipped.append({"params": params, "reason": str(exc)})
            continue
        result = evaluate_rerank(validation, protocol, settings).mean
        score = TUNE_METRICS[metric](result)
        if settings.params == tuning.base:
            tuning.base_score = score
        tuning.points.append({"params": settings.params, "score": score, "r1": result.rank(1),
                              "mAP": float(result.mAP), "mINP": float(result.mINP)})
    if not tuning.points:
        raise InputError(f"tuning {spec.name}: no grid point is valid for the validation gallery of {num_gallery} "
                         f"images ({tuning.skipped[0]['reason']})")
    return tuning


def _first(index: np.ndarray | None, count: int) -> np.ndarray | None:
    return None if index is None else index[:count]


def require_validation(features: FeatureSet, source: str) -> FeatureSet:
    """``features.validation``, or one :class:`InputError` line saying how to get it."""
    if features.validation is None:
        raise InputError(f"{source}: no validation features (keys {VALIDATION_PREFIX}query_feat, "
                         f"{VALIDATION_PREFIX}gallery_feat, …); write them with `vireid extract` from a checkpoint "
                         f"whose run held out validation identities (data.val_ids > 0)")
    return features.validation


@dataclass
class PresetAndTuned:
    """One method on the test set with its preset (or default) values and with the values chosen on validation."""

    preset: ProtocolEvaluation
    tuned: ProtocolEvaluation
    tuning: Tuning

    def to_dict(self) -> dict[str, Any]:
        return {"preset": evaluation_to_dict(self.preset),
                "tuned": {**evaluation_to_dict(self.tuned), "tuning": self.tuning.to_dict()}}


def preset_and_tuned(features: FeatureSet, protocol: str | Protocol, method: str, *, source: str = "features",
                     metric: str = "mAP", variant: str | None = None, preset: str | None = None,
                     fixed: Mapping[str, object] | None = None, dtype: object = np.float32,
                     max_rank: int = MAX_RANK, max_trials: int | None = None,
                     progress: bool = False) -> PresetAndTuned:
    """Tune ``method`` on ``features.validation`` (its first ``max_trials`` trials when given), then
    evaluate the test trials once with the preset values and once with the chosen values."""
    tuning = tune_rerank(require_validation(features, source), protocol, method, metric=metric, variant=variant,
                         preset=preset, fixed=fixed, dtype=dtype, max_trials=max_trials, progress=progress)
    test_gallery = smallest_gallery(features)
    preset_settings = resolve_rerank(method, num_gallery=test_gallery, variant=variant, params=fixed, preset=preset,
                                     dtype=dtype)
    tuned_settings = resolve_rerank(method, num_gallery=test_gallery, variant=tuning.variant, params=tuning.chosen,
                                    dtype=dtype)
    preset_eval = evaluate_rerank(features, protocol, preset_settings, max_rank=max_rank)
    tuned_info = {**tuned_settings.to_dict(), "tuned_on": "val", "tune_metric": metric}
    if tuned_settings.params == preset_settings.params:
        tuned_eval = dataclasses.replace(preset_eval, distance=tuned_info)
    else:
        tuned_eval = evaluate_rerank(features, protocol, tuned_settings, max_rank=max_rank)
        tuned_eval.distance = tuned_info
    return PresetAndTuned(preset_eval, tuned_eval, tuning)
