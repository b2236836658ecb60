"""Identities of the synthetic dataset: body shape, outfit, accessories and thermal fabric.

Visible colour and thermal brightness are sampled independently: a garment's thermal
insulation is drawn per identity and per garment, never from its hue, so an infrared image
carries no information about colour.  What both modalities share is shape: body
proportions, sleeve and leg length, garment kind, pattern geometry, hair and accessories;
``Difficulty.infrared_luminance_coupling`` adds brightness (a light garment looks light in both).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, replace

import numpy as np

from vireid.data.synthetic.params import (
    TAG_IDENTITY, TAG_OUTFIT_MEMBERSHIP, TAG_OUTFIT_TEMPLATE, Difficulty, stream,
)

PATTERNS = ("plain", "hstripes", "vstripes", "checks", "diagonal")
AMBIENT_TEMPERATURE = 0.3
"""Thermal level (0..1 scale) of a garment with perfect insulation."""
INSULATION_RANGE = (0.45, 0.92)
"""Insulation of the warmest and the coolest garment."""


@dataclass(frozen=True)
class Garment:
    """A piece of clothing: visible colours and pattern, thermal insulation."""

    colour: tuple[float, float, float]
    pattern: str
    pattern_colour: tuple[float, float, float]
    pattern_period: float
    """Pattern period as a fraction of the person's height."""
    insulation: float
    """0 = as warm as skin in infrared, 1 = at ambient temperature."""
    pattern_thermal_delta: float
    """Thermal difference of the pattern yarn, independent of its colour."""

    def temperature(self, skin_temperature: float) -> float:
        return AMBIENT_TEMPERATURE + (1.0 - self.insulation) * (skin_temperature - AMBIENT_TEMPERATURE)


@dataclass(frozen=True)
class Outfit:
    upper: Garment
    lower: Garment
    long_sleeves: bool
    lower_kind: str
    """'trousers', 'shorts' or 'skirt'."""
    shoes_colour: tuple[float, float, float]
    logo_colour: tuple[float, float, float] | None
    """A chest print seen only from the front."""


@dataclass(frozen=True)
class Identity:
    """Everything that stays fixed for one person across cameras and modalities."""

    pid: int
    female: bool
    shoulder_width: float
    hip_width: float
    head_size: float
    leg_ratio: float
    limb_thickness: float
    skin_colour: tuple[float, float, float]
    skin_temperature: float
    hair_colour: tuple[float, float, float]
    long_hair: bool
    hair_temperature: float
    outfit: Outfit
    hat: Garment | None
    backpack: Garment | None
    bag: Garment | None
    bag_side: int
    """+1: bag on the person's left hip (image right in a front view), -1: right hip."""


def _rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1)))
    return (r, g, b)


def muted_colour(rng: np.random.Generator, amount: float = 0.55) -> tuple[float, float, float]:
    """A clothing colour mixed towards grey: furniture, walls, street objects."""
    c = np.asarray(clothing_colour(rng)) * (1 - amount) + 0.5 * amount
    return (float(c[0]), float(c[1]), float(c[2]))


def clothing_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    """A garment colour: many neutrals and dark tones, some saturated colours."""
    kind = rng.random()
    if kind < 0.33:
        return _rgb(rng.random(), rng.uniform(0.0, 0.12), rng.choice([rng.uniform(0.06, 0.25), rng.uniform(0.3, 0.95)]))
    if kind < 0.5:
        return _rgb(rng.random(), rng.uniform(0.4, 0.9), rng.uniform(0.2, 0.45))
    return _rgb(rng.random(), rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0))


def _thermal_contrast(rng: np.random.Generator) -> float:
    """Thermal offset of a pattern yarn: a random sign and size, never so small the pattern vanishes in IR."""
    return float(rng.choice([-1.0, 1.0]) * rng.uniform(0.05, 0.14))


def _garment(rng: np.random.Generator, colour: tuple[float, float, float] | None = None, patterned: bool = True) -> Garment:
    pattern = str(rng.choice(PATTERNS, p=[0.45, 0.2, 0.1, 0.15, 0.1])) if patterned else "plain"
    return Garment(
        colour=colour if colour is not None else clothing_colour(rng),
        pattern=pattern,
        pattern_colour=clothing_colour(rng),
        pattern_period=float(rng.uniform(0.035, 0.07)),
        insulation=float(rng.uniform(*INSULATION_RANGE)),
        pattern_thermal_delta=_thermal_contrast(rng),
    )


def sample_outfit(rng: np.random.Generator, female: bool) -> Outfit:
    """Garment colours, patterns and kinds (thermal fields are re-drawn per identity)."""
    upper = _garment(rng)
    denim = rng.random() < 0.3
    lower_colour = _rgb(rng.uniform(0.57, 0.64), rng.uniform(0.35, 0.7), rng.uniform(0.25, 0.6)) if denim else None
    lower = _garment(rng, lower_colour, patterned=rng.random() < 0.25)
    kinds = ("trousers", "shorts", "skirt")
    lower_kind = str(rng.choice(kinds, p=[0.6, 0.15, 0.25] if female else [0.78, 0.22, 0.0]))
    return Outfit(
        upper=upper,
        lower=lower,
        long_sleeves=bool(rng.random() < 0.55),
        lower_kind=lower_kind,
        shoes_colour=_rgb(rng.random(), rng.uniform(0, 0.4), rng.uniform(0.05, 0.9)),
        logo_colour=clothing_colour(rng) if rng.random() < 0.3 else None,
    )


