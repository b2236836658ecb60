"""Shared test fixtures: golden reference data and small-thread torch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("VIREID_GOLDEN", REPO_ROOT.parent / "shared" / "golden"))


def _limit_threads() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(int(os.environ.get("VIREID_TEST_THREADS", "2")))


_limit_threads()


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """``../shared/golden`` (or $VIREID_GOLDEN). Missing: skip, unless CI requires it."""
    if not (GOLDEN_DIR / "sysu_like.npz").is_file():
        if os.environ.get("VIREID_REQUIRE_GOLDEN") == "1" or os.environ.get("CI") == "true":
            pytest.fail(f"golden data required but not found at {GOLDEN_DIR}")
        pytest.skip(f"golden data not found at {GOLDEN_DIR}")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def sysu_golden(golden_dir: Path) -> dict[str, np.ndarray]:
    z = np.load(golden_dir / "sysu_like.npz")
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def regdb_golden(golden_dir: Path) -> dict[str, np.ndarray]:
    z = np.load(golden_dir / "regdb_like.npz")
    return {k: z[k] for k in z.files}
