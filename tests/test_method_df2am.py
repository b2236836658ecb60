"""DF2AM: every equation against an independent computation (explicit loops, hand-worked cases),
the model's losses against a recomputation from the backbone's own feature map, options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vireid.errors import InputError
from vireid.losses.affinity import (
    affinity_l1_loss,
    affinity_loss,
    affinity_margin_loss,
    affinity_matrix,
    identity_affinity,
)
from vireid.models import ModelConfig
from vireid.models.methods.df2am import (
    DF2AMModel,
    DF2AMParams,
    LocalAttentionFusion,
    baseline_loss,
    horizontal_parts,
    per_modality_identity_loss,
    per_modality_triplet_loss,
)
from vireid.models.registry import method_params

from method_training import random_batch, seeded, tiny_model, train_tiny_config


def _tiny(**params: object) -> DF2AMModel:
    return tiny_model("df2am", DF2AMModel, params, pooling="avg")       # GAP, as the paper


def _batch() -> tuple[torch.Tensor, ...]:
    # 3 identities x (2 visible + 2 infrared) in a shuffled order.
    return random_batch(64, 32, modality=[0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 0],
                        labels=[0, 0, 1, 1, 2, 2, 0, 1, 0, 2, 2, 1])


def _feats_labels() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(8, 5, generator=seeded(2)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 3])


# ----------------------------------------------------------------------------- loop references

def _ce(logits: torch.Tensor, label: int) -> float:
    row = logits.tolist()
    return math.log(sum(math.exp(v) for v in row)) - row[label]


def _mean_ce(logits: torch.Tensor, labels: torch.Tensor, rows: list[int]) -> float:
    return sum(_ce(logits[i], int(labels[i])) for i in rows) / len(rows)


def _bh_loop(feats: torch.Tensor, labels: torch.Tensor, rows: list[int], margin: float) -> float:
    """Batch-hard triplet (Hermans et al.) over ``rows`` only: mean of [m + max d(a,p) - min d(a,n)]_+."""
    terms = []
    for a in rows:
        d = {j: math.dist(feats[a].tolist(), feats[j].tolist()) for j in rows}
        pos = [d[j] for j in rows if j != a and labels[j] == labels[a]]
        neg = [d[j] for j in rows if labels[j] != labels[a]]
        if pos and neg:
            terms.append(max(margin + max(pos) - min(neg), 0.0))
    return sum(terms) / len(terms)


def _affinity_loop(feats: torch.Tensor, labels: torch.Tensor, margin: float, kind: str = "margin") -> float:
    """Eq. 9-12 over all (2K)^2 pairs of the batch (both modalities), mean over pairs."""
    n = len(labels)
    unit = [(f / f.norm()).tolist() for f in feats]
    total = 0.0
    for i in range(n):
        for j in range(n):
            d = 0.0 if i == j else math.dist(unit[i], unit[j])
            same = labels[i] == labels[j]
            if kind == "margin":
                total += d if same else max(margin - d, 0.0)
            else:
                total += abs(d - (0.0 if same else margin))
    return total / (n * n)


def _rows(modality: torch.Tensor, m: int) -> list[int]:
    return [i for i in range(len(modality)) if int(modality[i]) == m]


# ----------------------------------------------------------------------------- Eq. 9-12

def test_affinity_matrix_matches_loop():
    feats, _ = _feats_labels()
    dist = affinity_matrix(feats)
    for i in range(8):
        assert dist[i, i].item() == 0.0
        for j in range(8):
            fi, fj = feats[i] / feats[i].norm(), feats[j] / feats[j].norm()
            assert dist[i, j].item() == pytest.approx((fi - fj).norm().item(), abs=1e-5)


def test_identity_affinity_is_the_same_identity_indicator():
    gt = identity_affinity(torch.tensor([3, 1, 3, 2]))
    assert gt.tolist() == [[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]]


def test_margin_loss_hand_worked_case():
    # f0 = (1, 0), f1 = (0, 2) same identity -> D = sqrt(2) (pulled to 0: term sqrt(2) each way);
    # f2 = (3, 0), another identity, D(f0, f2) = 0 -> term m each way; D(f1, f2) = sqrt(2) > m -> 0.
    feats = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    labels = torch.tensor([5, 5, 7])
    m = 0.8
    expected_sum = 2 * math.sqrt(2) + 2 * m
    dist, gt = affinity_matrix(feats), identity_affinity(labels)
    assert affinity_margin_loss(dist, gt, m, "sum").item() == pytest.approx(expected_sum, rel=1e-5)
    assert affinity_margin_loss(dist, gt, m).item() == pytest.approx(expected_sum / 9, rel=1e-5)
    # Eq. 11 with delta = 0.8: |sqrt 2 - 0| x2, |0 - 0.8| x2, |sqrt 2 - 0.8| x2, diagonal 0.
    expected_l1 = 2 * math.sqrt(2) + 2 * 0.8 + 2 * (math.sqrt(2) - 0.8)
    assert affinity_l1_loss(dist, gt, 0.8, "sum").item() == pytest.approx(expected_l1, rel=1e-5)


def test_margin_loss_matches_eq12_loop():
    feats, labels = _feats_labels()
    m = 0.9
    assert affinity_loss(feats, labels, "margin", m).item() == pytest.approx(_affinity_loop(feats, labels, m), rel=1e-5)
    assert affinity_loss(feats, labels, "margin", m, "sum").item() == pytest.approx(
        64 * _affinity_loop(feats, labels, m), rel=1e-5)


def test_l1_loss_matches_eq11_loop():
    feats, labels = _feats_labels()
    delta = 1.2
    got = affinity_loss(feats, labels, "l1", delta)
    assert got.item() == pytest.approx(_affinity_loop(feats, labels, delta, "l1"), rel=1e-5)
    assert affinity_loss(feats, labels, "l1", delta, "sum").item() == pytest.approx(64 * got.item(), rel=1e-5)


def test_affinity_gradient_pulls_positives_and_pushes_close_negatives():
    feats = torch.tensor([[1.0, 0.2], [0.8, 1.0], [1.0, 0.0]], requires_grad=True)
    affinity_loss(feats, torch.tensor([0, 0, 1]), "margin", 1.0).backward()
    step = feats.detach() - 0.1 * feats.grad
    after = affinity_matrix(step)
    before = affinity_matrix(feats.detach())
    assert after[0, 1] < before[0, 1]      # positive pair closer
    assert after[0, 2] > before[0, 2]      # negative pair inside the margin pushed apart


def test_affinity_defaults_are_eq12_with_unit_margin_averaged():
    feats, labels = _feats_labels()
    assert affinity_loss(feats, labels).item() == pytest.approx(_affinity_loop(feats, labels, 1.0), rel=1e-5)
    dist, gt = affinity_matrix(feats), identity_affinity(labels)
    assert affinity_l1_loss(dist, gt, 0.7).item() == pytest.approx(_affinity_loop(feats, labels, 0.7, "l1"), rel=1e-5)
    assert affinity_margin_loss(dist, gt, 0.7).item() == pytest.approx(_affinity_loop(feats, labels, 0.7), rel=1e-5)


def test_affinity_matrix_stays_on_the_features_device():
    # "meta" tensors stand in for a GPU: a diagonal mask built on the CPU next to them is an error.
    assert affinity_matrix(torch.randn(3, 4).to("meta")).device.type == "meta"


def test_affinity_loss_rejects_unknown_kind():
    feats, labels = _feats_labels()
    with pytest.raises(ValueError, match="affinity loss kind"):
        affinity_loss(feats, labels, "l2")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- Eq. 5-8

def test_horizontal_parts_are_stripe_means():
    fmap = torch.randn(2, 3, 8, 4, generator=seeded(3))
    parts = horizontal_parts(fmap, 4)
    assert parts.shape == (2, 4, 3)
    for p in range(4):
        torch.testing.assert_close(parts[:, p], fmap[:, :, 2 * p:2 * p + 2].mean(dim=(2, 3)))


def test_local_attention_fusion_matches_loop():
    torch.manual_seed(0)
    module = LocalAttentionFusion(dim=6, num_parts=3, reduction=2)
    assert module.score[0].out_features == 3
    fmap = torch.randn(2, 6, 6, 2, generator=seeded(4))
    fused, weights = module(fmap)
    lin1, lin2 = module.score[0], module.score[2]
    for b in range(2):
        parts = [fmap[b, :, 2 * p:2 * p + 2].mean(dim=(1, 2)) for p in range(3)]
        scores = [lin2(torch.relu(lin1(f))).squeeze() for f in parts]
        denom = sum(math.exp(s.item()) for s in scores)
        w = [math.exp(s.item()) / denom for s in scores]       # normalised over the parts of one image
        assert weights[b].tolist() == pytest.approx(w, rel=1e-5)
        torch.testing.assert_close(fused[b], sum(w[p] * parts[p] for p in range(3)), rtol=1e-5, atol=1e-6)


def test_part_scoring_hidden_width_is_c_over_r_floored_at_one():
    # C / r by hand: 8 // 16 = 0 -> one unit, 8 // 4 = 2, 17 // 5 = 3, 512 // 16 = 32
    for dim, reduction, hidden in ((8, 16, 1), (8, 4, 2), (17, 5, 3), (512, 16, 32)):
        module = LocalAttentionFusion(dim, num_parts=2, reduction=reduction)
        assert (module.score[0].out_features, module.score[2].in_features) == (hidden, hidden)


def test_per_modality_identity_loss_of_one_modality_is_its_mean():
    # an all-infrared batch: the sum over modalities has one term, the plain mean over the batch
    logits = torch.randn(5, 4, generator=seeded(13))
    labels = torch.tensor([0, 3, 1, 1, 2])
    got = per_modality_identity_loss(logits, labels, torch.ones(5, dtype=torch.long), 0.0)
    assert got.item() == pytest.approx(_mean_ce(logits, labels, list(range(5))), rel=1e-6)


def test_per_modality_identity_loss_with_unequal_groups():
    # groups of 2, 3 and 4 images: each group's own mean (with equal sizes the sum of the
    # complements' means would coincide with it)
    logits = torch.randn(9, 3, generator=seeded(14))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    groups = torch.tensor([2, 0, 1, 1, 2, 2, 0, 1, 2])
    expected = sum(_mean_ce(logits, labels, _rows(groups, g)) for g in range(3))
    assert per_modality_identity_loss(logits, labels, groups, 0.0).item() == pytest.approx(expected, rel=1e-6)


def test_per_modality_identity_loss_sums_modality_means():
    logits = torch.randn(7, 4, generator=seeded(5))
    labels = torch.tensor([0, 1, 2, 0, 1, 3, 2])
    modality = torch.tensor([0, 0, 0, 1, 1, 1, 1])     # 3 visible, 4 infrared: a mixed mean differs
    expected = _mean_ce(logits, labels, [0, 1, 2]) + _mean_ce(logits, labels, [3, 4, 5, 6])
    got = per_modality_identity_loss(logits, labels, modality, 0.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_per_modality_losses_with_three_groups():
    feats = torch.randn(12, 3, generator=seeded(11))
    logits = torch.randn(12, 3, generator=seeded(12))
    labels = torch.tensor([0, 0, 1, 1] * 3)
    groups = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    expected_ce = sum(_mean_ce(logits, labels, _rows(groups, g)) for g in range(3))
    expected_tri = sum(_bh_loop(feats, labels, _rows(groups, g), 0.3) for g in range(3))
    assert per_modality_identity_loss(logits, labels, groups, 0.0).item() == pytest.approx(expected_ce, rel=1e-6)
    assert per_modality_triplet_loss(feats, labels, groups, 0.3).item() == pytest.approx(expected_tri, rel=1e-5)


def test_per_modality_triplet_is_within_each_modality():
    feats = torch.randn(10, 3, generator=seeded(6))
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 0, 1])
    modality = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    expected = _bh_loop(feats, labels, _rows(modality, 0), 0.4) + _bh_loop(feats, labels, _rows(modality, 1), 0.4)
    got = per_modality_triplet_loss(feats, labels, modality, 0.4)
    assert got.item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- the model, Eq. 3-4

def _independent_forward(model: DF2AMModel, images, modality):
    """GAP of the backbone's feature map (f_g, pre-BN), BN(f_g) with batch statistics, both classifiers."""
    fmap = model.backbone(images, modality)
    global_feat = fmap.mean(dim=(2, 3))
    bn = model.neck.bn
    bn_feat = F.batch_norm(global_feat, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    return fmap, global_feat, bn_feat


def test_training_outputs_are_gap_and_bnneck():
    images, modality, _ = _batch()
    model = _tiny()
    with torch.no_grad():
        out = model(images, modality)
        fmap, global_feat, bn_feat = _independent_forward(model, images, modality)
        parts = horizontal_parts(fmap, 4)
        w = model.local.score(parts).squeeze(-1).softmax(dim=1)
        fused = bn_feat + (w.unsqueeze(-1) * parts).sum(1)
    torch.testing.assert_close(out["feat"], global_feat, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["logits"], bn_feat @ model.neck.classifier.weight.t(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["fused"], fused, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["fused_logits"], fused @ model.fused_classifier.weight.t(), rtol=1e-4, atol=1e-6)


def test_part_weights_and_fusion_with_fewer_parts_than_rows():
    # P = 2 stripes of the 4-row feature map: rows 0-1 and 2-3, scored, softmax over the 2 parts (Eq. 5-7)
    images, modality, _ = _batch()
    model = _tiny(num_parts=2)
    with torch.no_grad():
        out = model(images, modality)
        fmap, _, bn_feat = _independent_forward(model, images, modality)
        assert fmap.shape[2] == 4
        lin1, lin2 = model.local.score[0], model.local.score[2]
        for b in range(len(images)):
            parts = [fmap[b, :, 2 * p:2 * p + 2].mean(dim=(1, 2)) for p in range(2)]
            scores = [lin2(torch.relu(lin1(f))).item() for f in parts]
            w = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
            assert out["part_weights"][b].tolist() == pytest.approx(w, rel=1e-5)
            torch.testing.assert_close(out["fused"][b], bn_feat[b] + w[0] * parts[0] + w[1] * parts[1],
                                       rtol=1e-4, atol=1e-5)


def test_fused_classifier_is_bias_free_with_small_normal_init():
    # as the BNNeck classifier: N(0, 0.001^2) weights, no bias
    model = _tiny()
    weight = model.fused_classifier.weight
    assert model.fused_classifier.bias is None
    assert weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert weight.mean().abs().item() < 2e-4


def _expected_total(out, labels, modality, *, baseline=1.0, fusion=1.1, affinity=1.5, margin=1.0,
                    triplet_margin=0.3, pairs_summed=False) -> float:
    vis, ir = _rows(modality, 0), _rows(modality, 1)
    feat = out["feat"].detach()
    l_b = (_mean_ce(out["logits"], labels, vis) + _bh_loop(feat, labels, vis, triplet_margin)
           + _mean_ce(out["logits"], labels, ir) + _bh_loop(feat, labels, ir, triplet_margin))
    l_a = _affinity_loop(feat, labels, margin) * (len(labels) ** 2 if pairs_summed else 1)
    total = baseline * l_b + affinity * l_a
    if "fused_logits" in out:
        total += fusion * (_mean_ce(out["fused_logits"], labels, vis) + _mean_ce(out["fused_logits"], labels, ir))
    return total


def test_total_loss_is_eq4_with_per_modality_baseline():
    images, modality, labels = _batch()
    model = _tiny()
    out = model(images, modality)
    total, logs = model.compute_loss(out, labels, modality)
    assert set(logs) == {"id", "tri", "fusion", "affinity"}
    assert total.item() == pytest.approx(_expected_total(out, labels, modality), rel=1e-5)


@pytest.mark.parametrize("params, weights", [
    ({"affinity_weight": 0.0}, {"affinity": 0.0}),                      # Table 3: Baseline + DF2
    ({"baseline_weight": 0.0}, {"baseline": 0.0}),                      # Table 3: DF2 + AM
    ({"fusion_weight": 0.5, "affinity_weight": 2.0, "affinity_margin": 0.6, "triplet_margin": 0.2},
     {"fusion": 0.5, "affinity": 2.0, "margin": 0.6, "triplet_margin": 0.2}),
    ({"affinity_weight": 0.5, "affinity_reduction": "sum"}, {"affinity": 0.5, "pairs_summed": True}),
])
def test_total_loss_weights_and_margins(params, weights):
    images, modality, labels = _batch()
    model = _tiny(**params)
    out = model(images, modality)
    total, _ = model.compute_loss(out, labels, modality)
    assert total.item() == pytest.approx(_expected_total(out, labels, modality, **weights), rel=1e-5)


def test_without_fusion_there_is_no_local_branch_and_no_l_d():
    images, modality, labels = _batch()
    model = _tiny(fusion=False)                       # Table 3: Baseline + AM
    assert not hasattr(model, "local") and not hasattr(model, "fused_classifier")
    out = model(images, modality)
    assert set(out) == {"feat", "logits"}
    total, logs = model.compute_loss(out, labels, modality)
    assert "fusion" not in logs
    assert total.item() == pytest.approx(_expected_total(out, labels, modality), rel=1e-5)
    model.eval()
    with torch.no_grad():
        bn = model.neck.bn(model.backbone(images, modality).mean(dim=(2, 3)))
        torch.testing.assert_close(model.extract(images, modality)["feat"], F.normalize(bn, dim=1))


def test_without_affinity_the_loss_has_no_l_a():
    images, modality, labels = _batch()
    model = _tiny(fusion=False, affinity_weight=0.0)  # Table 3: Baseline
    out = model(images, modality)
    total, logs = model.compute_loss(out, labels, modality)
    assert set(logs) == {"id", "tri"}
    assert total.item() == pytest.approx(_expected_total(out, labels, modality, affinity=0.0), rel=1e-5)


def test_mixed_weighted_baseline_option_is_agw_over_the_whole_batch():
    images, modality, labels = _batch()
    params = DF2AMParams(baseline_scope="mixed", baseline_triplet="weighted")
    feats = torch.randn(12, 6, generator=seeded(8))
    logits = torch.randn(12, 3, generator=seeded(9))
    identity, triplet = baseline_loss(logits, feats, labels, modality, params)
    assert identity.item() == pytest.approx(_mean_ce(logits, labels, list(range(12))), rel=1e-6)
    terms = []
    for a in range(12):
        d = [math.dist(feats[a].tolist(), feats[j].tolist()) for j in range(12)]
        pos = [d[j] for j in range(12) if j != a and labels[j] == labels[a]]
        neg = [d[j] for j in range(12) if labels[j] != labels[a]]
        dp = sum(math.exp(x) * x for x in pos) / sum(math.exp(x) for x in pos)
        dn = sum(math.exp(-x) * x for x in neg) / sum(math.exp(-x) for x in neg)
        terms.append(math.log1p(math.exp(dp - dn)))
    assert triplet.item() == pytest.approx(sum(terms) / 12, rel=1e-5)
    hard = baseline_loss(logits, feats, labels, modality, DF2AMParams(baseline_scope="mixed", triplet_margin=0.25))
    assert hard[1].item() == pytest.approx(_bh_loop(feats, labels, list(range(12)), 0.25), rel=1e-5)


def test_per_modality_weighted_option():
    feats = torch.randn(12, 6, generator=seeded(10))
    _, modality, labels = _batch()
    got = per_modality_triplet_loss(feats, labels, modality, 0.3, "weighted")
    via_baseline = baseline_loss(torch.zeros(12, 3), feats, labels, modality, DF2AMParams(baseline_triplet="weighted"))
    assert via_baseline[1].item() == pytest.approx(got.item(), rel=1e-6)
    expected = 0.0
    for m in (0, 1):
        rows, terms = _rows(modality, m), []
        for a in rows:
            d = {j: math.dist(feats[a].tolist(), feats[j].tolist()) for j in rows}
            pos = [d[j] for j in rows if j != a and labels[j] == labels[a]]
            neg = [d[j] for j in rows if labels[j] != labels[a]]
            dp = sum(math.exp(x) * x for x in pos) / sum(math.exp(x) for x in pos)
            dn = sum(math.exp(-x) * x for x in neg) / sum(math.exp(-x) for x in neg)
            terms.append(math.log1p(math.exp(dp - dn)))
        expected += sum(terms) / len(terms)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_label_smoothing_reaches_every_identity_loss():
    images, modality, labels = _batch()
    plain, smoothed = _tiny(), _tiny(label_smoothing=0.2)
    out = plain(images, modality)
    a, _ = plain.compute_loss(out, labels, modality)
    b, logs = smoothed.compute_loss(out, labels, modality)
    eps, k = 0.2, out["logits"].shape[1]

    def smooth(logits, rows):
        lp = F.log_softmax(logits.detach()[rows], dim=1)
        return (-(1 - eps) * lp[range(len(rows)), labels[rows]] - eps * lp.sum(1) / k).mean().item()

    vis, ir = _rows(modality, 0), _rows(modality, 1)
    assert logs["id"].item() == pytest.approx(smooth(out["logits"], vis) + smooth(out["logits"], ir), rel=1e-5)
    assert logs["fusion"].item() == pytest.approx(
        smooth(out["fused_logits"], vis) + smooth(out["fused_logits"], ir), rel=1e-5)
    assert b.item() != pytest.approx(a.item())


def test_eval_feature_is_fused_bn_global_plus_local():
    images, modality, _ = _batch()
    for test_feature in ("fused", "global"):
        model = _tiny(test_feature=test_feature).eval()
        with torch.no_grad():
            fmap = model.backbone(images, modality)
            bn_global = model.neck.bn(fmap.mean(dim=(2, 3)))
            expected = bn_global + model.local(fmap)[0] if test_feature == "fused" else bn_global
            torch.testing.assert_close(model.extract(images, modality)["feat"], F.normalize(expected, dim=1))


def test_gradients_reach_both_stems_the_attention_and_are_finite():
    images, modality, labels = _batch()
    for params in ({}, {"affinity_loss": "l1", "baseline_triplet": "weighted", "affinity_reduction": "sum"}):
        model = _tiny(**params)
        total, _ = model.compute_loss(model(images, modality), labels, modality)
        total.backward()
        assert torch.isfinite(total)
        assert model.local.score[0].weight.grad.abs().sum() > 0
        for stream in model.backbone.streams:
            assert stream[0][0].weight.grad.abs().sum() > 0
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_pretrained_weights_reach_both_stems(tmp_path):
    from torchvision.models.resnet import BasicBlock, ResNet

    from vireid.models.registry import create_model

    torch.manual_seed(3)
    reference = ResNet(BasicBlock, [1, 1, 1, 1])
    torch.save(reference.state_dict(), tmp_path / "resnet10.pth")
    cfg = ModelConfig(method="df2am", backbone="resnet10", pretrained=str(tmp_path / "resnet10.pth"))
    model = create_model(cfg, num_classes=4)
    for stream in model.backbone.streams:
        torch.testing.assert_close(stream[0][0].weight, reference.conv1.weight)
    torch.testing.assert_close(model.backbone.shared[-1][0].conv1.weight, reference.layer4[0].conv1.weight)


@pytest.mark.parametrize("key, value", [("num_parts", 0), ("attention_reduction", 0), ("fusion_weight", -1.0),
                                        ("affinity_weight", -0.1), ("baseline_weight", -1.0),
                                        ("affinity_margin", -0.5), ("triplet_margin", -0.3),
                                        ("label_smoothing", 1.0), ("label_smoothing", -0.1)])
def test_bad_params_name_the_key(key, value):
    with pytest.raises(InputError, match=rf"(: |')model\.params\.{key}\b"):
        method_params(ModelConfig(method="df2am", params={key: value}))


def test_boundary_params_are_accepted():
    params = {"num_parts": 1, "attention_reduction": 1, "fusion_weight": 0.0, "affinity_weight": 0.0,
              "baseline_weight": 0.0, "affinity_margin": 0.0, "triplet_margin": 0.0, "label_smoothing": 0.0}
    assert method_params(ModelConfig(method="df2am", params=params)).num_parts == 1
    with pytest.raises(InputError, match="affinity_los"):
        method_params(ModelConfig(method="df2am", params={"affinity_los": "l1"}))


def test_tiny_config_trains_on_cpu(tmp_path):
    result = train_tiny_config("df2am", tmp_path)
    assert result["summary"]["epochs"] == 2
    assert result["after"] < result["before"]
    assert np.isfinite(result["features"]["feat"]).all()
    assert np.isfinite(result["summary"]["history"][-1]["mAP"])
