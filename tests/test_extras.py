"""The optional extras: without ``serve`` or ``train`` installed, the base commands still import and
run, and a command that needs a missing extra says in one line which extra to install."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from vireid.engine import trainer
from vireid.extras import OPTIONAL, MissingExtra, require

SERVE_AND_TRAIN = tuple(OPTIONAL)
_BLOCK = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None  # import raises ImportError\n"


def _run_without(names: tuple[str, ...], code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _BLOCK.format(names=names) + code],
                          capture_output=True, text=True, timeout=300)


def test_the_extras_match_pyproject() -> None:
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for module, (extra, package) in OPTIONAL.items():
        assert any(req.startswith(package) for req in extras[extra]), (module, extra)
        assert not any(req.startswith(package) for req in project["dependencies"]), package
    assert set(extras["all"]) == {"vireid[serve,train]"}


def test_base_modules_import_without_the_extras() -> None:
    code = ("import vireid.cli, vireid.retrieval, vireid.evaluation.report, vireid.engine.trainer, vireid.engine.demo\n"
            "import vireid.serve.index, vireid.serve.encoder\nprint('ok')")
    done = _run_without(SERVE_AND_TRAIN, code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_serve_without_the_serve_extra_says_which_extra_in_one_line(tmp_path: Path) -> None:
    code = f"from vireid.cli import main\nsys.exit(main(['serve', {str(tmp_path)!r}]))"
    done = _run_without(("fastapi",), code)
    assert done.returncode == 2
    assert done.stderr == ("vireid serve: error: vireid serve needs fastapi, which is not installed: "
                           "pip install 'vireid[serve]'\n")


def test_require_names_the_pypi_package_and_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "python_multipart", None)
    with pytest.raises(MissingExtra, match=r"^uploads needs python-multipart, which is not installed: "
                                           r"pip install 'vireid\[serve\]'$"):
        require("python_multipart", "uploads")
    assert require("onnx", "export") is sys.modules["onnx"]


def test_training_without_tensorboard_logs_one_warning_and_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with caplog.at_level(logging.WARNING, logger="vireid"):
        assert trainer._summary_writer(tmp_path / "tb", None) is None
    assert [r.getMessage() for r in caplog.records] == [
        "TensorBoard logging needs tensorboard, which is not installed: pip install 'vireid[train]'; "
        "training goes on without it"]
    assert not (tmp_path / "tb").exists()


def test_onnx_model_without_onnxruntime_says_which_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vireid.serve.encoder import OnnxEncoder

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtra, match=r"running the ONNX model .*model\.onnx needs onnxruntime.*vireid\[serve\]"):
        OnnxEncoder(tmp_path / "model.onnx")


@pytest.mark.parametrize("command", [
    ["rerank", "{features}", "--method", "sim", "--out", "{out}/d.npy"],
    ["rerank", "{features}", "--method", "krr", "--topk", "10", "--knn", "ivf", "--out", "{out}/r.npz"],
    ["evaluate", "{features}", "--rerank", "plain,aim,sim,krr", "--protocol", "regdb", "--html", "{out}/r.html"],
])
def test_retrieval_commands_never_import_torch_or_the_extras(tmp_path: Path, command: list[str]) -> None:
    """PyTorch alone costs over a second and ~650 MiB at start-up; re-ranking and evaluation need none of it.
    numba (about 0.85 s to import and load SGR's kernel) only pays for itself on large SGR inputs."""
    from vireid.features import save_features
    from vireid.retrieval.synthetic import synthetic_features

    save_features(tmp_path / "f.npz", synthetic_features(40, 80, 32, num_ids=8, seed=0))
    argv = [part.format(features=tmp_path / "f.npz", out=tmp_path) for part in command] + ["-q"]
    code = (f"import sys\nfrom vireid.cli import main\nrc = main({argv!r})\n"
            "print(rc, sorted(m for m in ('torch', 'torchvision', 'timm', *{names!r}) if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code.replace("{names!r}", repr((*SERVE_AND_TRAIN, "numba")))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "0 []"
