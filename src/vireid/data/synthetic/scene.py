"""Cameras and their scenes: viewpoint habits, lighting, sensor settings and backgrounds.

A scene is a panorama three crops wide holding, for every pixel, a colour and a thermal level;
visible cameras crop its colours, infrared cameras its thermal levels, so two cameras sharing a
scene (SYSU-MM01 cameras 2 and 3, a RegDB camera pair, an LLCM dual-mode camera) see the same place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vireid.data.records import Modality
from vireid.data.synthetic.identity import muted_colour
from vireid.data.synthetic.params import TAG_CAMERA, TAG_SCENE, Difficulty, stream

VIEWPOINTS = ("front", "back", "left", "right")
"""Which side of the person faces the camera; 'left'/'right': walking towards image left/right."""


@dataclass(frozen=True)
class CameraSpec:
    """One camera of a layout; every field is fixed for the whole dataset."""

    cam: int
    modality: Modality
    scene_id: int
    indoor: bool
    view_probs: tuple[float, float, float, float]
    scale: float
    gain: float
    colour_cast: tuple[float, float, float]
    blur: float
    noise: float
    low_light: bool
    thermal_range: tuple[float, float]
    fixed_pattern_seed: int
    """Seeds the infrared sensor's column (fixed-pattern) noise."""


def make_camera(seed: int, layout_code: int, cam: int, modality: Modality, scene_id: int, indoor: bool,
                difficulty: Difficulty, low_light: bool = False) -> CameraSpec:
    """Sample the fixed properties of camera ``cam`` (viewpoint habit, lighting, sensor)."""
    rng = stream(seed, TAG_CAMERA, layout_code, cam, int(modality))
    dominant = np.eye(4)[rng.integers(4)]
    mix = rng.dirichlet(np.full(4, 0.8))
    probs = (1 - difficulty.viewpoint_variation) * dominant + difficulty.viewpoint_variation * (0.5 * dominant + 0.5 * mix)
    probs = probs / probs.sum()
    light = difficulty.illumination_variation
    cast = 1.0 + light * rng.uniform(-0.12, 0.12, 3)
    gain = float(np.exp(light * rng.uniform(-0.25, 0.2)) * (0.45 if low_light else 1.0))
    return CameraSpec(
        cam=cam, modality=modality, scene_id=scene_id, indoor=indoor,
        view_probs=(float(probs[0]), float(probs[1]), float(probs[2]), float(probs[3])),
        scale=float(rng.uniform(0.86, 0.97)),
        gain=gain,
        colour_cast=(float(cast[0]), float(cast[1]), float(cast[2])),
        blur=float(rng.uniform(0.8, 1.3) if modality == Modality.INFRARED else rng.uniform(0.2, 0.6)),
        noise=float(difficulty.noise * rng.uniform(0.6, 1.4) * (2.0 if low_light else 1.0)),
        low_light=low_light,
        thermal_range=(float(rng.uniform(0.05, 0.2)), float(rng.uniform(0.9, 1.1))),
        fixed_pattern_seed=int(rng.integers(2**31)),
    )


