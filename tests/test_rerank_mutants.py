"""Re-ranker cases the other re-ranking tests leave open: the documented defaults, the names in the
input errors, k = 1 neighbour lists, local expansion onto fewer rows and a gallery feature too short
to normalise, each checked against a plain loop or a hand-worked value."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from test_rerank_paper import _euclid, _expanded, _nearest, _reciprocal, _unit, loop_mnnr, loop_sgr
from vireid.errors import InputError
from vireid.retrieval import rerank
from vireid.retrieval.graph import NeighbourGraph
from vireid.retrieval.kreciprocal import half_reciprocal_sets, krr, local_expansion, pool_neighbours
from vireid.retrieval.sim import mnnr, sgr, sim


def _features(n: int, d: int, seed: int) -> np.ndarray:
    """Clustered features (8 identities), float64, not normalised."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, d))
    return centres[rng.integers(0, 8, size=n)] + 0.6 * rng.normal(size=(n, d))


@pytest.fixture(scope="module")
def features() -> tuple[np.ndarray, np.ndarray]:
    """30 queries, 44 gallery items: more than k_graph = kg = 20 (+1) gallery items."""
    return _features(30, 12, seed=11), _features(44, 12, seed=12)


def test_sgr_defaults_are_lambda_001_k9_kgraph_20(features: tuple[np.ndarray, np.ndarray]) -> None:
    q, g = features
    got = sgr(q, g, dtype=np.float64)
    np.testing.assert_allclose(got, loop_sgr(q, g, 0.01, 9, 20), rtol=0, atol=1e-12)
    # the defaults are visible: one step away in λ or k_graph changes the result
    assert np.abs(loop_sgr(q, g, 0.01, 9, 21) - got).max() > 1e-6
    assert np.abs(loop_sgr(q, g, 1.01, 9, 20) - got).max() > 1e-3


def test_mnnr_defaults_are_kq_12_kg_20_alpha_03(features: tuple[np.ndarray, np.ndarray]) -> None:
    q, g = features
    got = mnnr(q, g, dtype=np.float64)
    np.testing.assert_allclose(got, loop_mnnr(_euclid(_unit(q), _unit(g)), g, 12, 20, 0.3), rtol=0, atol=1e-12)
    assert np.abs(loop_mnnr(_euclid(_unit(q), _unit(g)), g, 12, 21, 0.3) - got).max() > 1e-6


@pytest.mark.parametrize("method", [sgr, mnnr, sim])
@pytest.mark.parametrize("side", ["query", "gallery"])
def test_bad_features_error_names_the_side(features: tuple[np.ndarray, np.ndarray], method, side: str) -> None:
    q, g = features
    bad = np.zeros((3, 12), dtype=np.int64)
    args = (bad, g) if side == "query" else (q, bad)
    with pytest.raises(InputError, match=rf"^{side} features must be a non-empty 2-D float array"):
        method(*args)
    nan = (q.copy(), g.copy())[side == "gallery"]
    nan[1, 2] = np.nan
    args = (nan, g) if side == "query" else (q, nan)
    with pytest.raises(InputError, match=rf"^{side} features contains non-finite values$"):
        method(*args)


def test_pool_neighbours_accepts_k_one() -> None:
    """k = 1: every pool item's list is itself (similarity 1), and Q·Gᵀ is still filled."""
    pool = _unit(_features(9, 4, seed=5))
    num_query = 4
    query_gallery = np.full((num_query, 5), np.nan)
    graph = pool_neighbours(pool, num_query, 1, query_gallery)
    np.testing.assert_array_equal(graph.index, np.arange(9)[:, None])
    np.testing.assert_array_equal(graph.sim, np.ones((9, 1)))
    want = np.array([[sum(pool[i, t] * pool[num_query + j, t] for t in range(4)) for j in range(5)]
                     for i in range(num_query)])
    np.testing.assert_allclose(query_gallery, want, rtol=0, atol=1e-15)
    with pytest.raises(InputError, match=r"k=0 must lie in \[1, 9\]"):
        pool_neighbours(pool, num_query, 0, query_gallery)


