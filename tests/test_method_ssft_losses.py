"""cm-SSFT's loss functions against loops and hand-worked cases: the per-modality triplet terms of
Eq. 3, 4 and 13, the per-modality identity terms of Eq. 18's L(P), and the complementary-learning
losses of Eq. 14–17 with the domain-confusion form of the modality term."""

from __future__ import annotations

import math

import pytest
import torch

from vireid.losses.adversarial import (
    discriminator_accuracy,
    modality_adaptation_loss,
    modality_confusion_loss,
    projection_adversarial_loss,
    reconstruction_loss,
)
from vireid.losses.modality_terms import modality_cross_entropy_terms, modality_triplet_terms

from method_training import seeded


def _loop_triplet_term(x, labels, modality, anchor_modality, pairs, margin):
    """One term of Eq. 3 / 4 by loops: mean over anchors of ``anchor_modality`` of
    max(0, ρ + max_j ||x_i − x_j|| − min_k ||x_i − x_k||), j / k of the allowed modality."""
    losses = []
    for i in range(len(labels)):
        if modality[i] != anchor_modality:
            continue
        allowed = [j for j in range(len(labels))
                   if (modality[j] == modality[i]) == (pairs == "intra") and j != i]
        pos = [float(torch.linalg.norm(x[i] - x[j])) for j in allowed if labels[j] == labels[i]]
        neg = [float(torch.linalg.norm(x[i] - x[k])) for k in allowed if labels[k] != labels[i]]
        if pos and neg:
            losses.append(max(0.0, margin + max(pos) - min(neg)))
    return sum(losses) / len(losses) if losses else 0.0


# an unbalanced batch: 5 visible, 3 infrared images; identity 2 has no infrared image
LABELS = torch.tensor([0, 0, 1, 1, 2, 0, 1, 1])
MODALITY = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize("pairs", ["intra", "cross"])
@pytest.mark.parametrize("margin", [0.3, 4.0])
def test_modality_triplet_terms_match_loops(pairs, margin):
    x = torch.randn(8, 5, generator=seeded(30))
    got = modality_triplet_terms(x, LABELS, MODALITY, pairs, margin)
    expected = [_loop_triplet_term(x, LABELS, MODALITY, m, pairs, margin) for m in (0, 1)]
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_modality_triplet_terms_hand_worked_case():
    # 1-D features. visible: a0 (id 0) at 0, a1 (id 1) at 3; infrared: b0 (id 0) at 1, b1 (id 1) at 5.
    x = torch.tensor([[0.0], [3.0], [1.0], [5.0]])
    labels, modality = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])
    # cross: a0: d(a0,b0)=1, d(a0,b1)=5 -> max(0, .5+1-5)=0; a1: d(a1,b1)=2, d(a1,b0)=2 -> .5
    #        b0: d(b0,a0)=1, d(b0,a1)=2 -> 0; b1: d(b1,a1)=2, d(b1,a0)=5 -> 0
    cross = modality_triplet_terms(x, labels, modality, "cross", 0.5)
    assert cross.tolist() == pytest.approx([0.25, 0.0])
    # intra: no anchor has a same-modality positive -> both terms 0, still differentiable
    intra = modality_triplet_terms(x.requires_grad_(), labels, modality, "intra", 0.5)
    assert intra.tolist() == [0.0, 0.0]
    intra.sum().backward()


def test_modality_triplet_terms_are_per_modality_means_not_one_batch_mean():
    x = torch.randn(8, 5, generator=seeded(31))
    terms = modality_triplet_terms(x, LABELS, MODALITY, "cross", 2.0)
    anchors = [_loop_triplet_term(x, LABELS, MODALITY, m, "cross", 2.0) for m in (0, 1)]
    assert terms.sum().item() == pytest.approx(sum(anchors), rel=1e-5)
    assert terms[0].item() != pytest.approx(terms[1].item(), rel=1e-3)   # the batch really is unbalanced


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_modality_cross_entropy_terms_match_loops(smoothing):
    logits = torch.randn(8, 4, generator=seeded(32))
    got = modality_cross_entropy_terms(logits, LABELS, MODALITY, smoothing)
    expected = []
    for m in (0, 1):
        rows = [i for i in range(8) if MODALITY[i] == m]
        per_image = []
        for i in rows:
            log_p = torch.log_softmax(logits[i], 0)
            target = [smoothing / 4 + (1 - smoothing) * float(c == int(LABELS[i])) for c in range(4)]
            per_image.append(-sum(t * float(lp) for t, lp in zip(target, log_p)))
        expected.append(sum(per_image) / len(per_image))
    assert got.tolist() == pytest.approx(expected, rel=1e-5)


