"""kNN search (exact / IVF / HNSW) and the neighbour graphs built from it."""

from __future__ import annotations

import numpy as np
import pytest

from vireid.errors import InputError
from vireid.retrieval.graph import (
    build_graph,
    expanded_k_reciprocal_sets,
    farthest_similarity,
    reverse_neighbours,
)
from vireid.retrieval.knn import (
    AUTO_EXACT_MAX_BASE,
    HnswParams,
    IvfParams,
    NeighbourIndex,
    RecallTarget,
    default_nlist,
    knn_search,
    resolve_knn,
)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """Easy data: 40 tight, well separated clusters of 30 points in 16-d; 50 queries near them."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 16)) * 4
    base = np.repeat(centres, 30, axis=0) + 0.3 * rng.standard_normal((1200, 16))
    queries = centres[rng.integers(0, 40, 50)] + 0.3 * rng.standard_normal((50, 16))
    return unit(queries), unit(base)


def brute_force(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sim = queries.astype(np.float64) @ base.T.astype(np.float64)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sim, order, axis=1)


def test_exact_equals_brute_force(clustered):
    queries, base = clustered
    idx, sim = NeighbourIndex(base, "exact").search(queries, 10)
    want_idx, want_sim = brute_force(queries, base, 10)
    assert idx.dtype == np.int64 and sim.dtype == np.float32 and idx.shape == (50, 10)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(sim, want_sim, atol=1e-5)


@pytest.mark.parametrize("method, params", [
    ("ivf", {"ivf": IvfParams(nlist=16, nprobe=4, query_nprobe=4)}),
    ("hnsw", {"hnsw": HnswParams(M=16, ef_construction=40, ef_search=64)}),
])
def test_approximate_agrees_with_brute_force_on_easy_data(clustered, method, params):
    queries, base = clustered
    index = NeighbourIndex(base, method, seed=3, **params)
    assert index.method == method
    idx, sim = index.search(queries, 10)
    want_idx, _ = brute_force(queries, base, 10)
    recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(idx, want_idx)])
    assert recall >= 0.99
    assert np.all(np.diff(sim, axis=1) <= 1e-6)  # best first
    graph_idx, graph_sim = index.self_search(8)
    want_graph, _ = brute_force(base, base, 8)
    graph_recall = np.mean([len(np.intersect1d(a, b)) / 8 for a, b in zip(graph_idx, want_graph)])
    assert graph_recall >= 0.99
    np.testing.assert_array_equal(graph_idx[:, 0], np.arange(len(base)))
    np.testing.assert_array_equal(graph_sim[:, 0], 1.0)


def test_ivf_is_deterministic_for_a_seed(clustered):
    queries, base = clustered
    first = NeighbourIndex(base, "ivf", ivf=IvfParams(nlist=16, nprobe=2), seed=7).search(queries, 5)
    second = NeighbourIndex(base, "ivf", ivf=IvfParams(nlist=16, nprobe=2), seed=7).search(queries, 5)
    np.testing.assert_array_equal(first[0], second[0])


@pytest.mark.parametrize("method", ["exact", "ivf", "hnsw"])
def test_base_range_restricts_answers(clustered, method):
    queries, base = clustered
    index = NeighbourIndex(base, method, ivf=IvfParams(nlist=16, nprobe=16, query_nprobe=16))
    idx, _ = index.search(queries, 5, base_range=(600, 1200))
    assert idx.min() >= 600 and idx.max() < 1200
    want, _ = brute_force(queries, base[600:], 5)
    recall = np.mean([len(np.intersect1d(a, b + 600)) / 5 for a, b in zip(idx, want)])
    assert recall >= 0.95  # a filtered HNSW walk may stop short of a far-away allowed region


def test_ivf_self_search_probes_query_rows_like_queries():
    """Pool rows flagged as queries scan ``query_nprobe`` lists: with all lists they are exact."""
    rng = np.random.default_rng(4)
    base = unit(rng.standard_normal((400, 8)))
    index = NeighbourIndex(base, "ivf", ivf=IvfParams(nlist=16, nprobe=1, query_nprobe=16), seed=1)
    idx, sim = index.self_search(6, query_rows=40)
    want_idx, want_sim = brute_force(base[:40], base, 6)
    np.testing.assert_array_equal(idx[:40], want_idx)
    np.testing.assert_allclose(sim[:40], want_sim, atol=1e-5)
    narrow, _ = index.self_search(6)
    assert not np.array_equal(narrow[:40], want_idx)  # one list per row is not enough on this data
    np.testing.assert_array_equal(narrow[40:], idx[40:])


def test_self_search_puts_self_first_even_with_duplicates():
    rng = np.random.default_rng(1)
    base = unit(rng.standard_normal((50, 8)))
    base[10] = base[11]  # exact duplicate: either may come first in a plain search
    idx, sim = NeighbourIndex(base, "exact").self_search(4)
    np.testing.assert_array_equal(idx[:, 0], np.arange(50))
    assert set(idx[10, :2]) == {10, 11} and set(idx[11, :2]) == {10, 11}
    np.testing.assert_array_equal(sim[:, 0], 1.0)


def test_knn_search_normalises_inputs():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((30, 6)) * rng.uniform(0.1, 10, (30, 1))
    queries = rng.standard_normal((4, 6))
    idx, sim = knn_search(queries, base, 3)
    want_idx, want_sim = brute_force(unit(queries), unit(base), 3)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(sim, want_sim, atol=1e-5)


def test_auto_threshold_and_nlist():
    assert resolve_knn("auto", AUTO_EXACT_MAX_BASE) == "exact"
    assert resolve_knn("auto", AUTO_EXACT_MAX_BASE + 1) == "ivf"
    assert resolve_knn("hnsw", 10) == "hnsw"
    assert default_nlist(1_000_000) == 2048
    assert default_nlist(100_000) == 512
    assert default_nlist(100) == 12  # capped at n // 8


@pytest.mark.parametrize("call, message", [
    (lambda b: resolve_knn("annoy", 10), "unknown knn method"),
    (lambda b: NeighbourIndex(b).search(b, 0), "positive integer"),
    (lambda b: NeighbourIndex(b).search(b, 31), "larger than the number"),
    (lambda b: NeighbourIndex(b).search(b, 2, base_range=(5, 40)), "base_range"),
    (lambda b: NeighbourIndex(np.full((3, 4), np.nan)), "non-finite"),
    (lambda b: NeighbourIndex(b[:, :0]), "non-empty 2-D"),
    (lambda b: NeighbourIndex(b, "ivf", ivf=IvfParams(nlist=100)), "nlist"),
    (lambda b: NeighbourIndex(b, "ivf", ivf=IvfParams(nlist=4, nprobe=0)), "nprobe"),
    (lambda b: NeighbourIndex(b, "ivf", ivf=IvfParams(nlist=4)).self_search(3, query_rows=31), "query_rows"),
])
def test_bad_input_raises_input_error(call, message):
    base = unit(np.random.default_rng(3).standard_normal((30, 4)))
    with pytest.raises(InputError, match=message):
        call(base)


# ------------------------------------------------------------------------------------- graphs


def slow_expanded_k_reciprocal(dist: np.ndarray, k1: int) -> list[np.ndarray]:
    """Zhong et al.'s loop, as in ``re_ranking_ranklist.py`` (REFERENCES.md §4)."""
    rank = np.argsort(dist, axis=1, kind="stable")
    half = int(np.around(k1 / 2.0))
    out = []
    for i in range(len(dist)):
        forward = rank[i, : k1 + 1]
        backward = rank[forward, : k1 + 1]
        members = forward[np.where(backward == i)[0]]
        expanded = members
        for cand in members:
            c_forward = rank[cand, : half + 1]
            c_backward = rank[c_forward, : half + 1]
            c_members = c_forward[np.where(c_backward == cand)[0]]
            if len(np.intersect1d(c_members, members)) > 2.0 / 3.0 * len(c_members):
                expanded = np.append(expanded, c_members)
        out.append(np.unique(expanded))
    return out


