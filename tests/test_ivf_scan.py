"""The IVF list scan (``NeighbourIndex._ivf_search``) against brute force over the probed lists.

An IVF search with given probes is exact on the items it scans: each row's answer must be the k most
similar items among the members of the lists it probes (within the searched range).  Checked with a
Python loop over the rows, for rows probing different numbers of lists, lists smaller than k, a base
range and exactly tied similarities; and the recall the targeting ladder counts without scanning.
"""

from __future__ import annotations

import numpy as np
import pytest

from vireid.retrieval.exact import FEW_ENTRIES, merge_above_kth
from vireid.retrieval.knn import IvfParams, NeighbourIndex, _probe_pairs, _recall


def _index(n: int, d: int, nlist: int, seed: int, levels: int | None = None) -> NeighbourIndex:
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, d))
    if levels is not None:                                          # few distinct rows: exact ties
        feats = rng.standard_normal((levels, d))[rng.integers(0, levels, n)]
    return NeighbourIndex(feats, "ivf", ivf=IvfParams(nlist=nlist, nprobe=1), seed=seed)


def _members(index: NeighbourIndex, lists: np.ndarray, lo: int, hi: int) -> np.ndarray:
    assigned = index._probes[:, 0]
    return np.array([i for i in range(lo, hi) if assigned[i] in set(lists.tolist())], dtype=np.int64)


def _loop_answer(index: NeighbourIndex, x: np.ndarray, row_lists: list[np.ndarray], k: int, lo: int,
                 hi: int) -> tuple[list[list[int]], list[list[float]]]:
    """Per row: the k most similar members of its lists (float64 products, ties by item number)."""
    out_idx, out_sim = [], []
    for row, lists in enumerate(row_lists):
        items = _members(index, lists, lo, hi)
        sims = index.base[items].astype(np.float64) @ x[row].astype(np.float64)
        order = sorted(range(len(items)), key=lambda t: (-sims[t], items[t]))[:k]
        out_idx.append([int(items[t]) for t in order] + [-1] * (k - len(order)))
        out_sim.append([float(sims[t]) for t in order] + [-np.inf] * (k - len(order)))
    return out_idx, out_sim


