"""XIV: cross-modal re-identification with an auxiliary X modality (Li et al., AAAI 2020).

Equation numbers are the paper's. A lightweight generator turns each visible image V of the batch
into an X image (Eq. 1); infrared (I), X and visible images -- a batch of 3M -- go through one
weight-sharing feature learner, the X images carrying the labels of their visible sources. Losses:

* MRG (Eq. 7-10): L_M = L_I + L_X + L_V, each (1/M)(L_id + L_tri) over that modality's M images:
  the cross-entropy (Eq. 9) plus the batch-hard triplet with margin alpha2 (Eq. 10), anchors,
  positives and negatives all from the modality;
* CMG (Eq. 3-6): L_C = L_cross^{I,X} + L_cross^{I,V}, each (1/M)(L_{A-B} + L_{B-A}): directional
  batch-hard triplets (margin alpha1) whose anchors come from one modality and positives/negatives
  from the other;
* L = L_M + lambda L_C (Eq. 11).

Test time (Eq. 2): j* = argmin_j D(f(I_i), f(V_j)) + D(f(I_i), f(X_j)), D the Euclidean distance.
``extract`` returns ``feat`` = f(image) and ``feat_x``: f(X(V)) for visible images and f(I) for
infrared images (an infrared image is its own X counterpart), so the feature file's
``query_feat_x`` / ``gallery_feat_x`` give Eq. 2 in either search direction as
``D(q, g) + D(q_x, g_x)`` (:func:`xiv_distance`). f is the BNNeck feature of the feature learner,
L2-normalised (the test feature of the baseline of Luo et al. that the paper builds on).

The paper's feature learner is one network for all three modalities (``feature_learner:
shared``, the default). ``two_stream`` uses the AGW two-stream backbone instead (modality-specific
stems), X images through the visible stem (``x_stream: visible``) or a third stem (``own``).
``x_modality: false`` trains without X (the paper's "Baseline" of Table 4 with ``cross_weight: 0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vireid.data.records import Modality
from vireid.data.transforms import IMAGENET_MEAN, IMAGENET_STD, LUMA
from vireid.errors import InputError
from vireid.evaluation.evaluator import plain_distance
from vireid.features import FeatureSet
from vireid.losses.identity import label_smoothed_cross_entropy
from vireid.losses.triplet import batch_hard_triplet_loss, directed_batch_hard_triplet_loss
from vireid.models.backbone import TwoStreamBackbone
from vireid.models.base import ReIDModel
from vireid.models.heads import BNNeck, l2_normalize, make_pool
from vireid.models.registry import ModelConfig, register_method
from vireid.models.routing import sorted_modality_layout

XGenerator = Literal["learned", "channel_mean", "gray", "hsv_v", "ycbcr_y"]

#: Group index of X images in the training outputs (visible 0, infrared 1 as in :class:`Modality`).
X_GROUP = 2


@dataclass
class XIVParams:
    """XIV hyper-parameters (the paper's values as defaults; docs/methods/xiv.md)."""

    x_modality: bool = True          # train with the X modality (Table 4 "Baseline": False)
    x_generator: XGenerator = "learned"
    feature_learner: Literal["shared", "two_stream"] = "shared"
    x_stream: Literal["visible", "own"] = "visible"   # two_stream only: the stem X images use
    cross_weight: float = 0.1       # lambda, Eq. 11
    cross_margin: float = 0.5       # alpha1, CMG Eq. 5-6
    triplet_margin: float = 0.3     # alpha2, MRG Eq. 10
    label_smoothing: float = 0.0    # Eq. 9 is the plain cross-entropy
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD

    def validate(self) -> None:
        for key in ("cross_weight", "cross_margin", "triplet_margin"):
            if getattr(self, key) < 0:
                raise InputError(f"model.params.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise InputError(f"model.params.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if any(s <= 0 for s in self.pixel_std):
            raise InputError(f"model.params.pixel_std must be positive, got {self.pixel_std}")
        if self.x_stream == "own" and self.feature_learner == "shared":
            raise InputError("model.params.x_stream: 'own' needs feature_learner: two_stream")


class LearnedXGenerator(nn.Module):
    """XIV Eq. 1: X = conv1x1_{1->3}(ReLU(conv1x1_{3->1}(V))), trained end to end."""

    def __init__(self) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(3, 1, kernel_size=1)
        self.expand = nn.Conv2d(1, 3, kernel_size=1)

    def forward(self, visible: Tensor) -> Tensor:
        return self.expand(F.relu(self.reduce(visible)))


#: Fixed single-channel X images of the paper's ablation: weights on (R, G, B) in [0, 1] and an offset.
_FIXED_X_WEIGHTS: dict[str, tuple[tuple[float, float, float], float]] = {
    "channel_mean": ((1 / 3, 1 / 3, 1 / 3), 0.0),
    "gray": (LUMA, 0.0),                                                    # ITU-R BT.601 luma
    "ycbcr_y": ((65.481 / 255, 128.553 / 255, 24.966 / 255), 16.0 / 255),   # BT.601 Y' (studio swing)
}


class FixedXTransform(nn.Module):
    """The paper's fixed X baselines: one channel from RGB (channel mean, gray, HSV V = max(R, G, B),
    YCbCr Y), replicated to three channels; works on normalised images (un-normalise, map, re-normalise)."""

    def __init__(self, kind: str, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        if kind != "hsv_v" and kind not in _FIXED_X_WEIGHTS:
            raise InputError(f"model.params.x_generator: unknown fixed X transform {kind!r}")
        self.kind = kind
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, visible: Tensor) -> Tensor:
        rgb = visible * self.std + self.mean
        if self.kind == "hsv_v":
            single = rgb.amax(dim=1, keepdim=True)
        else:
            weights, offset = _FIXED_X_WEIGHTS[self.kind]
            single = (rgb * rgb.new_tensor(weights).view(1, 3, 1, 1)).sum(dim=1, keepdim=True) + offset
        return (single.expand_as(rgb) - self.mean) / self.std


def make_x_generator(params: XIVParams) -> nn.Module:
    if params.x_generator == "learned":
        return LearnedXGenerator()
    return FixedXTransform(params.x_generator, params.pixel_mean, params.pixel_std)


def modality_respective_loss(logits: Tensor, features: Tensor, labels: Tensor, group: Tensor,
                             margin: float, label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """XIV Eq. 7-10 (MRG): L_M = sum over the modalities g in {I, X, V} present of
    (1/M)(L_id + L_tri) over g's images only: mean cross-entropy (Eq. 9) + mean batch-hard
    triplet with margin alpha2 (Eq. 10)."""
    total = features.new_zeros(())
    terms: dict[str, Tensor] = {}
    for name, g in (("I", int(Modality.INFRARED)), ("X", X_GROUP), ("V", int(Modality.VISIBLE))):
        sel = group == g
        if not bool(sel.any()):
            continue
        term = (label_smoothed_cross_entropy(logits[sel], labels[sel], label_smoothing)
                + batch_hard_triplet_loss(features[sel], labels[sel], margin=margin))
        terms[f"mrg_{name}"] = term.detach()
        total = total + term
    return total, terms


def cross_modality_triplet(features: Tensor, labels: Tensor, group: Tensor, first: int, second: int,
                           margin: float) -> Tensor:
    """XIV Eq. 4-6: L_cross^{A,B} = (1/M)(L_{A-B} + L_{B-A}); L_{A-B} sums over anchors of A the
    batch-hard term [alpha1 + max_{B+} D - min_{B-} D]_+ with positives and negatives from B.
    Each direction is averaged over its own anchors (M of them in the paper's aligned batches)."""
    a, b = group == first, group == second
    return (directed_batch_hard_triplet_loss(features[a], labels[a], features[b], labels[b], margin)
            + directed_batch_hard_triplet_loss(features[b], labels[b], features[a], labels[a], margin))


class XIVModel(ReIDModel):
    """Weight-sharing feature learner + X generator + BNNeck (see module docstring)."""

    def __init__(self, cfg: ModelConfig, params: XIVParams, num_classes: int) -> None:
        super().__init__()
        self.params = params
        if params.feature_learner == "shared":
            self.num_modalities = 1
        else:
            self.num_modalities = 3 if params.x_stream == "own" else 2
        self.backbone = TwoStreamBackbone(cfg.backbone, cfg.split, cfg.last_stride, cfg.pretrained,
                                          num_modalities=self.num_modalities)   # streams start as copies
        if params.x_modality:
            self.x_generator = make_x_generator(params)
        self.pool = make_pool(cfg.pooling)
        self.neck = BNNeck(self.backbone.out_channels, num_classes)

    def stream_of(self, group: Tensor) -> Tensor:
        """Backbone stream of each image from its group (0 visible, 1 infrared, 2 X): all 0 for the
        shared learner; X through the visible stem (or its own) for the two-stream one."""
        if self.num_modalities == 1:
            return torch.zeros_like(group)
        if self.num_modalities == 2:
            return group.masked_fill(group == X_GROUP, int(Modality.VISIBLE))
        return group

    def _embed(self, images: Tensor, group: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with sorted_modality_layout(None):  # streams follow the groups, not the batch's sorted modality layout
            feat = self.pool(self.backbone(images, self.stream_of(group))).float()
        bn_feat, logits = self.neck(feat)
        return feat, bn_feat, logits

    def forward(self, images: Tensor, modality: Tensor) -> dict[str, Tensor]:
        if not self.training:
            return {"feat": l2_normalize(self._embed(images, modality)[1])}
        group, source = modality, torch.arange(len(images), device=images.device)
        if self.params.x_modality:                              # the 3M batch: I, V and X = g(V) (Eq. 1)
            visible = torch.nonzero(modality == int(Modality.VISIBLE), as_tuple=False).squeeze(1)
            images = torch.cat([images, self.x_generator(images.index_select(0, visible))])
            group = torch.cat([modality, torch.full_like(visible, X_GROUP)])
            source = torch.cat([source, visible])
        feat, _, logits = self._embed(images, group)
        return {"feat": feat, "logits": logits, "group": group, "source_index": source}

    def compute_loss(self, outputs: dict[str, Tensor], labels: Tensor, modality: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """XIV Eq. 11: L = L_M + lambda L_C, labels of X images copied from their visible sources;
        L_C = L_cross^{I,X} + L_cross^{I,V} (Eq. 3), only L_cross^{I,V} without the X modality."""
        p = self.params
        all_labels = labels[outputs["source_index"]]
        group, feat = outputs["group"], outputs["feat"]
        mrg, logs = modality_respective_loss(outputs["logits"], feat, all_labels, group,
                                             p.triplet_margin, p.label_smoothing)
        infrared = int(Modality.INFRARED)
        cmg = cross_modality_triplet(feat, all_labels, group, infrared, int(Modality.VISIBLE), p.cross_margin)
        if p.x_modality:
            cmg = cmg + cross_modality_triplet(feat, all_labels, group, infrared, X_GROUP, p.cross_margin)
        total = mrg + p.cross_weight * cmg
        logs.update({"mrg": mrg.detach(), "cmg": cmg.detach()})
        return total, logs

    @torch.no_grad()
    def extract(self, images: Tensor, modality: Tensor) -> dict[str, Tensor]:
        """``feat`` = f(image); with the X modality also ``feat_x`` = f(X(image)) for visible images
        and f(image) for infrared ones (L2-normalised BN features)."""
        feat = l2_normalize(self._embed(images, modality)[1])
        if not self.params.x_modality:
            return {"feat": feat}
        feat_x = feat.clone()
        visible = torch.nonzero(modality == int(Modality.VISIBLE), as_tuple=False).squeeze(1)
        if len(visible):
            x_images = self.x_generator(images.index_select(0, visible))
            x_feat = self._embed(x_images, torch.full_like(visible, X_GROUP))[1]
            feat_x.index_copy_(0, visible, l2_normalize(x_feat))
        return {"feat": feat, "feat_x": feat_x}


def euclidean_distance(query_feat: np.ndarray, gallery_feat: np.ndarray, *,
                       dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Euclidean distance of L2-normalised features, ``sqrt(2 - 2 cos)`` (Q, G), chunked as ``plain_distance``."""
    dist = plain_distance(query_feat, gallery_feat, dtype=dtype)     # -cos
    dist *= 2
    dist += 2
    np.maximum(dist, 0, out=dist)
    return np.sqrt(dist, out=dist)


def xiv_distance(features: FeatureSet, *, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """XIV Eq. 2: D(f(q), f(g)) + D(f_x(q), f_x(g)), D the Euclidean distance of L2-normalised features.

    Needs ``gallery_feat_x``; ``query_feat_x`` defaults to ``query_feat`` (an infrared image is
    its own X counterpart). For infrared queries and a visible gallery:
    D(f(I), f(V)) + D(f(I), f(X(V))). Usable as an evaluator ``distance_fn``.
    """
    if "gallery_feat_x" not in features.extras:
        raise InputError("XIV distance: the feature file has no gallery_feat_x (extract with an XIV model)")
    query_x = features.extras.get("query_feat_x", features.query_feat)
    return (euclidean_distance(features.query_feat, features.gallery_feat, dtype=dtype)
            + euclidean_distance(query_x, features.extras["gallery_feat_x"], dtype=dtype))


@register_method("xiv", XIVParams)
def build_xiv(cfg: ModelConfig, params: XIVParams, num_classes: int) -> ReIDModel:
    return XIVModel(cfg, params, num_classes)