def test_expanded_k_reciprocal_sets_match_reference_loop():
    rng = np.random.default_rng(4)
    feats = unit(np.repeat(rng.standard_normal((12, 8)), 6, axis=0) + 0.5 * rng.standard_normal((72, 8)))
    graph = build_graph(NeighbourIndex(feats, "exact"), 9)
    pattern = expanded_k_reciprocal_sets(graph, 8)
    sim = feats.astype(np.float64) @ feats.T.astype(np.float64)
    np.fill_diagonal(sim, 2.0)  # self first, as in the graph
    want = slow_expanded_k_reciprocal(-sim, 8)
    for i in range(len(feats)):
        np.testing.assert_array_equal(pattern.indices[pattern.indptr[i]:pattern.indptr[i + 1]], want[i])


def test_reverse_neighbours_and_graph_shapes():
    feats = unit(np.random.default_rng(5).standard_normal((40, 6)))
    graph = build_graph(NeighbourIndex(feats, "exact"), 5)
    assert graph.index.shape == (40, 5) and graph.index.dtype == np.int64
    reverse = reverse_neighbours(graph, 3)
    for n in range(40):
        want = np.flatnonzero((graph.index[:, :3] == n).any(axis=1))
        np.testing.assert_array_equal(reverse.indices[reverse.indptr[n]:reverse.indptr[n + 1]], want)
    dist = graph.distance()
    assert dist.dtype == np.float32 and np.all(dist[:, 0] == 0)
    np.testing.assert_allclose(dist[:, 1:], np.sqrt(np.maximum(2 - 2 * graph.sim[:, 1:], 0)), atol=1e-6)
    with pytest.raises(InputError, match="needs 4 neighbours"):
        reverse_neighbours(graph.as_graph(3), 4)


