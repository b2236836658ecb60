"""Enrolment internals of retrieval/gallery_state.py checked against independent computations:
the extended neighbour lists (both the per-hit merge and the dense block-by-block merge) against a
from-scratch exact top-k, the "first changed position" against a loop, the delta's rows against the
rows that really differ between two full builds, and the layout helpers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from vireid.errors import InputError
from vireid.retrieval import gallery_state
from vireid.retrieval.gallery_state import GalleryState, GraphStore, SingleQueryParams, _GraphBase, _extended_lists
from vireid.retrieval.single import l2_normalize_rows


def _quarter_features(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    """Unit rows with four entries ±1/2: every inner product is an exact multiple of 1/4, so
    similarities tie often and float32 computes them exactly."""
    rng = np.random.default_rng(seed)
    feats = np.zeros((n, d), np.float32)
    for i in range(n):
        cols = rng.choice(d, 4, replace=False)
        feats[i, cols] = rng.choice([-0.5, 0.5], 4)
    return feats


def _reference_lists(feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per item, by a plain sort: itself first, then the others by descending similarity, ties
    by ascending index (so earlier -- old -- items first)."""
    f = feats.astype(np.float64)
    n = len(f)
    index = np.empty((n, k), np.int64)
    sim = np.empty((n, k), np.float64)
    for i in range(n):
        s = [float(f[i] @ f[j]) for j in range(n)]
        order = sorted(range(n), key=lambda j: (j != i, -s[j], j))[:k]
        index[i] = order
        sim[i] = [1.0 if j == i else s[j] for j in order]
    return index, sim


def _check_extension(feats: np.ndarray, n_old: int, n_new: int, k: int) -> None:
    n = n_old + n_new
    old_index, old_sim = _reference_lists(feats[:n_old], k)
    want_index, want_sim = _reference_lists(feats[:n], k)
    graph = GraphStore(_GraphBase(old_index, old_sim.astype(np.float32)), n_old)
    ids, index, sim, first = _extended_lists(graph, feats[:n], n_old, n_new)
    assert sim.dtype == np.float32 and index.dtype == np.int64
    got = {int(i): (index[r], sim[r], int(first[r])) for r, i in enumerate(ids)}
    assert len(got) == len(ids)
    changed_old = [i for i in range(n_old) if not np.array_equal(old_index[i], want_index[i])]
    assert sorted(got) == changed_old + list(range(n_old, n))
    for i in changed_old:  # the whole list, order included (old entries first among ties)
        row_index, row_sim, row_first = got[i]
        np.testing.assert_array_equal(row_index, want_index[i], err_msg=f"row {i}")
        np.testing.assert_array_equal(row_sim, want_sim[i].astype(np.float32), err_msg=f"row {i}")
        position = next(p for p in range(k) if old_index[i, p] != want_index[i, p])
        assert row_first == position, f"row {i}"
    f = feats[:n].astype(np.float64)
    for i in range(n_old, n):  # new rows: self first, then k-1 of the most similar (ties in any order)
        row_index, row_sim, row_first = got[i]
        assert row_first == 0 and row_index[0] == i and row_sim[0] == 1.0
        assert len(set(row_index.tolist())) == k
        np.testing.assert_array_equal(row_sim[1:], (f[row_index[1:]] @ f[i]).astype(np.float32))
        np.testing.assert_array_equal(row_sim, want_sim[i].astype(np.float32))


@pytest.mark.parametrize("budget, n_new", [(None, 5), (400, 8), (400, 21), (50, 3)])
def test_extended_lists_equal_a_from_scratch_top_k(monkeypatch: pytest.MonkeyPatch, budget: int | None,
                                                   n_new: int) -> None:
    """Few new items (the per-hit merge) and more new items than one score block holds (dense
    working copies merged block by block: budget 400 over 50-odd items gives blocks of 7 or 8,
    budget 50 blocks of one), with many exact ties."""
    if budget is not None:
        monkeypatch.setattr(gallery_state, "_SCORE_BUDGET", budget)
    feats = _quarter_features(80, seed=n_new)
    _check_extension(feats, 45, n_new, 12)


