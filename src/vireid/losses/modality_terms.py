"""Losses written as one term per anchor modality, as cm-SSFT states them (Lu et al., "Cross-Modality
Person Re-Identification with Shared-Specific Feature Transfer", CVPR 2020, Eq. 2–4, 13, 18).

cm-SSFT's triplet losses are sums of one term per anchor modality: L_smT (Eq. 3) has an RGB term
(RGB anchor, RGB positive and negative) and an infrared term, L_cmT (Eq. 4) an RGB-anchor term
(infrared positive and negative) and an infrared-anchor term, and L_t(T) (Eq. 13) all four. Each
term is read as the batch-hard triplet of [17] (Hermans et al.) averaged over the anchors of that
modality; Eq. 18's weights 0.5 and 0.25 then average the terms. L(P) of Eq. 18 likewise halves
the sum of one identity loss per modality.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vireid.losses.triplet import PairSet, pair_masks, pairwise_euclidean


def modality_triplet_terms(features: Tensor, labels: Tensor, modality: Tensor, pairs: PairSet,
                           margin: float, modalities: tuple[int, ...] = (0, 1)) -> Tensor:
    """One batch-hard triplet term per anchor modality, shape (len(modalities),).

    Term m: mean over anchors i of modality m of max(0, ρ + max_j ||f_i − f_j|| − min_k ||f_i − f_k||),
    j over same-identity and k over other-identity images allowed by ``pairs`` (``"intra"``: of
    modality m, Eq. 3; ``"cross"``: of the other modality, Eq. 4). Anchors without an allowed
    positive or negative are left out; a term without any valid anchor is 0 (with a graph).
    """
    dist = pairwise_euclidean(features)
    pos, neg = pair_masks(labels, modality, pairs)
    hardest_pos = dist.masked_fill(~pos, float("-inf")).amax(dim=1)
    hardest_neg = dist.masked_fill(~neg, float("inf")).amin(dim=1)
    valid = pos.any(dim=1) & neg.any(dim=1)
    per_anchor = F.relu(margin + hardest_pos.where(valid, 0.0) - hardest_neg.where(valid, 0.0))
    terms = []
    for m in modalities:
        anchors = valid & (modality == m)
        terms.append(per_anchor[anchors].mean() if bool(anchors.any()) else per_anchor.sum() * 0.0)
    return torch.stack(terms)


def modality_cross_entropy_terms(logits: Tensor, labels: Tensor, modality: Tensor, label_smoothing: float = 0.0,
                                 modalities: tuple[int, ...] = (0, 1)) -> Tensor:
    """L_c(P^m) of cm-SSFT Eq. 2 for each modality m: the identity cross-entropy averaged over the
    images of modality m, shape (len(modalities),); 0 (with a graph) for a modality the batch lacks.
    ``label_smoothing`` ε: target 1 − ε + ε/K on the true class, ε/K elsewhere (0: plain cross-entropy)."""
    nll = F.cross_entropy(logits.float(), labels.long(), reduction="none", label_smoothing=label_smoothing)
    return torch.stack([nll[modality == m].mean() if bool((modality == m).any()) else nll.sum() * 0.0
                        for m in modalities])