def test_farthest_similarity_exact_when_small_and_bounded_when_sampled():
    feats = unit(np.random.default_rng(6).standard_normal((300, 5)))
    exact = (feats @ feats.T).min(axis=1)
    np.testing.assert_allclose(farthest_similarity(feats, sample_size=300), exact, atol=1e-6)
    sampled = farthest_similarity(feats, sample_size=50, seed=1)
    assert np.all(sampled >= exact - 1e-6)


# ----------------------------------------------------------------------------- recall targeting


def distribution(name: str, n: int = 6000, n_query: int = 300, d: int = 64, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Small identity-clustered sets (queries, base), unit rows, 20 images per identity on average:
    ``isotropic`` clusters in all d dimensions; ``lowrank`` clusters in an 8-d subspace plus small
    isotropic noise; ``heavy`` the same with Zipf-like identity sizes; ``offset`` the same with a strong
    common and per-identity query offset."""
    rng = np.random.default_rng(seed)
    rank = d if name == "isotropic" else 8
    n_ids = n // 20
    basis = np.eye(d) if rank == d else np.linalg.qr(rng.standard_normal((d, rank)))[0].T
    centres = rng.standard_normal((n_ids, rank))
    if name == "heavy":
        weights = np.arange(1, n_ids + 1) ** -1.1
        ids = rng.choice(n_ids, n, p=weights / weights.sum())
    else:
        ids = rng.integers(0, n_ids, n)
    query_ids = rng.choice(np.unique(ids), n_query)
    shift = (1.0 if name == "offset" else 0.6) * rng.standard_normal((n_ids, rank))
    if name == "offset":
        shift += 1.5 * rng.standard_normal(rank)
    ambient = 0.0 if rank == d else 0.05
    base = (centres[ids] + 0.35 * rng.standard_normal((n, rank))) @ basis + ambient * rng.standard_normal((n, d))
    queries = ((centres[query_ids] + shift[query_ids] + 0.35 * rng.standard_normal((n_query, rank))) @ basis
               + ambient * rng.standard_normal((n_query, d)))
    return unit(queries), unit(base)


DISTRIBUTIONS = ("isotropic", "lowrank", "heavy", "offset")


def true_recall(found: np.ndarray, base: np.ndarray, rows: np.ndarray, *, self_search: bool) -> float:
    """recall@k of ``found`` for the given query rows, by brute force, counted per row with sets
    (a self search compares the k - 1 nearest items other than the row itself)."""
    k = found.shape[1]
    exact, _ = brute_force(rows, base, k + 1)
    hits = []
    for i, row in enumerate(found):
        if self_search:
            want = [j for j in exact[i] if j != i][: k - 1]
            got = [j for j in row if j != i][: k - 1]
        else:
            want, got = exact[i][:k], row
        hits.append(len(set(want) & set(got)) / len(want))
    return float(np.mean(hits))


def ivf_ladder(nlist: int) -> list[int]:
    """The documented nprobe ladder: 4, 6, 8, 12, 16, 24, ... up to nlist."""
    values, low = set(), 4
    while low < nlist:
        values |= {low, low * 3 // 2}
        low *= 2
    return sorted(v for v in values | {nlist} if v <= nlist)


@pytest.mark.parametrize("name", DISTRIBUTIONS)
@pytest.mark.parametrize("method", ["ivf", "hnsw"])
def test_recall_target_holds_on_every_distribution(name, method):
    queries, base = distribution(name)
    target = RecallTarget(target=0.95, sample=400, max_scan_fraction=0.5, exact_max_products=0)
    index = NeighbourIndex(base, method, recall=target, hnsw=HnswParams(M=16, ef_construction=40), seed=1)
    graph, _ = index.self_search(21)
    near, _ = index.search(queries, 50)
    graph_report, query_report = index.reports
    assert (graph_report.name, graph_report.rows, graph_report.k) == ("gallery graph", len(base), 21)
    assert (query_report.name, query_report.rows, query_report.k) == ("query lists", len(queries), 50)
    for report in index.reports:
        assert report.outcome == "met" and report.method == method and report.recall >= 0.95
        assert report.sample == min(400, report.rows) and report.target == 0.95
        assert 0 < report.scan_fraction <= 0.5
    rows = np.random.default_rng(5).choice(len(base), 600, replace=False)
    assert true_recall(graph[rows], base, base[rows], self_search=False) >= 0.93  # the sample generalises
    assert true_recall(near, base, queries, self_search=False) >= 0.94


@pytest.mark.parametrize("method", ["ivf", "hnsw"])
def test_measured_recall_is_the_searchs_own_recall(method):
    """With the whole search as the sample, the reported recall is that of the returned lists."""
    queries, base = distribution("lowrank", n=3000, n_query=200)
    index = NeighbourIndex(base, method, recall=RecallTarget(target=0.9, sample=5000, exact_max_products=0), seed=2)
    graph, _ = index.self_search(12)
    near, _ = index.search(queries, 30)
    assert index.reports[0].sample == len(base) and index.reports[1].sample == len(queries)
    assert index.reports[0].recall == pytest.approx(true_recall(graph, base, base, self_search=True), abs=1e-12)
    assert index.reports[1].recall == pytest.approx(true_recall(near, base, queries, self_search=False), abs=1e-12)


def test_chosen_nprobe_is_the_first_ladder_value_reaching_the_target():
    queries, base = distribution("offset", n=4000, n_query=200)
    target = RecallTarget(target=0.97, sample=5000, exact_max_products=0)
    tuned = NeighbourIndex(base, "ivf", recall=target, seed=3)
    tuned.search(queries, 40)
    chosen = tuned.reports[0].value
    ladder = ivf_ladder(default_nlist(len(base)))
    assert chosen in ladder and chosen > ladder[0]
    below = ladder[ladder.index(chosen) - 1]
    recalls = {}
    for nprobe in (below, chosen):
        fixed = NeighbourIndex(base, "ivf", ivf=IvfParams(query_nprobe=nprobe), recall=None, seed=3)
        recalls[nprobe] = true_recall(fixed.search(queries, 40)[0], base, queries, self_search=False)
        assert fixed.reports[0].outcome == "fixed" and fixed.reports[0].value == nprobe
    assert recalls[chosen] >= 0.97 > recalls[below]
    assert tuned.reports[0].recall == pytest.approx(recalls[chosen], abs=1e-12)


def test_scan_fraction_is_the_probed_share_of_the_base():
    """The IVF cost (faiss' ndis) recomputed from the centroids: mean size of the probed lists over N."""
    queries, base = distribution("heavy", n=4000, n_query=200)
    index = NeighbourIndex(base, "ivf", recall=RecallTarget(target=0.97, sample=5000, exact_max_products=0), seed=4)
    index.search(queries, 40)
    report = index.reports[0]
    centroids = index._quantizer.reconstruct_n(0, index._quantizer.ntotal)
    sizes = np.bincount(np.argmax(base @ centroids.T, axis=1), minlength=len(centroids))
    probed = np.argsort(-(queries @ centroids.T), axis=1, kind="stable")[:, :report.value]
    assert report.scan_fraction == pytest.approx(sizes[probed].sum(axis=1).mean() / len(base), rel=1e-3)


def test_unreachable_target_falls_back_to_exact_search_and_says_so(caplog):
    queries, base = distribution("isotropic", n=3000, n_query=100)
    index = NeighbourIndex(base, "ivf", recall=RecallTarget(target=1.0, sample=40, max_scan_fraction=0.05), seed=5)
    with caplog.at_level("INFO", logger="vireid.retrieval.knn"):
        idx, sim = index.search(queries, 20)
    want_idx, want_sim = brute_force(queries, base, 20)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(sim, want_sim, atol=1e-5)
    report = index.reports[0]
    assert (report.outcome, report.method, report.recall, report.value) == ("exact fallback", "exact", 1.0, None)
    assert "nprobe" in report.note and "0.05" not in report.note
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "\n" not in record.getMessage()
    assert "recall target 1.0 not met within the budget" in record.getMessage()
    assert "searched exactly" in record.getMessage()


def test_unreachable_target_without_exact_budget_keeps_the_best_setting_reached(caplog):
    queries, base = distribution("isotropic", n=3000, n_query=100)
    target = RecallTarget(target=1.0, sample=5000, max_scan_fraction=0.1, exact_max_products=0)
    index = NeighbourIndex(base, "ivf", recall=target, seed=6)
    with caplog.at_level("WARNING", logger="vireid.retrieval.knn"):
        idx, _ = index.search(queries, 20)
    report = index.reports[0]
    assert report.outcome == "below target" and report.method == "ivf" and report.recall < 1.0
    ladder = ivf_ladder(default_nlist(len(base)))
    centroids = index._quantizer.reconstruct_n(0, index._quantizer.ntotal)
    sizes = np.bincount(np.argmax(base @ centroids.T, axis=1), minlength=len(centroids))
    order = np.argsort(-(queries @ centroids.T), axis=1, kind="stable")
    fraction = {p: sizes[order[:, :p]].sum(axis=1).mean() / len(base) for p in ladder}
    assert fraction[report.value] <= 0.1 < fraction[ladder[ladder.index(report.value) + 1]]
    fixed = NeighbourIndex(base, "ivf", ivf=IvfParams(query_nprobe=report.value), seed=6)
    np.testing.assert_array_equal(idx, fixed.search(queries, 20)[0])
    assert report.recall == pytest.approx(true_recall(idx, base, queries, self_search=False), abs=1e-12)
    (record,) = [r for r in caplog.records if r.name == "vireid.retrieval.knn" and r.levelname == "WARNING"]
    assert "NOT met" in record.getMessage() and f"nprobe {report.value}" in record.getMessage()


def test_fixed_parameters_without_a_target_and_exact_reports():
    queries, base = distribution("lowrank", n=2000, n_query=50)
    index = NeighbourIndex(base, "ivf", ivf=IvfParams(nprobe=8, query_nprobe=32), seed=7)
    index.self_search(5, query_rows=20)
    index.search(queries, 5)
    assert [(r.name, r.rows, r.outcome, r.value, r.recall) for r in index.reports] == [
        ("pool graph (query rows)", 20, "fixed", 32, None), ("pool graph (gallery rows)", 1980, "fixed", 8, None),
        ("query lists", 50, "fixed", 32, None)]
    exact = NeighbourIndex(base, "exact", recall=RecallTarget())
    exact.search(queries, 5)
    assert [(r.method, r.outcome, r.recall, r.scan_fraction) for r in exact.reports] == [("exact", "exact", 1.0, 1.0)]
    assert exact.reports[0].line().endswith(": exact")


def test_pool_query_rows_are_tuned_as_queries():
    """The k-reciprocal pool: query rows (the other modality) need more lists than gallery rows."""
    queries, base = distribution("offset", n=4000, n_query=300)
    pool = np.concatenate([queries, base])
    index = NeighbourIndex(pool, "ivf", recall=RecallTarget(target=0.97, sample=5000, exact_max_products=0), seed=8)
    graph, _ = index.self_search(11, query_rows=len(queries))
    query_rows, gallery_rows = index.reports
    assert (query_rows.name, query_rows.rows, gallery_rows.rows) == ("pool graph (query rows)", 300, 4000)
    assert query_rows.value > gallery_rows.value
    np.testing.assert_array_equal(graph[:, 0], np.arange(len(pool)))
    assert true_recall(graph[:300], pool, queries, self_search=True) == pytest.approx(query_rows.recall, abs=1e-12)
    assert true_recall(graph[300:], pool, base, self_search=False) >= 0.97


@pytest.mark.parametrize("kwargs, message", [
    ({"target": 0.0}, "recall target"), ({"target": 1.5}, "recall target"), ({"sample": 0}, "recall sample"),
    ({"max_scan_fraction": 0.0}, "max_scan_fraction"), ({"max_scan_fraction": 1.01}, "max_scan_fraction"),
    ({"exact_max_products": -1}, "exact_max_products"), ({"sample": 2.5}, "recall sample"),
    ({"max_scan_products": 0}, "max_scan_products"), ({"max_scan_products": float("nan")}, "max_scan_products"),
])
def test_recall_target_validation(kwargs, message):
    with pytest.raises(InputError, match=message):
        RecallTarget(**kwargs)


def test_report_lines_and_log_levels(caplog):
    queries, base = distribution("lowrank", n=2000, n_query=100)
    index = NeighbourIndex(base, "ivf", recall=RecallTarget(target=0.9, sample=100, exact_max_products=0), seed=9)
    with caplog.at_level("INFO", logger="vireid.retrieval.knn"):
        index.search(queries, 10)
    report = index.reports[0]
    assert report.outcome == "met" and report.target == 0.9 and 0 <= report.seconds < 60
    (record,) = caplog.records
    assert record.levelname == "INFO" and record.getMessage() == report.line() == (
        f"knn query lists (100 rows, k=10): ivf nprobe {report.value}, recall@10 {report.recall:.4f} on 100 sampled "
        f"rows, scanning {100 * report.scan_fraction:.1f} % of an exact search (target 0.9)")
    fixed = NeighbourIndex(base, "hnsw", hnsw=HnswParams(ef_search=40))
    fixed.search(queries, 50)
    assert fixed.reports[0].line() == "knn query lists (100 rows, k=50): hnsw efSearch 50 (fixed; recall not measured)"
    assert fixed.reports[0].target is None and fixed.reports[0].scan_fraction is None


def test_exact_fallback_boundary_is_inclusive():
    """Exact search is the fallback while rows x base inner products <= exact_max_products."""
    queries, base = distribution("offset", n=1000, n_query=50)
    for products, outcome in ((50 * 1000, "exact fallback"), (50 * 1000 - 1, "below target")):
        index = NeighbourIndex(base, "ivf", ivf=IvfParams(nlist=64), seed=1, recall=RecallTarget(
            target=1.0, sample=20, max_scan_fraction=0.08, exact_max_products=products))
        index.search(queries, 10)
        assert index.reports[0].outcome == outcome


def test_a_search_of_at_most_twice_the_sample_rows_is_exact_when_exact_search_is_allowed(caplog):
    """Measuring recall costs an exact search of the sample: up to 2 × sample rows the search is exact
    (outcome "exact, few rows", one info line); one row more, or no exact budget, and the ladder runs."""
    queries, base = distribution("offset", n=1000, n_query=41)
    for rows, exact_max, outcome in ((40, 1e9, "exact, few rows"), (41, 1e9, "met"), (40, 40 * 1000 - 1, "met"),
                                     (40, 40 * 1000, "exact, few rows")):
        index = NeighbourIndex(base, "ivf", ivf=IvfParams(nlist=16), seed=1,
                               recall=RecallTarget(target=0.5, sample=20, exact_max_products=exact_max))
        with caplog.at_level("INFO", logger="vireid.retrieval.knn"):
            caplog.clear()
            idx, sim = index.search(queries[:rows], 10)
        report = index.reports[0]
        assert report.outcome == outcome, (rows, exact_max)
        if outcome == "exact, few rows":
            np.testing.assert_array_equal(idx, brute_force(queries[:rows], base, 10)[0])
            assert (report.method, report.value, report.recall, report.sample) == ("exact", None, 1.0, 0)
            assert [r.getMessage() for r in caplog.records] == [
                f"knn query lists ({rows} rows, k=10): exact (measuring the recall of an approximate search would "
                "cost half as much or more)"]
        else:
            assert (report.method, report.sample) == ("ivf", 20)


def test_default_fallback_searches_a_100k_pool_exactly_but_not_a_million():
    """The default fallback covers krr's pool graph at 100,000 items + 2,000 queries (documented), not a
    10^6-item graph."""
    default = RecallTarget()
    assert 102_000 * 102_000 <= default.exact_max_products < 1_000_000 * 100_000
    queries, base = distribution("offset", n=1000, n_query=50)
    index = NeighbourIndex(base, "ivf", ivf=IvfParams(nlist=64), seed=1,
                           recall=RecallTarget(target=1.0, sample=20, max_scan_fraction=0.08))
    index.search(queries, 10)
    assert index.reports[0].outcome == "exact fallback"


def test_total_products_cap_bounds_the_ladder_like_the_same_fraction():
    """max_scan_products caps the scan at products / (rows x base): the same ladder stop as that fraction."""
    queries, base = distribution("lowrank", n=2000, n_query=100)
    reports = []
    for recall in (RecallTarget(target=1.0, sample=100, max_scan_fraction=1.0, max_scan_products=0.1 * 100 * 2000,
                                exact_max_products=0),
                   RecallTarget(target=1.0, sample=100, max_scan_fraction=0.1, exact_max_products=0)):
        index = NeighbourIndex(base, "ivf", ivf=IvfParams(nlist=64), seed=3, recall=recall)
        index.search(queries, 10)
        reports.append(index.reports[0])
    capped, by_fraction = reports
    assert capped.outcome == by_fraction.outcome == "below target"
    assert capped.value == by_fraction.value and capped.scan_fraction == by_fraction.scan_fraction
    assert capped.scan_fraction <= 0.1
    uncapped = NeighbourIndex(base, "ivf", ivf=IvfParams(nlist=64), seed=3, recall=RecallTarget(
        target=1.0, sample=100, max_scan_fraction=1.0, exact_max_products=0))
    uncapped.search(queries, 10)
    assert uncapped.reports[0].value > capped.value


def test_rerank_cli_recall_defaults_are_the_library_defaults():
    from vireid.cli import build_parser

    args = build_parser().parse_args(["rerank", "f.npz", "--method", "aim", "--out", "d.npy"])
    default = RecallTarget()
    assert (args.recall_target, args.recall_sample, args.recall_budget, args.recall_max_products) == (
        default.target, default.sample, default.max_scan_fraction, default.max_scan_products)


def test_hnsw_ef_search_ladder_and_cost():
    queries, base = distribution("heavy", n=3000, n_query=150)
    index = NeighbourIndex(base, "hnsw", hnsw=HnswParams(M=8, ef_construction=20), seed=2,
                           recall=RecallTarget(target=0.97, sample=5000, max_scan_fraction=1.0, exact_max_products=0))
    near, _ = index.search(queries, 20)
    report = index.reports[0]
    assert report.value in [20 * 2 ** i for i in range(12)] and report.outcome == "met"
    assert report.recall == pytest.approx(true_recall(near, base, queries, self_search=False), abs=1e-12)
    assert 0 < report.scan_fraction < 1
    if report.value > 20:  # the previous ef of the ladder would not have reached the target
        lower = NeighbourIndex(base, "hnsw", hnsw=HnswParams(M=8, ef_construction=20, ef_search=report.value // 2),
                               seed=2)
        assert true_recall(lower.search(queries, 20)[0], base, queries, self_search=False) < 0.97


def test_scan_fraction_counts_only_the_searched_range():
    """krr's query lists search the gallery part of the pool: the cost is the probed lists' members in it."""
    queries, base = distribution("offset", n=3000, n_query=100)
    pool = np.concatenate([queries, base])
    index = NeighbourIndex(pool, "ivf", seed=3, recall=RecallTarget(target=0.95, sample=5000, exact_max_products=0))
    near, _ = index.search(queries, 20, base_range=(100, len(pool)))
    report = index.reports[0]
    centroids = index._quantizer.reconstruct_n(0, index._quantizer.ntotal)
    sizes = np.bincount(np.argmax(base @ centroids.T, axis=1), minlength=len(centroids))
    probed = np.argsort(-(queries @ centroids.T), axis=1, kind="stable")[:, :report.value]
    assert report.scan_fraction == pytest.approx(sizes[probed].sum(axis=1).mean() / len(base), rel=1e-3)
    assert report.recall == pytest.approx(true_recall(near - 100, base, queries, self_search=False), abs=1e-12)


def test_recall_target_accepts_its_boundaries():
    target = RecallTarget(target=1.0, sample=1, max_scan_fraction=1.0, exact_max_products=0)
    assert (target.target, target.sample, target.max_scan_fraction) == (1.0, 1, 1.0)
