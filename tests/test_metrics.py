"""Chunked CMC / mAP / mINP: golden reference outputs, a per-query loop oracle, ranked lists, ties."""

from __future__ import annotations

import numpy as np
import pytest

from vireid.errors import InputError
from vireid.evaluation.metrics import (
    PROTOCOLS,
    EvalResult,
    count_kept_positives,
    evaluate_distance,
    evaluate_ranked,
    get_protocol,
    mean_result,
    score_distance,
    stable_argsort,
)

@pytest.mark.parametrize("golden, protocol", [("sysu_golden", "sysu"), ("regdb_golden", "regdb")])
def test_every_golden_distance_reproduces_reference_metrics(request: pytest.FixtureRequest, golden: str,
                                                            protocol: str) -> None:
    z = request.getfixturevalue(golden)
    methods = sorted(k[len("dist_"):] for k in z if k.startswith("dist_"))
    assert len(methods) >= 6
    for method in methods:
        _check_golden(z, protocol, method)


def test_regdb_thermal_to_visible_reproduces_reference_metrics(regdb_golden: dict[str, np.ndarray]) -> None:
    """AGW's thermal->visible call: the transposed matrix, query and gallery ids swapped."""
    z = regdb_golden
    methods = sorted(k[len("cmc_"):-len("_t2v")] for k in z if k.startswith("cmc_") and k.endswith("_t2v"))
    assert len(methods) == 6
    swapped = {**z, "query_id": z["gallery_id"], "gallery_id": z["query_id"], "query_cam": z["gallery_cam"],
               "gallery_cam": z["query_cam"]}
    for method in methods:
        _check_golden(swapped, "regdb", f"{method}_t2v")


def _check_golden(z: dict[str, np.ndarray], protocol: str, method: str) -> None:
    """``ranking_<M>`` orders every query's gallery exactly as the reference ``dist_<M>`` did."""
    result = evaluate_distance(z[f"ranking_{method}"], z["query_id"], z["gallery_id"], z["query_cam"],
                               z["gallery_cam"], protocol, chunk_size=37)
    assert result.cmc.dtype == np.float32
    np.testing.assert_allclose(result.cmc, z[f"cmc_{method}"], rtol=0, atol=1e-6, err_msg=method)
    assert result.mAP == pytest.approx(float(z[f"mAP_{method}"]), abs=1e-9), method
    assert result.mINP == pytest.approx(float(z[f"mINP_{method}"]), abs=1e-9), method
    assert result.num_queries == len(z["query_id"])


def test_sysu_golden_skips_the_edge_identity(sysu_golden: dict[str, np.ndarray]) -> None:
    z = sysu_golden
    result = evaluate_distance(z["ranking_plain"], z["query_id"], z["gallery_id"], z["query_cam"], z["gallery_cam"], "sysu")
    edge_cam3 = int(((z["query_id"] == z["edge_pid"]) & (z["query_cam"] == 3)).sum())
    assert edge_cam3 == 3
    assert (result.num_queries, result.num_valid, result.num_skipped) == (414, 411, 3)


def _oracle(dist: np.ndarray, q_id: np.ndarray, g_id: np.ndarray, q_cam: np.ndarray, g_cam: np.ndarray,
            protocol: str, max_rank: int = 20, ranked: np.ndarray | None = None) -> tuple[np.ndarray, float, float, int]:
    """Straightforward per-query evaluation, written from the protocol descriptions."""
    rule = get_protocol(protocol)
    max_rank = min(max_rank, len(g_id))
    cmc_rows, aps, inps = [], [], []
    for i in range(len(q_id)):
        kept_all = ~rule.remove(q_id[i], q_cam[i], g_id, g_cam)
        num_pos = int((kept_all & (g_id == q_id[i])).sum())
        if num_pos == 0:
            continue
        order = np.argsort(dist[i], kind="stable") if ranked is None else ranked[i][ranked[i] >= 0]
        order = order[kept_all[order]]
        matches = g_id[order] == q_id[i]
        if rule.cmc_kind == "identity":
            seen: list[int] = []
            for gid in g_id[order]:
                if gid not in seen:
                    seen.append(gid)
            hit = np.array(seen) == q_id[i]
        else:
            hit = matches
        curve = np.cumsum(hit) > 0
        curve = np.concatenate([curve, np.full(max(max_rank - len(curve), 0), curve[-1] if len(curve) else False)])
        cmc_rows.append(curve[:max_rank])
        positions = np.flatnonzero(matches) + 1
        aps.append(sum((k + 1) / p for k, p in enumerate(positions)) / num_pos)
        inps.append(len(positions) / positions[-1] if len(positions) == num_pos else 0.0)
    cmc = np.asarray(cmc_rows, dtype=np.float32).sum(0) / np.float32(len(aps))
    return cmc, float(np.mean(aps)), float(np.mean(inps)), len(aps)


