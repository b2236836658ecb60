"""Building blocks of the exact re-rankers: normalisation, blocked Gram matrices, top-k graphs.

Every re-ranker needs inner products of L2-normalised features (``Q·Gᵀ``, ``G·Gᵀ`` and, for
k-reciprocal re-ranking, ``Q·Qᵀ``).  They are computed in row blocks of at most
:data:`BLOCK_ELEMENTS` entries, so no dense ``G×G`` or ``(Q+G)²`` matrix ever exists; from each
block only what a method needs is kept (its top-k neighbours, its row minimum).  Self graphs
(``G·Gᵀ``, the ``[Q; G]`` pool) use only the upper half of the Gram matrix, as ``syrk`` does.

Distances of unit vectors follow from similarities: ``‖a − b‖² = 2 − 2 aᵀb`` (clipped at 0).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np

from vireid.errors import InputError
from vireid.retrieval.graph import NeighbourGraph

WORKER_THREADS = 2
"""Threads of the blocked numpy loops that release the GIL (the machine's two cores)."""

BLOCK_ELEMENTS = 1 << 22
"""Entries of one similarity block (16 MiB in float32)."""

FEW_ENTRIES = 8
"""In :func:`merge_above_kth`, a row with at most this many entries above its k-th value merges them
one by one, a row with more its top-k first."""

NORM_EPS = 1e-12
"""Lower bound on a row norm in :func:`l2_normalize` (as ``torch.nn.functional.normalize``)."""


def resolve_dtype(dtype: object) -> np.dtype:
    """``float32`` or ``float64``; anything else is an :class:`InputError`."""
    try:
        resolved = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError:
        raise InputError(f"dtype {dtype!r} is not a NumPy dtype (use float32 or float64)") from None
    if resolved not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InputError(f"dtype {resolved} is not supported (use float32 or float64)")
    return resolved


def check_variant(variant: str) -> None:
    """``reference`` or ``paper``; anything else is an :class:`InputError`."""
    if variant not in ("reference", "paper"):
        raise InputError(f"unknown variant {variant!r} (choose from reference, paper)")


def l2_normalize(features: np.ndarray, dtype: np.dtype, *, name: str) -> np.ndarray:
    """Row-wise L2 normalisation in ``dtype``: ``x / max(‖x‖, 1e-12)``, C-contiguous."""
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0 or not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"{name} must be a non-empty 2-D float array (n, d), got {x.dtype} {x.shape}")
    if not np.isfinite(x).all():
        raise InputError(f"{name} contains non-finite values")
    x = np.ascontiguousarray(x, dtype=dtype)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x / np.maximum(norms, dtype.type(NORM_EPS))


