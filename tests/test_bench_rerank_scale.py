"""benchmarks/rerank_scale.py --recall-curve: the recall/cost ladder of IVF and HNSW on small generated features."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from conftest import script_module


@pytest.fixture(scope="module")
def bench():
    with script_module("benchmarks/rerank_scale.py", "bench_rerank_scale") as module:
        yield module


def _args(knn: str) -> argparse.Namespace:
    return argparse.Namespace(gallery=800, queries=60, dim=12, per_identity=20, seed=0, threads=1, recall_curve=120,
                              knn=knn, nlist=None, kmeans_iterations=None)


def test_ivf_curve_rises_with_nprobe_to_the_exact_lists(bench) -> None:
    rows = bench.recall_curve(_args("ivf"), "isotropic")
    for search, k in (("gallery graph", 31), ("query lists", 100)):
        mine = [row for row in rows if row["search"] == search]
        assert mine and all(row["k"] == k and row["parameter"] == "nprobe" for row in mine)
        recalls = [row["recall"] for row in mine]
        assert all(0.0 <= r <= 1.0 for r in recalls)
        assert recalls == sorted(recalls)                  # more lists scanned: a superset of the candidates
        fractions = [row["scan_fraction"] for row in mine]
        assert fractions == sorted(fractions) and fractions[-1] <= 0.5
        assert all(row["search_seconds_all_rows"] is None for row in mine)
    assert all(row["build_seconds"] > 0 and row["exact_seconds_all_rows"] > 0 for row in rows)


def test_hnsw_curve_reaches_the_exact_lists_on_a_small_base(bench) -> None:
    rows = bench.recall_curve(_args("hnsw"), "isotropic")
    for search in ("gallery graph", "query lists"):
        mine = [row for row in rows if row["search"] == search]
        values = [row["value"] for row in mine]
        assert values == sorted(values) and values[-1] <= 1024 and mine[0]["parameter"] == "efSearch"
        assert mine[-1]["recall"] >= 0.99              # efSearch above the base size: (nearly) exhaustive
        assert mine[0]["recall"] < mine[-1]["recall"]
        assert all(row["search_seconds_all_rows"] > 0 and 0 < row["scan_fraction"] for row in mine)
    assert np.isclose(rows[0]["build_seconds"], rows[-1]["build_seconds"])