def test_extended_lists_dense_branch_many_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    """Long candidate rows (12 listed + 16 new per block) full of ties: only a stable merge keeps
    the old entries first."""
    monkeypatch.setattr(gallery_state, "_SCORE_BUDGET", 16 * 120)
    feats = _quarter_features(120, d=6, seed=3)
    _check_extension(feats, 80, 40, 12)


@pytest.fixture(scope="module")
def grown() -> tuple[GalleryState, GalleryState, GalleryState, object, np.ndarray]:
    feats = l2_normalize_rows(np.random.default_rng(5).standard_normal((306, 12))).astype(np.float32)
    params = SingleQueryParams.resolve()
    old = GalleryState.build(feats[:300], params, knn="exact")
    new, delta = old.extend(feats, 6)
    full = GalleryState.build(feats, params, knn="exact")
    return old, new, full, delta, feats


def _differing_rows(before, after, n_old: int) -> list[int]:
    """Rows whose column pattern differs (every row past n_old counts as new)."""
    out = []
    for i in range(after.shape[0]):
        if i >= n_old or set(before[i].indices.tolist()) != set(after[i].indices.tolist()):
            out.append(i)
    return out


def test_a_delta_lists_exactly_the_rows_that_changed(grown) -> None:
    """The half- and k-reciprocal rows of the delta are exactly those that differ between a full
    build before and after (not every candidate looked at)."""
    old, new, full, delta, _ = grown
    assert delta is not None
    for key in ("half10", "recip20"):
        expected = _differing_rows(old.stores[key].dense_csr(), full.stores[key].dense_csr(), 300)
        assert sorted(delta.rows[key][0].tolist()) == expected, key
        assert len(expected) < 306  # a real subset
    old_index, _ = old.graph.dense()
    full_index, _ = full.graph.dense()
    changed = [i for i in range(306) if i >= 300 or not np.array_equal(old_index[i], full_index[i])]
    assert sorted(delta.graph_ids.tolist()) == changed
    assert delta.arrays()["graph_sim"].dtype == np.float32


def test_overlay_fraction_counts_overlaid_rows_over_base_rows(grown) -> None:
    old, new, _, delta, _ = grown
    assert old.overlay_fraction() == 0.0
    structures = len(old._keys())  # aim, half10, recip20, krr_expanded
    assert structures == 4
    assert new.overlay_fraction() == pytest.approx(delta.changed_rows() / (300 * (1 + structures)))
    assert 0 < new.overlay_fraction() < 1
    assert new.compacted().overlay_fraction() == 0.0


def test_only_a_compacted_state_gives_base_arrays(grown) -> None:
    _, new, _, _, _ = grown
    with pytest.raises(ValueError, match="only a compacted state is stored as a base"):
        new.base_arrays()


def test_warm_up_builds_the_lazy_lookups(grown) -> None:
    _, _, full, _, _ = grown
    state = GalleryState.from_base_arrays(full.base_arrays(), full.params)
    assert state.graph.base._reverse is None
    state.warm_up()
    indptr, source, column = state.graph.base._reverse
    index = state.graph.base.index
    for j in (0, 17, 305):  # the reverse index, by a loop
        expected = sorted((r, c) for r in range(index.shape[0]) for c in range(index.shape[1]) if index[r, c] == j)
        assert sorted(zip(source[indptr[j]:indptr[j + 1]].tolist(), column[indptr[j]:indptr[j + 1]].tolist())) == expected
    for key, store in state.stores.items():
        assert store.base._csc is not None and store.base._sums is not None, key
    state.warm_up()  # cheap and harmless when done


# ----------------------------------------------------------------------------------- parameters and layout


