"""SAAI center-separation loss: features gather at their identity centre, centres stay apart."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from vireid.losses.triplet import pairwise_euclidean

SeparationAnchors = Literal["identities", "batch_stride"]


def identity_centers(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-identity mean features of the batch (both modalities together).

    Returns (centers (U, d), unique labels (U,), index (B,) of each sample's centre).
    """
    unique, index = torch.unique(labels, return_inverse=True)
    sums = features.new_zeros((len(unique), features.shape[1])).index_add_(0, index, features)
    counts = torch.bincount(index, minlength=len(unique)).to(features.dtype).unsqueeze(1)
    return sums / counts, unique, index


def center_separation_loss(features: Tensor, labels: Tensor, rho1: float = 0.01, rho2: float = 0.7,
                           anchors: SeparationAnchors = "identities", stride: int = 8,
                           eps: float = 1e-12) -> Tensor:
    """SAAI Eq. 5: L_cs = mean_i [||f_i - c_{y_i}|| - rho1]_+ + mean_{a} mean_{b != a} [rho2 - ||c_a - c_b||]_+.

    ``anchors="identities"`` (the paper): every identity centre of the batch is an anchor and
    its separation term averages over the other identities' centres.
    ``anchors="batch_stride"`` (the public code): only batch rows 0, stride, 2*stride, ... are
    anchors, and each averages over the *samples* of other identities. With the code's
    sampler (all visible images, then all infrared, ``stride/2`` per identity and modality)
    these rows cover every other identity, twice, and skip the rest.
    """
    features = features.float()
    centers, _, index = identity_centers(features, labels)
    compact = ((features - centers[index]).pow(2).sum(dim=1).clamp(min=eps).sqrt() - rho1).clamp(min=0.0)
    if anchors == "identities":
        if len(centers) < 2:
            return compact.mean() + centers.sum() * 0.0
        gaps = (rho2 - pairwise_euclidean(centers)).clamp(min=0.0)
        off_diagonal = ~torch.eye(len(centers), dtype=torch.bool, device=features.device)
        separation = gaps[off_diagonal].view(len(centers), -1).mean(dim=1).mean()
    elif anchors == "batch_stride":
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        rows = torch.arange(0, len(labels), stride, device=features.device)
        sample_centers = centers[index]
        gaps = (rho2 - pairwise_euclidean(sample_centers[rows], sample_centers)).clamp(min=0.0)
        negatives = labels[rows].unsqueeze(1) != labels.unsqueeze(0)
        per_row = (gaps * negatives).sum(dim=1) / negatives.sum(dim=1).clamp(min=1)
        separation = per_row[negatives.any(dim=1)].mean() if bool(negatives.any()) else gaps.sum() * 0.0
    else:
        raise ValueError(f"anchors must be 'identities' or 'batch_stride', got {anchors!r}")
    return compact.mean() + separation
