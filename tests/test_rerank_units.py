"""The re-rankers' building blocks against independent computations: dense formulas, loops over
items, hand-worked cases (exact.py, graph.py, kreciprocal.py, presets.py, api.py)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from vireid.errors import InputError
from vireid.retrieval import METHODS, exact, graph, kreciprocal, rerank, resolve_rerank
from vireid.retrieval.graph import NeighbourGraph

REPO = Path(__file__).resolve().parents[1]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rows(n: int, d: int, seed: int) -> np.ndarray:
    return _unit(np.random.default_rng(seed).standard_normal((n, d)))


def _nearest(row: np.ndarray, k: int) -> list[int]:
    return [int(j) for j in np.argsort(row, kind="stable")[:k]]


# ----------------------------------------------------------------------------------------- exact.py


def test_l2_normalize_rows_zero_rows_and_bad_input() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-14, 0.0]])
    got = exact.l2_normalize(x, np.dtype(np.float64), name="f")
    np.testing.assert_allclose(got, [[0.6, 0.8], [0.0, 0.0], [1e-2, 0.0]], rtol=1e-12)  # norm floored at 1e-12
    assert got.flags.c_contiguous and exact.l2_normalize(x[:, ::-1], np.dtype(np.float32), name="f").dtype == np.float32
    for bad, message in ((np.zeros(3), "must be a non-empty 2-D float array"), (np.zeros((0, 2)), "non-empty"),
                         (np.zeros((2, 0)), "non-empty"), (np.zeros((2, 2), int), "float array"),
                         (np.array([[np.inf, 1.0]]), "non-finite")):
        with pytest.raises(InputError, match=re.escape(message)):
            exact.l2_normalize(bad, np.dtype(np.float64), name="query features")
    with pytest.raises(InputError, match="query features must be"):
        exact.l2_normalize(np.zeros(3), np.dtype(np.float64), name="query features")


def test_resolve_dtype_and_variant() -> None:
    assert exact.resolve_dtype("float64") == np.float64 and exact.resolve_dtype(np.float32) == np.float32
    with pytest.raises(InputError, match="is not a NumPy dtype"):
        exact.resolve_dtype("banana")
    with pytest.raises(InputError, match=re.escape("dtype int64 is not supported (use float32 or float64)")):
        exact.resolve_dtype(np.int64)
    exact.check_variant("paper")
    with pytest.raises(InputError, match=re.escape("unknown variant 'ref' (choose from reference, paper)")):
        exact.check_variant("ref")


@pytest.mark.parametrize("num_rows, row_length, budget", [(10, 3, 7), (10, 3, 30), (5, 0, 4), (1, 100, 10), (0, 5, 8)])
def test_block_rows_cover_every_row_once_within_the_budget(monkeypatch: pytest.MonkeyPatch, num_rows: int,
                                                           row_length: int, budget: int) -> None:
    monkeypatch.setattr(exact, "BLOCK_ELEMENTS", budget)
    parts = list(exact.block_rows(num_rows, row_length))
    assert [i for part in parts for i in range(part.start, part.stop)] == list(range(num_rows))
    step = max(1, budget // max(row_length, 1))
    assert all(part.stop - part.start == min(step, num_rows - part.start) for part in parts)


def test_distances_from_similarities_clip_at_zero() -> None:
    s = np.array([1.0 + 1e-7, 1.0, 0.5, -1.0])
    np.testing.assert_allclose(exact.squared_distance_from_similarity(s.copy()), [0.0, 0.0, 1.0, 4.0])
    np.testing.assert_allclose(exact.euclidean_from_similarity(s.copy()), [0.0, 0.0, 1.0, 2.0])


def test_topk_largest_and_smallest_are_sorted() -> None:
    block = np.array([[0.3, 0.9, 0.1, 0.5], [2.0, -1.0, 0.0, 1.0]])
    values, index = exact.topk_largest(block, 2)
    np.testing.assert_array_equal(index, [[1, 3], [0, 3]])
    np.testing.assert_array_equal(values, [[0.9, 0.5], [2.0, 1.0]])
    values, index = exact.topk_smallest(block, 3)
    np.testing.assert_array_equal(index, [[2, 0, 3], [1, 2, 3]])
    np.testing.assert_array_equal(values, [[0.1, 0.3, 0.5], [-1.0, 0.0, 1.0]])
    assert index.dtype == np.int64


def test_top_k_neighbours_of_other_rows_and_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exact, "BLOCK_ELEMENTS", 50)
    rows, columns = _rows(13, 4, 1), _rows(17, 4, 2)
    full = rows @ columns.T
    got = exact.top_k_neighbours(rows, columns, 5, self_graph=False)
    want = np.argsort(-full, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(got.index, want)
    np.testing.assert_allclose(got.sim, np.take_along_axis(full, want, axis=1), atol=1e-15)
    np.testing.assert_allclose(got.min_sim, full.min(axis=1), atol=1e-15)
    for k in (0, 18):
        with pytest.raises(InputError, match=re.escape(f"k={k} must lie in [1, 17]")):
            exact.top_k_neighbours(rows, columns, k, self_graph=False)
    with pytest.raises(InputError, match=re.escape("k=14 must lie in [1, 13]")):
        exact.self_top_k_neighbours(rows, 14)
    exact.top_k_neighbours(rows, columns, 17, self_graph=False)                    # k = all columns is fine


def test_self_graph_offers_every_block_to_the_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exact, "BLOCK_ELEMENTS", 60)
    features = _rows(20, 3, 4)
    seen = np.zeros((20, 20), bool)

    def on_block(rows: slice, block: np.ndarray) -> None:
        np.testing.assert_allclose(block, features[rows] @ features[rows.start:].T, atol=1e-15)
        seen[rows, rows.start:] = True

    exact.self_top_k_neighbours(features, 3, on_block)
    assert np.triu(seen).sum() == np.triu(np.ones((20, 20))).sum()                 # the upper half, once


def test_pair_similarities_from_the_graph_or_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exact, "BLOCK_ELEMENTS", 9)                              # blocks of 2 pairs (d = 4)
    features = _rows(12, 4, 5)
    g = exact.self_top_k_neighbours(features, 3)
    rows = np.array([0, 3, 5, 11, 7, 2, 2])
    cols = np.array([g.index[0, 1], 9, g.index[5, 2], 0, 7, g.index[2, 0], 10])
    want = np.einsum("ij,ij->i", features[rows], features[cols])
    want[[4, 5]] = 1.0                                                            # listed self entries: sim 1
    np.testing.assert_allclose(exact.graph_pair_similarity(features, g, rows, cols), want, atol=1e-15)
    np.testing.assert_allclose(exact.pair_similarity(features, features[::-1], rows, cols),
                               np.einsum("ij,ij->i", features[rows], features[::-1][cols]), atol=1e-15)


# ----------------------------------------------------------------------------------------- graph.py


def test_neighbour_graph_distances_and_views() -> None:
    g = NeighbourGraph(index=np.array([[0, 2, 1], [1, 0, 2]]), sim=np.array([[1.0, 0.5, -1.0], [0.98, 0.0, 1.5]]),
                       min_sim=np.array([-1.0, 0.25]))
    assert (g.n, g.k) == (2, 3)
    np.testing.assert_allclose(g.distance(), [[0.0, 1.0, 2.0], [0.0, np.sqrt(2.0), 0.0]], atol=1e-7)
    assert g.distance(2).shape == (2, 2) and g.distance().dtype == np.float32
    np.testing.assert_allclose(g.max_squared_distance(), [4.0, 1.5])
    view = g.as_graph(2)
    assert view.k == 2 and view.min_sim is g.min_sim and g.as_graph().k == 3
    with pytest.raises(ValueError, match="without per-row minimum similarities"):
        NeighbourGraph(g.index, g.sim).max_squared_distance()


def _loop_reciprocal(order: np.ndarray, i: int, k: int) -> set[int]:
    return {int(j) for j in order[i, :k + 1] if i in order[j, :k + 1]}


def test_reciprocal_sets_reverse_neighbours_and_csr_rows_match_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph, "_ROW_CHUNK", 7)
    features = _rows(30, 3, 6)
    g = exact.self_top_k_neighbours(features, 12)
    order = g.index
    mask = graph.reciprocal_mask(g, 5)
    for i in range(30):
        assert {int(j) for j, m in zip(order[i, :6], mask[i]) if m} == _loop_reciprocal(order, i, 5)
    reverse = graph.reverse_neighbours(g, 4)
    for n in range(30):
        assert set(reverse[n].indices) == {j for j in range(30) if n in order[j, :4]}
    sets = graph.expanded_k_reciprocal_sets(g, 7)
    for i in range(30):
        base = _loop_reciprocal(order, i, 7)
        want = set(base)
        for c in base:
            half = _loop_reciprocal(order, c, 4)                                  # round(7 / 2) = 4
            if len(half & base) > 2 / 3 * len(half):
                want |= half
        assert set(sets[i].indices) == want and np.all(sets[i].data == 1)
    csr = graph.rows_to_csr(np.array([[2, 0], [1, 3]]), np.array([[5, 6], [7, 8]]), 4)
    np.testing.assert_array_equal(csr.toarray(), [[6, 0, 5, 0], [0, 7, 0, 8]])
    assert csr.has_sorted_indices and csr.dtype == np.float32
    with pytest.raises(InputError, match=re.escape("k-reciprocal sets with k=12 needs 13 neighbours per item but "
                                                   "the graph has k=12")):
        graph.reciprocal_mask(g, 12)
    with pytest.raises(InputError, match="reverse_neighbours needs 13"):
        graph.reverse_neighbours(g, 13)


def test_farthest_similarity_exact_and_sampled() -> None:
    features = _rows(40, 3, 7).astype(np.float32)
    np.testing.assert_allclose(graph.farthest_similarity(features), (features @ features.T).min(axis=1), atol=1e-6)
    sampled = graph.farthest_similarity(features, sample_size=10, seed=3)
    pick = np.sort(np.random.default_rng(3).choice(40, 10, replace=False))
    np.testing.assert_allclose(sampled, (features @ features[pick].T).min(axis=1), atol=1e-6)


# ------------------------------------------------------------------------------------ kreciprocal.py


def test_shared_mass_is_the_sum_of_minima_in_small_join_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    left = sp.random(9, 15, density=0.3, random_state=1, format="lil")
    left[4] = 0                                                                  # an empty row
    left = left.tocsr()
    left.eliminate_zeros()
    right = sp.random(11, 15, density=0.4, random_state=2, format="csr")
    dense_left, dense_right = left.toarray(), right.toarray()
    want = np.array([[np.minimum(a, b)[(a > 0) & (b > 0)].sum() for b in dense_right] for a in dense_left])
    for budget in (1, 5, 1 << 20):
        monkeypatch.setattr(kreciprocal, "JOIN_ELEMENTS", budget)
        got = kreciprocal.shared_mass(left, right.tocsc())
        assert got.dtype == np.float64 and got.shape == (9, 11)
        np.testing.assert_allclose(got.toarray(), want, atol=1e-15)
    empty = kreciprocal.shared_mass(sp.csr_matrix((0, 15)), right.tocsc())
    assert empty.shape == (0, 11)


def test_jaccard_and_blend_formulas() -> None:
    mass = np.array([[0.5, 0.0], [1.0, 0.25]])
    np.testing.assert_allclose(kreciprocal.jaccard_from_mass(mass.copy()), 1 - mass / (2 - mass))
    left, right = np.array([1.0, 2.0]), np.array([3.0, 0.5])
    np.testing.assert_allclose(kreciprocal.jaccard_from_mass(mass.copy(), left, right),
                               1 - mass / (left[:, None] + right[None, :] - mass))
    original = np.array([[0.2, 0.4, 0.6], [1.0, 1.2, 1.4]])
    overlap = sp.csr_matrix(np.array([[0.5, 0.0, 0.25], [0.0, 1.0, 0.0]]))
    jaccard = np.where(overlap.toarray() > 0, 1 - overlap.toarray() / (2 - overlap.toarray()), 1.0)
    np.testing.assert_allclose(kreciprocal.blend_jaccard(original.copy(), overlap, 0.3),
                               0.3 * original + 0.7 * jaccard)
    sizes_q, sizes_g = np.array([2.0, 3.0]), np.array([4.0, 1.0, 2.0])
    counted = np.where(overlap.toarray() > 0,
                       1 - overlap.toarray() / (sizes_q[:, None] + sizes_g[None, :] - overlap.toarray()), 1.0)
    np.testing.assert_allclose(kreciprocal.blend_jaccard(original.copy(), overlap, 0.6, sizes_q, sizes_g),
                               0.6 * original + 0.4 * counted)


def test_gaussian_vectors_local_expansion_and_csr_rows() -> None:
    pattern = sp.csr_matrix(np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=float))
    distance = np.array([0.0, 1.0, 0.5, 2.0, 0.0])
    np.testing.assert_array_equal(kreciprocal.csr_rows(pattern), [0, 0, 2, 2, 2])
    raw = kreciprocal.gaussian_vectors(pattern, distance, normalize=False).toarray()
    np.testing.assert_allclose(raw, [[1, 0, np.exp(-1)], [0, 0, 0], [np.exp(-0.5), np.exp(-2), 1]])
    normalised = kreciprocal.gaussian_vectors(pattern, distance, normalize=True).toarray()
    np.testing.assert_allclose(normalised, raw / np.maximum(raw.sum(axis=1, keepdims=True), 1e-300))
    vectors = sp.csr_matrix(np.array([[1.0, 0.0, 2.0], [0.0, 4.0, 0.0], [3.0, 3.0, 0.0]]))
    neighbours = np.array([[0, 2], [1, 0], [2, 1]])
    expanded = kreciprocal.local_expansion(vectors, neighbours)
    dense = vectors.toarray()
    np.testing.assert_allclose(expanded.toarray(), [dense[n].mean(axis=0) for n in neighbours])
    assert expanded.has_sorted_indices


def test_reciprocal_vectors_kernel_options() -> None:
    features = _rows(16, 3, 9)
    g = exact.self_top_k_neighbours(features, 9)
    d2 = np.maximum(2 - 2 * features @ features.T, 0)
    np.fill_diagonal(d2, 0)
    sets = graph.expanded_k_reciprocal_sets(g, 4).toarray() > 0
    scale = np.arange(1, 17, dtype=float)
    for squared, row_scale, normalize in ((True, scale, True), (False, None, False), (True, None, False)):
        got = kreciprocal.reciprocal_vectors(features, g, 4, row_scale=row_scale, squared=squared,
                                             normalize=normalize).toarray()
        d = d2 if squared else np.sqrt(d2)
        if row_scale is not None:
            d = d / row_scale[:, None]
        want = np.where(sets, np.exp(-d), 0.0)
        if normalize:
            want /= want.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(got, want, atol=1e-12)


def test_half_reciprocal_sets_and_pool_bounds() -> None:
    features = _rows(25, 3, 10)
    g = exact.self_top_k_neighbours(features, 8)
    sets = kreciprocal.half_reciprocal_sets(g, 3)
    for i in range(25):
        assert set(sets[i].indices) == _loop_reciprocal(g.index, i, 3)
    with pytest.raises(InputError, match=re.escape("k=26 must lie in [1, 25] (the query+gallery pool)")):
        kreciprocal.pool_neighbours(features, 5, 26, np.empty((5, 20)))


def test_krr_reference_loop_on_a_small_pool() -> None:
    """Zhong's ``re_ranking`` as coded (REFERENCES.md §4), loop by loop, k2 = 1 and k2 = 3."""
    q, g = _rows(6, 3, 11), _rows(14, 3, 12)
    pool = np.concatenate([q, g])
    d2 = np.maximum(2 - 2 * pool @ pool.T, 0)
    np.fill_diagonal(d2, 0)
    norm = d2 / d2.max(axis=1, keepdims=True)
    order = np.argsort(norm, axis=1, kind="stable")
    order = np.array([[i] + [j for j in row if j != i] for i, row in enumerate(order)])
    k1 = 4
    vectors = np.zeros_like(norm)
    for i in range(len(pool)):
        base = _loop_reciprocal(order, i, k1)
        members = set(base)
        for c in base:
            half = _loop_reciprocal(order, c, 2)
            if len(half & base) > 2 / 3 * len(half):
                members |= half
        idx = sorted(members)
        vectors[i, idx] = np.exp(-norm[i, idx]) / np.exp(-norm[i, idx]).sum()
    for k2 in (1, 3):
        v = vectors if k2 == 1 else np.array([vectors[order[i, :k2]].mean(axis=0) for i in range(len(pool))])
        m = np.array([[np.minimum(v[i], v[j]).sum() for j in range(6, 20)] for i in range(6)])
        want = 0.7 * (1 - m / (2 - m)) + 0.3 * norm[:6, 6:]
        got = rerank("krr", q, g, variant="reference", params={"k1": k1, "k2": k2, "lam": 0.3}, dtype=np.float64)
        np.testing.assert_allclose(got, want, atol=1e-12)


