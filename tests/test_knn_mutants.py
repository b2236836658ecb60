"""Neighbour graphs and kNN search: cases the main tests leave open (found by mutation testing).

Every expectation is computed independently: brute-force loops over the neighbour lists, hand-worked
values, exact report strings, or the IVF lists recomputed from the centroids.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from test_knn import brute_force, unit
import vireid.progress
from vireid.errors import InputError
import vireid.retrieval.graph as graph_module
import vireid.retrieval.knn as knn_module
from vireid.retrieval.graph import (
    NeighbourGraph,
    expanded_k_reciprocal_sets,
    farthest_similarity,
    reciprocal_mask,
    reverse_neighbours,
    rows_to_csr,
)
from vireid.retrieval.knn import (
    HnswParams,
    IvfParams,
    NeighbourIndex,
    RecallTarget,
    SearchReport,
    _probe_pairs,
)


def clustered(n_ids: int, per_id: int, d: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, d))
    feats = np.repeat(centres, per_id, axis=0) + noise * rng.standard_normal((n_ids * per_id, d))
    return unit(feats[rng.permutation(len(feats))])


def numpy_graph(feats: np.ndarray, k: int) -> NeighbourGraph:
    """Top-k lists by a float64 argsort, each item first in its own list."""
    sim = feats.astype(np.float64) @ feats.T.astype(np.float64)
    np.fill_diagonal(sim, 3.0)
    index = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    np.fill_diagonal(sim, 1.0)
    return NeighbourGraph(index=index, sim=np.take_along_axis(sim, index, axis=1).astype(np.float32))


def loop_reciprocal(index: np.ndarray, i: int, k: int) -> list[int]:
    """R(i, k) of Zhong et al. Eq. 3 in list order: j in the first k+1 of i with i in the first k+1 of j."""
    return [int(j) for j in index[i, : k + 1] if i in index[j, : k + 1]]


def loop_expanded(index: np.ndarray, i: int, k1: int) -> set[int]:
    """R*(i) of Eq. 4-5: R(i, k1) grown by R(c, round(k1/2)) of each member c when more than 2/3 of it
    lies in R(i, k1)."""
    half = int(round(k1 / 2))  # k1/2 is x.5 only for odd k1: Python and numpy both round half to even
    members = set(loop_reciprocal(index, i, k1))
    out = set(members)
    for c in members:
        cand = loop_reciprocal(index, c, half)
        if len(members & set(cand)) > 2.0 / 3.0 * len(cand):
            out |= set(cand)
    return out


def csr_rows(matrix) -> list[set[int]]:
    return [set(matrix.indices[matrix.indptr[r]:matrix.indptr[r + 1]].tolist()) for r in range(matrix.shape[0])]


def bar_labels(text: str) -> list[str]:
    """The descriptions of the progress lines written to a non-terminal stream ('' for an unlabelled bar);
    other lines (log records of a console handler another test installed) are skipped."""
    labels = []
    for line in text.splitlines():
        match = re.match(r"^(?:(.*): +)?\s*\d+%\|", line)
        if match:
            labels.append(match.group(1) or "")
    return labels


@pytest.fixture
def bars_on(monkeypatch):
    monkeypatch.setattr(vireid.progress, "_bars_enabled", True)


# ------------------------------------------------------------------------------------------ graphs


GRAPH_CASES = [(seed, k1) for seed in range(6) for k1 in (2, 3, 4, 6)]


@pytest.mark.parametrize("seed, k1", GRAPH_CASES)
def test_expanded_sets_equal_the_loop_over_every_row(seed, k1):
    feats = clustered(n_ids=6, per_id=5, d=6, noise=0.6, seed=seed)
    graph = numpy_graph(feats, k1 + 2)
    pattern = expanded_k_reciprocal_sets(graph, k1)
    assert pattern.shape == (30, 30) and pattern.dtype == np.float32
    np.testing.assert_array_equal(pattern.data, 1.0)
    assert csr_rows(pattern) == [loop_expanded(graph.index, i, k1) for i in range(30)]


@pytest.mark.parametrize("seed, k1", GRAPH_CASES)
def test_expanded_sets_of_chosen_rows_equal_the_loop(seed, k1):
    """``rows``: any rows, in the given order (an incremental update recomputes a few)."""
    feats = clustered(n_ids=6, per_id=5, d=6, noise=0.6, seed=seed)
    graph = numpy_graph(feats, k1 + 2)
    rows = np.random.default_rng(seed).permutation(30)[:7]
    pattern = expanded_k_reciprocal_sets(graph, k1, rows=rows)
    assert pattern.shape == (7, 30) and pattern.dtype == np.float32
    assert csr_rows(pattern) == [loop_expanded(graph.index, int(i), k1) for i in rows]


def test_expanded_sets_of_one_row_keep_the_full_width():
    """A row whose set misses the last items still has N columns."""
    feats = clustered(n_ids=4, per_id=5, d=5, noise=0.3, seed=1)
    graph = numpy_graph(feats, 6)
    row = int(np.flatnonzero([max(loop_expanded(graph.index, i, 4)) < 19 for i in range(20)])[0])
    pattern = expanded_k_reciprocal_sets(graph, 4, rows=np.array([row]))
    assert pattern.shape == (1, 20)
    assert csr_rows(pattern) == [loop_expanded(graph.index, row, 4)]


def test_expanded_sets_of_no_rows_and_of_float_row_numbers():
    feats = clustered(n_ids=4, per_id=5, d=5, noise=0.5, seed=2)
    graph = numpy_graph(feats, 6)
    empty = expanded_k_reciprocal_sets(graph, 4, rows=[])
    assert empty.shape == (0, 20) and empty.nnz == 0
    rows = np.array([13.0, 2.0, 7.0])  # whole numbers stored as floats are row numbers
    assert csr_rows(expanded_k_reciprocal_sets(graph, 4, rows=rows)) == [
        loop_expanded(graph.index, i, 4) for i in (13, 2, 7)]


def test_expanded_sets_and_reciprocal_masks_across_row_chunks(monkeypatch):
    """Rows are processed in chunks: the chunk boundaries must not change any row."""
    feats = clustered(n_ids=8, per_id=5, d=6, noise=0.6, seed=3)
    graph = numpy_graph(feats, 6)
    want_sets = [loop_expanded(graph.index, i, 4) for i in range(40)]
    want_mask = np.array([[i in graph.index[j, :5] for j in graph.index[i, :5]] for i in range(40)])
    rows = np.random.default_rng(0).permutation(40)[:17]
    monkeypatch.setattr(graph_module, "_ROW_CHUNK", 3)
    assert csr_rows(expanded_k_reciprocal_sets(graph, 4)) == want_sets
    assert csr_rows(expanded_k_reciprocal_sets(graph, 4, rows=rows)) == [want_sets[i] for i in rows]
    np.testing.assert_array_equal(reciprocal_mask(graph, 4), want_mask)
    np.testing.assert_array_equal(reciprocal_mask(graph, 4, rows=rows), want_mask[rows])


def test_reciprocal_mask_of_chosen_rows_and_float_row_numbers():
    feats = clustered(n_ids=5, per_id=4, d=5, noise=0.5, seed=4)
    graph = numpy_graph(feats, 5)
    rows = [17, 3, 3, 0]
    want = np.array([[i in graph.index[j, :4] for j in graph.index[i, :4]] for i in rows])
    np.testing.assert_array_equal(reciprocal_mask(graph, 3, rows=np.array(rows)), want)
    np.testing.assert_array_equal(reciprocal_mask(graph, 3, rows=np.array(rows, dtype=np.float64)), want)


def test_graph_progress_bars_follow_the_progress_flag(bars_on, capsys):
    feats = clustered(n_ids=4, per_id=5, d=5, noise=0.5, seed=5)
    graph = numpy_graph(feats, 6)
    reciprocal_mask(graph, 3)
    farthest_similarity(feats)
    assert bar_labels(capsys.readouterr().err) == []
    reciprocal_mask(graph, 3, progress=True)
    assert set(bar_labels(capsys.readouterr().err)) == {"reciprocal k=3"}
    farthest_similarity(feats, progress=True)
    assert set(bar_labels(capsys.readouterr().err)) == {"farthest sample"}


def test_farthest_similarity_samples_2048_rows_by_default():
    """Antipodal pairs: every row's farthest item is at similarity -1. At 2,048 rows the default is exact;
    at 2,049 one row is left out of the sample, so its antipode no longer finds -1."""
    rng = np.random.default_rng(0)
    z = unit(rng.standard_normal((1024, 16)))
    pairs = np.concatenate([z, -z])
    np.testing.assert_allclose(farthest_similarity(pairs), -1.0, atol=1e-6)
    feats = np.concatenate([pairs, unit(rng.standard_normal((1, 16)))])
    exact = (feats.astype(np.float64) @ feats.T.astype(np.float64)).min(axis=1)
    got = farthest_similarity(feats)
    assert np.all(got >= exact - 1e-6)
    assert 1 <= np.sum(got > exact + 1e-3) <= 2  # the left-out row's antipode (and the extra row)


def test_rows_to_csr_with_one_column_per_row():
    matrix = rows_to_csr(np.array([[2], [0], [1]]), np.array([[5.0], [6.0], [7.0]]), 4)
    np.testing.assert_array_equal(matrix.toarray(), [[0, 0, 5, 0], [6, 0, 0, 0], [0, 7, 0, 0]])
    graph = NeighbourGraph(index=np.array([[0], [1], [2]]), sim=np.ones((3, 1), dtype=np.float32))
    np.testing.assert_array_equal(reverse_neighbours(graph, 1).toarray(), np.eye(3))
    with pytest.raises(InputError, match=r"^reverse_neighbours needs 2 neighbours per item but the graph has k=1$"):
        reverse_neighbours(graph, 2)


def test_max_squared_distance_by_hand_and_kept_by_as_graph():
    graph = NeighbourGraph(index=np.array([[0, 1, 2], [1, 2, 0], [2, 0, 1]]), sim=np.ones((3, 3), np.float32),
                           min_sim=np.array([0.9, -1.0, 1.0000001]))
    want = [0.2, 4.0, 0.0]  # 2 - 2 * min_sim, rounding below 0 clipped
    np.testing.assert_allclose(graph.max_squared_distance(), want, atol=1e-6)
    np.testing.assert_allclose(graph.as_graph(2).max_squared_distance(), want, atol=1e-6)
    bare = NeighbourGraph(index=graph.index, sim=graph.sim)
    with pytest.raises(ValueError, match="^this neighbour graph was built without per-row minimum similarities$"):
        bare.max_squared_distance()


# --------------------------------------------------------------------------------------------- knn


def test_report_line_without_a_scan_fraction():
    report = SearchReport(name="query lists", rows=1200, k=10, method="hnsw", parameter="efSearch", value=64,
                          recall=0.98765, sample=1000, target=0.95, scan_fraction=None, outcome="met", seconds=0.5)
    assert report.line() == ("knn query lists (1,200 rows, k=10): hnsw efSearch 64, recall@10 0.9877 on 1,000 "
                             "sampled rows (target 0.95)")


def test_probe_pairs_are_int32_row_list_rank_triples():
    rows, lists, ranks = _probe_pairs(np.array([[4, 1, 6], [0, 3, 5]]), offset=5)
    assert rows.dtype == np.int32 and lists.dtype == np.int32 and ranks.dtype == np.int32
    np.testing.assert_array_equal(rows, [5, 5, 5, 6, 6, 6])
    np.testing.assert_array_equal(lists, [4, 1, 6, 0, 3, 5])
    np.testing.assert_array_equal(ranks, [0, 1, 2, 0, 1, 2])


def test_self_search_with_one_neighbour_has_recall_one():
    """k = 1 in a self search: the list is the item itself, recall 1 (no other item to find)."""
    base = clustered(n_ids=20, per_id=20, d=8, noise=0.5, seed=6)
    index = NeighbourIndex(base, "ivf", recall=RecallTarget(target=0.99, sample=100, exact_max_products=0))
    idx, sim = index.self_search(1)
    np.testing.assert_array_equal(idx[:, 0], np.arange(400))
    assert sim.dtype == np.float32
    report = index.reports[0]
    assert (report.outcome, report.recall) == ("met", 1.0)
    assert "recall@1 1.0000 on 100 sampled rows" in report.line()


@pytest.mark.parametrize("method", ["exact", "ivf", "hnsw"])
def test_similarities_are_float32(method):
    base = clustered(n_ids=20, per_id=20, d=8, noise=0.5, seed=7)
    index = NeighbourIndex(base, method, ivf=IvfParams(nlist=16))
    assert index.search(base[:30], 5)[1].dtype == np.float32
    assert index.self_search(5)[1].dtype == np.float32


def test_single_list_ivf_with_a_recall_target():
    """nlist = 1: the ladder is [1], scanning everything, recall 1."""
    base = clustered(n_ids=10, per_id=20, d=8, noise=0.5, seed=8)
    index = NeighbourIndex(base, "ivf", ivf=IvfParams(nlist=1), recall=RecallTarget(target=0.99, sample=10))
    idx, _ = index.search(base[:40], 7)
    np.testing.assert_array_equal(idx, brute_force(base[:40], base, 7)[0])
    report = index.reports[0]
    assert (report.outcome, report.method, report.value, report.recall, report.scan_fraction) == (
        "met", "ivf", 1, 1.0, 1.0)


def ivf_lists(index: NeighbourIndex, base: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """List sizes (items by their most similar centroid) and each query's lists, most similar first."""
    centroids = index._quantizer.reconstruct_n(0, index._quantizer.ntotal)
    sizes = np.bincount(np.argmax(base @ centroids.T, axis=1), minlength=len(centroids))
    return sizes, np.argsort(-(queries @ centroids.T), axis=1, kind="stable")


