"""SIM: similarity graph reasoning (SGR) and mutual nearest-neighbour reasoning (MNNR).

Jia et al., "A Similarity Inference Metric for RGB-Infrared Cross-Modality Person
Re-identification", IJCAI 2020.  Both use only gallery–gallery similarities (one modality,
so reliable) to correct the cross-modality query–gallery distance.  Equation numbers are the
paper's; its audit, paper against public code, is ``docs/methods/sim.md``.

Layout: SGR treats every query row independently (its sequential reference update too), so it
runs over blocks of queries; inside a block it works on the transposed distance ``(G, B)`` so
that gathering the k_graph neighbour columns of a gallery item is a contiguous row gather.
The K shortest paths of every (query, gallery) pair come from a pruned sorting network,
unrolled into a compiled (numba) loop over the pairs.  Only one Q×G array (the output) exists.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp

from vireid.retrieval.exact import (
    WORKER_THREADS, NeighbourGraph, block_rows, check_variant, euclidean_from_similarity, l2_normalize,
    resolve_dtype, top_k_neighbours, topk_smallest,
)
from vireid.retrieval.graph import expanded_k_reciprocal_sets
from vireid.retrieval.kreciprocal import blend_jaccard, reciprocal_vectors, shared_mass

SGR_COLUMNS_PER_TASK = 64
"""Gallery columns one worker thread computes per task in SGR's compiled loop."""


def sgr(query_feat: np.ndarray, gallery_feat: np.ndarray, *, lam: float = 0.01, K: int = 9, k_graph: int = 20,
        variant: str = "paper", dtype: object = np.float32) -> np.ndarray:
    """SIM Eq. 1–5 (SGR): d_S(q, g_j) = mean of the K shortest paths q → g_n → g_j, n ∈ N(g_j, k_graph).

    Edges (Eq. 1): ``d(q, g_n)`` and ``λ·d(g_n, g_j)`` (Euclidean distances of L2-normalised
    features); the triangle inequality (Eq. 3) reduces the shortest paths (Eq. 2) to two hops
    (Eq. 4), the direct edge being the path through n = j; Eq. 5 averages the K shortest, and
    only the k_graph nearest gallery neighbours of g_j are kept (Sec. 3.2, Algorithm 1).  ``paper`` computes every column
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
    """SIM Eq. 6–8 (MNNR): ``α·d + (1 − α)·d_M`` with ``d`` the Euclidean distance and ``d_M`` the
    Jaccard distance of the query's kq nearest gallery items (Eq. 6) and each gallery item's
    expanded kg-reciprocal set (Eq. 7; ``paper`` counts the sets, ``reference`` weighs them as SIM's
    ``re_ranking`` does, see :func:`_mnnr`)."""
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
    """SIM Algorithm 1: SGR (Eq. 1–5), then MNNR (Eq. 6–8) on the SGR distance d_S:
    ``d_SIM = α·d_S + (1 − α)·d_M`` (Eq. 8), the query's nearest neighbours ranked by d_S (Eq. 6)."""
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
    levels = _update_levels(neighbours) if variant == "reference" else None
    out = np.empty((len(qn), len(gn)), dtype=qn.dtype)
    with ThreadPoolExecutor(WORKER_THREADS) as pool:
        for part in block_rows(len(qn), len(gn)):
            if levels is not None:
                source = np.empty((2 * len(gn), part.stop - part.start), dtype=qn.dtype)   # [updated; input]
                euclidean_from_similarity(np.matmul(gn, qn[part].T, out=source[: len(gn)]))
                source[len(gn):] = source[: len(gn)]
                out[part] = _sgr_sequential(source, neighbours, edge, K, levels, pool).T
            else:
                dist_t = euclidean_from_similarity(gn @ qn[part].T)          # (G, B)
                _mean_of_shortest_paths(dist_t, neighbours, edge, K, _transposed_into(out[part]), pool)
    return out


def _transposed_into(destination: np.ndarray) -> Callable[[slice, np.ndarray], None]:
    """A ``store`` for :func:`_mean_of_shortest_paths` writing gallery columns of ``destination`` (B, G)."""
    def store(columns: slice, mean: np.ndarray) -> None:
        destination[:, columns] = mean.T

    return store


def _update_levels(neighbours: np.ndarray) -> list[np.ndarray]:
    """Gallery columns grouped so that a column's neighbours n < j all lie in earlier groups (in order)."""
    level = np.zeros(len(neighbours), dtype=np.int64)
    for j, hood in enumerate(neighbours):
        earlier = hood[hood < j]
        if len(earlier):
            level[j] = level[earlier].max() + 1
    order = np.argsort(level, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(level[order])) + 1)