def test_local_expansion_onto_fewer_rows_than_the_vectors() -> None:
    """Zhong Eq. 11 for 2 rows averaging rows of a 4-row matrix; row 3 is nobody's neighbour."""
    dense = np.array([[0.5, 0.0, 0.2, 0.0, 0.0],
                      [0.0, 1.0, 0.0, 0.0, 0.3],
                      [0.4, 0.0, 0.0, 0.7, 0.0],
                      [0.0, 0.0, 0.9, 0.0, 0.1]])
    neighbours = np.array([[0, 1], [2, 1]])
    got = local_expansion(sp.csr_matrix(dense), neighbours)
    want = np.array([[(dense[0, c] + dense[1, c]) / 2 for c in range(5)],
                     [(dense[2, c] + dense[1, c]) / 2 for c in range(5)]])
    assert got.shape == (2, 5)
    np.testing.assert_allclose(got.toarray(), want, rtol=0, atol=1e-15)
    assert got.has_sorted_indices


def _loop_krr_paper(d_qg: np.ndarray, d_gg: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong Eq. 3–12, pool G ∪ {p} per probe p (docs/reranking.md, paper column), from the distances."""
    half = int(np.around(k1 / 2))
    radius = np.sort(d_gg, axis=1)                      # radius[g, k]: g's k-th nearest other item

    def expanded(j: int) -> set[int]:
        base = _reciprocal(d_gg, j, k1)
        grown = set(base)
        for c in base:
            hood = _reciprocal(d_gg, c, half)
            if len(hood & base) > 2 / 3 * len(hood):
                grown |= hood
        return grown

    def mean(vectors: list[dict[int, float]]) -> dict[int, float]:
        keys = set().union(*vectors)
        return {m: sum(v.get(m, 0.0) for v in vectors) / len(vectors) for m in keys}

    def jaccard(a: dict[int, float], b: dict[int, float]) -> float:
        keys = set(a) | set(b)
        return 1 - (sum(min(a.get(m, 0.0), b.get(m, 0.0)) for m in keys)
                    / sum(max(a.get(m, 0.0), b.get(m, 0.0)) for m in keys))

    base = [{m: np.exp(-d_gg[j, m]) for m in expanded(j)} for j in range(len(d_gg))]
    gallery = [mean([base[n] for n in _nearest(d_gg[j], k2)]) for j in range(len(d_gg))]
    out = np.empty_like(d_qg)
    for i in range(len(d_qg)):
        near = _nearest(d_qg[i], k1)
        reciprocal = {n for n in near if d_qg[i, n] < radius[n, k1]}
        grown = set(reciprocal)
        for c in reciprocal:
            hood = _reciprocal(d_gg, c, half)
            probe_inside = c in near[:half] and d_qg[i, c] < radius[c, half]
            if len(hood & reciprocal) + probe_inside >= 2 / 3 * (len(hood) + probe_inside):
                grown |= hood
        probe = mean([{m: np.exp(-d_qg[i, m]) for m in grown}] + [base[n] for n in near[:k2 - 1]])
        for j in range(len(d_gg)):
            out[i, j] = (1 - lam) * jaccard(probe, gallery[j]) + lam * d_qg[i, j]
    return out


def test_krr_paper_gallery_item_is_its_own_nearest_even_when_too_short_to_normalise() -> None:
    """A gallery feature of norm < 1e-12 is scaled by 1e12 (``x / max(‖x‖, 1e-12)``), not to unit
    length: its computed self-similarity (0.01 here) is below its similarity to others, yet its
    distance to itself is 0, so it stays first in its own neighbour list (d = sqrt(2 − 2s) elsewhere)."""
    rng = np.random.default_rng(0)
    centres = np.abs(rng.normal(size=(4, 6))) + 0.5
    q = centres[rng.integers(0, 4, 8)] + 0.3 * rng.normal(size=(8, 6))
    g = np.concatenate([centres[rng.integers(0, 4, 20)] + 0.3 * rng.normal(size=(20, 6)),
                        1e-13 * centres[:1] / np.linalg.norm(centres[0])])
    qn = _unit(q)
    gn = np.concatenate([_unit(g[:-1]), g[-1:] / 1e-12])
    assert abs(np.linalg.norm(gn[-1]) - 0.1) < 1e-12

    def dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum(2 - 2 * np.array([[u @ v for v in b] for u in a]), 0))

    d_gg = dist(gn, gn)
    np.fill_diagonal(d_gg, 0.0)
    for k1, k2 in [(4, 3), (8, 4)]:
        got = krr(q, g, k1=k1, k2=k2, lam=0.3, variant="paper", dtype=np.float64)
        np.testing.assert_allclose(got, _loop_krr_paper(dist(qn, gn), d_gg, k1, k2, 0.3), rtol=0, atol=1e-12)


def test_krr_paper_survives_a_last_query_with_no_reciprocal_neighbour() -> None:
    """A query whose probe vector is empty (an outlier, k2 = 1) may come last in its block: the
    result equals the one with the queries in the other order, row for row."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 8))
    gallery = np.repeat(centres, 5, axis=0) + 0.01 * rng.normal(size=(20, 8))
    queries = np.concatenate([gallery[:1] + 0.01, rng.normal(size=(1, 8))])
    params = {"k1": 3, "k2": 1}
    forward = rerank("krr", queries, gallery, variant="paper", params=params)
    backward = rerank("krr", queries[::-1].copy(), gallery, variant="paper", params=params)
    np.testing.assert_allclose(forward, backward[::-1], atol=1e-6)


def test_mnnr_with_kq_one_matches_the_loop(features: tuple[np.ndarray, np.ndarray]) -> None:
    """SIM Eq. 6–8 with N^c(q) = the single nearest gallery item (one entry per query row)."""
    q, g = features
    got = mnnr(q, g, kq=1, kg=6, alpha=0.3, variant="paper", dtype=np.float64)
    np.testing.assert_allclose(got, loop_mnnr(_euclid(_unit(q), _unit(g)), g, 1, 6, 0.3), rtol=0, atol=1e-12)


def _unit_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(2 - 2 * np.array([[u @ v for v in _unit(b)] for u in _unit(a)]), 0))