@dataclass(frozen=True)
class Scene:
    """A panorama (H, 3W): colour (H, 3W, 3) in [0, 1] and thermal level (H, 3W)."""

    colour: np.ndarray
    thermal: np.ndarray

    def crop(self, offset: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        return self.colour[:, offset:offset + width].copy(), self.thermal[:, offset:offset + width].copy()


def _paint_rect(colour: np.ndarray, thermal: np.ndarray, y0: int, y1: int, x0: int, x1: int,
                rgb: tuple[float, float, float] | np.ndarray, level: float) -> None:
    colour[y0:y1, x0:x1] = rgb
    thermal[y0:y1, x0:x1] = level


def _paint_ellipse(colour: np.ndarray, thermal: np.ndarray, cy: float, cx: float, ry: float, rx: float,
                   rgb: tuple[float, float, float] | np.ndarray, level: float) -> None:
    yy = np.arange(colour.shape[0])[:, None] + 0.5
    xx = np.arange(colour.shape[1])[None, :] + 0.5
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    colour[inside] = rgb
    thermal[inside] = level


def build_scene(seed: int, layout_code: int, scene_id: int, indoor: bool, height: int, width: int,
                clutter: float) -> Scene:
    """Procedural indoor (walls, floor, doors, radiators) or outdoor (sky, buildings, trees) panorama."""
    rng = stream(seed, TAG_SCENE, layout_code, scene_id)
    pano_w = 3 * width
    colour = np.zeros((height, pano_w, 3), np.float32)
    thermal = np.zeros((height, pano_w), np.float32)
    horizon = int(height * rng.uniform(0.55, 0.72))
    num_objects = 2 + int(round(rng.uniform(2, 7) * clutter))
    if indoor:
        wall = np.clip(np.array([0.72, 0.7, 0.66]) * rng.uniform(0.6, 1.1) + rng.normal(0, 0.03, 3), 0, 1)
        floor = np.clip(np.array([0.45, 0.42, 0.38]) * rng.uniform(0.5, 1.2) + rng.normal(0, 0.03, 3), 0, 1)
        _paint_rect(colour, thermal, 0, horizon, 0, pano_w, wall, rng.uniform(0.27, 0.33))
        _paint_rect(colour, thermal, horizon, height, 0, pano_w, floor, rng.uniform(0.3, 0.37))
        for _ in range(num_objects):
            w = int(width * rng.uniform(0.2, 0.8))
            x0 = int(rng.integers(0, pano_w - w))
            y0 = int(horizon * rng.uniform(0.05, 0.6))
            y1 = horizon if rng.random() < 0.5 else int(y0 + (horizon - y0) * rng.uniform(0.3, 0.9))
            kind = rng.random()
            level = rng.uniform(0.62, 0.78) if kind < 0.15 else (rng.uniform(0.12, 0.2) if kind < 0.3 else rng.uniform(0.25, 0.38))
            _paint_rect(colour, thermal, y0, y1, x0, x0 + w, muted_colour(rng), level)
        tile = int(rng.integers(5, 11))
        rows = np.arange(horizon, height)
        colour[rows[(rows - horizon) % tile == 0]] *= 0.85
    else:
        sky_line = int(height * rng.uniform(0.08, 0.3))
        sky = np.clip(np.array([0.62, 0.74, 0.88]) * rng.uniform(0.8, 1.15) + rng.normal(0, 0.05, 3), 0, 1)
        ground = np.clip(np.array([0.42, 0.41, 0.4]) * rng.uniform(0.6, 1.3) + rng.normal(0, 0.04, 3), 0, 1)
        _paint_rect(colour, thermal, 0, horizon, 0, pano_w, sky, rng.uniform(0.04, 0.14))
        _paint_rect(colour, thermal, horizon, height, 0, pano_w, ground, rng.uniform(0.38, 0.52))
        x = 0
        while x < pano_w:
            w = int(width * rng.uniform(0.4, 1.2))
            top = int(sky_line * rng.uniform(0.0, 1.6))
            building = np.clip(np.array([0.6, 0.56, 0.5]) * rng.uniform(0.5, 1.3) + rng.normal(0, 0.06, 3), 0, 1)
            _paint_rect(colour, thermal, top, horizon, x, x + w, building, rng.uniform(0.3, 0.42))
            x += w + int(rng.integers(0, width // 3))
        for _ in range(num_objects):
            green = np.clip(np.array([0.25, 0.45, 0.2]) * rng.uniform(0.6, 1.3) + rng.normal(0, 0.05, 3), 0, 1)
            r = height * rng.uniform(0.08, 0.2)
            _paint_ellipse(colour, thermal, horizon - r * rng.uniform(0.3, 1.2), rng.uniform(0, pano_w), r,
                           r * rng.uniform(0.7, 1.3), green, rng.uniform(0.25, 0.32))
        lane = int(rng.integers(horizon + 2, height))
        colour[lane, :] = np.clip(ground * 1.6, 0, 1)
    shade = np.linspace(rng.uniform(0.85, 1.1), rng.uniform(0.85, 1.1), pano_w, dtype=np.float32)
    return Scene(colour=np.clip(colour * shade[None, :, None], 0, 1), thermal=thermal)
