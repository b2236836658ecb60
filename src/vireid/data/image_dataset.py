"""A torch ``Dataset`` over :class:`~vireid.data.records.ImageRecord` lists."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vireid.data.records import ImageRecord, Modality
from vireid.data.transforms import load_image

Transform = Callable[[Tensor, Modality, torch.Generator], Tensor]
Sample = tuple[Tensor, int, int, int]


class ImageDataset(Dataset[Sample]):
    """``dataset[i]`` or ``dataset[(i, seed)]`` -> (image, label, modality, cam).

    ``labels`` maps original person ids to training labels (``records.relabel``); without
    it the label is the original pid. The image is loaded at (height, width) and passed to
    ``transform(image, modality, generator)`` with a generator seeded by ``seed`` (0 when
    indexed by a plain integer), so augmentation never touches global random state.
    """

    def __init__(self, records: Sequence[ImageRecord], height: int, width: int, transform: Transform,
                 labels: Mapping[int, int] | None = None) -> None:
        self.records = list(records)
        self.height = height
        self.width = width
        self.transform = transform
        self.labels = labels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        record = self.records[index]
        generator = torch.Generator().manual_seed(int(seed))
        image = self.transform(load_image(record.path, self.height, self.width), record.modality, generator)
        label = self.labels[record.pid] if self.labels is not None else record.pid
        return image, int(label), int(record.modality), int(record.cam)
