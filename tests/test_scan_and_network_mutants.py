"""IVF list scan, recall counting and SGR's two network paths: cases found by hand-applied mutants."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from vireid.retrieval import knn as knn_module
from vireid.retrieval import sim as sim_module
from vireid.retrieval.exact import FEW_ENTRIES, merge_above_kth
from vireid.retrieval.gallery_state import GalleryState, SingleQueryParams
from vireid.retrieval.knn import IvfParams, NeighbourIndex, RecallTarget


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute_force(queries: np.ndarray, base: np.ndarray, k: int) -> np.ndarray:
    sim = queries.astype(np.float64) @ base.T.astype(np.float64)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


# ------------------------------------------------------------------------------------ IVF list scan


def test_scan_in_blocks_of_a_few_rows_gives_the_top_k_of_the_probed_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a tiny similarity block a list's probing rows are scanned a few at a time; every row is in
    exactly one block, so no item enters a row's list twice.  Checked against a loop over the rows."""
    rng = np.random.default_rng(21)
    index = NeighbourIndex(rng.standard_normal((300, 6)), "ivf", ivf=IvfParams(nlist=16, nprobe=1), seed=3)
    x = _unit(rng.standard_normal((60, 6)))
    counts = rng.integers(1, 9, len(x))
    ranked = index._probe(x, 8)
    row_lists = [ranked[r, :c] for r, c in enumerate(counts)]
    pairs = (np.concatenate([np.full(c, r, np.int32) for r, c in enumerate(counts)]),
             np.concatenate(row_lists).astype(np.int32), np.concatenate([np.arange(c, dtype=np.int32) for c in counts]))
    monkeypatch.setattr(knn_module, "_BLOCK_ELEMENTS", 64)          # 3-4 rows per block of a ~19-item list
    k = 10
    idx, sim = index._ivf_search(x, pairs, k, 0, 300, "")
    assigned = index._probes[:, 0].tolist()
    for row, lists in enumerate(row_lists):
        items = [i for i in range(300) if assigned[i] in set(lists.tolist())]
        sims = [float(index.base[i].astype(np.float64) @ x[row].astype(np.float64)) for i in items]
        best = sorted(zip(sims, items), key=lambda t: (-t[0], t[1]))[:k]
        assert len(set(idx[row].tolist())) == k, row                 # no item twice
        assert sorted(idx[row].tolist()) == sorted(i for _, i in best), row
        np.testing.assert_allclose(sim[row], [s for s, _ in best], rtol=0, atol=1e-5)


def test_merge_leaves_lists_alone_when_the_best_entry_only_ties_the_kth() -> None:
    """Only entries strictly above a row's k-th value are merged: a block whose best entries equal the
    k-th values changes nothing (and is no error)."""
    best_sim = np.array([[0.875, 0.5], [0.75, 0.25]], np.float32)
    best_idx = np.array([[1, 2], [3, 4]], np.int64)
    sim = np.array([[0.5, 0.125, 0.5], [0.25, 0.25, 0.0]], np.float32)   # row maxima = the k-th values
    merge_above_kth(best_idx, best_sim, np.array([0, 1]), np.array([10, 11, 12]), sim)
    assert best_sim.tolist() == [[0.875, 0.5], [0.75, 0.25]]
    assert best_idx.tolist() == [[1, 2], [3, 4]]


def test_merge_with_negative_similarities_and_uneven_entry_counts() -> None:
    """Rows merging different numbers of entries, all similarities negative, one list still empty:
    hand-worked lists (the unused merge slots must never win)."""
    best_sim = np.array([[-0.5, -0.625], [-np.inf, -np.inf]], np.float32)
    best_idx = np.array([[7, 8], [-1, -1]], np.int64)
    sim = np.array([[-0.5625, -0.875, -0.9375], [-0.125, -0.25, -0.375]], np.float32)
    merge_above_kth(best_idx, best_sim, np.array([0, 1]), np.array([20, 21, 22]), sim)
    assert best_sim.tolist() == [[-0.5, -0.5625], [-0.125, -0.25]]
    assert best_idx.tolist() == [[7, 20], [20, 21]]