def _own_copy(garment: Garment, rng: np.random.Generator) -> Garment:
    """A shared garment as one group member wears it: colour jittered, its own thermal fabric."""
    return replace(
        garment, colour=_jitter(garment.colour, rng), insulation=float(rng.uniform(*INSULATION_RANGE)),
        pattern_thermal_delta=_thermal_contrast(rng),
    )


def _jitter(colour: tuple[float, float, float], rng: np.random.Generator, amount: float = 0.04) -> tuple[float, float, float]:
    c = np.clip(np.asarray(colour) + rng.normal(0, amount, 3), 0, 1)
    return (float(c[0]), float(c[1]), float(c[2]))


def _couple_to_luminance(garment: Garment, coupling: float) -> Garment:
    """Move a garment's insulation by ``coupling`` towards the level its visible luminance implies
    (luminance 1: warmest, 0: coolest), so a light garment is light in infrared too."""
    r, g, b = garment.colour
    luminance = 0.299 * r + 0.587 * g + 0.114 * b
    low, high = INSULATION_RANGE
    implied = high - (high - low) * luminance
    return replace(garment, insulation=(1.0 - coupling) * garment.insulation + coupling * implied)


def outfit_template_index(seed: int, pid: int, num_ids: int, difficulty: Difficulty) -> int | None:
    """Which shared outfit ``pid`` wears, or None for an outfit of its own."""
    rng = stream(seed, TAG_OUTFIT_MEMBERSHIP, pid)
    num_templates = max(1, round(num_ids * difficulty.shared_outfit_fraction / difficulty.outfit_group_size))
    if difficulty.shared_outfit_fraction <= 0 or rng.random() >= difficulty.shared_outfit_fraction:
        return None
    return int(rng.integers(num_templates))


def sample_identity(seed: int, pid: int, num_ids: int, difficulty: Difficulty) -> Identity:
    """The identity ``pid`` of the set rendered with ``seed`` (shared outfits per ``difficulty``)."""
    rng = stream(seed, TAG_IDENTITY, pid)
    female = bool(rng.random() < 0.45)
    template = outfit_template_index(seed, pid, num_ids, difficulty)
    if template is None:
        outfit = sample_outfit(rng, female)
    else:
        shared = sample_outfit(stream(seed, TAG_OUTFIT_TEMPLATE, template), female)
        lower_kind = "trousers" if shared.lower_kind == "skirt" and not female else shared.lower_kind
        outfit = Outfit(
            upper=_own_copy(shared.upper, rng),
            lower=_own_copy(shared.lower, rng),
            long_sleeves=shared.long_sleeves, lower_kind=lower_kind,
            shoes_colour=_jitter(shared.shoes_colour, rng), logo_colour=shared.logo_colour,
        )
    tone = rng.random()
    skin = np.array([0.96, 0.80, 0.69]) * (1 - tone) + np.array([0.42, 0.28, 0.2]) * tone
    hair_kind = rng.random()
    if hair_kind < 0.6:
        hair = _rgb(0.07, 0.5, rng.uniform(0.05, 0.2))
    elif hair_kind < 0.85:
        hair = _rgb(0.07, rng.uniform(0.4, 0.7), rng.uniform(0.25, 0.5))
    elif hair_kind < 0.95:
        hair = _rgb(0.12, rng.uniform(0.3, 0.6), rng.uniform(0.6, 0.9))
    else:
        hair = _rgb(0.0, 0.0, rng.uniform(0.5, 0.8))
    width_scale = 0.88 if female else 1.0
    identity = Identity(
        pid=pid,
        female=female,
        shoulder_width=float(rng.uniform(0.1, 0.14) * width_scale),
        hip_width=float(rng.uniform(0.075, 0.105) * (1.1 if female else 1.0)),
        head_size=float(rng.uniform(0.058, 0.075)),
        leg_ratio=float(rng.uniform(0.44, 0.52)),
        limb_thickness=float(rng.uniform(0.022, 0.034)),
        skin_colour=(float(skin[0]), float(skin[1]), float(skin[2])),
        skin_temperature=float(rng.uniform(0.88, 0.97)),
        hair_colour=hair,
        long_hair=bool(rng.random() < (0.7 if female else 0.08)),
        hair_temperature=float(rng.uniform(0.5, 0.66)),
        outfit=outfit,
        hat=_garment(rng, patterned=False) if rng.random() < 0.18 else None,
        backpack=_garment(rng, patterned=False) if rng.random() < 0.3 else None,
        bag=_garment(rng, patterned=False) if rng.random() < 0.25 else None,
        bag_side=int(rng.choice([-1, 1])),
    )
    coupling = difficulty.infrared_luminance_coupling
    if coupling == 0:
        return identity
    accessories = {name: _couple_to_luminance(garment, coupling) for name in ("hat", "backpack", "bag")
                   if (garment := getattr(identity, name)) is not None}
    upper, lower = (_couple_to_luminance(g, coupling) for g in (outfit.upper, outfit.lower))
    return replace(identity, outfit=replace(outfit, upper=upper, lower=lower), **accessories)
