"""Single-query re-ranking: one query's distance to every item of a stored gallery.

The batch re-rankers (:mod:`~vireid.retrieval.aim`, :mod:`~vireid.retrieval.sim`,
:mod:`~vireid.retrieval.kreciprocal`) see a whole query set. A search service sees one query at
a time against a gallery known in advance, whose structures a
:class:`~vireid.retrieval.gallery_state.GalleryState` keeps. One query then costs the similarity
pass over the gallery (done by the caller) plus O(G·k) vector work (:func:`query_distance`); no
G×G matrix is ever formed. Parameters have the names, defaults and presets of
:mod:`~vireid.retrieval.presets` (:class:`~vireid.retrieval.gallery_state.SingleQueryParams`),
and every method computes its ``paper`` variant: a row equals the batch function's row with
``variant="paper"`` on the same gallery (``tests/test_single_query.py``). For AIM the paper and
reference variants differ only when similarities tie at the k1-th value; k-reciprocal re-ranking's
reference pools all queries together, which one query cannot.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp

from vireid.errors import InputError
from vireid.retrieval.exact import NORM_EPS
from vireid.retrieval.gallery_state import (
    SERIAL,
    SINGLE_QUERY_METHODS,
    GalleryState,
    SingleQueryParams,
    reciprocal_half,
)
from vireid.retrieval.kreciprocal import _probe_vectors, blend_jaccard
from vireid.retrieval.sim import _mean_of_shortest_paths


def top_indices(values: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Indices of the k largest (or smallest) values, unordered."""
    k = min(k, values.shape[0])
    if k == values.shape[0]:
        return np.arange(k)
    return np.argpartition(-values if largest else values, k - 1)[:k]


