"""What a user meets around the core: every command explains itself in ``--help``, a closed stdout
ends a command quietly, and the project ships a licence, type information, a changelog and a Dockerfile."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vireid.cli import COMMAND_MODULES, HelpFormatter, build_parser

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_FEATURES = ROOT / "tests" / "golden" / "sysu_like.npz"
#: what a shell reports for a process ended by SIGPIPE (128 + 13), as for `yes | head -1`
BROKEN_PIPE_EXIT = 141


# ----------------------------------------------------------------------------------- --help everywhere


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("vireid",)
             ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser of the command tree, depth first, with the words that reach it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def _subcommand_actions(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def test_the_walk_reaches_every_command_and_every_index_action() -> None:
    """The walk below is only as good as its reach: every top-level command and every
    ``vireid index`` action is visited."""
    paths = {path for path, _ in _parsers(build_parser())}
    assert {("vireid", name.replace("_", "-")) for name in COMMAND_MODULES} <= paths
    assert {("vireid", "index", action) for action in ("build", "add", "info", "verify", "restore", "gc")} <= paths


def test_every_command_and_sub_command_has_a_description() -> None:
    missing = [" ".join(path) for path, parser in _parsers(build_parser())
               if not (parser.description or "").strip()]
    assert missing == [], f"no description in --help: {missing}"


def test_every_sub_command_has_a_one_line_summary_in_its_parents_help() -> None:
    missing = []
    for path, parser in _parsers(build_parser()):
        for action in _subcommand_actions(parser):
            summarised = {choice.dest: (choice.help or "").strip() for choice in action._choices_actions}
            missing += [" ".join((*path, name)) for name in action.choices
                        if not summarised.get(name) and name not in _aliases(action)]
    assert missing == [], f"no summary line in the parent's --help: {missing}"


def _aliases(action: argparse._SubParsersAction) -> set[str]:
    """Names that point at a parser already listed under another name."""
    seen: dict[int, str] = {}
    aliases = set()
    for name, parser in action.choices.items():
        if id(parser) in seen:
            aliases.add(name)
        seen.setdefault(id(parser), name)
    return aliases


def test_every_option_and_argument_has_help_text() -> None:
    missing = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if action.help == argparse.SUPPRESS:
                continue
            if not (action.help or "").strip():
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert missing == [], f"options without help text: {missing}"


def test_every_parser_shows_defaults_the_same_way() -> None:
    """Sub-commands built with the plain argparse formatter would hide the defaults every other
    command shows."""
    plain = [" ".join(path) for path, parser in _parsers(build_parser()) if path != ("vireid",)
             and parser.formatter_class is not HelpFormatter]
    assert plain == [], f"parsers not using vireid.cli.HelpFormatter: {plain}"


@pytest.mark.parametrize("action", ["build", "add", "info", "verify", "restore", "gc"])
def test_index_action_help_prints_a_description_line(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    """What the user runs: ``vireid index ACTION --help`` shows a paragraph between usage and arguments."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["index", action, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    usage, _, rest = text.partition("\n\n")
    assert usage.startswith(f"usage: vireid index {action}")
    description = rest.partition("\n\n")[0]
    assert not description.startswith(("positional arguments", "options")), text
    assert len(description.split()) >= 5, text


# ----------------------------------------------------------------------------------- closed stdout


