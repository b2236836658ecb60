"""SAAI's semantic-aligned feature learning (SAFL; Fang, Yang and Fu, "Visible-Infrared Person
Re-Identification via Semantic Alignment and Affinity Inference", ICCV 2023, Sec. 3.2 and 3.4).

* p learnable prototypes P (p x C), shared by both modalities, score the n = h*w pixel-wise
  features T of the last feature map, to which learnable position embeddings E are added:
  S = sigmoid(P (T + E)^T) (Eq. 1); part features p_i = (1/n) sum_j S_ij (T_j + E_j) (Eq. 2);
  descriptor F^ = [p_1 ... p_p, avg(F)] (Eq. 3).
* Dual-branch BNNeck: one BatchNorm per modality, chosen by each image's modality in
  training and at test time; one identity classifier on the BN features.
* L = L_id + L_cs + lambda L_pd (Eq. 11): part diversity (Eq. 4) on the prototypes' masks S
  (Eq. 4 prints P_i T^T; taken literally, without the sigmoid, the loss has no minimum:
  ``diversity_input="scores"``), center separation (Eq. 5) on the pre-BN descriptor F^.

Options giving the public code's behaviour (xiaoye-hhh/SAAI) where it differs from the paper:
``position_in_values=False`` (Eq. 2 aggregates T without E), ``diversity_rms=True`` (L_pd's
norms divided by sqrt(n)), ``diversity_weight_applied_twice`` (effective weight lambda^2) and
``separation_anchors="batch_stride"``.
``part_pooling="horizontal"`` replaces SAFL by p horizontal stripes: the "Base" of the paper's
ablation (Table 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

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

PartPooling = Literal["prototypes", "horizontal"]
DiversityInput = Literal["masks", "scores"]


@dataclass
class SAAIParams:
    """SAAI hyper-parameters (paper values as defaults; Sec. 4.1)."""

    num_parts: int = 7                              # p (prototypes, or stripes with part_pooling="horizontal")
    image_size: tuple[int, int] = (288, 144)        # input (height, width); sizes the position embeddings
    part_pooling: PartPooling = "prototypes"        # "horizontal": the ablation's Base (Table 3), no SAFL
    position_in_values: bool = True                 # Eq. 2 aggregates T + E (paper); False: T (public code)
    diversity_weight: float = 0.5                   # lambda of L_pd (Eq. 11)
    diversity_input: DiversityInput = "masks"       # Eq. 4 on S; "scores": on P (T + E)^T, unbounded below
    diversity_rms: bool = False                     # public code: norms divided by sqrt(n)
    diversity_weight_applied_twice: bool = False    # public code: effective weight lambda^2
    separation_weight: float = 1.0                  # weight of L_cs (Eq. 11: 1)
    rho1: float = 0.01                              # Eq. 5: slack of samples around their centre
    rho2: float = 0.7                               # Eq. 5: margin between centres
    separation_anchors: SeparationAnchors = "identities"   # public code: "batch_stride"
    separation_stride: int = 8                      # k of the code's rows 0, k, 2k, ... (images per identity)
    label_smoothing: float = 0.0

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
        if self.part_pooling == "horizontal" and self.diversity_weight > 0:
            raise InputError("model.params.diversity_weight must be 0 with part_pooling=horizontal "
                             "(L_pd, Eq. 4, compares prototype masks)")

    @property
    def effective_diversity_weight(self) -> float:
        return self.diversity_weight ** 2 if self.diversity_weight_applied_twice else self.diversity_weight


def resnet_feature_map_size(image_size: tuple[int, int], last_stride: int) -> tuple[int, int]:
    """(h, w) of a ResNet's last feature map: every stride-2 step (conv1, max-pool, layer2,
    layer3 and layer4 unless ``last_stride`` is 1) maps x to ceil(x / 2)."""
    steps = 4 + (last_stride == 2)
    return tuple(math.ceil(s / 2 ** steps) for s in image_size)  # type: ignore[return-value]


class SemanticAlignedPooling(nn.Module):
    """SAAI Eq. 1-2: scores P (T + E)^T, masks S = sigmoid(scores), parts p_i = (1/n) sum_j S_ij V_j
    with V = T + E (``position_in_values``, the paper) or V = T (the public code)."""

    def __init__(self, dim: int, num_parts: int, map_size: tuple[int, int], position_in_values: bool = True) -> None:
        super().__init__()
        std = math.sqrt(2.0 / dim)
        self.prototypes = nn.Parameter(torch.randn(num_parts, dim) * std)
        self.position = nn.Parameter(torch.randn(dim, *map_size) * std)
        self.position_in_values = position_in_values

    def position_embedding(self, height: int, width: int) -> Tensor:
        """E as (n, C) for an h x w map, resized bilinearly from the configured size if needed."""
        pos = self.position
        if pos.shape[1:] != (height, width):
            pos = F.interpolate(pos.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False)[0]
        return pos.flatten(1).t()

    def forward(self, feature_map: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (part features (B, p, C), scores P (T + E)^T (B, p, n), masks S (B, p, n))."""
        _, _, height, width = feature_map.shape
        tokens = feature_map.flatten(2).transpose(1, 2)                       # T: (B, n, C)
        keys = tokens + self.position_embedding(height, width)                # T + E
        scores = self.prototypes @ keys.transpose(1, 2)                       # (B, p, n)
        masks = torch.sigmoid(scores)                                         # Eq. 1
        values = keys if self.position_in_values else tokens
        parts = masks @ values / tokens.shape[1]                              # Eq. 2
        return parts, scores, masks


