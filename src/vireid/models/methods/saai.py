"""SAAI's semantic-aligned feature learning (SAFL; Fang et al., "Visible-Infrared Person
Re-Identification via Semantic Alignment and Affinity Inference", ICCV 2023).

* p learnable prototypes P (p x C), shared by both modalities, attend over the feature-map
  tokens T (n x C) plus learnable position embeddings E: S = sigmoid(P (T + E)^T) (Eq. 1);
  part features p_i = (1/n) sum_j S_ij T_j (Eq. 2); descriptor F^ = [p_1 ... p_p, avg(F)] (Eq. 3).
  E is sized from the feature map of ``image_size`` (the public code hard-codes 18 x 9 = 162
  positions) and resized bilinearly when a different map size arrives.
* Dual-branch BNNeck: one BatchNorm per modality, chosen by each image's modality in
  training and at test time; one identity classifier on the BN features.
* L = L_id + L_cs + lambda L_pd (Eq. 6): part diversity Eq. 4 (:mod:`vireid.losses.part_diversity`),
  center separation Eq. 5 (:mod:`vireid.losses.center_separation`).

Where the public code (xiaoye-hhh/SAAI ``models/baseline.py``) differs, an option gives its
behaviour: ``diversity_weight_applied_twice`` (the code multiplies L_pd by ``dp_w`` in the
forward pass and again in the total, an effective weight lambda^2 = 0.25) and
``separation_anchors="batch_stride"`` (the code's separation term only visits batch rows
0, k, 2k, ...). Test-time inference pairs SAAI with AIM (``INFERENCE_METHOD``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vireid.errors import InputError
from vireid.losses.center_separation import SeparationAnchors, center_separation_loss
from vireid.losses.identity import label_smoothed_cross_entropy
from vireid.losses.part_diversity import part_diversity_loss
from vireid.models.backbone import TwoStreamBackbone
from vireid.models.base import ReIDModel
from vireid.models.heads import l2_normalize
from vireid.models.registry import ModelConfig, register_method
from vireid.models.routing import route

#: SAAI's test-time re-ranking: AIM, with the re-ranking presets named after the protocols
#: (SYSU all single-shot k1/k2 = 4/1, multi-shot 20/6, indoor single-shot 2/2, RegDB 8/2).
INFERENCE_METHOD = "aim"


@dataclass
class SAAIParams:
    """SAAI hyper-parameters (paper values as defaults)."""

    num_parts: int = 7                              # p
    image_size: tuple[int, int] = (288, 144)        # input (height, width); sizes the position embeddings
    diversity_weight: float = 0.5                   # lambda of L_pd
    separation_weight: float = 1.0                  # weight of L_cs
    rho1: float = 0.01
    rho2: float = 0.7
    label_smoothing: float = 0.0
    diversity_weight_applied_twice: bool = False    # public code: effective weight lambda^2
    separation_anchors: SeparationAnchors = "identities"   # public code: "batch_stride"
    separation_stride: int = 8                      # k of the code's rows 0, k, 2k, ... (images per identity)

    def validate(self) -> None:
        if self.num_parts < 2:
            raise InputError(f"model.params.num_parts must be >= 2 (Eq. 4 compares parts), got {self.num_parts}")
        if any(s < 1 for s in self.image_size):
            raise InputError(f"model.params.image_size must be positive, got {self.image_size}")
        for key in ("diversity_weight", "separation_weight", "rho1", "rho2"):
            if getattr(self, key) < 0:
                raise InputError(f"model.params.{key} must be >= 0, got {getattr(self, key)}")
        if self.separation_stride < 1:
            raise InputError(f"model.params.separation_stride must be >= 1, got {self.separation_stride}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise InputError(f"model.params.label_smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def effective_diversity_weight(self) -> float:
        return self.diversity_weight ** 2 if self.diversity_weight_applied_twice else self.diversity_weight


def resnet_feature_map_size(image_size: tuple[int, int], last_stride: int) -> tuple[int, int]:
    """(h, w) of a ResNet's last feature map: every stride-2 step (conv1, max-pool, layer2,
    layer3 and layer4 unless ``last_stride`` is 1) maps x to ceil(x / 2)."""
    steps = 4 + (last_stride == 2)
    return tuple(math.ceil(s / 2 ** steps) for s in image_size)  # type: ignore[return-value]


class SemanticAlignedPooling(nn.Module):
    """SAAI Eq. 1-2: S = sigmoid(P (T + E)^T), part features p_i = (1/n) sum_j S_ij T_j."""

    def __init__(self, dim: int, num_parts: int, map_size: tuple[int, int]) -> None:
        super().__init__()
        std = math.sqrt(2.0 / dim)
        self.prototypes = nn.Parameter(torch.randn(num_parts, dim) * std)
        self.position = nn.Parameter(torch.randn(dim, *map_size) * std)

    def position_embedding(self, height: int, width: int) -> Tensor:
        """E as (n, C) for an h x w map, resized bilinearly from the configured size if needed."""
        pos = self.position
        if pos.shape[1:] != (height, width):
            pos = F.interpolate(pos.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False)[0]
        return pos.flatten(1).t()

    def forward(self, feature_map: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (part features (B, p, C), masks S (B, p, n))."""
        _, _, height, width = feature_map.shape
        tokens = feature_map.flatten(2).transpose(1, 2)                       # T: (B, n, C)
        keys = tokens + self.position_embedding(height, width)
        masks = torch.sigmoid(self.prototypes @ keys.transpose(1, 2))        # S: (B, p, n)
        parts = masks @ tokens / tokens.shape[1]
        return parts, masks


