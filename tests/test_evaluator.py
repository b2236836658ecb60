"""Evaluator (trials, distance hook, precomputed distances, ranked lists) and reports (table, JSON, HTML)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vireid.errors import InputError
from vireid.evaluation.evaluator import (
    evaluate_features,
    evaluate_precomputed,
    evaluate_ranked_lists,
    plain_distance,
)
from vireid.evaluation.metrics import evaluate_distance, get_protocol
from vireid.evaluation.report import (
    evaluation_to_dict,
    feature_rank_lists,
    format_table,
    select_queries,
    top_rank_lists,
    write_result_json,
)
from vireid.features import FeatureSet


def _feature_set(seed: int = 0, trials: int = 3) -> FeatureSet:
    """Identity-clustered features: 8 ids, IR queries (cams 3/6), visible gallery (cams 1/2/4/5), 3 trials."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, 16))
    q_id = np.repeat(np.arange(8), 4)
    g_id = np.repeat(np.arange(8), 8)
    q_cam = np.tile([3, 3, 6, 6], 8)
    g_cam = np.tile([1, 2, 4, 5], 16)
    query = (centres[q_id] + 0.9 * rng.standard_normal((len(q_id), 16))).astype(np.float32)
    gallery = (centres[g_id] + 0.9 * rng.standard_normal((len(g_id), 16))).astype(np.float32)
    trial_gallery = np.stack([np.sort(rng.choice(len(g_id), 40, replace=False)) for _ in range(trials)])
    return FeatureSet(query, gallery, q_id, g_id, q_cam, g_cam, trial_gallery_index=trial_gallery)


def test_plain_distance_is_negative_cosine_in_chunks() -> None:
    fs = _feature_set()
    qn = fs.query_feat / np.linalg.norm(fs.query_feat, axis=1, keepdims=True)
    gn = fs.gallery_feat / np.linalg.norm(fs.gallery_feat, axis=1, keepdims=True)
    chunked = plain_distance(fs.query_feat, fs.gallery_feat, chunk_size=5)
    assert chunked.dtype == np.float32
    np.testing.assert_allclose(chunked, -(qn @ gn.T), atol=1e-6)
    exact = plain_distance(fs.query_feat, fs.gallery_feat, dtype=np.float64)
    np.testing.assert_allclose(exact, -(qn.astype(np.float64) @ gn.astype(np.float64).T), atol=1e-6)


def test_plain_float64_distance_reproduces_golden_plain_metrics(sysu_golden: dict[str, np.ndarray]) -> None:
    z = sysu_golden
    fs = FeatureSet(z["query_feat"], z["gallery_feat"], z["query_id"], z["gallery_id"], z["query_cam"], z["gallery_cam"])
    dist = plain_distance(fs.query_feat, fs.gallery_feat, dtype=np.float64)
    assert np.abs(dist[z["rows"]] - z["dist_plain"]).max() < 1e-12
    result = evaluate_features(fs, "sysu", dtype=np.float64).mean
    np.testing.assert_allclose(result.cmc, z["cmc_plain"], atol=1e-6)
    assert result.mAP == pytest.approx(float(z["mAP_plain"]), abs=1e-9)


@pytest.mark.parametrize("direction", ["v2t", "t2v"])
def test_regdb_plain_features_reproduce_golden_metrics_in_both_directions(regdb_golden: dict[str, np.ndarray],
                                                                          direction: str) -> None:
    z = regdb_golden
    visible = (z["query_feat"], z["query_id"], z["query_cam"])
    thermal = (z["gallery_feat"], z["gallery_id"], z["gallery_cam"])
    query, gallery = (visible, thermal) if direction == "v2t" else (thermal, visible)
    fs = FeatureSet(query[0], gallery[0], query[1], gallery[1], query[2], gallery[2])
    result = evaluate_features(fs, "regdb", dtype=np.float64).mean
    suffix = "" if direction == "v2t" else "_t2v"
    np.testing.assert_allclose(result.cmc, z[f"cmc_plain{suffix}"], atol=1e-6)
    assert result.mAP == pytest.approx(float(z[f"mAP_plain{suffix}"]), abs=1e-9)
    assert result.mINP == pytest.approx(float(z[f"mINP_plain{suffix}"]), abs=1e-9)


