"""The gallery side of single-query re-ranking: everything that depends on the gallery alone,
kept up to date as items are enrolled.

A :class:`GalleryState` holds, for the parameters of :class:`SingleQueryParams` (the names,
defaults and presets of :mod:`~vireid.retrieval.presets`):

* the gallery's top-K neighbour graph (self at column 0, similarity 1);
* AIM's expanded gallery affinities ``G'`` (SAAI Eq. 7: the mean of the top-k1 affinity rows of
  each item's k2 nearest, L2-normalised);
* the k-reciprocal gallery vectors of SIM's MNNR and of k-reciprocal re-ranking (Zhong et al.
  Eq. 4–7: expanded sets, ``exp(−d)`` weights), their round(k/2)-reciprocal sets and the local
  expansion of the k-reciprocal vectors (Eq. 11).

Enrolment (:meth:`GalleryState.extend`) appends items without rebuilding: the new items' lists
come from one exact pass over the gallery, the old items whose lists they enter are merged, and
only the rows of each structure that can depend on a changed list are recomputed — found through
a reverse index of the graph and kept only where they really changed (:class:`StateDelta`).
Changed rows live in layers over an immutable base (:class:`GraphStore`, :class:`RowStore`), so a
new state shares the base with the old one and costs memory and time in proportion to what
changed; :meth:`GalleryState.compacted` folds the layers into a new base. The queries themselves
are in :mod:`~vireid.retrieval.single`.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from vireid.errors import InputError
from vireid.retrieval.exact import NORM_EPS, pair_similarity, topk_largest
from vireid.retrieval.graph import NeighbourGraph, build_graph, expanded_k_reciprocal_sets, reciprocal_mask
from vireid.retrieval.knn import NeighbourIndex
from vireid.retrieval.kreciprocal import gaussian_vectors, local_expansion, shared_mass
from vireid.retrieval.presets import PRESETS, get_method, resolve_params
from vireid.retrieval.sim import preload_compiled_kernel

#: Methods one query can be re-ranked with; ``plain`` needs no gallery structure.
SINGLE_QUERY_METHODS = ("plain", "aim", "sgr", "mnnr", "sim", "krr")
_RERANKERS = SINGLE_QUERY_METHODS[1:]
VARIANT = "paper"
#: Above this many new items per old item an extension recomputes every structure row.
_FULL_RECOMPUTE_FRACTION = 0.125
#: Galleries up to this size get an exact neighbour graph by default (``knn="auto"``).
EXACT_GRAPH_LIMIT = 200_000
#: Rows a store's recent layer holds before it is folded into the settled one.
_RECENT_ROWS = 1024
#: The "pool" :func:`vireid.retrieval.sim._mean_of_shortest_paths` maps over: this thread.
SERIAL = types.SimpleNamespace(map=map)


def reciprocal_half(k: int) -> int:
    """round(k/2), the size of the sets that grow a k-reciprocal set (as Zhong et al.'s code rounds it)."""
    return int(np.around(k / 2.0))


# ----------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class SingleQueryParams:
    """Resolved parameters of every method (names and defaults of :mod:`~vireid.retrieval.presets`)."""

    aim: Mapping[str, int | float]
    sgr: Mapping[str, int | float]
    mnnr: Mapping[str, int | float]
    sim: Mapping[str, int | float]
    krr: Mapping[str, int | float]
    preset: str | None = None

    @classmethod
    def resolve(cls, preset: str | None = None,
                params: Mapping[str, Mapping[str, object]] | None = None) -> SingleQueryParams:
        """Defaults, then ``preset`` (``sysu``, ``sysu-multishot``, ``sysu-indoor``, ``regdb``), then
        ``params`` (``{"aim": {"k1": 20}}``), validated as the batch re-rankers validate them."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(_RERANKERS))
        if unknown:
            raise InputError(f"unknown re-ranking method(s) {', '.join(map(repr, unknown))} "
                             f"(choose from {', '.join(_RERANKERS)})")
        if preset is not None and preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
        values = {m: dict(resolve_params(get_method(m), params.get(m), preset)) for m in _RERANKERS}
        return cls(**values, preset=preset)

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "variant": VARIANT, "params": {m: dict(self.method(m)) for m in _RERANKERS}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str) -> SingleQueryParams:
        try:
            return cls.resolve(data.get("preset"), data["params"])
        except (KeyError, TypeError, AttributeError):
            raise InputError(f"{source}: malformed re-ranking settings") from None

    def method(self, name: str) -> Mapping[str, int | float]:
        return getattr(self, name)

    def effective(self, n: int) -> SingleQueryParams:
        """The parameters a gallery of ``n`` items can hold: every neighbourhood size clamped to
        the gallery (the batch functions refuse such sizes; a growing gallery starts small)."""
        aim_k1 = min(int(self.aim["k1"]), n)
        sgr_graph, sim_graph = min(int(self.sgr["k_graph"]), n), min(int(self.sim["k_graph"]), n)
        krr_k1 = min(int(self.krr["k1"]), n - 1)
        return SingleQueryParams(
            aim={"k1": aim_k1, "k2": min(int(self.aim["k2"]), aim_k1)},
            sgr={**self.sgr, "k_graph": sgr_graph, "K": min(int(self.sgr["K"]), sgr_graph)},
            mnnr={**self.mnnr, "kq": min(int(self.mnnr["kq"]), n), "kg": min(int(self.mnnr["kg"]), n - 1)},
            sim={**self.sim, "k_graph": sim_graph, "K": min(int(self.sim["K"]), sim_graph),
                 "kq": min(int(self.sim["kq"]), n), "kg": min(int(self.sim["kg"]), n - 1)},
            krr={**self.krr, "k1": krr_k1, "k2": min(int(self.krr["k2"]), krr_k1 + 1)},
            preset=self.preset,
        )

    def reciprocal_ks(self) -> tuple[int, ...]:
        """The k of every k-reciprocal vector set the methods use (MNNR's kg, krr's k1)."""
        return tuple(sorted({int(self.mnnr["kg"]), int(self.sim["kg"]), int(self.krr["k1"])}))

    def graph_k(self) -> int:
        """Neighbours (self included) every gallery list must hold."""
        ks = self.reciprocal_ks()
        return max(int(self.aim["k1"]), int(self.aim["k2"]), int(self.sgr["k_graph"]), int(self.sim["k_graph"]),
                   max(ks) + 1, int(self.krr["k2"]), 1)


# ----------------------------------------------------------------------------------- stores


class _RowsView:
    """``view[rows, columns]`` of a graph array with an overlay: what :mod:`~vireid.retrieval.graph`'s
    row functions read (``rows`` any integer array, ``columns`` a slice)."""

    def __init__(self, base: np.ndarray, overlay: np.ndarray, position: np.ndarray) -> None:
        self.base, self.overlay, self.position = base, overlay, position

    def __getitem__(self, key: tuple[Any, slice]) -> np.ndarray:
        rows, columns = key
        if isinstance(rows, slice):
            rows = np.arange(len(self.position))[rows]
        rows = np.asarray(rows)
        flat = rows.ravel()
        if len(self.base):  # one gather from the base, then the overlaid rows patched in
            out = self.base[np.minimum(flat, len(self.base) - 1), columns]
        else:
            out = np.empty((len(flat),) + self.overlay[:0, columns].shape[1:], self.overlay.dtype)
        if len(self.overlay):
            pos = self.position[flat]
            patched = np.flatnonzero(pos >= 0)
            out[patched] = self.overlay[pos[patched], columns]
        return out.reshape(rows.shape + out.shape[1:])


class _GraphBase:
    """An immutable top-K graph of the first ``n`` items, with its reverse index built on first use."""

    def __init__(self, index: np.ndarray, sim: np.ndarray) -> None:
        self.index = np.ascontiguousarray(index, dtype=np.int64)
        self.sim = np.ascontiguousarray(sim, dtype=np.float32)
        self._reverse: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._edges: dict[tuple[float, int], tuple[np.ndarray, np.ndarray]] = {}

    @property
    def n(self) -> int:
        return int(self.index.shape[0])

    def reverse(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indptr, source rows, column positions): for item j, the rows listing it and where."""
        if self._reverse is None:
            n, k = self.index.shape
            flat = self.index.ravel()
            order = np.argsort(flat, kind="stable")
            indptr = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=n))])
            self._reverse = (indptr, order // k, order % k)
        return self._reverse

    def sgr_edges(self, lam: float, k_graph: int) -> tuple[np.ndarray, np.ndarray]:
        """(contiguous neighbour lists, edges) of SGR for ``k_graph`` and ``λ``, cached."""
        key = (float(lam), int(k_graph))
        if key not in self._edges:
            self._edges[key] = (np.ascontiguousarray(self.index[:, :k_graph]), _sgr_edges(self.sim[:, :k_graph], lam))
        return self._edges[key]


def _sgr_edges(sim: np.ndarray, lam: float) -> np.ndarray:
    """``λ·d(g_n, g_j)`` of SIM Eq. 4 for each listed neighbour (the direct edge, n = j, costs 0)."""
    edge = lam * np.sqrt(np.maximum(2.0 - 2.0 * sim.astype(np.float64), 0.0))
    edge[:, 0] = 0.0
    return edge


class GraphStore:
    """The gallery's top-K lists: an immutable base of the first items and an overlay of the lists
    that enrolments changed or added (sorted ``ids``)."""

    def __init__(self, base: _GraphBase, n: int, ids: np.ndarray | None = None, index: np.ndarray | None = None,
                 sim: np.ndarray | None = None) -> None:
        k = base.index.shape[1] if base.n else (index.shape[1] if index is not None else 0)
        self.base, self.n, self.k = base, n, k
        self.ids = np.empty(0, np.int64) if ids is None else ids
        self.overlay_index = np.empty((0, k), np.int64) if index is None else index
        self.overlay_sim = np.empty((0, k), np.float32) if sim is None else sim
        self.position = np.full(n, -1, dtype=np.int64)
        self.position[self.ids] = np.arange(len(self.ids))
        self.index = _RowsView(base.index, self.overlay_index, self.position)
        self.sim = _RowsView(base.sim, self.overlay_sim, self.position)
        self._columns: dict[int, np.ndarray] = {}

    def as_graph(self) -> NeighbourGraph:
        """This store read through :mod:`~vireid.retrieval.graph`'s ``graph.index[rows, :k]``."""
        return self  # type: ignore[return-value]  # same attributes: index, n, k

    def column(self, c: int) -> np.ndarray:
        """(n,) similarity of every item's list entry ``c``."""
        if c not in self._columns:
            out = np.empty(self.n, np.float32)
            out[: self.base.n] = self.base.sim[:, c]
            out[self.ids] = self.overlay_sim[:, c]
            self._columns[c] = out
        return self._columns[c]

    def radius(self, c: int) -> np.ndarray:
        """(n,) Euclidean distance of each item to its list entry ``c`` (its c-th other neighbour)."""
        return np.sqrt(np.maximum(2.0 - 2.0 * self.column(c), 0.0), dtype=np.float32)

    def referencing(self, items: np.ndarray, m: int) -> np.ndarray:
        """Sorted rows whose first ``m`` list entries contain one of ``items``."""
        items = np.unique(np.asarray(items, dtype=np.int64))
        found = []
        in_base = items[items < self.base.n]
        if len(in_base):
            indptr, source, column = self.base.reverse()
            take = _ranges(indptr[in_base], indptr[in_base + 1] - indptr[in_base])
            rows = source[take][column[take] < m]
            found.append(rows[self.position[rows] < 0])  # overlaid rows are looked at below
        if len(self.ids):
            wanted = np.zeros(self.n, dtype=bool)
            wanted[items] = True
            found.append(self.ids[wanted[self.overlay_index[:, :m]].any(axis=1)])
        return np.unique(np.concatenate(found)) if found else np.empty(0, np.int64)

    def sgr_parts(self, lam: float, k_graph: int) -> list[tuple[np.ndarray | None, np.ndarray, np.ndarray]]:
        """(rows written or None for the base's 0..n_base-1, neighbour lists, edges) for SGR."""
        parts: list[tuple[np.ndarray | None, np.ndarray, np.ndarray]] = []
        if self.base.n:
            parts.append((None, *self.base.sgr_edges(lam, k_graph)))
        if len(self.ids):
            parts.append((self.ids, np.ascontiguousarray(self.overlay_index[:, :k_graph]),
                          _sgr_edges(self.overlay_sim[:, :k_graph], lam)))
        return parts

    def with_rows(self, ids: np.ndarray, index: np.ndarray, sim: np.ndarray, n: int) -> GraphStore:
        """A new store of ``n`` items where rows ``ids`` hold the given lists."""
        merged_ids, order, keep = _merge_ids(self.ids, ids)
        merged_index = np.concatenate([self.overlay_index[keep], index])[order]
        merged_sim = np.concatenate([self.overlay_sim[keep], sim])[order]
        return GraphStore(self.base, n, merged_ids, merged_index, merged_sim)

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(self.n)
        return self.index[rows, :], self.sim[rows, :]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(start, start + length)`` for each pair."""
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + offsets


def _merge_ids(old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Overlay ids after replacing/adding ``new``: (sorted ids, order of [old kept; new], kept old mask)."""
    keep = ~np.isin(old, new)
    ids = np.concatenate([old[keep], new])
    order = np.argsort(ids, kind="stable")
    return ids[order], order, keep


class _SparseBase:
    """An immutable sparse matrix of the first items' rows (CSR), its columns (CSC) and row sums."""

    def __init__(self, csr: sp.csr_matrix) -> None:
        self.csr = csr
        self._csc: sp.csc_matrix | None = None
        self._sums: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.csr.shape[0])

    def csc(self) -> sp.csc_matrix:
        if self._csc is None:
            self._csc = self.csr.tocsc()
            self._csc.sort_indices()
        return self._csc

    def sums(self) -> np.ndarray:
        if self._sums is None:
            self._sums = np.asarray(self.csr.sum(axis=1), dtype=np.float64).ravel()
        return self._sums


