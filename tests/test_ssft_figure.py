"""cm-SSFT reconstruction figure: de-normalisation to uint8 by hand-worked values, and the sheet a tiny
untrained model writes (input column = the file's pixels, enlarged; every tile the decoder's output)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vireid.data.records import Modality
from vireid.data.transforms import TransformConfig
from vireid.errors import InputError
from vireid.models.methods.ssft import SSFTModel
from vireid.models.methods.ssft_figure import _to_uint8, reconstruction_grid, save_png

from method_training import tiny_model

torch.set_num_threads(2)


def test_to_uint8_undoes_the_normalisation_hand_worked():
    cfg = TransformConfig(mean=(0.5, 0.25, 0.0), std=(0.25, 0.5, 1.0))
    image = torch.tensor([[[-3.0, 3.0, 1.0, 2.0]],        # ·0.25 + 0.5  -> -0.25, 1.25, 0.75, 1.0
                          [[0.0, 0.5, -1.0, 0.3]],        # ·0.5 + 0.25  ->  0.25, 0.5, -0.25, 0.4
                          [[0.2, 1.0, 0.8, -0.1]]])       # ·1 + 0       ->  0.2, 1.0, 0.8, -0.1
    # clamped to [0, 1], times 255, rounded half to even: 63.75 -> 64, 127.5 -> 128, 191.25 -> 191
    expected = np.array([[[0, 64, 51], [255, 128, 255], [191, 0, 204], [255, 102, 0]]], dtype=np.uint8)
    got = _to_uint8(image, cfg)
    assert got.dtype == np.uint8 and got.shape == (1, 4, 3)
    np.testing.assert_array_equal(got, expected)


def _denormalised(tile: torch.Tensor, cfg: TransformConfig) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) uint8, pixel by pixel."""
    out = np.zeros((tile.shape[1], tile.shape[2], 3), dtype=np.uint8)
    for c in range(3):
        for y in range(tile.shape[1]):
            for x in range(tile.shape[2]):
                value = min(max(float(tile[c, y, x]) * cfg.std[c] + cfg.mean[c], 0.0), 1.0)
                out[y, x, c] = round(value * 255)
    return out


def test_reconstruction_sheet_written_as_png(tmp_path):
    model = tiny_model("ssft", SSFTModel, {"discriminator_hidden": 16, "decoder_channels": 8, "graph_k": 2},
                       split="layer2", pooling="avg")
    cfg = TransformConfig(height=32, width=16)
    rng = np.random.default_rng(3)
    originals = [rng.integers(0, 256, size=(32, 16, 3), dtype=np.uint8) for _ in range(2)]
    paths = []
    for i, pixels in enumerate(originals):
        paths.append(tmp_path / f"person{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    sheet = reconstruction_grid(model, paths, [Modality.VISIBLE, Modality.INFRARED], cfg)
    out = tmp_path / "figure" / "sheet.png"
    out.parent.mkdir()
    save_png(sheet, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["sheet.png"]      # no temporary file left
    with Image.open(out) as written:
        assert written.format == "PNG" and written.size == (4 * 64, 14 + 2 * 128)   # 16 px wide: enlarged 4×
        pixels = np.asarray(written.convert("RGB"))
    images = torch.stack([(torch.from_numpy(p).permute(2, 0, 1).float() / 255
                           - torch.tensor(cfg.mean).view(3, 1, 1)) / torch.tensor(cfg.std).view(3, 1, 1)
                          for p in originals])
    with torch.no_grad():
        decoded = model.eval().reconstruct(images, torch.tensor([0, 1]))
    def enlarge(array: np.ndarray) -> np.ndarray:                   # nearest ×4
        return array.repeat(4, axis=0).repeat(4, axis=1)

    for r, original in enumerate(originals):
        row = pixels[14 + r * 128:14 + (r + 1) * 128]
        np.testing.assert_array_equal(row[:, :64], enlarge(original))   # the input, de-normalised exactly
        for c, name in enumerate(("shared", "specific", "full"), start=1):
            tile = row[:, c * 64:(c + 1) * 64].astype(int)
            expected = enlarge(_denormalised(decoded[name][r], cfg)).astype(int)
            assert np.abs(tile - expected).max() <= 1, name                # ±1: float rounding at .5
    assert pixels[:14].min() < 128 and pixels[:14].max() == 255                 # black captions on white


def test_reconstruction_grid_rejects_mismatched_modalities(tmp_path):
    model = tiny_model("ssft", SSFTModel, {"discriminator_hidden": 16, "decoder_channels": 8}, split="layer2")
    with pytest.raises(InputError, match=r"1 image\(s\) but 2 modality value\(s\)"):
        reconstruction_grid(model, [tmp_path / "a.png"], [Modality.VISIBLE, Modality.INFRARED],
                            TransformConfig(height=32, width=16))
