"""Single-query re-ranking against precomputed gallery structures.

The batch re-rankers of :mod:`vireid.retrieval` see a whole query set; a search service sees
one query at a time against a gallery that is known in advance. Everything that depends on
the gallery alone is computed once when the index is built (:class:`GalleryStructures`):

* the gallery top-k neighbour graph (indices, cosine similarities) and each item's smallest
  similarity to the rest of the gallery (the row maximum of the squared distances);
* AIM's expanded gallery affinities ``G'`` (SAAI ``getNewFeature(g, g, k1, k2, mean=True)``),
  stored column-major as a sparse top-k matrix;
* the k-reciprocal gallery vectors ``V_g`` of SIM's MNNR and of k-reciprocal re-ranking.

A query then costs one pass over the gallery features (O(G·d)) plus O(G·k) vector work:
no G×G matrix is ever formed. Features are L2-normalised rows; distances are smaller-is-closer.

Exactness with respect to the batch references (``REFERENCES.md``): AIM and MNNR rows are
independent of the other queries, so ``aim``, ``mnnr`` and ``sim`` reproduce the reference rows
(up to ties at the top-k thresholds); SIM's sequential in-place graph reasoning is evaluated
exactly, level by level (:class:`SGRSchedule`). k-reciprocal re-ranking uses the gallery-only neighbour pool for the gallery side (other queries are unknown
at search time) and the query joins the pool for its own reciprocal set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from vireid.errors import InputError
from vireid.retrieval.graph import NeighbourGraph, build_graph, farthest_similarity, rows_to_csr
from vireid.retrieval.knn import NeighbourIndex
from vireid.retrieval.kreciprocal import local_expansion, reciprocal_vectors

RERANK_METHODS = ("plain", "aim", "sim", "mnnr", "krr")

#: SIM's gallery neighbourhood size is fixed at 20 in the reference (``graph_reasoning``).
SGR_NEIGHBOURS = 20


@dataclass(frozen=True)
class RerankParams:
    """Parameters of the single-query re-rankers (defaults: the references' SYSU settings)."""

    aim_k1: int = 20
    aim_k2: int = 6
    sgr_lambda: float = 0.01
    sgr_topk: int = 9
    mnnr_k0: int = 12
    mnnr_lambda: float = 0.3
    #: k1 of the gallery k-reciprocal sets, shared by MNNR and k-reciprocal re-ranking.
    reciprocal_k1: int = 20
    krr_k2: int = 6
    krr_lambda: float = 0.3

    def graph_k(self) -> int:
        """Neighbours (self included) the gallery graph must hold for these parameters."""
        return max(self.aim_k1, self.aim_k2, SGR_NEIGHBOURS, self.reciprocal_k1 + 1, self.krr_k2)

    def validate(self) -> None:
        if not 1 <= self.sgr_topk <= SGR_NEIGHBOURS:
            raise InputError(f"sgr_topk must be in 1..{SGR_NEIGHBOURS}, got {self.sgr_topk}")
        for name in ("aim_k1", "aim_k2", "mnnr_k0", "reciprocal_k1", "krr_k2"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")


def l2_normalize_rows(x: np.ndarray) -> np.ndarray:
    """Unit rows as C-contiguous float32."""
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


def gallery_graph(feats: np.ndarray, k: int, knn: str = "auto", seed: int = 0) -> NeighbourGraph:
    """Top-k self graph of the (normalised) gallery: exact up to 50,000 items, IVF beyond
    (:mod:`vireid.retrieval.knn`)."""
    return build_graph(NeighbourIndex(feats, knn, seed=seed), min(k, len(feats)))


def extend_graph(graph: NeighbourGraph, feats: np.ndarray, n_new: int, k: int, block: int = 4096) -> NeighbourGraph:
    """The graph after appending the last ``n_new`` rows of ``feats``: O(N_new·G·d), not O(G²·d).

    New rows search the whole gallery exactly; old rows merge their lists with the new items.
    """
    total = feats.shape[0]
    n_old = total - n_new
    k = min(k, total)
    new_idx, new_sim = NeighbourIndex(feats, "exact").search(feats[n_old:], k)
    index = np.empty((total, k), np.int64)
    sim = np.empty((total, k), np.float32)
    index[n_old:], sim[n_old:] = new_idx, new_sim
    feats_t = torch.from_numpy(feats)
    new_ids = torch.arange(n_old, total)
    with torch.no_grad():
        for s, e in _blocks(n_old, block):
            scores = feats_t[s:e] @ feats_t[n_old:].T
            merged_val = torch.cat([torch.from_numpy(np.ascontiguousarray(graph.sim[s:e])), scores], dim=1)
            merged_idx = torch.cat([torch.from_numpy(np.ascontiguousarray(graph.index[s:e])),
                                    new_ids.expand(e - s, n_new)], dim=1)
            val, pos = merged_val.topk(k, dim=1)
            index[s:e] = torch.gather(merged_idx, 1, pos).numpy()
            sim[s:e] = val.numpy()
    return NeighbourGraph(index=index, sim=sim)


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def aim_expanded_gallery(graph: NeighbourGraph, k1: int, k2: int) -> sp.csr_matrix:
    """AIM's ``G' = normalize(mean_{n ∈ top-k2(i)} S_n)`` with ``S`` the gallery affinities kept
    at each row's top-k1 (SAAI ``getNewFeature(g, g, k1, k2, mean=True)``; self is in the k2
    neighbourhood). Returned transposed (row c = column c of ``G'``) for query-time lookups."""
    k1, k2 = min(k1, graph.k), min(k2, graph.k)
    affinity = rows_to_csr(graph.index[:, :k1], graph.sim[:, :k1], graph.n)
    expanded = local_expansion(affinity, graph.index[:, :k2]) if k2 > 1 else affinity
    norms = np.sqrt(np.asarray(expanded.multiply(expanded).sum(axis=1), dtype=np.float64).ravel())
    expanded = (sp.diags(1.0 / np.maximum(norms, 1e-12)) @ expanded).tocsr()
    return expanded.T.tocsr().astype(np.float32)


def k_reciprocal_gallery(feats: np.ndarray, graph: NeighbourGraph, min_sim: np.ndarray, k1: int) -> sp.csr_matrix:
    """Gallery vectors ``V_g[j, R*(j)] = exp(-A[j, R*]) / Σ exp(-A[j, R*])`` (Zhong et al. Eq. 4–8),
    ``A`` = squared distance over the row maximum (``2 − 2·min_sim``), as SIM's MNNR codes it.
    Returned transposed (row c = column c of ``V_g``)."""
    row_max = np.maximum(2.0 - 2.0 * min_sim.astype(np.float32), 1e-12)
    vectors = reciprocal_vectors(feats, graph, k1, row_scale=row_max, squared=True, normalize=True)
    return vectors.T.tocsr().astype(np.float32)


@dataclass
class SGRSchedule:
    """Wavefront order of SIM's sequential in-place column updates.

    The reference updates column j from the already-updated columns of its neighbours with a
    smaller index and the original values of the others. Columns are grouped by level
    (1 + the largest level of their smaller-index neighbours): columns of one level never read
    each other's new values, so each level is one vectorised step and the result equals the
    sequential loop exactly.
    """

    order: np.ndarray
    bounds: np.ndarray


def sgr_schedule(graph: NeighbourGraph) -> SGRSchedule:
    neighbours = graph.index[:, :SGR_NEIGHBOURS]
    level = np.zeros(neighbours.shape[0], np.int64)
    for j, row in enumerate(neighbours):
        earlier = row[row < j]
        level[j] = 1 + (int(level[earlier].max()) if earlier.size else 0)
    order = np.argsort(level, kind="stable")
    bounds = np.searchsorted(level[order], np.arange(1, int(level.max(initial=0)) + 2))
    return SGRSchedule(order=order, bounds=bounds)


@dataclass
class GalleryStructures:
    """Everything a single-query search needs besides the features (see module docstring)."""

    graph: NeighbourGraph
    min_sim: np.ndarray
    aim_gt: sp.csr_matrix
    mnnr_vt: sp.csr_matrix
    krr_vt: sp.csr_matrix
    sgr: SGRSchedule

    def __post_init__(self) -> None:
        self._mnnr_v: sp.csr_matrix | None = None

    @property
    def mnnr_v(self) -> sp.csr_matrix:
        """The k-reciprocal gallery vectors row-major (row j = V_g[j]), built on first use."""
        if self._mnnr_v is None:
            self._mnnr_v = self.mnnr_vt.T.tocsr()
        return self._mnnr_v


def build_structures(feats: np.ndarray, graph: NeighbourGraph, params: RerankParams, seed: int = 0) -> GalleryStructures:
    """Derive AIM's ``G'``, the k-reciprocal gallery vectors and SGR's schedule from the graph:
    O(G·k²) work after the graph (row maxima from :func:`~vireid.retrieval.graph.farthest_similarity`)."""
    min_sim = farthest_similarity(feats, seed=seed)
    reciprocal = k_reciprocal_gallery(feats, graph, min_sim, min(params.reciprocal_k1, graph.k - 1))
    krr_k2 = min(params.krr_k2, graph.k)
    krr_vt = reciprocal
    if krr_k2 > 1:
        krr_vt = local_expansion(reciprocal.T.tocsr(), graph.index[:, :krr_k2]).T.tocsr().astype(np.float32)
    return GalleryStructures(
        graph=graph,
        min_sim=min_sim,
        aim_gt=aim_expanded_gallery(graph, params.aim_k1, params.aim_k2),
        mnnr_vt=reciprocal,
        krr_vt=krr_vt,
        sgr=sgr_schedule(graph),
    )


def _top_indices(values: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Indices of the k largest (or smallest) values, unordered."""
    k = min(k, values.shape[0])
    if k == values.shape[0]:
        return np.arange(k)
    return np.argpartition(-values if largest else values, k - 1)[:k]


def _column_entries(mt: sp.csr_matrix, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices, values and per-column counts of the stored entries of columns ``cols`` of M,
    given ``mt`` = Mᵀ in CSR (an inverted index): O(entries touched)."""
    starts, ends = mt.indptr[cols], mt.indptr[cols + 1]
    lengths = ends - starts
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    take = np.repeat(starts, lengths) + offsets
    return mt.indices[take], mt.data[take], lengths


def _sparse_row_dot(mt: sp.csr_matrix, cols: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """``Σ_c weights[c] · M[:, cols[c]]`` (length n)."""
    rows, values, lengths = _column_entries(mt, cols)
    return np.bincount(rows, weights=values * np.repeat(weights, lengths), minlength=n)


def _jaccard_with_gallery(vt: sp.csr_matrix, cols: np.ndarray, vq: np.ndarray, n: int) -> np.ndarray:
    """Zhong et al. Eq. 10: ``1 − m/(2 − m)``, ``m = Σ_k min(V_q[k], V_g[j, k])``, for every j."""
    rows, values, lengths = _column_entries(vt, cols)
    m = np.bincount(rows, weights=np.minimum(values.astype(np.float64), np.repeat(vq, lengths)), minlength=n)
    return 1.0 - m / (2.0 - m)


def aim_distance(sim: np.ndarray, structures: GalleryStructures, k1: int) -> np.ndarray:
    """SAAI AIM for one query: ``-(Q'·G'ᵀ) - q·gᵀ`` with ``Q' = normalize(top-k1 of q·gᵀ)``."""
    g = sim.shape[0]
    top = _top_indices(sim, k1, largest=True)
    weights = sim[top].astype(np.float64)
    weights = weights / max(float(np.linalg.norm(weights)), 1e-12)
    return -_sparse_row_dot(structures.aim_gt, top, weights, g) - sim


def aim_on_candidates(query: np.ndarray, feats: np.ndarray, structures: GalleryStructures, k1: int,
                      cand_index: np.ndarray, cand_sim: np.ndarray,
                      keep: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """AIM for one query from its nearest candidates (exact similarities ``cand_sim``) instead of
    a full scan: :func:`aim_distance` on the returned items when the candidates are the true
    top-C neighbours and C >= k1. Returns (gallery rows, distances).

    ``Q'`` is built from the top-k1 candidates; the other items with a non-zero affinity term
    come from ``G'``'s inverted index. With ``keep`` (the number of best items the caller needs),
    such an item is scored (``q·g`` from ``feats``) only if it could still rank among them: its
    similarity is at most the smallest candidate similarity, so ``-affinity - min(cand_sim)``
    bounds its distance from below; items whose bound does not beat the ``keep``-th candidate
    distance are dropped. Without ``keep`` every item is scored.
    """
    top = _top_indices(cand_sim, k1, largest=True)
    weights = cand_sim[top].astype(np.float64)
    weights = weights / max(float(np.linalg.norm(weights)), 1e-12)
    rows, values, lengths = _column_entries(structures.aim_gt, cand_index[top])
    items = np.union1d(cand_index, rows)
    affinity = np.bincount(np.searchsorted(items, rows), weights=values * np.repeat(weights, lengths),
                           minlength=len(items))
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


def sgr_distance(euclid: np.ndarray, graph: NeighbourGraph, schedule: SGRSchedule, lam: float, topk: int) -> np.ndarray:
    """SIM graph reasoning for one query row (``graph_reasoning``, in place and sequential):
    ``D[j] = mean of the topk smallest (D[N_j] + λ·E_gg[j, N_j])`` over the 20 gallery
    neighbours ``N_j`` of j, evaluated level by level (:class:`SGRSchedule`)."""
    neighbours = graph.index[:, :SGR_NEIGHBOURS]
    gallery_dist = lam * np.sqrt(np.maximum(2.0 - 2.0 * graph.sim[:, :SGR_NEIGHBOURS].astype(np.float64), 0.0))
    topk = min(topk, neighbours.shape[1])
    updated = euclid.astype(np.float64, copy=True)
    for start, end in zip(schedule.bounds[:-1], schedule.bounds[1:]):
        cols = schedule.order[start:end]
        nb = neighbours[cols]
        values = np.where(nb < cols[:, None], updated[nb], euclid[nb]) + gallery_dist[cols]
        updated[cols] = np.partition(values, topk - 1, axis=1)[:, :topk].mean(axis=1)
    return updated


def mnnr_distance(dist: np.ndarray, structures: GalleryStructures, k0: int, lam: float) -> np.ndarray:
    """SIM's MNNR for one query row ``dist`` (Euclidean, or SGR output): the query vector holds
    its top-(k0+1) gallery items (no reciprocity), the gallery vectors are k-reciprocal;
    ``final = (1 − λ)·d_J + λ·A_q`` with ``A_q = dist² / max dist²``."""
    sq = dist.astype(np.float64) ** 2
    a_q = sq / max(float(sq.max()), 1e-12)
    top = _top_indices(a_q, k0 + 1, largest=False)
    w = np.exp(-a_q[top])
    vq = w / w.sum()
    return (1.0 - lam) * _jaccard_with_gallery(structures.mnnr_vt, top, vq, dist.shape[0]) + lam * a_q


def krr_distance(sim: np.ndarray, structures: GalleryStructures, k1: int, k2: int, lam: float) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al. CVPR 2017) for one query joining the gallery pool.

    The query's set: gallery items among its top-k1 that have it among their own top-k1
    (its distance beats their k1-th gallery neighbour), weighted ``exp(-A)`` with the query itself
    (distance 0) in the set; query expansion averages with its top-(k2−1) gallery vectors;
    ``final = (1 − λ)·d_J + λ·A_q``.
    """
    graph = structures.graph
    g = sim.shape[0]
    sq = np.maximum(2.0 - 2.0 * sim.astype(np.float64), 0.0)
    a_q = sq / max(float(sq.max()), 1e-12)
    forward = _top_indices(sim, k1, largest=True)
    kth = graph.sim[forward, min(k1, graph.k - 1)]
    members = forward[sim[forward] > kth]
    w = np.exp(-a_q[members])
    total = 1.0 + w.sum()                       # the query itself: exp(-0) = 1, not a gallery column
    cols, vq = members, w / total
    if k2 > 1:
        nearest = forward[np.argsort(-sim[forward])][: k2 - 1]
        expanded = np.asarray(structures.mnnr_v[nearest].sum(axis=0)).ravel()
        expanded[cols] += vq
        expanded /= float(len(nearest) + 1)
        cols = np.flatnonzero(expanded)
        vq = expanded[cols]
    return (1.0 - lam) * _jaccard_with_gallery(structures.krr_vt, cols, vq, g) + lam * a_q


def rerank_distance(query: np.ndarray, feats: np.ndarray | torch.Tensor, structures: GalleryStructures,
                    method: str, params: RerankParams) -> np.ndarray:
    """Distance (smaller = closer) of one L2-normalised query to every gallery item."""
    if method not in RERANK_METHODS:
        raise InputError(f"unknown re-ranking {method!r}; choose one of {', '.join(RERANK_METHODS)}")
    sim = gallery_similarity(query, feats)
    if method == "plain":
        return -sim
    if method == "aim":
        return aim_distance(sim, structures, params.aim_k1)
    euclid = np.sqrt(np.maximum(2.0 - 2.0 * sim, 0.0))
    if method == "mnnr":
        return mnnr_distance(euclid, structures, params.mnnr_k0, params.mnnr_lambda)
    if method == "sim":
        sgr = sgr_distance(euclid, structures.graph, structures.sgr, params.sgr_lambda, params.sgr_topk)
        return mnnr_distance(sgr, structures, params.mnnr_k0, params.mnnr_lambda)
    return krr_distance(sim, structures, params.reciprocal_k1, params.krr_k2, params.krr_lambda)


def gallery_similarity(query: np.ndarray, feats: np.ndarray | torch.Tensor) -> np.ndarray:
    """Cosine similarities ``g·q`` (float64) — the O(G·d) pass, run by torch (its thread pool
    stays efficient under load, unlike a multi-threaded BLAS matvec). ``feats`` may be a
    float16 tensor: half the memory traffic, similarities within ~1e-3."""
    gallery = feats if isinstance(feats, torch.Tensor) else torch.from_numpy(feats)
    with torch.no_grad():
        return (gallery @ torch.from_numpy(np.ascontiguousarray(query)).to(gallery.dtype)).double().numpy()


def top_k(dist: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` smallest distances, in increasing order (ties by index)."""
    part = _top_indices(dist, k, largest=False)
    return part[np.lexsort((part, dist[part]))]
