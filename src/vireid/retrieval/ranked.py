"""Ranked-list re-ranking for million-image galleries: per-query top-K of ``aim``, ``sim``, ``krr``.

No dense Q×G (or G×G) matrix exists: the gallery is a :class:`~vireid.retrieval.knn.NeighbourIndex`
and an N×k neighbour graph; the re-ranked distance of a query is computed on its candidates only.
Memory is O((Q+G)·k); queries are processed one at a time against sparse gallery structures.

How each method finds its candidates (``P`` = the query's ``query_k`` nearest gallery items):

* ``aim`` (SAAI, reference variant): the query's thresholded affinity row ``Q'`` has ``k1`` entries
  and every gallery row ``G'`` is sparse, so ``Q'·G'ᵀ`` is a sparse product; its non-zero columns
  plus ``P`` contain the exact top-K (an item with zero affinity ranks by ``−qᵀg`` alone).
* ``krr`` (Zhong et al., reference variant): the pool is query ∪ gallery; the Jaccard term is
  non-zero only where the query's and the item's k-reciprocal vectors share support, found through
  the inverted (column) index; the rest rank by the input distance, so again ``P`` completes them.
  Items whose Jaccard term alone exceeds the K-th distance of ``P`` are skipped before their input
  distance is computed.
* ``sim`` (SGR + MNNR, paper variant): ``P`` is expanded through the gallery graph (forward and
  reverse neighbours of its first ``expand`` items): SGR gives an item a small distance only when
  one of its ``k_graph`` neighbours is near the query. MNNR then adds every item whose
  k-reciprocal set meets the query's ``kq`` nearest (inverted index); the rest rank by SGR.

Approximate neighbour search (``knn`` ``ivf`` / ``hnsw``, or ``auto`` beyond 50,000 items) is
recall-targeted by default (``RankedOptions.recall``, :class:`~vireid.retrieval.knn.RecallTarget`):
each neighbour search measures its recall@k on a sample of rows and raises ``nprobe`` / ``efSearch``
until it reaches 0.99; the choices and the measured recalls come back in :class:`RankedLists`.

With an exact index and ``query_k = G`` the candidates are the whole gallery and the output is the
dense method's top-K (:mod:`vireid.retrieval.aim`, ``.sim``, ``.kreciprocal``; their sparse
k-reciprocal vectors and local expansion are reused here). The k-reciprocal row maxima of squared
distances are taken over a sample of ``sample_size`` pool items (exact when the pool is smaller).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from vireid.errors import InputError
from vireid.progress import progress_bar
from vireid.retrieval.api import resolve_rerank
from vireid.retrieval.exact import euclidean_from_similarity
from vireid.retrieval.graph import (
    NeighbourGraph,
    build_graph,
    expanded_k_reciprocal_sets,
    farthest_similarity,
    reverse_neighbours,
    rows_to_csr,
)
from vireid.retrieval.knn import (
    HnswParams,
    IvfParams,
    NeighbourIndex,
    RecallTarget,
    SearchReport,
    normalise_float32,
)
from vireid.retrieval.kreciprocal import jaccard_from_mass, local_expansion, reciprocal_vectors

RANKED_METHODS: tuple[str, ...] = ("aim", "sim", "krr")
RANKED_VARIANTS: dict[str, tuple[str, ...]] = {
    "aim": ("reference", "paper"),  # identical without exact ties at the k1-th similarity
    "sim": ("paper",),              # the reference SGR updates columns in gallery order
    "krr": ("reference",),
}


@dataclass(frozen=True)
class RankedOptions:
    """Candidate generation and index settings of :func:`rerank_ranked`.

    ``query_k``: nearest gallery items fetched per query (default: ``topk``); ``expand``: how many
    of them ``sim`` expands through the gallery graph; ``sample_size``: items sampled for row maxima;
    ``recall``: the approximate searches' recall target (``None``: the fixed ``ivf`` / ``hnsw``
    parameters, recall not measured).
    """

    knn: str = "auto"
    query_k: int | None = None
    expand: int = 30
    sample_size: int = 2048
    seed: int = 0
    ivf: IvfParams = IvfParams()
    hnsw: HnswParams = HnswParams()
    recall: RecallTarget | None = RecallTarget()
    progress: bool = False


class RankedLists(NamedTuple):
    """Result of :func:`rerank_ranked`: ``ranked_index`` int64 (Q, topk), ``ranked_dist`` float32 (Q, topk),
    closest first, and one :class:`~vireid.retrieval.knn.SearchReport` per neighbour search."""

    ranked_index: np.ndarray
    ranked_dist: np.ndarray
    searches: tuple[SearchReport, ...]

    def knn_summary(self) -> list[dict[str, object]]:
        """The searches as JSON-ready dicts (what the CLI stores in the output's metadata)."""
        return [report.to_dict() for report in self.searches]


def rerank_ranked(
    method: str,
    query_feat: np.ndarray,
    gallery_feat: np.ndarray,
    *,
    topk: int,
    params: Mapping[str, object] | None = None,
    variant: str | None = None,
    preset: str | None = None,
    options: RankedOptions = RankedOptions(),
) -> RankedLists:
    """Per-query top-``topk`` gallery rows and re-ranked distances of ``method``, closest first.

    ``params``, ``variant`` and ``preset`` mean what they mean for the dense methods
    (:func:`vireid.retrieval.api.resolve_rerank`). Returns :class:`RankedLists` (``ranked_index``,
    ``ranked_dist``, and what each neighbour search did: searcher, parameter, measured recall).
    """
    if method not in RANKED_METHODS:
        raise InputError(f"ranked-list mode supports methods {', '.join(RANKED_METHODS)}, not {method!r}")
    n_gallery = int(np.shape(gallery_feat)[0])
    settings = resolve_rerank(method, num_gallery=n_gallery, variant=variant, params=params, preset=preset)
    if settings.variant not in RANKED_VARIANTS[method]:
        raise InputError(f"ranked-list mode implements the {'/'.join(RANKED_VARIANTS[method])} variant of "
                         f"{method}, not {settings.variant!r}")
    p = settings.params
    qn = normalise_float32(query_feat, name="query features")
    gn = normalise_float32(gallery_feat, name="gallery features")
    if qn.shape[1] != gn.shape[1]:
        raise InputError(f"query features have d={qn.shape[1]} but gallery features d={gn.shape[1]}")
    if not isinstance(topk, (int, np.integer)) or not 1 <= topk <= n_gallery:
        raise InputError(f"topk={topk!r} must be an integer in [1, {n_gallery}] (the gallery size)")
    query_k = options.query_k or topk
    if not topk <= query_k <= n_gallery:
        raise InputError(f"query_k={query_k} must lie in [topk={topk}, {n_gallery}]")
    if method == "krr":
        pool = np.concatenate([qn, gn])
        del gn  # the pool holds the only normalised gallery copy
        index = _index(pool, options)
        del pool  # the index holds it
        ranked = _rank_krr(index, len(qn), p, topk, query_k, options)
    else:
        index = _index(gn, options)
        del gn  # the index holds it
        ranked = (_rank_aim if method == "aim" else _rank_sim)(qn, index, p, topk, query_k, options)
    return RankedLists(*ranked, tuple(index.reports))


def _index(base: np.ndarray, options: RankedOptions) -> NeighbourIndex:
    return NeighbourIndex(base, options.knn, ivf=options.ivf, hnsw=options.hnsw, recall=options.recall,
                          seed=options.seed, progress=options.progress)


# --------------------------------------------------------------------------------------- helpers


def _take_topk(cand: np.ndarray, dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` smallest distances, ascending; equal distances ordered by gallery row."""
    if len(cand) > k:  # every entry tied with the k-th stays in the running until the lexsort
        keep = dist <= np.partition(dist, k - 1)[k - 1]
        cand, dist = cand[keep], dist[keep]
    order = np.lexsort((cand, dist))[:k]
    return cand[order], dist[order]


def _csr_rows(matrix: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries of the given rows as flat arrays ``(position in rows, column, value)``."""
    starts = matrix.indptr[rows]
    lengths = matrix.indptr[rows + 1] - starts
    total = int(lengths.sum())
    offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(total)
    return np.repeat(np.arange(len(rows)), lengths), matrix.indices[offsets], matrix.data[offsets]


def _csr_row(matrix: sp.csr_matrix, row: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns and values of one CSR row (views)."""
    span = slice(matrix.indptr[row], matrix.indptr[row + 1])
    return matrix.indices[span], matrix.data[span]


def _normalise_csr_rows(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """Divide every row by its L2 norm (``F.normalize``), in place."""
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    norms = np.sqrt(np.bincount(rows, weights=matrix.data.astype(np.float64) ** 2, minlength=matrix.shape[0]))
    matrix.data /= np.maximum(norms, 1e-12)[rows].astype(matrix.dtype)
    return matrix


def _reciprocal_weights(graph: NeighbourGraph, base: np.ndarray, k: int, *, min_sim: np.ndarray) -> sp.csr_matrix:
    """Zhong Eq. 4–7 vectors over R*(i) in the reference form: squared distances over the row
    maximum (``2 − 2·min_sim``), rows summing to 1."""
    row_max = np.maximum(2.0 - 2.0 * min_sim, 0.0)
    return reciprocal_vectors(base, graph, k, row_scale=row_max, squared=True, normalize=True)


def _jaccard_overlap(weights_t: sp.csr_matrix, support: np.ndarray, support_weight: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Zhong et al. Eq. 10 numerator ``m(j) = Σ_k min(v_q[k], V[j, k])`` for every j sharing support.

    ``weights_t`` is the transposed (inverted) index: row k lists the items j with ``V[j, k] > 0``.
    Returns the items (sorted) and ``m``.
    """
    pos, items, values = _csr_rows(weights_t, support)
    if not len(items):
        return items, np.empty(0, dtype=np.float32)
    unique_items, inverse = np.unique(items, return_inverse=True)
    overlap = np.bincount(inverse, weights=np.minimum(values, support_weight[pos]), minlength=len(unique_items))
    return unique_items, overlap.astype(np.float32)


def _lookup(sorted_keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``values`` at ``queries`` in ``sorted_keys``, 0 where absent."""
    if not len(sorted_keys):
        return np.zeros(len(queries), dtype=np.float32)
    pos = np.minimum(np.searchsorted(sorted_keys, queries), len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == queries, values[pos], 0.0).astype(np.float32)


def _outputs(n_query: int, topk: int) -> tuple[np.ndarray, np.ndarray]:
    return np.empty((n_query, topk), dtype=np.int64), np.empty((n_query, topk), dtype=np.float32)


# ------------------------------------------------------------------------------------------- aim


def _rank_aim(qn: np.ndarray, index: NeighbourIndex, p: Mapping[str, float], topk: int, query_k: int,
              options: RankedOptions) -> tuple[np.ndarray, np.ndarray]:
    """SAAI Eq. 6–10 (reference code): ``−Q′G′ᵀ − qᵀg`` with sparse thresholded affinities."""
    k1, k2 = int(p["k1"]), int(p["k2"])
    gn, n_gallery = index.base, len(index)
    graph_index, graph_sim = index.self_search(max(k1, k2))
    thresholded = rows_to_csr(graph_index[:, :k1], graph_sim[:, :k1], n_gallery)
    gallery_aff = thresholded if k2 == 1 else local_expansion(thresholded, graph_index[:, :k2])
    gallery_aff_t = _normalise_csr_rows(gallery_aff).T.tocsr()
    near_idx, near_sim = index.search(qn, max(query_k, k1), desc="query knn")
    query_aff = _normalise_csr_rows(rows_to_csr(near_idx[:, :k1], near_sim[:, :k1], n_gallery))
    near_idx, near_sim = near_idx[:, :query_k], near_sim[:, :query_k]
    ranked_index, ranked_dist = _outputs(len(qn), topk)
    for i in progress_bar(range(len(qn)), desc="aim re-ranking", enabled=options.progress):
        support, support_aff = _csr_row(query_aff, i)
        pos, items, values = _csr_rows(gallery_aff_t, support)
        items, inverse = np.unique(items, return_inverse=True)
        affinity = np.bincount(inverse, weights=values * support_aff[pos], minlength=len(items)).astype(np.float32)
        near, near_dist = near_idx[i], -_lookup(items, affinity, near_idx[i]) - near_sim[i]
        # an item outside the query's nearest has −qᵀg ≥ −(smallest similarity among them)
        bound = np.partition(near_dist, topk - 1)[topk - 1]
        others = ~np.isin(items, near, assume_unique=True) & (-affinity - near_sim[i, -1] < bound)
        extra = items[others]
        cand = np.concatenate([near, extra])
        dist = np.concatenate([near_dist, -affinity[others] - gn[extra] @ qn[i]])
        ranked_index[i], ranked_dist[i] = _take_topk(cand, dist, topk)
    return ranked_index, ranked_dist


# ------------------------------------------------------------------------------------------- sim


def _sgr_for_items(q: np.ndarray, gn: np.ndarray, items: np.ndarray, nbr: np.ndarray, nbr_dist: np.ndarray,
                   K: int) -> np.ndarray:
    """SIM Eq. 1–5 (order-independent): ``d'(q, j)`` = mean of the K smallest ``d(q, n) + λ·d_g(j, n)``
    over the ``k_graph`` gallery neighbours n of j (``nbr_dist`` is already λ·d_g). Only the query's
    similarities to those neighbours are computed.
    """
    neighbours = nbr[items]
    unique, inverse = np.unique(neighbours, return_inverse=True)
    paths = euclidean_from_similarity(gn[unique] @ q)[inverse.reshape(neighbours.shape)] + nbr_dist[items]
    if K < paths.shape[1]:
        paths = np.partition(paths, K - 1, axis=1)[:, :K]
    return paths.mean(axis=1)


def _rank_sim(qn: np.ndarray, index: NeighbourIndex, p: Mapping[str, float], topk: int, query_k: int,
              options: RankedOptions) -> tuple[np.ndarray, np.ndarray]:
    """SIM paper variant: SGR (Eq. 1–5), then MNNR (Eq. 6–8: ``α d' + (1 − α) d_M``, ``d_M`` the
    Jaccard distance of the sets N^c(q, kq) and R*(g, kg), counted) on each query's graph-expanded
    candidates."""
    lam, K, k_graph = float(p["lam"]), int(p["K"]), int(p["k_graph"])
    kq, kg, alpha = int(p["kq"]), int(p["kg"]), float(p["alpha"])
    gn = index.base
    graph = build_graph(index, max(k_graph, kg + 1))
    nbr = np.ascontiguousarray(graph.index[:, :k_graph])
    nbr_dist = lam * graph.distance(k_graph)
    gallery_weights = expanded_k_reciprocal_sets(graph, kg)
    gallery_sum = np.asarray(gallery_weights.sum(axis=1)).ravel().astype(np.float32)
    gallery_weights_t = gallery_weights.T.tocsr()
    del gallery_weights
    reverse = reverse_neighbours(graph, k_graph)
    near_idx, _ = index.search(qn, query_k, desc="query knn")
    expand = min(options.expand, query_k)
    ranked_index, ranked_dist = _outputs(len(qn), topk)
    for i in progress_bar(range(len(qn)), desc="sim re-ranking", enabled=options.progress):
        seeds = near_idx[i, :expand]
        cand = np.unique(np.concatenate([near_idx[i], nbr[seeds].ravel(), _csr_rows(reverse, seeds)[1]]))
        sgr = _sgr_for_items(qn[i], gn, cand, nbr, nbr_dist, K)
        support_pos = np.argpartition(sgr, kq - 1)[:kq] if len(cand) > kq else np.arange(len(cand))
        order = np.argsort(cand[support_pos])
        support, support_weight = cand[support_pos][order], np.ones(len(order), dtype=np.float32)
        items, overlap = _jaccard_overlap(gallery_weights_t, support, support_weight)
        extra = np.setdiff1d(items, cand, assume_unique=True)
        if len(extra):
            cand = np.concatenate([cand, extra])
            sgr = np.concatenate([sgr, _sgr_for_items(qn[i], gn, extra, nbr, nbr_dist, K)])
        jaccard = jaccard_from_mass(_lookup(items, overlap, cand)[None], support_weight.sum(keepdims=True),
                                    gallery_sum[cand])[0]
        dist = alpha * sgr + (1.0 - alpha) * jaccard
        ranked_index[i], ranked_dist[i] = _take_topk(cand, dist.astype(np.float32), topk)
    return ranked_index, ranked_dist


# ------------------------------------------------------------------------------------------- krr


def _rank_krr(index: NeighbourIndex, n_query: int, p: Mapping[str, float], topk: int, query_k: int,
              options: RankedOptions) -> tuple[np.ndarray, np.ndarray]:
    """Zhong et al. 2017 (reference code): k-reciprocal Jaccard + input distance over query ∪ gallery.

    ``index``: over the normalised queries then the gallery (one pool).
    """
    k1, k2, lam = int(p["k1"]), int(p["k2"]), float(p["lam"])
    qn, gn = index.base[:n_query], index.base[n_query:]
    n_gallery = len(gn)
    graph = build_graph(index, max(k1 + 1, k2), query_rows=n_query)
    min_sim = farthest_similarity(index.base, sample_size=options.sample_size, seed=options.seed,
                                  progress=options.progress)
    weights = _reciprocal_weights(graph, index.base, k1, min_sim=min_sim)
    if k2 > 1:
        weights = local_expansion(weights, graph.index[:, :k2])
    query_weights = weights[:n_query]
    gallery_weights_t = weights[n_query:].T.tocsr()
    del weights
    near_idx, near_sim = index.search(qn, query_k, base_range=(n_query, n_query + n_gallery), desc="query knn")
    near_idx -= n_query
    row_max = np.maximum(2.0 - 2.0 * min_sim[:n_query], 1e-12)
    ranked_index, ranked_dist = _outputs(n_query, topk)
    for i in progress_bar(range(n_query), desc="krr re-ranking", enabled=options.progress):
        items, overlap = _jaccard_overlap(gallery_weights_t, *_csr_row(query_weights, i))
        jaccard = jaccard_from_mass(overlap.copy())
        near = near_idx[i]
        near_dist = ((1.0 - lam) * jaccard_from_mass(_lookup(items, overlap, near))
                     + lam * np.maximum(2.0 - 2.0 * near_sim[i], 0.0) / row_max[i])
        # an item outside the query's nearest is at least as far as the farthest of them
        bound = np.partition(near_dist, topk - 1)[topk - 1]
        floor = lam * max(2.0 - 2.0 * float(near_sim[i, -1]), 0.0) / row_max[i]
        others = ~np.isin(items, near, assume_unique=True) & ((1.0 - lam) * jaccard + floor < bound)
        extra = items[others]
        extra_dist = ((1.0 - lam) * jaccard[others]
                      + lam * np.maximum(2.0 - 2.0 * (gn[extra] @ qn[i]), 0.0) / row_max[i])
        cand = np.concatenate([near, extra])
        dist = np.concatenate([near_dist, extra_dist]).astype(np.float32)
        ranked_index[i], ranked_dist[i] = _take_topk(cand, dist, topk)
    return ranked_index, ranked_dist
