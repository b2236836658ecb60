"""The two-stream baseline (AGW-style): two-stream ResNet, GeM/average pooling, BNNeck.

Training loss: ``id_weight * CE_ls(logits(bn_feat)) + triplet_weight * triplet(pre_bn_feat)``,
where the triplet is batch-hard (``pairs`` + ``margin``) or AGW's weighted regularised
triplet. Test feature: the L2-normalised BN feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vireid.errors import InputError
from vireid.losses import (
    PAIR_SETS,
    batch_hard_triplet_loss,
    label_smoothed_cross_entropy,
    weighted_regularized_triplet_loss,
)
from vireid.models.backbone import TwoStreamBackbone
from vireid.models.base import ReIDModel
from vireid.models.heads import BNNeck, l2_normalize, make_pool
from vireid.models.registry import ModelConfig, register_method


@dataclass
class BaselineParams:
    """Loss settings of the baseline (defaults: AGW)."""

    id_weight: float = 1.0
    label_smoothing: float = 0.0
    triplet: Literal["batch_hard", "weighted", "none"] = "weighted"
    pairs: Literal["all", "cross", "intra"] = "all"
    margin: float | None = 0.3
    triplet_weight: float = 1.0

    def validate(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise InputError(f"model.params.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.pairs not in PAIR_SETS:
            raise InputError(f"model.params.pairs must be one of {PAIR_SETS}, got {self.pairs!r}")
        if self.margin is not None and self.margin < 0:
            raise InputError(f"model.params.margin must be >= 0 (or null for a soft margin), got {self.margin}")


class BaselineModel(ReIDModel):
    """TwoStreamBackbone -> pooling -> BNNeck."""

    def __init__(self, cfg: ModelConfig, params: BaselineParams, num_classes: int) -> None:
        super().__init__()
        self.params = params
        self.backbone = TwoStreamBackbone(cfg.backbone, split=cfg.split, last_stride=cfg.last_stride,
                                          pretrained=cfg.pretrained, num_modalities=self.num_modalities)
        self.pool = make_pool(cfg.pooling)
        self.neck = BNNeck(self.backbone.out_channels, num_classes)

    def forward(self, images: Tensor, modality: Tensor) -> dict[str, Tensor]:
        feat = self.pool(self.backbone(images, modality)).float()
        if not self.training:
            return {"feat": l2_normalize(self.neck.bn(feat))}
        bn_feat, logits = self.neck(feat)
        return {"pre_bn": feat, "bn": bn_feat, "logits": logits}

    def compute_loss(self, outputs: dict[str, Tensor], labels: Tensor, modality: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.params
        id_loss = label_smoothed_cross_entropy(outputs["logits"], labels, p.label_smoothing)
        terms = {"id": id_loss}
        total = p.id_weight * id_loss
        if p.triplet == "batch_hard":
            terms["triplet"] = batch_hard_triplet_loss(outputs["pre_bn"], labels, modality, p.pairs, p.margin)
        elif p.triplet == "weighted":
            terms["triplet"] = weighted_regularized_triplet_loss(outputs["pre_bn"], labels, modality, p.pairs)
        if "triplet" in terms:
            total = total + p.triplet_weight * terms["triplet"]
        with torch.no_grad():
            terms["accuracy"] = (outputs["logits"].argmax(1) == labels).float().mean()
        return total, {k: v.detach() for k, v in terms.items()}


@register_method("baseline", BaselineParams)
def build_baseline(cfg: ModelConfig, params: BaselineParams, num_classes: int) -> BaselineModel:
    return BaselineModel(cfg, params, num_classes)
