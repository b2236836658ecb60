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