def _sgr_sequential(source: np.ndarray, neighbours: np.ndarray, edge: np.ndarray, K: int,
                    levels: list[np.ndarray], pool: ThreadPoolExecutor) -> np.ndarray:
    """SIM ``graph_reasoning`` on ``source`` (2G, B), both halves holding the input distances:
    column j, updated in gallery order, reads the updated values of its neighbours n < j (first
    half, overwritten) and the input values of n >= j (second half); returns the first half.

    The columns of one of :func:`_update_levels`' groups read no column of their own group, so
    each group is one pass of :func:`_mean_of_shortest_paths`.
    """
    num_gallery = len(neighbours)
    rows = np.where(neighbours < np.arange(num_gallery)[:, None], neighbours, neighbours + num_gallery)
    for columns in levels:
        def store(part: slice, mean: np.ndarray, columns: np.ndarray = columns) -> None:
            source[columns[part]] = mean

        _mean_of_shortest_paths(source, rows[columns], edge[columns], K, store, pool)
    return source[:num_gallery]


def _mean_of_shortest_paths(source: np.ndarray, rows: np.ndarray, edge: np.ndarray, K: int,
                            store: Callable[[slice, np.ndarray], None], pool: ThreadPoolExecutor) -> None:
    """SIM Eq. 5 for c = 0, 1, …: the mean of the K smallest of ``source[rows[c, i]] + edge[c, i]``
    over i (each a row of B path lengths), handed to ``store(columns, mean)`` in blocks of c.

    The K smallest come from :func:`smallest_sorted_network`, compiled per (k_graph, K) by
    :func:`_shortest_path_kernel`; they are summed in ascending order and divided by K.
    """
    kernel = _shortest_path_kernel(rows.shape[1], K)
    rows = np.ascontiguousarray(rows)
    edge = np.ascontiguousarray(edge, dtype=source.dtype)

    def update(start: int) -> None:
        stop = min(start + SGR_COLUMNS_PER_TASK, len(rows))
        mean = np.empty((stop - start, source.shape[1]), dtype=source.dtype)
        kernel(source, rows, edge, start, stop, mean)
        store(slice(start, stop), mean)

    list(pool.map(update, range(0, len(rows), SGR_COLUMNS_PER_TASK)))


@functools.lru_cache(maxsize=16)
def _shortest_path_kernel(k_graph: int, K: int) -> Callable[..., None]:
    """``kernel(source, rows, edge, start, stop, out)``: for columns c in [start, stop) and every
    b, ``out[c - start, b]`` = the mean of the K smallest ``source[rows[c, i], b] + edge[c, i]``.

    numba compiles Python source generated from :func:`smallest_sorted_network`: one local
    variable per wire, the network's min/max steps written out, so each (c, b) pair runs in
    registers and the loop over b vectorises (no per-pass array traffic).  It releases the GIL.
    """
    import numba

    namespace: dict[str, object] = {}
    exec(compile(_kernel_source(k_graph, K), f"<SGR kernel k_graph={k_graph} K={K}>", "exec"), namespace)
    return numba.njit(nogil=True)(namespace["shortest_path_means"])


def _kernel_source(k_graph: int, K: int) -> str:
    """The source of :func:`_shortest_path_kernel`'s loop for one (k_graph, K)."""
    body = [f"            w{i} = r{i}[b] + e{i}" for i in range(k_graph)]
    wires = [f"w{i}" for i in range(1 << max(0, (k_graph - 1).bit_length()))]
    for step, (op, low, high) in enumerate(smallest_sorted_network(k_graph, K)):
        a, b = wires[low], wires[high]
        if op in ("cmp", "min"):
            body.append(f"            lo{step} = min({a}, {b})")
            wires[low] = f"lo{step}"
        if op in ("cmp", "max"):
            body.append(f"            hi{step} = max({a}, {b})")
            wires[high] = f"hi{step}"
        if op == "move":
            wires[low], wires[high] = b, a
    total = wires[0]
    for m in range(1, K):
        body.append(f"            sum{m} = {total} + {wires[m]}")
        total = f"sum{m}"
    body.append(f"            row[b] = {total} / {K}")
    head = ["def shortest_path_means(source, rows, edge, start, stop, out):",
            "    for c in range(start, stop):"]
    head += [f"        r{i} = source[rows[c, {i}]]\n        e{i} = edge[c, {i}]" for i in range(k_graph)]
    head += ["        row = out[c - start]", "        for b in range(source.shape[1]):"]
    return "\n".join(head + body) + "\n"


