"""``vireid rerank``: writes the API's distance atomically; bad input is one line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vireid.cli import main
from vireid.features import save_features
from vireid.retrieval import rerank
from vireid.retrieval.synthetic import synthetic_features


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rerank") / "features.npz"
    save_features(path, synthetic_features(30, 45, 16, num_ids=9, seed=5))
    return path


def test_writes_the_api_distance(feature_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dist.npy"
    code = main(["rerank", str(feature_file), "--method", "sim", "--preset", "regdb", "--param", "kq=5",
                 "--variant", "reference", "--dtype", "float64", "--out", str(out)])
    assert code == 0
    written = np.load(out)
    z = np.load(feature_file)
    want = rerank("sim", z["query_feat"], z["gallery_feat"], variant="reference", preset="regdb",
                  params={"kq": 5}, dtype=np.float64)
    assert written.dtype == np.float64 and written.shape == (30, 45)
    np.testing.assert_array_equal(written, want)
    assert "kq=5" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["dist.npy"]


def test_default_is_float32(feature_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain.npy"
    assert main(["rerank", str(feature_file), "--method", "plain", "--out", str(out)]) == 0
    assert np.load(out).dtype == np.float32


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "aim", "--param", "k1=1000"], "larger than the gallery size (45)"),
    (["--method", "aim", "--param", "kk=3"], "unknown parameter 'kk'"),
    (["--method", "sgr", "--param", "K=25"], "larger than k_graph"),
    (["--method", "krr", "--param", "lam=high"], "must be a number"),
    (["--method", "krr", "--param", "lam"], "expected NAME=VALUE"),
    (["--method", "nope"], "unknown re-ranking method"),
    (["--method", "sim", "--preset", "market"], "unknown preset"),
])
def test_bad_parameters_exit_2_with_one_line(feature_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            args: list[str], message: str) -> None:
    out = tmp_path / "dist.npy"
    code = main(["rerank", str(feature_file), *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_missing_feature_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["rerank", str(tmp_path / "absent.npz"), "--method", "plain", "--out", str(tmp_path / "d.npy")])
    assert code == 2
    assert "not found" in capsys.readouterr().err
