"""Ranked-list re-ranking (``--topk``): equality with the dense methods, shapes, errors."""

from __future__ import annotations

import numpy as np
import pytest

from vireid.errors import InputError
from vireid.retrieval.aim import aim
from vireid.retrieval.knn import IvfParams, RecallTarget
from vireid.retrieval.kreciprocal import krr
from vireid.retrieval.ranked import RankedOptions, rerank_ranked
from vireid.retrieval.sim import sim

DENSE = {"aim": aim, "sim": sim, "krr": krr}
SMALL_PARAMS = {
    "aim": {"k1": 10, "k2": 4},
    "sim": {"lam": 0.05, "K": 5, "k_graph": 10, "kq": 6, "kg": 8, "alpha": 0.4},
    "krr": {"k1": 8, "k2": 3, "lam": 0.3},
}


@pytest.fixture(scope="module")
def features() -> tuple[np.ndarray, np.ndarray]:
    """40 identities × 8 gallery images in 24-d; 30 queries shifted like another modality."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 24))
    gallery = np.repeat(centres, 8, axis=0) + 0.6 * rng.standard_normal((320, 24))
    ids = rng.integers(0, 40, 30)
    queries = centres[ids] + 0.5 * rng.standard_normal((40, 24))[ids] + 0.6 * rng.standard_normal((30, 24))
    return queries, gallery


def dense_topk(method: str, queries: np.ndarray, gallery: np.ndarray, topk: int,
               params: dict) -> tuple[np.ndarray, np.ndarray]:
    dist = DENSE[method](queries, gallery, **params)
    order = np.argsort(dist, axis=1, kind="stable")[:, :topk]
    return order, np.take_along_axis(dist, order, axis=1)


@pytest.mark.parametrize("method", ["aim", "sim", "krr"])
@pytest.mark.parametrize("use_defaults", [True, False])
def test_full_candidates_equal_dense_top_k(features, method, use_defaults):
    queries, gallery = features
    params = {} if use_defaults else SMALL_PARAMS[method]
    options = RankedOptions(knn="exact", query_k=len(gallery))
    ranked_index, ranked_dist, _ = rerank_ranked(method, queries, gallery, topk=25, params=params, options=options)
    want_index, want_dist = dense_topk(method, queries, gallery, 25, params)
    np.testing.assert_array_equal(ranked_index, want_index)
    np.testing.assert_allclose(ranked_dist, want_dist, atol=2e-6)


@pytest.mark.parametrize("method", ["aim", "sim", "krr"])
def test_default_candidates_recover_dense_top_k(features, method):
    """aim and krr are exact by construction; sim's graph expansion finds the same lists here."""
    queries, gallery = features
    ranked_index, ranked_dist, _ = rerank_ranked(method, queries, gallery, topk=10, params=SMALL_PARAMS[method],
                                              options=RankedOptions(knn="exact"))
    want_index, want_dist = dense_topk(method, queries, gallery, 10, SMALL_PARAMS[method])
    np.testing.assert_array_equal(ranked_index, want_index)
    np.testing.assert_allclose(ranked_dist, want_dist, atol=2e-6)


@pytest.mark.parametrize("method", ["aim", "sim", "krr"])
def test_ivf_ranked_lists_close_to_exact(features, method):
    queries, gallery = features
    exact = rerank_ranked(method, queries, gallery, topk=10, params=SMALL_PARAMS[method],
                          options=RankedOptions(knn="exact")).ranked_index
    approx = rerank_ranked(method, queries, gallery, topk=10, params=SMALL_PARAMS[method],
                           options=RankedOptions(knn="ivf", ivf=IvfParams(nlist=8, nprobe=4, query_nprobe=8),
                                                 recall=None)).ranked_index
    overlap = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(exact, approx)])
    assert overlap >= 0.95