def test_effective_parameters_keep_the_preset_and_clamp_mnnr_kq() -> None:
    params = SingleQueryParams.resolve("sysu")
    eff = params.effective(5)
    assert eff.preset == "sysu" and eff.to_dict()["preset"] == "sysu"
    default = SingleQueryParams.resolve()  # mnnr kq 12, kg 20, alpha 0.3: clamped to 5 and 5 - 1 items
    assert dict(default.effective(5).mnnr) == {"kq": 5, "kg": 4, "alpha": 0.3}
    assert dict(default.effective(100).mnnr) == {"kq": 12, "kg": 20, "alpha": 0.3}


def test_graph_k_covers_a_large_sgr_graph() -> None:
    """SGR's k_graph 40 exceeds every other size (AIM k1 30, SIM k_graph 20, reciprocal k 20 + 1, krr k2 6)."""
    params = SingleQueryParams.resolve(params={"sgr": {"k_graph": 40}})
    assert params.graph_k() == 40
    feats = l2_normalize_rows(np.random.default_rng(6).standard_normal((50, 8)))
    state = GalleryState.build(feats, params, knn="exact")
    assert state.graph.k == 40 and state.graph.base.index.shape == (50, 40)


def test_an_empty_gallery_is_refused_by_every_constructor() -> None:
    params = SingleQueryParams.resolve()
    with pytest.raises(InputError):
        GalleryState.build(np.empty((0, 4), np.float32), params)
    with pytest.raises(InputError):
        GalleryState.from_graph(np.empty((0, 4), np.float32), params, np.empty((0, 1), np.int64),
                                np.empty((0, 1), np.float32))
    arrays = {"n": np.int64(0), "graph_index": np.empty((0, 1), np.int64), "graph_sim": np.empty((0, 1), np.float32)}
    for key in ("aim", "half0", "recip-1"):  # the structures of 0 items (every k clamped to 0 or -1)
        arrays.update({f"{key}.indptr": np.zeros(1, np.int32), f"{key}.indices": np.zeros(0, np.int32),
                       f"{key}.data": np.zeros(0, np.float32)})
    with pytest.raises(InputError):
        GalleryState.from_base_arrays(arrays, params)


def test_an_extended_graph_overlay_stays_float32(grown) -> None:
    old, new, _, _, _ = grown
    assert old.graph.overlay_sim.dtype == np.float32 and old.graph.overlay_sim.shape == (0, old.graph.k)
    assert new.graph.overlay_sim.dtype == np.float32 and len(new.graph.ids)
    assert new.graph.dense()[1].dtype == np.float32


def test_every_structure_is_float32_for_float64_features() -> None:
    """float64 unit features give the same float32 structures as their float32 copy would (the
    k-reciprocal weights exp(-d) by a loop, d from float32)."""
    feats = l2_normalize_rows(np.random.default_rng(7).standard_normal((40, 6))).astype(np.float64)
    state = GalleryState.build(feats, SingleQueryParams.resolve(), knn="exact")
    for key, store in state.stores.items():
        assert store.base.csr.dtype == np.float32, key
    recip = state.stores["recip20"].base.csr
    for i in (0, 13):
        for j, value in zip(recip[i].indices.tolist(), recip[i].data.tolist()):
            d = 0.0 if i == j else float(np.sqrt(np.float32(max(2.0 - 2.0 * float(feats[i] @ feats[j]), 0.0))))
            assert value == pytest.approx(np.exp(-d), rel=1e-6)


def _loop_referencing(index: np.ndarray, items, m: int) -> list[int]:
    return [r for r in range(len(index)) if set(index[r, :m].tolist()) & set(items)]


def test_referencing_without_a_match() -> None:
    """Rows listing one of ``items`` in their first m entries, by a loop; none (no item given, or
    only items past the base of a store without overlay) is an empty int64 array."""
    feats = _quarter_features(20, seed=1)
    index, sim = _reference_lists(feats, 5)
    graph = GraphStore(_GraphBase(index, sim.astype(np.float32)), 20)
    for items, m in (([3], 2), ([0, 7], 5)):
        assert graph.referencing(np.array(items), m).tolist() == _loop_referencing(index, items, m)
    for items in (np.empty(0, np.int64), np.array([20, 21])):
        wider = GraphStore(graph.base, 22)
        out = wider.referencing(items, 3)
        assert out.dtype == np.int64 and out.shape == (0,)