class DualBNNeck(nn.Module):
    """One BatchNorm (bias frozen at 0) per modality, applied by each feature's modality."""

    def __init__(self, dim: int, num_modalities: int = 2) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.BatchNorm1d(dim) for _ in range(num_modalities))
        for bn in self.norms:
            nn.init.constant_(bn.bias, 0.0)
            bn.bias.requires_grad_(False)

    def forward(self, feat: Tensor, modality: Tensor) -> Tensor:
        return route(self.norms, feat, modality)


class SAAIModel(ReIDModel):
    """Two-stream backbone, semantic-aligned pooling, dual BNNeck, identity classifier."""

    def __init__(self, cfg: ModelConfig, params: SAAIParams, num_classes: int) -> None:
        super().__init__()
        self.params = params
        self.backbone = TwoStreamBackbone(cfg.backbone, cfg.split, cfg.last_stride, cfg.pretrained)
        dim = self.backbone.out_channels
        self.parts = SemanticAlignedPooling(dim, params.num_parts,
                                            resnet_feature_map_size(params.image_size, cfg.last_stride))
        out_dim = dim * (params.num_parts + 1)
        self.neck = DualBNNeck(out_dim)
        self.classifier = nn.Linear(out_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, images: Tensor, modality: Tensor) -> dict[str, Tensor]:
        feature_map = self.backbone(images, modality).float()
        parts, masks = self.parts(feature_map)
        feat = torch.cat([parts.flatten(1), feature_map.mean(dim=(2, 3))], dim=1)   # Eq. 3: F^
        bn_feat = self.neck(feat, modality)
        if not self.training:
            return {"feat": l2_normalize(bn_feat)}
        return {"feat": feat, "bn_feat": bn_feat, "logits": self.classifier(bn_feat), "masks": masks}

    def compute_loss(self, outputs: dict[str, Tensor], labels: Tensor, modality: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """SAAI Eq. 6: L = L_id + L_cs + lambda L_pd."""
        p = self.params
        identity = label_smoothed_cross_entropy(outputs["logits"], labels, p.label_smoothing)
        separation = center_separation_loss(outputs["feat"], labels, p.rho1, p.rho2,
                                            p.separation_anchors, p.separation_stride)
        diversity = part_diversity_loss(outputs["masks"])
        total = identity + p.separation_weight * separation + p.effective_diversity_weight * diversity
        return total, {"id": identity.detach(), "cs": separation.detach(), "pd": diversity.detach()}


@register_method("saai", SAAIParams)
def build_saai(cfg: ModelConfig, params: SAAIParams, num_classes: int) -> ReIDModel:
    return SAAIModel(cfg, params, num_classes)