@pytest.mark.parametrize("name", ["isotropic", "lowrank", "heavy", "offset"])
def test_recall_targeted_ranked_lists_follow_exact_knn(name):
    """On each feature distribution every search meets the target and the lists stay those of exact kNN."""
    from test_knn import distribution

    queries, gallery = distribution(name, n=3000, n_query=150)
    target = RecallTarget(target=0.98, sample=500, max_scan_fraction=0.5, exact_max_products=0)
    for method in ("aim", "sim", "krr"):
        exact = rerank_ranked(method, queries, gallery, topk=20, options=RankedOptions(knn="exact"))
        approx = rerank_ranked(method, queries, gallery, topk=20, options=RankedOptions(knn="ivf", recall=target))
        assert all(s.outcome == "met" and s.recall >= 0.98 for s in approx.searches), (method, approx.searches)
        overlap = np.mean([len(np.intersect1d(a, b)) / 20 for a, b in zip(exact.ranked_index, approx.ranked_index)])
        assert overlap >= 0.95, (method, overlap)


@pytest.mark.parametrize("method", ["aim", "krr"])
def test_recall_target_one_reproduces_exact_knn_lists(method):
    """aim and krr are exact given exact neighbour lists: a target of 1.0 must give the exact-kNN output."""
    from test_knn import distribution

    queries, gallery = distribution("offset", n=2000, n_query=100)
    target = RecallTarget(target=1.0, sample=5000, max_scan_fraction=1.0, exact_max_products=0)
    exact = rerank_ranked(method, queries, gallery, topk=15, options=RankedOptions(knn="exact"))
    approx = rerank_ranked(method, queries, gallery, topk=15, options=RankedOptions(knn="ivf", recall=target))
    assert [s.outcome for s in approx.searches] == ["met"] * len(approx.searches)
    np.testing.assert_array_equal(approx.ranked_index, exact.ranked_index)
    np.testing.assert_allclose(approx.ranked_dist, exact.ranked_dist, atol=1e-6)


@pytest.mark.parametrize("method, names", [
    ("aim", ["gallery graph", "query lists"]), ("sim", ["gallery graph", "query lists"]),
    ("krr", ["pool graph (query rows)", "pool graph (gallery rows)", "query lists"]),
])
def test_ranked_lists_report_every_neighbour_search(features, method, names):
    import json

    queries, gallery = features
    ranked = rerank_ranked(method, queries, gallery, topk=5, params=SMALL_PARAMS[method],
                           options=RankedOptions(knn="ivf", ivf=IvfParams(nlist=8),
                                                 recall=RecallTarget(sample=50, exact_max_products=0)))
    assert [s.name for s in ranked.searches] == names
    pool = len(gallery) + (len(queries) if method == "krr" else 0)
    assert all(s.method == "ivf" and s.sample == min(50, s.rows) and 0 < s.scan_fraction <= 1 for s in ranked.searches)
    assert sum(s.rows for s in ranked.searches if "graph" in s.name) == pool
    summary = json.loads(json.dumps(ranked.knn_summary()))
    assert [entry["value"] for entry in summary] == [s.value for s in ranked.searches]


def test_shapes_dtypes_and_order(features):
    queries, gallery = features
    ranked_index, ranked_dist, _ = rerank_ranked("aim", queries, gallery, topk=7, params={"k1": "6", "k2": 2})
    assert ranked_index.shape == ranked_dist.shape == (30, 7)
    assert ranked_index.dtype == np.int64 and ranked_dist.dtype == np.float32
    assert np.all(np.diff(ranked_dist, axis=1) >= 0)
    assert all(len(set(row)) == 7 for row in ranked_index)
    assert ranked_index.min() >= 0 and ranked_index.max() < len(gallery)


@pytest.mark.parametrize("method", ["aim", "sim"])
def test_preset_matches_the_dense_method_with_that_preset(features, method):
    queries, gallery = features
    ranked_index, _, _ = rerank_ranked(method, queries, gallery, topk=5, preset="regdb",
                                    options=RankedOptions(knn="exact", query_k=len(gallery)))
    dist = DENSE[method](queries, gallery, **{"aim": {"k1": 8, "k2": 2}, "sim": {
        "lam": 0.1, "K": 5, "k_graph": 20, "kq": 9, "kg": 20, "alpha": 0.7}}[method])
    np.testing.assert_array_equal(ranked_index, np.argsort(dist, axis=1, kind="stable")[:, :5])


