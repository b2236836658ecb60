"""Batched feature extraction of image records with a :class:`~vireid.models.base.ReIDModel`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vireid.data.records import ImageRecord
from vireid.data.transforms import TransformConfig, load_eval_image
from vireid.models.base import ReIDModel

_DEFAULT_WORKERS = 0


def set_default_workers(count: int) -> None:
    """Loader processes of :func:`extract_features` calls that do not pass ``num_workers``
    (the ``--workers`` option of the commands that extract features)."""
    global _DEFAULT_WORKERS
    if count < 0:
        raise ValueError(f"loader workers must be >= 0, got {count}")
    _DEFAULT_WORKERS = count


class EvalImages(Dataset[tuple[torch.Tensor, int]]):
    """Records -> (normalised image at the configured size, modality index)."""

    def __init__(self, records: Sequence[ImageRecord], cfg: TransformConfig) -> None:
        self.records = list(records)
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        record = self.records[index]
        return load_eval_image(record.path, self.cfg), int(record.modality)


@torch.no_grad()
def extract_features(model: ReIDModel, records: Sequence[ImageRecord], cfg: TransformConfig, *,
                     device: torch.device | str = "cpu", batch_size: int = 64, flip: bool = False,
                     num_workers: int | None = None, channels_last: bool = False) -> dict[str, np.ndarray]:
    """Every entry of ``model.extract`` for all ``records`` (in order) as float32 arrays.

    ``flip``: average each entry over the image and its horizontal mirror. ``num_workers``
    loader processes read and resize the images (default: :func:`set_default_workers`, 0);
    batches go to a CUDA device from pinned memory.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    workers = _DEFAULT_WORKERS if num_workers is None else num_workers
    loader = DataLoader(EvalImages(records, cfg), batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    chunks: dict[str, list[np.ndarray]] = {}
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, modality in loader:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        modality = modality.to(device, non_blocking=True)
        out = model.extract(images, modality)
        if flip:
            mirrored = model.extract(images.flip(-1), modality)
            out = {k: (v + mirrored[k]) / 2 for k, v in out.items()}
        for key, value in out.items():
            chunks.setdefault(key, []).append(value.float().cpu().numpy())
    model.train(was_training)
    return {k: np.concatenate(v) for k, v in chunks.items()}