def horizontal_parts(feature_map: Tensor, num_parts: int) -> Tensor:
    """p horizontal stripes, each average-pooled: (B, p, C) (the paper's ablation Base, Table 3).
    Stripe boundaries as ``adaptive_avg_pool2d``: stripe i covers rows floor(i h / p) to ceil((i+1) h / p)."""
    return F.adaptive_avg_pool2d(feature_map, (num_parts, 1)).squeeze(3).transpose(1, 2)


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
        map_size = resnet_feature_map_size(params.image_size, cfg.last_stride)
        self.parts = (SemanticAlignedPooling(dim, params.num_parts, map_size, params.position_in_values)
                      if params.part_pooling == "prototypes" else None)
        out_dim = dim * (params.num_parts + 1)
        self.neck = DualBNNeck(out_dim)
        self.classifier = nn.Linear(out_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, images: Tensor, modality: Tensor) -> dict[str, Tensor]:
        feature_map = self.backbone(images, modality).float()
        out: dict[str, Tensor] = {}
        if self.parts is None:
            parts = horizontal_parts(feature_map, self.params.num_parts)
        else:
            parts, out["scores"], out["masks"] = self.parts(feature_map)
        feat = torch.cat([parts.flatten(1), feature_map.mean(dim=(2, 3))], dim=1)   # Eq. 3: F^
        bn_feat = self.neck(feat, modality)
        if not self.training:
            return {"feat": l2_normalize(bn_feat)}
        out.update(feat=feat, bn_feat=bn_feat, logits=self.classifier(bn_feat))
        return out

    def compute_loss(self, outputs: dict[str, Tensor], labels: Tensor, modality: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """SAAI Eq. 11: L = L_id + L_cs + lambda L_pd; L_cs (Eq. 5) on the pre-BN F^, L_pd (Eq. 4)
        on the masks S (or the scores), L_id on the classifier of the BN feature."""
        p = self.params
        identity = label_smoothed_cross_entropy(outputs["logits"], labels, p.label_smoothing)
        total = identity
        logs = {"id": identity.detach()}
        if p.separation_weight > 0:
            separation = center_separation_loss(outputs["feat"], labels, p.rho1, p.rho2,
                                                p.separation_anchors, p.separation_stride)
            total = total + p.separation_weight * separation
            logs["cs"] = separation.detach()
        if p.diversity_weight > 0:
            diversity = part_diversity_loss(outputs[p.diversity_input], rms=p.diversity_rms)
            total = total + p.effective_diversity_weight * diversity
            logs["pd"] = diversity.detach()
        return total, logs


@register_method("saai", SAAIParams)
def build_saai(cfg: ModelConfig, params: SAAIParams, num_classes: int) -> ReIDModel:
    return SAAIModel(cfg, params, num_classes)