def test_krr_paper_with_k2_two_averages_two_gallery_vectors(features: tuple[np.ndarray, np.ndarray]) -> None:
    """Zhong Eq. 11 with k2 = 2: each gallery vector is the mean of its own and its nearest neighbour's."""
    q, g = features
    d_gg = _unit_distances(g, g)
    np.fill_diagonal(d_gg, 0.0)
    got = krr(q, g, k1=6, k2=2, lam=0.3, variant="paper", dtype=np.float64)
    np.testing.assert_allclose(got, _loop_krr_paper(_unit_distances(q, g), d_gg, 6, 2, 0.3), rtol=0, atol=1e-12)


@pytest.mark.parametrize("side", ["query", "gallery"])
@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_krr_bad_features_error_names_the_side(features: tuple[np.ndarray, np.ndarray], side: str,
                                               variant: str) -> None:
    q, g = features
    bad = np.zeros((3, 12), dtype=np.int64)
    args = (bad, g) if side == "query" else (q, bad)
    with pytest.raises(InputError, match=rf"^{side} features must be a non-empty 2-D float array"):
        krr(*args, variant=variant)


def test_shared_mass_in_many_small_blocks_matches_the_dense_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    """m[i, j] = Σ_k min(left[i, k], right[j, k]) with a join budget of 3 pairs, so rows split into
    many blocks (and rows over the budget stand alone); empty rows first, inside and last."""
    from vireid.retrieval import kreciprocal
    monkeypatch.setattr(kreciprocal, "JOIN_ELEMENTS", 3)
    rng = np.random.default_rng(7)
    left = rng.random((9, 6)) * (rng.random((9, 6)) < 0.4)
    left[[0, 4, 8]] = 0.0
    left[1, :] = rng.random(6) + 0.1
    right = rng.random((7, 6)) * (rng.random((7, 6)) < 0.5)
    got = kreciprocal.shared_mass(sp.csr_matrix(left), sp.csr_matrix(right).tocsc())
    want = np.array([[sum(min(left[i, k], right[j, k]) for k in range(6)) for j in range(7)] for i in range(9)])
    assert got.shape == (9, 7)
    np.testing.assert_allclose(got.toarray(), want, rtol=0, atol=1e-15)


