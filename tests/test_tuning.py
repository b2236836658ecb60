"""Re-ranking parameters chosen on the validation identities: the grid search, its isolation from
the test set, the feature file's ``val_*`` keys and ``vireid evaluate --rerank … --tune-on val``."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from vireid.cli import main
from vireid.errors import InputError
from vireid.evaluation import tuning as tuning_module
from vireid.evaluation.evaluator import evaluate_features
from vireid.evaluation.metrics import EvalResult
from vireid.evaluation.tuning import grid_points, preset_and_tuned, tune_rerank
from vireid.features import FeatureSet, load_features, save_features
from vireid.retrieval import METHODS, rerank
from vireid.retrieval.synthetic import synthetic_features


def _set(seed: int, num_query: int = 40, num_gallery: int = 60, num_ids: int = 12) -> FeatureSet:
    return synthetic_features(num_query, num_gallery, 16, num_ids=num_ids, seed=seed, noise=1.0)


@pytest.fixture()
def with_validation() -> FeatureSet:
    features = _set(1)
    features.validation = _set(2)
    return features


def _result(mAP: float, r1: float = 0.5) -> EvalResult:
    return EvalResult(cmc=np.array([r1, 1.0]), mAP=mAP, mINP=mAP / 2, num_queries=10, num_valid=10)


class _Scored:
    """Stands in for :func:`evaluate_rerank`: a known score per parameter point, every call recorded."""

    def __init__(self, score) -> None:
        self.score = score
        self.calls: list[tuple[FeatureSet, dict]] = []

    def __call__(self, features, protocol, settings, **_):
        self.calls.append((features, dict(settings.params)))
        mAP, r1 = self.score(settings.params)
        return type("Evaluation", (), {"mean": _result(mAP, r1)})()


def test_grid_search_picks_the_argmax_of_a_constructed_score(monkeypatch: pytest.MonkeyPatch,
                                                              with_validation: FeatureSet) -> None:
    """mAP is a bowl around lam 0.1, K 3, kq 4, kg 5, alpha 0.6; rank-1 peaks at K 1, alpha 0.3. The search
    must evaluate every grid point, the preset first, and pick the bowl's bottom by mAP, the other by r1."""
    target = {"lam": 0.1, "K": 3, "kq": 4, "kg": 5, "alpha": 0.6}

    def score(p: dict) -> tuple[float, float]:
        mAP = 0.9 - (np.log10(p["lam"]) + 1) ** 2 / 10 - sum((p[k] - target[k]) ** 2 / 100 for k in ("K", "kq", "kg")) \
            - (p["alpha"] - 0.6) ** 2
        r1 = 0.9 - abs(p["K"] - 1) / 10 - abs(p["alpha"] - 0.3)
        return mAP, r1

    spy = _Scored(score)
    monkeypatch.setattr(tuning_module, "evaluate_rerank", spy)
    by_map = tune_rerank(with_validation.validation, "sysu", "sim", preset="sysu")
    assert by_map.chosen == {**target, "k_graph": 20}
    grid = METHODS["sim"].grid
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    assert len(by_map.points) == len(combos)                     # the preset is a grid point: not repeated
    assert by_map.points[0]["params"] == by_map.base and by_map.base["K"] == 9   # … and evaluated first
    assert by_map.best["score"] == pytest.approx(max(score(c)[0] for c in combos))
    assert {tuple(sorted(p.items())) for _, p in spy.calls} == {
        tuple(sorted({**c, "k_graph": 20}.items())) for c in combos}
    by_r1 = tune_rerank(with_validation.validation, "sysu", "sim", preset="sysu", metric="r1")
    assert (by_r1.chosen["K"], by_r1.chosen["alpha"]) == (1, 0.3)


def test_a_tie_keeps_the_preset_and_fixed_parameters_are_not_searched(monkeypatch: pytest.MonkeyPatch,
                                                                        with_validation: FeatureSet) -> None:
    spy = _Scored(lambda p: (0.5, 0.5))
    monkeypatch.setattr(tuning_module, "evaluate_rerank", spy)
    result = tune_rerank(with_validation.validation, "sysu", "aim", preset="sysu", fixed={"k2": "2"})
    assert result.chosen == {"k1": 4, "k2": 2}                      # preset k1, fixed k2; every score equal
    assert {params["k2"] for _, params in spy.calls} == {2}
    assert result.grid == {"k1": [2, 4, 8, 20, 30]}
    assert result.to_dict()["base_validation_score"] == 0.5


def test_grid_points_put_the_base_first_without_duplicates() -> None:
    points = grid_points({"k1": 4, "k2": 1}, {"k1": [2, 4], "k2": [1]})
    assert points == [{"k1": 4, "k2": 1}, {"k1": 2, "k2": 1}]