def test_modality_cross_entropy_terms_default_is_plain_cross_entropy():
    # visible: p = (3/4, 1/4) with label 0, p = (1/2, 1/2) with label 1; infrared: p = (1/4, 3/4) with label 0
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, math.log(3.0)]])
    got = modality_cross_entropy_terms(logits, torch.tensor([0, 1, 0]), torch.tensor([0, 0, 1]))
    assert got.tolist() == pytest.approx([(-math.log(0.75) + math.log(2.0)) / 2, math.log(4.0)], rel=1e-6)


def test_modality_cross_entropy_terms_of_a_missing_modality_are_zero():
    logits = torch.randn(3, 4, generator=seeded(33), requires_grad=True)
    got = modality_cross_entropy_terms(logits, torch.tensor([0, 1, 2]), torch.tensor([1, 1, 1]))
    assert got[0].item() == 0.0 and got[1].item() > 0
    got.sum().backward()


def test_modality_adaptation_loss_is_cross_entropy():
    logits = torch.randn(5, 2, generator=seeded(22))
    modality = torch.tensor([0, 1, 1, 0, 1])
    expected = -sum(torch.log_softmax(logits[i], 0)[modality[i]].item() for i in range(5)) / 5
    assert modality_adaptation_loss(logits, modality).item() == pytest.approx(expected, rel=1e-5)


def test_modality_confusion_loss_hand_worked_and_minimal_at_uniform():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])      # p = (3/4, 1/4) and (1/2, 1/2)
    expected = (-(math.log(0.75) + math.log(0.25)) / 2 + math.log(2.0)) / 2
    assert modality_confusion_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    assert modality_confusion_loss(torch.zeros(4, 2)).item() == pytest.approx(math.log(2.0))
    three = torch.tensor([[1.0, 2.0, 4.0]])
    assert modality_confusion_loss(three).item() == pytest.approx(
        -float(torch.log_softmax(three[0], 0).mean()), rel=1e-6)


def test_confusion_gradient_survives_a_certain_discriminator_while_the_literal_one_vanishes():
    """The reason for the confusion form: on a certain, correct discriminator (p ≈ 1) the gradient
    of −L_ma vanishes, the confusion loss's does not (p − 1/2 on each logit)."""
    logits = torch.tensor([[12.0, -12.0], [-12.0, 12.0]], requires_grad=True)
    modality = torch.tensor([0, 1])
    (literal,) = torch.autograd.grad(-modality_adaptation_loss(logits, modality), logits)
    (confusion,) = torch.autograd.grad(modality_confusion_loss(logits), logits)
    assert literal.abs().max().item() < 1e-9
    torch.testing.assert_close(confusion, torch.tensor([[0.25, -0.25], [-0.25, 0.25]]), atol=1e-6, rtol=0)


def test_discriminator_accuracy_hand_worked():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [0.2, 0.1]])
    assert discriminator_accuracy(logits, torch.tensor([0, 1, 1, 1])).item() == pytest.approx(0.5)
    assert discriminator_accuracy(logits, torch.tensor([0, 1, 0, 0])).item() == pytest.approx(1.0)


def test_projection_adversarial_loss_is_mean_distance():
    projected, shared = torch.randn(4, 3, generator=seeded(23)), torch.randn(4, 3, generator=seeded(24))
    expected = sum(float(torch.sqrt(((projected[i] - shared[i]) ** 2).sum())) for i in range(4)) / 4
    assert projection_adversarial_loss(projected, shared).item() == pytest.approx(expected, rel=1e-5)
    assert projection_adversarial_loss(torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])).item() == 5.0


def test_reconstruction_loss_is_mean_squared_error():
    a, b = torch.randn(2, 3, 4, 2, generator=seeded(25)), torch.randn(2, 3, 4, 2, generator=seeded(26))
    assert reconstruction_loss(a, b).item() == pytest.approx(float(((a - b) ** 2).sum()) / a.numel(), rel=1e-5)
