"""k-reciprocal encoding and Jaccard distance on sparse sets; k-reciprocal re-ranking (``krr``).

Zhong et al., "Re-ranking Person Re-identification with k-reciprocal Encoding", CVPR 2017.
The k-reciprocal sets come from :func:`vireid.retrieval.graph.expanded_k_reciprocal_sets`
(shared with the ranked-list mode); their Gaussian-kernel vectors ``V`` are sparse CSR rows and
the Jaccard distance is a sparse "min-product" over an inverted index (CSC columns), so the
cost is O(Q · nnz(V_q) · nnz(column)) instead of the references' dense (Q+G)² matrices.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from vireid.errors import InputError
from vireid.retrieval.exact import (
    NeighbourGraph, block_rows, check_variant, graph_pair_similarity, l2_normalize, resolve_dtype,
    self_top_k_neighbours, squared_distance_from_similarity, top_k_neighbours, topk_smallest,
)
from vireid.retrieval.graph import expanded_k_reciprocal_sets

JOIN_ELEMENTS = 1 << 20
"""Joined (query entry × inverted-index entry) pairs per block of :func:`shared_mass`."""


def csr_rows(pattern: sp.csr_matrix) -> np.ndarray:
    """Row index of every stored entry of a CSR matrix."""
    return np.repeat(np.arange(pattern.shape[0]), np.diff(pattern.indptr))


def gaussian_vectors(pattern: sp.csr_matrix, distance: np.ndarray, *, normalize: bool) -> sp.csr_matrix:
    """Zhong Eq. 7: ``V[i, j] = exp(−d(i, j))`` on the pattern's entries; ``normalize``: rows sum to 1.

    ``distance`` holds d for every stored entry of ``pattern`` (CSR order).
    """
    weight = np.exp(-distance)
    if normalize:
        sums = np.add.reduceat(weight, pattern.indptr[:-1]) if len(weight) else weight
        weight = weight / np.repeat(sums, np.diff(pattern.indptr))
    return sp.csr_matrix((weight, pattern.indices.copy(), pattern.indptr.copy()), shape=pattern.shape)


def local_expansion(vectors: sp.csr_matrix, neighbours: np.ndarray) -> sp.csr_matrix:
    """Zhong Eq. 11 (local query expansion): row i ← mean of the rows of its ``k2`` listed neighbours.

    ``neighbours`` ``(n, k2)``: the rows averaged for each row (itself first in a self graph).
    """
    n, k2 = neighbours.shape
    mean = sp.csr_matrix(
        (np.full(n * k2, 1.0 / k2, dtype=vectors.dtype), neighbours.ravel(), np.arange(0, n * k2 + 1, k2)),
        shape=(n, vectors.shape[0]),
    )
    out = (mean @ vectors).tocsr()
    out.sort_indices()
    return out


def shared_mass(left: sp.csr_matrix, right_columns: sp.csc_matrix) -> sp.csr_matrix:
    """Sparse ``m[i, j] = Σ_k min(left[i, k], right[j, k])`` (float64) through right's inverted index.

    ``right_columns`` is the right matrix (rows j) in CSC form: column k lists the rows j with
    ``right[j, k] ≠ 0``, so only the pairs sharing a support column are touched; the result
    holds exactly those pairs, duplicates summed.
    """
    num_left, num_right = left.shape[0], right_columns.shape[0]
    col_ptr = right_columns.indptr
    per_entry = col_ptr[left.indices + 1] - col_ptr[left.indices]
    per_row = np.bincount(np.repeat(np.arange(num_left), np.diff(left.indptr)), weights=per_entry,
                          minlength=num_left).astype(np.int64)  # empty rows (first, last, any) give 0
    parts = []
    start = 0
    while start < num_left:
        stop = start + 1
        budget = per_row[start]
        while stop < num_left and budget + per_row[stop] <= JOIN_ELEMENTS:
            budget += per_row[stop]
            stop += 1
        lo, hi = left.indptr[start], left.indptr[stop]
        counts = per_entry[lo:hi]
        total = int(counts.sum())
        entry_row = np.repeat(np.arange(stop - start), np.diff(left.indptr[start:stop + 1]))
        first = np.repeat(col_ptr[left.indices[lo:hi]], counts)
        pos = first + (np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts))
        mins = np.minimum(np.repeat(left.data[lo:hi], counts), right_columns.data[pos]).astype(np.float64)
        block = sp.coo_matrix((mins, (np.repeat(entry_row, counts), right_columns.indices[pos])),
                              shape=(stop - start, num_right)).tocsr()
        block.sum_duplicates()
        parts.append(block)
        start = stop
    if not parts:
        return sp.csr_matrix((num_left, num_right), dtype=np.float64)
    return sp.vstack(parts, format="csr")


def jaccard_from_mass(mass: np.ndarray, left_sum: np.ndarray | None = None,
                      right_sum: np.ndarray | None = None) -> np.ndarray:
    """Zhong Eq. 10: ``d_J = 1 − Σmin / Σmax`` with ``Σmax = Σ_l + Σ_r − Σmin``, in place on ``mass``.

    Without sums the vectors are taken as normalised (Σ = 1), i.e. ``1 − m / (2 − m)`` as coded
    in the references.
    """
    if left_sum is None or right_sum is None:
        denominator = 2.0 - mass
    else:
        denominator = left_sum[:, None] + right_sum[None, :] - mass
    np.divide(mass, denominator, out=mass)
    np.subtract(1.0, mass, out=mass)
    return mass


def blend_jaccard(original: np.ndarray, mass: sp.csr_matrix, original_weight: float,
                  left_sum: np.ndarray | None = None, right_sum: np.ndarray | None = None) -> np.ndarray:
    """In place on ``original``: ``w·d + (1 − w)·d_J`` (Zhong Eq. 12, SIM Eq. 8) with d_J as in
    :func:`jaccard_from_mass`; pairs outside the sparse ``mass`` (m = 0, d_J = 1) cost one pass."""
    rows, cols, overlap = csr_rows(mass), mass.indices, mass.data
    if left_sum is None or right_sum is None:
        jaccard = 1.0 - overlap / (2.0 - overlap)
    else:
        jaccard = 1.0 - overlap / (left_sum[rows] + right_sum[cols] - overlap)
    kept = original[rows, cols]
    original *= original_weight
    original += 1 - original_weight
    original[rows, cols] = (1 - original_weight) * jaccard + original_weight * kept
    return original


def reciprocal_vectors(features: np.ndarray, graph: NeighbourGraph, k: int, *,
                       row_scale: np.ndarray | None, squared: bool, normalize: bool) -> sp.csr_matrix:
    """Gaussian vectors over the expanded k-reciprocal sets R*(i) of a self graph (Zhong Eq. 4–7).

    The distance in the kernel is ``‖a − b‖²`` when ``squared`` (else ``‖a − b‖``), divided by
    ``row_scale[i]`` when given (the references divide squared distances by the row maximum).
    """
    pattern = expanded_k_reciprocal_sets(graph, k).tocsr()
    pattern.sort_indices()
    rows = csr_rows(pattern)
    cols = pattern.indices
    dist = squared_distance_from_similarity(graph_pair_similarity(features, graph, rows, cols))
    dist[rows == cols] = 0
    if not squared:
        np.sqrt(dist, out=dist)
    if row_scale is not None:
        dist /= row_scale[rows]
    return gaussian_vectors(pattern, dist, normalize=normalize)


def krr(query_feat: np.ndarray, gallery_feat: np.ndarray, *, k1: int = 20, k2: int = 6, lam: float = 0.3,
        variant: str = "reference", dtype: object = np.float32) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al. 2017, Eq. 12: ``(1 − λ) d_J + λ d``), Q×G distance.

    ``reference`` reproduces ``re_ranking_ranklist.py``: queries and gallery form one pool of
    Q+G items; squared distances divided by their row maximum; k1-reciprocal sets with the
    2/3 expansion; normalised Gaussian vectors; local query expansion over the top-``k2``
    (self included); Jaccard over all pool columns.  ``paper`` keeps queries out of each
    other's neighbourhoods (pool = gallery + the one probe), uses plain Euclidean distances,
    unnormalised ``exp(−d)`` vectors and Σmin/Σmax (Eq. 7, 10, 12).
    """
    check_variant(variant)
    dt = resolve_dtype(dtype)
    qn = l2_normalize(query_feat, dt, name="query features")
    gn = l2_normalize(gallery_feat, dt, name="gallery features")
    if variant == "reference":
        pool = np.concatenate([qn, gn])
        del qn, gn
        return _krr_reference(pool, len(query_feat), k1, k2, lam)
    return _krr_paper(qn, gn, k1, k2, lam)


