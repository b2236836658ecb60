"""Enrolment internals of retrieval/gallery_state.py checked against independent computations:
the extended neighbour lists (both the per-hit merge and the dense block-by-block merge) against a
from-scratch exact top-k, the "first changed position" against a loop, the delta's rows against the
rows that really differ between two full builds, and the layout helpers."""

from __future__ import annotations

import numpy as np
import pytest

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
