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
from vireid.retrieval.kreciprocal import krr, local_expansion, pool_neighbours
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