def _vireid(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from vireid.cli import main; sys.exit(main())", *args]


def _run_with_closed_stdout(command: list[str]) -> subprocess.CompletedProcess[str]:
    """``command`` writing into a pipe whose reader has already gone: every write to stdout fails
    with EPIPE, whatever the timing."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300,
                              cwd=ROOT)
    finally:
        os.close(write_end)


def _assert_quiet(stderr: str) -> None:
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and "Exception ignored" not in stderr, stderr


def test_evaluate_into_a_closed_pipe_ends_quietly() -> None:
    result = _run_with_closed_stdout(_vireid("evaluate", str(GOLDEN_FEATURES), "--protocol", "sysu"))
    _assert_quiet(result.stderr)
    assert result.returncode == BROKEN_PIPE_EXIT


@pytest.mark.parametrize("words", [["--help"], ["index", "build", "--help"], ["--version"]])
def test_help_into_a_closed_pipe_ends_quietly(words: list[str]) -> None:
    """argparse writes ``--help`` / ``--version`` and exits before any command runs."""
    result = _run_with_closed_stdout(_vireid(*words))
    _assert_quiet(result.stderr)
    assert result.returncode in (0, BROKEN_PIPE_EXIT)


def _with_extra_command(tmp_path: Path, body: str) -> tuple[list[str], dict[str, str]]:
    """A child process running ``vireid extra`` whose ``run(args)`` is ``body``: the command line and
    its environment."""
    (tmp_path / "extra_cli.py").write_text(textwrap.dedent("""
        import sys

        import vireid.cli
        from vireid.cli import add_subcommand


        def register(subparsers):
            add_subcommand(subparsers, "extra", "a command made by the test").set_defaults(func=run)


        def run(args):
        %s

        sys.modules["vireid.cli.extra"] = sys.modules[__name__]
        vireid.cli.COMMAND_MODULES = (*vireid.cli.COMMAND_MODULES, "extra")
    """) % textwrap.indent(textwrap.dedent(body), "    "))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", "import sys, extra_cli; from vireid.cli import main; sys.exit(main(['extra']))"]
    return command, env


def test_a_reader_that_stops_after_one_line_of_a_long_output_ends_the_command_quietly(tmp_path: Path) -> None:
    """``vireid … | head -1`` on a command printing far more than a pipe holds: the write fails in
    the middle of the command, not only at the final flush."""
    command, env = _with_extra_command(tmp_path, """
        for i in range(200_000):
            print(f"line {i:06d} of a long listing that no pipe buffer can hold")
        return 0
    """)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # like `head -1`
    stderr = proc.stderr.read().decode()
    returncode = proc.wait(timeout=300)
    assert first == b"line 000000 of a long listing that no pipe buffer can hold\n"
    _assert_quiet(stderr)
    assert returncode == BROKEN_PIPE_EXIT


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(tmp_path: Path) -> None:
    """Only a closed stdout ends quietly: a pipe to a worker process that breaks is a real failure."""
    command, env = _with_extra_command(tmp_path, """
        print("started")
        raise BrokenPipeError(32, "worker went away")
    """)
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.stdout == "started\n"
    assert "Traceback" in result.stderr and "BrokenPipeError: [Errno 32] worker went away" in result.stderr
    assert result.returncode == 1


@pytest.mark.skipif(shutil.which("head") is None, reason="needs head(1)")
def test_evaluate_piped_into_head_prints_its_first_line_and_no_traceback() -> None:
    """The user's command line, through a real shell pipe."""
    result = subprocess.run(
        ["sh", "-c", f'"{sys.executable}" -m vireid evaluate "{GOLDEN_FEATURES}" --protocol sysu | head -1'],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0
    assert result.stdout.startswith("protocol sysu") and result.stdout.count("\n") == 1
    _assert_quiet(result.stderr)


# ----------------------------------------------------------------------------------- project files


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_the_mit_licence_pyproject_declares() -> None:
    assert _pyproject()["project"]["license"] == {"text": "MIT"}
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the vireid authors" in text
    # the licence's operative sentences, whitespace-insensitive
    flat = " ".join(text.split())
    for sentence in (
        "Permission is hereby granted, free of charge, to any person obtaining a copy of this software and "
        "associated documentation files (the \"Software\"), to deal in the Software without restriction",
        "The above copyright notice and this permission notice shall be included in all copies or substantial "
        "portions of the Software.",
        "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND",
    ):
        assert sentence in flat


def test_py_typed_marker_is_declared_as_package_data() -> None:
    assert (ROOT / "src" / "vireid" / "py.typed").is_file()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["vireid"]


def test_the_built_wheel_carries_py_typed_and_the_licence(tmp_path: Path) -> None:
    """Built from a copy of the tree (nothing written into the checkout), offline, by setuptools."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_wheel({str(dist)!r})"],
                   cwd=tree, check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("vireid-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        licence = [n for n in names if re.fullmatch(r"vireid-[^/]+\.dist-info/(licenses/)?LICENSE", n)]
        assert licence, names
        assert archive.read(licence[0]) == (ROOT / "LICENSE").read_bytes()
    assert "vireid/py.typed" in names


CHANGELOG_FORBIDDEN = re.compile(r"\bissues?\b|\bbrief\b|\bsessions?\b|load average|\.\./shared|\bTODO\b",
                                 re.IGNORECASE)


def test_changelog_follows_keep_a_changelog_with_one_unreleased_section() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n")
    assert "https://keepachangelog.com/en/1.1.0/" in text and "https://semver.org/" in text
    versions = re.findall(r"^## \[([^\]]+)\]", text, flags=re.MULTILINE)
    assert versions == ["Unreleased"]
    kinds = re.findall(r"^### (.+)$", text, flags=re.MULTILINE)
    assert kinds and set(kinds) <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
    assert CHANGELOG_FORBIDDEN.search(text) is None, CHANGELOG_FORBIDDEN.search(text)


def test_changelog_names_every_command() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    missing = [name for name in COMMAND_MODULES if f"vireid {name.replace('_', '-')}" not in text]
    assert missing == []


def test_changelog_links_only_to_files_that_exist() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"https?://", t)]
    assert local, "the changelog points readers at the docs"
    assert [t for t in local if not (ROOT / t).exists()] == []


# ----------------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, flags=re.MULTILINE)]


def test_dockerfile_builds_on_python_311_slim_and_runs_the_demo() -> None:
    instructions = _dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert instructions[-1] == ("CMD", '["vireid", "demo"]')
    runs = " && ".join(args for kind, args in instructions if kind == "RUN")
    assert re.search(r"apt-get install\b[^&]*\bchromium\b", runs)  # the browser test's /usr/bin/chromium
    assert re.search(r"""pip install\b[^&]*-e ['"]?\.\[test\]['"]?""", runs)
    # pip install -e . needs the project files in the working directory first
    workdir = [args for kind, args in instructions if kind == "WORKDIR"]
    assert workdir
    copies = [args for kind, args in instructions if kind == "COPY"]
    copied = " ".join(copies).split()
    for needed in ("pyproject.toml", "README.md", "src", "tests"):
        assert any(item.rstrip("/") in (needed, ".") for item in copied), needed
    first_pip = next(i for i, (kind, args) in enumerate(instructions) if kind == "RUN" and "pip install" in args)
    first_copy = next(i for i, (kind, _) in enumerate(instructions) if kind == "COPY")
    assert first_copy < first_pip


def test_dockerfile_says_how_to_run_the_tests() -> None:
    comments = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.lstrip().startswith("#")]
    assert any("docker build" in line for line in comments)
    assert any("docker run" in line and "pytest" in line for line in comments)