def test_tuning_never_reads_test_rows(monkeypatch: pytest.MonkeyPatch, with_validation: FeatureSet) -> None:
    """Two files with the same validation identities and different test sets give the same search,
    point by point; every array the search re-ranks belongs to the validation set."""
    other = _set(7)
    other.validation = with_validation.validation
    first = preset_and_tuned(with_validation, "sysu", "krr", preset="sysu")
    second = preset_and_tuned(other, "sysu", "krr", preset="sysu")
    assert first.tuning.points == second.tuning.points and first.tuning.chosen == second.tuning.chosen
    assert first.preset.mean.mAP != second.preset.mean.mAP           # the test sets do differ

    seen: list[np.ndarray] = []
    real_rerank = tuning_module.rerank
    monkeypatch.setattr(tuning_module, "rerank", lambda method, q, g, **kw: seen.append(q) or real_rerank(
        method, q, g, **kw))
    tune_rerank(with_validation.validation, "sysu", "aim")
    assert seen and all(np.shares_memory(q, with_validation.validation.query_feat) or
                        np.array_equal(q, with_validation.validation.query_feat) for q in seen)
    assert not any(q.shape == with_validation.query_feat.shape and np.array_equal(q, with_validation.query_feat)
                   for q in seen)


def test_tuned_test_result_is_the_evaluation_with_the_chosen_values(with_validation: FeatureSet) -> None:
    both = preset_and_tuned(with_validation, "sysu", "aim", preset="sysu")
    chosen = both.tuning.chosen
    direct = evaluate_features(with_validation, "sysu", distance_fn=lambda t: rerank(
        "aim", t.query_feat, t.gallery_feat, params=chosen)).mean
    assert both.tuned.mean.mAP == pytest.approx(direct.mAP, abs=1e-12)
    preset = evaluate_features(with_validation, "sysu", distance_fn=lambda t: rerank(
        "aim", t.query_feat, t.gallery_feat, preset="sysu")).mean
    assert both.preset.mean.mAP == pytest.approx(preset.mAP, abs=1e-12)
    scores = [point["score"] for point in both.tuning.points]
    assert both.tuning.best["score"] == max(scores) and both.tuning.base_score == scores[0]


def test_points_invalid_for_the_validation_gallery_are_skipped(with_validation: FeatureSet) -> None:
    small = with_validation.validation.select_rows(np.arange(40), np.arange(25))
    result = tune_rerank(small, "sysu", "aim")
    assert all(point["params"]["k1"] <= 25 for point in result.points)
    reasons = {(s["params"]["k1"], s["params"]["k2"]): s["reason"] for s in result.skipped}
    assert set(reasons) == {(30, 6), (30, 1), (30, 2), (2, 6), (4, 6)}   # the base (30, 6) and k2 > k1
    assert "gallery size (25)" in reasons[(30, 1)] and "larger than k1" in reasons[(2, 6)]
    with pytest.raises(InputError, match="no grid point is valid"):
        tune_rerank(small, "sysu", "aim", grid={"k1": [26, 40]}, fixed={"k1": 30})
    with pytest.raises(InputError, match="unknown tuning metric"):
        tune_rerank(small, "sysu", "aim", metric="rank1")


def test_validation_keys_round_trip_and_incomplete_sets_are_one_line_errors(with_validation: FeatureSet,
                                                                             tmp_path: Path) -> None:
    path = tmp_path / "f.npz"
    save_features(path, with_validation)
    with np.load(path) as z:
        assert {"val_query_feat", "val_gallery_feat", "val_query_id", "val_gallery_id", "val_query_cam",
                "val_gallery_cam"} <= set(z.files)
        arrays = {k: z[k] for k in z.files}
    loaded = load_features(path)
    np.testing.assert_array_equal(loaded.validation.gallery_feat, with_validation.validation.gallery_feat)
    assert not any(key.startswith("val_") for key in loaded.extras)
    np.savez(tmp_path / "partial.npz", **{k: v for k, v in arrays.items() if k != "val_gallery_cam"})
    with pytest.raises(InputError, match="validation features are incomplete: missing key.s. val_gallery_cam"):
        load_features(tmp_path / "partial.npz")
    np.savez(tmp_path / "wide.npz", **{**arrays, "val_query_feat": np.ones((40, 8), np.float32)})
    with pytest.raises(InputError, match="val_query_feat has d=8"):
        load_features(tmp_path / "wide.npz")