def _random_set(seed: int, num_queries: int = 60, num_gallery: int = 90, num_ids: int = 12):
    rng = np.random.default_rng(seed)
    q_id = rng.integers(0, num_ids, num_queries)
    g_id = rng.integers(0, num_ids + 2, num_gallery)  # some gallery-only identities
    q_cam = rng.choice([3, 6, 1], num_queries)
    g_cam = rng.choice([1, 2, 4, 5, 3], num_gallery)
    dist = rng.standard_normal((num_queries, num_gallery))
    return dist, q_id, g_id, q_cam, g_cam


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_matches_per_query_oracle(protocol: str, chunk_size: int | None) -> None:
    dist, q_id, g_id, q_cam, g_cam = _random_set(seed=3)
    result = evaluate_distance(dist, q_id, g_id, q_cam, g_cam, protocol, chunk_size=chunk_size)
    cmc, mAP, mINP, num_valid = _oracle(dist, q_id, g_id, q_cam, g_cam, protocol)
    np.testing.assert_array_equal(result.cmc, cmc)
    assert result.mAP == pytest.approx(mAP, abs=1e-12)
    assert result.mINP == pytest.approx(mINP, abs=1e-12)
    assert result.num_valid == num_valid


def test_protocol_rules_differ_as_documented() -> None:
    q_id, q_cam = np.array([7]), np.array([3])
    g_id, g_cam = np.array([7, 7, 8, 7]), np.array([2, 3, 2, 1])
    sysu, market, regdb = (get_protocol(p).remove(q_id[:, None], q_cam[:, None], g_id, g_cam)[0]
                           for p in ("sysu", "market", "regdb"))
    assert sysu.tolist() == [True, False, True, False]  # every cam-2 item, whatever its identity
    assert market.tolist() == [False, True, False, False]  # same identity and camera only
    assert not regdb.any()
    assert get_protocol("llcm").remove is get_protocol("market").remove
    assert (get_protocol("llcm").cmc_kind, get_protocol("market").cmc_kind) == ("identity", "image")


def test_identity_and_image_cmc_differ_beyond_rank_one() -> None:
    # ranking: id 1, id 1, id 2, id 0 (query id 0): image rank 4, identity rank 3
    dist = np.array([[0.1, 0.2, 0.3, 0.4]])
    args = (np.array([0]), np.array([1, 1, 2, 0]), np.array([1]), np.array([2, 2, 2, 2]))
    image = evaluate_distance(dist, *args, protocol="market", max_rank=4)
    identity = evaluate_distance(dist, *args, protocol="llcm", max_rank=4)
    assert image.cmc.tolist() == [0, 0, 0, 1]
    assert identity.cmc.tolist() == [0, 0, 1, 1]
    assert image.mAP == identity.mAP == pytest.approx(1 / 4)


def test_ties_are_broken_by_gallery_row() -> None:
    dist, q_id, g_id, q_cam, g_cam = _random_set(seed=5)
    dist = np.round(dist, 1)  # many exact ties
    order = stable_argsort(dist)
    np.testing.assert_array_equal(order, np.argsort(dist, axis=1, kind="stable"))
    for protocol in PROTOCOLS:
        result = evaluate_distance(dist, q_id, g_id, q_cam, g_cam, protocol, chunk_size=5)
        cmc, mAP, mINP, _ = _oracle(dist, q_id, g_id, q_cam, g_cam, protocol)
        np.testing.assert_array_equal(result.cmc, cmc)
        assert (result.mAP, result.mINP) == pytest.approx((mAP, mINP), abs=1e-12)