# --------------------------------------------------------------------------------- presets.py, api.py


def test_documented_grids_are_the_searched_grids() -> None:
    """The table in docs/reranking.md states each method's tuning grid; it must be the code's."""
    text = (REPO / "docs" / "reranking.md").read_text()
    section = text[text.index("## Parameters chosen on the validation identities"):]
    for method, spec in METHODS.items():
        if not spec.grid:
            continue
        line = next(row for row in section.splitlines() if row.startswith(f"| `{method}` |"))
        stated = {m.group(1): tuple(float(v) for v in m.group(2).split(", "))
                  for m in re.finditer(r"(\w+) ((?:[\d.]+, )*[\d.]+)", line.split("|")[2])}
        assert stated == {name: tuple(float(v) for v in values) for name, values in spec.grid.items()}, method


def test_presets_and_defaults_are_the_sources_values() -> None:
    assert METHODS["sim"].defaults() == {"lam": 0.01, "K": 9, "k_graph": 20, "kq": 12, "kg": 20, "alpha": 0.3}
    assert METHODS["aim"].defaults() == {"k1": 30, "k2": 6} and METHODS["krr"].defaults() == {"k1": 20, "k2": 6, "lam": 0.3}
    for preset in ("sysu", "sysu-multishot", "sysu-indoor"):
        assert resolve_rerank("sim", preset=preset).params == METHODS["sim"].defaults()   # SIM Sec. 4.4
        assert resolve_rerank("krr", preset=preset).params == {"k1": 20, "k2": 6, "lam": 0.3}
    assert resolve_rerank("sgr", preset="regdb").params == {"lam": 0.1, "K": 5, "k_graph": 20}
    assert resolve_rerank("mnnr", preset="regdb").params == {"kq": 9, "kg": 20, "alpha": 0.7}
    assert resolve_rerank("aim", preset="sysu").params == {"k1": 4, "k2": 1}
    assert resolve_rerank("aim", preset="regdb").params == {"k1": 8, "k2": 2}
    assert resolve_rerank("plain", preset="regdb").params == {}
    assert METHODS["aim"].param("k1").kind is int and METHODS["sim"].param("alpha").maximum == 1.0
    with pytest.raises(KeyError):
        METHODS["aim"].param("lam")


