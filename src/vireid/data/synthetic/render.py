"""Render one pedestrian image: vectorised 2-D shapes composited over a camera's scene.

A person is an ordered list of layers (anti-aliased masks of capsules, ellipses and trapezoids,
each tagged with a material).  The visible renderer gives a material its colour and texture,
the infrared renderer its thermal level (skin warmest, garments by their insulation, hair and
bags cooler), so both modalities share the same geometry but nothing about colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from vireid.data.records import Modality
from vireid.data.synthetic.identity import AMBIENT_TEMPERATURE, Garment, Identity, muted_colour
from vireid.data.synthetic.params import Difficulty
from vireid.data.synthetic.scene import VIEWPOINTS, CameraSpec, Scene

SHOE_TEMPERATURE = 0.42
BAG_TEMPERATURE = 0.34


@dataclass(frozen=True)
class View:
    """Where and how the person appears in one image."""

    viewpoint: str
    phase: float
    leg_swing: float
    arm_swing: float
    cx: float
    foot_y: float
    height_px: float
    width_factor: float


@dataclass(frozen=True)
class Part:
    """An anti-aliased shape inside a window of the image."""

    window: tuple[slice, slice]
    alpha: np.ndarray
    radial: np.ndarray
    """0 on the shape's axis, 1 at its rim (drives shading and edge cooling)."""


@dataclass(frozen=True)
class Layer:
    part: Part
    material: str