def _krr_reference(pool: np.ndarray, num_query: int, k1: int, k2: int, lam: float) -> np.ndarray:
    """``pool`` = [queries; gallery], normalised."""
    num_gallery = len(pool) - num_query
    out = np.empty((num_query, num_gallery), dtype=pool.dtype)
    graph = pool_neighbours(pool, num_query, max(k1 + 1, k2), out)
    row_max = graph.max_squared_distance()
    vectors = reciprocal_vectors(pool, graph, k1, row_scale=row_max, squared=True, normalize=True)
    if k2 != 1:
        vectors = local_expansion(vectors, graph.index[:, :k2])
    left = vectors[:num_query].tocsr()
    right = vectors[num_query:].tocsc()
    for part in block_rows(num_query, num_gallery):
        original = squared_distance_from_similarity(out[part])
        original /= row_max[part, None]
        blend_jaccard(original, shared_mass(left[part], right), lam)
    return out


def pool_neighbours(pool: np.ndarray, num_query: int, k: int, query_gallery: np.ndarray) -> NeighbourGraph:
    """Self graph of the pool [queries; gallery] (self first), filling ``query_gallery`` (Q, G) with
    ``Q·Gᵀ`` from the same blocks: each pool similarity is computed once."""
    def keep_query_gallery(rows: slice, block: np.ndarray) -> None:
        if rows.start < num_query:
            stop = min(rows.stop, num_query)
            query_gallery[rows.start:stop] = block[: stop - rows.start, num_query - rows.start:]

    if not 1 <= k <= len(pool):
        raise InputError(f"k={k} must lie in [1, {len(pool)}] (the query+gallery pool)")
    return self_top_k_neighbours(pool, k, on_block=keep_query_gallery)


