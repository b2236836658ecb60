"""SIM: similarity graph reasoning (SGR) and mutual nearest-neighbour reasoning (MNNR).

Jia et al., "A Similarity Inference Metric for RGB-Infrared Cross-Modality Person
Re-identification", IJCAI 2020.  Both use only gallery–gallery similarities (one modality,
so reliable) to correct the cross-modality query–gallery distance.

Layout: SGR treats every query row independently (its sequential reference update too), so it
runs over blocks of queries; inside a block it works on the transposed distance ``(G, B)`` so
that gathering the k_graph neighbour columns of a gallery item is a contiguous row gather.
Only one Q×G array (the output) exists.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp

from vireid.retrieval.exact import (
    WORKER_THREADS, NeighbourGraph, block_rows, check_variant, euclidean_from_similarity, l2_normalize,
    resolve_dtype, top_k_neighbours, topk_smallest,
)
from vireid.retrieval.kreciprocal import blend_jaccard, reciprocal_vectors, shared_mass

SGR_PATH_ELEMENTS = 1 << 18
"""Path lengths gathered at once by the order-independent SGR (1 MiB in float32: stays in cache)."""


def sgr(query_feat: np.ndarray, gallery_feat: np.ndarray, *, lam: float = 0.01, K: int = 9, k_graph: int = 20,
        variant: str = "paper", dtype: object = np.float32) -> np.ndarray:
    """SIM Eq. 1–5 (SGR): d'(q, g_j) = mean of the K shortest paths q → g_n → g_j, n ∈ N(g_j, k_graph).

    A path's length is ``d(q, g_n) + λ·d(g_n, g_j)`` (Euclidean distances of L2-normalised
    features; the direct edge is the path through n = j).  ``paper`` computes every column
    from the input distances (independent of gallery order); ``reference`` reproduces SIM's
    ``graph_reasoning``, which overwrites columns in gallery order, so later columns read
    already-updated ones.
    """
    check_variant(variant)
    dt = resolve_dtype(dtype)
    qn = l2_normalize(query_feat, dt, name="query features")
    gn = l2_normalize(gallery_feat, dt, name="gallery features")
    gallery = top_k_neighbours(gn, gn, k_graph, self_graph=True)
    return _sgr(qn, gn, gallery, lam, K, k_graph, variant)


def mnnr(query_feat: np.ndarray, gallery_feat: np.ndarray, *, kq: int = 12, kg: int = 20, alpha: float = 0.3,
         variant: str = "paper", dtype: object = np.float32) -> np.ndarray:
    """SIM Eq. 6–8 (MNNR): Jaccard distance of the query's kq nearest gallery items and each
    gallery item's kg-reciprocal set, mixed with the input distance by ``alpha``."""
    check_variant(variant)
    dt = resolve_dtype(dtype)
    qn = l2_normalize(query_feat, dt, name="query features")
    gn = l2_normalize(gallery_feat, dt, name="gallery features")
    gallery = top_k_neighbours(gn, gn, kg + 1, self_graph=True)
    dist = np.empty((len(qn), len(gn)), dtype=dt)
    for part in block_rows(len(qn), len(gn)):
        np.matmul(qn[part], gn.T, out=dist[part])
        euclidean_from_similarity(dist[part])
    return _mnnr(dist, gn, gallery, kq, kg, alpha, variant)


def sim(query_feat: np.ndarray, gallery_feat: np.ndarray, *, lam: float = 0.01, K: int = 9, k_graph: int = 20,
        kq: int = 12, kg: int = 20, alpha: float = 0.3, variant: str = "paper",
        dtype: object = np.float32) -> np.ndarray:
    """SIM Eq. 8: MNNR applied to the SGR distance (``alpha`` weighs the SGR distance)."""
    check_variant(variant)
    dt = resolve_dtype(dtype)
    qn = l2_normalize(query_feat, dt, name="query features")
    gn = l2_normalize(gallery_feat, dt, name="gallery features")
    gallery = top_k_neighbours(gn, gn, max(k_graph, kg + 1), self_graph=True)
    return _mnnr(_sgr(qn, gn, gallery, lam, K, k_graph, variant), gn, gallery, kq, kg, alpha, variant)


