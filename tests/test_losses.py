"""Losses against direct per-anchor loop computations."""

from __future__ import annotations

import math

import pytest
import torch

from vireid.losses import (
    batch_hard_triplet_loss,
    directed_batch_hard_triplet_loss,
    label_smoothed_cross_entropy,
    pairwise_euclidean,
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


def test_label_smoothing_default_epsilon_is_0_1_hand_worked() -> None:
    # logits (ln 3, 0): p = (3/4, 1/4); eps = 0.1 over K = 2 classes gives the target q = (0.95, 0.05)
    logits = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    expected = -(0.95 * math.log(0.75) + 0.05 * math.log(0.25))
    assert label_smoothed_cross_entropy(logits, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("epsilon", [1.0, 1.5, -0.1])
def test_label_smoothing_rejects_epsilon_outside_0_1(epsilon: float) -> None:
    # eps = 1 would make the target uniform whatever the label: no identity left to learn
    with pytest.raises(ValueError, match=rf"^epsilon must be in \[0, 1\), got {epsilon}$"):
        label_smoothed_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), epsilon=epsilon)


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


def test_batch_hard_triplet_hand_worked_case() -> None:
    # 1-D: ids 0 at {0, 1}, id 1 at {3, 7}. margin 1.
    # anchor 0: hardest pos 1, hardest neg 3 -> [1 + 1 - 3]_+ = 0; anchor 1: [1 + 1 - 2]_+ = 0;
    # anchor 3: pos 4, neg 2 -> 3; anchor 7: pos 4, neg 6 -> 0.  Mean 0.75.
    feats = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    assert batch_hard_triplet_loss(feats, labels, margin=1.0).item() == pytest.approx(0.75, abs=1e-6)
    # soft margin: mean of log(1 + exp(d_ap - d_an))
    soft = [math.log1p(math.exp(x)) for x in (1 - 3, 1 - 2, 4 - 2, 4 - 6)]
    assert batch_hard_triplet_loss(feats, labels, margin=None).item() == pytest.approx(sum(soft) / 4, rel=1e-6)


def test_pairwise_euclidean_matches_loop_and_clamps_at_sqrt_eps() -> None:
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.randn(2, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got = pairwise_euclidean(x, y)
    assert got.shape == (4, 2)
    for i in range(4):
        for j in range(2):
            assert got[i, j].item() == pytest.approx(math.dist(x[i].tolist(), y[j].tolist()), rel=1e-6)
    exact = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0]])     # self-distances cancel exactly to 0
    assert pairwise_euclidean(exact)[1, 1].item() == pytest.approx(1e-6, rel=1e-3)
    assert pairwise_euclidean(exact, eps=1e-4)[0, 0].item() == pytest.approx(1e-2, rel=1e-3)
    assert pairwise_euclidean(exact)[0, 1].item() == pytest.approx(math.sqrt(6), rel=1e-6)


def test_pairwise_euclidean_keeps_small_distances_next_to_a_large_common_component() -> None:
    # float32 features 30 (norm) away from the origin, about 0.1 apart, like pooled CNN features: the
    # Gram-matrix formula on the raw features loses ~1 % of each distance to cancellation
    common = 30 * torch.tensor([1.0, -1.0] * 32) / 8
    x = common + 0.01 * torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    rows = x.double().tolist()
    got = pairwise_euclidean(x)
    across = pairwise_euclidean(x[:4], x[4:])
    for i in range(6):
        for j in range(6):
            if i != j:
                assert got[i, j].item() == pytest.approx(math.dist(rows[i], rows[j]), rel=1e-5)
            if i < 4 <= j:
                assert across[i, j - 4].item() == pytest.approx(math.dist(rows[i], rows[j]), rel=1e-5)


def test_pair_masks_hand_worked() -> None:
    labels = torch.tensor([0, 0, 1, 0])
    modality = torch.tensor([0, 1, 0, 0])
    pos, neg = pair_masks(labels, modality, "all")
    assert pos.tolist()[0] == [False, True, False, True] and neg.tolist()[0] == [False, False, True, False]
    pos, neg = pair_masks(labels, modality, "cross")
    assert pos.tolist()[0] == [False, True, False, False] and neg.tolist()[1] == [False, False, True, False]
    pos, neg = pair_masks(labels, modality, "intra")
    assert pos.tolist()[0] == [False, False, False, True] and neg.tolist()[0] == [False, False, True, False]
    with pytest.raises(ValueError, match="pairs"):
        pair_masks(labels, modality, "both")  # type: ignore[arg-type]


def _loop_directed(anchors, anchor_labels, candidates, candidate_labels, margin):
    terms = []
    for a, la in zip(anchors.tolist(), anchor_labels.tolist()):
        pos = [math.dist(a, c) for c, lc in zip(candidates.tolist(), candidate_labels.tolist()) if lc == la]
        neg = [math.dist(a, c) for c, lc in zip(candidates.tolist(), candidate_labels.tolist()) if lc != la]
        if pos and neg:
            terms.append(max(0.0, margin + max(pos) - min(neg)))
    return sum(terms) / len(terms)


