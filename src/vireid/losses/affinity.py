"""DF2AM affinity modelling: batch affinity matrix and the losses that shape it.

The affinity matrix covers the whole 2K batch (RGB/IR x RGB/IR blocks), so same-modality
and cross-modality pairs are shaped together (DF2AM Sec. 3.3).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vireid.losses.triplet import pairwise_euclidean

AffinityLoss = Literal["margin", "l1"]


def affinity_matrix(features: Tensor) -> Tensor:
    """DF2AM Eq. 9-10: D_ij = ||f_i/||f_i|| - f_j/||f_j|| ||_2 over every pair of the batch (B, B).

    The diagonal is exactly 0 (and carries no gradient) instead of float32 cancellation noise.
    """
    distances = pairwise_euclidean(F.normalize(features.float(), p=2, dim=1))
    self_pairs = torch.eye(len(features), dtype=torch.bool, device=features.device)
    return distances.masked_fill(self_pairs, 0.0)


def identity_affinity(labels: Tensor) -> Tensor:
    """Ground-truth affinity G_ij = 1 if images i and j show the same identity, else 0 (B, B)."""
    return (labels.unsqueeze(0) == labels.unsqueeze(1)).float()


def affinity_margin_loss(distances: Tensor, same_identity: Tensor, margin: float,
                         reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """DF2AM Eq. 12: L_A = sum_ij [D_ij G_ij - (D_ij - m)(1 - G_ij)]_+ (pulls positives to 0,
    pushes negatives beyond m); ``reduction="mean"`` divides by the B^2 pairs."""
    terms = (distances * same_identity - (distances - margin) * (1.0 - same_identity)).clamp(min=0.0)
    return terms.mean() if reduction == "mean" else terms.sum()


def affinity_l1_loss(distances: Tensor, same_identity: Tensor, delta: float,
                     reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """DF2AM Eq. 11: L_A = ||D - (1 - G) delta||_1 (positives to 0, negatives exactly to delta)."""
    terms = (distances - (1.0 - same_identity) * delta).abs()
    return terms.mean() if reduction == "mean" else terms.sum()


def affinity_loss(features: Tensor, labels: Tensor, kind: AffinityLoss = "margin", margin: float = 1.0,
                  reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """L_A on the batch's global features: Eq. 12 (``"margin"``, margin m) or Eq. 11 (``"l1"``, delta = m)."""
    distances = affinity_matrix(features)
    same_identity = identity_affinity(labels)
    if kind == "margin":
        return affinity_margin_loss(distances, same_identity, margin, reduction)
    if kind == "l1":
        return affinity_l1_loss(distances, same_identity, margin, reduction)
    raise ValueError(f"affinity loss kind must be 'margin' or 'l1', got {kind!r}")
