"""SAAI part-diversity loss (Eq. 4): the prototypes should score different positions."""

from __future__ import annotations

import torch
from torch import Tensor


def part_diversity_loss(scores: Tensor, *, rms: bool = False, eps: float = 1e-12) -> Tensor:
    """SAAI Eq. 4: L_pd = -(2 / (p(p-1))) sum_{i<j} ||s_i - s_j||_2, averaged over the batch.

    ``scores``: (B, p, n), row i what prototype i assigns to the n feature-map positions: its
    mask S_i of Eq. 1 (SAAI's model; the public code) or its raw scores P_i T^T (Eq. 4 as
    printed). ``rms=True`` divides each norm by sqrt(n) (root-mean-square difference), as the
    public code does (its ``/(18 * 9)`` inside the square root).
    """
    if scores.ndim != 3 or scores.shape[1] < 2:
        raise ValueError(f"scores must be (B, p >= 2, n), got shape {tuple(scores.shape)}")
    num_parts = scores.shape[1]
    first, second = torch.triu_indices(num_parts, num_parts, offset=1, device=scores.device)
    squared = (scores[:, first] - scores[:, second]).float().pow(2)
    squared = squared.mean(dim=2) if rms else squared.sum(dim=2)
    return -squared.clamp(min=eps).sqrt().mean()
