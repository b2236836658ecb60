"""k-nearest-neighbour search by inner product on L2-normalised float32 features.

Four searchers share one interface, :class:`NeighbourIndex`:

==========  ====================================================================================
``exact``   brute force, blocked over the queries (faiss ``knn``: BLAS matmul + heap).
``ivf``     inverted file over faiss k-means centroids (the coarse quantizer of ``IndexIVFFlat``,
            inner product). ``nlist`` = the power of two nearest to 2·sqrt(N) (at least 16),
            trained by 10 k-means iterations on ``64·nlist`` points drawn with the seed. Each
            item scans the lists of its ``nprobe`` = 16 nearest centroids (graph), each query its
            ``query_nprobe`` = 64 (so do query rows of a query+gallery pool). At G = 100k this
            keeps ranked ``aim``/``sim``/``krr`` within 0.35 points of exact kNN (8 / 32 lost up
            to 1.0; ``docs/reranking.md``, "Scale"). The scan is done list by list: one matmul
            between a list's members and every row probing it, merged into running top-k arrays,
            so a million-item graph is compute-bound (BLAS) instead of memory-bound.
``hnsw``    faiss ``IndexHNSWFlat``: ``M`` = 32 links, ``efConstruction`` = 80, ``efSearch`` = 128.
``auto``    ``exact`` while the base has at most :data:`AUTO_EXACT_MAX_BASE` (50,000) vectors
            (its self-graph is then <= 2.5e9 inner products, ~20 s on two cores at d = 512),
            ``ivf`` beyond.
==========  ====================================================================================

Results are ``(index int64 (n, k), similarity float32 (n, k))``, best first. faiss uses the
threads set by ``faiss.omp_set_num_threads``; nothing here changes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from vireid.errors import InputError
from vireid.retrieval.exact import l2_normalize

KNN_METHODS: tuple[str, ...] = ("auto", "exact", "ivf", "hnsw")
AUTO_EXACT_MAX_BASE = 50_000
_BLOCK_ELEMENTS = 1 << 24  # similarity entries per matmul block (64 MiB float32)
# queries per faiss ``knn`` call of the exact search: faiss tiles the base itself (4096 x 1024 blocks),
# so memory is only rows x k, while each call reads the whole base once: small calls are memory-bound
# (167 rows per call over 100k items cost as much as 1,024).
_EXACT_QUERY_BLOCK = 8192


@dataclass(frozen=True)
class IvfParams:
    """IVF settings; ``nlist=None`` picks the power of two nearest to 2·sqrt(N).

    ``nprobe`` lists are scanned per item for the gallery graph, ``query_nprobe`` per query (queries
    come from the other modality, so their neighbours spread over more lists; there are few of them).
    """

    nlist: int | None = None
    nprobe: int = 16
    query_nprobe: int = 64
    train_points_per_list: int = 64
    kmeans_iterations: int = 10


@dataclass(frozen=True)
class HnswParams:
    """faiss IndexHNSWFlat settings."""

    M: int = 32
    ef_construction: int = 80
    ef_search: int = 128


def normalise_float32(features: np.ndarray, *, name: str) -> np.ndarray:
    """Row-wise L2 normalisation to C-contiguous float32 (faiss' input format).

    Rows already of unit norm (within float32 rounding) are returned without a copy: at a million
    rows every copy is 2 GiB.
    """
    x = np.asarray(features)
    if x.dtype == np.float32 and x.ndim == 2 and x.size and x.flags.c_contiguous:
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        if np.all(np.abs(norms - 1.0) <= 1e-6):
            return x
    return np.ascontiguousarray(l2_normalize(features, np.dtype(np.float32), name=name))


def resolve_knn(method: str, n_base: int) -> str:
    """The concrete searcher ``auto`` stands for at this base size (see module docstring)."""
    if method not in KNN_METHODS:
        raise InputError(f"unknown knn method {method!r} (choose from {', '.join(KNN_METHODS)})")
    if method == "auto":
        return "exact" if n_base <= AUTO_EXACT_MAX_BASE else "ivf"
    return method


def default_nlist(n_base: int) -> int:
    """Power of two nearest to 2·sqrt(n_base), at least 16 and at most n_base // 8 (>= 1)."""
    nlist = 2 ** round(math.log2(max(2.0 * math.sqrt(n_base), 1.0)))
    return int(max(1, min(max(nlist, 16), n_base // 8)))


class NeighbourIndex:
    """A searchable set of L2-normalised float32 base vectors (the gallery, or query+gallery pool)."""

    def __init__(
        self,
        base: np.ndarray,
        method: str = "auto",
        *,
        ivf: IvfParams = IvfParams(),
        hnsw: HnswParams = HnswParams(),
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        import faiss

        self.base = normalise_float32(base, name="base features")
        self.method = resolve_knn(method, len(self.base))
        self.ivf_params = ivf
        self.hnsw_params = hnsw
        self.progress = progress
        n, d = self.base.shape
        if self.method == "ivf":
            nlist = ivf.nlist or default_nlist(n)
            if not 1 <= nlist <= n or ivf.nprobe < 1 or ivf.query_nprobe < 1:
                raise InputError(f"ivf nlist={nlist} must lie in [1, {n}] and nprobe={ivf.nprobe}, "
                                 f"query_nprobe={ivf.query_nprobe} must be >= 1")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.niter = ivf.kmeans_iterations
            index.cp.seed = seed
            index.cp.max_points_per_centroid = ivf.train_points_per_list
            n_train = min(n, ivf.train_points_per_list * nlist)
            train = self.base[np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))]
            with tqdm(total=1, desc=f"ivf: k-means ({nlist} lists)", disable=not progress) as bar:
                index.train(train)
                bar.update()
            self._ivf = index  # owns the quantizer
            self._quantizer = index.quantizer
            self._probes = self._probe(self.base, ivf.nprobe)
            self._lists = _InvertedLists.build(self._probes[:, 0], nlist)
        elif self.method == "hnsw":
            index = faiss.IndexHNSWFlat(d, hnsw.M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = hnsw.ef_construction
            index.hnsw.efSearch = hnsw.ef_search
            step = 65536
            for start in tqdm(range(0, n, step), desc="hnsw: build", disable=not progress):
                index.add(self.base[start:start + step])
            self._hnsw = index

    def __len__(self) -> int:
        return len(self.base)

    def search(self, queries: np.ndarray, k: int, *, base_range: tuple[int, int] | None = None,
               desc: str = "knn search") -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar base vectors of each (normalised) query, best first.

        ``base_range=(lo, hi)`` restricts the answers to base rows ``lo <= i < hi``.
        """
        q = normalise_float32(queries, name="query features")
        lo, hi = base_range or (0, len(self.base))
        if not 0 <= lo < hi <= len(self.base):
            raise InputError(f"base_range {base_range} outside [0, {len(self.base)}]")
        _check_k(k, hi - lo)
        if self.method == "ivf":
            probes = _probe_pairs(self._probe(q, self.ivf_params.query_nprobe))
            idx, sim = self._ivf_search(q, probes, k, lo, hi, desc)
        elif self.method == "hnsw":
            idx, sim = self._hnsw_search(q, k, base_range, desc)
        else:
            idx, sim = self._exact_search(q, k, lo, hi, desc)
        _fill_missing(idx, sim, q, self.base, lo, hi)
        return idx, sim

    def self_search(self, k: int, *, query_rows: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest base vectors of every base vector, itself included at column 0.

        ``query_rows``: the first rows of the base are queries of the other modality (the pool of
        k-reciprocal re-ranking); with ``ivf`` they probe ``query_nprobe`` lists, not ``nprobe``.
        """
        _check_k(k, len(self.base))
        if not 0 <= query_rows <= len(self.base):
            raise InputError(f"query_rows={query_rows} outside [0, {len(self.base)}]")
        if self.method == "ivf":
            rows, lists = _probe_pairs(self._probes[query_rows:], offset=query_rows)
            if query_rows:
                query_pairs = _probe_pairs(self._probe(self.base[:query_rows], self.ivf_params.query_nprobe))
                rows, lists = np.concatenate([query_pairs[0], rows]), np.concatenate([query_pairs[1], lists])
            idx, sim = self._ivf_search(self.base, (rows, lists), k, 0, len(self.base), "knn graph (ivf)")
            _fill_missing(idx, sim, self.base, self.base, 0, len(self.base))
        else:
            idx, sim = self.search(self.base, k, desc="knn graph")
        return _self_first(idx, sim)

    def _exact_search(self, q: np.ndarray, k: int, lo: int, hi: int, desc: str) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        idx = np.empty((len(q), k), dtype=np.int64)
        sim = np.empty((len(q), k), dtype=np.float32)
        step = _EXACT_QUERY_BLOCK
        for start in tqdm(range(0, len(q), step), desc=desc, disable=not self.progress):
            s, i = faiss.knn(q[start:start + step], self.base[lo:hi], k, metric=faiss.METRIC_INNER_PRODUCT)
            idx[start:start + step] = i + lo
            sim[start:start + step] = s
        return idx, sim

    def _hnsw_search(self, q: np.ndarray, k: int, base_range: tuple[int, int] | None,
                     desc: str) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        selector = None if base_range is None else faiss.IDSelectorRange(*base_range)
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.hnsw_params.ef_search, k))
        idx = np.empty((len(q), k), dtype=np.int64)
        sim = np.empty((len(q), k), dtype=np.float32)
        step = 16384
        for start in tqdm(range(0, len(q), step), desc=desc, disable=not self.progress):
            sim[start:start + step], idx[start:start + step] = self._hnsw.search(q[start:start + step], k,
                                                                               params=params)
        return idx, sim

    def _probe(self, x: np.ndarray, nprobe: int) -> np.ndarray:
        """(n, nprobe) the lists whose centroids are most similar to each row, best first."""
        nprobe = min(nprobe, self._quantizer.ntotal)
        out = np.empty((len(x), nprobe), dtype=np.int64)
        step = max(1, _BLOCK_ELEMENTS // self._quantizer.ntotal)
        for start in tqdm(range(0, len(x), step), desc="ivf: assign", disable=not self.progress):
            out[start:start + step] = self._quantizer.search(x[start:start + step], nprobe)[1]
        return out

    def _ivf_search(self, x: np.ndarray, probes: tuple[np.ndarray, np.ndarray], k: int, lo: int, hi: int,
                    desc: str) -> tuple[np.ndarray, np.ndarray]:
        """IVF-flat search by list: every list is scanned once, by one matmul with all rows probing it,
        and each row keeps a running top-k (the scan is compute-bound rather than memory-bound).

        ``probes``: flat ``(row of x, list)`` pairs, each row with its lists (rows may differ in count).
        """
        import faiss

        n = len(x)
        best_sim = np.full((n, k), -np.inf, dtype=np.float32)
        best_idx = np.full((n, k), -1, dtype=np.int64)
        probe_rows, probe_lists = probes
        probing = _InvertedLists.build(probe_lists, self._lists.n_lists)
        for lst in tqdm(range(self._lists.n_lists), desc=desc, disable=not self.progress):
            rows = probe_rows[probing.members(lst)]
            members = self._lists.members(lst)
            if lo > 0 or hi < len(self.base):
                members = members[(members >= lo) & (members < hi)]
            if not len(rows) or not len(members):
                continue
            feat = self.base[members]
            kk = min(k, len(members))
            step = max(1, _BLOCK_ELEMENTS // len(members))
            for start in range(0, len(rows), step):
                part = rows[start:start + step]
                sim, pos = faiss.knn(x[part], feat, kk, metric=faiss.METRIC_INNER_PRODUCT)
                merged_sim = np.concatenate([best_sim[part], sim], axis=1)
                merged_idx = np.concatenate([best_idx[part], members[pos]], axis=1)
                keep = np.argpartition(-merged_sim, k - 1, axis=1)[:, :k]
                best_sim[part] = np.take_along_axis(merged_sim, keep, axis=1)
                best_idx[part] = np.take_along_axis(merged_idx, keep, axis=1)
        order = np.argsort(-best_sim, axis=1, kind="stable")
        return np.take_along_axis(best_idx, order, axis=1), np.take_along_axis(best_sim, order, axis=1)


@dataclass(frozen=True)
class _InvertedLists:
    """Items grouped by list: ``order[starts[l]:starts[l + 1]]`` are the items of list l."""

    order: np.ndarray
    starts: np.ndarray

    @property
    def n_lists(self) -> int:
        return len(self.starts) - 1

    @classmethod
    def build(cls, assignment: np.ndarray, n_lists: int) -> _InvertedLists:
        order = np.argsort(assignment, kind="stable")
        return cls(order, np.searchsorted(assignment[order], np.arange(n_lists + 1)))

    def members(self, lst: int) -> np.ndarray:
        return self.order[self.starts[lst]:self.starts[lst + 1]]


def _probe_pairs(probes: np.ndarray, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(n, nprobe)`` probed lists as flat ``(row + offset, list)`` pairs."""
    rows = np.repeat(np.arange(offset, offset + len(probes)), probes.shape[1])
    return rows, probes.ravel()


def knn_search(queries: np.ndarray, base: np.ndarray, k: int, method: str = "auto", *, seed: int = 0,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One-shot search: the ``k`` most similar ``base`` rows of each query (see :class:`NeighbourIndex`)."""
    return NeighbourIndex(base, method, seed=seed, progress=progress).search(queries, k)


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise InputError(f"k={k} is larger than the number of searchable vectors ({n})")


def _fill_missing(idx: np.ndarray, sim: np.ndarray, queries: np.ndarray, base: np.ndarray, lo: int, hi: int) -> None:
    """Approximate indexes may return fewer than k answers (-1): fill those rows exactly."""
    import faiss

    bad = np.flatnonzero((idx < 0).any(axis=1))
    if len(bad):
        s, i = faiss.knn(queries[bad], base[lo:hi], idx.shape[1], metric=faiss.METRIC_INNER_PRODUCT)
        idx[bad] = i + lo
        sim[bad] = s


def _self_first(idx: np.ndarray, sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Put each row's own index at column 0 with similarity exactly 1 (the ``cdist`` convention)."""
    wrong = np.flatnonzero(idx[:, 0] != np.arange(len(idx)))
    for r in wrong:
        others = idx[r] != r
        kept_idx = idx[r][others][: idx.shape[1] - 1]
        kept_sim = sim[r][others][: idx.shape[1] - 1]
        idx[r] = np.concatenate(([r], kept_idx))
        sim[r] = np.concatenate(([np.float32(1.0)], kept_sim))
    sim[:, 0] = 1.0
    return idx, sim
