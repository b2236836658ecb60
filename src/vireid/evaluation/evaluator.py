"""Evaluate a feature file under a protocol: every trial, then the mean over trials.

The distance is pluggable: ``distance_fn(trial_features) -> (Q, G)`` receives the single-trial
:class:`~vireid.features.FeatureSet` (so re-ranking, which depends on the trial's gallery, runs
per trial). The default is :func:`plain_distance`. Precomputed distances and ranked lists over
the file's rows are sliced per trial instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vireid.errors import InputError
from vireid.evaluation.metrics import (
    MAX_RANK,
    EvalResult,
    Protocol,
    evaluate_distance,
    evaluate_ranked,
    get_protocol,
    mean_result,
    validate_ranked_index,
)
from vireid.features import FeatureSet

DistanceFn = Callable[[FeatureSet], np.ndarray]

QUERY_CHUNK_ELEMENTS = 1 << 22
""":func:`plain_distance` normalises ``QUERY_CHUNK_ELEMENTS // d`` query rows at a time (16 MiB of
float32); much smaller blocks make BLAS re-pack the gallery for every block (3-4x slower)."""


def l2_normalize(features: np.ndarray, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Rows scaled to unit L2 norm, in ``dtype`` (all-zero rows stay zero)."""
    features = np.asarray(features, dtype=dtype)
    norms = np.sqrt(np.einsum("ij,ij->i", features, features))[:, None]
    return features / np.maximum(norms, np.finfo(features.dtype).tiny)