def test_directed_batch_hard_matches_loop() -> None:
    g = torch.Generator().manual_seed(7)
    anchors = torch.randn(6, 4, generator=g, dtype=torch.float64)
    candidates = torch.randn(5, 4, generator=g, dtype=torch.float64)
    anchor_labels = torch.tensor([0, 1, 2, 0, 1, 3])       # id 3: no positive among the candidates
    candidate_labels = torch.tensor([0, 0, 1, 2, 2])
    got = directed_batch_hard_triplet_loss(anchors, anchor_labels, candidates, candidate_labels, margin=0.4)
    expected = _loop_directed(anchors, anchor_labels, candidates, candidate_labels, 0.4)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    reverse = directed_batch_hard_triplet_loss(candidates, candidate_labels, anchors, anchor_labels, margin=0.4)
    assert reverse.item() == pytest.approx(_loop_directed(candidates, candidate_labels, anchors, anchor_labels, 0.4),
                                           rel=1e-6)
    assert directed_batch_hard_triplet_loss(anchors, anchor_labels, candidates, candidate_labels).item() == \
        pytest.approx(_loop_directed(anchors, anchor_labels, candidates, candidate_labels, 0.3), rel=1e-6)


def test_directed_batch_hard_hand_worked_and_without_valid_anchor() -> None:
    # anchors 0 (id 0), 4 (id 1); candidates 1 (id 0), 2 (id 1), 10 (id 1). margin 0.5.
    # anchor 0: pos 1, neg min 2 -> [0.5 + 1 - 2]_+ = 0; anchor 4: pos max 6, neg 3 -> 3.5.  Mean 1.75.
    anchors = torch.tensor([[0.0], [4.0]], requires_grad=True)
    candidates = torch.tensor([[1.0], [2.0], [10.0]])
    loss = directed_batch_hard_triplet_loss(anchors, torch.tensor([0, 1]), candidates, torch.tensor([0, 1, 1]), 0.5)
    assert loss.item() == pytest.approx(1.75, abs=1e-5)
    loss.backward()
    assert anchors.grad.flatten().tolist() == pytest.approx([0.0, -1.0], abs=1e-5)   # d(6 - 3)/da at a = 4, / 2
    # a single valid anchor: the mean is its own term, 3.5
    single = directed_batch_hard_triplet_loss(anchors[1:], torch.tensor([1]), candidates, torch.tensor([0, 1, 1]), 0.5)
    assert single.item() == pytest.approx(3.5, abs=1e-5)
    none = directed_batch_hard_triplet_loss(anchors, torch.tensor([0, 1]), candidates, torch.tensor([0, 0, 0]))
    assert none.item() == 0.0 and none.requires_grad


def test_weighted_triplet_skips_anchors_without_a_positive_or_a_negative() -> None:
    g = torch.Generator().manual_seed(9)
    feats = torch.randn(7, 3, generator=g, dtype=torch.float64)
    # identity 2 has a single image: no positive for it ("all")
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    modality = torch.tensor([0, 0, 1, 0, 1, 1, 1])
    got = weighted_regularized_triplet_loss(feats, labels, modality, pairs="all")
    assert got.item() == pytest.approx(_loop_wrt(feats, labels, modality, "all"), rel=1e-6)
    # "intra": modality 0 holds identities 0 and 1, modality 1 holds 0, 1, 2; make modality 0 one identity
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    modality = torch.tensor([0, 0, 1, 1, 1, 1, 1])      # modality 0: images 0, 1 (both identity 0): no negative
    got = weighted_regularized_triplet_loss(feats, labels, modality, pairs="intra")
    assert got.item() == pytest.approx(_loop_wrt(feats, labels, modality, "intra"), rel=1e-6)
    got = batch_hard_triplet_loss(feats, labels, modality, pairs="intra", margin=0.3)
    assert got.item() == pytest.approx(_loop_batch_hard(feats, labels, modality, "intra", 0.3), rel=1e-6)


def test_defaults_are_all_pairs_and_margin_0_3() -> None:
    feats, labels, modality = _batch(seed=4)
    pos, neg = pair_masks(labels, modality)
    pos_all, neg_all = pair_masks(labels, modality, "all")
    assert torch.equal(pos, pos_all) and torch.equal(neg, neg_all)
    assert batch_hard_triplet_loss(feats, labels).item() == pytest.approx(
        _loop_batch_hard(feats, labels, modality, "all", 0.3), rel=1e-6)


def test_masks_and_losses_stay_on_the_features_device() -> None:
    # "meta" tensors stand in for a GPU: a mask built on the CPU next to them is an error.
    labels = torch.tensor([0, 0, 1, 1]).to("meta")
    modality = torch.tensor([0, 1, 0, 1]).to("meta")
    for pairs in ("all", "cross"):
        pos, neg = pair_masks(labels, modality, pairs)
        assert pos.device.type == "meta" and neg.device.type == "meta"