@pytest.mark.parametrize("method, kwargs, message", [
    ("plain", {}, "supports methods"),
    ("aim", {"params": {"k3": 1}}, "unknown parameter 'k3'"),
    ("aim", {"params": {"k1": "many"}}, "must be a number"),
    ("aim", {"params": {"k1": 2.5}}, "must be an integer"),
    ("aim", {"params": {"k1": 400}}, "larger than the gallery size"),
    ("sim", {"params": {"K": 30}}, "K=30 of method sim is larger than k_graph"),
    ("sim", {"variant": "reference"}, "implements the paper variant"),
    ("krr", {"preset": "market"}, "unknown preset"),
    ("krr", {"topk": 321}, "topk=321"),
    ("krr", {"topk": 0}, "topk=0"),
    ("aim", {"options": RankedOptions(query_k=5)}, "query_k=5"),
    ("aim", {"options": RankedOptions(knn="lsh")}, "unknown knn method"),
])
def test_bad_input_raises_input_error(features, method, kwargs, message):
    queries, gallery = features
    kwargs = {"topk": 10, **kwargs}
    with pytest.raises(InputError, match=message):
        rerank_ranked(method, queries, gallery, **kwargs)


def test_dimension_mismatch_is_an_input_error(features):
    queries, gallery = features
    with pytest.raises(InputError, match="d=23"):
        rerank_ranked("krr", queries[:, :23], gallery, topk=5)


def test_cli_topk_writes_ranked_lists(tmp_path, features):
    from vireid.cli import main
    from vireid.features import FeatureSet, save_features

    queries, gallery = features
    path = tmp_path / "features.npz"
    save_features(path, FeatureSet(queries, gallery, np.zeros(30, np.int64), np.zeros(320, np.int64),
                                   np.ones(30, np.int64), np.full(320, 2, np.int64)))
    out = tmp_path / "ranks.npz"
    assert main(["rerank", str(path), "--method", "krr", "--topk", "12", "--knn", "exact",
                 "--param", "k1=8", "--param", "k2=3", "--out", str(out)]) == 0
    saved = np.load(out)
    want = rerank_ranked("krr", queries, gallery, topk=12, params=SMALL_PARAMS["krr"]).ranked_index
    np.testing.assert_array_equal(saved["ranked_index"], want)
    assert saved["ranked_dist"].shape == (30, 12)
    assert main(["rerank", str(path), "--method", "plain", "--topk", "5", "--out", str(out)]) == 2


def test_cli_topk_reports_the_recall_of_each_search(tmp_path, features, capsys):
    import json

    from vireid.cli import main
    from vireid.features import FeatureSet, save_features

    queries, gallery = features
    path = tmp_path / "features.npz"
    save_features(path, FeatureSet(queries, gallery, np.zeros(30, np.int64), np.zeros(320, np.int64),
                                   np.ones(30, np.int64), np.full(320, 2, np.int64)))
    out = tmp_path / "ranks.npz"
    assert main(["rerank", str(path), "--method", "aim", "--topk", "10", "--knn", "hnsw", "--param", "k1=6",
                 "--recall-target", "0.9", "--recall-sample", "10", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    meta = json.loads(str(np.load(out)["meta_json"]))
    assert meta["recall_target"] == 0.9 and [s["name"] for s in meta["searches"]] == ["gallery graph", "query lists"]
    for search in meta["searches"]:
        assert search["method"] in ("hnsw", "exact") and search["sample"] == 10 and search["target"] == 0.9
        line = next(text for text in printed if text.startswith(f"knn {search['name']} "))
        assert f"{search['recall']:.4f}" in line
    assert main(["rerank", str(path), "--method", "aim", "--topk", "10", "--knn", "ivf", "--recall-target", "0",
                 "--out", str(out)]) == 0
    meta = json.loads(str(np.load(out)["meta_json"]))
    assert meta["recall_target"] is None and [s["outcome"] for s in meta["searches"]] == ["fixed", "fixed"]
    assert main(["rerank", str(path), "--method", "aim", "--topk", "10", "--recall-target", "1.5",
                 "--out", str(out)]) == 2
