"""cm-SSFT reconstruction figure (like the paper's Fig. 3): per image, the input and the decoder's
reconstructions from the shared feature only, the specific feature only, and both."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from vireid.data.records import Modality
from vireid.data.transforms import TransformConfig, load_eval_image
from vireid.errors import InputError
from vireid.io import atomic_path
from vireid.models.methods.ssft import SSFTModel

COLUMNS = ("input", "shared", "specific", "full")
_CAPTION = 14
_MIN_TILE_WIDTH = 64  # small inputs are enlarged (nearest) so the captions fit


def _to_uint8(image: torch.Tensor, cfg: TransformConfig) -> np.ndarray:
    """Undo the input normalisation: (3, H, W) -> (H, W, 3) uint8."""
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    pixels = (image.float() * std + mean).clamp(0, 1)
    return (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def reconstruction_grid(model: SSFTModel, paths: Sequence[str | Path], modalities: Sequence[Modality],
                        cfg: TransformConfig) -> Image.Image:
    """One row per image: input, shared-only, specific-only and full reconstructions, captioned
    (tiles narrower than 64 px are enlarged by an integer factor). Runs on the model's device."""
    if len(paths) != len(modalities):
        raise InputError(f"{len(paths)} image(s) but {len(modalities)} modality value(s)")
    model.eval()
    images = torch.stack([load_eval_image(p, cfg) for p in paths])
    modality = torch.tensor([int(m) for m in modalities])
    device = next(model.parameters()).device
    decoded = {name: tiles.cpu() for name, tiles in model.reconstruct(images.to(device), modality.to(device)).items()}
    scale = -(-_MIN_TILE_WIDTH // cfg.width)
    height, width = cfg.height * scale, cfg.width * scale
    sheet = Image.new("RGB", (len(COLUMNS) * width, _CAPTION + len(paths) * height), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(COLUMNS):
        draw.text((c * width + 2, 1), name, fill="black")
    for r in range(len(paths)):
        tiles = [images[r], decoded["shared"][r], decoded["specific"][r], decoded["full"][r]]
        for c, tile in enumerate(tiles):
            tile_image = Image.fromarray(_to_uint8(tile, cfg)).resize((width, height), Image.NEAREST)
            sheet.paste(tile_image, (c * width, _CAPTION + r * height))
    return sheet


def save_png(image: Image.Image, path: str | Path) -> None:
    """Write a PNG atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