@pytest.mark.parametrize("method, params, num_gallery, message", [
    ("sim", {"kq": 10, "k_graph": 10, "K": 3}, 10, "parameter kq+1=11 of method sim is larger than the gallery size (10)"),
    ("sim", {"kq": 9, "kg": 9, "k_graph": 10, "K": 5}, 10, None),
    ("mnnr", {"kg": 10, "kq": 3}, 10, "parameter kg+1=11 of method mnnr is larger than the gallery size (10)"),
    ("sgr", {"k_graph": 11, "K": 3}, 10, "parameter k_graph=11 of method sgr is larger than the gallery size (10)"),
    ("sgr", {"k_graph": 10, "K": 10}, 10, None),
    ("aim", {"k1": 10, "k2": 10}, 10, None),
    ("aim", {"k1": 11, "k2": 1}, 10, "parameter k1=11 of method aim is larger than the gallery size (10)"),
    ("krr", {"k1": 9, "k2": 10}, 10, None),
    ("krr", {"k1": 10}, 10, "parameter k1+1=11 of method krr is larger than the gallery size (10)"),
    ("krr", {"k1": 3, "k2": 5}, None, "parameter k2=5 of method krr is larger than k1+1 (4)"),
    ("aim", {"k1": 3, "k2": 4}, None, "parameter k2=4 of method aim is larger than k1 (3)"),
    ("sim", {"K": 21}, None, "parameter K=21 of method sim is larger than k_graph (20)"),
    ("aim", {"k1": 0}, None, "parameter k1=0 of method aim must be >= 1"),
    ("sgr", {"lam": -0.5}, None, "parameter lam=-0.5 of method sgr must be >= 0.0"),
    ("krr", {"lam": 1.5}, None, "parameter lam=1.5 of method krr must be >= 0.0, <= 1.0"),
    ("aim", {"k1": True}, None, "parameter k1 of method aim must be a number, got True"),
    ("aim", {"k1": None}, None, "parameter k1 of method aim must be a number, got None"),
    ("sim", {"alpha": "inf"}, None, "parameter alpha of method sim must be finite, got 'inf'"),
    ("aim", {"k1": "4.0", "k2": 2}, None, None),
    ("aim", {"k1": 4.5}, None, "parameter k1 of method aim must be an integer, got 4.5"),
    ("sim", {"lamb": 0.1}, None, "unknown parameter 'lamb' for method sim (did you mean 'lam'?) (valid: lam, K, "
                                 "k_graph, kq, kg, alpha)"),
    ("plain", {"k": 1}, None, "unknown parameter 'k' for method plain (valid: none)"),
])
def test_parameter_checks(method: str, params: dict, num_gallery: int | None, message: str | None) -> None:
    if message is None:
        settings = resolve_rerank(method, params=params, num_gallery=num_gallery)
        assert all(settings.params[k] == float(v) for k, v in params.items())
        assert all(type(settings.params[s.name]) is s.kind for s in METHODS[method].params)
        return
    with pytest.raises(InputError, match=re.escape(message)):
        resolve_rerank(method, params=params, num_gallery=num_gallery)