def _row_lists(index: NeighbourIndex, x: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    ranked = index._probe(x, int(counts.max()))
    return [ranked[row, :count] for row, count in enumerate(counts)]


def _pairs(row_lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = np.concatenate([np.full(len(lists), r, np.int32) for r, lists in enumerate(row_lists)])
    ranks = np.concatenate([np.arange(len(lists), dtype=np.int32) for lists in row_lists])
    return rows, np.concatenate(row_lists).astype(np.int32), ranks


@pytest.mark.parametrize(("k", "lo", "hi"), [(5, 0, 300), (12, 0, 300), (40, 0, 300), (6, 50, 230)])
def test_scan_returns_the_top_k_of_the_probed_lists(k: int, lo: int, hi: int) -> None:
    index = _index(300, 6, nlist=16, seed=3)
    x = np.random.default_rng(4).standard_normal((37, 6)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    counts = np.random.default_rng(5).integers(1, 9, len(x))               # rows probe 1 to 8 lists
    row_lists = _row_lists(index, x, counts)
    idx, sim = index._ivf_search(x, _pairs(row_lists), k, lo, hi, "")
    want_idx, want_sim = _loop_answer(index, x, row_lists, k, lo, hi)
    np.testing.assert_allclose(sim, np.array(want_sim), rtol=0, atol=1e-5)
    found = [sorted(i for i in row if i >= 0) for row in idx.tolist()]
    assert found == [sorted(i for i in row if i >= 0) for row in want_idx]
    assert np.all(np.diff(np.where(np.isinf(sim), -9.0, sim), axis=1) <= 0)  # best first
    assert idx.dtype == np.int64 and sim.dtype == np.float32


@pytest.mark.parametrize("self_rows", [False, True])
def test_counted_recall_at_each_nprobe_is_the_recall_of_that_scan(self_rows: bool) -> None:
    """The ladder counts recall from the lists of the exact neighbours; scanning at each nprobe and
    intersecting with the exact lists (a self search: the row itself left out) gives the same."""
    index = _index(500, 5, nlist=32, seed=7)
    x = index.base[::9].copy() if self_rows else np.random.default_rng(8).standard_normal((40, 5)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    own = np.arange(0, 500, 9) if self_rows else None
    truth = index._exact_search(x, 8, 0, 500, "")[0]
    ranked = index._probe(x, 32)
    counted = index._ivf_recalls(truth, own, ranked)
    assert counted.shape == (32,) and counted[-1] == 1.0
    for nprobe in range(1, 33):
        found = index._ivf_search(x, _probe_pairs(ranked[:, :nprobe]), 8, 0, 500, "")[0]
        assert counted[nprobe - 1] == pytest.approx(_recall(found, truth, own), abs=1e-12), nprobe


def test_tied_similarities_give_the_tied_values_and_valid_members() -> None:
    index = _index(240, 4, nlist=8, seed=11, levels=12)                     # 12 distinct rows: many ties
    x = index.base[::7].copy()
    row_lists = _row_lists(index, x, np.full(len(x), 3))
    idx, sim = index._ivf_search(x, _pairs(row_lists), 15, 0, 240, "")
    _, want_sim = _loop_answer(index, x, row_lists, 15, 0, 240)
    np.testing.assert_allclose(sim, np.array(want_sim), rtol=0, atol=1e-5)
    for row, lists in enumerate(row_lists):
        members = set(_members(index, lists, 0, 240).tolist())
        assert set(idx[row].tolist()) <= members and len(set(idx[row].tolist())) == 15
        np.testing.assert_allclose(sim[row], index.base[idx[row]] @ x[row], rtol=0, atol=1e-5)


def test_merge_above_kth_equals_a_loop_over_the_rows() -> None:
    """Entries above a row's k-th value join its list; the list stays best first, listed entries first among
    equals; rows with no such entry are untouched."""
    rng = np.random.default_rng(2)
    k, n = 4, 9
    best_sim = -np.sort(-rng.integers(0, 6, size=(n, k)).astype(np.float32), axis=1)
    best_sim[3, 2:] = -np.inf                                                # a list not yet full
    best_idx = rng.integers(100, 200, size=(n, k))
    rows = np.array([1, 3, 4, 7, 8])
    members = np.array([10, 11, 12, 13, 14, 15])
    sim = rng.integers(0, 7, size=(len(rows), len(members))).astype(np.float32)
    want_idx, want_sim = best_idx.copy(), best_sim.copy()
    for local, row in enumerate(rows):
        entries = [(float(v), int(i), 0, t) for t, (v, i) in enumerate(zip(best_sim[row], best_idx[row]))]
        entries += [(float(v), int(members[c]), 1, c) for c, v in enumerate(sim[local]) if v > best_sim[row, -1]]
        entries.sort(key=lambda e: (-e[0], e[2], e[3]))
        want_sim[row] = [e[0] for e in entries[:k]]
        want_idx[row] = [e[1] for e in entries[:k]]
    merge_above_kth(best_idx, best_sim, rows, members, sim)
    np.testing.assert_array_equal(best_sim, want_sim)
    np.testing.assert_array_equal(best_idx, want_idx)


def test_merge_of_rows_with_many_entries_above_kth_equals_a_loop() -> None:
    """Rows with more than ``FEW_ENTRIES`` entries above their k-th (here: lists still partly empty,
    or low k-th values) take their top-k first; rows with few, one by one; both as a loop over rows."""

    rng = np.random.default_rng(4)
    k, n, m = 5, 12, 40
    best_sim = -np.sort(-(0.85 + 0.15 * rng.random((n, k))).astype(np.float32), axis=1)  # few entries above
    best_sim[:4] -= 0.8                                                     # low k-th: many entries above
    best_sim[4, 1:] = -np.inf                                              # one listed entry only
    best_idx = rng.integers(1000, 2000, size=(n, k))
    best_idx[4, 1:] = -1
    rows = np.arange(n)
    members = rng.permutation(500)[:m]
    sim = rng.random((n, m)).astype(np.float32)
    counts = (sim > best_sim[:, -1:]).sum(axis=1)
    assert (counts > FEW_ENTRIES).sum() >= 5 and ((counts <= FEW_ENTRIES) & (counts > 0)).sum() >= 3
    want_idx, want_sim = best_idx.copy(), best_sim.copy()
    for row in rows:
        entries = [(float(v), int(i)) for v, i in zip(best_sim[row], best_idx[row])]
        entries += [(float(v), int(members[c])) for c, v in enumerate(sim[row]) if v > best_sim[row, -1]]
        entries.sort(key=lambda e: -e[0])
        want_sim[row] = [e[0] for e in entries[:k]]
        want_idx[row] = [e[1] for e in entries[:k]]
    merge_above_kth(best_idx, best_sim, rows, members, sim)
    np.testing.assert_array_equal(best_sim, want_sim)
    np.testing.assert_array_equal(best_idx, want_idx)
