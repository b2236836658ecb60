"""k-nearest-neighbour search by inner product on L2-normalised float32 features.

Four searchers share one interface, :class:`NeighbourIndex`:

==========  ====================================================================================
``exact``   brute force, blocked over the queries (faiss ``knn``: BLAS matmul + heap).
``ivf``     inverted file over faiss k-means centroids (the coarse quantizer of ``IndexIVFFlat``,
            inner product). ``nlist`` = the power of two nearest to 2·sqrt(N) (at least 16),
            trained by 10 k-means iterations on ``64·nlist`` points drawn with the seed. Each row
            scans the lists of its ``nprobe`` nearest centroids. The scan is done list by list: one
            matmul between a list's members and every row probing it, merged into running top-k
            arrays, so a million-item graph is compute-bound (BLAS) instead of memory-bound.
``hnsw``    faiss ``IndexHNSWFlat``: ``M`` = 32 links, ``efConstruction`` = 80; ``efSearch``.
``auto``    ``exact`` while the base has at most :data:`AUTO_EXACT_MAX_BASE` (50,000) vectors
            (its self-graph is then <= 2.5e9 inner products, ~20 s on two cores at d = 512),
            ``ivf`` beyond.
==========  ====================================================================================

``nprobe`` / ``efSearch`` are chosen per search. With a :class:`RecallTarget` (the ranked-list
mode's default, target 0.99) vireid measures, before each approximate search, the exact neighbour
lists of a seeded sample of its rows (faiss ``knn``; a search of at most twice the sample's rows is
exact instead: the measurement alone would cost half an exact search), measures the approximate
search's recall on the same rows with growing ``nprobe`` (4, 6, 8, 12, 16, 24, … lists) or ``efSearch`` (max(k, 16), then doubling), and keeps the
first value whose recall@k — the fraction of the exact k nearest found, averaged over the rows
(faiss' ``knn_intersection_measure``, computed vectorised; in a self graph: of the k − 1 nearest
other items) — reaches the target. The IVF scan is exact on the lists it scans, so its recall at
each ``nprobe`` is counted without scanning: the share of the sampled rows' exact neighbours whose
list is among the row's ``nprobe`` nearest (the lists the search then scans, so the measured recall
estimates the search's own); HNSW searches the sample at each ``efSearch``. Budget: an approximate search may compute at most
``max_scan_fraction`` of the inner products of an exact search (IVF: the sizes of the probed lists,
what faiss' ``IndexIVFStats.ndis`` counts; HNSW: faiss' ``hnsw_stats.ndis``), and at most
``max_scan_products`` in all (what bounds the time of a million-item graph). If the target is not
met within it, the search is exact when that costs at most ``exact_max_products`` inner products
(rows × base), otherwise it runs with the best value reached; a warning says so in one line. Without
a target, the fixed :class:`IvfParams` / :class:`HnswParams` values are used. Every search leaves a
:class:`SearchReport` in :attr:`NeighbourIndex.reports`.

faiss' ``ParameterSpace`` is not used for IVF: it explores faiss' own ``IndexIVFFlat.search``,
which needs a second copy of the base in faiss' inverted lists (2 GiB at a million) and is not the
list-major scan that builds the graph; counting the recall from the exact neighbours' lists is
cheaper and exact.

Results are ``(index int64 (n, k), similarity float32 (n, k))``, best first. faiss uses the
threads set by ``faiss.omp_set_num_threads``; nothing here changes them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from vireid.errors import InputError
from vireid.progress import progress_bar
from vireid.retrieval.exact import l2_normalize, merge_above_kth, open_lists

log = logging.getLogger(__name__)

KNN_METHODS: tuple[str, ...] = ("auto", "exact", "ivf", "hnsw")
AUTO_EXACT_MAX_BASE = 50_000
MAX_SCAN_PRODUCTS = 2e10
"""Most inner products an approximate search may compute in all, whatever its share of an exact
search (2 % of a million-item graph, about 5 minutes of IVF scan on two cores at d = 512), and the
most an exact search replacing one that misses its recall target may compute (a graph of 141,000
items, about 2 minutes on two cores: an exact product costs less than half an IVF one)."""
_IVF_LADDER_START = 4
_BLOCK_ELEMENTS = 1 << 24  # similarity entries per matmul block (64 MiB float32)
# queries per faiss ``knn`` call of the exact search: faiss tiles the base itself (4096 x 1024 blocks),
# so memory is only rows x k, while each call reads the whole base once: small calls are memory-bound
# (167 rows per call over 100k items cost as much as 1,024).
_EXACT_QUERY_BLOCK = 8192


@dataclass(frozen=True)
class IvfParams:
    """IVF settings; ``nlist=None`` picks the power of two nearest to 2·sqrt(N).

    ``nprobe`` lists are scanned per item for the gallery graph, ``query_nprobe`` per query (queries
    come from the other modality, so their neighbours spread over more lists; there are few of them)
    when no :class:`RecallTarget` is given. ``nprobe`` is also how many probes per item are kept from
    the list assignment (a recall-targeted graph needing more recomputes them).
    """

    nlist: int | None = None
    nprobe: int = 16
    query_nprobe: int = 64
    train_points_per_list: int = 64
    kmeans_iterations: int = 10


@dataclass(frozen=True)
class HnswParams:
    """faiss IndexHNSWFlat settings (``ef_search``: used without a :class:`RecallTarget`)."""

    M: int = 32
    ef_construction: int = 80
    ef_search: int = 128


@dataclass(frozen=True)
class RecallTarget:
    """Recall-targeted approximate search (module docstring): ``target`` recall@k, measured on
    ``sample`` rows per search; budget ``max_scan_fraction`` of an exact search's inner products and
    at most ``max_scan_products`` in all; exact search as the fallback while it costs at most
    ``exact_max_products`` inner products."""

    target: float = 0.99
    sample: int = 1000
    max_scan_fraction: float = 0.25
    max_scan_products: float = MAX_SCAN_PRODUCTS
    exact_max_products: float = MAX_SCAN_PRODUCTS

    def __post_init__(self) -> None:
        if not 0.0 < self.target <= 1.0:
            raise InputError(f"recall target {self.target!r} must lie in (0, 1]")
        if not isinstance(self.sample, (int, np.integer)) or self.sample < 1:
            raise InputError(f"recall sample {self.sample!r} must be a positive integer")
        if not 0.0 < self.max_scan_fraction <= 1.0:
            raise InputError(f"recall budget max_scan_fraction={self.max_scan_fraction!r} must lie in (0, 1]")
        if not self.max_scan_products > 0:
            raise InputError(f"recall budget max_scan_products={self.max_scan_products!r} must be > 0")
        if self.exact_max_products < 0:
            raise InputError(f"exact_max_products={self.exact_max_products!r} must be >= 0")


@dataclass(frozen=True)
class SearchReport:
    """What one neighbour search did.

    ``outcome``: ``exact`` (exact search asked for), ``fixed`` (approximate, fixed parameter, recall
    not measured), ``exact, few rows`` (at most twice the sample's rows: measuring the recall would
    cost half an exact search or more), ``met`` (the target holds on the sample), ``exact fallback`` (not met within the
    budget, searched exactly; ``note`` gives the best approximate setting tried), ``below target``
    (not met, searched with the best value reached). ``method``/``parameter``/``value``: what the
    search used; ``recall``: its recall@k on the ``sample`` rows (1.0 for exact search, ``None`` when
    not measured); ``scan_fraction``: its inner products per row over an exact search's.
    """

    name: str
    rows: int
    k: int
    method: str
    parameter: str | None
    value: int | None
    recall: float | None
    sample: int
    target: float | None
    scan_fraction: float | None
    outcome: str
    seconds: float
    note: str = ""

    def line(self) -> str:
        head = f"knn {self.name} ({self.rows:,} rows, k={self.k})"
        setting = f"{self.method} {self.parameter} {self.value}" if self.parameter else self.method
        if self.outcome == "exact":
            return f"{head}: exact"
        if self.outcome == "exact, few rows":
            return f"{head}: exact (measuring the recall of an approximate search would cost half as much or more)"
        if self.outcome == "fixed":
            return f"{head}: {setting} (fixed; recall not measured)"
        measured = _measured(self.k, self.recall, self.sample, self.scan_fraction)
        if self.outcome == "met":
            return f"{head}: {setting}, {measured} (target {self.target})"
        if self.outcome == "exact fallback":
            return (f"{head}: recall target {self.target} not met within the budget ({self.note}); "
                    f"searched exactly instead")
        return f"{head}: recall target {self.target} NOT met within the budget: continuing with {setting}, {measured}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _measured(k: int, recall: float | None, sample: int, fraction: float | None) -> str:
    scanned = "" if fraction is None else f", scanning {100 * fraction:.1f} % of an exact search"
    return f"recall@{k} {recall:.4f} on {sample:,} sampled rows{scanned}"


@dataclass(frozen=True)
class _Plan:
    method: str          # "exact", "ivf" or "hnsw"
    value: int | None    # nprobe / efSearch


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
    """A searchable set of L2-normalised float32 base vectors (the gallery, or query+gallery pool).

    ``recall``: choose ``nprobe`` / ``efSearch`` per search to reach a recall target (module
    docstring); ``None`` uses the fixed values of ``ivf`` / ``hnsw``. :attr:`reports` lists every
    search done so far (:class:`SearchReport`).
    """

    def __init__(
        self,
        base: np.ndarray,
        method: str = "auto",
        *,
        ivf: IvfParams = IvfParams(),
        hnsw: HnswParams = HnswParams(),
        recall: RecallTarget | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        import faiss

        self.base = normalise_float32(base, name="base features")
        self.method = resolve_knn(method, len(self.base))
        self.ivf_params = ivf
        self.hnsw_params = hnsw
        self.recall = recall
        self.seed = seed
        self.progress = progress
        self.reports: list[SearchReport] = []
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
            with progress_bar(total=1, desc=f"ivf: k-means ({nlist} lists)", enabled=progress) as bar:
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
            for start in progress_bar(range(0, n, step), desc="hnsw: build", enabled=progress):
                index.add(self.base[start:start + step])
            self._hnsw = index

    def __len__(self) -> int:
        return len(self.base)

    def search(self, queries: np.ndarray, k: int, *, base_range: tuple[int, int] | None = None,
               desc: str = "knn search", name: str = "query lists") -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar base vectors of each (normalised) query, best first.

        ``base_range=(lo, hi)`` restricts the answers to base rows ``lo <= i < hi``; ``name`` labels
        the search in :attr:`reports` and the log.
        """
        q = normalise_float32(queries, name="query features")
        lo, hi = base_range or (0, len(self.base))
        if not 0 <= lo < hi <= len(self.base):
            raise InputError(f"base_range {base_range} outside [0, {len(self.base)}]")
        _check_k(k, hi - lo)
        plan = self._plan(q, None, k, lo, hi, name=name, query_side=True)
        if plan.method == "ivf":
            idx, sim = self._ivf_search(q, _probe_pairs(self._probe(q, plan.value)), k, lo, hi, desc)
        elif plan.method == "hnsw":
            idx, sim = self._hnsw_search(q, k, base_range, plan.value, desc)
        else:
            idx, sim = self._exact_search(q, k, lo, hi, desc)
        _fill_missing(idx, sim, q, self.base, lo, hi)
        return idx, sim

    def self_search(self, k: int, *, query_rows: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest base vectors of every base vector, itself included at column 0.

        ``query_rows``: the first rows of the base are queries of the other modality (the pool of
        k-reciprocal re-ranking); they are searched (and tuned) as queries, the rest as the graph.
        """
        n = len(self.base)
        _check_k(k, n)
        if not 0 <= query_rows <= n:
            raise InputError(f"query_rows={query_rows} outside [0, {n}]")
        parts = [(0, query_rows, True, "pool graph (query rows)"),
                 (query_rows, n, False, "pool graph (gallery rows)" if query_rows else "gallery graph")]
        parts = [part for part in parts if part[1] > part[0]]
        plans = [self._plan(self.base[a:b], np.arange(a, b), k, 0, n, name=name, query_side=query_side)
                 for a, b, query_side, name in parts]
        idx = np.empty((n, k), dtype=np.int64)
        sim = np.empty((n, k), dtype=np.float32)
        ivf_parts = [(a, b, plan.value) for (a, b, _, _), plan in zip(parts, plans) if plan.method == "ivf"]
        if ivf_parts:  # one list-major scan for every IVF row
            pairs = [_probe_pairs(self._probe_rows(self.base[a:b], np.arange(a, b), value), offset=a)
                     for a, b, value in ivf_parts]
            pairs = tuple(np.concatenate(column) for column in zip(*pairs))
            found_idx, found_sim = self._ivf_search(self.base, pairs, k, 0, n, "knn graph (ivf)")
            del pairs
            for a, b, _ in ivf_parts:
                idx[a:b], sim[a:b] = found_idx[a:b], found_sim[a:b]
            del found_idx, found_sim
        for (a, b, _, name), plan in zip(parts, plans):
            if plan.method == "hnsw":
                idx[a:b], sim[a:b] = self._hnsw_search(self.base[a:b], k, None, plan.value, f"knn {name}")
            elif plan.method == "exact":
                idx[a:b], sim[a:b] = self._exact_search(self.base[a:b], k, 0, n, f"knn {name}")
        _fill_missing(idx, sim, self.base, self.base, 0, n)
        return _self_first(idx, sim)

    # --------------------------------------------------------------------------- recall targeting

    def _plan(self, x: np.ndarray, self_rows: np.ndarray | None, k: int, lo: int, hi: int, *, name: str,
              query_side: bool) -> _Plan:
        """The searcher and parameter for the rows ``x`` (base rows ``self_rows`` in a self search),
        recorded in :attr:`reports` and logged (module docstring)."""
        started = time.perf_counter()
        if self.method == "exact":
            return self._record(_Plan("exact", None), name, x, k, None, 1.0, 0, 1.0, "exact", started)
        parameter = "nprobe" if self.method == "ivf" else "efSearch"
        if self.recall is None:
            if self.method == "ivf":
                value = self.ivf_params.query_nprobe if query_side else self.ivf_params.nprobe
                own = None if self_rows is None else self_rows[:4096]
                fraction = float(self._scan_fractions(self._probe_rows(x[:4096], own, value), lo, hi)[-1])
            else:
                value, fraction = max(self.hnsw_params.ef_search, k), None
            return self._record(_Plan(self.method, value), name, x, k, parameter, None, 0, fraction, "fixed",
                                started)
        target = self.recall
        if len(x) <= 2 * target.sample and len(x) * (hi - lo) <= target.exact_max_products:
            return self._record(_Plan("exact", None), name, x, k, None, 1.0, 0, 1.0, "exact, few rows", started)
        rng = np.random.default_rng(self.seed)
        sample = np.sort(rng.choice(len(x), min(target.sample, len(x)), replace=False))
        xs = x[sample]
        own = None if self_rows is None else self_rows[sample]
        truth = self._exact_search(xs, k, lo, hi, "")[0]
        ladder = self._ladder(k)
        probes = self._probe_rows(xs, own, ladder[-1]) if self.method == "ivf" else None
        fractions = None if probes is None else self._scan_fractions(probes, lo, hi)
        budget = min(target.max_scan_fraction, target.max_scan_products / (len(x) * (hi - lo)))
        ivf_recalls = None if probes is None else self._ivf_recalls(truth, own, probes)
        best: tuple[int, float, float] | None = None
        for value in ladder:
            if probes is not None:
                fraction = float(fractions[value - 1])
                if fraction > budget and best is not None:
                    break
                recall = float(ivf_recalls[value - 1])
            else:
                found, fraction = self._hnsw_sample(xs, k, lo, hi, value)
                if fraction > budget and best is not None:
                    break
                recall = _recall(found, truth, own)
            best = (value, recall, fraction)
            if recall >= target.target:
                return self._record(_Plan(self.method, value), name, x, k, parameter, recall, len(sample),
                                    fraction, "met", started)
        value, recall, fraction = best
        if len(x) * (hi - lo) <= target.exact_max_products:
            note = f"{self.method} {parameter} {value}: {_measured(k, recall, len(sample), fraction)}"
            return self._record(_Plan("exact", None), name, x, k, None, 1.0, len(sample), 1.0, "exact fallback",
                                started, note=note)
        return self._record(_Plan(self.method, value), name, x, k, parameter, recall, len(sample), fraction,
                            "below target", started)

    def _record(self, plan: _Plan, name: str, x: np.ndarray, k: int, parameter: str | None,
                recall: float | None, sample: int, fraction: float | None, outcome: str, started: float, *,
                note: str = "") -> _Plan:
        report = SearchReport(
            name=name, rows=len(x), k=k, method=plan.method, parameter=parameter, value=plan.value,
            recall=recall, sample=sample, target=None if self.recall is None or outcome == "exact" else
            self.recall.target, scan_fraction=fraction, outcome=outcome, seconds=time.perf_counter() - started,
            note=note)
        self.reports.append(report)
        (log.warning if outcome in ("exact fallback", "below target") else log.info)(report.line())
        return plan

    def _ladder(self, k: int) -> list[int]:
        """IVF: nprobe 4, 6, 8, 12, 16, 24, … up to nlist; HNSW: efSearch max(k, 16), doubling while below twice the base size."""
        if self.method == "ivf":
            nlist = self._lists.n_lists
            values = {min(nlist, _IVF_LADDER_START * 2 ** (i // 2) * (3 if i % 2 else 2) // 2)
                      for i in range(2 * int(math.log2(max(nlist, 2))) + 2)}
            return sorted(v for v in values | {nlist} if v >= 1)
        values, ef = [], max(k, 16)
        while ef < 2 * len(self.base):
            values.append(ef)
            ef *= 2
        return values or [max(k, 16)]

    def _ivf_recalls(self, truth: np.ndarray, own: np.ndarray | None, probes: np.ndarray) -> np.ndarray:
        """recall@k of an IVF search of the sampled rows at nprobe 1, 2, …, ``probes.shape[1]``.

        The scan is exact on the lists it scans, so a row finds one of its exact ``truth``
        neighbours exactly when that neighbour's list is among the row's first ``nprobe`` probes
        (``probes``: every list, nearest first).  In a self search (``own``) the row itself is not
        counted, as in :func:`_recall`.
        """
        if own is not None:
            if truth.shape[1] == 1:
                return np.ones(probes.shape[1])
            truth = _without_self(truth, own, truth.shape[1] - 1)
        rank_of_list = np.empty_like(probes)
        np.put_along_axis(rank_of_list, probes, np.arange(probes.shape[1])[None, :], axis=1)
        ranks = np.take_along_axis(rank_of_list, self._probes[truth, 0], axis=1)
        return np.cumsum(np.bincount(ranks.ravel(), minlength=probes.shape[1])) / truth.size

    def _scan_fractions(self, probes: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """IVF cost per row at nprobe 1, 2, …: the mean size (within [lo, hi)) of the probed lists over
        ``hi - lo`` — the inner products faiss' ``IndexIVFStats.ndis`` would count, over an exact search's."""
        return np.cumsum(self._list_sizes(lo, hi)[probes].mean(axis=0)) / (hi - lo)

    def _list_sizes(self, lo: int, hi: int) -> np.ndarray:
        if lo == 0 and hi == len(self.base):
            return np.diff(self._lists.starts)
        return np.bincount(self._probes[lo:hi, 0], minlength=self._lists.n_lists)

    def _probe_rows(self, x: np.ndarray, own: np.ndarray | None, nprobe: int) -> np.ndarray:
        """Probed lists of rows ``x`` (base rows ``own``: the stored probes when wide enough)."""
        if own is not None and nprobe <= self._probes.shape[1]:
            return self._probes[own, :nprobe]
        return self._probe(x, nprobe)

    def _hnsw_sample(self, xs: np.ndarray, k: int, lo: int, hi: int, ef: int) -> tuple[np.ndarray, float]:
        """HNSW search of the sample rows at ``ef`` and its cost (faiss ``hnsw_stats.ndis``)."""
        import faiss

        base_range = None if (lo, hi) == (0, len(self.base)) else (lo, hi)
        faiss.cvar.hnsw_stats.reset()
        found = self._hnsw_search(xs, k, base_range, ef, "")[0]
        return found, faiss.cvar.hnsw_stats.ndis / (len(xs) * (hi - lo))

    def _exact_search(self, q: np.ndarray, k: int, lo: int, hi: int, desc: str) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        idx = np.empty((len(q), k), dtype=np.int64)
        sim = np.empty((len(q), k), dtype=np.float32)
        step = _EXACT_QUERY_BLOCK
        for start in progress_bar(range(0, len(q), step), desc=desc, enabled=self.progress and bool(desc)):
            s, i = faiss.knn(q[start:start + step], self.base[lo:hi], k, metric=faiss.METRIC_INNER_PRODUCT)
            idx[start:start + step] = i + lo
            sim[start:start + step] = s
        return idx, sim

    def _hnsw_search(self, q: np.ndarray, k: int, base_range: tuple[int, int] | None, ef_search: int,
                     desc: str) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        selector = None if base_range is None else faiss.IDSelectorRange(*base_range)
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(ef_search, k))
        idx = np.empty((len(q), k), dtype=np.int64)
        sim = np.empty((len(q), k), dtype=np.float32)
        step = 16384
        for start in progress_bar(range(0, len(q), step), desc=desc, enabled=self.progress and bool(desc)):
            sim[start:start + step], idx[start:start + step] = self._hnsw.search(q[start:start + step], k,
                                                                               params=params)
        return idx, sim

    def _probe(self, x: np.ndarray, nprobe: int) -> np.ndarray:
        """(n, nprobe) the lists whose centroids are most similar to each row, best first."""
        nprobe = min(nprobe, self._quantizer.ntotal)
        out = np.empty((len(x), nprobe), dtype=np.int64)
        step = max(1, _BLOCK_ELEMENTS // self._quantizer.ntotal)
        for start in progress_bar(range(0, len(x), step), desc="ivf: assign", enabled=self.progress and len(x) > step):
            out[start:start + step] = self._quantizer.search(x[start:start + step], nprobe)[1]
        return out

    def _ivf_search(self, x: np.ndarray, probes: tuple[np.ndarray, np.ndarray], k: int, lo: int, hi: int,
                    desc: str) -> tuple[np.ndarray, np.ndarray]:
        """IVF-flat search by list: a list is scanned by one matmul with the rows probing it, and each
        row keeps a running top-k list, best first (the scan is compute-bound, not memory-bound).

        The probes are scanned in passes by rank, each pass list by list: first every row's nearest
        list, whose top-k opens the row's list; then its 2nd, its 3rd–4th, 5th–8th, … nearest lists,
        where only similarities above the row's current k-th are merged.  Near lists come first, so
        the k-th values rise early and few of the later, larger passes' products get past them.
        ``probes``: flat ``(row of x, list, rank)`` triples (:func:`_probe_pairs`; rows may differ in
        count).
        """
        n = len(x)
        best_idx, best_sim = np.full((n, k), -1, dtype=np.int64), np.full((n, k), -np.inf, dtype=np.float32)
        probe_rows, probe_lists, rank = probes
        scan_pass = np.full(len(rank), -1, dtype=np.int8)                         # -1: opens the row's list
        later = rank > 0
        scan_pass[later] = np.floor(np.log2(rank[later].astype(np.float32)))    # ranks 1, 2–3, 4–7, …
        del later
        steps = []
        for number in np.unique(scan_pass):
            chosen = scan_pass == number
            probing, rows_of = _InvertedLists.build(probe_lists[chosen], self._lists.n_lists), probe_rows[chosen]
            steps += [(lst, probing, rows_of, number < 0) for lst in range(self._lists.n_lists)]
        for lst, probing, rows_of, opening in progress_bar(steps, desc=desc, enabled=self.progress and bool(desc)):
            rows = rows_of[probing.members(lst)]
            members = self._lists.members(lst)
            if lo > 0 or hi < len(self.base):
                members = members[(members >= lo) & (members < hi)]
            if not len(rows) or not len(members):
                continue
            feat = self.base[members]
            step = max(1, _BLOCK_ELEMENTS // len(members))
            for block_start in range(0, len(rows), step):
                part = rows[block_start:block_start + step]
                sim = x[part] @ feat.T
                if opening:                                     # empty lists: the list's own top-k
                    open_lists(best_idx, best_sim, part, members, sim)
                else:
                    merge_above_kth(best_idx, best_sim, part, members, sim)
        return best_idx, best_sim


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


def _probe_pairs(probes: np.ndarray, offset: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(n, nprobe)`` probed lists, best first, as flat ``(row + offset, list, rank)`` triples (int32:
    half the memory of a million-row graph's pairs; rank 0 is a row's nearest list)."""
    rows = np.repeat(np.arange(offset, offset + len(probes), dtype=np.int32), probes.shape[1])
    ranks = np.tile(np.arange(probes.shape[1], dtype=np.int32), len(probes))
    return rows, probes.astype(np.int32).ravel(), ranks


def _recall(found: np.ndarray, truth: np.ndarray, own: np.ndarray | None) -> float:
    """recall@k of ``found`` against the exact ``truth``: the fraction of each row's exact list it contains,
    averaged (faiss' ``knn_intersection_measure``, vectorised); in a self search (``own`` = the rows' base
    indices) over the k − 1 nearest items other than the row itself."""
    if own is not None:
        if found.shape[1] == 1:
            return 1.0
        found, truth = _without_self(found, own, found.shape[1] - 1), _without_self(truth, own, truth.shape[1] - 1)
    width = int(max(found.max(initial=0), truth.max(initial=0))) + 2
    rows = np.arange(len(found), dtype=np.int64)[:, None] * width
    hits = np.isin(found + 1 + rows, truth + 1 + rows)  # row-tagged keys; -1 (missing) never matches a truth
    return float(hits.sum() / truth.size)


def _without_self(idx: np.ndarray, own: np.ndarray, width: int) -> np.ndarray:
    """Each row's first ``width`` entries other than its own index (a row missing itself drops its last)."""
    keep = idx != own[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :width]
    return np.take_along_axis(idx, order, axis=1)


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
