"""Single-query re-ranking (retrieval/single.py): one row equals the batch function's row
(``variant="paper"``, the presets' parameters), and a gallery grown by enrolments equals a gallery
built in one go."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from vireid.errors import InputError
from vireid.retrieval import rerank
from vireid.retrieval.graph import NeighbourGraph
from vireid.retrieval.kreciprocal import half_reciprocal_sets
from vireid.retrieval.gallery_state import SINGLE_QUERY_METHODS, GalleryState, SingleQueryParams, StateDelta
from vireid.retrieval.single import l2_normalize_rows, rank_single


@pytest.fixture(scope="module")
def golden(sysu_golden) -> tuple[np.ndarray, np.ndarray]:
    return sysu_golden["query_feat"][::9], l2_normalize_rows(sysu_golden["gallery_feat"])


@pytest.mark.parametrize("preset", [None, "sysu", "regdb"])
def test_every_method_equals_the_batch_function_row_by_row(golden, preset: str | None) -> None:
    queries, gallery = golden
    params = SingleQueryParams.resolve(preset)
    state = GalleryState.build(gallery, params, knn="exact")
    for method in SINGLE_QUERY_METHODS:
        single = rank_single(method, queries, gallery, state=state)
        batch = rerank(method, queries, gallery, variant="paper", params=dict(params.method(method)) if method != "plain" else {})
        np.testing.assert_allclose(single, batch, atol=2e-6, err_msg=f"{method}, preset {preset}")


def test_parameters_come_from_the_presets() -> None:
    sysu, regdb = SingleQueryParams.resolve("sysu"), SingleQueryParams.resolve("regdb")
    assert dict(sysu.aim) == {"k1": 4, "k2": 1} and dict(regdb.aim) == {"k1": 8, "k2": 2}
    assert dict(regdb.sim) == {"lam": 0.1, "K": 5, "k_graph": 20, "kq": 9, "kg": 20, "alpha": 0.7}
    assert dict(SingleQueryParams.resolve().aim) == {"k1": 30, "k2": 6}  # the batch default, not a second one
    tuned = SingleQueryParams.resolve("sysu", {"aim": {"k1": "7"}})
    assert tuned.aim["k1"] == 7 and tuned.aim["k2"] == 1
    assert SingleQueryParams.from_dict(tuned.to_dict(), source="x") == tuned
    for bad, match in (({"aim": {"k9": 1}}, "unknown parameter"), ({"best": {}}, "unknown re-ranking"),
                       ({"aim": {"k1": 2, "k2": 5}}, "larger than k1")):
        with pytest.raises(InputError, match=match):
            SingleQueryParams.resolve(None, bad)
    with pytest.raises(InputError, match="unknown preset"):
        SingleQueryParams.resolve("sysu-outdoor")


@pytest.mark.parametrize("recent_rows", [1024, 30])  # changed rows in the recent layer only, or folded too
def test_a_grown_gallery_equals_one_built_at_once(golden, recent_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from vireid.retrieval import gallery_state

    monkeypatch.setattr(gallery_state, "_RECENT_ROWS", recent_rows)
    queries, gallery = golden
    params = SingleQueryParams.resolve("sysu-multishot")  # k1 20 / k2 6: every structure non-trivial
    state = GalleryState.build(gallery[:900], params, knn="exact")
    n = 900
    stored = []
    for step in (1, 1, 4, 1, 13, 2, 1):
        state, delta = state.extend(gallery, step)
        n += step
        assert delta is not None and delta.n == n
        stored.append(StateDelta.from_arrays(delta.arrays()))
        assert delta.changed_rows() < 120 * step + 300  # rows near the new items, not the gallery (6 × n rows)
    assert (len(state.stores["aim"].settled) > 0) == (recent_rows < 1024)
    full = GalleryState.build(gallery[:n], params, knn="exact")
    replayed = GalleryState.build(gallery[:900], params, knn="exact")
    for delta in stored:
        replayed = replayed.apply(delta)
    compacted = GalleryState.from_base_arrays(state.compacted().base_arrays(), params)
    for method in SINGLE_QUERY_METHODS:
        expected = rank_single(method, queries, gallery[:n], state=full)
        for grown in (state, replayed, compacted):
            np.testing.assert_allclose(rank_single(method, queries, gallery[:n], state=grown), expected, atol=1e-6,
                                       err_msg=method)


def test_an_older_version_still_ranks_after_a_newer_one_shares_its_layers(golden, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request still holding the previous version runs after the next enrolment's version has
    ranked (the service does this under concurrent enrolments): both equal their own full build."""
    from vireid.retrieval import gallery_state

    monkeypatch.setattr(gallery_state, "_RECENT_ROWS", 30)  # rows fold into a settled layer both versions share
    queries, gallery = golden
    params = SingleQueryParams.resolve("sysu-multishot")
    state = GalleryState.build(gallery[:900], params, knn="exact")
    for step in (13, 13):
        state, _ = state.extend(gallery, step)
    older, n_old = state, 926
    newer, _ = older.extend(gallery, 1)
    assert newer.stores["aim"].settled is older.stores["aim"].settled
    full_newer = GalleryState.build(gallery[:n_old + 1], params, knn="exact")
    for method in SINGLE_QUERY_METHODS:
        newest = rank_single(method, queries, gallery[:n_old + 1], state=newer)
        previous = rank_single(method, queries, gallery[:n_old], state=older)
        np.testing.assert_allclose(previous, rank_single(method, queries, gallery[:n_old],
                                                         state=GalleryState.build(gallery[:n_old], params, knn="exact")),
                                   atol=1e-6, err_msg=method)
        again = rank_single(method, queries, gallery[:n_old + 1], state=newer)  # after the older version ran
        np.testing.assert_allclose(again, newest, atol=0, err_msg=method)
        np.testing.assert_allclose(newest, rank_single(method, queries, gallery[:n_old + 1], state=full_newer),
                                   atol=1e-6, err_msg=method)