class Grid:
    """Pixel-centre coordinates of an H x W image; shapes are evaluated only in their bounding window."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.yy = np.arange(height, dtype=np.float32)[:, None] + 0.5
        self.xx = np.arange(width, dtype=np.float32)[None, :] + 0.5

    def window(self, y0: float, y1: float, x0: float, x1: float) -> tuple[slice, slice] | None:
        top, bottom = max(0, int(math.floor(y0)) - 1), min(self.height, int(math.ceil(y1)) + 1)
        left, right = max(0, int(math.floor(x0)) - 1), min(self.width, int(math.ceil(x1)) + 1)
        if top >= bottom or left >= right:
            return None
        return slice(top, bottom), slice(left, right)

    def coords(self, window: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        return self.yy[window[0]], self.xx[:, window[1]]

    def capsule(self, y0: float, x0: float, y1: float, x1: float, radius: float) -> Part | None:
        window = self.window(min(y0, y1) - radius, max(y0, y1) + radius, min(x0, x1) - radius, max(x0, x1) + radius)
        if window is None:
            return None
        yy, xx = self.coords(window)
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / (dy * dy + dx * dx + 1e-9), 0.0, 1.0)
        dist = np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx))
        return Part(window, np.clip(radius - dist + 0.5, 0.0, 1.0), np.minimum(dist / radius, 1.0))

    def ellipse(self, cy: float, cx: float, ry: float, rx: float) -> Part | None:
        window = self.window(cy - ry, cy + ry, cx - rx, cx + rx)
        if window is None:
            return None
        yy, xx = self.coords(window)
        q = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        return Part(window, np.clip((1.0 - q) * min(ry, rx) + 0.5, 0.0, 1.0), np.minimum(q, 1.0))

    def trapezoid(self, y0: float, y1: float, cx: float, half_top: float, half_bottom: float) -> Part | None:
        half_max = max(half_top, half_bottom)
        window = self.window(y0, y1, cx - half_max, cx + half_max)
        if window is None:
            return None
        yy, xx = self.coords(window)
        s = np.clip((yy - y0) / max(y1 - y0, 1e-6), 0.0, 1.0)
        half = half_top + (half_bottom - half_top) * s
        offset = np.abs(xx - cx)
        edge = np.minimum(np.minimum(half - offset, yy - y0), y1 - yy)
        return Part(window, np.clip(edge + 0.5, 0.0, 1.0), np.minimum(offset / half, 1.0))

    def keep_above(self, part: Part | None, y: float) -> Part | None:
        """``part`` cut softly to the pixels above row ``y``."""
        if part is None:
            return None
        yy, _ = self.coords(part.window)
        return Part(part.window, part.alpha * np.clip(y - yy + 0.5, 0.0, 1.0), part.radial)

    def keep_cap(self, part: Part | None, y: float, x: float, direction: int) -> Part | None:
        """``part`` cut softly to the pixels above row ``y`` or past column ``x`` in ``direction``."""
        if part is None:
            return None
        yy, xx = self.coords(part.window)
        keep = np.maximum(np.clip(y - yy + 0.5, 0.0, 1.0), np.clip(direction * (xx - x) + 0.5, 0.0, 1.0))
        return Part(part.window, part.alpha * keep, part.radial)

    def union(self, *parts: Part | None) -> Part | None:
        present = [p for p in parts if p is not None]
        if not present:
            return None
        top, bottom = min(p.window[0].start for p in present), max(p.window[0].stop for p in present)
        left, right = min(p.window[1].start for p in present), max(p.window[1].stop for p in present)
        alpha = np.zeros((bottom - top, right - left), np.float32)
        radial = np.ones_like(alpha)
        for p in present:
            sub = (slice(p.window[0].start - top, p.window[0].stop - top), slice(p.window[1].start - left, p.window[1].stop - left))
            radial[sub] = np.where(p.alpha > alpha[sub], p.radial, radial[sub])
            alpha[sub] = np.maximum(alpha[sub], p.alpha)
        return Part((slice(top, bottom), slice(left, right)), alpha, radial)


def sample_view(rng: np.random.Generator, camera: CameraSpec, grid: Grid, difficulty: Difficulty,
                viewpoint: str | None = None) -> View:
    """Viewpoint (the camera's habit unless given), walking phase, position and scale of one image."""
    pose = difficulty.pose_variation
    chosen = viewpoint if viewpoint is not None else VIEWPOINTS[int(rng.choice(4, p=camera.view_probs))]
    height_px = grid.height * camera.scale * float(np.clip(1 + pose * rng.normal(0, 0.03), 0.8, 1.05))
    return View(
        viewpoint=chosen,
        phase=float(rng.uniform(0, 2 * math.pi)),
        leg_swing=float(pose * rng.uniform(0.12, 0.42)),
        arm_swing=float(pose * rng.uniform(0.1, 0.4)),
        cx=float(grid.width / 2 + pose * rng.normal(0, 0.045 * grid.width)),
        foot_y=float(grid.height * (0.985 - abs(pose * rng.normal(0, 0.015)))),
        height_px=float(height_px),
        width_factor=float(np.exp(pose * rng.normal(0, 0.05))),
    )


def person_layers(ident: Identity, view: View, grid: Grid) -> list[Layer]:
    """The person's parts, back to front, for the view's viewpoint."""
    outfit = ident.outfit
    p = view.height_px
    top = view.foot_y - p
    cx, wf = view.cx, view.width_factor
    side = view.viewpoint in ("left", "right")
    front, back = view.viewpoint == "front", view.viewpoint == "back"
    facing = {"left": -1, "right": 1}.get(view.viewpoint, 0)
    head_r = ident.head_size * p
    head_cy, head_ry, head_rx = top + 1.15 * head_r, 1.15 * head_r, (1.0 if side else 0.9) * head_r * wf
    shoulder_y = top + 2.35 * head_r + 0.03 * p
    hip_y = top + (1 - ident.leg_ratio) * p
    ankle_y = view.foot_y - 0.035 * p
    sw = ident.shoulder_width * p * wf * (0.6 if side else 1.0)
    hw = ident.hip_width * p * wf * (0.72 if side else 1.0)
    arm_r = ident.limb_thickness * p * wf
    leg_r = 1.3 * arm_r
    layers: list[Layer] = []

    def add(part: Part | None, material: str) -> None:
        if part is not None:
            layers.append(Layer(part, material))

    # Legs: hip -> ankle, swinging in side views, one foot lifting in front/back views.
    legs = []
    for i in range(2):
        if side:
            angle = view.leg_swing * math.sin(view.phase + i * math.pi)
            length = ankle_y - hip_y
            hx = cx
            legs.append((hip_y, hx, hip_y + length * math.cos(angle), hx + facing * length * math.sin(angle)))
        else:
            sign = -1 if i == 0 else 1
            hx = cx + sign * hw * 0.5
            lift = 0.06 * p * view.leg_swing * max(0.0, math.sin(view.phase + i * math.pi))
            legs.append((hip_y, hx, ankle_y - lift, hx + sign * 0.12 * hw))
    # Arms: shoulder -> hand.
    arm_len = 0.36 * p
    arms = []
    for i in range(2):
        if side:
            angle = -view.arm_swing * math.sin(view.phase + i * math.pi)
            sy, sx = shoulder_y + arm_r, cx + facing * 0.1 * sw
            arms.append((sy, sx, sy + arm_len * math.cos(angle), sx + facing * arm_len * math.sin(angle)))
        else:
            sign = -1 if i == 0 else 1
            sy, sx = shoulder_y + arm_r, cx + sign * (sw - 0.5 * arm_r)
            swing = 0.05 * p * view.arm_swing * math.sin(view.phase + i * math.pi)
            arms.append((sy, sx, sy + arm_len - abs(swing), sx + sign * 0.6 * arm_r))
    bag_x_sign = ident.bag_side * (1 if front else -1)
    long_hair_part = (grid.trapezoid(head_cy, shoulder_y + 0.1 * p, cx - facing * 0.4 * head_rx, 1.05 * head_rx, 1.35 * head_rx)
                      if ident.long_hair else None)

    if not back:
        add(long_hair_part, "hair")
    if side and ident.bag is not None and ident.bag_side != facing:
        add(grid.trapezoid(hip_y - 0.05 * p, hip_y + 0.07 * p, cx - facing * 0.05 * p, 0.05 * p, 0.05 * p), "bag")
    if side:  # far arm, behind the torso
        sy, sx, hy, hx = arms[1]
        add(grid.capsule(sy, sx, hy, hx, arm_r), "skin_shadow")
        cover = 0.9 if outfit.long_sleeves else 0.4
        add(grid.capsule(sy, sx, sy + cover * (hy - sy), sx + cover * (hx - sx), arm_r * 1.15), "upper_shadow")
    # Legs and lower garment.
    if outfit.lower_kind != "trousers":
        for y0, x0, y1, x1 in legs:
            add(grid.capsule(y0, x0, y1, x1, leg_r), "skin")
    lower_parts = [grid.trapezoid(hip_y - 0.04 * p, hip_y + 0.07 * p, cx, hw, hw * 0.95)]
    if outfit.lower_kind == "trousers":
        lower_parts += [grid.capsule(y0, x0, y1, x1, leg_r * 1.15) for y0, x0, y1, x1 in legs]
    elif outfit.lower_kind == "shorts":
        lower_parts += [grid.capsule(y0, x0, y0 + 0.4 * (y1 - y0), x0 + 0.4 * (x1 - x0), leg_r * 1.4) for y0, x0, y1, x1 in legs]
    else:
        lower_parts.append(grid.trapezoid(hip_y - 0.04 * p, hip_y + 0.26 * p, cx, hw, hw * (1.4 if side else 1.65)))
    add(grid.union(*lower_parts), "lower")
    for _, _, y1, x1 in legs:
        add(grid.ellipse(y1 + 0.018 * p, x1 + facing * leg_r * 0.7, 0.028 * p, leg_r * (1.8 if side else 1.2)), "shoes")
    # Torso and upper garment.
    torso = grid.trapezoid(shoulder_y - 0.2 * arm_r, hip_y + 0.05 * p, cx, sw, hw * 1.05)
    if side:
        add(torso, "upper")
    else:
        shoulders = [grid.ellipse(shoulder_y + 0.6 * arm_r, cx + s * (sw - 0.5 * arm_r), 1.4 * arm_r, 1.3 * arm_r) for s in (-1, 1)]
        add(grid.union(torso, *shoulders), "upper")
    if front and outfit.logo_colour is not None:
        add(grid.trapezoid(shoulder_y + 0.07 * p, shoulder_y + 0.13 * p, cx, 0.35 * sw, 0.35 * sw), "logo")
    if front and ident.backpack is not None:
        for s in (-1, 1):
            add(grid.capsule(shoulder_y, cx + s * 0.55 * sw, shoulder_y + 0.17 * p, cx + s * 0.62 * sw, 0.014 * p), "backpack")
    if ident.bag is not None and not side:
        bag_x = cx + bag_x_sign * (hw + 0.05 * p)
        add(grid.capsule(shoulder_y, cx - bag_x_sign * 0.6 * sw, hip_y - 0.05 * p, bag_x, 0.009 * p), "bag")
    if side and ident.backpack is not None:
        add(grid.trapezoid(shoulder_y + 0.01 * p, shoulder_y + 0.22 * p, cx - facing * (sw + 0.045 * p), 0.055 * p, 0.06 * p), "backpack")
    # Arms (both in front/back views, the near one in side views).
    for sy, sx, hy, hx in (arms if not side else arms[:1]):
        add(grid.capsule(sy, sx, hy, hx, arm_r), "skin")
        cover = 0.9 if outfit.long_sleeves else 0.4
        add(grid.capsule(sy, sx, sy + cover * (hy - sy), sx + cover * (hx - sx), arm_r * (1.12 if outfit.long_sleeves else 1.3)), "upper")
    if ident.bag is not None and (not side or ident.bag_side == facing):
        bag_x = cx + (bag_x_sign * (hw + 0.05 * p) if not side else facing * 0.02 * p)
        add(grid.trapezoid(hip_y - 0.05 * p, hip_y + 0.07 * p, bag_x, 0.05 * p, 0.055 * p), "bag")
    # Neck, head, hair, hat.
    add(grid.capsule(head_cy + 0.6 * head_ry, cx, shoulder_y, cx, 0.45 * head_r), "skin")
    head = grid.ellipse(head_cy, cx, head_ry, head_rx)
    add(head, "skin")
    hair = grid.ellipse(head_cy - 0.05 * head_ry, cx, head_ry * 1.08, head_rx * 1.08)
    if front:
        add(grid.keep_above(hair, head_cy - 0.3 * head_ry), "hair")
    elif back:
        add(hair, "hair")
        add(long_hair_part, "hair")
    else:
        add(grid.keep_cap(hair, head_cy - 0.3 * head_ry, cx + facing * 0.15 * head_rx, -facing), "hair")
    if back and ident.backpack is not None:
        add(grid.trapezoid(shoulder_y + 0.01 * p, shoulder_y + 0.23 * p, cx, 0.72 * sw, 0.75 * sw), "backpack")
    if ident.hat is not None:
        add(grid.keep_above(grid.ellipse(head_cy - 0.45 * head_ry, cx, 0.7 * head_ry, 1.12 * head_rx), head_cy - 0.2 * head_ry), "hat")
        if not back:
            brim_x = cx + facing * 0.9 * head_rx
            add(grid.capsule(head_cy - 0.25 * head_ry, brim_x - 1.1 * head_rx, head_cy - 0.25 * head_ry,
                             brim_x + 1.1 * head_rx, 0.1 * head_ry + 0.5), "hat")
    return layers


def _pattern(garment: Garment, grid: Grid, view: View) -> np.ndarray | None:
    """Pattern mask (1 = pattern yarn) of a garment in body coordinates."""
    if garment.pattern == "plain":
        return None
    period = garment.pattern_period * view.height_px
    u = np.floor((grid.xx - view.cx) / period)
    v = np.floor((grid.yy - (view.foot_y - view.height_px)) / period)
    if garment.pattern == "hstripes":
        return np.broadcast_to(v % 2, (grid.height, grid.width)).astype(np.float32)
    if garment.pattern == "vstripes":
        return np.broadcast_to(u % 2, (grid.height, grid.width)).astype(np.float32)
    if garment.pattern == "checks":
        return ((u + v) % 2).astype(np.float32)
    return (np.floor((grid.xx - view.cx + grid.yy) / period) % 2).astype(np.float32)


def _garments(ident: Identity) -> dict[str, Garment]:
    found = {"upper": ident.outfit.upper, "lower": ident.outfit.lower}
    for name in ("hat", "backpack", "bag"):
        garment = getattr(ident, name)
        if garment is not None:
            found[name] = garment
    return found


def _material_colour(material: str, ident: Identity, patterns: dict[str, np.ndarray | None],
                     window: tuple[slice, slice]) -> np.ndarray:
    """Colour (3,) of a material, or (h, w, 3) over ``window`` for a patterned garment."""
    base = material.removesuffix("_shadow")
    shadow = 0.7 if material.endswith("_shadow") else 1.0
    if base == "skin":
        colour: np.ndarray = np.asarray(ident.skin_colour, np.float32)
    elif base == "hair":
        colour = np.asarray(ident.hair_colour, np.float32)
    elif base == "shoes":
        colour = np.asarray(ident.outfit.shoes_colour, np.float32)
    elif base == "logo":
        colour = np.asarray(ident.outfit.logo_colour, np.float32)
    else:
        garment = _garments(ident)[base]
        colour = np.asarray(garment.colour, np.float32)
        mask = patterns.get(base)
        if mask is not None:
            colour = colour + mask[window][..., None] * (np.asarray(garment.pattern_colour, np.float32) - colour)
    return colour * shadow


def _material_temperature(material: str, ident: Identity, patterns: dict[str, np.ndarray | None],
                          window: tuple[slice, slice]) -> np.ndarray | float:
    """Thermal level of a material: skin warmest, garments by insulation, bags near ambient."""
    base = material.removesuffix("_shadow")
    if base == "skin":
        return ident.skin_temperature
    if base == "hair":
        return ident.hair_temperature
    if base == "shoes":
        return SHOE_TEMPERATURE
    if base == "logo":
        return ident.outfit.upper.temperature(ident.skin_temperature) + 0.04
    garment = _garments(ident)[base]
    level = garment.temperature(ident.skin_temperature)
    if base in ("backpack", "bag"):
        level = BAG_TEMPERATURE + 0.2 * (level - BAG_TEMPERATURE)
    mask = patterns.get(base)
    return level if mask is None else level + garment.pattern_thermal_delta * mask[window]


def _clutter(rng: np.random.Generator, colour: np.ndarray, thermal: np.ndarray, grid: Grid, amount: float) -> None:
    """Small background objects painted onto one crop."""
    for _ in range(int(rng.poisson(3 * amount))):
        cy, cx = rng.uniform(0, grid.height), rng.uniform(0, grid.width)
        part = grid.ellipse(cy, cx, grid.height * rng.uniform(0.03, 0.12), grid.width * rng.uniform(0.05, 0.3))
        rgb, level = np.asarray(muted_colour(rng, 0.4), np.float32), rng.uniform(0.15, 0.6)
        if part is not None:
            colour[part.window] += part.alpha[..., None] * (rgb - colour[part.window])
            thermal[part.window] += part.alpha * (level - thermal[part.window])


def _occluder(rng: np.random.Generator, grid: Grid) -> tuple[Part | None, np.ndarray, float]:
    """A foreground object (bin, railing, bench) hiding the lower part of the person."""
    y0 = grid.height * (1 - rng.uniform(0.08, 0.25))
    x0 = rng.uniform(-0.3, 0.7) * grid.width
    quarter = 0.25 * grid.width
    part = grid.trapezoid(y0, grid.height + 2, x0 + quarter, quarter * rng.uniform(0.6, 1.6), quarter * rng.uniform(0.6, 1.6))
    return part, np.asarray(muted_colour(rng, 0.3), np.float32), float(rng.uniform(0.2, 0.45))


def render_person_image(ident: Identity, camera: CameraSpec, scene: Scene, rng: np.random.Generator,
                        grid: Grid, difficulty: Difficulty, viewpoint: str | None = None) -> np.ndarray:
    """One H x W x 3 uint8 image of ``ident`` seen by ``camera``; infrared images have R = G = B."""
    view = sample_view(rng, camera, grid, difficulty, viewpoint)
    offset = int(rng.integers(0, scene.colour.shape[1] - grid.width + 1))
    bg_colour, bg_thermal = scene.crop(offset, grid.width)
    _clutter(rng, bg_colour, bg_thermal, grid, difficulty.clutter)
    occluder = _occluder(rng, grid) if rng.random() < 0.25 * difficulty.clutter else None
    layers = person_layers(ident, view, grid)
    patterns = {name: _pattern(g, grid, view) for name, g in _garments(ident).items()}
    if camera.modality == Modality.VISIBLE:
        return _expose_visible(ident, camera, rng, grid, layers, patterns, bg_colour, occluder, difficulty)
    return _expose_thermal(ident, camera, rng, layers, patterns, bg_thermal, occluder)


def _expose_visible(ident: Identity, camera: CameraSpec, rng: np.random.Generator, grid: Grid, layers: list[Layer],
                    patterns: dict[str, np.ndarray | None], image: np.ndarray,
                    occluder: tuple[Part | None, np.ndarray, float] | None, difficulty: Difficulty) -> np.ndarray:
    light_dir = rng.uniform(-0.15, 0.15)
    for layer in layers:
        part = layer.part
        colour = _material_colour(layer.material, ident, patterns, part.window)
        shade = (1.0 - 0.4 * part.radial * part.radial)[..., None]
        image[part.window] += part.alpha[..., None] * (colour * shade - image[part.window])
    if occluder is not None and occluder[0] is not None:
        part = occluder[0]
        image[part.window] += part.alpha[..., None] * (occluder[1] - image[part.window])
    gain = float(camera.gain * math.exp(difficulty.illumination_variation * rng.normal(0, 0.12)))
    tilt = 1.0 + light_dir * (grid.xx[0] / grid.width - 0.5)
    image *= (gain * tilt)[:, None] * np.asarray(camera.colour_cast, np.float32)
    if camera.low_light:
        image = np.maximum(image, 0) ** 1.2
    image = gaussian_filter(image, sigma=(camera.blur, camera.blur, 0))
    image += np.float32(0.015 * camera.noise) * rng.standard_normal(image.shape, dtype=np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _expose_thermal(ident: Identity, camera: CameraSpec, rng: np.random.Generator, layers: list[Layer],
                    patterns: dict[str, np.ndarray | None], image: np.ndarray,
                    occluder: tuple[Part | None, np.ndarray, float] | None) -> np.ndarray:
    for layer in layers:
        part = layer.part
        level = _material_temperature(layer.material, ident, patterns, part.window)
        cooled = AMBIENT_TEMPERATURE + (level - AMBIENT_TEMPERATURE) * (1.0 - 0.25 * part.radial * part.radial)
        image[part.window] += part.alpha * (cooled - image[part.window])
    if occluder is not None and occluder[0] is not None:
        part = occluder[0]
        image[part.window] += part.alpha * (occluder[2] - image[part.window])
    low, high = camera.thermal_range
    image = (image - low) * float(math.exp(rng.normal(0, 0.06)) / (high - low))
    image = gaussian_filter(image, sigma=camera.blur)
    column_noise = np.random.default_rng(camera.fixed_pattern_seed).normal(0, 0.012 * camera.noise, image.shape[1])
    image += column_noise.astype(np.float32)[None, :]
    image += np.float32(0.025 * camera.noise) * rng.standard_normal(image.shape, dtype=np.float32)
    grey = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)
