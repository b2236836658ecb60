"""Building blocks of the exact re-rankers that keep them near the matmul floor: SGR's selection
network (compiled), the half-Gram self graph, the pool graph of k-reciprocal re-ranking, AIM's tie fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from vireid.retrieval import exact, rerank
from vireid.retrieval.kreciprocal import pool_neighbours
from vireid.retrieval.sim import (
    _mean_of_shortest_paths,
    _sgr_sequential,
    _load_kernel,
    _network_means,
    _update_levels,
    smallest_sorted_network,
)


NETWORK_SIZES = [(1, 1), (2, 1), (3, 2), (7, 3), (8, 8), (20, 9), (20, 5), (20, 20), (21, 9)]


@pytest.mark.parametrize(("n", "k"), NETWORK_SIZES)
def test_selection_network_leaves_the_k_smallest_sorted(n: int, k: int) -> None:
    rng = np.random.default_rng(n * 100 + k)
    for values in rng.integers(0, 6, size=(200, n)).tolist():  # many ties
        wires = list(values)  # the steps only touch the n real wires (an index >= n raises)
        for op, low, high in smallest_sorted_network(n, k):
            assert op in ("cmp", "min", "max") and low < high
            a, b = wires[low], wires[high]
            wires[low], wires[high] = (min(a, b) if op != "max" else a), (max(a, b) if op != "min" else b)
        assert wires[:k] == sorted(values)[:k]


@pytest.mark.parametrize(("n", "k"), NETWORK_SIZES)
def test_compiled_kernel_gives_the_mean_of_the_k_smallest(n: int, k: int) -> None:
    values = np.random.default_rng(n * 100 + k).integers(0, 6, size=(n, 500)).astype(np.float32)
    out = np.empty((1, 500), dtype=np.float32)
    _load_kernel(n, k)(values, np.arange(n)[None], np.zeros((1, n), np.float32), 0, 1, out)
    np.testing.assert_array_equal(out[0], np.sort(values, axis=0)[:k].mean(axis=0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "k"), NETWORK_SIZES)
def test_numpy_network_gives_bitwise_the_compiled_kernels_means(n: int, k: int, dtype: type) -> None:
    """The two ways of running the network: the same min/max steps and summation order, so the same bits."""
    rng = np.random.default_rng(n * 100 + k)
    columns, batch = 13, 37
    source = np.concatenate([rng.integers(0, 6, size=(10, batch)), rng.random((10, batch))]).astype(dtype)  # ties
    rows = rng.integers(0, len(source), size=(columns, n))
    edge = (rng.random((columns, n)) * rng.integers(0, 2, size=(columns, n))).astype(dtype)  # zeros: more ties
    compiled, stepped = np.empty((columns - 3, batch), dtype), np.empty((columns - 3, batch), dtype)
    _load_kernel(n, k)(source, rows, edge, 2, columns - 1, compiled)
    _network_means(smallest_sorted_network(n, k), k, source, rows, edge, 2, columns - 1, stepped)
    np.testing.assert_array_equal(stepped, compiled)
    paths = np.sort(source[rows[2:columns - 1]] + edge[2:columns - 1, :, None], axis=1)
    np.testing.assert_allclose(stepped, paths[:, :k].mean(axis=1), rtol=1e-6 if dtype == np.float32 else 1e-14)


def test_the_compiled_loop_runs_from_its_threshold_or_once_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below ``COMPILED_KERNEL_MIN_PAIRS`` pairs (this call's plus the process's earlier numpy-step
    calls') the network runs as numpy steps (numba is never imported); from it on, or once the
    kernel is loaded in the process, as the compiled loop."""
    from vireid.retrieval import sim as sim_module

    dist_t, neighbours, edge = _sgr_inputs(np.float32)
    used = []
    monkeypatch.setattr(sim_module, "_COMPILED_KERNELS", {})
    monkeypatch.setattr(sim_module, "_stepped_pairs", [0])
    real_numpy, real_load = sim_module._network_means, sim_module._load_kernel
    monkeypatch.setattr(sim_module, "_network_means", lambda *a: used.append("numpy") or real_numpy(*a))
    monkeypatch.setattr(sim_module, "_load_kernel", lambda *a: used.append("load") or real_load(*a))
    pairs = dist_t.shape[0] * dist_t.shape[1]

    def run(threshold: int, compiled: bool | None = None) -> np.ndarray:
        monkeypatch.setattr(sim_module, "COMPILED_KERNEL_MIN_PAIRS", threshold)
        got = np.empty_like(dist_t)
        used.clear()
        with ThreadPoolExecutor(2) as pool:
            _mean_of_shortest_paths(dist_t, neighbours, edge, 3, lambda c, m: got.__setitem__(c, m), pool, compiled)
        return got

    first = run(pairs + 1)
    assert set(used) == {"numpy"} and sim_module._COMPILED_KERNELS == {}
    assert sim_module._stepped_pairs == [pairs]
    run(2 * pairs + 1)                                        # pairs + pairs < threshold: numpy again
    assert set(used) == {"numpy"} and sim_module._stepped_pairs == [2 * pairs]
    monkeypatch.setattr(sim_module, "COMPILED_KERNEL_MIN_PAIRS", 10**9)  # a whole computation's pairs
    assert not sim_module.use_compiled_kernel(8, 3, 10**9 - 2 * pairs - 1)  # decide, with the earlier ones
    assert sim_module.use_compiled_kernel(8, 3, 10**9 - 2 * pairs)
    run(10**9, compiled=True)
    assert used == ["load"] and list(sim_module._COMPILED_KERNELS) == [(8, 3)]
    assert sim_module._stepped_pairs == [2 * pairs]
    np.testing.assert_array_equal(run(10**12), first)         # loaded: used whatever the size, same bits
    assert used == []


