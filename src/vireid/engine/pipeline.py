"""From a trained model to a feature file: dataset -> protocol -> features of every image it uses.

Features are extracted once for the union of all trials' query and gallery images
(:func:`vireid.data.protocols.protocol_images`); the trials are index rows of the feature file.
Extra outputs of ``model.extract`` become ``query_<name>`` / ``gallery_<name>`` arrays, then
``model.finalize_features`` may transform the whole set (cm-SSFT's test-time transfer).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vireid.data.datasets import build_dataset
from vireid.data.protocols import build_protocol, protocol_feature_set, protocol_images
from vireid.data.transforms import TransformConfig
from vireid.engine.extraction import extract_features
from vireid.features import FeatureSet
from vireid.models.base import ReIDModel


def extract_protocol_features(
    model: ReIDModel,
    transforms: TransformConfig,
    *,
    dataset: str,
    root: str,
    protocol: str,
    protocol_params: dict[str, Any] | None = None,
    dataset_options: dict[str, Any] | None = None,
    flip: bool = False,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    finalize_options: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> FeatureSet:
    """Features of every image ``protocol`` uses on ``dataset`` at ``root``, as a multi-trial FeatureSet."""
    data = build_dataset(dataset, root, **(dataset_options or {}))
    proto = build_protocol(protocol, data, **(protocol_params or {}))
    queries, galleries = protocol_images(proto)
    model = model.to(device)
    q_out = extract_features(model, queries, transforms, device=device, batch_size=batch_size, flip=flip)
    g_out = extract_features(model, galleries, transforms, device=device, batch_size=batch_size, flip=flip)
    # paths relative to the dataset folder; a manifest (root = its CSV file) may point anywhere: absolute paths
    image_root = data.root if data.root.is_dir() else None
    features = protocol_feature_set(
        proto, q_out.pop("feat"), g_out.pop("feat"), root=image_root,
        meta={**(meta or {}), "dataset": {"name": dataset, "root": str(root)}, "flip": flip},
    )
    for side, outputs in (("query", q_out), ("gallery", g_out)):
        for key, value in outputs.items():
            features.extras[f"{side}_{key}"] = np.asarray(value, dtype=np.float32)
    return model.finalize_features(features, **(finalize_options or {}))