class _Layer:
    """Replaced or added rows (sorted gallery ``ids``, CSR ``rows``) with their column index."""

    def __init__(self, ids: np.ndarray, rows: sp.csr_matrix) -> None:
        self.ids, self.rows = ids, rows.tocsr()
        self._columns: sp.csc_matrix | None = None
        self._padded: tuple[int, sp.csc_matrix] | None = None
        self._sums: np.ndarray | None = None

    @classmethod
    def empty(cls, n: int) -> _Layer:
        return cls(np.empty(0, np.int64), sp.csr_matrix((0, n), dtype=np.float32))

    def __len__(self) -> int:
        return len(self.ids)

    def holds(self, rows: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(self.ids, rows), max(len(self.ids) - 1, 0))
        return self.ids[pos] == rows if len(self.ids) else np.zeros(len(rows), dtype=bool)

    def take(self, rows: np.ndarray, n: int) -> sp.csr_matrix:
        if not len(rows):
            return sp.csr_matrix((0, n), dtype=self.rows.dtype)
        return _resized(self.rows[np.searchsorted(self.ids, rows)], n)

    def columns(self, n: int) -> sp.csc_matrix:
        """(n × n) CSC whose stored rows are gallery ids (built once; a larger n only pads it).

        A layer is shared by the versions of a gallery that grew after it was made, and each
        version asks for its own n (concurrently, from request threads): the padded copy is
        cached as one ``(n, matrix)`` pair, replaced whole, never resized in place."""
        if self._columns is None:
            coo = self.rows.tocoo()
            size = self.rows.shape[1]
            built = sp.csc_matrix((coo.data, (self.ids[coo.row], coo.col)), shape=(size, size))
            built.sort_indices()
            self._columns = built
        built = self._columns
        if built.shape[0] == n:
            return built
        if n < built.shape[0]:
            raise ValueError(f"a layer of {built.shape[0]} columns asked for {n}")
        padded = self._padded
        if padded is None or padded[0] != n:
            indptr = np.concatenate([built.indptr, np.full(n - built.shape[0], built.indptr[-1], built.indptr.dtype)])
            padded = (n, sp.csc_matrix((built.data, built.indices, indptr), shape=(n, n)))
            self._padded = padded
        return padded[1]

    def sums(self) -> np.ndarray:
        if self._sums is None:
            self._sums = np.asarray(self.rows.sum(axis=1), dtype=np.float64).ravel()
        return self._sums

    def merged(self, other: _Layer, n: int) -> _Layer:
        """This layer with ``other``'s rows replacing or adding to its own."""
        if not len(other):
            return self if self.rows.shape[1] == n else _Layer(self.ids, _resized(self.rows, n))
        ids, order, keep = _merge_ids(self.ids, other.ids)
        stacked = sp.vstack([_resized(self.rows[np.flatnonzero(keep)], n), _resized(other.rows, n)], format="csr")
        return _Layer(ids, stacked[order])


