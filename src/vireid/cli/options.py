"""Parsing helpers and the options every sub-command shares (``--threads``, ``--device``,
``-q/--quiet``, ``-v/--verbose``): each defined once here, with one help text."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import yaml

from vireid.errors import InputError

if TYPE_CHECKING:
    import torch


def parse_key_values(items: Iterable[str], option: str, *, typed: bool = True) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{"k": v}``.

    ``typed``: values read as YAML scalars (``10`` -> int, ``indoor`` -> str); otherwise kept as
    stripped strings for a validator that parses them itself (re-ranking parameters).
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise InputError(f"{option} {item!r}: expected NAME=VALUE, e.g. k1=20")
        value: Any = raw.strip()
        if typed:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                pass
        out[key.strip()] = value
    return out


# ----------------------------------------------------------------------- options every command shares

THREADS_HELP = "CPU threads for torch, onnxruntime, BLAS and faiss"
"""The meaning of ``--threads`` on every command; each command's help adds its default."""
THREADS_DEFAULT = "all available cores"

DEVICE_HELP = "torch device the model runs on: auto (cuda if available, else cpu), cpu, cuda or cuda:N"
"""The meaning of ``--device`` on every command that runs a torch model."""
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")

QUIET_HELP = "print warnings and errors only: no progress bars, no informational log lines"
VERBOSE_HELP = "also print debug log lines"


def add_threads_option(parser: argparse.ArgumentParser, default: int | None = None,
                       default_text: str = THREADS_DEFAULT) -> None:
    """``--threads N``: the same option on every command that computes; ``default`` None means
    all the cores this process may run on."""
    parser.add_argument("--threads", type=int, default=default, metavar="N",
                        help=f"{THREADS_HELP} (default: {default_text})")


def add_device_option(parser: argparse.ArgumentParser, default: str | None = "auto",
                      default_text: str = "auto") -> None:
    """``--device``: the same option on every command that runs a torch model."""
    parser.add_argument("--device", default=default, metavar="DEVICE",
                        help=f"{DEVICE_HELP} (default: {default_text})")


def add_verbosity_options(parser: argparse.ArgumentParser) -> None:
    """``-q/--quiet`` and ``-v/--verbose``, on the main parser and on every sub-command's parser
    (``vireid -q evaluate …`` and ``vireid evaluate -q …``). No default is stored, so a sub-parser
    does not reset what the main parser read."""
    group = parser.add_argument_group("output")
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
    group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def check_device(name: str) -> str:
    """``name`` when it is a device ``--device`` accepts (auto, cpu, cuda, cuda:N), else a one-line error."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise InputError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return name


def torch_device(name: str) -> torch.device:
    """The torch device ``--device name`` means; CUDA that this machine lacks is a one-line error."""
    import torch

    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"--device {name!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= count:
            raise InputError(f"--device {name!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return device


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[int]:
    """Use ``threads`` CPU threads (None: :func:`available_cores`) for the duration: torch's intra-op
    pool, faiss's OpenMP pool and, through the environment they read when first loaded, BLAS and
    OpenMP libraries not loaded yet. Yields the count (for onnxruntime's session options); restores
    the previous settings afterwards."""
    n = available_cores() if threads is None else threads
    if n < 1:
        raise InputError(f"--threads {n}: must be >= 1")
    saved_env = {var: os.environ.get(var) for var in _THREAD_VARIABLES}
    os.environ.update({var: str(n) for var in _THREAD_VARIABLES})
    loaded_torch, loaded_faiss = sys.modules.get("torch"), sys.modules.get("faiss")
    saved_torch = loaded_torch.get_num_threads() if loaded_torch is not None else None
    saved_faiss = loaded_faiss.omp_get_max_threads() if loaded_faiss is not None else None
    if loaded_torch is not None:
        loaded_torch.set_num_threads(n)
    if loaded_faiss is not None:
        loaded_faiss.omp_set_num_threads(n)
    try:
        yield n
    finally:
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        if saved_torch is not None:
            loaded_torch.set_num_threads(saved_torch)
        if saved_faiss is not None:
            loaded_faiss.omp_set_num_threads(saved_faiss)
