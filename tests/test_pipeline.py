"""End to end on the synthetic SYSU layout: synth -> train -> `vireid extract` -> `vireid evaluate`, and the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vireid.cli import main
from vireid.data.synthetic import SynthConfig, render_dataset
from vireid.engine.config import load_train_config
from vireid.engine.trainer import train
from vireid.features import load_features

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny synthetic SYSU tree and a one-epoch baseline trained on it."""
    base = tmp_path_factory.mktemp("pipeline")
    root = base / "sysu"
    render_dataset(SynthConfig("sysu", num_ids=15, seed=3, images_per_camera=2, height=64, width=32), root)
    cfg = load_train_config(REPO / "configs" / "baseline_synthetic_tiny.yaml", [
        f"data.root={root}", "data.val_ids=0", f"output_dir={base / 'run'}", "epochs=1", "progress_bar=false"])
    train(cfg)
    return root, base / "run"


def test_extract_writes_multi_trial_features_that_evaluate_reads(trained_run: tuple[Path, Path], tmp_path: Path) -> None:
    root, run = trained_run
    out = tmp_path / "features.npz"
    assert main(["extract", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--protocol", "sysu",
                 "--protocol-param", "permutations=seeded", "--out", str(out), "--flip"]) == 0
    features = load_features(out)
    assert features.num_trials == 10
    assert features.meta["protocol"]["name"].startswith("sysu")
    assert set(np.unique(features.query_cam)) <= {3, 6}
    assert set(np.unique(features.gallery_cam)) <= {1, 2, 4, 5}
    for t in range(features.num_trials):
        trial = features.trial(t)
        # single-shot: one gallery image per (identity, camera)
        pairs = set(zip(trial.gallery_id.tolist(), trial.gallery_cam.tolist()))
        assert len(pairs) == len(trial.gallery_id)
    assert np.isfinite(features.query_feat).all() and features.query_feat.shape[1] == features.gallery_feat.shape[1]
    assert all((root / p).is_file() for p in features.extras["gallery_path"])
    assert features.validation is None                                # the run held no identities out

    report = tmp_path / "result.json"
    assert main(["evaluate", str(out), "--protocol", "sysu", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert 1 <= len(result["cmc"]) <= 20 and 0.0 <= result["mAP"] <= 1.0  # CMC length: min(20, gallery size)
    assert result["protocol"]["num_trials"] == 10


@pytest.fixture(scope="module")
def held_out_run(trained_run: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """The same tree, a one-epoch baseline that held 3 training identities out for validation."""
    root, _ = trained_run
    run = tmp_path_factory.mktemp("held_out") / "run"
    cfg = load_train_config(REPO / "configs" / "baseline_synthetic_tiny.yaml", [
        f"data.root={root}", "data.val_ids=3", "data.val_seed=5", f"output_dir={run}", "epochs=1",
        "eval.period=0", "progress_bar=false"])
    return root, run, train(cfg)


def test_extract_writes_validation_identities_under_the_same_protocol_rule(
        held_out_run: tuple[Path, Path, dict], tmp_path: Path) -> None:
    from vireid.data.datasets import build_dataset
    from vireid.engine.validation import split_validation_identities

    root, run, summary = held_out_run
    out = tmp_path / "features.npz"
    assert main(["extract", "--checkpoint", str(run), "--protocol", "sysu", "--protocol-param",
                 "permutations=seeded", "--out", str(out)]) == 0
    features = load_features(out)
    val = features.validation
    dataset = build_dataset("sysu", root)
    train_part, held_out = split_validation_identities(list(dataset.train), 3, 5)
    held_ids = {r.pid for r in held_out}
    assert summary["num_val_ids"] == 3 and set(val.query_id) | set(val.gallery_id) == held_ids
    assert held_ids.isdisjoint(features.query_id) and held_ids.isdisjoint({r.pid for r in train_part})
    assert val.num_trials == features.num_trials == 10 and features.meta["validation"]["num_ids"] == 3
    assert set(np.unique(val.query_cam)) <= {3, 6} and set(np.unique(val.gallery_cam)) <= {1, 2, 4, 5}
    expected_queries = sorted(str(r.path.relative_to(root)) for r in held_out if r.cam in (3, 6))
    with np.load(out) as z:
        assert "val_query_feat" in z.files and "val_trial_gallery_index" in z.files
    for t in range(val.num_trials):                                 # single-shot: one image per (id, camera)
        trial = val.trial(t)
        pairs = set(zip(trial.gallery_id.tolist(), trial.gallery_cam.tolist()))
        assert len(pairs) == len(trial.gallery_id)
        assert pairs == {(r.pid, r.cam) for r in held_out if r.cam in (1, 2, 4, 5)}
    assert len(val.query_id) == len(expected_queries)

    skipped = tmp_path / "no_val.npz"
    assert main(["extract", "--checkpoint", str(run), "--protocol", "sysu", "--protocol-param",
                 "permutations=seeded", "--out", str(skipped), "--no-validation"]) == 0
    assert load_features(skipped).validation is None


def test_extract_rejects_unknown_protocol_parameter(trained_run: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _, run = trained_run
    code = main(["extract", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--protocol", "sysu",
                 "--protocol-param", "shot=10", "--out", str(tmp_path / "f.npz")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "shot" in err and "shots" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "f.npz").exists()


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path: Path) -> None:
    """`vireid demo --quick` (what CI runs): table, results.json, report.html; training beats chance."""
    env = {**os.environ, "VIREID_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "vireid", "demo", "--quick", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"plain", "aim", "sim", "krr"}
    for entry in results["methods"].values():
        assert len(entry["cmc"]) == 20 and 0.0 <= entry["mAP"] <= 1.0 and entry["wall_time_s"] > 0
    for method in ("aim", "sim", "krr"):                        # preset and tuned on the validation identities
        entry = results["methods"][method]
        assert entry["distance"]["preset"] == "sysu" and entry["tuned"]["distance"]["tuned_on"] == "val"
        tuning = entry["tuned"]["tuning"]
        assert entry["tuned"]["params"] == tuning["chosen"] == entry["tuned"]["distance"]["params"]
        assert tuning["validation_score"] >= tuning["base_validation_score"]
    assert results["validation"]["num_ids"] == 12 and "tuned on val" in proc.stdout
    trained, untrained = results["methods"]["plain"]["cmc"][0], results["untrained"]["cmc"][0]
    assert trained > untrained + 0.05, (trained, untrained)
    html = (out / "report.html").read_text()
    assert 'id="cmc-figure"' in html and "data:image/jpeg;base64," in html
    assert "plain" in proc.stdout and "mAP" in proc.stdout