class RowStore:
    """Rows of a sparse n×n structure: an immutable base and two layers of replaced or added rows
    — ``settled`` (its column index built once) and ``recent`` (small, re-indexed per enrolment,
    folded into ``settled`` when it grows) — so that an enrolment re-indexes only recent rows.

    ``store[rows]`` gives rows as CSR; :meth:`column_entries` and :meth:`shared_mass` read columns
    (an inverted index per part, rows that a later part replaces skipped).
    """

    def __init__(self, base: _SparseBase, n: int, settled: _Layer | None = None, recent: _Layer | None = None) -> None:
        self.base, self.n = base, n
        self.settled = settled or _Layer.empty(n)
        self.recent = recent or _Layer.empty(n)
        self._sums: np.ndarray | None = None
        self._lengths: np.ndarray | None = None

    @property
    def ids(self) -> np.ndarray:
        """Every row held outside the base."""
        return np.union1d(self.settled.ids, self.recent.ids)

    def _parts(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Masks of ``rows`` held by ``recent``, and by ``settled`` but not ``recent``."""
        in_recent = self.recent.holds(rows)
        return in_recent, self.settled.holds(rows) & ~in_recent

    def __getitem__(self, rows: np.ndarray) -> sp.csr_matrix:
        rows = np.asarray(rows, dtype=np.int64).ravel()
        in_recent, in_settled = self._parts(rows)
        in_base = ~(in_recent | in_settled)
        if in_base.all():
            return _resized(self.base.csr[rows], self.n)
        parts = [_resized(self.base.csr[rows[in_base]], self.n), self.settled.take(rows[in_settled], self.n),
                 self.recent.take(rows[in_recent], self.n)]
        order = np.argsort(np.concatenate([np.flatnonzero(m) for m in (in_base, in_settled, in_recent)]), kind="stable")
        return sp.vstack(parts, format="csr")[order]

    def _live(self, rows: np.ndarray, part: int) -> np.ndarray:
        """Entries of part 0 (base), 1 (settled) or 2 (recent) that no later part replaces."""
        if part == 2:
            return np.ones(len(rows), dtype=bool)
        live = ~self.recent.holds(rows)
        return live & ~self.settled.holds(rows) if part == 0 else live

    def column_entries(self, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows, values and the position in ``cols`` of every stored entry of columns ``cols``."""
        cols = np.asarray(cols, dtype=np.int64)
        rows, values, which = [], [], []
        base_cols = np.flatnonzero(cols < self.base.n)
        parts = [(self.base.csc(), base_cols)]
        parts += [(layer.columns(self.n), np.arange(len(cols))) for layer in (self.settled, self.recent) if len(layer)]
        for number, (columns, chosen) in enumerate(parts):
            c = cols[chosen]
            lengths = columns.indptr[c + 1] - columns.indptr[c]
            take = _ranges(columns.indptr[c], lengths)
            r, v, w = columns.indices[take], columns.data[take], np.repeat(chosen, lengths)
            live = self._live(r, number if number == 0 else (1 if len(self.settled) and number == 1 else 2))
            rows.append(r[live])
            values.append(v[live])
            which.append(w[live])
        return np.concatenate(rows), np.concatenate(values), np.concatenate(which)

    def shared_mass(self, left: sp.csr_matrix) -> sp.csr_matrix:
        """:func:`~vireid.retrieval.kreciprocal.shared_mass` of ``left`` against every row."""
        left = left.tocsr()
        inside = left.indices < self.base.n
        base_left = sp.csr_matrix((left.data * inside, left.indices * inside, left.indptr.copy()),
                                  shape=(left.shape[0], self.base.n))
        base_left.eliminate_zeros()
        mass = _resized(shared_mass(base_left, self.base.csc()), self.n)
        for number, layer in ((1, self.settled), (2, self.recent)):
            if len(layer):  # rows this layer replaces lose what the earlier parts gave them
                mass.data[~self._live(mass.indices, number - 1)] = 0.0
                mass = (mass + shared_mass(left, layer.columns(self.n))).tocsr()
        mass.eliminate_zeros()
        return mass

    def sums(self) -> np.ndarray:
        """(n,) row sums."""
        if self._sums is None:
            out = np.zeros(self.n, np.float64)
            out[: self.base.n] = self.base.sums()
            out[self.settled.ids] = self.settled.sums()
            out[self.recent.ids] = self.recent.sums()
            self._sums = out
        return self._sums

    def lengths(self) -> np.ndarray:
        """(n,) stored entries per row (the size of each row's set)."""
        if self._lengths is None:
            out = np.zeros(self.n, np.int64)
            out[: self.base.n] = np.diff(self.base.csr.indptr)
            out[self.settled.ids] = np.diff(self.settled.rows.indptr)
            out[self.recent.ids] = np.diff(self.recent.rows.indptr)
            self._lengths = out
        return self._lengths

    def with_rows(self, ids: np.ndarray, rows: sp.csr_matrix, n: int) -> RowStore:
        """A store of ``n`` rows where ``ids`` hold ``rows`` (recent rows fold into the settled
        layer once they outnumber a quarter of it)."""
        recent = self.recent.merged(_Layer(np.asarray(ids, dtype=np.int64), _resized(rows, n)), n)
        settled = self.settled
        if len(recent) > max(_RECENT_ROWS, len(settled) // 4):
            settled, recent = settled.merged(recent, n), _Layer.empty(n)
        return RowStore(self.base, n, settled, recent)

    def dense_csr(self) -> sp.csr_matrix:
        """Every row as one CSR matrix (for a new base)."""
        return self[np.arange(self.n)]


def _resized(matrix: sp.csr_matrix, n: int) -> sp.csr_matrix:
    """The same rows with ``n`` columns (no entry lies beyond)."""
    matrix = matrix.tocsr()
    return sp.csr_matrix((matrix.data, matrix.indices, matrix.indptr), shape=(matrix.shape[0], n))


# ----------------------------------------------------------------------------------- rows of each structure


def _aim_rows(graph: GraphStore, ids: np.ndarray, k1: int, k2: int) -> sp.csr_matrix:
    """SAAI Eq. 6–7 for rows ``ids``: ``normalize(mean_{n ∈ N(i, k2)} S_n)``, S_n the top-k1 row of n."""
    nearest = graph.index[ids, :k2].ravel()
    cols = graph.index[nearest, :k1].ravel()
    vals = graph.sim[nearest, :k1].ravel().astype(np.float64) / k2
    rows = np.repeat(np.arange(len(ids)), k2 * k1)
    matrix = sp.csr_matrix((vals, (rows, cols)), shape=(len(ids), graph.n))
    matrix.sum_duplicates()
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    matrix = sp.csr_matrix(sp.diags(1.0 / np.maximum(norms, NORM_EPS)) @ matrix, dtype=np.float32)
    matrix.sort_indices()
    return matrix


def _half_rows(graph: GraphStore, ids: np.ndarray, half: int) -> sp.csr_matrix:
    """The plain ``half``-reciprocal sets R(i, half) of rows ``ids`` (pattern, values 1)."""
    mask = reciprocal_mask(graph.as_graph(), half, rows=ids)
    forward = graph.index[ids, : half + 1]
    rows, _ = np.nonzero(mask)
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, forward[mask])), shape=(len(ids), graph.n))
    matrix.sort_indices()
    return matrix


