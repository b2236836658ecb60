"""Shared test fixtures: golden reference data (``tests/golden/``) and small-thread torch."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

# idle OpenMP threads (torch, faiss) sleep instead of spinning: on a loaded machine spinning makes
# faiss calls several times slower; set before torch is imported below
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO_ROOT / "tests" / "golden"


def _limit_threads() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(int(os.environ.get("VIREID_TEST_THREADS", "2")))


_limit_threads()


@contextmanager
def script_module(relative_path: str, name: str) -> Iterator[ModuleType]:
    """A repository script (``benchmarks/…``, ``tools/…``) imported as module ``name``, registered in
    ``sys.modules`` while in use (dataclasses resolve annotations through it)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


def ranking_from_prefix(order: np.ndarray, lengths: np.ndarray, num_gallery: int) -> np.ndarray:
    """A (Q, G) matrix ranking row i's ``order`` prefix at 0..n_i-1 and every other item tied at n_i.

    The prefix is the reference ranking up to the query's last same-identity item, so every metric
    (CMC, AP, INP under any removal rule) of this matrix equals that of the reference matrix."""
    lengths = lengths.astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    rows = np.repeat(np.arange(len(lengths)), lengths)
    out = np.repeat(lengths.astype(np.float64)[:, None], num_gallery, axis=1)
    out[rows, order.astype(np.int64)] = np.arange(len(order)) - np.repeat(starts, lengths)
    return out


def load_golden(name: str) -> dict[str, np.ndarray]:
    """``tests/golden/<name>`` as a dict (schema in ``tests/golden/README.md``), plus ``ranking_<M>``:
    the metric-equivalent (Q, G) matrix of every reference distance (``ranking_<M>_t2v``: RegDB
    thermal->visible, (G, Q)). ``dist_<M>`` holds only the rows ``rows`` of the reference distance."""
    with np.load(GOLDEN_DIR / name) as z:
        data = {k: z[k] for k in z.files}
    for key in [k for k in data if k.startswith("order_len_")]:
        method = key[len("order_len_"):]
        width = len(data["query_id"] if method.endswith("_t2v") else data["gallery_id"])
        data[f"ranking_{method}"] = ranking_from_prefix(data[f"order_{method}"], data[key], width)
    return data


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """``tests/golden``: the golden files, usable directly as ``vireid`` feature files."""
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def sysu_golden() -> dict[str, np.ndarray]:
    return load_golden("sysu_like.npz")


@pytest.fixture(scope="session")
def regdb_golden() -> dict[str, np.ndarray]:
    return load_golden("regdb_like.npz")