def test_unknown_names_suggest_the_closest() -> None:
    with pytest.raises(InputError, match=re.escape("unknown preset 'sysu-multi' (did you mean 'sysu-multishot'?) "
                                                   "(choose from sysu, sysu-multishot, sysu-indoor, regdb)")):
        resolve_rerank("aim", preset="sysu-multi")
    with pytest.raises(InputError, match=re.escape("unknown variant 'pape' for method aim (choose from reference, "
                                                   "paper)")):
        resolve_rerank("aim", variant="pape")
    with pytest.raises(InputError, match=re.escape("unknown re-ranking method 'zzz' (choose from plain, aim")):
        resolve_rerank("zzz")


def test_settings_record_everything_and_plain_is_the_negative_cosine() -> None:
    settings = resolve_rerank("krr", preset="regdb", params={"k2": "3"}, dtype="float64", variant="paper")
    assert settings.to_dict() == {"method": "krr", "variant": "paper", "preset": "regdb",
                                  "params": {"k1": 20, "k2": 3, "lam": 0.3}, "dtype": "float64"}
    assert resolve_rerank("sim").variant == "paper" and resolve_rerank("aim").variant == "reference"
    q, g = _rows(5, 3, 13) * 3, _rows(7, 3, 14) * 0.5
    got = rerank("plain", q, g, dtype=np.float64)
    np.testing.assert_allclose(got, -(_unit(q) @ _unit(g).T), atol=1e-15)
    assert rerank("plain", q, g).dtype == np.float32
    with pytest.raises(InputError, match=re.escape("got shapes (5, 3) and (7,)")):
        rerank("aim", q, g[:, 0])
    with pytest.raises(InputError, match="one feature dimension"):
        rerank("aim", q[:, 0], g)
