"""From a trained model to a feature file: dataset -> protocol -> features of every image it uses.

Features are extracted once for the union of all trials' query and gallery images
(:func:`vireid.data.protocols.protocol_images`); the trials are index rows of the feature file.
Extra outputs of ``model.extract`` become ``query_<name>`` / ``gallery_<name>`` arrays, then
``model.finalize_features`` may transform the whole set (cm-SSFT's test-time transfer).

With the records of the validation identities a run held out of training
(:func:`held_out_records`), the same protocol rule is applied to them
(:func:`vireid.data.protocols.build_validation_protocol`) and their features, finalised the same
way, become ``FeatureSet.validation`` (the file's ``val_*`` keys): inference parameters are chosen
on them, never on the test set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vireid.data.datasets import build_dataset
from vireid.data.protocols import Protocol, build_protocol, build_validation_protocol, protocol_feature_set, protocol_images
from vireid.data.records import ImageRecord, Modality
from vireid.data.transforms import TransformConfig
from vireid.engine.extraction import extract_features
from vireid.engine.validation import split_validation_identities
from vireid.features import FeatureSet
from vireid.models.base import ReIDModel

if TYPE_CHECKING:
    from vireid.engine.config import TrainConfig


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
    validation_records: Sequence[ImageRecord] = (),
    validation_query: Modality = Modality.INFRARED,
) -> FeatureSet:
    """Features of every image ``protocol`` uses on ``dataset`` at ``root``, as a multi-trial FeatureSet.

    ``validation_records``: the held-out training identities (:func:`held_out_records`); their
    features under the same protocol rule become ``.validation``; ``validation_query`` is the
    query modality where the protocol leaves it open (``market``).
    """
    data = build_dataset(dataset, root, **(dataset_options or {}))
    proto = build_protocol(protocol, data, **(protocol_params or {}))
    model = model.to(device)
    # paths relative to the dataset folder; a manifest (root = its CSV file) may point anywhere: absolute paths
    image_root = data.root if data.root.is_dir() else None
    options = {"image_root": image_root, "device": device, "batch_size": batch_size, "flip": flip}
    features = _protocol_features(model, proto, transforms, **options,
                                  meta={**(meta or {}), "dataset": {"name": dataset, "root": str(root)}, "flip": flip})
    features = model.finalize_features(features, **(finalize_options or {}))
    if validation_records:
        val_proto = build_validation_protocol(protocol, validation_records, query_modality=validation_query,
                                              **(protocol_params or {}))
        validation = _protocol_features(model, val_proto, transforms, **options, meta={})
        features.validation = model.finalize_features(validation, **(finalize_options or {}))
        features.meta["validation"] = {"num_ids": len({r.pid for r in validation_records}),
                                       "protocol": validation.meta["protocol"]}
    return features


def _protocol_features(model: ReIDModel, proto: Protocol, transforms: TransformConfig, *, image_root: Path | None,
                       device: torch.device | str, batch_size: int, flip: bool, meta: dict[str, Any]) -> FeatureSet:
    """Features of the images of ``proto`` with every extra output of ``model.extract``, not finalised."""
    queries, galleries = protocol_images(proto)
    q_out = extract_features(model, queries, transforms, device=device, batch_size=batch_size, flip=flip)
    g_out = extract_features(model, galleries, transforms, device=device, batch_size=batch_size, flip=flip)
    features = protocol_feature_set(proto, q_out.pop("feat"), g_out.pop("feat"), root=image_root, meta=meta)
    for side, outputs in (("query", q_out), ("gallery", g_out)):
        for key, value in outputs.items():
            features.extras[f"{side}_{key}"] = np.asarray(value, dtype=np.float32)
    return features


def held_out_records(cfg: TrainConfig, dataset: str | None = None, root: str | None = None) -> list[ImageRecord]:
    """The validation identities' records of the run configured by ``cfg`` (``data.val_ids`` drawn
    with ``data.val_seed`` from its training records, as the trainer drew them); empty when the run
    held none out, or when ``dataset`` / ``root`` name other data than the run trained on."""
    if cfg.data.val_ids == 0 or (dataset or cfg.data.dataset) != cfg.data.dataset or (root or cfg.data.root) != cfg.data.root:
        return []
    train = build_dataset(cfg.data.dataset, cfg.data.root, **cfg.data.options).train
    return split_validation_identities(list(train), cfg.data.val_ids, cfg.data.val_seed)[1]


def validation_query_modality(cfg: TrainConfig) -> Modality:
    """The query modality of the run's validation (``data.val_mode``)."""
    return Modality.INFRARED if cfg.data.val_mode == "ir_to_vis" else Modality.VISIBLE