def test_trials_are_evaluated_separately_and_averaged() -> None:
    fs = _feature_set()
    evaluation = evaluate_features(fs, "sysu")
    assert len(evaluation.trials) == 3
    for t, result in enumerate(evaluation.trials):
        trial = fs.trial(t)
        direct = evaluate_distance(plain_distance(trial.query_feat, trial.gallery_feat), trial.query_id,
                                   trial.gallery_id, trial.query_cam, trial.gallery_cam, "sysu")
        np.testing.assert_array_equal(result.cmc, direct.cmc)
        assert result.mAP == direct.mAP
    mean = evaluation.mean
    assert mean.mAP == pytest.approx(np.mean([r.mAP for r in evaluation.trials]))
    assert mean.num_queries == 3 * len(fs.query_id)


def test_distance_hook_receives_each_trial_view() -> None:
    fs = _feature_set()
    seen = []

    def hook(trial: FeatureSet) -> np.ndarray:
        seen.append(len(trial.gallery_id))
        return plain_distance(trial.query_feat, trial.gallery_feat)

    evaluation = evaluate_features(fs, "market", distance_fn=hook, distance_info={"method": "custom", "k": 3})
    assert seen == [40, 40, 40]
    assert evaluation.distance == {"method": "custom", "k": 3}
    with pytest.raises(InputError, match=r"trial 0: the distance has shape \(32, 39\)"):
        evaluate_features(fs, "sysu", distance_fn=lambda trial: np.zeros((32, 39)))


def test_precomputed_distance_is_sliced_per_trial() -> None:
    fs = _feature_set()
    full = plain_distance(fs.query_feat, fs.gallery_feat)
    pre = evaluate_precomputed(fs, full, "llcm")
    computed = evaluate_features(fs, "llcm")
    for a, b in zip(pre.trials, computed.trials):
        np.testing.assert_array_equal(a.cmc, b.cmc)
        assert a.mAP == pytest.approx(b.mAP, abs=1e-12)
    assert pre.distance["method"] == "precomputed"
    with pytest.raises(InputError, match=r"shape \(32, 63\) does not match"):
        evaluate_precomputed(fs, full[:, :-1], "llcm", source="D.npy")
    full[3, 5] = np.inf
    with pytest.raises(InputError, match="non-finite value inf"):
        evaluate_precomputed(fs, full, "regdb", source="D.npy")


def test_ranked_lists_over_file_rows_are_restricted_to_each_trial() -> None:
    fs = _feature_set()
    full = plain_distance(fs.query_feat, fs.gallery_feat)
    ranked = np.argsort(full, axis=1, kind="stable")
    by_lists = evaluate_ranked_lists(fs, ranked, "sysu")
    by_distance = evaluate_precomputed(fs, full, "sysu")
    for a, b in zip(by_lists.trials, by_distance.trials):
        np.testing.assert_array_equal(a.cmc, b.cmc)
        assert a.mAP == pytest.approx(b.mAP, abs=1e-12)
    assert by_lists.distance == {"method": "ranked", "source": "ranked_index", "list_length": 64}
    with pytest.raises(InputError, match="R.npz: ranked_index has 31 rows"):
        evaluate_ranked_lists(fs, ranked[:-1], "sysu", source="R.npz")


def test_table_prints_percent_and_json_holds_fractions(tmp_path) -> None:
    evaluation = evaluate_features(_feature_set(), "sysu", distance_info={"method": "aim", "variant": "reference",
                                                                         "params": {"k1": 4, "k2": 1}})
    table = format_table([("aim", evaluation.mean)])
    mean = evaluation.mean
    assert f"{100 * mean.mAP:.2f}" in table and f"{100 * mean.rank(1):.2f}" in table
    assert table.splitlines()[0].split()[:5] == ["method", "R1", "R5", "R10", "R20"]
    write_result_json(tmp_path / "r.json", evaluation)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data == json.loads(json.dumps(evaluation_to_dict(evaluation)))
    assert len(data["cmc"]) == 20 and data["mAP"] == pytest.approx(mean.mAP)
    assert data["protocol"]["name"] == "sysu" and data["protocol"]["num_trials"] == 3
    assert data["distance"]["params"] == {"k1": 4, "k2": 1}
    assert len(data["trials"]) == 3 and "num_skipped" in data["trials"][0]
    assert not list(tmp_path.glob(".*tmp"))