def plain_distance(
    query_feat: np.ndarray, gallery_feat: np.ndarray, *, dtype: np.dtype | type = np.float32,
    chunk_size: int | None = None,
) -> np.ndarray:
    """AGW test.py: ``-q_n g_nᵀ`` of L2-normalised features, in ``dtype``, ``chunk_size`` query rows at a time."""
    if query_feat.shape[1] != gallery_feat.shape[1]:
        raise InputError(f"feature dimensions differ: query d={query_feat.shape[1]}, gallery d={gallery_feat.shape[1]}")
    gallery = l2_normalize(gallery_feat, dtype)
    dist = np.empty((query_feat.shape[0], gallery_feat.shape[0]), dtype=gallery.dtype)
    step = chunk_size or max(1, QUERY_CHUNK_ELEMENTS // max(query_feat.shape[1], 1))
    for start in range(0, query_feat.shape[0], step):
        block = dist[start:start + step]
        np.matmul(l2_normalize(query_feat[start:start + step], dtype), gallery.T, out=block)
        np.negative(block, out=block)
    return dist


@dataclass
class ProtocolEvaluation:
    """Per-trial results and their mean, with the protocol and distance that produced them."""

    protocol: Protocol
    trials: list[EvalResult]
    distance: dict[str, Any] = field(default_factory=dict)
    max_rank: int = MAX_RANK

    @property
    def mean(self) -> EvalResult:
        return mean_result(self.trials)


def evaluate_features(
    features: FeatureSet, protocol: str | Protocol, *, distance_fn: DistanceFn | None = None,
    distance_info: dict[str, Any] | None = None, dtype: np.dtype | type = np.float32, max_rank: int = MAX_RANK,
    chunk_size: int | None = None,
) -> ProtocolEvaluation:
    """Evaluate every trial of ``features`` with ``distance_fn``.

    Without ``distance_fn`` the distance is :func:`plain_distance` in ``dtype``: the features are
    normalised once, and when the trials overlap enough (the union of their rows is no larger than
    the trials together) one distance over the union is computed and sliced per trial.
    """
    if distance_fn is not None:
        return _evaluate_trials(features, protocol, lambda t: distance_fn(features.trial(t)),
                                dict(distance_info or {"method": "custom"}), max_rank, chunk_size)
    rows = [features.trial_rows(t) for t in range(features.num_trials)]
    q_union = np.unique(np.concatenate([q for q, _ in rows]))
    g_union = np.unique(np.concatenate([g for _, g in rows]))
    if len(q_union) * len(g_union) <= sum(len(q) * len(g) for q, g in rows):
        # trials overlap (e.g. SYSU multi-shot): one distance over the union, sliced per trial
        shared = plain_distance(features.query_feat[q_union], features.gallery_feat[g_union], dtype=dtype)

        def trial_distance(t: int) -> np.ndarray:
            q_rows, g_rows = rows[t]
            if np.array_equal(q_rows, q_union) and np.array_equal(g_rows, g_union):
                return shared
            return shared[np.ix_(np.searchsorted(q_union, q_rows), np.searchsorted(g_union, g_rows))]
    else:
        query, gallery = l2_normalize(features.query_feat, dtype), l2_normalize(features.gallery_feat, dtype)

        def trial_distance(t: int) -> np.ndarray:
            q_rows, g_rows = rows[t]
            dist = query[q_rows] @ gallery[g_rows].T
            return np.negative(dist, out=dist)

    info = distance_info or {"method": "plain", "dtype": np.dtype(dtype).name}
    return _evaluate_trials(features, protocol, trial_distance, dict(info), max_rank, chunk_size)


def evaluate_precomputed(
    features: FeatureSet, dist: np.ndarray, protocol: str | Protocol, *, source: str = "distance matrix",
    max_rank: int = MAX_RANK, chunk_size: int | None = None,
) -> ProtocolEvaluation:
    """Evaluate a precomputed distance over all rows of the file ``(Q, G)``; each trial takes its rows and columns."""
    expected = (len(features.query_id), len(features.gallery_id))
    if dist.ndim != 2 or dist.shape != expected:
        raise InputError(f"{source}: shape {dist.shape} does not match the feature file's (Q, G) = {expected}")
    if not (np.issubdtype(dist.dtype, np.floating) or np.issubdtype(dist.dtype, np.integer)):
        raise InputError(f"{source}: dtype {dist.dtype} is not numeric")

    def trial_distance(t: int) -> np.ndarray:
        q_rows, g_rows = features.trial_rows(t)
        block = np.asarray(dist[np.ix_(q_rows, g_rows)])
        if not np.isfinite(block).all():
            row, col = np.argwhere(~np.isfinite(block))[0]
            raise InputError(f"{source}: non-finite value {block[row, col]} at row {q_rows[row]}, column {g_rows[col]}")
        return block

    return _evaluate_trials(features, protocol, trial_distance, {"method": "precomputed", "source": source},
                            max_rank, chunk_size)


def evaluate_ranked_lists(
    features: FeatureSet, ranked_index: np.ndarray, protocol: str | Protocol, *, source: str = "ranked_index",
    max_rank: int = MAX_RANK, chunk_size: int | None = None,
) -> ProtocolEvaluation:
    """Evaluate ranked lists of gallery rows of the file ``(Q, K)``.

    For a file with trials, each trial keeps its query rows and drops list entries outside its
    gallery (the remaining order is kept); positives outside a list count as not retrieved.
    """
    rule = protocol if isinstance(protocol, Protocol) else get_protocol(protocol)
    try:
        ranked_index = validate_ranked_index(ranked_index, num_queries=len(features.query_id),
                                             num_gallery=len(features.gallery_id))
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None
    results = []
    for t in range(features.num_trials):
        q_rows, g_rows = features.trial_rows(t)
        position = np.full(len(features.gallery_id) + 1, -1, dtype=np.int64)  # last slot maps padding -1
        position[g_rows] = np.arange(len(g_rows))
        trial_index = position[ranked_index[q_rows]]
        results.append(evaluate_ranked(
            trial_index, features.query_id[q_rows], features.gallery_id[g_rows], features.query_cam[q_rows],
            features.gallery_cam[g_rows], rule, max_rank=max_rank, chunk_size=chunk_size))
    return ProtocolEvaluation(rule, results, {"method": "ranked", "source": source,
                                              "list_length": int(ranked_index.shape[1])}, max_rank)


def _evaluate_trials(
    features: FeatureSet, protocol: str | Protocol, trial_distance: Callable[[int], np.ndarray],
    distance_info: dict[str, Any], max_rank: int, chunk_size: int | None,
) -> ProtocolEvaluation:
    rule = protocol if isinstance(protocol, Protocol) else get_protocol(protocol)
    results = []
    for t in range(features.num_trials):
        q_rows, g_rows = features.trial_rows(t)
        dist = trial_distance(t)
        if dist.shape != (len(q_rows), len(g_rows)):
            raise InputError(f"trial {t}: the distance has shape {dist.shape}, "
                             f"expected (Q, G) = {(len(q_rows), len(g_rows))}")
        results.append(evaluate_distance(
            dist, features.query_id[q_rows], features.gallery_id[g_rows], features.query_cam[q_rows],
            features.gallery_cam[g_rows], rule, max_rank=max_rank, chunk_size=chunk_size))
    return ProtocolEvaluation(rule, results, distance_info, max_rank)
