"""XIV: cross-modal re-identification with an auxiliary X modality (Li et al., AAAI 2020).

A tiny generator turns each visible image V into an X image; infrared (I), X and visible
images of the batch go through one feature learner (weights shared across the three
modalities, as in the paper) with the visible labels copied to the X images. Losses:

* MRG (Eq. 3): L_M = L_I + L_X + L_V, each the identity cross-entropy plus a batch-hard
  triplet (margin alpha2) computed within that modality, averaged over its M images;
* CMG (Eq. 4-6): L_C = L_cross(I, X) + L_cross(I, V), each the two-directional
  cross-modality batch-hard triplet (margin alpha1);
* L = L_M + lambda L_C (Eq. 7).

Test time (Eq. 2): d(I, V) = D(f(I), f(V)) + D(f(I), f(X(V))). ``extract`` returns
``feat_x`` beside ``feat``: f(X(V)) for visible images and f(I) for infrared images (an
infrared image is its own X counterpart), so the feature file's ``query_feat_x`` /
``gallery_feat_x`` give Eq. 2 in either search direction as ``D(q, g) + D(q_x, g_x)``
(:func:`xiv_distance`, a numpy function of a feature file, for files holding ``gallery_feat_x``).

Routing: the paper's feature learner is one network for all modalities. On our two-stream
backbone the X images use the visible stem by default (``x_stream="visible"``: X is
computed from visible pixels); ``x_stream="own"`` gives X a third stem instead.
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
from vireid.losses.triplet import batch_hard_triplet_loss
from vireid.models.backbone import TwoStreamBackbone
from vireid.models.base import ReIDModel
from vireid.models.heads import BNNeck, l2_normalize, make_pool
from vireid.models.registry import ModelConfig, register_method

XGenerator = Literal["learned", "channel_mean", "gray", "hsv_v", "ycbcr_y"]

#: Group index of X images in the training outputs (visible 0, infrared 1 as in :class:`Modality`).
X_GROUP = 2


@dataclass
class XIVParams:
    """XIV hyper-parameters (paper values as defaults)."""

    x_generator: XGenerator = "learned"
    x_stream: Literal["visible", "own"] = "visible"
    cross_weight: float = 0.1       # lambda, Eq. 7
    cross_margin: float = 0.5       # alpha1, CMG Eq. 4-5
    triplet_margin: float = 0.3     # alpha2, MRG
    label_smoothing: float = 0.0
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD

    def validate(self) -> None:
        if self.cross_weight < 0:
            raise InputError(f"model.params.cross_weight must be >= 0, got {self.cross_weight}")
        if self.cross_margin < 0 or self.triplet_margin < 0:
            raise InputError("model.params.cross_margin and triplet_margin must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise InputError(f"model.params.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if any(s <= 0 for s in self.pixel_std):
            raise InputError(f"model.params.pixel_std must be positive, got {self.pixel_std}")


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
    """XIV Eq. 3 (MRG): L_M = sum over modalities g in {I, X, V} of (L_id + L_tri) over g's images only."""
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
    """XIV Eq. 4-6: L_cross(A, B) = L_tri(A -> B) + L_tri(B -> A), batch-hard triplets whose anchors
    come from one modality and positives/negatives from the other, each averaged over its anchors.

    Implemented as twice the mean over all anchors of both directions (equal group sizes M).
    """
    sel = (group == first) | (group == second)
    return 2.0 * batch_hard_triplet_loss(features[sel], labels[sel], group[sel], pairs="cross", margin=margin)