def test_top_rank_lists_apply_the_protocol_removal() -> None:
    dist = np.array([[0.1, 0.2, 0.3, 0.4]])
    g_id, g_cam = np.array([5, 6, 5, 7]), np.array([2, 1, 1, 4])
    (lst,) = top_rank_lists(dist, np.array([5]), g_id, np.array([3]), g_cam, get_protocol("sysu"), [0],
                            query_paths=["q.jpg"], gallery_paths=["a", "b", "c", "d"], top=2)
    assert lst.gallery_paths == ["b", "c"] and lst.matches == [False, True]
    assert lst.gallery_ids == [6, 5] and lst.gallery_cams == [1, 1] and lst.distances == [0.2, 0.3]
    assert (lst.query_row, lst.query_id, lst.query_cam, lst.query_path) == (0, 5, 3, "q.jpg")
    picked = select_queries(100, 5, seed=1)
    assert len(set(picked.tolist())) == 5 and np.array_equal(picked, select_queries(100, 5, seed=1))


def test_feature_rank_lists_with_and_without_image_paths() -> None:
    fs = _feature_set().trial(0)
    dist = plain_distance(fs.query_feat, fs.gallery_feat)
    bare = feature_rank_lists(fs, dist, get_protocol("sysu"), count=4, seed=2)
    assert all(lst.query_path is None and lst.gallery_paths == [None] * 10 for lst in bare)
    fs.extras["query_path"] = np.array([f"q{i}.jpg" for i in range(len(fs.query_id))])
    fs.extras["gallery_path"] = np.array([f"g{i}.jpg" for i in range(len(fs.gallery_id))])
    lists = feature_rank_lists(fs, dist, get_protocol("sysu"), count=4, seed=2, top=10, image_root="/data")
    assert len(lists) == 4 and all(len(lst.gallery_paths) == 10 for lst in lists)
    assert all(lst.distances == sorted(lst.distances) for lst in lists)
    assert [lst.gallery_ids for lst in lists] == [lst.gallery_ids for lst in bare]
    first = lists[0]
    assert first.query_path == f"/data/q{first.query_row}.jpg"
    assert first.gallery_paths[0].startswith("/data/g")
    with pytest.raises(InputError, match=r"expected \(Q, G\)"):
        feature_rank_lists(fs, dist[:, :-1], get_protocol("sysu"))


def test_overlapping_trials_share_one_plain_distance() -> None:
    fs = _feature_set(trials=6)  # 6 trials x 40 of 64 gallery rows: the union is smaller than their sum
    evaluation = evaluate_features(fs, "sysu")
    for t, result in enumerate(evaluation.trials):
        trial = fs.trial(t)
        direct = evaluate_distance(plain_distance(trial.query_feat, trial.gallery_feat), trial.query_id,
                                   trial.gallery_id, trial.query_cam, trial.gallery_cam, "sysu")
        np.testing.assert_array_equal(result.cmc, direct.cmc)
        assert result.mAP == pytest.approx(direct.mAP, abs=1e-12)


def test_disjoint_trials_compute_their_own_plain_distance() -> None:
    fs = _feature_set(trials=2)
    fs.trial_query_index = np.stack([np.arange(0, 32, 2), np.arange(1, 32, 2)])  # union area > sum of trials
    fs.trial_gallery_index = np.stack([np.arange(0, 64, 2), np.arange(1, 64, 2)])
    evaluation = evaluate_features(fs, "market")
    for t, result in enumerate(evaluation.trials):
        trial = fs.trial(t)
        direct = evaluate_distance(plain_distance(trial.query_feat, trial.gallery_feat), trial.query_id,
                                   trial.gallery_id, trial.query_cam, trial.gallery_cam, "market")
        np.testing.assert_array_equal(result.cmc, direct.cmc)
        assert result.num_queries == 16
