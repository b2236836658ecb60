"""Batch-hard triplet losses with modality-aware pair selection.

Every function is a pure function of (features, labels, modality). ``pairs`` selects which
positives and negatives an anchor may use:

* ``"all"``   — any other image of the batch (the usual batch-hard triplet);
* ``"cross"`` — only images of the *other* modality (cross-modality triplet);
* ``"intra"`` — only images of the *same* modality.

The anchor itself is never its own positive. Anchors without a positive or without a
negative in the allowed set are left out of the mean; a batch with no valid anchor gives a
zero loss that still carries a graph (so ``backward`` works).

:func:`directed_batch_hard_triplet_loss` takes anchors from one set and positives/negatives from
another (XIV's directional cross-modality terms, Eq. 5-6).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

PairSet = Literal["all", "cross", "intra"]
PAIR_SETS: tuple[str, ...] = ("all", "cross", "intra")


def pairwise_euclidean(x: Tensor, y: Tensor | None = None, eps: float = 1e-12) -> Tensor:
    """Euclidean distances ``||x_i - y_j||`` (B, B'), clamped at ``sqrt(eps)`` for stable gradients.

    Computed in float32 from the Gram matrix after shifting both sets by the mean of ``x`` (which
    leaves every distance unchanged): pooled CNN features share a large common component (2048-d
    ResNet-50 features have norms near 30), and without the shift ``|x|^2 + |y|^2 - 2 x.y``
    loses small distances to cancellation (0.448 comes out 0.4485 in float32, anything in bf16).
    """
    y = x if y is None else y
    x = x.float()
    y = y.float()
    shift = x.detach().mean(dim=0, keepdim=True)
    x, y = x - shift, y - shift
    sq = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * x @ y.t()
    return sq.clamp(min=eps).sqrt()


def pair_masks(labels: Tensor, modality: Tensor | None, pairs: PairSet = "all") -> tuple[Tensor, Tensor]:
    """Boolean (B, B) masks of allowed positives and negatives for each anchor (row)."""
    if pairs not in PAIR_SETS:
        raise ValueError(f"pairs must be one of {PAIR_SETS}, got {pairs!r}")
    same_id = labels.unsqueeze(0) == labels.unsqueeze(1)
    not_self = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    if pairs == "all":
        allowed = torch.ones_like(same_id)
    else:
        if modality is None:
            raise ValueError(f"pairs={pairs!r} needs the modality of each image")
        same_modality = modality.unsqueeze(0) == modality.unsqueeze(1)
        allowed = ~same_modality if pairs == "cross" else same_modality
    return same_id & allowed & not_self, ~same_id & allowed


def _mean_over_valid(per_anchor: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``per_anchor`` over the ``valid`` anchors; 0 (with a graph) when none is valid.
    Computed without reading ``valid`` on the host (no device synchronisation)."""
    return per_anchor.where(valid, 0.0).sum() / valid.sum().clamp(min=1)


def _ranking_loss(dist_ap: Tensor, dist_an: Tensor, margin: float | None) -> Tensor:
    """max(0, d_ap - d_an + margin), or the soft margin log(1 + exp(d_ap - d_an)) when ``margin`` is None."""
    if margin is None:
        return F.softplus(dist_ap - dist_an)
    return F.relu(dist_ap - dist_an + margin)


def batch_hard_triplet_loss(features: Tensor, labels: Tensor, modality: Tensor | None = None,
                            pairs: PairSet = "all", margin: float | None = 0.3) -> Tensor:
    """Batch-hard triplet L_BH (Hermans et al., "In Defense of the Triplet Loss", 2017): per anchor, the farthest allowed positive
    and the closest allowed negative; ``max(0, d_ap - d_an + margin)`` averaged over valid anchors."""
    dist = pairwise_euclidean(features)
    pos, neg = pair_masks(labels, modality, pairs)
    hardest_pos = dist.masked_fill(~pos, float("-inf")).amax(dim=1)
    hardest_neg = dist.masked_fill(~neg, float("inf")).amin(dim=1)
    valid = pos.any(dim=1) & neg.any(dim=1)
    per_anchor = _ranking_loss(hardest_pos.where(valid, 0.0), hardest_neg.where(valid, 0.0), margin)
    return _mean_over_valid(per_anchor, valid)


def _masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Row-wise softmax over the entries where ``mask`` is true; rows with none are all zero."""
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=1)
    return weights.nan_to_num(0.0)


def weighted_regularized_triplet_loss(features: Tensor, labels: Tensor, modality: Tensor | None = None,
                                      pairs: PairSet = "all") -> Tensor:
    """AGW's weighted regularisation triplet L_wrt (Ye et al., "Deep Learning for Person Re-identification", TPAMI 2021).

    d_p = sum_j w_ij d_ij over positives with w_ij = softmax(d_ij), d_n = sum_k w_ik d_ik over
    negatives with w_ik = softmax(-d_ik); loss = log(1 + exp(d_p - d_n)), averaged over anchors.
    Unlike the public AGW code, the anchor is not among its own positives (the paper's P_i).
    """
    dist = pairwise_euclidean(features)
    pos, neg = pair_masks(labels, modality, pairs)
    dist_ap = (_masked_softmax(dist, pos) * dist).sum(dim=1)
    dist_an = (_masked_softmax(-dist, neg) * dist).sum(dim=1)
    valid = pos.any(dim=1) & neg.any(dim=1)
    return _mean_over_valid(F.softplus(dist_ap - dist_an), valid)


def directed_batch_hard_triplet_loss(anchors: Tensor, anchor_labels: Tensor, candidates: Tensor,
                                     candidate_labels: Tensor, margin: float = 0.3) -> Tensor:
    """Batch-hard triplet with anchors from one set and positives/negatives from another:
    mean over anchors a of ``max(0, margin + max_{y_p = y_a} d(a, p) - min_{y_n != y_a} d(a, n))``,
    p and n ranging over ``candidates`` (XIV Eq. 5 / Eq. 6 divided by M). Anchors without a
    positive or a negative among the candidates are left out of the mean.
    """
    dist = pairwise_euclidean(anchors, candidates)
    same_id = anchor_labels.unsqueeze(1) == candidate_labels.unsqueeze(0)
    hardest_pos = dist.masked_fill(~same_id, float("-inf")).amax(dim=1)
    hardest_neg = dist.masked_fill(same_id, float("inf")).amin(dim=1)
    valid = same_id.any(dim=1) & (~same_id).any(dim=1)
    per_anchor = F.relu(hardest_pos.where(valid, 0.0) - hardest_neg.where(valid, 0.0) + margin)
    return _mean_over_valid(per_anchor, valid)