def _reciprocal_rows(feats: np.ndarray, graph: GraphStore, ids: np.ndarray, k: int) -> sp.csr_matrix:
    """Zhong et al. Eq. 4–7 (paper): ``exp(−‖g_i − g_j‖)`` over the expanded k-reciprocal set of i."""
    pattern = expanded_k_reciprocal_sets(graph.as_graph(), k, rows=ids)
    rows = np.repeat(ids, np.diff(pattern.indptr))
    sim = pair_similarity(feats, feats, rows, pattern.indices)
    dist = np.sqrt(np.maximum(2.0 - 2.0 * sim, 0.0), dtype=np.float32)
    dist[rows == pattern.indices] = 0.0
    return gaussian_vectors(pattern, dist, normalize=False)


def _expanded_rows(vectors: RowStore, graph: GraphStore, ids: np.ndarray, k2: int) -> sp.csr_matrix:
    """Zhong et al. Eq. 11 for rows ``ids``: the mean of the vectors of their k2 nearest (self included)."""
    nearest = graph.index[ids, :k2]
    return local_expansion(vectors[nearest.ravel()], np.arange(nearest.size).reshape(nearest.shape))


def _same_rows(a: sp.csr_matrix, b: sp.csr_matrix) -> np.ndarray:
    """(rows,) bool: row i of ``a`` has exactly the column pattern of row i of ``b``."""
    a.sort_indices()
    b.sort_indices()
    lengths = np.diff(a.indptr)
    out = lengths == np.diff(b.indptr)
    rows = np.flatnonzero(out)
    take_a = _ranges(a.indptr[rows], lengths[rows])
    take_b = _ranges(b.indptr[rows], lengths[rows])
    differing = a.indices[take_a] != b.indices[take_b]
    out[rows[np.unique(np.repeat(np.arange(len(rows)), lengths[rows])[differing])]] = False
    return out