def test_full_ranked_lists_equal_dense_evaluation() -> None:
    dist, q_id, g_id, q_cam, g_cam = _random_set(seed=11)
    for protocol in PROTOCOLS:
        dense = evaluate_distance(dist, q_id, g_id, q_cam, g_cam, protocol)
        ranked = evaluate_ranked(np.argsort(dist, axis=1, kind="stable"), q_id, g_id, q_cam, g_cam, protocol,
                                 chunk_size=4)
        np.testing.assert_array_equal(ranked.cmc, dense.cmc)
        assert (ranked.mAP, ranked.mINP, ranked.num_valid) == (dense.mAP, dense.mINP, dense.num_valid)


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_truncated_ranked_lists_count_missing_positives_as_not_retrieved(protocol: str) -> None:
    dist, q_id, g_id, q_cam, g_cam = _random_set(seed=13)
    ranked = np.argsort(dist, axis=1, kind="stable")[:, :15].copy()
    ranked[::4, -3:] = -1  # padded rows
    result = evaluate_ranked(ranked, q_id, g_id, q_cam, g_cam, protocol, chunk_size=8)
    cmc, mAP, mINP, num_valid = _oracle(dist, q_id, g_id, q_cam, g_cam, protocol, ranked=ranked)
    np.testing.assert_array_equal(result.cmc, cmc)
    assert (result.mAP, result.mINP) == pytest.approx((mAP, mINP), abs=1e-12)
    assert result.num_valid == num_valid
    dense = evaluate_distance(dist, q_id, g_id, q_cam, g_cam, protocol)
    assert result.mAP < dense.mAP


def test_ranked_list_ap_uses_all_gallery_positives() -> None:
    # query id 0 has 4 positives; the list holds 2 of them at ranks 1 and 3
    ranked = np.array([[0, 4, 1]])
    g_id = np.array([0, 0, 0, 0, 5])
    result = evaluate_ranked(ranked, np.array([0]), g_id, np.array([1]), np.full(5, 2), "regdb", max_rank=3)
    assert result.mAP == pytest.approx((1 / 1 + 2 / 3) / 4)
    assert result.mINP == 0.0
    assert result.cmc.tolist() == [1, 1, 1]


@pytest.mark.parametrize("ranked, message", [
    (np.array([[0, 1, 1]]), "more than once"),
    (np.array([[0, 9]]), "outside"),
    (np.array([[0], [1]]), "rows"),
    (np.array([[0.0, 1.0]]), "integer"),
])
def test_bad_ranked_lists_raise_input_error(ranked: np.ndarray, message: str) -> None:
    with pytest.raises(InputError, match=message):
        evaluate_ranked(ranked, np.array([0]), np.array([0, 1, 2]), np.array([1]), np.array([2, 2, 2]), "regdb")


def test_count_kept_positives_matches_brute_force() -> None:
    _, q_id, g_id, q_cam, g_cam = _random_set(seed=17)
    for protocol in PROTOCOLS.values():
        brute = ((g_id[None, :] == q_id[:, None])
                 & ~protocol.remove(q_id[:, None], q_cam[:, None], g_id[None, :], g_cam[None, :])).sum(1)
        np.testing.assert_array_equal(count_kept_positives(q_id, g_id, q_cam, g_cam, protocol), brute)


def test_small_gallery_truncates_cmc_like_the_reference() -> None:
    dist = np.array([[0.3, 0.1, 0.2]])
    result = evaluate_distance(dist, np.array([4]), np.array([4, 5, 6]), np.array([1]), np.array([2, 2, 2]), "sysu")
    assert result.cmc.tolist() == [0, 0, 1]
    assert result.rank(20) == 1.0


def test_invalid_queries_are_skipped_and_counted() -> None:
    dist = np.array([[0.1, 0.2], [0.2, 0.1]])
    result = evaluate_distance(dist, np.array([1, 9]), np.array([1, 2]), np.array([1, 1]), np.array([2, 2]), "regdb")
    assert (result.num_queries, result.num_valid, result.num_skipped) == (2, 1, 1)
    assert result.cmc[0] == 1.0
    with pytest.raises(InputError, match="no query has a true match"):
        evaluate_distance(dist, np.array([8, 9]), np.array([1, 2]), np.array([1, 1]), np.array([2, 2]), "regdb")