def test_warm_up_loads_the_compiled_sgr_kernel_of_the_state_parameters(grown, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server warms up once: afterwards every single-query SGR uses the compiled loop, for the
    (k_graph, K) of ``sgr`` and ``sim`` in the state's parameters."""
    from vireid.retrieval import sim as sim_module
    _, _, full, _, _ = grown
    monkeypatch.setattr(sim_module, "_COMPILED_KERNELS", {})
    full.warm_up()
    wanted = {(int(full.effective.method(m)["k_graph"]), int(full.effective.method(m)["K"])) for m in ("sgr", "sim")}
    assert set(sim_module._COMPILED_KERNELS) == wanted
    for kernel in sim_module._COMPILED_KERNELS.values():       # the float64 specialisation single queries use
        assert [str(signature[0]) for signature in kernel.signatures] == ["array(float64, 2d, C)"]
    calls = []
    monkeypatch.setattr(sim_module, "_network_means", lambda *a: calls.append(a))
    store = []
    k_graph, K = sorted(wanted)[0]
    sim_module._mean_of_shortest_paths(np.zeros((1, 1)), np.zeros((1, k_graph), np.int64), np.zeros((1, k_graph)),
                                       K, lambda columns, mean: store.append(mean), gallery_state.SERIAL)
    assert calls == [] and store[0].tolist() == [[0.0]]


def _hand_layer() -> gallery_state._Layer:
    """Rows 1 and 4 of a 5-item structure: row 1 = {0: 1, 2: 2}, row 4 = {1: 3} (no column past 2)."""
    rows = sp.csr_matrix((np.array([1.0, 2.0, 3.0], np.float32), np.array([0, 2, 1]), np.array([0, 2, 3])),
                         shape=(2, 5))
    return gallery_state._Layer(np.array([1, 4]), rows)


def _hand_dense(n: int) -> np.ndarray:
    out = np.zeros((n, n), np.float32)
    out[1, 0], out[1, 2], out[4, 1] = 1.0, 2.0, 3.0
    return out


def test_layer_columns_are_square_and_padded() -> None:
    layer = _hand_layer()
    columns = layer.columns(5)
    assert columns.shape == (5, 5)
    np.testing.assert_array_equal(columns.toarray(), _hand_dense(5))
    assert layer.columns(5) is columns  # built once
    np.testing.assert_array_equal(layer.columns(8).toarray(), _hand_dense(8))
    with pytest.raises(ValueError, match="^a layer of 5 columns asked for 4$"):
        layer.columns(4)


def test_merging_no_rows_keeps_or_resizes_the_layer() -> None:
    """Merging an empty layer at the same size keeps the layer (and its built column index); at a
    larger size the same rows come back with more columns (what a store grown without changed rows holds)."""
    layer = _hand_layer()
    columns = layer.columns(5)
    same = layer.merged(gallery_state._Layer.empty(5), 5)
    assert same is layer and same.columns(5) is columns
    wider = layer.merged(gallery_state._Layer.empty(7), 7)
    assert wider.rows.shape == (2, 7) and wider.ids.tolist() == [1, 4]
    np.testing.assert_array_equal(wider.columns(7).toarray(), _hand_dense(7))
    store = gallery_state.RowStore(gallery_state._SparseBase(sp.csr_matrix(_hand_dense(5))), 5)
    grown_store = store.with_rows(np.array([4]), sp.csr_matrix(_hand_dense(5)[[1]]), 5)
    grown_store = grown_store.with_rows(np.empty(0, np.int64), sp.csr_matrix((0, 7), dtype=np.float32), 7)
    expected = _hand_dense(7)
    expected[4] = expected[1]
    np.testing.assert_array_equal(grown_store[np.arange(5)].toarray(), expected[:5])


# ----------------------------------------------------------------------------------- single.py


def test_mnnr_distance_by_sets_in_float64() -> None:
    """MNNR (SIM Eq. 6-8) by a loop over the expanded kg-reciprocal sets of the gallery's own graph:
    alpha·d + (1 - alpha)·(1 - |N ∩ R*(g)| / |N ∪ R*(g)|), d from float32 similarities, the blend in float64."""
    from test_knn_mutants import loop_expanded
    from vireid.retrieval.single import query_distance

    rng = np.random.default_rng(8)
    gallery = l2_normalize_rows(rng.standard_normal((50, 8)))
    query = l2_normalize_rows(rng.standard_normal((1, 8)))[0]
    state = GalleryState.build(gallery, SingleQueryParams.resolve(), knn="exact")
    kq, kg, alpha = 12, 20, 0.3
    index, _ = state.graph.dense()
    sim = (gallery @ query).astype(np.float64)
    d = np.sqrt(np.maximum(np.float32(2) - np.float32(2) * sim.astype(np.float32), np.float32(0)))
    ranked = np.argsort(d, kind="stable")
    assert d[ranked[kq - 1]] < d[ranked[kq]]
    near = set(ranked[:kq].tolist())
    expected = np.empty(50)
    for g in range(50):
        sets = loop_expanded(index, g, kg)
        expected[g] = alpha * float(d[g]) + (1.0 - alpha) * (1.0 - len(near & sets) / len(near | sets))
    np.testing.assert_allclose(query_distance("mnnr", sim, state), expected, rtol=1e-13, atol=0)


def test_aim_from_candidates_keeps_an_item_tying_the_kept_distance() -> None:
    """Gallery items 21 and 34 are identical; the candidates are a true top-5 holding 34 but not 21
    (equal similarity). With keep = 5, 34 is the 5th candidate, and 21's bound equals its distance:
    21 must still be scored, so that ranking by (distance, row) gives the full scan's top 5
    (21 before 34). Exact ±1/8 features: every similarity is exact in float32. The full scan is
    checked against a dense SAAI Eq. 6-10."""
    from vireid.retrieval.single import aim_from_candidates, query_distance

    rng = np.random.default_rng(113)
    n, d = 40, 64
    feats = (rng.choice([-1.0, 1.0], (n, d)) / 8).astype(np.float32)
    query = (rng.choice([-1.0, 1.0], d) / 8).astype(np.float32)
    order = np.argsort(-(feats @ query), kind="stable")
    feats[order[30]] = feats[order[8]]
    a, b = 21, 34
    assert (order[30], order[8]) == (a, b)
    sim = feats @ query
    cand = np.concatenate([np.flatnonzero(sim > sim[b]), [b]])
    assert len(cand) == 5 and sim[a] == sim[b] == sim[cand].min()
    state = GalleryState.build(feats, SingleQueryParams.resolve(params={"aim": {"k1": 4, "k2": 2}}), knn="exact")
    full = query_distance("aim", sim.astype(np.float64), state)
    # dense SAAI: S_n = top-k1 row of n, G'_i = normalize(mean of S_n over the k2 nearest n), Q' likewise
    index, gsim = state.graph.dense()
    s_rows = np.zeros((n, n))
    for i in range(n):
        s_rows[i, index[i, :4]] = gsim[i, :4]
    g_rows = np.stack([s_rows[index[i, :2]].mean(axis=0) for i in range(n)])
    g_rows /= np.linalg.norm(g_rows, axis=1, keepdims=True)
    top = np.argsort(-sim, kind="stable")[:4]
    q_row = np.zeros(n)
    q_row[top] = sim[top]
    np.testing.assert_allclose(full, -(g_rows @ (q_row / np.linalg.norm(q_row))) - sim, atol=1e-6)
    assert full[a] == full[b]
    want = sorted(range(n), key=lambda i: (full[i], i))[:5]
    assert a in want and b not in want
    rows, dist = aim_from_candidates(query, feats, state, cand, sim[cand], keep=5)
    assert a in rows.tolist()
    best = np.lexsort((rows, dist))[:5]
    assert rows[best].tolist() == want
    np.testing.assert_allclose(dist[best], full[want], atol=1e-12)