def _krr_paper(qn: np.ndarray, gn: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """Per probe p the pool is G ∪ {p}; gallery sets are taken within G (p changes them by one item at most)."""
    num_query, num_gallery = len(qn), len(gn)
    half = int(np.around(k1 / 2.0))
    gallery = top_k_neighbours(gn, gn, max(k1 + 1, k2), self_graph=True)
    gallery_base = reciprocal_vectors(gn, gallery, k1, row_scale=None, squared=False, normalize=False)
    half_sets = half_reciprocal_sets(gallery, half)
    gallery_vectors = gallery_base if k2 == 1 else local_expansion(gallery_base, gallery.index[:, :k2])
    gallery_sum = np.asarray(gallery_vectors.sum(axis=1)).ravel()
    right = gallery_vectors.tocsc()
    # p is among the k nearest of g (in G ∪ {p}, g itself first) iff it beats g's k-th other neighbour
    kth_radius = np.sqrt(squared_distance_from_similarity(gallery.sim[:, k1].copy()))
    half_radius = np.sqrt(squared_distance_from_similarity(gallery.sim[:, half].copy()))
    out = np.empty((num_query, num_gallery), dtype=qn.dtype)
    for part in block_rows(num_query, num_gallery):
        dist = np.sqrt(squared_distance_from_similarity(qn[part] @ gn.T))
        probe = _probe_vectors(dist, half_sets, kth_radius, half_radius, k1, k2, gallery_base)
        probe_sum = np.asarray(probe.sum(axis=1)).ravel()
        out[part] = blend_jaccard(dist, shared_mass(probe, right), lam, probe_sum, gallery_sum)
    return out


def half_reciprocal_sets(graph: NeighbourGraph, half: int) -> sp.csr_matrix:
    """The plain (unexpanded) ``half``-reciprocal sets R(g, k/2) of a self graph, as a 0/1 CSR pattern."""
    forward = graph.index[:, : half + 1]
    backward = graph.index[forward, : half + 1]
    mask = (backward == np.arange(len(forward))[:, None, None]).any(axis=2)
    rows = np.broadcast_to(np.arange(len(forward))[:, None], forward.shape)[mask]
    pattern = sp.csr_matrix((np.ones(len(rows)), (rows, forward[mask])), shape=(len(forward), len(forward)))
    pattern.sort_indices()
    return pattern


def _probe_vectors(dist: np.ndarray, half_sets: sp.csr_matrix, kth_radius: np.ndarray, half_radius: np.ndarray,
                   k1: int, k2: int, gallery_vectors: sp.csr_matrix) -> sp.csr_matrix:
    """Zhong Eq. 3–7 and 11 for a block of probes: R*(p), exp(−d) weights, expansion over N(p, k2).

    The probe's own coordinate (weight 1 in its own vector, absent from every gallery vector)
    is left out of V_p.
    """
    num_probe, num_gallery = dist.shape
    near_dist, near = topk_smallest(dist, k1)
    reciprocal = near_dist < kth_radius[near]                              # Eq. 3: p ∈ N(g, k)
    rows, cols = np.nonzero(reciprocal)
    members = near[rows, cols]
    # Eq. 4: add R(g, k/2) of a member g when |R(p, k) ∩ R(g, k/2)| ≥ 2/3 |R(g, k/2)|, where p
    # belongs to R(g, k/2) iff it is within g's half radius and g is among p's k/2 nearest.
    in_set = sp.csr_matrix((np.ones(len(rows)), (rows, members)), shape=(num_probe, num_gallery))
    candidate = half_sets[members]
    overlap = np.asarray(candidate.multiply(in_set[rows]).sum(axis=1)).ravel()
    probe_in_half = (cols < int(np.around(k1 / 2.0))) & (near_dist[rows, cols] < half_radius[members])
    size = np.diff(candidate.indptr) + probe_in_half
    grow = (overlap + probe_in_half) >= (2.0 / 3.0) * size
    grown = candidate[grow].tocoo()
    all_rows = np.concatenate([rows, rows[grow][grown.row]])
    all_cols = np.concatenate([members, grown.col])
    pattern = sp.csr_matrix((np.ones(len(all_rows)), (all_rows, all_cols)), shape=(num_probe, num_gallery))
    pattern.sum_duplicates()
    pattern.sort_indices()
    weights = dist[csr_rows(pattern), pattern.indices]
    vectors = gaussian_vectors(pattern, weights, normalize=False)
    if k2 == 1:
        return vectors
    # Eq. 11: V_p ← mean of V_p and the vectors of its k2 − 1 nearest gallery items
    expanded = vectors.copy()
    for col in range(k2 - 1):
        expanded = expanded + gallery_vectors[near[:, col]]
    return (expanded / k2).tocsr()
