"""DF2AM: dual-level feature fusion and affinity modelling for RGB-infrared re-identification.

* Local level: the feature map is average-pooled patch-wise into P horizontal parts f_p; a
  learned local attention scores each part (a small MLP applied to every part feature) and
  the scores are normalised over the parts, w~ = softmax_p(w); f* = sum_p w~_p f_p (Eq. 3-5).
* Fusion: f~ = BN(f_g) + f* with f_g the global feature (Eq. 6); an identity loss L_D on
  f~ for each modality (Eq. 7).
* Affinity modelling: the affinity matrix over the whole 2K batch (both modalities) of
  L2-normalised global features (Eq. 9-10), shaped by L_A (Eq. 12, or the L1 form Eq. 11)
  — :mod:`vireid.losses.affinity`.
* L = L_B + lambda L_D + zeta L_A (Eq. 13), L_B the baseline's identity + triplet loss on
  the global branch. At test time the fused feature f~ is the descriptor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vireid.errors import InputError
from vireid.losses.affinity import AffinityLoss, affinity_loss
from vireid.losses.identity import label_smoothed_cross_entropy
from vireid.losses.triplet import batch_hard_triplet_loss, weighted_regularized_triplet_loss
from vireid.models.backbone import TwoStreamBackbone
from vireid.models.base import ReIDModel
from vireid.models.heads import BNNeck, l2_normalize, make_pool
from vireid.models.registry import ModelConfig, register_method


@dataclass
class DF2AMParams:
    """DF2AM hyper-parameters (paper values as defaults where the paper gives them)."""

    num_parts: int = 4                   # P
    attention_reduction: int = 16        # hidden width of the part-scoring MLP = C / r
    fusion_weight: float = 1.1           # lambda, weight of L_D
    affinity_weight: float = 1.5         # zeta, weight of L_A
    affinity_loss: AffinityLoss = "margin"   # Eq. 12 ("margin") or Eq. 11 ("l1")
    affinity_margin: float = 1.0         # m of Eq. 12 / delta of Eq. 11 (distances of unit vectors, in [0, 2])
    affinity_reduction: Literal["mean", "sum"] = "mean"
    baseline_triplet: Literal["wrt", "hard"] = "wrt"
    triplet_margin: float = 0.3          # used by baseline_triplet="hard"
    label_smoothing: float = 0.0
    test_feature: Literal["fused", "global"] = "fused"

    def validate(self) -> None:
        if self.num_parts < 1:
            raise InputError(f"model.params.num_parts must be >= 1, got {self.num_parts}")
        if self.attention_reduction < 1:
            raise InputError(f"model.params.attention_reduction must be >= 1, got {self.attention_reduction}")
        for key in ("fusion_weight", "affinity_weight", "affinity_margin", "triplet_margin"):
            if getattr(self, key) < 0:
                raise InputError(f"model.params.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise InputError(f"model.params.label_smoothing must be in [0, 1), got {self.label_smoothing}")


def horizontal_parts(feature_map: Tensor, num_parts: int) -> Tensor:
    """DF2AM Eq. 3: patch-wise average pooling of (B, C, h, w) into P horizontal stripes -> (B, P, C)."""
    return F.adaptive_avg_pool2d(feature_map, (num_parts, 1)).squeeze(-1).transpose(1, 2)


class LocalAttentionFusion(nn.Module):
    """DF2AM Eq. 4-5: w_p = MLP(f_p), w~ = softmax over parts, f* = sum_p w~_p f_p."""

    def __init__(self, dim: int, num_parts: int, reduction: int) -> None:
        super().__init__()
        hidden = max(dim // reduction, 1)
        self.num_parts = num_parts
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, feature_map: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (f* (B, C), part weights w~ (B, P))."""
        parts = horizontal_parts(feature_map, self.num_parts)
        weights = self.score(parts).squeeze(-1).softmax(dim=1)
        return (weights.unsqueeze(-1) * parts).sum(dim=1), weights


def per_modality_identity_loss(logits: Tensor, labels: Tensor, modality: Tensor, epsilon: float) -> Tensor:
    """DF2AM Eq. 7: L_D = sum over modalities of the identity loss on that modality's fused features."""
    total = logits.new_zeros(())
    for m in torch.unique(modality).tolist():
        sel = modality == m
        total = total + label_smoothed_cross_entropy(logits[sel], labels[sel], epsilon)
    return total


class DF2AMModel(ReIDModel):
    """Two-stream backbone, global BNNeck branch, local attention fusion branch (module docstring)."""

    def __init__(self, cfg: ModelConfig, params: DF2AMParams, num_classes: int) -> None:
        super().__init__()
        self.params = params
        self.backbone = TwoStreamBackbone(cfg.backbone, cfg.split, cfg.last_stride, cfg.pretrained)
        dim = self.backbone.out_channels
        self.pool = make_pool(cfg.pooling)
        self.neck = BNNeck(dim, num_classes)
        self.local = LocalAttentionFusion(dim, params.num_parts, params.attention_reduction)
        self.fused_classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.fused_classifier.weight, std=0.001)

    def forward(self, images: Tensor, modality: Tensor) -> dict[str, Tensor]:
        feature_map = self.backbone(images, modality)
        global_feat = self.pool(feature_map).float()
        bn_feat, logits = self.neck(global_feat)
        local_feat, part_weights = self.local(feature_map.float())
        fused = bn_feat + local_feat                      # Eq. 6
        if not self.training:
            return {"feat": l2_normalize(fused if self.params.test_feature == "fused" else bn_feat)}
        return {"feat": global_feat, "logits": logits, "fused": fused,
                "fused_logits": self.fused_classifier(fused), "part_weights": part_weights}

    def compute_loss(self, outputs: dict[str, Tensor], labels: Tensor, modality: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """DF2AM Eq. 13: L = L_B + lambda L_D + zeta L_A."""
        p = self.params
        feat = outputs["feat"]
        identity = label_smoothed_cross_entropy(outputs["logits"], labels, p.label_smoothing)
        if p.baseline_triplet == "wrt":
            triplet = weighted_regularized_triplet_loss(feat, labels)
        else:
            triplet = batch_hard_triplet_loss(feat, labels, margin=p.triplet_margin)
        base = identity + triplet
        fusion = per_modality_identity_loss(outputs["fused_logits"], labels, modality, p.label_smoothing)
        affinity = affinity_loss(feat, labels, p.affinity_loss, p.affinity_margin, p.affinity_reduction)
        total = base + p.fusion_weight * fusion + p.affinity_weight * affinity
        return total, {"id": identity.detach(), "tri": triplet.detach(), "fusion": fusion.detach(),
                       "affinity": affinity.detach()}


@register_method("df2am", DF2AMParams)
def build_df2am(cfg: ModelConfig, params: DF2AMParams, num_classes: int) -> ReIDModel:
    return DF2AMModel(cfg, params, num_classes)