# ----------------------------------------------------------------------------------- the state


@dataclass
class StateDelta:
    """What one extension changed: the gallery grew from ``n_old`` to ``n`` items; the listed rows
    of the graph and of each structure hold their new values."""

    n_old: int
    n: int
    graph_ids: np.ndarray
    graph_index: np.ndarray
    graph_sim: np.ndarray
    rows: dict[str, tuple[np.ndarray, sp.csr_matrix]]

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"n_old": np.int64(self.n_old), "n": np.int64(self.n), "graph_ids": self.graph_ids,
               "graph_index": self.graph_index, "graph_sim": self.graph_sim}
        for key, (ids, matrix) in self.rows.items():
            out.update({f"{key}.ids": ids, f"{key}.indptr": matrix.indptr, f"{key}.indices": matrix.indices,
                        f"{key}.data": matrix.data})
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> StateDelta:
        n = int(arrays["n"])
        keys = sorted({name.rsplit(".", 1)[0] for name in arrays if name.endswith(".ids")})
        rows = {}
        for key in keys:
            ids = np.asarray(arrays[f"{key}.ids"], dtype=np.int64)
            rows[key] = (ids, sp.csr_matrix((arrays[f"{key}.data"], arrays[f"{key}.indices"], arrays[f"{key}.indptr"]),
                                            shape=(len(ids), n)))
        return cls(int(arrays["n_old"]), n, np.asarray(arrays["graph_ids"], np.int64), arrays["graph_index"],
                   arrays["graph_sim"], rows)

    def changed_rows(self) -> int:
        return int(len(self.graph_ids) + sum(len(ids) for ids, _ in self.rows.values()))