def test_fixed_nprobe_reports_its_scan_fraction():
    base = clustered(n_ids=50, per_id=40, d=16, noise=0.6, seed=9)
    queries = clustered(n_ids=10, per_id=10, d=16, noise=0.6, seed=10)
    index = NeighbourIndex(base, "ivf", ivf=IvfParams(nlist=32, query_nprobe=5))
    index.search(queries, 10)
    sizes, order = ivf_lists(index, base, queries)
    want = sizes[order[:, :5]].sum(axis=1).mean() / len(base)
    assert want < 0.5 and index.reports[0].scan_fraction == pytest.approx(want, rel=1e-6)


def test_scan_budget_boundary_is_inclusive():
    """A ladder step costing exactly ``max_scan_fraction`` is within the budget (one query: the cost is an
    exact integer over N)."""
    base = clustered(n_ids=60, per_id=30, d=16, noise=0.8, seed=11)
    query = clustered(n_ids=1, per_id=1, d=16, noise=0.8, seed=12)
    k = 60
    probe = NeighbourIndex(base, "ivf", ivf=IvfParams(nlist=32))
    sizes, order = ivf_lists(probe, base, query)
    truth_lists = set(np.argmax(base[brute_force(query, base, k)[0][0]] @
                                probe._quantizer.reconstruct_n(0, 32).T, axis=1).tolist())
    ladder = [4, 6, 8, 12, 16, 24, 32]
    first = next(p for p in ladder if truth_lists <= set(order[0, :p].tolist()))
    assert first > 4  # the target is missed at least once before it is met
    budget = sizes[order[0, :first]].sum() / len(base)
    for max_scan, outcome, value in ((budget, "met", first), (np.nextafter(budget, 0.0), "below target", None)):
        index = NeighbourIndex(base, "ivf", ivf=IvfParams(nlist=32), recall=RecallTarget(
            target=1.0, sample=1, max_scan_fraction=max_scan, exact_max_products=0))
        index.search(query, k)
        report = index.reports[0]
        assert report.outcome == outcome
        if value is not None:
            assert report.value == value and report.recall == 1.0 and report.scan_fraction == budget
        else:
            assert report.value == ladder[ladder.index(first) - 1]