@pytest.mark.parametrize("case", ["exactly the few", "few above, more tied at the kth"])
def test_few_entries_above_the_kth_join_in_column_order_even_among_ties(case: str) -> None:
    """A row with at most ``FEW_ENTRIES`` entries strictly above its k-th merges them in column order
    (documented), tied values included: exactly ``FEW_ENTRIES`` such entries, or fewer plus entries
    equal to the k-th (which do not count and never join)."""
    few = FEW_ENTRIES
    k, members = few + 2, np.arange(20, 20 + 2 * few + 4)
    listed = np.arange(100, 100 + k)
    sim = np.zeros((1, len(members)), np.float32)
    if case == "exactly the few":
        kth, above = 0.25, list(range(1, 2 * few, 2))                  # `few` tied entries of 1.0
    else:
        kth, above = 0.5, list(range(2, 4 * (few - 3), 4))             # few - 3 tied entries of 1.0 ...
        sim[0, [0, 4, 8, 12]] = 0.5                                     # ... and 4 equal to the k-th
    sim[0, above] = 1.0
    best_sim, best_idx = np.full((1, k), kth, np.float32), listed[None].copy()
    merge_above_kth(best_idx, best_sim, np.array([0]), members, sim)
    want = [int(members[c]) for c in above] + listed.tolist()          # new ones in column order, then listed
    assert best_idx[0].tolist() == want[:k]
    assert best_sim[0].tolist() == [1.0] * len(above) + [kth] * (k - len(above))


# ------------------------------------------------------------------- recall targeting: few rows


