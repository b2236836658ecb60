"""Training / evaluation transforms and the image dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vireid.data.image_dataset import ImageDataset
from vireid.data.records import ImageRecord, Modality
from vireid.data.transforms import (
    EvalTransform,
    TrainTransform,
    TransformConfig,
    channel_augmentation,
    grayscale,
    load_eval_image,
    load_image,
    pad_random_crop,
    random_erasing,
    replicate_channel,
)
from vireid.errors import InputError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image(h: int = 16, w: int = 8) -> torch.Tensor:
    return torch.rand(3, h, w, generator=_gen(0))


def test_pad_random_crop_is_a_shifted_window() -> None:
    image = _image()
    out = pad_random_crop(image, 2, _gen(1))
    assert out.shape == image.shape
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
    windows = [padded[:, t:t + 16, l:l + 8] for t in range(5) for l in range(5)]
    assert any(torch.equal(out, win) for win in windows)


def test_channel_augmentation_replicates_one_channel_or_gray() -> None:
    image = _image()
    outcomes = set()
    for seed in range(40):
        out = channel_augmentation(image, _gen(seed))
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
        matches = [c for c in range(3) if torch.equal(out[0], image[c])]
        outcomes.add(matches[0] if matches else "gray")
        if not matches:
            assert torch.allclose(out, grayscale(image))
    assert outcomes == {0, 1, 2, "gray"}


def test_random_erasing_sets_a_rectangle() -> None:
    image = torch.ones(3, 32, 16)
    out = random_erasing(image, _gen(3), value=0.0)
    zero_rows = (out[0] == 0).any(dim=1).nonzero().squeeze(1)
    zero_cols = (out[0] == 0).any(dim=0).nonzero().squeeze(1)
    assert len(zero_rows) > 0
    box = out[:, zero_rows.min():zero_rows.max() + 1, zero_cols.min():zero_cols.max() + 1]
    assert (box == 0).all() and (out == 0).sum() == box.numel()


def test_train_transform_deterministic_per_seed_and_gray_only_for_visible() -> None:
    cfg = TransformConfig(height=16, width=8, pad=2, channel_aug_prob=0.0, grayscale_prob=1.0, erasing_prob=0.0,
                          mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    transform = TrainTransform(cfg)
    image = _image()
    a = transform(image, Modality.VISIBLE, _gen(7))
    assert torch.equal(a, transform(image, Modality.VISIBLE, _gen(7)))
    assert torch.equal(a[0], a[1])
    ir = transform(image, Modality.INFRARED, _gen(7))
    assert not torch.equal(ir[0], ir[1])


def test_random_grayscale_modes() -> None:
    cfg = dict(height=16, width=8, pad=0, flip_prob=0.0, channel_aug_prob=0.0, grayscale_prob=1.0, erasing_prob=0.0,
               mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    image = _image()
    luma = TrainTransform(TransformConfig(**cfg))(image, Modality.VISIBLE, _gen(3))
    expected = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]      # ITU-R BT.601, by hand
    for c in range(3):
        torch.testing.assert_close(luma[c], expected)
    chosen = set()
    channel = TrainTransform(TransformConfig(**cfg, grayscale_mode="channel"))
    for seed in range(30):
        out = channel(image, Modality.VISIBLE, _gen(seed))
        source = [c for c in range(3) if torch.equal(out[0], image[c])]
        assert len(source) == 1 and torch.equal(out[1], out[0]) and torch.equal(out[2], out[0])
        chosen.add(source[0])
    assert chosen == {0, 1, 2}
    replicated = [replicate_channel(image, _gen(seed)) for seed in range(30)]
    assert {next(c for c in range(3) if torch.equal(r[2], image[c])) for r in replicated} == {0, 1, 2}
    # probability 0: untouched; infrared images are never converted
    untouched = TrainTransform(TransformConfig(**{**cfg, "grayscale_prob": 0.0}))(image, Modality.VISIBLE, _gen(3))
    assert torch.equal(untouched, image)
    assert torch.equal(channel(image, Modality.INFRARED, _gen(3)), image)


def test_random_grayscale_rate() -> None:
    cfg = TransformConfig(height=16, width=8, pad=0, flip_prob=0.0, channel_aug_prob=0.0, grayscale_prob=0.25,
                          erasing_prob=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    image = _image()
    gray = sum(bool(torch.equal(out[0], out[1])) for out in
               (TrainTransform(cfg)(image, Modality.VISIBLE, _gen(seed)) for seed in range(400)))
    assert 70 <= gray <= 130                     # 100 expected (binomial sd 8.7)


def test_config_validation() -> None:
    with pytest.raises(InputError, match="erasing_prob"):
        TransformConfig(erasing_prob=1.5).validate()


def test_dataset_loads_resizes_and_labels(tmp_path: Path) -> None:
    pixels = (np.arange(20 * 10 * 3) % 255).astype(np.uint8).reshape(20, 10, 3)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    record = ImageRecord(tmp_path / "a.png", pid=42, cam=3, modality=Modality.INFRARED)
    cfg = TransformConfig(height=16, width=8)
    dataset = ImageDataset([record], 16, 8, TrainTransform(cfg), labels={42: 0})
    image, label, modality, cam = dataset[(0, 11)]
    assert image.shape == (3, 16, 8) and (label, modality, cam) == (0, 1, 3)
    assert torch.equal(image, dataset[(0, 11)][0])
    eval_image = load_eval_image(tmp_path / "a.png", cfg)
    assert torch.allclose(eval_image, EvalTransform(cfg)(load_image(tmp_path / "a.png", 16, 8)))
    with pytest.raises(InputError, match="missing.png"):
        load_image(tmp_path / "missing.png", 16, 8)