def test_krr_reference_with_k1_spanning_the_whole_pool() -> None:
    """k1 + 1 = Q + G: every pool item is in every k1-reciprocal set, so with k2 = 1 the
    reference result is, densely, V_i = exp(−d²_i/max_i) / Σ over the whole pool,
    d_J = 1 − m/(2 − m) with m = Σ min(V_q, V_g), and (1 − λ) d_J + λ d²/max."""
    q, g = _features(4, 5, seed=3), _features(7, 5, seed=4)
    pool = np.concatenate([_unit(q), _unit(g)])
    n = len(pool)
    d2 = np.maximum(2 - 2 * np.array([[u @ v for v in pool] for u in pool]), 0)
    np.fill_diagonal(d2, 0.0)
    scaled = d2 / d2.max(axis=1, keepdims=True)
    vectors = np.exp(-scaled)
    vectors /= vectors.sum(axis=1, keepdims=True)
    want = np.empty((4, 7))
    for i in range(4):
        for j in range(7):
            m = sum(min(vectors[i, t], vectors[4 + j, t]) for t in range(n))
            want[i, j] = 0.7 * (1 - m / (2 - m)) + 0.3 * scaled[i, 4 + j]
    got = krr(q, g, k1=n - 1, k2=1, lam=0.3, variant="reference", dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_sgr_reference_keeps_the_input_distance_when_no_path_is_shorter(
        features: tuple[np.ndarray, np.ndarray]) -> None:
    """K = 1 and λ = 10⁶: every path through a neighbour is longer than the direct edge, so SGR returns the
    input distance; the sequential reference then updates nothing and equals the paper variant bit for bit,
    both in the requested float32."""
    q, g = features
    reference = sgr(q, g, lam=1e6, K=1, k_graph=5, variant="reference")
    paper = sgr(q, g, lam=1e6, K=1, k_graph=5, variant="paper")
    assert reference.dtype == np.float32
    np.testing.assert_array_equal(reference, paper)
    np.testing.assert_allclose(reference, _euclid(_unit(q), _unit(g)), rtol=0, atol=2e-6)


def test_mnnr_gallery_item_is_its_own_nearest_even_when_too_short_to_normalise() -> None:
    """As the krr case above: a gallery feature of norm < 1e-12 ends at norm 0.1 (self-similarity 0.01,
    below its similarity to others), yet it heads its own neighbour list (distance 0 to itself), so its
    reciprocal set holds itself. The last two queries point away from every gallery feature: the short one
    is their nearest gallery item, and their Jaccard term sees its set."""
    rng = np.random.default_rng(2)
    centres = np.abs(rng.normal(size=(4, 6))) + 0.5
    q = np.concatenate([centres[rng.integers(0, 4, 8)] + 0.3 * rng.normal(size=(8, 6)), -centres[:2]])
    g = np.concatenate([centres[rng.integers(0, 4, 20)] + 0.3 * rng.normal(size=(20, 6)),
                        1e-13 * centres[:1] / np.linalg.norm(centres[0])])
    gn = np.concatenate([_unit(g[:-1]), g[-1:] / 1e-12])

    def dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum(2 - 2 * np.array([[u @ v for v in b] for u in a]), 0))

    d_qg, d_gg = dist(_unit(q), gn), dist(gn, gn)
    np.fill_diagonal(d_gg, 0.0)
    for kq, kg in [(5, 4), (3, 6)]:
        sets = [_expanded(d_gg, j, kg) for j in range(len(g))]
        assert 20 in sets[20] and _nearest(d_qg[-1], 1) == [20]
        want = np.array([[0.3 * d_qg[i, j] + 0.7 * (1 - len(set(_nearest(d_qg[i], kq)) & sets[j])
                                                     / len(set(_nearest(d_qg[i], kq)) | sets[j]))
                          for j in range(len(g))] for i in range(len(q))])
        got = mnnr(q, g, kq=kq, kg=kg, alpha=0.3, variant="paper", dtype=np.float64)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


# 16 gallery points of Z⁸ on the sphere of radius 32: divided by 32 they are unit vectors whose inner
# products (n/1024) and distances are exact, so equal inner products give bit-equal distances everywhere.
_LATTICE_GALLERY = [
    [-3, -9, 26, -1, 12, 8, 7, 0], [-9, -1, 14, -2, 20, -2, -13, 13], [-9, -14, 4, 4, -11, -4, 23, 7],
    [-7, -2, 13, 4, 7, -12, -8, 23], [-3, 0, 0, 26, -7, 11, 12, 5], [6, 1, 6, 12, -13, -14, -9, -19],
    [6, -11, -11, 22, -5, -2, -13, -8], [-12, -5, -25, 5, 12, 3, -6, 4], [21, 12, -6, -2, -10, -13, 3, 11],
    [4, 8, 25, 11, -2, 4, 3, 13], [-20, 5, -12, 5, -14, -3, 9, 12], [-8, -11, -14, 11, 7, 3, -8, -20],
    [6, -22, 11, 2, 11, 8, 13, -5], [-2, 5, 11, 2, -2, -29, 0, 5], [-13, 22, -3, 2, -13, 12, -6, -3],
    [-10, 27, -12, 6, 3, 1, 1, -2]]


