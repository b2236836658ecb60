"""DF2AM: dual-level feature fusion and affinity modelling for RGB-infrared re-identification.

Equation numbers are the paper's ("DF2AM: Dual-level Feature Fusion and Affinity Modeling for
RGB-Infrared Cross-modality Person Re-identification").

* Backbone (Sec. 3.2): modality-specific low-level layers Conv1 / Conv2, then a shared extractor
  Feat; f_g is the global average pooling (GAP) of the shared feature map.
* Baseline loss (Eq. 3-4): L_B = L_B^RGB + L_B^IR, each the identity loss L_ID plus the
  batch-hard triplet L_BH computed over that modality's K images only.
* Dual-level fusion (Sec. 3.3): patch-wise average pooling into P horizontal parts f^p (Eq. 5);
  a learned transformation scores each part from the part itself, the scores are normalised over
  the parts (w~ = softmax_p(w)) and f* = sum_p w~_p f^p (Eq. 6); f~ = BN(f_g) + f* (Eq. 7);
  L_D = L_D^RGB + L_D^IR, the identity loss on f~ per modality (Eq. 8).
* Affinity modelling (Sec. 3.4): the 2K x 2K affinity matrix of L2-normalised global features
  (Eq. 9-10), shaped by L_A (Eq. 12, or the L1 form of Eq. 11) -- :mod:`vireid.losses.affinity`.
* L_Final = L_B + lambda L_D + zeta L_A (Eq. 4). At test time the fused feature f~ is the descriptor.
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

BaselineTriplet = Literal["batch_hard", "weighted"]
BaselineScope = Literal["per_modality", "mixed"]


@dataclass
class DF2AMParams:
    """DF2AM hyper-parameters; defaults are the paper's where it states them (docs/methods/df2am.md)."""

    num_parts: int = 4                   # P (Table 4: 4 parts best)
    attention_reduction: int = 16        # hidden width C / r of the part-scoring MLP (not stated; ours)
    fusion: bool = True                  # the DF2 module (Table 3 rows without DF2: False)
    fusion_weight: float = 1.1           # lambda of Eq. 4 (Sec. 4.4, Fig. 4)
    affinity_weight: float = 1.5         # zeta of Eq. 4 (Sec. 4.4, Fig. 4); 0 = without AM
    baseline_weight: float = 1.0         # weight of L_B in Eq. 4 (1 in the paper; 0 = Table 3's "DF2 + AM")
    affinity_loss: AffinityLoss = "margin"   # Eq. 12 ("margin") or Eq. 11 ("l1")
    affinity_margin: float = 1.0         # m of Eq. 12 / delta of Eq. 11 (not stated; ours)
    affinity_reduction: Literal["mean", "sum"] = "mean"
    baseline_scope: BaselineScope = "per_modality"     # Eq. 4: L_B^RGB + L_B^IR; "mixed": one batch mean
    baseline_triplet: BaselineTriplet = "batch_hard"   # L_BH (Eq. 3); "weighted": AGW's weighted triplet
    triplet_margin: float = 0.3          # margin of L_BH (not stated; ours)
    label_smoothing: float = 0.0         # the paper's L_ID and L_D are plain cross-entropy
    test_feature: Literal["fused", "global"] = "fused"

    def validate(self) -> None:
        if self.num_parts < 1:
            raise InputError(f"model.params.num_parts must be >= 1, got {self.num_parts}")
        if self.attention_reduction < 1:
            raise InputError(f"model.params.attention_reduction must be >= 1, got {self.attention_reduction}")
        for key in ("fusion_weight", "affinity_weight", "baseline_weight", "affinity_margin", "triplet_margin"):
            if getattr(self, key) < 0:
                raise InputError(f"model.params.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise InputError(f"model.params.label_smoothing must be in [0, 1), got {self.label_smoothing}")


def horizontal_parts(feature_map: Tensor, num_parts: int) -> Tensor:
    """DF2AM Eq. 5: patch-wise average pooling of (B, C, h, w) into P horizontal stripes -> (B, P, C)."""
    return F.adaptive_avg_pool2d(feature_map, (num_parts, 1)).squeeze(-1).transpose(1, 2)


class LocalAttentionFusion(nn.Module):
    """DF2AM Eq. 5-6: w_p = MLP(f^p) (the part's own transformation), w~ = softmax over the P parts,
    f* = sum_p w~_p f^p."""

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
    """DF2AM Eq. 8 (and L_ID of Eq. 3 per modality): the sum over modalities of the mean identity
    loss over that modality's images."""
    total = logits.new_zeros(())
    for m in torch.unique(modality).tolist():
        sel = modality == m
        total = total + label_smoothed_cross_entropy(logits[sel], labels[sel], epsilon)
    return total


def per_modality_triplet_loss(features: Tensor, labels: Tensor, modality: Tensor, margin: float,
                              kind: BaselineTriplet = "batch_hard") -> Tensor:
    """The metric term of DF2AM's L_B^RGB + L_B^IR (Eq. 3-4): within each modality, L_BH over that
    modality's images (anchor, positives and negatives of the same modality), summed over modalities."""
    total = features.new_zeros(())
    for m in torch.unique(modality).tolist():
        sel = modality == m
        if kind == "batch_hard":
            total = total + batch_hard_triplet_loss(features[sel], labels[sel], margin=margin)
        else:
            total = total + weighted_regularized_triplet_loss(features[sel], labels[sel])
    return total


def baseline_loss(logits: Tensor, features: Tensor, labels: Tensor, modality: Tensor,
                  params: DF2AMParams) -> tuple[Tensor, Tensor]:
    """DF2AM L_B as (identity term, triplet term). ``per_modality`` (Eq. 4): L_B^RGB + L_B^IR;
    ``mixed``: one mean over the whole batch with every pair allowed (not the paper's)."""
    if params.baseline_scope == "per_modality":
        identity = per_modality_identity_loss(logits, labels, modality, params.label_smoothing)
        triplet = per_modality_triplet_loss(features, labels, modality, params.triplet_margin,
                                            params.baseline_triplet)
        return identity, triplet
    identity = label_smoothed_cross_entropy(logits, labels, params.label_smoothing)
    if params.baseline_triplet == "batch_hard":
        return identity, batch_hard_triplet_loss(features, labels, margin=params.triplet_margin)
    return identity, weighted_regularized_triplet_loss(features, labels)


class DF2AMModel(ReIDModel):
    """Two-stream backbone, global BNNeck branch, local attention fusion branch (module docstring)."""

    def __init__(self, cfg: ModelConfig, params: DF2AMParams, num_classes: int) -> None:
        super().__init__()
        self.params = params
        self.backbone = TwoStreamBackbone(cfg.backbone, cfg.split, cfg.last_stride, cfg.pretrained)
        dim = self.backbone.out_channels
        self.pool = make_pool(cfg.pooling)
        self.neck = BNNeck(dim, num_classes)
        if params.fusion:
            self.local = LocalAttentionFusion(dim, params.num_parts, params.attention_reduction)
            self.fused_classifier = nn.Linear(dim, num_classes, bias=False)
            nn.init.normal_(self.fused_classifier.weight, std=0.001)

    def forward(self, images: Tensor, modality: Tensor) -> dict[str, Tensor]:
        feature_map = self.backbone(images, modality)
        global_feat = self.pool(feature_map).float()
        bn_feat, logits = self.neck(global_feat)
        if not self.params.fusion:
            if not self.training:
                return {"feat": l2_normalize(bn_feat)}
            return {"feat": global_feat, "logits": logits}
        local_feat, part_weights = self.local(feature_map.float())
        fused = bn_feat + local_feat                      # Eq. 7
        if not self.training:
            return {"feat": l2_normalize(fused if self.params.test_feature == "fused" else bn_feat)}
        return {"feat": global_feat, "logits": logits, "fused": fused,
                "fused_logits": self.fused_classifier(fused), "part_weights": part_weights}

    def compute_loss(self, outputs: dict[str, Tensor], labels: Tensor, modality: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """DF2AM Eq. 4: L_Final = L_B + lambda L_D + zeta L_A."""
        p = self.params
        feat = outputs["feat"]
        identity, triplet = baseline_loss(outputs["logits"], feat, labels, modality, p)
        total = p.baseline_weight * (identity + triplet)
        logs = {"id": identity, "tri": triplet}
        if p.fusion:
            logs["fusion"] = per_modality_identity_loss(outputs["fused_logits"], labels, modality, p.label_smoothing)
            total = total + p.fusion_weight * logs["fusion"]
        if p.affinity_weight > 0:
            logs["affinity"] = affinity_loss(feat, labels, p.affinity_loss, p.affinity_margin, p.affinity_reduction)
            total = total + p.affinity_weight * logs["affinity"]
        return total, {k: v.detach() for k, v in logs.items()}


@register_method("df2am", DF2AMParams)
def build_df2am(cfg: ModelConfig, params: DF2AMParams, num_classes: int) -> ReIDModel:
    return DF2AMModel(cfg, params, num_classes)
