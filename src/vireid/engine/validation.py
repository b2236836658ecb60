"""Model selection on identities held out of the *training* set, never on the test set."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vireid.data.records import ImageRecord, Modality
from vireid.data.transforms import TransformConfig
from vireid.engine.extraction import extract_features
from vireid.errors import InputError
from vireid.evaluation.metrics import evaluate_distance
from vireid.models.base import ReIDModel


def split_validation_identities(records: Sequence[ImageRecord], num_ids: int, seed: int
                                ) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(training records, validation records): ``num_ids`` identities with both modalities,
    drawn with ``seed``, move to the validation split."""
    if num_ids == 0:
        return list(records), []
    modalities: dict[int, set[Modality]] = {}
    for r in records:
        modalities.setdefault(r.pid, set()).add(r.modality)
    candidates = sorted(pid for pid, mods in modalities.items() if len(mods) == 2)
    if num_ids >= len(candidates):
        raise InputError(f"data.val_ids={num_ids}: only {len(candidates)} training identities have both "
                         "modalities, and some must remain for training")
    chosen = {int(p) for p in np.random.default_rng(seed).choice(candidates, size=num_ids, replace=False)}
    return [r for r in records if r.pid not in chosen], [r for r in records if r.pid in chosen]


def validation_metrics(model: ReIDModel, records: Sequence[ImageRecord], cfg: TransformConfig, *,
                       mode: str = "ir_to_vis", device: torch.device | str = "cpu", batch_size: int = 64,
                       channels_last: bool = False, num_workers: int = 0) -> dict[str, float]:
    """rank-1 / rank-5 / mAP / mINP (fractions) of one modality querying the other.

    Plain distance (negative inner product of L2-normalised features), image-level CMC, no
    camera removal (query and gallery come from different cameras by construction).
    """
    query_modality = Modality.INFRARED if mode == "ir_to_vis" else Modality.VISIBLE
    query = [r for r in records if r.modality == query_modality]
    gallery = [r for r in records if r.modality != query_modality]
    if not query or not gallery:
        raise InputError("validation split has no query or no gallery images")
    options = {"device": device, "batch_size": batch_size, "channels_last": channels_last, "num_workers": num_workers}
    q = extract_features(model, query, cfg, **options)["feat"]
    g = extract_features(model, gallery, cfg, **options)["feat"]
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    result = evaluate_distance(
        -(q @ g.T), np.array([r.pid for r in query]), np.array([r.pid for r in gallery]),
        np.array([r.cam for r in query]), np.array([r.cam for r in gallery]), protocol="regdb")
    return {"rank1": result.rank(1), "rank5": result.rank(5), "mAP": float(result.mAP), "mINP": float(result.mINP)}
