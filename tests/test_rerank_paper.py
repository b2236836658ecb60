"""Paper variants: loop-by-loop implementations of the equations, gallery-permutation
equivariance, and the limits the papers state."""

from __future__ import annotations

import re

import numpy as np
import pytest

from vireid.errors import InputError
from vireid.retrieval import METHODS, rerank, resolve_rerank
from vireid.retrieval.synthetic import synthetic_features


@pytest.fixture(scope="module")
def small() -> tuple[np.ndarray, np.ndarray]:
    fs = synthetic_features(24, 40, 16, num_ids=8, seed=3)
    return fs.query_feat.astype(np.float64), fs.gallery_feat.astype(np.float64)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _euclid(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([[np.linalg.norm(u - v) for v in b] for u in a])


def _nearest(row: np.ndarray, k: int) -> list[int]:
    return [int(j) for j in np.argsort(row, kind="stable")[:k]]


def loop_sgr(q: np.ndarray, g: np.ndarray, lam: float, K: int, k_graph: int) -> np.ndarray:
    """SIM Eq. 1–5: every path q → g_n → g_j over the k_graph nearest n of g_j, mean of the K shortest."""
    d_qg, d_gg = _euclid(_unit(q), _unit(g)), _euclid(_unit(g), _unit(g))
    out = np.empty_like(d_qg)
    for j in range(len(g)):
        hood = _nearest(d_gg[j], k_graph)
        for i in range(len(q)):
            paths = sorted(d_qg[i, n] + lam * d_gg[j, n] for n in hood)
            out[i, j] = sum(paths[:K]) / K
    return out


def _reciprocal(d: np.ndarray, i: int, k: int) -> set[int]:
    return {j for j in _nearest(d[i], k + 1) if i in _nearest(d[j], k + 1)}


def _expanded(d: np.ndarray, i: int, k: int) -> set[int]:
    base = _reciprocal(d, i, k)
    out = set(base)
    for c in base:
        half = _reciprocal(d, c, int(np.around(k / 2)))
        if len(half & base) > 2 / 3 * len(half):
            out |= half
    return out


def _jaccard(a: dict[int, float], b: dict[int, float]) -> float:
    keys = set(a) | set(b)
    low = sum(min(a.get(k, 0.0), b.get(k, 0.0)) for k in keys)
    high = sum(max(a.get(k, 0.0), b.get(k, 0.0)) for k in keys)
    return 1 - low / high


def loop_mnnr(d_qg: np.ndarray, g: np.ndarray, kq: int, kg: int, alpha: float) -> np.ndarray:
    """SIM Eq. 6–8: α·d + (1 − α)·(1 − |N ∩ R*| / |N ∪ R*|) with N the query's kq nearest gallery items
    (by the input distance d) and R* the gallery item's expanded kg-reciprocal set; |·| counts items."""
    d_gg = _euclid(_unit(g), _unit(g))
    gallery = [_expanded(d_gg, j, kg) for j in range(len(g))]
    out = np.empty_like(d_qg)
    for i in range(len(d_qg)):
        query = set(_nearest(d_qg[i], kq))
        for j in range(len(g)):
            out[i, j] = alpha * d_qg[i, j] + (1 - alpha) * (1 - len(query & gallery[j]) / len(query | gallery[j]))
    return out


def loop_aim(q: np.ndarray, g: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """SAAI Eq. 6–10: exactly k1 affinities per row, gallery rows averaged over their top-k2, cosine added."""
    qn, gn = _unit(q), _unit(g)

    def sparse_row(s: np.ndarray) -> np.ndarray:
        row = np.zeros_like(s)
        keep = _nearest(-s, k1)
        row[keep] = s[keep]
        return row

    s_qg, s_gg = qn @ gn.T, gn @ gn.T
    q_aff = np.array([sparse_row(s) for s in s_qg])
    g_rows = np.array([sparse_row(s) for s in s_gg])
    g_aff = np.array([g_rows[_nearest(-s_gg[j], k2)].mean(axis=0) for j in range(len(g))])
    q_aff, g_aff = _unit(q_aff), _unit(g_aff)
    return np.array([[-(q_aff[i] @ g_aff[j]) - s_qg[i, j] for j in range(len(g))] for i in range(len(q))])


def loop_krr(q: np.ndarray, g: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong Eq. 3–12 with the pool G ∪ {p} for each probe p (gallery sets taken within G)."""
    d_qg, d_gg = _euclid(_unit(q), _unit(g)), _euclid(_unit(g), _unit(g))
    half = int(np.around(k1 / 2))
    radius = np.sort(d_gg, axis=1)                      # radius[g, k]: g's k-th nearest other item
    base = [{m: np.exp(-d_gg[j, m]) for m in _expanded(d_gg, j, k1)} for j in range(len(g))]

    def mean(vectors: list[dict[int, float]]) -> dict[int, float]:
        keys = set().union(*vectors)
        return {m: sum(v.get(m, 0.0) for v in vectors) / len(vectors) for m in keys}

    gallery = [mean([base[n] for n in _nearest(d_gg[j], k2)]) for j in range(len(g))]
    out = np.empty_like(d_qg)
    for i in range(len(q)):
        near = _nearest(d_qg[i], k1)
        reciprocal = {n for n in near if d_qg[i, n] < radius[n, k1]}
        grown = set(reciprocal)
        for c in reciprocal:
            hood = _reciprocal(d_gg, c, half)
            probe_inside = c in near[:half] and d_qg[i, c] < radius[c, half]
            overlap = len(hood & reciprocal) + probe_inside
            if overlap >= 2 / 3 * (len(hood) + probe_inside):
                grown |= hood
        probe = {m: np.exp(-d_qg[i, m]) for m in grown}
        probe = mean([probe] + [base[n] for n in near[:k2 - 1]])
        for j in range(len(g)):
            out[i, j] = (1 - lam) * _jaccard(probe, gallery[j]) + lam * d_qg[i, j]
    return out


def test_krr_paper_matches_loop(small: tuple[np.ndarray, np.ndarray]) -> None:
    q, g = small
    got = rerank("krr", q, g, variant="paper", params={"k1": 6, "k2": 3, "lam": 0.3}, dtype=np.float64)
    np.testing.assert_allclose(got, loop_krr(q, g, 6, 3, 0.3), rtol=0, atol=1e-12)


def test_sgr_paper_matches_loop(small: tuple[np.ndarray, np.ndarray]) -> None:
    q, g = small
    got = rerank("sgr", q, g, variant="paper", params={"lam": 0.3, "K": 4, "k_graph": 7}, dtype=np.float64)
    np.testing.assert_allclose(got, loop_sgr(q, g, 0.3, 4, 7), rtol=0, atol=1e-12)


def test_mnnr_paper_matches_loop(small: tuple[np.ndarray, np.ndarray]) -> None:
    q, g = small
    got = rerank("mnnr", q, g, variant="paper", params={"kq": 5, "kg": 6, "alpha": 0.4}, dtype=np.float64)
    want = loop_mnnr(_euclid(_unit(q), _unit(g)), g, 5, 6, 0.4)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_sim_paper_is_mnnr_on_the_sgr_distance(small: tuple[np.ndarray, np.ndarray]) -> None:
    q, g = small
    params = {"lam": 0.2, "K": 3, "k_graph": 6, "kq": 4, "kg": 5, "alpha": 0.5}
    got = rerank("sim", q, g, variant="paper", params=params, dtype=np.float64)
    want = loop_mnnr(loop_sgr(q, g, 0.2, 3, 6), g, 4, 5, 0.5)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_aim_paper_matches_loop(small: tuple[np.ndarray, np.ndarray]) -> None:
    q, g = small
    got = rerank("aim", q, g, variant="paper", params={"k1": 6, "k2": 3}, dtype=np.float64)
    np.testing.assert_allclose(got, loop_aim(q, g, 6, 3), rtol=0, atol=1e-12)


def test_aim_reference_keeps_ties_paper_does_not() -> None:
    gallery = np.array([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    query = np.array([[0.8, 0.6]])
    # query similarities: 0.8, 0.8, 0.96, 0.6 -> the 2nd largest (0.8) is tied
    ref = rerank("aim", query, gallery, variant="reference", params={"k1": 2, "k2": 1}, dtype=np.float64)
    paper = rerank("aim", query, gallery, variant="paper", params={"k1": 2, "k2": 1}, dtype=np.float64)
    np.testing.assert_allclose(paper, loop_aim(query, gallery, 2, 1), atol=1e-12)
    assert not np.allclose(ref, paper)


@pytest.mark.parametrize("method", ["aim", "sgr", "mnnr", "sim", "krr"])
def test_paper_variants_are_gallery_permutation_equivariant(small: tuple[np.ndarray, np.ndarray],
                                                           method: str) -> None:
    q, g = small
    perm = np.random.default_rng(7).permutation(len(g))
    params = {"aim": {"k1": 6, "k2": 3}, "sgr": {"k_graph": 8, "K": 4}, "mnnr": {"kq": 5, "kg": 6},
              "sim": {"k_graph": 8, "K": 4, "kq": 5, "kg": 6}, "krr": {"k1": 6, "k2": 3}}[method]
    base = rerank(method, q, g, variant="paper", params=params, dtype=np.float64)
    permuted = rerank(method, q, g[perm], variant="paper", params=params, dtype=np.float64)
    np.testing.assert_allclose(permuted, base[:, perm], rtol=0, atol=1e-12)


def test_sgr_reference_depends_on_gallery_order(sysu_golden: dict[str, np.ndarray]) -> None:
    """The in-place sequential update (REFERENCES.md §3) is not permutation-equivariant."""
    q, g = sysu_golden["query_feat"], sysu_golden["gallery_feat"]
    perm = np.random.default_rng(0).permutation(len(g))
    base = rerank("sgr", q, g, variant="reference", preset="sysu", dtype=np.float64)
    permuted = rerank("sgr", q, g[perm], variant="reference", preset="sysu", dtype=np.float64)
    assert np.abs(permuted - base[:, perm]).max() > 1e-3


def test_sim_with_alpha_one_is_sgr_alone(small: tuple[np.ndarray, np.ndarray]) -> None:
    q, g = small
    sgr_params = {"lam": 0.05, "K": 3, "k_graph": 6}
    sim = rerank("sim", q, g, params={**sgr_params, "alpha": 1.0, "kq": 4, "kg": 5}, dtype=np.float64)
    np.testing.assert_allclose(sim, rerank("sgr", q, g, params=sgr_params, dtype=np.float64), atol=1e-15)


def test_mnnr_with_alpha_one_is_the_euclidean_distance(small: tuple[np.ndarray, np.ndarray]) -> None:
    q, g = small
    got = rerank("mnnr", q, g, params={"alpha": 1.0, "kq": 4, "kg": 5}, dtype=np.float64)
    np.testing.assert_allclose(got, _euclid(_unit(q), _unit(g)), atol=1e-12)


def test_sgr_with_one_path_and_heavy_edges_is_the_input_distance(small: tuple[np.ndarray, np.ndarray]) -> None:
    """K = 1 with large λ: the shortest path is the direct edge (through n = j, length 0)."""
    q, g = small
    got = rerank("sgr", q, g, params={"lam": 1e6, "K": 1, "k_graph": 5}, dtype=np.float64)
    np.testing.assert_allclose(got, _euclid(_unit(q), _unit(g)), atol=1e-12)


def test_krr_paper_with_lambda_one_is_the_euclidean_distance(small: tuple[np.ndarray, np.ndarray]) -> None:
    q, g = small
    got = rerank("krr", q, g, variant="paper", params={"lam": 1.0, "k1": 6, "k2": 3}, dtype=np.float64)
    np.testing.assert_allclose(got, _euclid(_unit(q), _unit(g)), atol=1e-12)


def test_aim_with_k2_one_and_full_k1_is_two_cosines(small: tuple[np.ndarray, np.ndarray]) -> None:
    """k1 = G keeps every affinity and k2 = 1 averages nothing: Q'·G'ᵀ is the cosine of Gram rows."""
    q, g = small
    got = rerank("aim", q, g, params={"k1": len(g), "k2": 1}, dtype=np.float64)
    s_qg, s_gg = _unit(q) @ _unit(g).T, _unit(g) @ _unit(g).T
    np.testing.assert_allclose(got, -(_unit(s_qg) @ _unit(s_gg).T) - s_qg, atol=1e-12)


def test_plain_is_negative_cosine(small: tuple[np.ndarray, np.ndarray]) -> None:
    q, g = small
    np.testing.assert_allclose(rerank("plain", q, g, dtype=np.float64), -(_unit(q) @ _unit(g).T), atol=1e-15)


def test_default_variants_and_presets() -> None:
    assert {name: spec.default_variant for name, spec in METHODS.items()} == {
        "plain": "reference", "aim": "reference", "sgr": "paper", "mnnr": "paper", "sim": "paper",
        "krr": "reference"}
    assert resolve_rerank("aim", preset="sysu-multishot").params == {"k1": 20, "k2": 6}
    assert resolve_rerank("aim", preset="sysu-indoor").params == {"k1": 2, "k2": 2}
    assert resolve_rerank("sim", preset="regdb").params == {
        "lam": 0.1, "K": 5, "k_graph": 20, "kq": 9, "kg": 20, "alpha": 0.7}
    overridden = resolve_rerank("sim", preset="sysu", params={"kq": "7", "alpha": "0.5"})
    assert overridden.params["kq"] == 7 and overridden.params["alpha"] == 0.5 and overridden.params["K"] == 9


@pytest.mark.parametrize(("method", "params", "message"), [
    ("aim", {"k9": 1}, "unknown parameter 'k9'"),
    ("aim", {"k1": "many"}, "must be a number"),
    ("aim", {"k1": "2.5"}, "must be an integer"),
    ("aim", {"k1": 41}, "larger than the gallery size (40)"),
    ("aim", {"k1": 3, "k2": 4}, "larger than k1"),
    ("sgr", {"K": 21}, "larger than k_graph"),
    ("mnnr", {"alpha": 1.5}, "must be >= 0.0, <= 1.0"),
    ("mnnr", {"kg": 40}, "larger than the gallery size"),
    ("krr", {"k2": 30}, "larger than k1+1"),
    ("sim", {"lam": "nan"}, "must be finite"),
])
def test_bad_parameters_raise_one_clear_error(small: tuple[np.ndarray, np.ndarray], method: str, params: dict,
                                              message: str) -> None:
    q, g = small
    with pytest.raises(InputError, match=re.escape(message)) as info:
        rerank(method, q, g, params=params)
    assert "\n" not in str(info.value)


def test_unknown_method_variant_preset_and_dtype(small: tuple[np.ndarray, np.ndarray]) -> None:
    q, g = small
    with pytest.raises(InputError, match="did you mean 'sim'"):
        rerank("smi", q, g)
    with pytest.raises(InputError, match="unknown variant"):
        rerank("sgr", q, g, variant="papers")
    with pytest.raises(InputError, match="unknown preset"):
        rerank("sgr", q, g, preset="market")
    with pytest.raises(InputError, match="not supported"):
        rerank("plain", q, g, dtype=np.float16)
    with pytest.raises(InputError, match="one feature dimension"):
        rerank("aim", q, g[:, :8])
    with pytest.raises(InputError, match="non-finite"):
        rerank("sgr", np.full_like(q, np.nan), g)


def test_synthetic_features_are_seeded_and_identity_clustered() -> None:
    a = synthetic_features(20, 30, 64, num_ids=5, seed=11, intrinsic_dim=8)
    b = synthetic_features(20, 30, 64, num_ids=5, seed=11, intrinsic_dim=8)
    np.testing.assert_array_equal(a.query_feat, b.query_feat)
    assert set(a.query_id) <= set(a.gallery_id) and a.gallery_feat.dtype == np.float32
    centred = a.gallery_feat - a.gallery_feat.mean(axis=0)
    singular = np.linalg.svd(centred, compute_uv=False)
    assert singular[8] < 0.2 * singular[0]                    # low intrinsic dimension
    same = a.gallery_id[:, None] == a.gallery_id[None, :]
    dist = -(_unit(a.gallery_feat) @ _unit(a.gallery_feat).T)
    assert dist[same].mean() < dist[~same].mean()
    with pytest.raises(InputError, match="intrinsic_dim"):
        synthetic_features(5, 5, 4, num_ids=2, intrinsic_dim=9)


def test_synthetic_features_follow_the_documented_scales() -> None:
    """s = (d/256)^(1/4) = 1/2 at d = 16: the gallery's spread around each identity mean is
    noise·s, and the infrared shift of each identity (query mean − gallery mean, the global
    offset removed) spreads by gap_identity·s."""
    fs = synthetic_features(400, 400, 16, num_ids=20, seed=5, noise=1.5, gap_global=0.0, gap_identity=4.0)
    ids = np.arange(20)
    gallery_mean = np.stack([fs.gallery_feat[fs.gallery_id == k].mean(axis=0) for k in ids])
    within = fs.gallery_feat - gallery_mean[fs.gallery_id]
    assert 0.7 < np.sqrt((within ** 2).sum() / (len(within) - 20) / 16) < 0.8      # noise·s = 0.75
    assert all((fs.query_id == k).sum() >= 8 for k in ids)
    shift = np.stack([fs.query_feat[fs.query_id == k].mean(axis=0) for k in ids]) - gallery_mean
    assert 1.7 < (shift - shift.mean(axis=0)).std(ddof=1) < 2.4                   # gap_identity·s = 2
    assert fs.meta == {"generator": "vireid.retrieval.synthetic.synthetic_features", "seed": 5, "dim": 16,
                       "num_ids": 20, "noise": 1.5, "gap_global": 0.0, "gap_identity": 4.0, "intrinsic_dim": None,
                       "ambient_noise": 0.1}


def test_synthetic_features_sizes() -> None:
    one_each = synthetic_features(3, 5, 8, num_ids=5, seed=0)  # as many identities as gallery images
    np.testing.assert_array_equal(one_each.gallery_id, np.arange(5))
    assert one_each.gallery_feat.shape == (5, 8) and one_each.query_feat.shape == (3, 8)
    with pytest.raises(InputError, match="sizes must be positive: queries=3, gallery=5, dim=0, ids=2"):
        synthetic_features(3, 5, 0, num_ids=2)
    with pytest.raises(InputError, match="num_ids=6 is larger than the gallery"):
        synthetic_features(3, 5, 8, num_ids=6)
