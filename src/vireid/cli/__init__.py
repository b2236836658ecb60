"""The ``vireid`` command: a thin layer over the library.

Each sub-command lives in its own module ``vireid.cli.<name>`` exposing
``register(subparsers) -> None``; the parser it adds sets ``func(args) -> int``.
Heavy imports (torch, faiss) happen inside ``func`` so ``vireid --help`` stays fast.
Bad user input raises :class:`vireid.errors.InputError`: one line on stderr, exit code 2.
The options every command shares are defined once in :mod:`vireid.cli.options` and applied here,
before the command runs: ``-q/-v`` (console log level and progress bars), ``--threads`` (CPU
threads of torch, BLAS, faiss; onnxruntime reads ``args.cpu_threads``) and ``--device`` (checked).
A reader of stdout that stops early (``vireid evaluate … | head -1``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import select
import stat
import sys
from collections.abc import Sequence

from vireid import __version__
from vireid.cli.options import add_verbosity_options, check_device, cpu_threads
from vireid.errors import InputError
from vireid.progress import set_progress_bars

COMMAND_MODULES = (
    "demo", "synth", "train", "extract", "evaluate", "rerank",
    "export", "index", "search", "serve", "ssft_reconstruct",
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default in ``--help`` unless its help already states it or there is none
    worth stating (no default, or an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default:" in text or action.default is None or (action.nargs == 0 and action.default is False):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vireid",
        description="Visible-infrared person re-identification: datasets, exact evaluation protocols, "
        "affinity re-ranking (AIM, SIM, k-reciprocal), training of XIV / DF2AM / SAAI / cm-SSFT, "
        "and a gallery search service.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vireid {__version__}")
    add_verbosity_options(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"vireid.cli.{name}").register(subparsers)
    return parser


#: Exit status when the reader of stdout goes away early (``vireid evaluate … | head -1``): what a
#: process killed by SIGPIPE reports in the shell (128 + 13), as ``yes | head -1`` does.
BROKEN_PIPE_EXIT = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``vireid`` command; returns its exit status."""
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # a reader that went away shows here, not as a traceback at interpreter exit
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe broke (a worker process, a socket): a real error
        _discard_stdout()
        return BROKEN_PIPE_EXIT


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
        if quiet and verbose:
            raise InputError("-q/--quiet and -v/--verbose contradict each other; give one")
        configure_console_logging(verbosity=-1 if quiet else 1 if verbose else 0)
        if getattr(args, "device", None) is not None:
            check_device(args.device)
        if not hasattr(args, "threads"):
            return int(args.func(args) or 0)
        with cpu_threads(args.threads) as args.cpu_threads:
            return int(args.func(args) or 0)
    except InputError as exc:
        print(f"vireid {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vireid {args.command}: interrupted", file=sys.stderr)
        return 130


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe or socket whose reading end is closed."""
    try:
        fd = sys.stdout.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):  # stdout replaced by an object without a descriptor
        return False
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return False
    if not hasattr(select, "poll"):  # Windows has no poll(): take the broken pipe to be stdout's
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _discard_stdout() -> None:
    """Point stdout's file descriptor at the null device, as Python's documentation on SIGPIPE
    recommends, so that output still buffered when the interpreter exits cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


class _StderrHandler(logging.StreamHandler):
    """A console handler writing to whatever ``sys.stderr`` is when a record is emitted."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def configure_console_logging(verbosity: int = 0) -> None:
    """The library's log records on stderr: INFO and above from the main process (rank 0 under
    torchrun), warnings and errors from the others. ``verbosity`` -1 (``-q``): warnings and errors
    only, and no progress bars; 1 (``-v``): DEBUG records too. Commands with a run folder also keep
    a log file (INFO and above whatever the console shows)."""
    logger = logging.getLogger("vireid")
    handler = next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        logger.addHandler(handler)
    main_process = os.environ.get("RANK", "0") == "0"
    console = logging.WARNING if verbosity < 0 or not main_process else logging.DEBUG if verbosity > 0 else logging.INFO
    handler.setLevel(console)
    logger.setLevel(min(console, logging.INFO))
    set_progress_bars(verbosity >= 0)


def add_subcommand(subparsers: argparse._SubParsersAction, name: str, help_text: str, description: str | None = None) -> argparse.ArgumentParser:
    """A sub-parser with defaults shown in ``--help`` and the ``-q`` / ``-v`` options."""
    parser = subparsers.add_parser(
        name, help=help_text, description=description or help_text,
        formatter_class=HelpFormatter,
    )
    add_verbosity_options(parser)
    return parser


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
