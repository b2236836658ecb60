"""Train a method's tiny config for 2 epochs on CPU and check it learned (shared by test_method_*.py).

The data is a tiny rendered synthetic SYSU-MM01-layout set (``vireid.data.synthetic``, 32×16
images), read by the real SYSU adapter. ``write_tiny_manifest`` writes an even smaller
identity-coloured CSV-manifest set for tests of the engine itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from vireid.data.datasets import build_dataset
from vireid.data.image_dataset import ImageDataset
from vireid.data.records import relabel
from vireid.data.synthetic import SynthConfig, render_dataset
from vireid.data.transforms import TransformConfig, TrainTransform
from vireid.engine.checkpoint import load_checkpoint_model
from vireid.engine.config import load_train_config
from vireid.engine.extraction import extract_features
from vireid.engine.trainer import train
from vireid.engine.validation import split_validation_identities
from vireid.models import ModelConfig
from vireid.models.registry import create_model

REPO = Path(__file__).resolve().parents[1]
ModelT = TypeVar("ModelT", bound=torch.nn.Module)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_model(method: str, model_type: type[ModelT], params: dict[str, object], **fields: object) -> ModelT:
    """A seeded resnet10 ``method`` model with 4 classes and no pretrained weights."""
    torch.manual_seed(0)
    cfg = ModelConfig(method=method, backbone="resnet10", pretrained=None, params=dict(params), **fields)
    model = create_model(cfg, num_classes=4)
    assert isinstance(model, model_type)
    return model


def random_batch(height: int, width: int, modality: list[int], labels: list[int]) -> tuple[torch.Tensor, ...]:
    """Seeded random images with the given modality and identity labels: (images, modality, labels)."""
    images = torch.randn(len(labels), 3, height, width, generator=seeded(1))
    return images, torch.tensor(modality), torch.tensor(labels)


def write_tiny_manifest(root: Path, ids: int = 10, per_modality: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = ["path,person_id,camera,modality,split"]
    for pid in range(ids):
        top, bottom = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
        for k in range(per_modality):
            base = np.zeros((32, 16, 3))
            base[:16], base[16:] = top, bottom
            noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255)
            for modality, cam, pixels in (("visible", 1, noisy), ("infrared", 3, noisy.mean(2, keepdims=True).repeat(3, 2))):
                name = f"{pid:02d}_{modality}_{k}.png"
                Image.fromarray(pixels.astype(np.uint8)).save(root / name)
                rows.append(f"{name},{pid},{cam},{modality},train")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def _fixed_batch_loss(model: torch.nn.Module, dataset: ImageDataset, indices: list[int]) -> float:
    """The model's training loss on one fixed batch (train-mode forward, no parameter update)."""
    items = [dataset[(i, 1234 + i)] for i in indices]
    images = torch.stack([it[0] for it in items])
    targets = torch.tensor([int(it[1]) for it in items])
    modality = torch.tensor([int(it[2]) for it in items])
    model.train()
    with torch.no_grad():
        loss, _ = model.compute_loss(model(images, modality), targets, modality)
    return float(loss)


def render_tiny_sysu(root: Path) -> Path:
    """12 synthetic identities in the SYSU-MM01 layout, 3 images per camera, 32×16 pixels."""
    render_dataset(SynthConfig("sysu", num_ids=12, seed=7, images_per_camera=3, height=32, width=16), root)
    return root


def train_tiny_config(method: str, tmp_path: Path, extra: tuple[str, ...] = ()) -> dict[str, object]:
    """Train ``configs/<method>_synthetic_tiny.yaml`` (2 epochs) on the tiny synthetic set; return what tests check."""
    root = render_tiny_sysu(tmp_path / "sysu")
    overrides = ["data.dataset=sysu", f"data.root={root}", "data.val_ids=2", "sampler.epoch_length=images",
                 f"output_dir={tmp_path / 'run'}", "progress_bar=false", "transforms.height=32",
                 "transforms.width=16", "transforms.pad=2", *extra]
    cfg = load_train_config(REPO / "configs" / f"{method}_synthetic_tiny.yaml", overrides)
    summary = train(cfg)

    train_records, val_records = split_validation_identities(
        list(build_dataset("sysu", root).train), cfg.data.val_ids, cfg.data.val_seed)
    label_map = relabel(train_records)
    trained, _ = load_checkpoint_model(tmp_path / "run" / "checkpoints" / "last.pt")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        initial = create_model(cfg.model, len(label_map))
    plain = TransformConfig(height=32, width=16, pad=0, flip_prob=0.0, channel_aug_prob=0.0, erasing_prob=0.0)
    dataset = ImageDataset(train_records, 32, 16, TrainTransform(plain), label_map)
    by_identity: dict[tuple[int, int], list[int]] = {}
    for i, r in enumerate(train_records):
        by_identity.setdefault((r.pid, int(r.modality)), []).append(i)
    pids = sorted({r.pid for r in train_records})[:4]
    batch = [i for pid in pids for m in (0, 1) for i in by_identity[(pid, m)][:2]]
    before = _fixed_batch_loss(initial, dataset, batch)
    after = _fixed_batch_loss(trained, dataset, batch)
    features = extract_features(trained.eval(), val_records, plain, batch_size=8)
    return {"summary": summary, "before": before, "after": after, "features": features}
