"""Losses against direct per-anchor loop computations."""

from __future__ import annotations

import math

import pytest
import torch

from vireid.losses import (
    batch_hard_triplet_loss,
    label_smoothed_cross_entropy,
    pair_masks,
    weighted_regularized_triplet_loss,
)


def _batch(seed: int = 0, ids: int = 4, per_modality: int = 2, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ids).repeat_interleave(2 * per_modality)
    modality = torch.tensor([0] * per_modality + [1] * per_modality).repeat(ids)
    return torch.randn(len(labels), dim, generator=g, dtype=torch.float64), labels, modality


def _allowed(pairs: str, mi: int, mj: int) -> bool:
    return pairs == "all" or (pairs == "cross") == (mi != mj)


def _loop_sets(feats, labels, modality, pairs, i):
    n = len(labels)
    dist = [math.dist(feats[i].tolist(), feats[j].tolist()) for j in range(n)]
    pos = [dist[j] for j in range(n) if j != i and labels[j] == labels[i] and _allowed(pairs, modality[i], modality[j])]
    neg = [dist[j] for j in range(n) if labels[j] != labels[i] and _allowed(pairs, modality[i], modality[j])]
    return pos, neg


def _loop_batch_hard(feats, labels, modality, pairs, margin):
    terms = []
    for i in range(len(labels)):
        pos, neg = _loop_sets(feats, labels.tolist(), modality.tolist(), pairs, i)
        if pos and neg:
            x = max(pos) - min(neg)
            terms.append(math.log1p(math.exp(x)) if margin is None else max(0.0, x + margin))
    return sum(terms) / len(terms)


def _loop_wrt(feats, labels, modality, pairs):
    terms = []
    for i in range(len(labels)):
        pos, neg = _loop_sets(feats, labels.tolist(), modality.tolist(), pairs, i)
        if pos and neg:
            wp = [math.exp(d) for d in pos]
            wn = [math.exp(-d) for d in neg]
            dp = sum(w * d for w, d in zip(wp, pos)) / sum(wp)
            dn = sum(w * d for w, d in zip(wn, neg)) / sum(wn)
            terms.append(math.log1p(math.exp(dp - dn)))
    return sum(terms) / len(terms)


def test_label_smoothed_ce_matches_direct_formula() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    eps = 0.1
    expected = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        q = [(1 - eps) * (k == y) + eps / len(row) for k in range(len(row))]
        expected += -sum(qk * (v - log_z) for qk, v in zip(q, row))
    got = label_smoothed_cross_entropy(logits, labels, epsilon=eps)
    assert got.item() == pytest.approx(expected / len(labels), rel=1e-6)
    plain = label_smoothed_cross_entropy(logits, labels, epsilon=0.0)
    assert plain.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)


@pytest.mark.parametrize("pairs", ["all", "cross", "intra"])
@pytest.mark.parametrize("margin", [0.3, None])
def test_batch_hard_triplet_matches_loop(pairs: str, margin: float | None) -> None:
    feats, labels, modality = _batch(seed=2)
    got = batch_hard_triplet_loss(feats, labels, modality, pairs=pairs, margin=margin)
    assert got.item() == pytest.approx(_loop_batch_hard(feats, labels, modality, pairs, margin), rel=1e-5)


@pytest.mark.parametrize("pairs", ["all", "cross", "intra"])
def test_weighted_regularized_triplet_matches_loop(pairs: str) -> None:
    feats, labels, modality = _batch(seed=3)
    got = weighted_regularized_triplet_loss(feats, labels, modality, pairs=pairs)
    assert got.item() == pytest.approx(_loop_wrt(feats, labels, modality, pairs), rel=1e-5)


def test_anchors_without_allowed_pairs_are_skipped() -> None:
    # identity 0 has only visible images: no cross-modality positive for its anchors
    feats = torch.tensor([[0.0, 0.0], [0.1, 0.0], [1.0, 0.0], [1.2, 0.0], [3.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2])
    modality = torch.tensor([0, 0, 0, 1, 1])
    got = batch_hard_triplet_loss(feats, labels, modality, pairs="cross", margin=0.5)
    assert got.item() == pytest.approx(_loop_batch_hard(feats, labels, modality, "cross", 0.5), rel=1e-6)
    pos, neg = pair_masks(labels, modality, "cross")
    assert not pos[0].any() and neg[0].any()


def test_no_valid_anchor_gives_zero_loss_with_gradient() -> None:
    feats = torch.randn(3, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2])  # no positives at all
    for loss in (batch_hard_triplet_loss(feats, labels), weighted_regularized_triplet_loss(feats, labels)):
        assert loss.item() == 0.0
        loss.backward()
        assert feats.grad is not None and torch.isfinite(feats.grad).all()


def test_gradients_are_finite_for_duplicate_features() -> None:
    feats = torch.ones(4, 3, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    modality = torch.tensor([0, 1, 0, 1])
    loss = batch_hard_triplet_loss(feats, labels, modality, pairs="cross") + weighted_regularized_triplet_loss(feats, labels, modality)
    loss.backward()
    assert torch.isfinite(feats.grad).all()


def test_cross_and_intra_need_modality() -> None:
    with pytest.raises(ValueError, match="modality"):
        batch_hard_triplet_loss(torch.zeros(2, 2), torch.tensor([0, 0]), None, pairs="cross")
