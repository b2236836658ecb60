"""SAAI part-diversity loss: semantic part masks should attend to different positions."""

from __future__ import annotations

import torch
from torch import Tensor


def part_diversity_loss(attention: Tensor, eps: float = 1e-12) -> Tensor:
    """SAAI Eq. 4: L_pd = -(2 / (p(p-1))) sum_{i<j} ||S_i - S_j||_2 / sqrt(n), averaged over the batch.

    ``attention``: (B, p, n) part masks S over the n feature-map positions. The 1/sqrt(n)
    (root-mean-square difference) follows the public code, which divides by its hard-coded
    n = 18 x 9 = 162; here n is the actual number of positions.
    """
    if attention.ndim != 3 or attention.shape[1] < 2:
        raise ValueError(f"attention must be (B, p >= 2, n), got shape {tuple(attention.shape)}")
    num_parts = attention.shape[1]
    first, second = torch.triu_indices(num_parts, num_parts, offset=1, device=attention.device)
    diff = attention[:, first] - attention[:, second]
    rms = diff.float().pow(2).mean(dim=2).clamp(min=eps).sqrt()
    return -rms.mean()