def test_krr_paper_probe_tied_with_the_kth_neighbour_is_not_reciprocal() -> None:
    """Zhong Eq. 3 in G ∪ {p}: p is among the k1 nearest of g only if it *beats* g's k1-th other neighbour
    (g's own list wins a tie). The probe is g₃ with its last coordinate negated; g₀'s last coordinate is 0,
    so d(p, g₀) = d(g₃, g₀) exactly, and g₃ is g₀'s 4th nearest other item while g₀ is among p's 4 nearest."""
    g = np.array(_LATTICE_GALLERY, dtype=np.float64) / 32
    probe = g[3] * [1, 1, 1, 1, 1, 1, 1, -1]
    q = np.stack([probe, np.array([26, 10, -4, -5, -6, -11, 5, -5]) / 32,
                  np.array([9, -13, 6, 9, 25, 0, -4, -4]) / 32])
    d_qg, d_gg = _unit_distances(q, g), _unit_distances(g, g)
    np.fill_diagonal(d_gg, 0.0)
    assert np.argsort(d_gg[0], kind="stable")[4] == 3 and d_qg[0, 0] == d_gg[0, 3]       # the tie
    assert 0 in _nearest(d_qg[0], 4)
    for k2 in (1, 2):
        got = krr(q, g, k1=4, k2=k2, lam=0.3, variant="paper", dtype=np.float64)
        np.testing.assert_allclose(got, _loop_krr_paper(d_qg, d_gg, 4, k2, 0.3), rtol=0, atol=1e-12)


