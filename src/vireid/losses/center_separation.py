"""SAAI center-separation loss (Eq. 5): features gather at their identity centre, centres stay apart."""

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
    """SAAI Eq. 5: L_cs = (1/N) sum_i [||F_i - c_{y_i}||_2 - rho1]_+
    + (2 / (M(M-1))) sum_{j<k} [rho2 - ||c_j - c_k||_2]_+.

    The centre c_y is the batch mean of identity y's features over both modalities; M is the
    number of identities in the batch (no separation term when M = 1).
    ``anchors="batch_stride"`` (the public code): only batch rows 0, stride, 2*stride, ... are
    anchors, each averaging [rho2 - ||c_{y_r} - c_{y_j}||]_+ over the *samples* j of other
    identities. When every identity has the same number of images in the batch and each
    identity's images are ``stride`` consecutive rows (vireid's sampler, and the sampler of the
    public code's configs), every identity is an anchor once and this equals the paper's term.
    """
    features = features.float()
    centers, _, index = identity_centers(features, labels)
    compact = ((features - centers[index]).pow(2).sum(dim=1).clamp(min=eps).sqrt() - rho1).clamp(min=0.0).mean()
    if anchors == "identities":
        if len(centers) < 2:
            return compact
        gaps = (rho2 - pairwise_euclidean(centers, eps=eps)).clamp(min=0.0)
        off_diagonal = ~torch.eye(len(centers), dtype=torch.bool, device=features.device)
        return compact + gaps[off_diagonal].mean()
    if anchors == "batch_stride":
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        rows = torch.arange(0, len(labels), stride, device=features.device)
        if len(centers) < 2:
            return compact
        negatives = labels[rows].unsqueeze(1) != labels.unsqueeze(0)      # every row has one: M >= 2
        sample_centers = centers[index]
        gaps = (rho2 - pairwise_euclidean(sample_centers[rows], sample_centers, eps=eps)).clamp(min=0.0)
        return compact + ((gaps * negatives).sum(dim=1) / negatives.sum(dim=1)).mean()
    raise ValueError(f"anchors must be 'identities' or 'batch_stride', got {anchors!r}")