class GalleryState:
    """Everything single-query re-ranking needs besides the features, for a gallery of ``n`` items."""

    def __init__(self, params: SingleQueryParams, n: int, graph: GraphStore, stores: dict[str, RowStore]) -> None:
        self.params = params
        self.n = n
        self.effective = params.effective(n)
        self.graph = graph
        self.stores = stores

    # construction -----------------------------------------------------------------------------

    @classmethod
    def build(cls, feats: np.ndarray, params: SingleQueryParams, *, knn: str = "auto", seed: int = 0) -> GalleryState:
        """From unit-row features: the top-K graph, then every structure row. ``knn="auto"``: an
        exact graph up to :data:`EXACT_GRAPH_LIMIT` items, faiss IVF beyond
        (:mod:`~vireid.retrieval.knn`). An enrolment costs more on an approximate graph: an item
        enters every list whose (approximate) last entry it beats, more lists than on the exact graph."""
        n = len(feats)
        if n == 0:
            raise InputError("a gallery needs at least one item")
        k = params.effective(n).graph_k()
        if knn == "auto":
            knn = "exact" if n <= EXACT_GRAPH_LIMIT else "auto"
        graph = build_graph(NeighbourIndex(np.ascontiguousarray(feats, np.float32), knn, seed=seed), k)
        return cls.from_graph(feats, params, graph.index, graph.sim)

    @classmethod
    def from_graph(cls, feats: np.ndarray, params: SingleQueryParams, index: np.ndarray, sim: np.ndarray) -> GalleryState:
        """Every structure row derived from a complete graph (a base without overlay)."""
        n = len(feats)
        graph = GraphStore(_GraphBase(index, sim), n)
        state = cls(params, n, graph, {})
        everything = np.arange(n)
        stores: dict[str, RowStore] = {}
        for key, matrix in state._compute_rows(feats, everything, stores).items():
            stores[key] = RowStore(_SparseBase(matrix), n)
        state.stores = stores
        return state

    def _keys(self) -> list[str]:
        eff = self.effective
        ks = eff.reciprocal_ks()
        keys = ["aim"] + [f"half{reciprocal_half(k)}" for k in ks] + [f"recip{k}" for k in ks]
        keys = list(dict.fromkeys(keys))
        if int(eff.krr["k2"]) > 1:
            keys.append("krr_expanded")
        return keys

    def _compute_rows(self, feats: np.ndarray, ids: np.ndarray, stores: dict[str, RowStore]) -> dict[str, sp.csr_matrix]:
        """Rows ``ids`` of every structure, from this state's graph (``stores`` supplies the
        k-reciprocal vectors that the krr expansion averages: already updated ones)."""
        eff, graph = self.effective, self.graph
        out = {"aim": _aim_rows(graph, ids, int(eff.aim["k1"]), int(eff.aim["k2"]))}
        for k in eff.reciprocal_ks():
            out.setdefault(f"half{reciprocal_half(k)}", _half_rows(graph, ids, reciprocal_half(k)))
            out[f"recip{k}"] = _reciprocal_rows(feats, graph, ids, k)
        if "krr_expanded" in self._keys():
            k1 = int(eff.krr["k1"])
            vectors = stores.get(f"recip{k1}") or RowStore(_SparseBase(out[f"recip{k1}"]), self.n)
            out["krr_expanded"] = _expanded_rows(vectors, graph, ids, int(eff.krr["k2"]))
        return out

    # extension --------------------------------------------------------------------------------

    def extend(self, feats: np.ndarray, n_new: int) -> tuple[GalleryState, StateDelta | None]:
        """The state after appending the last ``n_new`` of ``feats`` (unit rows, ``self.n + n_new``
        of them), and what changed. ``None`` for the delta when everything was recomputed (the
        neighbourhood sizes changed with the gallery's size, or many items were added)."""
        n_old, n = self.n, self.n + n_new
        if n_new < 1:
            raise InputError("nothing to add")
        if len(feats) < n:
            raise InputError(f"extension needs {n} feature rows, got {len(feats)}")
        feats = np.ascontiguousarray(feats[:n], dtype=np.float32)
        if self.params.effective(n_old) != self.params.effective(n):
            return GalleryState.build(feats, self.params), None
        ids, index, sim, first_change = _extended_lists(self.graph, feats, n_old, n_new)
        graph = self.graph.with_rows(ids, index, sim, n)
        if n_new > _FULL_RECOMPUTE_FRACTION * n_old:
            dense_index, dense_sim = graph.dense()
            return GalleryState.from_graph(feats, self.params, dense_index, dense_sim), None
        state = GalleryState(self.params, n, graph, {})
        eff = state.effective

        def changed(m: int) -> np.ndarray:
            """Rows whose first m list entries changed (new rows included)."""
            return ids[first_change < m]

        old_rows = ids < n_old
        old_lists = self.graph.index[ids[old_rows], :]

        def left(m: int) -> np.ndarray:
            """Items pushed out of the first m entries of a changed list."""
            before, after = old_lists[:, :m], index[old_rows, :m]
            return np.unique(before[~(before[:, :, None] == after[:, None, :]).any(axis=2)])

        def reciprocal_candidates(m: int) -> np.ndarray:
            """Rows whose m−1-reciprocal set R(i, m−1) may differ (Zhong Eq. 3): a changed list, or
            an item pushed out of the list of one of its neighbours."""
            return np.union1d(changed(m), left(m))

        rows: dict[str, tuple[np.ndarray, sp.csr_matrix]] = {}
        stores: dict[str, RowStore] = {}

        def keep_changed(key: str, cand: np.ndarray, fresh: sp.csr_matrix, compare: bool) -> np.ndarray:
            old = cand < n_old
            differs = np.ones(len(cand), dtype=bool)
            if compare and old.any():
                differs[old] = ~_same_rows(fresh[np.flatnonzero(old)], self.stores[key][cand[old]])
            chosen = np.flatnonzero(differs)
            rows[key] = (cand[chosen], fresh[chosen])
            stores[key] = self.stores[key].with_rows(cand[chosen], fresh[chosen], n)
            return cand[chosen]

        half_changed: dict[int, np.ndarray] = {}
        for k in eff.reciprocal_ks():
            h = reciprocal_half(k)
            if h not in half_changed:
                cand = reciprocal_candidates(h + 1)
                half_changed[h] = keep_changed(f"half{h}", cand, _half_rows(graph, cand, h), compare=True)
        recip_changed: dict[int, np.ndarray] = {}
        for k in eff.reciprocal_ks():
            # R*(i, k) (Eq. 4) reads R(i, k) and, for its members j, N(j, h+1) and R(j, h)
            h = reciprocal_half(k)
            grown = graph.referencing(np.union1d(changed(h + 1), half_changed[h]), k + 1)
            cand = np.union1d(reciprocal_candidates(k + 1), grown)
            recip_changed[k] = keep_changed(f"recip{k}", cand, _reciprocal_rows(feats, graph, cand, k), compare=True)
        k1, k2 = int(eff.aim["k1"]), int(eff.aim["k2"])
        cand = np.union1d(changed(k2), graph.referencing(changed(k1), k2))
        keep_changed("aim", cand, _aim_rows(graph, cand, k1, k2), compare=False)
        if "krr_expanded" in self._keys():
            krr_k1, krr_k2 = int(eff.krr["k1"]), int(eff.krr["k2"])
            cand = np.union1d(changed(krr_k2), graph.referencing(recip_changed[krr_k1], krr_k2))
            keep_changed("krr_expanded", cand, _expanded_rows(stores[f"recip{krr_k1}"], graph, cand, krr_k2),
                         compare=False)
        state.stores = stores
        state.prepare()
        delta = StateDelta(n_old, n, ids, index, sim, rows)
        return state, delta

    def apply(self, delta: StateDelta) -> GalleryState:
        """This state with a stored extension applied (loading base + deltas)."""
        if delta.n_old != self.n:
            raise InputError(f"delta extends a gallery of {delta.n_old} items, the state holds {self.n}")
        graph = self.graph.with_rows(delta.graph_ids, delta.graph_index, delta.graph_sim, delta.n)
        stores = {key: store.with_rows(*delta.rows[key], delta.n) if key in delta.rows
                  else store.with_rows(np.empty(0, np.int64), sp.csr_matrix((0, delta.n), dtype=np.float32), delta.n)
                  for key, store in self.stores.items()}
        state = GalleryState(self.params, delta.n, graph, stores)
        state.prepare()
        return state

    # layout -----------------------------------------------------------------------------------

    def overlay_fraction(self) -> float:
        """Rows held in overlays relative to the base rows (what :meth:`compacted` removes)."""
        overlaid = len(self.graph.ids) + sum(len(s.ids) for s in self.stores.values())
        return overlaid / max(1, self.graph.base.n * (1 + len(self.stores)))

    def compacted(self) -> GalleryState:
        """The same state with every overlay folded into a new base."""
        index, sim = self.graph.dense()
        stores = {key: RowStore(_SparseBase(store.dense_csr()), self.n) for key, store in self.stores.items()}
        return GalleryState(self.params, self.n, GraphStore(_GraphBase(index, sim), self.n), stores)

    def prepare(self) -> None:
        """Index the overlay layers' columns and sum the rows now (the writer pays, not the next search)."""
        for store in self.stores.values():
            for layer in (store.settled, store.recent):
                if len(layer):
                    layer.columns(self.n)
            store.sums()

    def warm_up(self) -> None:
        """Build the lazily derived lookups (reverse graph index, column indexes, row sums) and
        compile the SGR kernels now, not in the first enrolment or search (cheap when done)."""
        self.graph.base.reverse()
        for store in self.stores.values():
            store.base.csc()
            store.sums()
        for method in ("sgr", "sim"):
            p = self.effective.method(method)
            preload_compiled_kernel(int(p["k_graph"]), int(p["K"]), np.float64)   # single-query SGR's dtype

    def base_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of a base-only state (see :meth:`compacted`)."""
        if len(self.graph.ids) or any(len(s.ids) for s in self.stores.values()):
            raise ValueError("only a compacted state is stored as a base")
        out = {"n": np.int64(self.n), "graph_index": self.graph.base.index, "graph_sim": self.graph.base.sim}
        for key, store in self.stores.items():
            csr = store.base.csr
            out.update({f"{key}.indptr": csr.indptr, f"{key}.indices": csr.indices, f"{key}.data": csr.data})
        return out

    @classmethod
    def from_base_arrays(cls, arrays: Mapping[str, np.ndarray], params: SingleQueryParams) -> GalleryState:
        n = int(arrays["n"])
        graph = GraphStore(_GraphBase(arrays["graph_index"], arrays["graph_sim"]), n)
        state = cls(params, n, graph, {})
        stores = {}
        for key in state._keys():
            csr = sp.csr_matrix((arrays[f"{key}.data"], arrays[f"{key}.indices"], arrays[f"{key}.indptr"]), shape=(n, n))
            stores[key] = RowStore(_SparseBase(csr), n)
        state.stores = stores
        if graph.k != state.effective.graph_k() or graph.base.n != n:
            raise InputError(f"stored graph has shape {graph.base.index.shape}, expected ({n}, {state.effective.graph_k()})")
        return state


_SCORE_BUDGET = 1 << 24  # similarity entries computed at once by an extension


def _extended_lists(graph: GraphStore, feats: np.ndarray, n_old: int,
                    n_new: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lists after appending ``n_new`` items: (changed or new rows, their index and sim lists, the
    first list position that changed). New rows search every item exactly (self first); an old row
    merges the new items that beat its last entry (old entries first among equal similarities)."""
    n, k = n_old + n_new, graph.k
    new_ids = np.arange(n_old, n)
    new_index = np.empty((n_new, k), np.int64)
    new_sim = np.empty((n_new, k), np.float32)
    step = max(1, _SCORE_BUDGET // n)
    kth = graph.column(k - 1)[:n_old]
    work_index, work_sim = None, None
    if n_new > step:  # many new items: merge into dense copies of the old lists, block by block
        rows = np.arange(n_old)
        work_index, work_sim = graph.index[rows, :], graph.sim[rows, :]
        original = work_index.copy()
    hit_rows, hit_index, hit_sim, hit_first = [], [], [], []
    for start in range(0, n_new, step):
        stop = min(start + step, n_new)
        scores = feats[n_old + start:n_old + stop] @ feats.T                    # (b, n)
        own = np.arange(stop - start)
        scores[own, n_old + start + own] = np.inf                              # self first
        new_sim[start:stop], new_index[start:stop] = topk_largest(scores, k)
        old_scores = scores[:, :n_old].T                                        # (n_old, b)
        if work_index is None:
            hits = np.flatnonzero((old_scores > kth[:, None]).any(axis=1))
            if len(hits):
                old_index, old_sim = graph.index[hits, :], graph.sim[hits, :]
                cand_index = np.concatenate([old_index, np.broadcast_to(new_ids[start:stop], (len(hits), stop - start))], 1)
                cand_sim = np.concatenate([old_sim, old_scores[hits]], axis=1)
                pick = np.argsort(-cand_sim, axis=1, kind="stable")[:, :k]
                merged = np.take_along_axis(cand_index, pick, axis=1)
                hit_rows.append(hits)
                hit_index.append(merged)
                hit_sim.append(np.take_along_axis(cand_sim, pick, axis=1))
                hit_first.append((merged != old_index).argmax(axis=1))
        else:
            hits = np.flatnonzero((old_scores > work_sim[:, -1:]).any(axis=1))
            cand_index = np.concatenate([work_index[hits], np.broadcast_to(new_ids[start:stop], (len(hits), stop - start))], 1)
            cand_sim = np.concatenate([work_sim[hits], old_scores[hits]], axis=1)
            pick = np.argsort(-cand_sim, axis=1, kind="stable")[:, :k]
            work_index[hits] = np.take_along_axis(cand_index, pick, axis=1)
            work_sim[hits] = np.take_along_axis(cand_sim, pick, axis=1)
    new_sim[:, 0] = 1.0
    if work_index is not None:
        differs = work_index != original
        hits = np.flatnonzero(differs.any(axis=1))
        hit_rows, hit_index, hit_sim, hit_first = [hits], [work_index[hits]], [work_sim[hits]], [differs[hits].argmax(axis=1)]
    ids = np.concatenate(hit_rows + [new_ids])
    index = np.concatenate(hit_index + [new_index])
    sim = np.concatenate(hit_sim + [new_sim]).astype(np.float32)
    first = np.concatenate(hit_first + [np.zeros(n_new, np.int64)])
    return ids, index, sim, first