def block_rows(num_rows: int, row_length: int) -> Iterator[slice]:
    """Consecutive row slices holding at most :data:`BLOCK_ELEMENTS` entries each."""
    step = max(1, BLOCK_ELEMENTS // max(row_length, 1))
    for start in range(0, num_rows, step):
        yield slice(start, min(start + step, num_rows))


def squared_distance_from_similarity(similarity: np.ndarray) -> np.ndarray:
    """``‖a − b‖² = 2 − 2 aᵀb`` for unit vectors, in place, clipped at 0."""
    similarity *= -2
    similarity += 2
    np.maximum(similarity, 0, out=similarity)
    return similarity


def euclidean_from_similarity(similarity: np.ndarray) -> np.ndarray:
    """``‖a − b‖`` for unit vectors, in place."""
    return np.sqrt(squared_distance_from_similarity(similarity), out=similarity)


def topk_largest(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` largest values and their columns, largest first (``(values, index)``;
    exactly tied values in an unspecified order, as with ``torch.topk``)."""
    m = block.shape[1]
    columns = np.argpartition(block, m - k, axis=1)[:, m - k:] if k < m else np.broadcast_to(np.arange(m), block.shape)
    values = np.take_along_axis(block, columns, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(columns, order, axis=1).astype(np.int64, copy=False)


def topk_smallest(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` smallest values and their columns, smallest first (``(values, index)``;
    exactly tied values in an unspecified order, as with ``torch.topk``)."""
    m = block.shape[1]
    columns = np.argpartition(block, k - 1, axis=1)[:, :k] if k < m else np.broadcast_to(np.arange(m), block.shape)
    values = np.take_along_axis(block, columns, axis=1)
    order = np.argsort(values, axis=1, kind="stable")
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(columns, order, axis=1).astype(np.int64, copy=False)


def top_k_neighbours(rows: np.ndarray, columns: np.ndarray, k: int, *, self_graph: bool) -> NeighbourGraph:
    """Top-``k`` most similar ``columns`` of each of ``rows`` (unit vectors), blocked over rows.

    ``self_graph=True`` means ``rows`` and ``columns`` are the same set: each row's own entry
    is set to similarity 1 so it ranks first (the ``cdist`` convention of the references); the
    graph then comes from :func:`self_top_k_neighbours` (each similarity computed once).
    """
    n, m = rows.shape[0], columns.shape[0]
    if not 1 <= k <= m:
        raise InputError(f"k={k} must lie in [1, {m}] (the number of items searched)")
    if self_graph:
        return self_top_k_neighbours(rows, k)
    index = np.empty((n, k), dtype=np.int64)
    sim = np.empty((n, k), dtype=rows.dtype)
    min_sim = np.empty(n, dtype=rows.dtype)
    for part in block_rows(n, m):
        block = rows[part] @ columns.T
        min_sim[part] = block.min(axis=1)
        sim[part], index[part] = topk_largest(block, k)
    return NeighbourGraph(index=index, sim=sim, min_sim=min_sim)


def self_top_k_neighbours(features: np.ndarray, k: int, on_block: Callable[[slice, np.ndarray], None] | None = None,
                          *, self_first: bool = True) -> NeighbourGraph:
    """Top-``k`` self graph of unit vectors from half the Gram matrix; ``self_first``: each row's own
    entry is set to similarity 1 (so it ranks first), otherwise it keeps its computed value.

    Row block ``I = [s, e)`` computes ``features[I] · features[s:]ᵀ`` once: its rows give rows I
    the top-k of their columns ≥ s, its columns offer rows ≥ e their columns in I.  Blocks run
    last to first, so a row's list already holds its best later columns when earlier columns are
    offered: only entries above its k-th value are merged (one comparison per entry, no top-k).
    Every similarity is computed once (as the ``syrk`` of the matmul floor) and equals the
    full-row product bit for bit; the lists are those of the full rows (exactly tied
    similarities in an unspecified order, as with ``torch.topk``).
    ``on_block(rows, block)`` sees each block (columns ``rows.start:``) before the diagonal is set.
    """
    n = len(features)
    if not 1 <= k <= n:
        raise InputError(f"k={k} must lie in [1, {n}] (the number of items searched)")
    lists = NeighbourGraph(index=np.zeros((n, k), dtype=np.int64), sim=np.full((n, k), -np.inf, dtype=features.dtype),
                           min_sim=np.full(n, np.inf, dtype=features.dtype))
    starts = [0]
    while starts[-1] < n:
        starts.append(min(n, starts[-1] + max(1, BLOCK_ELEMENTS // (n - starts[-1]))))
    for start, stop in reversed(list(itertools.pairwise(starts))):
        block = features[start:stop] @ features[start:].T
        if on_block is not None:
            on_block(slice(start, stop), block)
        if self_first:
            local = np.arange(stop - start)
            block[local, local] = 1
        _offer(lists, block, start, start, transposed=False)
        if stop < n:
            _offer(lists, block[:, stop - start:], stop, start, transposed=True)
    return lists


def _offer(lists: NeighbourGraph, block: np.ndarray, first_row: int, first_column: int, *, transposed: bool) -> None:
    """Merges the entries of ``block`` into the running lists of rows ``first_row…`` (``block``'s rows,
    or its columns when ``transposed``), whose columns start at ``first_column``.

    A block's own rows are offered once, to empty lists: their top-k opens the lists. Its columns
    are offered to later rows, whose lists are full unless fewer than k columns lay beyond them:
    only entries above a row's k-th value are merged (:func:`merge_above_kth`)."""
    by_row = block.T if transposed else block
    rows = slice(first_row, first_row + by_row.shape[0])
    np.minimum(lists.min_sim[rows], by_row.min(axis=1), out=lists.min_sim[rows])
    columns = first_column + np.arange(by_row.shape[1])
    if transposed:
        merge_above_kth(lists.index, lists.sim, np.arange(rows.start, rows.stop), columns, by_row)
    else:
        open_lists(lists.index, lists.sim, rows, columns, by_row)


def open_lists(best_idx: np.ndarray, best_sim: np.ndarray, rows: np.ndarray | slice, items: np.ndarray,
               sim: np.ndarray) -> None:
    """Fills the empty top-k lists of ``rows`` with the top-k of ``sim`` (rows × ``items``: column j
    is item ``items[j]``), best first; with fewer than k columns the rest of a list stays empty."""
    kk = min(best_sim.shape[1], sim.shape[1])
    best_sim[rows, :kk], pos = topk_largest(sim, kk)
    best_idx[rows, :kk] = items[pos]


def merge_above_kth(best_idx: np.ndarray, best_sim: np.ndarray, rows: np.ndarray, items: np.ndarray,
                    sim: np.ndarray) -> None:
    """Merges into the running top-k lists of ``rows`` (best first) the entries of ``sim`` (rows ×
    ``items``: column j is item ``items[j]``) above each row's k-th value; ties keep the listed
    entry first.

    A row with at most :data:`FEW_ENTRIES` such entries merges just those (in column order); a row
    with more, its top-k of ``sim`` (then exactly tied entries in an unspecified order), so that a
    block early in a scan, or features whose neighbours spread over every block, cost no more than
    one top-k per row.
    """
    kth = best_sim[rows, -1]
    hit = np.flatnonzero(sim.max(axis=1) > kth)               # one read of sim; most rows have no entry
    if not len(hit):
        return
    above = sim[hit] > kth[hit, None]
    counts = np.count_nonzero(above, axis=1)
    few = counts <= FEW_ENTRIES
    if few.any():
        row, column = np.nonzero(above[few])
        few_counts = counts[few]
        slot = np.arange(len(row)) - np.repeat(np.cumsum(few_counts) - few_counts, few_counts)
        width = int(few_counts.max())
        cand_sim = np.full((len(few_counts), width), -np.inf, dtype=best_sim.dtype)
        cand_idx = np.full((len(few_counts), width), -1, dtype=best_idx.dtype)
        cand_sim[row, slot], cand_idx[row, slot] = sim[hit[few][row], column], items[column]
        _merge_lists(best_idx, best_sim, rows[hit[few]], cand_idx, cand_sim)
    if not few.all():
        many = hit[~few]
        values, pos = topk_largest(sim[many], min(best_sim.shape[1], sim.shape[1]))
        _merge_lists(best_idx, best_sim, rows[many], items[pos], values)


def _merge_lists(best_idx: np.ndarray, best_sim: np.ndarray, target: np.ndarray, cand_idx: np.ndarray,
                 cand_sim: np.ndarray) -> None:
    """The top-k of each ``target`` row's list and its candidates, best first, listed entries first among equals."""
    merged_sim = np.concatenate([best_sim[target], cand_sim], axis=1)
    merged_idx = np.concatenate([best_idx[target], cand_idx], axis=1)
    order = np.argsort(-merged_sim, axis=1, kind="stable")[:, :best_sim.shape[1]]
    best_sim[target] = np.take_along_axis(merged_sim, order, axis=1)
    best_idx[target] = np.take_along_axis(merged_idx, order, axis=1)


def graph_pair_similarity(features: np.ndarray, graph: NeighbourGraph, rows: np.ndarray,
                          cols: np.ndarray) -> np.ndarray:
    """``features[rows[t]] · features[cols[t]]``, read from the self graph where the pair is listed
    (computed by :func:`pair_similarity` only for the others)."""
    n, k = graph.index.shape
    listed = np.arange(n).repeat(k) * n + graph.index.ravel()
    order = np.argsort(listed, kind="stable")
    listed = listed[order]
    wanted = rows.astype(np.int64) * n + cols
    pos = np.minimum(np.searchsorted(listed, wanted), len(listed) - 1)
    found = listed[pos] == wanted
    out = np.empty(len(rows), dtype=graph.sim.dtype)
    out[found] = graph.sim.ravel()[order[pos[found]]]
    missing = ~found
    out[missing] = pair_similarity(features, features, rows[missing], cols[missing])
    return out


def pair_similarity(left: np.ndarray, right: np.ndarray, left_rows: np.ndarray, right_rows: np.ndarray) -> np.ndarray:
    """``left[left_rows[t]] · right[right_rows[t]]`` for every t, blocked to bound memory."""
    out = np.empty(len(left_rows), dtype=left.dtype)
    step = max(1, BLOCK_ELEMENTS // max(left.shape[1], 1))
    for start in range(0, len(left_rows), step):
        stop = start + step
        out[start:stop] = np.einsum("ij,ij->i", left[left_rows[start:stop]], right[right_rows[start:stop]])
    return out