class XIVModel(ReIDModel):
    """Two-stream backbone + learned X modality + BNNeck (see module docstring)."""

    def __init__(self, cfg: ModelConfig, params: XIVParams, num_classes: int) -> None:
        super().__init__()
        self.params = params
        self.num_modalities = 3 if params.x_stream == "own" else 2
        self.x_stream = X_GROUP if params.x_stream == "own" else int(Modality.VISIBLE)
        self.backbone = TwoStreamBackbone(cfg.backbone, cfg.split, cfg.last_stride, cfg.pretrained,
                                          num_modalities=self.num_modalities)
        if params.x_stream == "own":
            self.backbone.streams[X_GROUP].load_state_dict(self.backbone.streams[int(Modality.VISIBLE)].state_dict())
        self.x_generator = make_x_generator(params)
        self.pool = make_pool(cfg.pooling)
        self.neck = BNNeck(self.backbone.out_channels, num_classes)

    def _embed(self, images: Tensor, stream: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feat = self.pool(self.backbone(images, stream)).float()
        bn_feat, logits = self.neck(feat)
        return feat, bn_feat, logits

    def forward(self, images: Tensor, modality: Tensor) -> dict[str, Tensor]:
        if not self.training:
            return {"feat": l2_normalize(self._embed(images, modality)[1])}
        visible = torch.nonzero(modality == int(Modality.VISIBLE), as_tuple=False).squeeze(1)
        x_images = self.x_generator(images.index_select(0, visible))
        all_images = torch.cat([images, x_images])
        stream = torch.cat([modality, torch.full_like(visible, self.x_stream)])
        group = torch.cat([modality, torch.full_like(visible, X_GROUP)])
        source = torch.cat([torch.arange(len(images), device=images.device), visible])
        feat, bn_feat, logits = self._embed(all_images, stream)
        return {"feat": feat, "bn_feat": bn_feat, "logits": logits, "group": group, "source_index": source}

    def compute_loss(self, outputs: dict[str, Tensor], labels: Tensor, modality: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """XIV Eq. 7: L = L_M + lambda L_C, labels of X images copied from their visible sources."""
        p = self.params
        all_labels = labels[outputs["source_index"]]
        group, feat = outputs["group"], outputs["feat"]
        mrg, logs = modality_respective_loss(outputs["logits"], feat, all_labels, group,
                                             p.triplet_margin, p.label_smoothing)
        cmg = (cross_modality_triplet(feat, all_labels, group, int(Modality.INFRARED), X_GROUP, p.cross_margin)
               + cross_modality_triplet(feat, all_labels, group, int(Modality.INFRARED), int(Modality.VISIBLE),
                                        p.cross_margin))
        total = mrg + p.cross_weight * cmg
        logs.update({"mrg": mrg.detach(), "cmg": cmg.detach()})
        return total, logs

    @torch.no_grad()
    def extract(self, images: Tensor, modality: Tensor) -> dict[str, Tensor]:
        """``feat`` = f(image); ``feat_x`` = f(X(image)) for visible images, f(image) for infrared ones
        (L2-normalised BN features)."""
        feat = l2_normalize(self._embed(images, modality)[1])
        feat_x = feat.clone()
        visible = torch.nonzero(modality == int(Modality.VISIBLE), as_tuple=False).squeeze(1)
        if len(visible):
            x_images = self.x_generator(images.index_select(0, visible))
            stream = torch.full_like(visible, self.x_stream)
            feat_x.index_copy_(0, visible, l2_normalize(self._embed(x_images, stream)[1]))
        return {"feat": feat, "feat_x": feat_x}


def xiv_distance(features: FeatureSet, *, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """XIV Eq. 2: D(f(q), f(g)) + D(f_x(q), f_x(g)), D the negative cosine (``plain_distance``).

    Needs ``gallery_feat_x``; ``query_feat_x`` defaults to ``query_feat`` (an infrared image is
    its own X counterpart). For infrared queries and a visible gallery:
    D(f(I), f(V)) + D(f(I), f(X(V))). Usable as an evaluator ``distance_fn``.
    """
    if "gallery_feat_x" not in features.extras:
        raise InputError("XIV distance: the feature file has no gallery_feat_x (extract with an XIV model)")
    query_x = features.extras.get("query_feat_x", features.query_feat)
    return (plain_distance(features.query_feat, features.gallery_feat, dtype=dtype)
            + plain_distance(query_x, features.extras["gallery_feat_x"], dtype=dtype))


@register_method("xiv", XIVParams)
def build_xiv(cfg: ModelConfig, params: XIVParams, num_classes: int) -> ReIDModel:
    return XIVModel(cfg, params, num_classes)
