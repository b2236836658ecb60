"""Image loading and augmentation for VI-ReID training and extraction.

Training augmentation (AGW / CAJ recipe), applied to a (3, H, W) float image in [0, 1]:
pad + random crop, horizontal flip, for visible images CAJ's channel augmentation (one
random colour channel replicated, or the grayscale image) and/or random grayscale (the luma
image, or with ``grayscale_mode: channel`` one random colour channel replicated),
normalisation, random erasing. Every random draw comes from an explicit
``torch.Generator``, so a sample's augmentation is a pure function of its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vireid.data.records import Modality
from vireid.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R BT.601 luma weights (as PIL / torchvision grayscale).
LUMA = (0.299, 0.587, 0.114)


@dataclass
class TransformConfig:
    """Input size and augmentation probabilities (defaults: AGW on 288×144). CAJ's channel
    augmentation is in none of the implemented papers: off unless ``channel_aug_prob`` > 0."""

    height: int = 288
    width: int = 144
    pad: int = 10
    flip_prob: float = 0.5
    channel_aug_prob: float = 0.0
    grayscale_prob: float = 0.0
    grayscale_mode: Literal["luma", "channel"] = "luma"
    erasing_prob: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def validate(self) -> None:
        if self.height < 8 or self.width < 8:
            raise InputError(f"transforms: image size must be at least 8×8, got {self.height}×{self.width}")
        if self.pad < 0:
            raise InputError(f"transforms.pad must be >= 0, got {self.pad}")
        for name in ("flip_prob", "channel_aug_prob", "grayscale_prob", "erasing_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"transforms.{name} must be in [0, 1], got {value}")


def load_image(path: str | Path, height: int, width: int) -> Tensor:
    """Read an image as RGB, resize to (height, width) bilinearly; (3, H, W) float32 in [0, 1]."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((width, height), Image.BILINEAR)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: refused as a decompression bomb ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InputError(f"{path}: cannot read image ({exc})") from None
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def normalize(image: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    m = torch.tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image - m) / s


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def pad_random_crop(image: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Zero-pad by ``pad`` pixels on every side, then crop the original size at a random offset."""
    if pad == 0:
        return image
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    top, left = _randint(0, 2 * pad, generator), _randint(0, 2 * pad, generator)
    return padded[:, top:top + h, left:left + w]


def grayscale(image: Tensor) -> Tensor:
    """Luma replicated over the three channels."""
    luma = sum(w * image[c] for c, w in enumerate(LUMA))
    return luma.unsqueeze(0).expand(3, -1, -1).clone()


def replicate_channel(image: Tensor, generator: torch.Generator) -> Tensor:
    """One of R, G, B, chosen uniformly, replicated to three channels."""
    return image[_randint(0, 2, generator)].unsqueeze(0).expand(3, -1, -1).clone()


def channel_augmentation(image: Tensor, generator: torch.Generator) -> Tensor:
    """CAJ channel-adaptive gray (Ye et al., ICCV 2021): one of R, G, B replicated to three
    channels, or the grayscale image, chosen uniformly."""
    choice = _randint(0, 3, generator)
    if choice == 3:
        return grayscale(image)
    return image[choice].unsqueeze(0).expand(3, -1, -1).clone()


def random_erasing(image: Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.02, 0.4),
                   ratio: tuple[float, float] = (0.3, 3.3), value: float = 0.0, attempts: int = 10) -> Tensor:
    """Random erasing (Zhong et al., AAAI 2020): a rectangle of random area fraction in ``scale`` and
    aspect ratio in ``ratio`` (log-uniform) set to ``value``; no change if no rectangle fits."""
    _, h, w = image.shape
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * (scale[0] + (scale[1] - scale[0]) * _uniform(generator))
        aspect = math.exp(log_lo + (log_hi - log_lo) * _uniform(generator))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < eh < h and 0 < ew < w:
            top, left = _randint(0, h - eh, generator), _randint(0, w - ew, generator)
            out = image.clone()
            out[:, top:top + eh, left:left + ew] = value
            return out
    return image


class TrainTransform:
    """The training augmentation; ``transform(image, modality, generator)``."""

    def __init__(self, cfg: TransformConfig) -> None:
        self.cfg = cfg

    def __call__(self, image: Tensor, modality: Modality, generator: torch.Generator) -> Tensor:
        cfg = self.cfg
        image = pad_random_crop(image, cfg.pad, generator)
        if _uniform(generator) < cfg.flip_prob:
            image = image.flip(-1)
        if modality == Modality.VISIBLE:
            if _uniform(generator) < cfg.channel_aug_prob:
                image = channel_augmentation(image, generator)
            if _uniform(generator) < cfg.grayscale_prob:
                image = grayscale(image) if cfg.grayscale_mode == "luma" else replicate_channel(image, generator)
        image = normalize(image, cfg.mean, cfg.std)
        if _uniform(generator) < cfg.erasing_prob:
            image = random_erasing(image, generator)
        return image


class EvalTransform:
    """Extraction-time preprocessing: normalisation only (images are loaded at the input size)."""

    def __init__(self, cfg: TransformConfig) -> None:
        self.cfg = cfg

    def __call__(self, image: Tensor, modality: Modality | None = None, generator: torch.Generator | None = None) -> Tensor:
        return normalize(image, self.cfg.mean, self.cfg.std)


def load_eval_image(path: str | Path, cfg: TransformConfig) -> Tensor:
    """An image ready for the model at test time: (3, H, W), resized and normalised."""
    return EvalTransform(cfg)(load_image(path, cfg.height, cfg.width))
