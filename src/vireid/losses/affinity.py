"""DF2AM affinity modelling (Sec. 3.4): the batch affinity matrix and the losses that shape it.

The affinity matrix covers the whole 2K* batch -- the blocks D_RGB,RGB, D_RGB,IR, D_IR,RGB and
D_IR,IR of Eq. 9 -- so intra- and inter-modality pairs are shaped together. Its inputs are the
global (GAP, pre-BN) features of the two modalities.

Reduction: Eq. 12 is written as a sum over the (2K*)^2 pairs and Eq. 11 is described as a mean
L1 error; ``reduction="mean"`` (the default) divides either by the number of pairs, ``"sum"`` is
the literal sum of Eq. 12.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vireid.losses.triplet import pairwise_euclidean

AffinityLoss = Literal["margin", "l1"]


def affinity_matrix(features: Tensor) -> Tensor:
    """DF2AM Eq. 9-10: D_ij = || f_i/||f_i||_2 - f_j/||f_j||_2 ||_2 over every pair of the batch (B, B).

    The diagonal is exactly 0 (and carries no gradient) instead of float32 cancellation noise.
    """
    distances = pairwise_euclidean(F.normalize(features.float(), p=2, dim=1))
    self_pairs = torch.eye(len(features), dtype=torch.bool, device=features.device)
    return distances.masked_fill(self_pairs, 0.0)


def identity_affinity(labels: Tensor) -> Tensor:
    """DF2AM's ground-truth affinity (Sec. 3.4): G_ij = 1 if images i and j show the same identity, else 0."""
    return (labels.unsqueeze(0) == labels.unsqueeze(1)).float()


def affinity_margin_loss(distances: Tensor, same_identity: Tensor, margin: float,
                         reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """DF2AM Eq. 12: L_A = sum_ij [D_ij G_ij - (D_ij - m)(1 - G_ij)]_+ (pulls positives to 0,
    pushes negatives beyond m); ``reduction="sum"`` is the literal sum, ``"mean"`` divides it by the B^2 pairs."""
    terms = (distances * same_identity - (distances - margin) * (1.0 - same_identity)).clamp(min=0.0)
    return terms.mean() if reduction == "mean" else terms.sum()


def affinity_l1_loss(distances: Tensor, same_identity: Tensor, delta: float,
                     reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """DF2AM Eq. 11: L_1 = ||D - (1 - G) delta||_1 (positives to 0, negatives exactly to delta);
    ``reduction="mean"`` is the paper's "mean L1 error" over the B^2 pairs."""
    terms = (distances - (1.0 - same_identity) * delta).abs()
    return terms.mean() if reduction == "mean" else terms.sum()


def affinity_loss(features: Tensor, labels: Tensor, kind: AffinityLoss = "margin", margin: float = 1.0,
                  reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """DF2AM's affinity loss on the batch's global features: Eq. 12 (``"margin"``, margin m) or the
    L1 form of Eq. 11 (``"l1"``, delta = ``margin``), over the affinity matrix of Eq. 9-10."""
    distances = affinity_matrix(features)
    same_identity = identity_affinity(labels)
    if kind == "margin":
        return affinity_margin_loss(distances, same_identity, margin, reduction)
    if kind == "l1":
        return affinity_l1_loss(distances, same_identity, margin, reduction)
    raise ValueError(f"affinity loss kind must be 'margin' or 'l1', got {kind!r}")