def _clustered_base(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((25, 12)) * 3
    base = np.repeat(centres, 40, axis=0) + 0.4 * rng.standard_normal((1000, 12))
    queries = centres[rng.integers(0, 25, 40)] + 0.4 * rng.standard_normal((40, 12))
    return _unit(queries), _unit(base)


def test_few_rows_in_a_base_range_count_the_products_of_the_range() -> None:
    """The exact-search budget of a few-row search counts rows × (hi − lo) inner products: 40 rows over
    base rows [600, 1000) cost 16,000, within a budget of exactly 16,000 (not 40 × 1,000)."""
    queries, base = _clustered_base(31)
    index = NeighbourIndex(base, "ivf", ivf=IvfParams(nlist=16), seed=1,
                           recall=RecallTarget(target=0.5, sample=20, exact_max_products=40 * 400))
    idx, _ = index.search(queries, 10, base_range=(600, 1000))
    assert index.reports[0].outcome == "exact, few rows"
    np.testing.assert_array_equal(idx, _brute_force(queries, base[600:], 10) + 600)


def test_few_rows_report_says_exact_search_with_no_parameter_and_a_full_scan() -> None:
    """An exact search of few rows is reported as exact search: no approximate parameter, recall 1,
    nothing sampled, the inner products of an exact search (scan fraction 1)."""
    queries, base = _clustered_base(32)
    index = NeighbourIndex(base, "ivf", ivf=IvfParams(nlist=16), seed=1,
                           recall=RecallTarget(target=0.5, sample=20, exact_max_products=1e9))
    index.search(queries[:30], 10)
    report = index.reports[0].to_dict()
    report.pop("seconds")
    assert report == {"name": "query lists", "rows": 30, "k": 10, "method": "exact", "parameter": None,
                      "value": None, "recall": 1.0, "sample": 0, "target": 0.5, "scan_fraction": 1.0,
                      "outcome": "exact, few rows", "note": ""}


# ------------------------------------------------------------------------- SGR: the numpy steps


@pytest.fixture
def numpy_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiled loop loaded, none counted, a threshold never reached: the numpy steps run."""
    monkeypatch.setattr(sim_module, "_COMPILED_KERNELS", {})
    monkeypatch.setattr(sim_module, "_stepped_pairs", [0])
    monkeypatch.setattr(sim_module, "COMPILED_KERNEL_MIN_PAIRS", 10**15)


def _sorted_means(source: np.ndarray, rows: np.ndarray, edge: np.ndarray, K: int) -> np.ndarray:
    paths = source[rows] + edge[:, :, None]
    return np.sort(paths, axis=1)[:, :K].mean(axis=1)


def test_numpy_steps_count_each_pair_once_across_the_reference_update_levels(numpy_steps, monkeypatch) -> None:
    """The reference variant runs one numpy-step pass per update level, each handed the whole SGR's
    pair count; the process counts the pairs each pass computed: Q × G in all."""
    calls = []
    real = sim_module._network_means
    monkeypatch.setattr(sim_module, "_network_means", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(41)
    sim_module.sgr(rng.standard_normal((7, 6)), rng.standard_normal((40, 6)), K=3, k_graph=5, variant="reference")
    assert len(calls) > 1                                      # several passes (update levels)
    assert sim_module._stepped_pairs == [7 * 40]


def test_reference_sgr_below_the_threshold_stays_on_the_numpy_steps_through_every_level(numpy_steps,
                                                                                     monkeypatch) -> None:
    """The kernel is chosen once for the whole SGR: with a threshold one pair above Q × G, the
    update levels' own counts (which add up to Q × G) never load the compiled loop part-way."""
    loads = []
    monkeypatch.setattr(sim_module, "COMPILED_KERNEL_MIN_PAIRS", 7 * 40 + 1)
    real = sim_module._load_kernel
    monkeypatch.setattr(sim_module, "_load_kernel", lambda *a: loads.append(a) or real(*a))
    rng = np.random.default_rng(41)
    q, g = rng.standard_normal((7, 6)), rng.standard_normal((40, 6))
    got = sim_module.sgr(q, g, K=3, k_graph=5, variant="reference")
    assert loads == [] and sim_module._stepped_pairs == [7 * 40]
    monkeypatch.setattr(sim_module, "COMPILED_KERNEL_MIN_PAIRS", 2 * 7 * 40)   # earlier pairs count: now it pays
    np.testing.assert_array_equal(sim_module.sgr(q, g, K=3, k_graph=5, variant="reference"), got)
    assert loads == [(5, 3)] and sim_module._stepped_pairs == [7 * 40]


def test_paper_sgr_over_several_query_blocks_decides_once_for_all_of_them(numpy_steps, monkeypatch) -> None:
    """Query blocks of two rows (7 queries: four blocks): the whole call's 7 × 40 pairs reach the
    threshold, so every block runs the compiled loop; no block runs numpy steps first."""
    from vireid.retrieval import exact as exact_module

    loads = []
    monkeypatch.setattr(exact_module, "BLOCK_ELEMENTS", 80)
    monkeypatch.setattr(sim_module, "COMPILED_KERNEL_MIN_PAIRS", 7 * 40)
    real = sim_module._load_kernel
    monkeypatch.setattr(sim_module, "_load_kernel", lambda *a: loads.append(a) or real(*a))
    rng = np.random.default_rng(44)
    q, g = _unit(rng.standard_normal((7, 6))), _unit(rng.standard_normal((40, 6)))
    got = sim_module.sgr(q, g, K=3, k_graph=5, variant="paper")
    assert loads == [(5, 3)] and sim_module._stepped_pairs == [0]
    qg = np.sqrt(np.maximum(2 - 2 * q.astype(np.float64) @ g.T.astype(np.float64), 0))
    gg = np.sqrt(np.maximum(2 - 2 * g.astype(np.float64) @ g.T.astype(np.float64), 0))
    hood = np.argsort(gg, axis=1, kind="stable")[:, :5]
    for j in (0, 17, 39):
        edges = 0.01 * gg[j, hood[j]]
        edges[0] = 0.0
        paths = np.sort(qg[:, hood[j]] + edges, axis=1)[:, :3].mean(axis=1)
        np.testing.assert_allclose(got[:, j], paths, atol=1e-5)


def test_numpy_steps_with_more_queries_than_pairs_per_task(numpy_steps) -> None:
    """A block of more than 65,536 query columns: one gallery column per task, still every column."""
    rng = np.random.default_rng(42)
    source = rng.random((3, 65_537)).astype(np.float32)
    rows = np.array([[0, 1], [1, 2], [2, 0]])
    edge = np.array([[0.0, 0.5], [0.0, 0.25], [0.0, 0.125]], np.float32)
    got = np.full_like(source, np.nan)
    with ThreadPoolExecutor(2) as pool:
        sim_module._mean_of_shortest_paths(source, rows, edge, 1, lambda c, m: got.__setitem__(c, m), pool)
    want = np.minimum(source[rows[:, 0]] + edge[:, :1], source[rows[:, 1]] + edge[:, 1:])  # K = 1: the shorter path
    np.testing.assert_array_equal(got, want)


def test_numpy_steps_with_no_query_columns(numpy_steps) -> None:
    """A block of zero queries: every gallery column gets an empty mean, no error."""
    source = np.empty((4, 0), np.float32)
    rows = np.array([[0, 1], [1, 2], [2, 3], [3, 0]])
    stored = []
    with ThreadPoolExecutor(2) as pool:
        sim_module._mean_of_shortest_paths(source, rows, np.zeros((4, 2), np.float32), 1,
                                           lambda c, m: stored.append((c, m.shape)), pool)
    assert sorted((c.start, c.stop, shape) for c, shape in stored) == [(0, 4, (4, 0))]


# ---------------------------------------------------------------- SGR: preloading the compiled loop


def test_preloaded_kernel_serves_a_float32_sgr_without_compiling_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """``preload_compiled_kernel`` (float32 by default) compiles the specialisation a float32 SGR then
    uses: the SGR adds none, and its distances are the mean of the K shortest two-hop paths."""
    monkeypatch.setattr(sim_module, "_COMPILED_KERNELS", {})
    sim_module.preload_compiled_kernel(8, 3)
    kernel = sim_module._COMPILED_KERNELS[8, 3]
    signatures = list(kernel.signatures)
    assert len(signatures) == 1
    rng = np.random.default_rng(43)
    q, g = _unit(rng.standard_normal((6, 5))), _unit(rng.standard_normal((30, 5)))
    got = sim_module.sgr(q, g, lam=0.1, K=3, k_graph=8)
    assert got.dtype == np.float32 and list(kernel.signatures) == signatures   # no new specialisation
    qg = np.sqrt(np.maximum(2 - 2 * q.astype(np.float64) @ g.T.astype(np.float64), 0))
    gg = np.sqrt(np.maximum(2 - 2 * g.astype(np.float64) @ g.T.astype(np.float64), 0))
    np.fill_diagonal(gg, 0)
    want = np.empty((6, 30))
    for j in range(30):
        near = np.argsort(gg[j], kind="stable")[:8]                 # j itself first (distance 0)
        paths = qg[:, near] + 0.1 * gg[j, near][None, :]
        want[:, j] = np.sort(paths, axis=1)[:, :3].mean(axis=1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_warm_up_loads_the_kernels_of_both_sgr_and_sim_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """``sgr`` and ``sim`` may use different (k_graph, K): warm-up loads the compiled loop of each."""
    feats = _unit(np.random.default_rng(44).standard_normal((60, 8)))
    params = SingleQueryParams.resolve(params={"sgr": {"k_graph": 8, "K": 3}, "sim": {"k_graph": 7, "K": 3}})
    state = GalleryState.build(feats, params, knn="exact")
    monkeypatch.setattr(sim_module, "_COMPILED_KERNELS", {})
    state.warm_up()
    assert set(sim_module._COMPILED_KERNELS) == {(8, 3), (7, 3)}