def top_k(dist: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` smallest distances, in increasing order (ties by index)."""
    part = top_indices(dist, k, largest=False)
    return part[np.lexsort((part, dist[part]))]


def _euclidean(sim: np.ndarray) -> np.ndarray:
    """``‖q − g‖`` of unit vectors from their float32 similarities (as the batch functions)."""
    sim32 = np.asarray(sim, dtype=np.float32)
    return np.sqrt(np.maximum(np.float32(2) - np.float32(2) * sim32, np.float32(0)))


def aim_query(sim: np.ndarray, state: GalleryState) -> np.ndarray:
    """SAAI Eq. 6–10 for one query: ``−(Q'·G'ᵀ) − q·gᵀ`` with ``Q' = normalize(top-k1 of q·gᵀ)``."""
    k1 = int(state.effective.aim["k1"])
    top = top_indices(sim, k1, largest=True)
    weights = sim[top].astype(np.float64)
    weights = weights / max(float(np.linalg.norm(weights)), NORM_EPS)
    rows, values, which = state.stores["aim"].column_entries(top)
    affinity = np.bincount(rows, weights=values * weights[which], minlength=state.n)
    return -affinity - sim


def aim_from_candidates(query: np.ndarray, feats: np.ndarray, state: GalleryState, cand_index: np.ndarray,
                        cand_sim: np.ndarray, keep: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """AIM for one query from its nearest candidates (exact similarities ``cand_sim``) instead of a
    full scan: :func:`aim_query` on the returned items when the candidates are the true top-C
    neighbours and C >= k1. Returns (gallery rows, distances).

    ``Q'`` is built from the top-k1 candidates; the other items with a non-zero affinity term come
    from ``G'``'s columns. With ``keep`` (the number of best items the caller needs) such an item is
    scored (``q·g`` from ``feats``) only if it could still rank among them: its similarity is at most
    the smallest candidate similarity, so ``−affinity − min(cand_sim)`` bounds its distance from
    below; items whose bound does not beat the ``keep``-th candidate distance are dropped.
    """
    k1 = int(state.effective.aim["k1"])
    top = top_indices(cand_sim, k1, largest=True)
    weights = cand_sim[top].astype(np.float64)
    weights = weights / max(float(np.linalg.norm(weights)), NORM_EPS)
    rows, values, which = state.stores["aim"].column_entries(cand_index[top])
    items = np.union1d(cand_index, rows)
    affinity = np.bincount(np.searchsorted(items, rows), weights=values * weights[which], minlength=len(items))
    sim = np.full(len(items), np.nan)
    sim[np.searchsorted(items, cand_index)] = cand_sim
    others = np.flatnonzero(np.isnan(sim))
    if keep is not None and others.size:
        known = np.flatnonzero(~np.isnan(sim))
        kth = np.partition(-affinity[known] - sim[known], min(keep, known.size) - 1)[min(keep, known.size) - 1]
        hopeful = -affinity[others] - float(np.min(cand_sim)) <= kth
        items = np.concatenate([items[known], items[others[hopeful]]])
        affinity = np.concatenate([affinity[known], affinity[others[hopeful]]])
        sim = np.concatenate([sim[known], np.empty(int(hopeful.sum()))])
        others = np.arange(known.size, items.size)
    sim[others] = np.einsum("ij,j->i", feats[items[others]], query.astype(feats.dtype))  # few rows: no thread pool
    return items, -affinity - sim


def _sgr_from(dist: np.ndarray, state: GalleryState, method: str) -> np.ndarray:
    """SIM Eq. 1–5 (paper) for one query: column j ← mean of the K shortest ``d(q, g_n) + λ·d(g_n, g_j)``,
    n among the k_graph nearest of j (the compiled kernel of :mod:`~vireid.retrieval.sim`)."""
    p = state.effective.method(method)
    source = np.ascontiguousarray(dist, dtype=np.float64)[:, None]
    out = np.empty(state.n, np.float64)
    for rows, neighbours, edge in state.graph.sgr_parts(float(p["lam"]), int(p["k_graph"])):
        def store(columns: slice, mean: np.ndarray, rows: np.ndarray | None = rows) -> None:
            out[columns if rows is None else rows[columns]] = mean[:, 0]

        _mean_of_shortest_paths(source, neighbours, edge, int(p["K"]), store, SERIAL)
    return out


def _mnnr_from(dist: np.ndarray, state: GalleryState, method: str) -> np.ndarray:
    """SIM Eq. 6–8 (paper) for one query row ``dist``: N = the query's kq nearest gallery items
    (Eq. 6), ``d_M = 1 − |N ∩ R*(g)| / |N ∪ R*(g)|`` against each gallery item's expanded
    kg-reciprocal set (Eq. 7, set sizes), ``α·d + (1 − α)·d_M`` (Eq. 8)."""
    p = state.effective.method(method)
    kq, kg, alpha = int(p["kq"]), int(p["kg"]), float(p["alpha"])
    near = top_indices(dist, kq, largest=False)
    store = state.stores[f"recip{kg}"]
    holders, _, _ = store.column_entries(near)  # g with an item of N in R*(g), once per shared item
    overlap = np.bincount(holders, minlength=state.n).astype(np.float64)
    union = len(near) + store.lengths() - overlap
    return alpha * np.asarray(dist, dtype=np.float64) + (1.0 - alpha) * (1.0 - overlap / union)


def sgr_query(sim: np.ndarray, state: GalleryState) -> np.ndarray:
    return _sgr_from(_euclidean(sim), state, "sgr")


def mnnr_query(sim: np.ndarray, state: GalleryState) -> np.ndarray:
    return _mnnr_from(_euclidean(sim), state, "mnnr")


def sim_query(sim: np.ndarray, state: GalleryState) -> np.ndarray:
    """SIM Eq. 8: MNNR on the SGR distance."""
    return _mnnr_from(_sgr_from(_euclidean(sim), state, "sim"), state, "sim")


def krr_query(sim: np.ndarray, state: GalleryState) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al. 2017, paper): the pool is the gallery plus the query;
    R*(p) (Eq. 3–5), ``exp(−d)`` weights (Eq. 7), expansion over the k2 nearest (Eq. 11),
    ``1 − Σmin/Σmax`` (Eq. 10), ``(1 − λ)·d_J + λ·d`` (Eq. 12)."""
    p = state.effective.krr
    k1, k2, lam = int(p["k1"]), int(p["k2"]), float(p["lam"])
    dist = _euclidean(sim)[None]
    half = reciprocal_half(k1)
    vectors = state.stores[f"recip{k1}"]
    probe = _probe_vectors(dist, state.stores[f"half{half}"], state.graph.radius(k1), state.graph.radius(half),
                           k1, k2, vectors)
    expanded = state.stores["krr_expanded"] if k2 > 1 else vectors
    out = dist.astype(np.float64)
    blend_jaccard(out, expanded.shared_mass(probe.tocsr()), lam, np.asarray(probe.sum(axis=1)).ravel(), expanded.sums())
    return out[0]


_QUERIES = {"plain": lambda sim, state: -np.asarray(sim, dtype=np.float64), "aim": aim_query, "sgr": sgr_query,
            "mnnr": mnnr_query, "sim": sim_query, "krr": krr_query}


def query_distance(method: str, sim: np.ndarray, state: GalleryState) -> np.ndarray:
    """Distance (smaller = closer) of one query to every gallery item under ``method``, from its
    similarities ``sim`` (G,) to the unit gallery rows."""
    if method not in _QUERIES:
        raise InputError(f"unknown re-ranking {method!r}; choose one of {', '.join(SINGLE_QUERY_METHODS)}")
    return _QUERIES[method](np.asarray(sim, dtype=np.float64), state)


def l2_normalize_rows(x: np.ndarray) -> np.ndarray:
    """Unit rows as C-contiguous float32."""
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), NORM_EPS))


def rank_single(method: str, queries: np.ndarray, gallery: np.ndarray, *, preset: str | None = None,
                params: Mapping[str, Mapping[str, object]] | None = None,
                state: GalleryState | None = None) -> np.ndarray:
    """The Q×G distance, one query at a time: the single-query counterpart of
    :func:`vireid.retrieval.rerank` with ``variant="paper"`` (used to check them against each other)."""
    gallery = l2_normalize_rows(gallery)
    if state is None:
        state = GalleryState.build(gallery, SingleQueryParams.resolve(preset, params), knn="exact")
    queries = l2_normalize_rows(queries)
    return np.stack([query_distance(method, gallery @ q, state) for q in queries])