def test_hnsw_scan_budget_boundary_is_inclusive():
    """HNSW: a budget equal to the cost faiss counted for an efSearch step (one sampled query, so the
    same count every time on the same graph) admits that step; one ulp less stops the ladder before it."""
    base = clustered(n_ids=60, per_id=30, d=16, noise=0.8, seed=11)
    query = clustered(n_ids=1, per_id=1, d=16, noise=0.8, seed=12)
    index = NeighbourIndex(base, "hnsw", hnsw=HnswParams(M=4, ef_construction=10), recall=RecallTarget(
        target=1.0, sample=1, max_scan_fraction=1.0, exact_max_products=0))
    found, _ = index.search(query, 20)
    met = index.reports[0]
    assert met.outcome == "met" and met.value > 20  # efSearch 20 (the first step) misses a neighbour
    np.testing.assert_array_equal(found, brute_force(query, base, 20)[0])
    for budget, outcome, value in ((met.scan_fraction, "met", met.value),
                                   (np.nextafter(met.scan_fraction, 0.0), "below target", met.value // 2)):
        index.recall = RecallTarget(target=1.0, sample=1, max_scan_fraction=budget, exact_max_products=0)
        index.search(query, 20)
        assert (index.reports[-1].outcome, index.reports[-1].value) == (outcome, value)


def test_missing_answers_are_filled_exactly():
    """One probed list holds fewer than k items: the rows are completed by exact search (also within a range)."""
    base = clustered(n_ids=20, per_id=20, d=8, noise=0.5, seed=13)
    queries = base[::10]
    index = NeighbourIndex(base, "ivf", ivf=IvfParams(nlist=16, query_nprobe=1))
    idx, sim = index.search(queries, 120)
    want_idx, want_sim = brute_force(queries, base, 120)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(sim, want_sim, atol=1e-5)
    idx, _ = index.search(queries, 120, base_range=(50, 400))
    np.testing.assert_array_equal(idx, brute_force(queries, base[50:], 120)[0] + 50)


@pytest.mark.parametrize("method", ["exact", "ivf", "hnsw"])
def test_no_progress_output_unless_asked(bars_on, capsys, monkeypatch, method):
    monkeypatch.setattr(knn_module, "_BLOCK_ELEMENTS", 64)  # IVF: list assignment in blocks of 4 rows
    base = clustered(n_ids=20, per_id=20, d=8, noise=0.5, seed=14)
    index = NeighbourIndex(base, method, ivf=IvfParams(nlist=16), hnsw=HnswParams(M=8, ef_construction=20))
    index.search(base[:50], 5)
    index.self_search(5)
    assert bar_labels(capsys.readouterr().err) == []


@pytest.mark.parametrize("method", ["exact", "hnsw"])
def test_search_progress_bar_labels(bars_on, capsys, method):
    base = clustered(n_ids=20, per_id=20, d=8, noise=0.5, seed=15)
    index = NeighbourIndex(base, method, hnsw=HnswParams(M=8, ef_construction=20), progress=True)
    capsys.readouterr()
    index.search(base[:50], 5)
    assert set(bar_labels(capsys.readouterr().err)) == {"knn search"}
    index.search(base[:50], 5, desc="gallery lists")
    assert set(bar_labels(capsys.readouterr().err)) == {"gallery lists"}


def test_ivf_progress_bar_labels(bars_on, capsys, monkeypatch):
    """The recall ladder's sample searches are silent; the searches themselves are labelled."""
    base = clustered(n_ids=20, per_id=20, d=8, noise=0.5, seed=16)
    index = NeighbourIndex(base, "ivf", ivf=IvfParams(nlist=16), progress=True,
                           recall=RecallTarget(target=0.95, sample=100, exact_max_products=0))
    assert set(bar_labels(capsys.readouterr().err)) == {"ivf: k-means (16 lists)"}
    index.search(base[:50], 5)
    assert set(bar_labels(capsys.readouterr().err)) == {"knn search"}
    index.self_search(5)
    assert set(bar_labels(capsys.readouterr().err)) == {"knn graph (ivf)"}
    monkeypatch.setattr(knn_module, "_BLOCK_ELEMENTS", 64)  # list assignment in blocks of 4 rows
    index.search(base[:50], 5)
    assert set(bar_labels(capsys.readouterr().err)) == {"ivf: assign", "knn search"}


# ----------------------------------------------------------------------- cases left by the s1 sample


def test_expanded_sets_progress_bar_follows_the_progress_flag(bars_on, capsys):
    feats = clustered(n_ids=4, per_id=5, d=5, noise=0.5, seed=5)
    graph = numpy_graph(feats, 6)
    expanded_k_reciprocal_sets(graph, 4)
    expanded_k_reciprocal_sets(graph, 4, rows=np.array([3, 1]))
    assert bar_labels(capsys.readouterr().err) == []
    expanded_k_reciprocal_sets(graph, 4, progress=True)
    assert "expanded reciprocal k=4" in bar_labels(capsys.readouterr().err)


class _PoisonedNumpy:
    """numpy whose ``empty`` arrays hold a poison value instead of whatever memory was there (as glibc's
    ``MALLOC_PERTURB_``): code that reads an entry it never wrote sees the most negative integer / NaN."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=float, *args, **kwargs):
        out = np.empty(shape, dtype, *args, **kwargs)
        if out.dtype == bool:
            out.fill(True)
        elif np.issubdtype(out.dtype, np.integer):
            out.fill(np.iinfo(out.dtype).min)
        else:
            out.fill(np.nan)
        return out


def test_expanded_sets_read_no_uninitialised_memory(monkeypatch):
    feats = clustered(n_ids=4, per_id=5, d=5, noise=0.5, seed=2)
    graph = numpy_graph(feats, 6)
    monkeypatch.setattr(graph_module, "np", _PoisonedNumpy())
    empty = expanded_k_reciprocal_sets(graph, 4, rows=np.array([], dtype=np.int64))
    assert empty.shape == (0, 20) and empty.nnz == 0 and len(empty.data) == 0
    assert csr_rows(expanded_k_reciprocal_sets(graph, 4)) == [loop_expanded(graph.index, i, 4) for i in range(20)]


def test_distance_of_a_half_precision_graph_is_float32_accurate():
    """``sqrt(2 − 2s)`` of float16 similarities, in float32: as accurate as float32 allows (a float16
    ``2 − 2s`` would be off by up to 2⁻¹¹ relative)."""
    sim = np.concatenate([np.ones((8, 1)), np.linspace(0.95, -0.95, 40).reshape(8, 5)], axis=1).astype(np.float16)
    graph = NeighbourGraph(index=np.tile(np.arange(6), (8, 1)), sim=sim)
    for k in (None, 4):
        got = graph.distance(k)
        want = np.sqrt(np.maximum(2.0 - 2.0 * sim.astype(np.float64)[:, : k or 6], 0.0))
        want[:, 0] = 0.0
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=3e-7, atol=0)


@pytest.mark.parametrize("method", ["exact", "ivf", "hnsw"])
def test_search_indices_are_int64(method):
    base = clustered(n_ids=20, per_id=20, d=8, noise=0.5, seed=7)
    index = NeighbourIndex(base, method, ivf=IvfParams(nlist=16))
    idx, _ = index.search(base[:30], 5)
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(idx[:, 0], np.arange(30))  # each query is a base row: itself first


def test_ivf_search_within_a_range_excludes_its_upper_end():
    """``base_range=(lo, hi)``: rows lo <= i < hi; a query equal to base row hi must not find it."""
    base = clustered(n_ids=20, per_id=20, d=8, noise=0.5, seed=17)
    index = NeighbourIndex(base, "ivf", ivf=IvfParams(nlist=16, query_nprobe=16))   # every list: exact
    queries = base[300:306]
    idx, sim = index.search(queries, 7, base_range=(0, 300))
    want_idx, want_sim = brute_force(queries, base[:300], 7)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(sim, want_sim, atol=1e-5)


def test_hnsw_recall_target_within_a_range_measures_the_range():
    """The recall ladder's sample search is restricted to ``base_range`` as the search itself: queries that
    are base rows outside the range (their best match is themselves) still meet the target."""
    base = clustered(n_ids=20, per_id=20, d=8, noise=0.5, seed=18)
    index = NeighbourIndex(base, "hnsw", recall=RecallTarget(target=0.95, sample=100, max_scan_fraction=1.0,
                                                             exact_max_products=0))
    idx, _ = index.search(base[:20], 5, base_range=(200, 400))
    report = index.reports[0]
    assert report.outcome == "met" and report.recall >= 0.95
    assert idx.min() >= 200
    want = brute_force(base[:20], base[200:], 5)[0] + 200
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(idx.tolist(), want.tolist(), strict=True)]) >= 0.95


def test_ivf_ladder_with_2048_lists_is_every_step_up_to_nlist():
    """Module docstring: nprobe 4, 6, 8, 12, 16, 24, … (×1.5, ×4/3 in turn) up to nlist, then nlist."""
    base = clustered(n_ids=64, per_id=32, d=4, noise=0.5, seed=19)
    index = NeighbourIndex(base, "ivf", ivf=IvfParams(nlist=2048))
    want, value = [], 4
    while value < 2048:
        want.append(value)
        value = value * 3 // 2 if value % 3 else value * 4 // 3
    assert want[-3:] == [768, 1024, 1536]
    assert index._ladder(10) == want + [2048]


def test_hnsw_recall_ladder_starts_at_ef_16():
    """efSearch max(k, 16), 2·that, …: k = 5 on 300 items meets a low target at the first step, 16."""
    base = clustered(n_ids=15, per_id=20, d=8, noise=0.5, seed=20)
    index = NeighbourIndex(base, "hnsw", recall=RecallTarget(target=0.5, sample=20))
    index.search(base[:50], 5)
    assert (index.reports[0].outcome, index.reports[0].value) == ("met", 16)


def test_hnsw_recall_target_on_a_tiny_base():
    """Fewer than 8 items: no efSearch step lies below twice the base size, the ladder is [max(k, 16)]."""
    base = clustered(n_ids=3, per_id=2, d=8, noise=0.5, seed=21)
    index = NeighbourIndex(base, "hnsw", recall=RecallTarget(target=1.0, sample=2))
    idx, _ = index.search(base, 3)
    np.testing.assert_array_equal(idx, brute_force(base, base, 3)[0])
    report = index.reports[0]
    assert (report.outcome, report.value, report.recall) == ("met", 16, 1.0)


def test_self_search_with_every_row_a_query():
    """``query_rows`` may be the whole base (no gallery rows): every row is searched as a query."""
    base = clustered(n_ids=5, per_id=6, d=8, noise=0.5, seed=22)
    index = NeighbourIndex(base, "exact")
    idx, sim = index.self_search(4, query_rows=30)
    np.testing.assert_array_equal(idx, brute_force(base, base, 4)[0])
    np.testing.assert_array_equal(sim[:, 0], 1.0)
    assert [report.name for report in index.reports] == ["pool graph (query rows)"]


def test_recall_keys_are_tagged_per_row():
    """An index found in one row never counts as a hit of another row's list: by hand, rows 1-3 find
    their neighbour 0, row 0 finds 1 instead of 0 (many rows, small indices: row tags must not overlap)."""
    found = np.array([[1], [0], [0], [0]])
    truth = np.zeros((4, 1), dtype=np.int64)
    assert knn_module._recall(found, truth, None) == 0.75
    found = np.array([[2, 1], [0, 2], [0, 1], [1, 2], [0, 2], [2, 0]])
    truth = np.array([[0, 1], [0, 1], [0, 1], [0, 1], [0, 1], [0, 1]])
    hits = sum(len(set(f) & set(t)) for f, t in zip(found.tolist(), truth.tolist()))  # loop: 1+1+2+1+1+1
    assert knn_module._recall(found, truth, None) == hits / truth.size == 7 / 12


def test_unit_float32_rows_are_normalised_without_a_copy():
    """Rows already of unit norm come back as the same array (a million-row copy is 2 GiB); other
    input is a normalised copy."""
    base = clustered(n_ids=4, per_id=5, d=8, noise=0.5, seed=23).astype(np.float32)
    assert knn_module.normalise_float32(base, name="base features") is base
    scaled = 3.0 * base
    out = knn_module.normalise_float32(scaled, name="base features")
    assert out is not scaled and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, base, atol=1e-6)


@pytest.mark.parametrize("method", ["ivf", "hnsw"])
def test_fixed_parameter_search_samples_no_rows(method):
    """Without a recall target nothing is measured: recall None on 0 sampled rows."""
    base = clustered(n_ids=20, per_id=20, d=8, noise=0.5, seed=24)
    index = NeighbourIndex(base, method, ivf=IvfParams(nlist=16))
    index.search(base[:30], 5)
    index.self_search(5)
    for report in index.reports:
        assert (report.outcome, report.recall, report.sample) == ("fixed", None, 0)
        assert report.to_dict()["sample"] == 0


def test_query_errors_name_the_query_features():
    base = clustered(n_ids=4, per_id=5, d=8, noise=0.5, seed=25)
    index = NeighbourIndex(base, "exact")
    with pytest.raises(InputError, match=r"^query features must be a non-empty 2-D float array"):
        index.search(base[0], 3)
    bad = base[:2].copy()
    bad[1, 0] = np.nan
    with pytest.raises(InputError, match=r"^query features contains non-finite values"):
        index.search(bad, 3)


def test_report_line_of_a_setting_without_a_parameter():
    """A report without a tunable parameter shows the method alone."""
    report = SearchReport(name="query lists", rows=50, k=5, method="exact", parameter=None, value=None,
                          recall=None, sample=0, target=None, scan_fraction=None, outcome="fixed", seconds=0.1)
    assert report.line() == "knn query lists (50 rows, k=5): exact (fixed; recall not measured)"


# ------------------------------------------------------------------ survivors of a fresh sample (seed 7)


def test_recall_keys_do_not_collide_across_rows() -> None:
    """recall@k against a set intersection per row, on many rows with large indices (row-tagged
    keys too narrow for the indices would match one row's items in another row)."""
    rng = np.random.default_rng(71)
    for _ in range(20):
        truth = np.stack([rng.choice(60, 5, replace=False) for _ in range(30)])
        found = np.stack([rng.choice(60, 5, replace=False) for _ in range(30)])
        want = sum(len(set(f) & set(t)) for f, t in zip(found.tolist(), truth.tolist())) / truth.size
        assert knn_module._recall(found, truth, None) == pytest.approx(want, abs=1e-12)


def test_self_first_moves_the_item_to_column_zero_keeping_the_other_similarities() -> None:
    """A row whose own index is not first (a duplicate of it ranked ahead): its own entry moves to
    column 0 with similarity 1 and the others keep their order and values."""
    idx = np.array([[1, 0, 2], [1, 2, 0], [2, 0, 1]])
    sim = np.array([[1.0, 1.0, 0.5], [1.0, 0.4, 0.3], [1.0, 0.9, 0.8]], np.float32)
    out_idx, out_sim = knn_module._self_first(idx.copy(), sim.copy())
    np.testing.assert_array_equal(out_idx, [[0, 1, 2], [1, 2, 0], [2, 0, 1]])
    np.testing.assert_array_equal(out_sim, np.array([[1.0, 1.0, 0.5], [1.0, 0.4, 0.3], [1.0, 0.9, 0.8]], np.float32))


@pytest.mark.parametrize(("n", "want"), [(8, 1), (15, 1), (16, 2), (100, 12), (1000, 64), (100_000, 512)])
def test_default_nlist_for_small_and_large_bases(n: int, want: int) -> None:
    """Power of two nearest 2·sqrt(N), at least 16, at most N // 8, at least 1."""
    assert knn_module.default_nlist(n) == want


def test_knn_search_passes_the_method_on() -> None:
    q, b = unit(np.random.default_rng(72).standard_normal((3, 4))), unit(np.random.default_rng(73).standard_normal((20, 4)))
    with pytest.raises(InputError, match="unknown knn method 'nope'"):
        knn_module.knn_search(q, b, 2, method="nope")


def test_ivf_kmeans_trains_on_distinct_points_drawn_with_the_seed() -> None:
    """The coarse quantizer equals faiss k-means run on the documented sample: n_train distinct
    rows chosen with the seed (sorted), the index's k-means settings."""
    import faiss

    base = unit(np.random.default_rng(74).standard_normal((300, 6)))
    params = IvfParams(nlist=4, train_points_per_list=64, kmeans_iterations=10)
    index = NeighbourIndex(base, "ivf", ivf=params, seed=5)
    sample = np.sort(np.random.default_rng(5).choice(300, 256, replace=False))
    assert len(np.unique(sample)) == 256
    want = faiss.IndexIVFFlat(faiss.IndexFlatIP(6), 6, 4, faiss.METRIC_INNER_PRODUCT)
    want.cp.niter, want.cp.seed, want.cp.max_points_per_centroid = 10, 5, 64
    want.train(np.ascontiguousarray(index.base[sample]))
    np.testing.assert_array_equal(index._quantizer.reconstruct_n(0, 4), want.quantizer.reconstruct_n(0, 4))


def test_hnsw_index_has_the_configured_links_and_its_sample_cost_counts_the_range() -> None:
    import faiss

    base = unit(np.random.default_rng(75).standard_normal((400, 8)))
    index = NeighbourIndex(base, "hnsw", hnsw=HnswParams(M=12, ef_construction=40))
    assert index._hnsw.hnsw.nb_neighbors(1) == 12 and index._hnsw.hnsw.efConstruction == 40
    found, fraction = index._hnsw_sample(base[:50], 5, 100, 300, 32)
    assert fraction == pytest.approx(faiss.cvar.hnsw_stats.ndis / (50 * 200))
    assert ((found >= 100) & (found < 300)).all()


def test_list_sizes_within_a_range_count_only_its_items() -> None:
    index = NeighbourIndex(clustered(20, 15, 6, 0.3, 76), "ivf", ivf=IvfParams(nlist=8), seed=1)
    assigned = index._probes[:, 0]
    for lo, hi in [(0, 300), (0, 120), (1, 300), (50, 300), (40, 90)]:
        want = [int(((assigned[lo:hi]) == lst).sum()) for lst in range(8)]
        assert index._list_sizes(lo, hi).tolist() == want


def test_recall_sample_is_drawn_with_the_seed() -> None:
    """Two indexes with the same seed measure the same sample, hence the same recall; another
    seed measures another sample (and here another recall)."""
    feats = clustered(30, 10, 8, 0.8, 77)
    target = RecallTarget(target=1.0, sample=40, exact_max_products=0)

    def recalls(seed: int) -> list[float]:
        index = NeighbourIndex(feats, "ivf", ivf=IvfParams(nlist=16), recall=target, seed=seed)
        index.self_search(10)
        return [r.recall for r in index.reports]

    assert recalls(3) == recalls(3)
    assert recalls(3) != recalls(5)


def test_exact_fallback_report_keeps_k() -> None:
    feats = clustered(30, 10, 8, 0.8, 78)
    index = NeighbourIndex(feats, "ivf", ivf=IvfParams(nlist=16),
                           recall=RecallTarget(target=1.0, sample=40, max_scan_fraction=0.05), seed=0)
    index.self_search(10)
    (report,) = index.reports
    assert report.outcome == "exact fallback" and report.k == 10 and report.method == "exact"


def test_self_search_fills_rows_whose_probed_lists_hold_fewer_than_k_items() -> None:
    """nprobe 1 over 16 lists of ~19 items and k = 40: every row is short and filled exactly."""
    feats = clustered(20, 15, 6, 0.3, 79)
    index = NeighbourIndex(feats, "ivf", ivf=IvfParams(nlist=16, nprobe=1), seed=0)
    idx, sim = index.self_search(40)
    want_idx, want_sim = brute_force(feats, feats, 40)
    np.testing.assert_allclose(sim[:, 1:], want_sim[:, 1:], atol=1e-5)
    assert (idx[:, 0] == np.arange(len(feats))).all() and (idx >= 0).all()


def test_hnsw_build_shows_its_progress_label(monkeypatch: pytest.MonkeyPatch) -> None:
    labels = []
    real = knn_module.progress_bar
    monkeypatch.setattr(knn_module, "progress_bar", lambda *a, **kw: labels.append(kw.get("desc")) or real(*a, **kw))
    NeighbourIndex(unit(np.random.default_rng(80).standard_normal((50, 4))), "hnsw", progress=True)
    assert labels == ["hnsw: build"]
