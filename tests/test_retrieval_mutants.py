"""Re-ranking building blocks where the other tests left mutants alive: output dtypes of the top-k
graphs against loops, ``plain`` called with its own defaults, and the SIM preset table of
docs/reranking.md (exact.py, api.py, presets.py)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from vireid.errors import InputError
from vireid.retrieval import api, exact, presets, resolve_rerank

REPO = Path(__file__).resolve().parents[1]


def _unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _loop_similarity(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    out = np.zeros((len(rows), len(columns)))
    for i, a in enumerate(rows.astype(np.float64)):
        for j, b in enumerate(columns.astype(np.float64)):
            out[i, j] = sum(float(x) * float(y) for x, y in zip(a, b, strict=True))
    return out


@pytest.mark.parametrize("budget", [1 << 22, 20])                     # one block; blocks of 2 rows
def test_top_k_of_other_rows_keeps_float32(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    monkeypatch.setattr(exact, "BLOCK_ELEMENTS", budget)
    rows, columns = _unit_rows(7, 3, 0), _unit_rows(9, 3, 1)          # 7 rows of dimension 3: n != d
    full = _loop_similarity(rows, columns)
    got = exact.top_k_neighbours(rows, columns, 4, self_graph=False)
    assert got.sim.dtype == np.float32 and got.min_sim.dtype == np.float32 and got.index.dtype == np.int64
    for i in range(7):
        want = sorted(range(9), key=lambda j, i=i: -full[i, j])[:4]
        assert got.index[i].tolist() == want
        np.testing.assert_allclose(got.sim[i], full[i, want], atol=1e-6)
        assert got.min_sim[i] == pytest.approx(min(full[i]), abs=1e-6)


@pytest.mark.parametrize("self_first", [True, False])
def test_self_graph_keeps_float32(monkeypatch: pytest.MonkeyPatch, self_first: bool) -> None:
    monkeypatch.setattr(exact, "BLOCK_ELEMENTS", 24)                  # several row blocks
    features = _unit_rows(11, 3, 2)
    full = _loop_similarity(features, features)
    if self_first:
        np.fill_diagonal(full, 1.0)                                   # own entry ranks first
    got = exact.self_top_k_neighbours(features, 3, self_first=self_first)
    assert got.sim.dtype == np.float32 and got.min_sim.dtype == np.float32
    for i in range(11):
        np.testing.assert_allclose(got.sim[i], sorted(full[i], reverse=True)[:3], atol=1e-6)
        assert got.min_sim[i] == pytest.approx(min(full[i]), abs=1e-6)


def test_plain_with_its_default_variant_is_the_negative_cosine() -> None:
    q = np.array([[3.0, 4.0], [0.0, 2.0]])
    g = np.array([[1.0, 0.0], [0.0, -5.0], [6.0, 8.0]])
    got = api.plain(q, g)                                             # variant and dtype left at their defaults
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [[-0.6, 0.8, -1.0], [0.0, 1.0, -0.8]], atol=1e-7)   # by hand
    np.testing.assert_array_equal(api.plain(q, g, variant="paper"), got)


def _documented_presets() -> dict[str, dict[str, dict[str, float]]]:
    """docs/reranking.md's preset table: preset -> column ("sgr", "mnnr") -> {name: value}."""
    text = (REPO / "docs" / "reranking.md").read_text()
    section = text[text.index("## Presets"):text.index("## Parameters chosen on the validation identities")]
    header = next(line for line in section.splitlines() if line.startswith("| preset |"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    table: dict[str, dict[str, dict[str, float]]] = {}
    for line in section.splitlines():
        match = re.match(r"\| `([\w-]+)`", line)
        if not match:
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        table[match.group(1)] = {}
        for column, cell in zip(columns, cells, strict=True):
            named = re.fullmatch(r"(\w+) \(([^)]*)\)", column)
            if named and named.group(1) in ("sgr", "mnnr"):
                names = named.group(2).split(", ")
                table[match.group(1)][named.group(1)] = dict(zip(names, map(float, cell.split(", ")), strict=True))
    return table


def test_sim_presets_are_the_documented_table() -> None:
    documented = _documented_presets()
    assert sorted(documented) == sorted(presets.PRESETS)
    assert documented["regdb"]["sgr"] == {"lam": 0.1, "K": 5, "k_graph": 20}             # SIM eval_regdb.py
    assert documented["sysu"]["mnnr"] == {"kq": 12, "kg": 20, "alpha": 0.3}              # SIM Sec. 4.4 / eval_sysu.py
    for names, columns in ((("lam", "K", "k_graph"), ("sgr",)), (("kq", "kg", "alpha"), ("mnnr",)),
                           (("lam", "K", "k_graph", "kq", "kg", "alpha"), ("sgr", "mnnr"))):
        want = {preset: {name: value for column in columns for name, value in documented[preset][column].items()}
                for preset in presets.PRESETS}
        assert presets._sim_presets(names) == want, names


def test_sim_graph_larger_than_the_gallery_is_named() -> None:
    """SIM's gallery graph (Algorithm 1 line 4) needs k_graph <= G, as SGR's; kq, kg fit here."""
    with pytest.raises(InputError, match=re.escape("parameter k_graph=11 of method sim is larger than the gallery "
                                                   "size (10)")):
        resolve_rerank("sim", params={"k_graph": 11, "K": 3, "kq": 3, "kg": 3}, num_gallery=10)
    fits = resolve_rerank("sim", params={"k_graph": 10, "K": 3, "kq": 3, "kg": 3}, num_gallery=10)
    assert fits.params["k_graph"] == 10


def test_self_graph_of_a_single_item_lists_itself() -> None:
    """One item, k = 1: its list is itself at similarity 1 (a one-entry merge is still a merge)."""
    for self_first, want in ((True, 1.0), (False, 0.36)):               # ‖(0.6, 0)‖² = 0.36
        got = exact.self_top_k_neighbours(np.array([[0.6, 0.0]], dtype=np.float32), 1, self_first=self_first)
        assert got.index.tolist() == [[0]]
        np.testing.assert_allclose(got.sim, [[want]], rtol=1e-6)
        np.testing.assert_allclose(got.min_sim, [want], rtol=1e-6)


def test_self_graph_blocks_hold_at_most_the_budget_unless_one_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row block [s, e) computes (e − s)·(n − s) entries: at most BLOCK_ELEMENTS, or a single row when one
    row (n − s entries) is already over the budget; the blocks cover every row once."""
    monkeypatch.setattr(exact, "BLOCK_ELEMENTS", 8)
    features = _unit_rows(10, 3, 3)
    seen: list[tuple[int, int, tuple[int, ...]]] = []
    got = exact.self_top_k_neighbours(features, 3, on_block=lambda rows, block: seen.append(
        (rows.start, rows.stop, block.shape)))
    assert sorted(row for start, stop, _ in seen for row in range(start, stop)) == list(range(10))
    for start, stop, shape in seen:
        assert shape == (stop - start, 10 - start)
        assert stop - start == 1 or shape[0] * shape[1] <= 8, (start, stop)
    full = _loop_similarity(features, features)
    np.fill_diagonal(full, 1.0)
    for i in range(10):
        np.testing.assert_allclose(got.sim[i], sorted(full[i], reverse=True)[:3], atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pair_similarity_keeps_the_feature_dtype(dtype: type) -> None:
    left, right = _unit_rows(5, 4, 4).astype(dtype), _unit_rows(6, 4, 5).astype(dtype)
    left_rows, right_rows = np.array([0, 4, 4, 2]), np.array([5, 0, 3, 3])
    got = exact.pair_similarity(left, right, left_rows, right_rows)
    assert got.dtype == dtype
    full = _loop_similarity(left, right)
    np.testing.assert_allclose(got, [full[a, b] for a, b in zip(left_rows, right_rows, strict=True)], atol=1e-6)


@pytest.mark.parametrize("side", ["query", "gallery"])
def test_plain_errors_name_the_side(side: str) -> None:
    q, g = np.ones((2, 3)), np.ones((4, 3))
    (q if side == "query" else g)[1, 2] = np.nan
    with pytest.raises(InputError, match=rf"^{side} features contains non-finite values$"):
        api.plain(q, g)


@pytest.mark.parametrize(("method", "params", "message"), [
    ("aim", {"k1": 0}, "parameter k1=0 of method aim must be >= 1"),            # no upper bound: none shown
    ("sgr", {"lam": -0.5}, "parameter lam=-0.5 of method sgr must be >= 0.0"),
    ("krr", {"lam": 1.5}, "parameter lam=1.5 of method krr must be >= 0.0, <= 1.0"),
])
def test_out_of_bounds_parameter_message_is_exact(method: str, params: dict, message: str) -> None:
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        resolve_rerank(method, params=params)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_whole_row_top_k_keeps_tied_values_in_column_order(dtype: type) -> None:
    """k = m needs no partition: the values are sorted by a stable sort, so exactly tied values keep their
    column order, the same on every machine (NumPy's default sort is an unstable SIMD sort on AVX2/AVX-512)."""
    block = np.random.default_rng(6).integers(0, 3, (4, 40)).astype(dtype)
    smallest, smallest_at = exact.topk_smallest(block, 40)
    largest, largest_at = exact.topk_largest(block, 40)
    for i, row in enumerate(block.tolist()):
        up = sorted(range(40), key=lambda j, row=row: (row[j], j))
        down = sorted(range(40), key=lambda j, row=row: (-row[j], j))
        assert smallest_at[i].tolist() == up and smallest[i].tolist() == [row[j] for j in up]
        assert largest_at[i].tolist() == down and largest[i].tolist() == [row[j] for j in down]


def test_graph_pair_similarity_reads_listed_pairs_and_computes_the_rest_in_the_graph_dtype() -> None:
    """Listed pairs are read from the graph (here: marked values, to see where each came from),
    every other pair is computed, including one whose key lies beyond the last listed pair; the
    output has the graph's dtype."""
    from vireid.retrieval.graph import NeighbourGraph

    rng = np.random.default_rng(91)
    feats = rng.standard_normal((6, 5)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    index = np.array([[0, 1], [1, 0], [2, 3], [3, 2], [4, 5], [0, 1]])     # the last row lists 0 and 1 only
    marked = np.arange(12, dtype=np.float32).reshape(6, 2) + 10.0            # not similarities: read, not computed
    graph = NeighbourGraph(index=index, sim=marked, min_sim=np.zeros(6, np.float32))
    rows, cols = np.array([5, 2, 5, 1, 4]), np.array([5, 3, 1, 4, 5])
    got = exact.graph_pair_similarity(feats, graph, rows, cols)
    assert got.dtype == np.float32
    dot = lambda r, c: float(feats[r].astype(np.float64) @ feats[c].astype(np.float64))  # noqa: E731
    np.testing.assert_allclose(got, [dot(5, 5), 15.0, 21.0, dot(1, 4), 19.0], atol=1e-6)
