"""Image records: the common currency of dataset adapters, protocols and samplers."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path


class Modality(enum.IntEnum):
    """Image modality; the integer value is the modality index fed to two-stream models."""

    VISIBLE = 0
    INFRARED = 1

    @classmethod
    def parse(cls, text: str) -> "Modality":
        """'visible'/'rgb'/'vis' or 'infrared'/'ir'/'thermal'/'nir' (case-insensitive)."""
        key = text.strip().lower()
        if key in ("visible", "rgb", "vis", "color", "colour"):
            return cls.VISIBLE
        if key in ("infrared", "ir", "thermal", "nir", "t"):
            return cls.INFRARED
        raise ValueError(f"unknown modality {text!r} (expected visible or infrared)")

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image: absolute path, original person id, camera id and modality."""

    path: Path
    pid: int
    cam: int
    modality: Modality


def relabel(records: list[ImageRecord]) -> dict[int, int]:
    """Deterministic contiguous training labels: sorted original pids -> 0..N-1."""
    return {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