def test_cli_tune_on_val_prints_and_writes_preset_and_tuned(with_validation: FeatureSet, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "f.npz"
    save_features(path, with_validation)
    out = tmp_path / "r.json"
    assert main(["evaluate", str(path), "--protocol", "sysu", "--rerank", "aim,krr", "--preset", "sysu",
                 "--tune-on", "val", "--tune-metric", "r1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "aim (sysu)" in printed and "aim (tuned on val: k1=" in printed and "krr (tuned on val" in printed
    data = json.loads(out.read_text())
    assert data["tune"] == {"on": "val", "metric": "r1"} and set(data["methods"]) == {"aim", "krr"}
    for method in ("aim", "krr"):
        entry = data["methods"][method]
        tuning = entry["tuned"]["tuning"]
        assert set(tuning) >= {"grid", "chosen", "metric", "points", "validation_score", "base_validation_score"}
        assert entry["tuned"]["distance"]["params"] == tuning["chosen"] and tuning["metric"] == "r1"
        assert entry["preset"]["distance"]["preset"] == "sysu"
        assert tuning["validation_score"] == max(point["score"] for point in tuning["points"])
        direct = evaluate_features(with_validation, "sysu", distance_fn=lambda t, m=method, c=tuning["chosen"]: rerank(
            m, t.query_feat, t.gallery_feat, params=c)).mean
        assert entry["tuned"]["mAP"] == pytest.approx(direct.mAP, abs=1e-12)


def test_cli_several_methods_without_tuning(with_validation: FeatureSet, tmp_path: Path) -> None:
    path = tmp_path / "f.npz"
    save_features(path, with_validation)
    out = tmp_path / "r.json"
    assert main(["evaluate", str(path), "--protocol", "sysu", "--rerank", "plain,sgr", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["tune"] is None and data["methods"]["sgr"]["distance"]["method"] == "sgr"


@pytest.mark.parametrize("options, message", [
    (["--rerank", "aim", "--tune-on", "val"], "no validation features (keys val_query_feat"),
    (["--tune-on", "val"], "--tune-on only apply with --rerank"),
    (["--rerank", "aim", "--tune-metric", "r1"], "--tune-metric only applies with --tune-on"),
    (["--rerank", "aim,krr", "--param", "k1=4"], "--param applies to one method"),
    (["--rerank", "aim,,krr"], "expected distinct method names"),
    (["--rerank", "aim,smi", "--tune-on", "val"], "did you mean 'sim'"),
])
def test_cli_tuning_errors_are_one_line(tmp_path: Path, options: list[str], message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "f.npz"
    save_features(path, _set(1))                                       # no validation features
    assert main(["evaluate", str(path), "--protocol", "sysu", *options]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_validation_protocol_applies_the_test_rule_to_held_out_records() -> None:
    from vireid.data.protocols import build_validation_protocol
    from vireid.data.records import ImageRecord, Modality

    records = [ImageRecord(Path(f"/d/{pid}/{cam}_{i}.jpg"), pid, cam, Modality.INFRARED if cam in (3, 6) else Modality.VISIBLE)
               for pid in (7, 9) for cam in (1, 2, 3, 4, 6) for i in range(3)]
    sysu = build_validation_protocol("sysu", records, permutations="seeded", shots=1)
    assert len(sysu.trials) == 10 and sysu.metric == "sysu"
    assert all({r.cam for r in t.query} <= {3, 6} and len(t.gallery) == 2 * 3 for t in sysu.trials)  # 1 per (id, cam)
    regdb = build_validation_protocol("regdb", records, direction="thermal-visible", trials=[2, 3])
    assert len(regdb.trials) == 1 and all(r.modality == Modality.INFRARED for r in regdb.trials[0].query)
    assert len(regdb.trials[0].gallery) == 2 * 3 * 3
    market = build_validation_protocol("market", records, query_modality=Modality.VISIBLE)
    assert {r.modality for r in market.trials[0].query} == {Modality.VISIBLE} and len(market.trials[0].gallery) == 12
    llcm = build_validation_protocol("llcm", records, trials=[0])
    assert {r.cam for r in llcm.trials[0].query} == {3, 6}
    with pytest.raises(InputError, match="unknown protocol 'sysuu'"):
        build_validation_protocol("sysuu", records)
    with pytest.raises(InputError, match="protocol sysu: unknown parameter 'shot'"):
        build_validation_protocol("sysu", records, shot=1)


def test_max_trials_uses_the_first_validation_trials_only() -> None:
    val = _set(3, num_gallery=60)
    rows = np.arange(60)
    trials = np.stack([rows[t::3] for t in range(3)])                    # three disjoint galleries of 20
    val = val.select_rows(np.arange(40), rows, trial_gallery_index=trials)
    two = val.select_rows(np.arange(40), rows, trial_gallery_index=trials[:2])
    got = tune_rerank(val, "sysu", "aim", grid={"k1": [2, 4, 8], "k2": [1]}, max_trials=2)
    want = tune_rerank(two, "sysu", "aim", grid={"k1": [2, 4, 8], "k2": [1]})
    assert got.points == want.points and got.num_trials == 2
    assert got.points != tune_rerank(val, "sysu", "aim", grid={"k1": [2, 4, 8], "k2": [1]}).points
    with pytest.raises(InputError, match="max_trials must be >= 1"):
        tune_rerank(val, "sysu", "aim", max_trials=0)
