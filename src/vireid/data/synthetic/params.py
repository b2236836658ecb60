"""Parameters of the synthetic visible-infrared renderer: difficulty knobs and seeding."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from vireid.errors import InputError

# Stream tags: every random choice draws from ``numpy.random.default_rng([seed, TAG, ...])`` so that
# an image depends only on (seed, tag, pid, camera, index), never on rendering order or workers.
TAG_IDENTITY = 1
TAG_OUTFIT_TEMPLATE = 2
TAG_OUTFIT_MEMBERSHIP = 3
TAG_CAMERA = 4
TAG_SCENE = 5
TAG_IMAGE = 6
TAG_SPLIT = 7
TAG_PRESENCE = 8
TAG_VIEW = 9


def stream(seed: int, tag: int, *keys: int) -> np.random.Generator:
    """An independent generator for one (seed, tag, keys...) combination."""
    return np.random.default_rng([int(seed), tag, *(int(k) for k in keys)])


@dataclass(frozen=True)
class Difficulty:
    """Knobs that make the synthetic re-identification task harder (defaults: the demo's level).

    noise: multiplier of sensor noise (both modalities; 0 = clean).
    pose_variation: multiplier of walking swing, position and scale jitter (0 = rigid, centred).
    viewpoint_variation: 0 = every camera sees one fixed viewpoint, 1 = a camera-specific random mix.
    clutter: 0..1, background objects and the rate of foreground occluders.
    illumination_variation: multiplier of per-camera and per-image lighting changes.
    shared_outfit_fraction: 0..1, fraction of identities wearing an outfit shared by a small group
        (same garment colours and patterns; body shape, hair, accessories and thermal fabric differ).
    outfit_group_size: mean number of identities sharing one outfit.
    infrared_luminance_coupling: 0..1, how far a garment's infrared level follows its visible
        luminance (0 = independent, as in a thermal camera; 1 = bright colours are bright in
        infrared, like near-infrared reflectance). Hue never reaches the infrared image.
    """

    noise: float = 1.0
    pose_variation: float = 1.0
    viewpoint_variation: float = 1.0
    clutter: float = 0.5
    illumination_variation: float = 1.0
    shared_outfit_fraction: float = 0.35
    outfit_group_size: int = 3
    infrared_luminance_coupling: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"difficulty.{f.name}: expected a finite non-negative number, got {value!r}")
        for name in ("viewpoint_variation", "clutter", "shared_outfit_fraction", "infrared_luminance_coupling"):
            if getattr(self, name) > 1:
                raise InputError(f"difficulty.{name}: expected a value in [0, 1], got {getattr(self, name)!r}")
        if int(self.outfit_group_size) != self.outfit_group_size or self.outfit_group_size < 2:
            raise InputError(f"difficulty.outfit_group_size: expected an integer >= 2, got {self.outfit_group_size!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