@pytest.mark.parametrize("kwargs, message", [
    ({"query_id": np.array([1, 2, 3])}, "query_id has 3 entries"),
    ({"gallery_cam": np.array([1.0, 2.0])}, "gallery_cam must be a 1-D integer"),
    ({"dist": np.array([[0.1, np.nan]])}, "NaN at row 0, column 1"),
    ({"dist": np.zeros((0, 2)), "query_id": np.zeros(0, int), "query_cam": np.zeros(0, int)}, "empty"),
    ({"protocol": "sysu-mm01"}, "unknown protocol 'sysu-mm01'"),
])
def test_bad_input_raises_input_error(kwargs: dict, message: str) -> None:
    args = {"dist": np.array([[0.1, 0.2]]), "query_id": np.array([1]), "gallery_id": np.array([1, 2]),
            "query_cam": np.array([1]), "gallery_cam": np.array([2, 2]), "protocol": "regdb"} | kwargs
    with pytest.raises(InputError, match=message):
        evaluate_distance(**args)


def test_result_dict_holds_fractions_and_counts() -> None:
    dist, q_id, g_id, q_cam, g_cam = _random_set(seed=19)
    data = evaluate_distance(dist, q_id, g_id, q_cam, g_cam, "sysu").to_dict()
    assert set(data) == {"cmc", "mAP", "mINP", "num_queries", "num_valid", "num_skipped"}
    assert len(data["cmc"]) == 20 and all(0.0 <= v <= 1.0 for v in data["cmc"])
    assert 0.0 < data["mAP"] <= 1.0 and data["num_skipped"] == data["num_queries"] - data["num_valid"]


def test_mean_result_averages_trials() -> None:
    a = EvalResult(np.array([0.5, 1.0], np.float32), 0.4, 0.2, 10, 9)
    b = EvalResult(np.array([0.7, 0.8], np.float32), 0.6, 0.4, 10, 10)
    mean = mean_result([a, b])
    np.testing.assert_allclose(mean.cmc, [0.6, 0.9], atol=1e-7)
    assert (mean.mAP, mean.mINP, mean.num_queries, mean.num_valid) == pytest.approx((0.5, 0.3, 20, 19))


def test_score_distance_reads_memory_mapped_input(tmp_path) -> None:
    dist, q_id, g_id, q_cam, g_cam = _random_set(seed=23)
    np.save(tmp_path / "d.npy", dist)
    mapped = np.load(tmp_path / "d.npy", mmap_mode="r")
    scores = score_distance(mapped, q_id, g_id, q_cam, g_cam, "llcm", chunk_size=9)
    direct = score_distance(dist, q_id, g_id, q_cam, g_cam, "llcm")
    np.testing.assert_array_equal(scores.match_rank, direct.match_rank)
    np.testing.assert_array_equal(scores.ap, direct.ap)


def test_peak_memory_grows_with_the_chunk_not_with_q_times_g() -> None:
    import tracemalloc

    rng = np.random.default_rng(29)
    num_queries, num_gallery = 4000, 500
    dist = rng.standard_normal((num_queries, num_gallery)).astype(np.float32)
    q_id, g_id = rng.integers(0, 50, num_queries), rng.integers(0, 50, num_gallery)
    q_cam, g_cam = rng.choice([3, 6], num_queries), rng.choice([1, 2, 4, 5], num_gallery)
    tracemalloc.start()
    try:
        score_distance(dist, q_id, g_id, q_cam, g_cam, "sysu", chunk_size=100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full_argsort_bytes = num_queries * num_gallery * 8
    assert peak < full_argsort_bytes / 4


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int64])
def test_stable_argsort_equals_numpy_stable_sort_for_every_dtype(dtype: type) -> None:
    rng = np.random.default_rng(31)
    block = np.round(rng.standard_normal((40, 300)) * 20).astype(dtype)  # many ties
    if np.issubdtype(dtype, np.floating):
        block[0, :6] = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45], dtype=np.float64).astype(dtype)
    np.testing.assert_array_equal(stable_argsort(block), np.argsort(block, axis=1, kind="stable"))
