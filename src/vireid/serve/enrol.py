"""Turning image files or uploads into features and index items."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vireid.data.records import Modality
from vireid.serve.encoder import Encoder, encode_images, read_image_file
from vireid.serve.index import GalleryItem, NewImage, Progress

ENCODE_BATCH = 16


def encode_sources(encoder: Encoder, sources: Sequence[tuple[Path, GalleryItem]], *, keep_images: bool = True,
                   progress: Progress | None = None, batch_size: int = ENCODE_BATCH) -> tuple[np.ndarray, list[NewImage]]:
    """Decode and encode every source (each with its item's modality stream), in order.

    ``keep_images``: store the image bytes in the index (thumbnails and ``GET /gallery/{id}``);
    the content hash is kept either way (the same content is enrolled once).
    Reports ``encoded i/N images`` after every batch.
    """
    feats: list[np.ndarray] = []
    out: list[NewImage] = []
    total = len(sources)
    for start in range(0, total, batch_size):
        chunk = sources[start:start + batch_size]
        decoded = [read_image_file(path) for path, _ in chunk]
        rows = np.empty((len(chunk), 0), np.float32)
        for modality in {item.modality for _, item in chunk}:
            members = [i for i, (_, item) in enumerate(chunk) if item.modality == modality]
            part = encode_images(encoder, [decoded[i][0] for i in members], Modality.parse(modality))
            if rows.shape[1] == 0:
                rows = np.empty((len(chunk), part.shape[1]), np.float32)
            rows[members] = part
        feats.append(rows)
        out += [NewImage(item=item, data=decoded[i][1] if keep_images else None,
                         sha256=hashlib.sha256(decoded[i][1]).hexdigest()) for i, (_, item) in enumerate(chunk)]
        if progress is not None:
            progress(f"encoded {min(start + batch_size, total)}/{total} images")
    return np.concatenate(feats), out