_KERNEL_RUN = """
import numpy as np
from vireid.retrieval.sim import compiled_kernel
kernel = compiled_kernel(7, 3)
values = np.arange(70, dtype=np.float32).reshape(7, 10)[::-1].copy()
out = np.empty((1, 10), np.float32)
kernel(values, np.arange(7)[None], np.zeros((1, 7), np.float32), 0, 1, out)
assert out[0].tolist() == values[-3:].mean(axis=0).tolist()
print(len(kernel.stats.cache_hits), len(kernel.stats.cache_misses), kernel.stats.cache_path is not None)
"""


def _run_kernel_process(cache: Path) -> str:
    env = {**os.environ, "VIREID_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", _KERNEL_RUN], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_compiled_kernel_is_cached_on_disk_for_the_next_process(tmp_path: Path) -> None:
    assert _run_kernel_process(tmp_path) == ["0", "1", "True"]  # compiled: a cache miss
    assert [p.name for p in (tmp_path / "numba").glob("sgr_k7_K3_*.py")]
    assert _run_kernel_process(tmp_path) == ["1", "0", "True"]  # loaded from disk, nothing compiled


def test_compiled_kernel_without_a_writable_cache_compiles_in_memory(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert _run_kernel_process(blocked)[2] == "False"             # no on-disk cache at all
    assert blocked.read_text() == "not a folder"


@pytest.mark.parametrize(("rows", "columns", "k"), [(5, 9, 1), (5, 9, 4), (5, 9, 9), (3, 1, 1)])
def test_topk_largest_and_smallest_match_a_full_sort(rows: int, columns: int, k: int) -> None:
    block = np.random.default_rng(columns * 10 + k).integers(0, 4, size=(rows, columns)).astype(np.float32)  # ties
    for largest, select in ((True, exact.topk_largest), (False, exact.topk_smallest)):
        values, index = select(block, k)
        expected = -np.sort(-block, axis=1)[:, :k] if largest else np.sort(block, axis=1)[:, :k]
        np.testing.assert_array_equal(values, expected)
        assert index.dtype == np.int64
        np.testing.assert_array_equal(np.take_along_axis(block, index, axis=1), expected)
        assert all(len(set(row)) == k for row in index.tolist())


def _sgr_inputs(dtype: type) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    num_gallery, num_query, k_graph = 37, 11, 8
    dist_t = rng.random((num_gallery, num_query)).astype(dtype)
    neighbours = np.stack([np.r_[j, rng.permutation(np.delete(np.arange(num_gallery), j))[:k_graph - 1]]
                           for j in range(num_gallery)])
    edge = np.sort(rng.random((num_gallery, k_graph)), axis=1).astype(dtype) * dtype(0.1)
    return dist_t, neighbours, edge


@pytest.fixture(params=["numpy", "compiled"])
def network_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with SGR's network as numpy steps, then as the compiled loop (none loaded before)."""
    from vireid.retrieval import sim as sim_module

    monkeypatch.setattr(sim_module, "_COMPILED_KERNELS", {})
    monkeypatch.setattr(sim_module, "_stepped_pairs", [0])
    monkeypatch.setattr(sim_module, "COMPILED_KERNEL_MIN_PAIRS", 0 if request.param == "compiled" else 10**15)
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgr_network_mean_is_bitwise_the_sorted_mean(dtype: type, network_path: str) -> None:
    dist_t, neighbours, edge = _sgr_inputs(dtype)
    K = 3
    paths = dist_t[neighbours] + edge[:, :, None]
    paths.sort(axis=1)
    got = np.empty_like(dist_t)

    def store(columns: slice, mean: np.ndarray) -> None:
        got[columns] = mean

    with ThreadPoolExecutor(2) as pool:
        _mean_of_shortest_paths(dist_t, neighbours, edge, K, store, pool)
    np.testing.assert_array_equal(got, paths[:, :K].mean(axis=1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgr_reference_levels_equal_the_column_by_column_update(dtype: type, network_path: str) -> None:
    dist_t, neighbours, edge = _sgr_inputs(dtype)
    K = 3
    want = dist_t.copy()
    for j in range(len(want)):                                   # SIM graph_reasoning, in gallery order
        paths = want[neighbours[j]] + edge[j][:, None]
        paths.sort(axis=0)
        want[j] = paths[:K].mean(axis=0)
    levels = _update_levels(neighbours)
    assert len(levels) > 1
    with ThreadPoolExecutor(2) as pool:
        got = _sgr_sequential(np.concatenate([dist_t, dist_t]), neighbours, edge, K, levels, pool, dist_t.size)
    np.testing.assert_array_equal(got, want)


def _unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("self_first", [True, False])
def test_self_graph_from_half_the_gram_matrix_matches_full_rows(monkeypatch: pytest.MonkeyPatch,
                                                                self_first: bool) -> None:
    monkeypatch.setattr(exact, "BLOCK_ELEMENTS", 300)                # many row blocks of unequal size
    features = _unit_rows(53, 6, seed=1)
    full = features @ features.T
    if self_first:
        np.fill_diagonal(full, 1.0)
    for k in (1, 7, 53):
        graph = exact.self_top_k_neighbours(features, k, self_first=self_first)
        want = np.argsort(-full, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(graph.index, want)
        np.testing.assert_allclose(graph.sim, np.take_along_axis(full, want, axis=1), rtol=0, atol=1e-15)
        np.testing.assert_allclose(graph.min_sim, full.min(axis=1), rtol=0, atol=1e-15)
    assert (exact.top_k_neighbours(features, features, 5, self_graph=True).index[:, 0] == np.arange(53)).all()


def test_pool_graph_fills_the_query_gallery_similarities(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exact, "BLOCK_ELEMENTS", 400)
    pool = _unit_rows(45, 5, seed=2)
    num_query = 17
    query_gallery = np.full((num_query, 45 - num_query), np.nan)
    graph = pool_neighbours(pool, num_query, 6, query_gallery)
    np.testing.assert_allclose(query_gallery, pool[:num_query] @ pool[num_query:].T, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(graph.index, exact.self_top_k_neighbours(pool, 6).index)


def _loop_aim_reference(query: np.ndarray, gallery: np.ndarray, k1: int) -> np.ndarray:
    """SAAI ``models/AIM.py`` with k2 = 1: rows keep every similarity >= their k1-th largest."""
    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    s_qg, s_gg = unit(query) @ unit(gallery).T, unit(gallery) @ unit(gallery).T

    def rows(s: np.ndarray) -> np.ndarray:
        kth = -np.sort(-s, axis=1)[:, k1 - 1:k1]
        return unit(np.where(s >= kth, s, 0.0))

    return -(rows(s_qg) @ rows(s_gg).T) - s_qg


def test_aim_reference_keeps_ties_in_gallery_rows() -> None:
    gallery = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [0.0, 1.0], [-1.0, 0.0]])
    query = np.array([[0.8, 0.6], [0.0, -1.0]])
    # gallery row 0: similarities 1, 0.6, 0.6, 0, -1 -> its 2nd largest (0.6) is tied
    ref = rerank("aim", query, gallery, variant="reference", params={"k1": 2, "k2": 1}, dtype=np.float64)
    np.testing.assert_allclose(ref, _loop_aim_reference(query, gallery, 2), rtol=0, atol=1e-12)
