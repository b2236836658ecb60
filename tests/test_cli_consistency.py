"""The same option means the same thing on every command: ``--threads``, ``--device``, ``-q`` / ``-v``;
progress output that a redirected log can read; ``vireid evaluate`` taking its metric rule from the
feature file's metadata."""

from __future__ import annotations

import argparse
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from test_cli_polish import _parsers
from vireid.cli import build_parser, configure_console_logging, main
from vireid.features import FeatureSet, save_features

#: commands that compute (torch, onnxruntime, BLAS or faiss), as the words that reach their parser
COMPUTING = {("demo",), ("train",), ("extract",), ("evaluate",), ("rerank",), ("export",), ("index", "build"),
             ("index", "add"), ("search",), ("serve",), ("ssft-reconstruct",)}
#: commands that run a torch model on a device of the user's choice
TORCH_MODEL = {("demo",), ("train",), ("extract",), ("ssft-reconstruct",)}
THREADS_MEANING = "CPU threads for torch, onnxruntime, BLAS and faiss"
DEVICE_MEANING = "torch device the model runs on: auto (cuda if available, else cpu), cpu, cuda or cuda:N"


@pytest.fixture(autouse=True)
def _console_back_to_normal() -> Iterator[None]:
    """Each test starts and ends with the default console (INFO, progress bars on)."""
    configure_console_logging(0)
    yield
    configure_console_logging(0)


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def _meaning(help_text: str) -> str:
    """A help text without its ``(default: …)`` tail."""
    return help_text.split(" (default:")[0]


# ------------------------------------------------------------------------------------- the options


def test_every_computing_command_has_one_threads_option_with_one_meaning() -> None:
    parsers = dict(_parsers(build_parser(), ()))
    found = {path for path, parser in parsers.items() if _option(parser, "--threads") is not None}
    assert found == COMPUTING
    for path in COMPUTING:
        action = _option(parsers[path], "--threads")
        assert action.type is int and _meaning(action.help) == THREADS_MEANING, path
        if path == ("serve",):     # requests run in parallel: one thread each, said in --help
            assert action.default == 1 and "(default: 1: requests run in parallel" in action.help
        elif path == ("train",):   # the config's threads, else all cores; the option overrides it
            assert action.default is None and "the config's threads, else all available cores" in action.help
        else:
            assert action.default is None and action.help.endswith("(default: all available cores)"), path


def test_every_torch_model_command_has_one_device_option_with_one_meaning() -> None:
    parsers = dict(_parsers(build_parser(), ()))
    found = {path for path, parser in parsers.items() if _option(parser, "--device") is not None}
    assert found == TORCH_MODEL
    for path in TORCH_MODEL:
        action = _option(parsers[path], "--device")
        assert _meaning(action.help) == DEVICE_MEANING, path
        assert action.default == (None if path == ("train",) else "auto"), path


def test_every_parser_has_quiet_and_verbose_with_the_same_help() -> None:
    helps: dict[str, set[str]] = {"-q": set(), "-v": set()}
    for path, parser in _parsers(build_parser(), ()):
        for short, long in (("-q", "--quiet"), ("-v", "--verbose")):
            action = _option(parser, short)
            assert action is not None and long in action.option_strings, (path, short)
            helps[short].add(action.help)
    assert helps == {"-q": {"print warnings and errors only: no progress bars, no informational log lines"},
                     "-v": {"also print debug log lines"}}


@pytest.mark.parametrize("words", [["-q", "evaluate", "F.npz"], ["evaluate", "-q", "F.npz"],
                                   ["evaluate", "F.npz", "--quiet"], ["-q", "index", "build", "--model", "m.onnx",
                                                                       "--images", "d", "--out", "i"],
                                   ["index", "-q", "build", "--model", "m.onnx", "--images", "d", "--out", "i"]])