def test_many_new_items_or_a_small_gallery_recompute_everything(golden) -> None:
    queries, gallery = golden
    params = SingleQueryParams.resolve()
    tiny = GalleryState.build(gallery[:3], params, knn="exact")
    assert tiny.effective.aim["k1"] == 3 and tiny.effective.mnnr["kg"] == 2
    grown, delta = tiny.extend(gallery, 2)  # the neighbourhood sizes grow with the gallery
    assert delta is None and grown.effective.aim["k1"] == 5
    big, delta = GalleryState.build(gallery[:500], params, knn="exact").extend(gallery, 300)
    assert delta is None
    full = GalleryState.build(gallery[:800], params, knn="exact")
    for method in ("aim", "sim", "krr"):
        np.testing.assert_allclose(rank_single(method, queries, gallery[:800], state=big),
                                   rank_single(method, queries, gallery[:800], state=full), atol=1e-6)


def test_galleries_smaller_than_the_neighbourhoods_still_rank(golden) -> None:
    queries, gallery = golden
    for n in (1, 2, 5):
        state = GalleryState.build(gallery[:n], SingleQueryParams.resolve(), knn="exact")
        for method in SINGLE_QUERY_METHODS:
            dist = rank_single(method, queries[:3], gallery[:n], state=state)
            assert dist.shape == (3, n) and np.isfinite(dist).all(), method


def test_half_reciprocal_rows_equal_the_batch_sets() -> None:
    feats = l2_normalize_rows(np.random.default_rng(0).standard_normal((300, 16)))
    state = GalleryState.build(feats, SingleQueryParams.resolve(), knn="exact")
    index, sim = state.graph.dense()
    expected = half_reciprocal_sets(NeighbourGraph(index, sim), 10)
    got = state.stores["half10"].dense_csr()
    assert (abs(got - expected) > 0).nnz == 0 and isinstance(got, sp.csr_matrix)
