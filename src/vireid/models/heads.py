"""Pooling and the BNNeck head (Luo et al., "Bag of Tricks", CVPRW 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GeM(nn.Module):
    """Generalised-mean pooling: (mean x^p)^(1/p), learnable p (Radenović et al. 2018)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class AvgPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1))


def make_pool(kind: str) -> nn.Module:
    if kind == "gem":
        return GeM()
    if kind == "avg":
        return AvgPool()
    raise ValueError(f"unknown pooling {kind!r} (gem or avg)")


class BNNeck(nn.Module):
    """BatchNorm bottleneck: triplet losses on the pre-BN feature, identity classifier on the
    BN feature (bias frozen at 0, classifier without bias); at test time the BN feature."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)
        nn.init.constant_(self.bn.weight, 1.0)
        nn.init.constant_(self.bn.bias, 0.0)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (bn_feat, logits)."""
        bn_feat = self.bn(feat)
        return bn_feat, self.classifier(bn_feat)


def l2_normalize(x: Tensor) -> Tensor:
    return F.normalize(x, p=2, dim=1)