@functools.lru_cache(maxsize=64)
def smallest_sorted_network(n: int, k: int) -> tuple[tuple[str, int, int], ...]:
    """Steps that leave the ``k`` smallest of ``n`` wires on wires ``0..k−1``, ascending.

    Batcher's odd–even merge sort (Knuth, TAOCP 5.3.4, Algorithm M) on ``n`` padded to a power
    of two with +inf wires, pruned: comparators with a +inf input only move (``"move"``), and
    walking back from the ``k`` outputs, a comparator whose larger (smaller) output is never read
    again keeps only its ``"min"`` (``"max"``); ``"cmp"`` keeps both.  (20, 9): 161 min/max passes.
    """
    size = 1 << max(0, (n - 1).bit_length())
    infinite = [wire >= n for wire in range(size)]
    steps: list[tuple[str, int, int]] = []
    for low, high in _batcher_comparators(size):
        if infinite[high]:
            continue
        if infinite[low]:
            infinite[low], infinite[high] = False, True
            steps.append(("move", low, high))
        else:
            steps.append(("cmp", low, high))
    needed = set(range(k))
    kept: list[tuple[str, int, int]] = []
    for op, low, high in reversed(steps):
        if op == "move":
            if low in needed:
                needed.discard(low)
                needed.add(high)
                kept.append((op, low, high))
        elif low in needed and high in needed:
            kept.append(("cmp", low, high))
        elif low in needed:
            needed.add(high)
            kept.append(("min", low, high))
        elif high in needed:
            needed.add(low)
            kept.append(("max", low, high))
    return tuple(reversed(kept))


def _batcher_comparators(size: int) -> list[tuple[int, int]]:
    """Comparators ``(low, high)`` of Batcher's odd–even merge sort of ``size`` (a power of two) wires."""
    if size < 2:
        return []
    bits = (size - 1).bit_length()
    comparators = []
    p = 1 << (bits - 1)
    while p > 0:
        q, r, d = 1 << (bits - 1), 0, p
        while d > 0:
            comparators += [(i, i + d) for i in range(size - d) if i & p == r]
            d, q, r = q - p, q >> 1, p
        p >>= 1
    return comparators


def _mnnr(dist: np.ndarray, gn: np.ndarray, gallery: NeighbourGraph, kq: int, kg: int, alpha: float,
          variant: str) -> np.ndarray:
    """MNNR on a query–gallery distance ``dist`` (Q, G), overwritten with the result and returned.

    ``paper`` (SIM Eq. 6–8): N^c(q) = the query's kq nearest gallery items by ``dist`` (Eq. 6),
    R*(g) = the gallery item's expanded kg-reciprocal set (itself included),
    ``d_M = 1 − |N^c ∩ R*| / |N^c ∪ R*|`` on set sizes (Eq. 7), ``α·dist + (1 − α)·d_M`` (Eq. 8).
    ``reference`` (SIM ``re_ranking``): squared distances divided by their row maximum; the
    query's plain top-(kq+1) gallery items; Gaussian vectors normalised to sum 1 over the sets;
    ``1 − m/(2 − m)`` with ``m = Σ min``; ``(1 − α) d_J + α d²/max``.
    """
    reference = variant == "reference"
    if reference:
        gallery_vectors = reciprocal_vectors(gn, gallery, kg, row_scale=gallery.max_squared_distance(),
                                             squared=True, normalize=True)
        gallery_sizes = None
    else:
        gallery_vectors = expanded_k_reciprocal_sets(gallery, kg)
        gallery_sizes = np.diff(gallery_vectors.indptr).astype(np.float64)
    right = gallery_vectors.tocsc()
    num_query, num_gallery = dist.shape
    width = kq + 1 if reference else kq
    for part in block_rows(num_query, num_gallery):
        block = np.ascontiguousarray(dist[part])
        if reference:
            np.square(block, out=block)
            block /= block.max(axis=1, keepdims=True)
        near_dist, near = topk_smallest(block, width)
        if reference:
            weight = np.exp(-near_dist)
            weight /= weight.sum(axis=1, keepdims=True)
        else:
            weight = np.ones_like(near_dist)
        rows = near.shape[0]
        order = np.argsort(near, axis=1)
        query_vectors = sp.csr_matrix(
            (np.take_along_axis(weight, order, axis=1).ravel(), np.take_along_axis(near, order, axis=1).ravel(),
             np.arange(0, rows * width + 1, width)), shape=(rows, num_gallery))
        mass = shared_mass(query_vectors, right)
        if reference:
            dist[part] = blend_jaccard(block, mass, alpha)
        else:
            dist[part] = blend_jaccard(block, mass, alpha, np.full(rows, float(width)), gallery_sizes)
    return dist
