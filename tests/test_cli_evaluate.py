"""``vireid evaluate``: golden files as input, JSON output, precomputed distances, ranked lists, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vireid.cli import main

KEYS = ("query_feat", "gallery_feat", "query_id", "gallery_id", "query_cam", "gallery_cam")


@pytest.fixture()
def small_npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((6, 8))
    q_id, g_id = np.repeat(np.arange(6), 3), np.repeat(np.arange(6), 4)
    arrays = {
        "query_feat": (centres[q_id] + 0.5 * rng.standard_normal((18, 8))).astype(np.float32),
        "gallery_feat": (centres[g_id] + 0.5 * rng.standard_normal((24, 8))).astype(np.float32),
        "query_id": q_id, "gallery_id": g_id,
        "query_cam": np.tile([3, 6, 3], 6), "gallery_cam": np.tile([1, 2, 4, 5], 6),
    }
    path = tmp_path / "features.npz"
    np.savez(path, **arrays)
    return path


def _rewrite(path: Path, **changes: np.ndarray | None) -> Path:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    out = path.with_name(f"changed_{'_'.join(changes)}_{len(list(path.parent.glob('changed_*')))}.npz")
    np.savez(out, **arrays)
    return out


def test_golden_file_with_its_distance_gives_the_reference_metrics(golden_dir: Path, sysu_golden, tmp_path: Path,
                                                                   capsys) -> None:
    z = sysu_golden
    np.save(tmp_path / "sim.npy", z["ranking_sim"])
    expected = {"cmc": z["cmc_sim"], "mAP": float(z["mAP_sim"]), "mINP": float(z["mINP_sim"])}
    out = tmp_path / "result.json"
    code = main(["evaluate", str(golden_dir / "sysu_like.npz"), "--protocol", "sysu",
                 "--distance", str(tmp_path / "sim.npy"), "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"{100 * expected['mAP']:.2f}" in printed and "skipped 3 of 414" in printed
    data = json.loads(out.read_text())
    np.testing.assert_allclose(data["cmc"], expected["cmc"], atol=1e-6)
    assert data["mAP"] == pytest.approx(expected["mAP"], abs=1e-9)
    assert data["mINP"] == pytest.approx(expected["mINP"], abs=1e-9)
    assert (data["num_valid"], data["num_skipped"]) == (411, 3)
    assert data["protocol"]["name"] == "sysu" and data["distance"]["method"] == "precomputed"


def test_default_plain_distance_on_golden_file(golden_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert main(["evaluate", str(golden_dir / "regdb_like.npz"), "--protocol", "regdb", "--dtype", "float64",
                 "--json", str(out)]) == 0
    with np.load(golden_dir / "regdb_like.npz") as z:
        assert json.loads(out.read_text())["mAP"] == pytest.approx(float(z["mAP_plain"]), abs=1e-9)


def test_ranked_lists_from_file(small_npz: Path, tmp_path: Path) -> None:
    with np.load(small_npz) as z:
        qn = z["query_feat"] / np.linalg.norm(z["query_feat"], axis=1, keepdims=True)
        gn = z["gallery_feat"] / np.linalg.norm(z["gallery_feat"], axis=1, keepdims=True)
    dist = -(qn @ gn.T)
    np.savez(tmp_path / "ranks.npz", ranked_index=np.argsort(dist, axis=1)[:, :24], ranked_dist=np.sort(dist, axis=1))
    np.save(tmp_path / "d.npy", dist)
    assert main(["evaluate", str(small_npz), "--protocol", "market", "--ranked", str(tmp_path / "ranks.npz"),
                 "--json", str(tmp_path / "a.json")]) == 0
    assert main(["evaluate", str(small_npz), "--protocol", "market", "--distance", str(tmp_path / "d.npy"),
                 "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-7) and a["cmc"] == pytest.approx(b["cmc"], abs=1e-7)
    assert a["distance"]["method"] == "ranked"


def _bad_cases(small: Path, tmp: Path) -> list[tuple[list[str], str]]:
    with np.load(small) as z:
        q = z["query_feat"]
    nan_q = q.copy()
    nan_q[2, 1] = np.nan
    np.save(tmp / "wrong_shape.npy", np.zeros((18, 23)))
    np.save(tmp / "nan.npy", np.full((18, 24), np.nan))
    np.savez(tmp / "no_ranks.npz", ranked=np.zeros((18, 3), int))
    cases = [
        ([str(_rewrite(small, gallery_cam=None))], "missing key(s) gallery_cam"),
        ([str(_rewrite(small, query_feat=nan_q))], "query_feat has a non-finite value (nan) at row 2"),
        ([str(_rewrite(small, gallery_feat=np.zeros((24, 5), np.float32)))], "feature dimensions differ"),
        ([str(_rewrite(small, query_id=np.arange(17)))], "query_id has 17 entries"),
        ([str(_rewrite(small, query_feat=np.zeros((0, 8), np.float32), query_id=np.zeros(0, np.int64),
                       query_cam=np.zeros(0, np.int64)))], "query_feat is empty"),
        ([str(small), "--distance", str(tmp / "wrong_shape.npy")], "wrong_shape.npy: shape (18, 23)"),
        ([str(small), "--distance", str(tmp / "nan.npy")], "nan.npy: non-finite value nan"),
        ([str(small), "--distance", str(tmp / "absent.npy")], "absent.npy: distance file not found"),
        ([str(small), "--ranked", str(tmp / "no_ranks.npz")], "missing key ranked_index"),
        ([str(small), "--preset", "sysu"], "--preset only apply with --rerank"),
        ([str(tmp / "absent.npz")], "feature file not found"),
    ]
    return cases


def test_bad_input_prints_one_line_and_exits_2(small_npz: Path, tmp_path: Path, capsys) -> None:
    for argv, message in _bad_cases(small_npz, tmp_path):
        code = main(["evaluate", *argv, "--protocol", "sysu"])
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_help_explains_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--protocol", "--json", "--distance", "--ranked", "--rerank", "--variant", "--preset",
                   "--param", "--dtype", "--max-rank"):
        assert option in text


def test_console_script_subprocess(small_npz: Path, tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("vireid")
    ok = subprocess.run([str(script), "evaluate", str(small_npz), "--protocol", "llcm"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "R1" in ok.stdout and "plain" in ok.stdout
    bad = subprocess.run([str(script), "evaluate", str(_rewrite(small_npz, query_cam=None)), "--protocol", "llcm"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "query_cam" in bad.stderr


def test_rerank_then_evaluate_records_method_and_parameters(golden_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "aim.json"
    assert main(["evaluate", str(golden_dir / "sysu_like.npz"), "--protocol", "sysu", "--rerank", "aim",
                 "--variant", "reference", "--param", "k1=4", "--param", "k2=1", "--dtype", "float64",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["distance"] == {"method": "aim", "variant": "reference", "preset": None,
                                "params": {"k1": 4, "k2": 1}, "dtype": "float64"}
    with np.load(golden_dir / "sysu_like.npz") as z:
        np.testing.assert_allclose(data["cmc"], z["cmc_aim_4_1"], atol=1e-6)
        assert data["mAP"] == pytest.approx(float(z["mAP_aim_4_1"]), abs=1e-9)
        assert data["mINP"] == pytest.approx(float(z["mINP_aim_4_1"]), abs=1e-9)


@pytest.mark.parametrize("options, message", [
    (["--rerank", "aim", "--param", "k1=100"], "larger than the gallery size"),
    (["--rerank", "aim", "--param", "k1"], "expected NAME=VALUE"),
    (["--rerank", "aim", "--param", "k3=2"], "unknown parameter 'k3'"),
    (["--rerank", "sim", "--param", "alpha=high"], "must be a number"),
    (["--rerank", "aimm"], "did you mean 'aim'"),
])
def test_bad_rerank_options_exit_2(small_npz: Path, options: list[str], message: str, capsys) -> None:
    assert main(["evaluate", str(small_npz), "--protocol", "sysu", *options]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_xiv_feature_file_uses_the_xiv_distance(small_npz: Path, tmp_path: Path) -> None:
    from vireid.evaluation.evaluator import evaluate_features
    from vireid.features import load_features
    from vireid.models.methods.xiv import xiv_distance

    rng = np.random.default_rng(1)
    with np.load(small_npz) as z:
        gallery_x = z["gallery_feat"] + 0.3 * rng.standard_normal(z["gallery_feat"].shape).astype(np.float32)
    path = _rewrite(small_npz, gallery_feat_x=gallery_x)
    out = tmp_path / "xiv.json"
    assert main(["evaluate", str(path), "--protocol", "sysu", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["distance"]["method"] == "xiv"
    expected = evaluate_features(load_features(path), "sysu", distance_fn=xiv_distance).mean
    assert data["mAP"] == pytest.approx(expected.mAP, abs=1e-12)


def test_multi_trial_file_prints_every_trial_and_the_mean(small_npz: Path, tmp_path: Path, capsys) -> None:
    trials = np.stack([np.arange(0, 24, 2), np.arange(1, 24, 2), np.arange(12)])
    path = _rewrite(small_npz, trial_gallery_index=trials)
    out = tmp_path / "trials.json"
    assert main(["evaluate", str(path), "--protocol", "llcm", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(f"trial {t}" in printed for t in range(3)) and "plain, mean" in printed
    data = json.loads(out.read_text())
    assert data["protocol"]["num_trials"] == 3 and len(data["trials"]) == 3
    assert data["mAP"] == pytest.approx(np.mean([t["mAP"] for t in data["trials"]]))
