"""Gallery neighbour graphs as N×k arrays, and the sparse neighbour sets built from them.

Everything here is O(N·k) memory and chunked over rows; nothing is N×N dense. Sparse row sets
are ``scipy.sparse.csr_matrix`` (N×N, sorted column indices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from vireid.errors import InputError
from vireid.progress import progress_bar

if TYPE_CHECKING:
    from vireid.retrieval.knn import NeighbourIndex

_ROW_CHUNK = 8192
_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class NeighbourGraph:
    """Top-k neighbours of every row item, best first; in a self graph the item itself is column 0.

    ``index`` int64 (N, k), ``sim`` float (N, k): inner products of L2-normalised features.
    ``min_sim`` (N,), when known: each row's smallest similarity over *all* columns, i.e. its
    largest squared distance is ``2 − 2·min_sim`` (the exact methods' row normalisation).
    """

    index: np.ndarray
    sim: np.ndarray
    min_sim: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.index.shape[0])

    @property
    def k(self) -> int:
        return int(self.index.shape[1])

    def distance(self, k: int | None = None) -> np.ndarray:
        """Euclidean distances ``sqrt(2 − 2s)`` of the first ``k`` columns (self exactly 0), float32."""
        sim = np.asarray(self.sim[:, : self.k if k is None else k], dtype=np.float32)
        dist = np.sqrt(np.maximum(2.0 - 2.0 * sim, 0.0), dtype=np.float32)
        dist[:, 0] = 0.0
        return dist

    def max_squared_distance(self) -> np.ndarray:
        """``(N,)`` largest squared Euclidean distance of each row over all columns (needs ``min_sim``)."""
        if self.min_sim is None:
            raise ValueError("this neighbour graph was built without per-row minimum similarities")
        return np.maximum(2.0 - 2.0 * self.min_sim, 0.0)

    def as_graph(self, k: int | None = None) -> NeighbourGraph:
        """The first ``k`` columns (the row minima over all columns are unchanged)."""
        k = self.k if k is None else k
        return NeighbourGraph(self.index[:, :k], self.sim[:, :k], self.min_sim)


def build_graph(index: NeighbourIndex, k: int, *, query_rows: int = 0) -> NeighbourGraph:
    """The k-nearest-neighbour graph of the index's base vectors (self at column 0, similarity 1).

    ``query_rows``: the first base rows are queries of the other modality (searched more widely).
    """
    idx, sim = index.self_search(k, query_rows=query_rows)
    return NeighbourGraph(index=idx, sim=sim)


def farthest_similarity(features: np.ndarray, *, sample_size: int = 2048, seed: int = 0,
                        progress: bool = False) -> np.ndarray:
    """(N,) smallest similarity of each row to the rows of ``features`` (unit vectors).

    Exact when N <= ``sample_size``; beyond, the minimum over ``sample_size`` rows drawn with
    ``seed`` (one N×sample matmul): the row maximum of the squared distances that SIM's MNNR and
    k-reciprocal re-ranking divide by, estimated without an N×N pass.
    """
    n = len(features)
    if n <= sample_size:
        sample = features
    else:
        sample = features[np.sort(np.random.default_rng(seed).choice(n, sample_size, replace=False))]
    out = np.empty(n, dtype=np.float32)
    step = max(1, _BLOCK_ELEMENTS // len(sample))
    for start in progress_bar(range(0, n, step), desc="farthest sample", enabled=progress):
        out[start:start + step] = (features[start:start + step] @ sample.T).min(axis=1)
    return out


def _require_columns(graph: NeighbourGraph, k: int, what: str) -> None:
    if graph.k < k:
        raise InputError(f"{what} needs {k} neighbours per item but the graph has k={graph.k}")


def rows_to_csr(index: np.ndarray, values: np.ndarray, n_cols: int) -> sp.csr_matrix:
    """A CSR matrix whose row i holds ``values[i]`` at columns ``index[i]`` (no duplicates; inputs copied)."""
    n, k = index.shape
    matrix = sp.csr_matrix(
        (np.array(values, dtype=np.float32).ravel(), np.array(index).ravel(), np.arange(0, n * k + 1, k)),
        shape=(n, n_cols),
    )
    matrix.sort_indices()
    return matrix


def reverse_neighbours(graph: NeighbourGraph, k: int) -> sp.csr_matrix:
    """Row n lists the items j with n among the first ``k`` neighbours of j (pattern only)."""
    _require_columns(graph, k, "reverse_neighbours")
    forward = rows_to_csr(graph.index[:, :k], np.ones((graph.n, k), dtype=np.float32), graph.n)
    return forward.T.tocsr()


def reciprocal_mask(graph: NeighbourGraph, k: int, *, rows: np.ndarray | None = None,
                    progress: bool = False) -> np.ndarray:
    """(N, k+1) bool: ``graph.index[i, c]`` has i among its own first k+1 neighbours (Zhong et al. Eq. 3).

    ``rows``: only these rows, in this order (``(len(rows), k+1)``).
    """
    _require_columns(graph, k + 1, f"k-reciprocal sets with k={k}")
    ids = np.arange(graph.n) if rows is None else np.asarray(rows, dtype=np.int64)
    mask = np.empty((len(ids), k + 1), dtype=bool)
    for start in progress_bar(range(0, len(ids), _ROW_CHUNK), desc=f"reciprocal k={k}", enabled=progress):
        chunk = ids[start:start + _ROW_CHUNK]
        forward = graph.index[chunk, : k + 1]
        backward = graph.index[forward, : k + 1]
        mask[start:start + len(chunk)] = (backward == chunk[:, None, None]).any(axis=2)
    return mask


def expanded_k_reciprocal_sets(graph: NeighbourGraph, k1: int, *, rows: np.ndarray | None = None,
                                progress: bool = False) -> sp.csr_matrix:
    """Zhong et al. Eq. 4–5: the k1-reciprocal set R(i), grown by each member's round(k1/2)-reciprocal
    set when more than 2/3 of that set lies in R(i). Returns the pattern of R*(i) as CSR (values 1).

    ``rows``: only these rows, in this order (a ``(len(rows), N)`` matrix): what an incremental
    update recomputes.
    Duplicates are removed chunk by chunk (a member's half-set repeats R(i)), so the transient
    memory is the size of the result, not of the up to (k1+1)·(h+2) raw entries per row.
    """
    half = int(np.around(k1 / 2.0))
    ids = np.arange(graph.n) if rows is None else np.asarray(rows, dtype=np.int64)
    recip = reciprocal_mask(graph, k1, rows=ids, progress=progress)
    if rows is None:
        hood, half_recip = None, reciprocal_mask(graph, half, progress=progress)
    else:  # the half-sets of the rows' neighbours only
        hood = np.unique(graph.index[ids, : k1 + 1])
        half_recip = reciprocal_mask(graph, half, rows=hood)
    key_parts: list[np.ndarray] = []  # position · n + column, sorted and unique within each chunk
    for start in progress_bar(range(0, len(ids), _ROW_CHUNK), desc=f"expanded reciprocal k={k1}", enabled=progress):
        chunk = ids[start:start + _ROW_CHUNK]
        positions = np.arange(start, start + len(chunk))
        forward = graph.index[chunk, : k1 + 1]
        in_r = recip[positions]
        r_members = np.where(in_r, forward, -1)                       # (B, k1+1)
        cand_half = graph.index[forward, : half + 1]                  # (B, k1+1, h+1)
        cand_mask = half_recip[forward if hood is None else np.searchsorted(hood, forward)]  # (B, k1+1, h+1)
        inside = (cand_half[..., None] == r_members[:, None, None, :]).any(axis=3) & cand_mask
        grow = in_r & (inside.sum(axis=2) > (2.0 / 3.0) * cand_mask.sum(axis=2))
        added = cand_mask & grow[..., None]
        b_rows = np.broadcast_to(positions[:, None], forward.shape)
        b_rows_half = np.broadcast_to(positions[:, None, None], cand_half.shape)
        chunk_rows = np.concatenate([b_rows[in_r], b_rows_half[added]])
        chunk_cols = np.concatenate([forward[in_r], cand_half[added]])
        key_parts.append(np.unique(chunk_rows * np.int64(graph.n) + chunk_cols))
    keys = np.concatenate(key_parts) if key_parts else np.empty(0, np.int64)  # chunks cover increasing rows
    indptr = np.searchsorted(keys, np.arange(len(ids) + 1, dtype=np.int64) * graph.n)
    return sp.csr_matrix((np.ones(len(keys), dtype=np.float32), keys % graph.n, indptr), shape=(len(ids), graph.n))