def _with_a_short_gallery_feature(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Clustered queries and gallery (positive centres) whose last gallery feature has norm 1e-13: it is
    scaled by 1e12 to norm 0.1 (``x / max(‖x‖, 1e-12)``), so its self-similarity 0.01 is below its
    similarity to the others. Returns q, g and their normalised forms."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.normal(size=(4, 6))) + 0.5
    q = centres[rng.integers(0, 4, 8)] + 0.3 * rng.normal(size=(8, 6))
    g = np.concatenate([centres[rng.integers(0, 4, 20)] + 0.3 * rng.normal(size=(20, 6)),
                        1e-13 * centres[:1] / np.linalg.norm(centres[0])])
    gn = np.concatenate([_unit(g[:-1]), g[-1:] / 1e-12])
    assert abs(np.linalg.norm(gn[-1]) - 0.1) < 1e-12
    return q, g, _unit(q), gn


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_aim_affinity_rows_use_the_computed_self_similarity(variant: str) -> None:
    """SAAI Eq. 6 on the gallery Gram matrix as computed (models/AIM.py): the short gallery feature's own
    entry is its self-similarity 0.01, not 1, so its top-k1 row and its top-k2 neighbours (k2 >= 2; k2 = 1
    skips the averaging) are other items. A last query along the short feature shares its top-k1 items with
    that row. Dense loop; no ties, so both variants agree."""
    q, g, qn, gn = _with_a_short_gallery_feature(4)
    q = np.concatenate([q, 1e13 * g[-1:]])
    qn = _unit(q)
    s_qg = np.array([[u @ v for v in gn] for u in qn])
    s_gg = np.array([[u @ v for v in gn] for u in gn])
    assert s_gg[-1, -1] < np.sort(s_gg[-1])[-4]                        # not among its own 3 largest

    def top(s: np.ndarray, k: int) -> np.ndarray:
        row = np.zeros_like(s)
        keep = _nearest(-s, k)
        row[keep] = s[keep]
        return row

    for k1, k2 in [(3, 2), (5, 3)]:
        q_aff = _unit(np.array([top(s, k1) for s in s_qg]))
        g_rows = np.array([top(s, k1) for s in s_gg])
        g_aff = _unit(np.array([g_rows[_nearest(-s_gg[j], k2)].mean(axis=0) for j in range(len(g))]))
        want = np.array([[-(q_aff[i] @ g_aff[j]) - s_qg[i, j] for j in range(len(g))] for i in range(len(q))])
        got = rerank("aim", q, g, variant=variant, params={"k1": k1, "k2": k2}, dtype=np.float64)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_sgr_gallery_item_is_its_own_first_neighbour_even_when_too_short_to_normalise() -> None:
    """SIM Eq. 1–5 with the short gallery feature: its own path (q → g_j, edge 0) is always in its
    neighbourhood, whose other members are its k_graph − 1 most similar items (d = sqrt(2 − 2s))."""
    q, g, qn, gn = _with_a_short_gallery_feature(5)

    def dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum(2 - 2 * np.array([[u @ v for v in b] for u in a]), 0))

    d_qg, d_gg = dist(qn, gn), dist(gn, gn)
    np.fill_diagonal(d_gg, 0.0)
    lam, K, k_graph = 0.05, 3, 6
    want = np.empty_like(d_qg)
    for j in range(len(g)):
        hood = _nearest(d_gg[j], k_graph)
        for i in range(len(q)):
            want[i, j] = np.mean(sorted(d_qg[i, n] + lam * d_gg[j, n] for n in hood)[:K])
    got = sgr(q, g, lam=lam, K=K, k_graph=k_graph, variant="paper", dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_sgr_kernels_are_written_to_the_numba_folder_of_the_cache(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path) -> None:
    """The generated kernel source goes to ``$VIREID_CACHE/numba`` (docs: ``<cache>/numba``)."""
    import sys

    from vireid.retrieval import sim as sim_module
    monkeypatch.setenv("VIREID_CACHE", str(tmp_path))
    assert sim_module.kernel_cache_dir() == tmp_path / "numba"
    before = set(sys.modules)
    try:
        kernel = sim_module._load_kernel(3, 2)                          # the process cache left alone
    finally:
        for name in set(sys.modules) - before:
            if name.startswith("vireid_kernels."):
                del sys.modules[name]
    files = [p.name for p in tmp_path.rglob("*.py")]
    assert len(files) == 1 and (tmp_path / "numba" / files[0]).is_file() and files[0].startswith("sgr_k3_K2_")
    assert kernel.py_func.__code__.co_filename == str(tmp_path / "numba" / files[0])


_TIED_LATTICE = np.array(_LATTICE_GALLERY + [_LATTICE_GALLERY[3][:7] + [-_LATTICE_GALLERY[3][7]]]) / 32
"""The 16 lattice points and g₃ with its last coordinate negated: inner products are exact (n/1024), and
since g₀'s last coordinate is 0, row 0 of the Gram matrix holds 305/1024 twice, at its 5th and 6th
largest places; no other row has a tie at places 4/5, 5/6 or 6/7."""


@pytest.mark.parametrize("k1", [4, 5, 6])
def test_aim_affinity_rows_recompute_only_the_rows_tied_at_k1(monkeypatch: pytest.MonkeyPatch, k1: int) -> None:
    """SAAI Eq. 6 on the gallery: ``reference`` keeps every entry >= the row's k1-th largest, ``paper``
    exactly the k1 largest. Only a ``reference`` row whose (k1+1)-th similarity equals its k1-th is
    recomputed in full (one Gram row); the other rows come from the top-(k1+1) lists."""
    from vireid.retrieval import aim as aim_module
    gn = _TIED_LATTICE
    s = np.array([[sum(a * b for a, b in zip(u, v)) for v in gn] for u in gn])   # exact: n / 1024
    ranked = -np.sort(-s, axis=1)
    tied_rows = [r for r in range(len(gn)) if ranked[r, k1 - 1] == ranked[r, k1]]
    assert tied_rows == ([0] if k1 == 5 else [])
    recomputed: list[int] = []
    real = aim_module.topk_largest

    def spy(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        recomputed.append(block.shape[0])
        return real(block, k)

    monkeypatch.setattr(aim_module, "topk_largest", spy)
    for keep_ties in (True, False):
        recomputed.clear()
        rows, nearest = aim_module._affinity_rows(gn, k1, keep_ties=keep_ties, k2=2)
        assert recomputed == ([len(tied_rows)] if keep_ties and tied_rows else [])
        dense = rows.toarray()
        for r in range(len(gn)):
            kept = np.flatnonzero(dense[r])
            if keep_ties:
                assert kept.tolist() == np.flatnonzero(s[r] >= ranked[r, k1 - 1]).tolist()
            else:
                assert len(kept) == k1 and sorted(s[r, kept]) == sorted(ranked[r, :k1])
            np.testing.assert_array_equal(dense[r, kept], s[r, kept])
        np.testing.assert_array_equal(nearest[:, 0], np.arange(len(gn)))       # self: similarity 1, first
        np.testing.assert_array_equal(s[np.arange(len(gn)), nearest[:, 1]], ranked[:, 1])


def test_half_reciprocal_sets_keep_the_full_shape_when_the_last_items_have_none() -> None:
    """Two identical gallery items: self and duplicate both have similarity 1, and a self graph may list
    the duplicate first (top_k_neighbours does when k covers the row: ties in column order). With half = 0
    only item 0 is in its own first-neighbour list both ways; item 1 has an empty set and is in none, yet
    the pattern is G×G."""
    graph = NeighbourGraph(index=np.array([[0, 1], [0, 1]]), sim=np.ones((2, 2)))
    for half, want in [(0, [[1, 0], [0, 0]]), (1, [[1, 1], [1, 1]])]:
        loop = [[float(j in graph.index[g, :half + 1] and g in graph.index[j, :half + 1]) for j in range(2)]
                for g in range(2)]
        assert loop == want
        got = half_reciprocal_sets(graph, half)
        assert got.shape == (2, 2)
        np.testing.assert_array_equal(got.toarray(), want)


def test_local_expansion_keeps_float32_vectors_in_float32() -> None:
    """Zhong Eq. 11 on float32 vectors (the default dtype): the mean is float32 too (the row weights 1/k2
    in the vectors' dtype), within float32 rounding of the float64 loop."""
    rng = np.random.default_rng(3)
    dense = (rng.random((6, 9)) * (rng.random((6, 9)) < 0.5)).astype(np.float32)
    neighbours = np.array([[0, 2, 5], [1, 0, 3], [2, 4, 1], [3, 3, 0], [4, 5, 2], [5, 1, 4]])
    got = local_expansion(sp.csr_matrix(dense), neighbours)
    assert got.dtype == np.float32
    want = [[sum(float(dense[n, c]) for n in neighbours[i]) / 3 for c in range(9)] for i in range(6)]
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-6, atol=0)


class _RecordingSparse:
    """scipy.sparse that records (rows, joined pairs) of every block ``shared_mass`` builds."""

    def __init__(self, blocks: list[tuple[int, int]]) -> None:
        self.blocks = blocks

    def __getattr__(self, name: str):
        return getattr(sp, name)

    def coo_matrix(self, arg, shape=None, **kwargs):
        self.blocks.append((shape[0], len(arg[0])))
        return sp.coo_matrix(arg, shape=shape, **kwargs)


def test_shared_mass_blocks_are_greedy_within_the_join_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are joined in consecutive blocks grown while the block's joined pairs stay <= JOIN_ELEMENTS
    (inclusive); a row over the budget stands alone. Right column c has c + 1 entries, so left rows
    with supports {1}, {1}, {2}, {0}, {0, 3}, {}, {3} join 2, 2, 3, 1, 5, 0, 4 pairs; with a budget of 4
    the blocks are rows 0–1 (4 pairs), 2–3 (4), 4 (5), 5–6 (4)."""
    from vireid.retrieval import kreciprocal
    monkeypatch.setattr(kreciprocal, "JOIN_ELEMENTS", 4)
    blocks: list[tuple[int, int]] = []
    monkeypatch.setattr(kreciprocal, "sp", _RecordingSparse(blocks))
    right = np.array([[0.5 if r <= c else 0.0 for c in range(4)] for r in range(5)]) * np.arange(1, 6)[:, None] / 5
    supports = [{1}, {1}, {2}, {0}, {0, 3}, set(), {3}]
    left = np.array([[0.3 if c in support else 0.0 for c in range(4)] for support in supports])
    assert [sum(int((right[:, c] > 0).sum()) for c in support) for support in supports] == [2, 2, 3, 1, 5, 0, 4]
    got = kreciprocal.shared_mass(sp.csr_matrix(left), sp.csr_matrix(right).tocsc())
    assert blocks == [(2, 4), (2, 4), (1, 5), (2, 4)]
    want = [[sum(min(left[i, c], right[j, c]) for c in range(4)) for j in range(5)] for i in range(7)]
    np.testing.assert_allclose(got.toarray(), want, rtol=0, atol=1e-15)
