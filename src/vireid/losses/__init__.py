"""Losses shared by all methods: pure functions of (features or logits, labels, modality)."""

from vireid.losses.identity import label_smoothed_cross_entropy
from vireid.losses.triplet import (
    PAIR_SETS,
    PairSet,
    batch_hard_triplet_loss,
    directed_batch_hard_triplet_loss,
    pair_masks,
    pairwise_euclidean,
    weighted_regularized_triplet_loss,
)

__all__ = [
    "PAIR_SETS",
    "PairSet",
    "batch_hard_triplet_loss",
    "directed_batch_hard_triplet_loss",
    "label_smoothed_cross_entropy",
    "pair_masks",
    "pairwise_euclidean",
    "weighted_regularized_triplet_loss",
]
