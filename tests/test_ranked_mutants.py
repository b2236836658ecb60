"""Ranked-list re-ranking (retrieval/ranked.py) corner cases: a single candidate per query, a pool
whose squared distances all stay below 1, the seeded row-maximum sample, progress output and the
names in error messages."""

from __future__ import annotations

import re

import numpy as np
import pytest

from test_ranked import SMALL_PARAMS

from vireid import progress
from vireid.errors import InputError
from vireid.retrieval.aim import aim
from vireid.retrieval.kreciprocal import krr
from vireid.retrieval import ranked
from vireid.retrieval.ranked import RankedOptions, rerank_ranked



@pytest.fixture(scope="module")
def features() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((20, 16))
    gallery = np.repeat(centres, 6, axis=0) + 0.6 * rng.standard_normal((120, 16))
    queries = centres[rng.integers(0, 20, 12)] + 0.7 * rng.standard_normal((12, 16))
    return queries, gallery


def test_aim_with_one_nearest_item_per_query_finds_the_dense_best(features) -> None:
    """query_k = topk = 1: the bound on items outside the query's nearest uses its only entry."""
    queries, gallery = features
    got, got_dist, _ = rerank_ranked("aim", queries, gallery, topk=1, params=SMALL_PARAMS["aim"],
                                     options=RankedOptions(knn="exact", query_k=1))
    dense = aim(queries, gallery, **SMALL_PARAMS["aim"])
    np.testing.assert_array_equal(got[:, 0], np.argmin(dense, axis=1))
    np.testing.assert_allclose(got_dist[:, 0], dense.min(axis=1), atol=2e-6)


def test_krr_on_a_tight_cluster_equals_the_dense_method() -> None:
    """Every pool pair closer than 60 degrees: the row maxima of squared distances are below 1
    (only a tiny floor may guard them)."""
    rng = np.random.default_rng(2)
    centre = rng.standard_normal(16)
    centre /= np.linalg.norm(centre)
    gallery = centre + 0.08 * rng.standard_normal((90, 16))
    queries = centre + 0.08 * rng.standard_normal((10, 16))
    pool = np.concatenate([queries, gallery])
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    assert (2.0 - 2.0 * (pool @ pool.T).min(axis=1)).max() < 0.5
    params = SMALL_PARAMS["krr"]
    got, got_dist, _ = rerank_ranked("krr", queries, gallery, topk=15, params=params,
                                     options=RankedOptions(knn="exact", query_k=90))
    dense = krr(queries, gallery, **params)
    order = np.argsort(dense, axis=1, kind="stable")[:, :15]
    np.testing.assert_array_equal(got, order)
    np.testing.assert_allclose(got_dist, np.take_along_axis(dense, order, axis=1), atol=2e-6)


def test_krr_row_maxima_sample_follows_the_seed(features) -> None:
    """A pool larger than ``sample_size``: the sample is drawn with ``options.seed``, so a run is
    reproducible (and the sample matters: another seed moves the distances)."""
    queries, gallery = features
    runs = [rerank_ranked("krr", queries, gallery, topk=10, params=SMALL_PARAMS["krr"],
                          options=RankedOptions(knn="exact", sample_size=12, seed=seed)) for seed in (4, 4, 5)]
    np.testing.assert_array_equal(runs[0].ranked_index, runs[1].ranked_index)
    np.testing.assert_array_equal(runs[0].ranked_dist, runs[1].ranked_dist)
    assert not np.array_equal(runs[0].ranked_dist, runs[2].ranked_dist)


@pytest.mark.parametrize("method", ["aim", "sim", "krr"])
def test_progress_lines_name_the_steps_and_stay_off_when_disabled(features, method, monkeypatch, capsys) -> None:
    queries, gallery = features
    monkeypatch.setattr(progress, "_bars_enabled", True)
    rerank_ranked(method, queries, gallery, topk=5, params=SMALL_PARAMS[method],
                  options=RankedOptions(knn="exact", progress=True))
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith(f"{method} re-ranking: ") for line in lines), lines
    assert any(line.startswith("query knn: ") for line in lines), lines
    rerank_ranked(method, queries, gallery, topk=5, params=SMALL_PARAMS[method],
                  options=RankedOptions(knn="exact", progress=False))
    # log records of the searches may reach stderr when an earlier test set up console logging; no bar may
    bars = [line for line in capsys.readouterr().err.splitlines() if not re.match(r"\d\d:\d\d:\d\d [A-Z]+ ", line)]
    assert bars == []


def test_non_finite_query_features_are_named(features) -> None:
    queries, gallery = features
    queries = queries.copy()
    queries[3, 2] = np.nan
    with pytest.raises(InputError, match=r"^query features contains non-finite values"):
        rerank_ranked("aim", queries, gallery, topk=5)


def test_take_topk_breaks_ties_at_the_kth_by_gallery_row_like_a_full_sort() -> None:
    rng = np.random.default_rng(4)
    for _ in range(200):
        n, k = int(rng.integers(2, 30)), int(rng.integers(1, 30))
        cand = rng.permutation(1000)[:n]
        dist = rng.integers(0, 3, size=n).astype(np.float32)          # many ties
        expected = sorted(zip(dist.tolist(), cand.tolist()))[:k]
        got_cand, got_dist = ranked._take_topk(cand, dist, k)
        assert list(zip(got_dist.tolist(), got_cand.tolist())) == expected


def test_top_1_is_the_first_of_top_2_with_duplicate_gallery_images() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((60, 16))
    gallery, queries = np.concatenate([base, base[:30]]), rng.standard_normal((20, 16))
    params, options = {"k1": 8, "k2": 3, "lam": 0.3}, ranked.RankedOptions(knn="exact", query_k=90)
    top1 = ranked.rerank_ranked("krr", queries, gallery, topk=1, params=params, options=options).ranked_index
    top2 = ranked.rerank_ranked("krr", queries, gallery, topk=2, params=params, options=options).ranked_index
    np.testing.assert_array_equal(top1[:, 0], top2[:, 0])