def _sgr(qn: np.ndarray, gn: np.ndarray, gallery: NeighbourGraph, lam: float, K: int, k_graph: int,
         variant: str) -> np.ndarray:
    """SGR of every query row, blocked over queries; returns the (Q, G) distance."""
    neighbours = gallery.index[:, :k_graph]
    edge = euclidean_from_similarity(gallery.sim[:, :k_graph].copy())
    edge[:, 0] = 0
    edge *= lam
    out = np.empty((len(qn), len(gn)), dtype=qn.dtype)
    for part in block_rows(len(qn), len(gn)):
        dist_t = euclidean_from_similarity(gn @ qn[part].T)          # (G, B)
        if variant == "reference":
            _sgr_sequential(dist_t, neighbours, edge, K)
            out[part] = dist_t.T
        else:
            out[part] = _sgr_simultaneous(dist_t, neighbours, edge, K).T
    return out


def _sgr_sequential(dist_t: np.ndarray, neighbours: np.ndarray, edge: np.ndarray, K: int) -> None:
    """SIM ``graph_reasoning``: gallery columns overwritten in place, in gallery order."""
    for j in range(len(dist_t)):
        paths = dist_t[neighbours[j]]
        paths += edge[j][:, None]
        paths.sort(axis=0)
        dist_t[j] = paths[:K].mean(axis=0)


def _sgr_simultaneous(dist_t: np.ndarray, neighbours: np.ndarray, edge: np.ndarray, K: int) -> np.ndarray:
    """SIM Eq. 5 for every gallery column from the input distances, in column blocks over two threads."""
    out = np.empty_like(dist_t)
    step = max(1, SGR_PATH_ELEMENTS // (neighbours.shape[1] * dist_t.shape[1]))

    def update(start: int) -> None:
        stop = min(start + step, len(dist_t))
        paths = dist_t[neighbours[start:stop]]
        paths += edge[start:stop, :, None]
        paths.sort(axis=1)
        out[start:stop] = paths[:, :K].mean(axis=1)

    with ThreadPoolExecutor(WORKER_THREADS) as pool:
        list(pool.map(update, range(0, len(dist_t), step)))
    return out


def _mnnr(dist: np.ndarray, gn: np.ndarray, gallery: NeighbourGraph, kq: int, kg: int, alpha: float,
          variant: str) -> np.ndarray:
    """MNNR on a query–gallery distance ``dist`` (Q, G), overwritten with the result and returned.

    ``reference`` (SIM ``re_ranking``): squared distances divided by their row maximum; the
    query's plain top-(kq+1) gallery items; normalised Gaussian vectors; ``1 − m/(2 − m)``;
    ``(1 − α) d_J + α d²/max``.  ``paper``: top-kq, ``exp(−d)`` vectors on the distances
    themselves, Σmin/Σmax, ``α d + (1 − α) d_J``.
    """
    reference = variant == "reference"
    row_scale = gallery.max_squared_distance() if reference else None
    gallery_vectors = reciprocal_vectors(gn, gallery, kg, row_scale=row_scale, squared=reference,
                                         normalize=reference)
    gallery_sum = None if reference else np.asarray(gallery_vectors.sum(axis=1)).ravel()
    right = gallery_vectors.tocsc()
    num_query, num_gallery = dist.shape
    width = kq + 1 if reference else kq
    for part in block_rows(num_query, num_gallery):
        block = np.ascontiguousarray(dist[part])
        if reference:
            np.square(block, out=block)
            block /= block.max(axis=1, keepdims=True)
        near_dist, near = topk_smallest(block, width)
        weight = np.exp(-near_dist)
        if reference:
            weight /= weight.sum(axis=1, keepdims=True)
        rows = near.shape[0]
        order = np.argsort(near, axis=1)
        query_vectors = sp.csr_matrix(
            (np.take_along_axis(weight, order, axis=1).ravel(), np.take_along_axis(near, order, axis=1).ravel(),
             np.arange(0, rows * width + 1, width)), shape=(rows, num_gallery))
        mass = shared_mass(query_vectors, right)
        if reference:
            dist[part] = blend_jaccard(block, mass, alpha)
        else:
            dist[part] = blend_jaccard(block, mass, alpha, weight.sum(axis=1), gallery_sum)
    return dist