def test_quiet_is_read_before_or_after_the_command(words: list[str]) -> None:
    args = build_parser().parse_args(words)
    assert getattr(args, "quiet", False) is True and getattr(args, "verbose", False) is False


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "CPU", "cuda:"])
def test_a_bad_device_is_one_line_naming_the_value(value: str, tmp_path: Path, capsys) -> None:
    code = main(["extract", "--checkpoint", str(tmp_path / "none.pt"), "--protocol", "sysu",
                 "--out", str(tmp_path / "f.npz"), "--device", value])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and repr(value) in err and "auto, cpu, cuda or cuda:N" in err


def test_cuda_on_a_machine_without_it_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["ssft-reconstruct", "--checkpoint", str(tmp_path / "none.pt"), "--images", "a.png",
                 "--modality", "visible", "--out", str(tmp_path / "o.png"), "--device", "cuda:1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "'cuda:1'" in err and "CUDA is not available" in err


def test_threads_below_one_is_one_line(golden_dir: Path, capsys) -> None:
    code = main(["evaluate", str(golden_dir / "sysu_like.npz"), "--protocol", "sysu", "--threads", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--threads 0" in err


def test_threads_set_torch_and_faiss_for_the_command_and_are_restored() -> None:
    import faiss
    import torch

    from vireid.cli.options import cpu_threads

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    with cpu_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == before


# --------------------------------------------------------------------------------- evaluate --protocol


def _feature_file(path: Path, meta: dict | None) -> Path:
    """A small feature file whose ranking depends on the metric rule: each query's same-camera
    gallery copy is its nearest neighbour (removed by ``market``, kept by ``regdb``)."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 8))
    q_id, g_id = np.arange(5), np.repeat(np.arange(5), 2)
    g_cam = np.tile([1, 2], 5)
    q_feat = centres[q_id] + 0.1 * rng.standard_normal((5, 8))
    g_feat = centres[g_id] + 0.1 * rng.standard_normal((10, 8))
    g_feat[g_cam == 1] = q_feat + 0.01                                 # same camera as the query: closest
    g_feat[g_cam == 2] = rng.standard_normal((5, 8))                   # the other camera: unrelated
    features = FeatureSet(query_feat=q_feat.astype(np.float32), gallery_feat=g_feat.astype(np.float32),
                          query_id=q_id, gallery_id=g_id, query_cam=np.ones(5, dtype=np.int64), gallery_cam=g_cam,
                          meta=meta or {})
    save_features(path, features)
    return path


def test_evaluate_without_protocol_uses_the_rule_recorded_in_the_file(tmp_path: Path, capsys) -> None:
    recorded = _feature_file(tmp_path / "f.npz", {"protocol": {"name": "market", "metric": "market"}})
    assert main(["evaluate", str(recorded), "--json", str(tmp_path / "meta.json")]) == 0
    out, err = capsys.readouterr()
    assert "protocol market:" in out
    assert "protocol market: the metric rule of data protocol market" in err
    assert main(["evaluate", str(recorded), "--protocol", "market", "--json", str(tmp_path / "given.json")]) == 0
    assert main(["evaluate", str(recorded), "--protocol", "regdb", "--json", str(tmp_path / "regdb.json")]) == 0
    from_meta, given, regdb = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("meta", "given", "regdb"))
    assert from_meta["mAP"] == given["mAP"] and from_meta["mAP"] != regdb["mAP"]


def test_evaluate_names_the_data_protocol_when_it_differs_from_the_rule(tmp_path: Path, capsys) -> None:
    recorded = _feature_file(tmp_path / "f.npz", {"protocol": {"name": "sysu-agw", "metric": "regdb"}})
    assert main(["evaluate", str(recorded)]) == 0
    out, err = capsys.readouterr()
    assert "protocol regdb:" in out and "data protocol sysu-agw" in err


def test_evaluate_warns_in_one_line_when_protocol_contradicts_the_file(tmp_path: Path, capsys) -> None:
    recorded = _feature_file(tmp_path / "f.npz", {"protocol": {"name": "regdb", "metric": "regdb"}})
    assert main(["evaluate", str(recorded), "--protocol", "market"]) == 0
    out, err = capsys.readouterr()
    assert "protocol market:" in out
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "--protocol market" in warnings[0] and "'regdb'" in warnings[0]


def test_evaluate_without_protocol_or_metadata_is_one_line(tmp_path: Path, capsys) -> None:
    bare = _feature_file(tmp_path / "bare.npz", None)
    assert main(["evaluate", str(bare)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bare.npz" in err and "--protocol" in err


# ------------------------------------------------------------------------------- console and progress


def test_progress_to_a_redirected_stream_has_no_carriage_returns(golden_dir: Path, tmp_path: Path, capsys) -> None:
    """capsys's stderr is not a terminal, like a log file."""
    assert main(["rerank", str(golden_dir / "sysu_like.npz"), "--method", "aim", "--topk", "5",
                 "--out", str(tmp_path / "r.npz")]) == 0
    err = capsys.readouterr().err
    assert "aim re-ranking" in err and "\r" not in err


def test_progress_lines_on_a_redirected_stream_are_at_most_one_per_interval() -> None:
    from vireid.progress import LINE_INTERVAL_S, progress_bar

    stream, now = io.StringIO(), [0.0]
    bar = progress_bar(total=400, desc="work", unit="batch", leave=False, file=stream)
    bar._time = lambda: now[0]           # tqdm's clock: 400 steps of one second
    bar.start_t = bar.last_print_t = 0.0
    for _ in range(400):
        now[0] += 1.0
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0].startswith("work:") and "400/400" in lines[-1]       # the start, and the end although leave=False
    assert len(lines) <= 2 + 400 / LINE_INTERVAL_S


def test_progress_on_a_terminal_is_a_live_bar() -> None:
    from vireid.progress import progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    for _ in progress_bar(range(3), desc="work", file=stream):
        pass
    assert "\r" in stream.getvalue()


def test_quiet_hides_information_and_progress_but_not_results_or_warnings(golden_dir: Path, tmp_path: Path,
                                                                           capsys) -> None:
    recorded = _feature_file(tmp_path / "f.npz", {"protocol": {"name": "regdb", "metric": "regdb"}})
    assert main(["evaluate", str(recorded)]) == 0
    assert "metric rule" in capsys.readouterr().err                # shown by default
    assert main(["evaluate", "-q", str(recorded)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "protocol regdb:" in out                 # the result is still printed
    assert main(["-q", "evaluate", str(recorded), "--protocol", "market"]) == 0
    assert "warning" in capsys.readouterr().err                   # warnings stay
    assert main(["rerank", "-q", str(golden_dir / "sysu_like.npz"), "--method", "aim", "--topk", "5",
                 "--out", str(tmp_path / "r.npz")]) == 0
    assert "re-ranking" not in capsys.readouterr().err


def test_verbose_shows_debug_records(tmp_path: Path, capsys) -> None:
    recorded = _feature_file(tmp_path / "f.npz", {"protocol": {"name": "regdb", "metric": "regdb"}})
    probe = logging.getLogger("vireid.probe")
    assert main(["evaluate", str(recorded)]) == 0
    probe.debug("debug probe")
    assert "debug probe" not in capsys.readouterr().err
    assert main(["evaluate", "-v", str(recorded)]) == 0
    probe.debug("debug probe")
    assert "debug probe" in capsys.readouterr().err


def test_quiet_console_still_keeps_info_in_the_run_log(tmp_path: Path, capsys) -> None:
    from vireid.engine.trainer import _run_log

    configure_console_logging(-1)
    with _run_log(tmp_path / "log.txt", console_bars=True):
        logging.getLogger("vireid.engine.trainer").info("epoch 1 done")
    assert "epoch 1 done" in (tmp_path / "log.txt").read_text()
    assert "epoch 1 done" not in capsys.readouterr().err


def test_quiet_and_verbose_together_are_one_line(tmp_path: Path, capsys) -> None:
    recorded = _feature_file(tmp_path / "f.npz", {"protocol": {"name": "regdb", "metric": "regdb"}})
    assert main(["-q", "evaluate", "-v", str(recorded)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "-q/--quiet" in err
