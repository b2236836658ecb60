"""DF2AM: every equation against a direct loop computation, the model's contract, options."""

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
from vireid.losses.identity import label_smoothed_cross_entropy
from vireid.losses.triplet import weighted_regularized_triplet_loss
from vireid.models import ModelConfig
from vireid.models.methods.df2am import (
    DF2AMModel,
    LocalAttentionFusion,
    horizontal_parts,
    per_modality_identity_loss,
)
from vireid.models.registry import method_params

from method_training import random_batch, seeded, tiny_model, train_tiny_config


def _tiny(**params: object) -> DF2AMModel:
    return tiny_model("df2am", DF2AMModel, params)


def _batch() -> tuple[torch.Tensor, ...]:
    return random_batch(64, 32, modality=[0, 0, 0, 0, 1, 1, 1, 1], labels=[0, 0, 1, 1, 0, 0, 1, 1])


def _feats_labels() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(8, 5, generator=seeded(2)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 3])


def test_affinity_matrix_matches_loop():
    feats, _ = _feats_labels()
    dist = affinity_matrix(feats)
    for i in range(8):
        for j in range(8):
            fi, fj = feats[i] / feats[i].norm(), feats[j] / feats[j].norm()
            assert dist[i, j].item() == pytest.approx((fi - fj).norm().item(), abs=1e-5)


def test_margin_loss_matches_eq12_loop():
    feats, labels = _feats_labels()
    dist, gt = affinity_matrix(feats), identity_affinity(labels)
    m = 0.9
    total = 0.0
    for i in range(8):
        for j in range(8):
            g = 1.0 if labels[i] == labels[j] else 0.0
            total += max(dist[i, j].item() * g - (dist[i, j].item() - m) * (1 - g), 0.0)
    assert affinity_margin_loss(dist, gt, m, "sum").item() == pytest.approx(total, rel=1e-5)
    assert affinity_margin_loss(dist, gt, m).item() == pytest.approx(total / 64, rel=1e-5)


def test_l1_loss_matches_eq11_loop():
    feats, labels = _feats_labels()
    dist, gt = affinity_matrix(feats), identity_affinity(labels)
    delta = 1.2
    total = sum(abs(dist[i, j].item() - (0.0 if labels[i] == labels[j] else delta))
                for i in range(8) for j in range(8))
    assert affinity_l1_loss(dist, gt, delta, "sum").item() == pytest.approx(total, rel=1e-5)
    assert affinity_loss(feats, labels, "l1", delta).item() == pytest.approx(total / 64, rel=1e-5)


def test_affinity_loss_rejects_unknown_kind():
    feats, labels = _feats_labels()
    with pytest.raises(ValueError, match="affinity loss kind"):
        affinity_loss(feats, labels, "l2")  # type: ignore[arg-type]


def test_horizontal_parts_are_stripe_means():
    fmap = torch.randn(2, 3, 8, 4, generator=seeded(3))
    parts = horizontal_parts(fmap, 4)
    for p in range(4):
        torch.testing.assert_close(parts[:, p], fmap[:, :, 2 * p:2 * p + 2].mean(dim=(2, 3)))


def test_local_attention_fusion_matches_loop():
    torch.manual_seed(0)
    module = LocalAttentionFusion(dim=6, num_parts=3, reduction=2)
    fmap = torch.randn(2, 6, 6, 2, generator=seeded(4))
    fused, weights = module(fmap)
    lin1, lin2 = module.score[0], module.score[2]
    for b in range(2):
        parts = [fmap[b, :, 2 * p:2 * p + 2].mean(dim=(1, 2)) for p in range(3)]
        scores = [lin2(torch.relu(lin1(f))).squeeze() for f in parts]
        denom = sum(math.exp(s.item()) for s in scores)
        w = [math.exp(s.item()) / denom for s in scores]
        assert weights[b].tolist() == pytest.approx(w, rel=1e-5)
        torch.testing.assert_close(fused[b], sum(w[p] * parts[p] for p in range(3)), rtol=1e-5, atol=1e-6)


def test_per_modality_identity_loss_sums_modalities():
    logits = torch.randn(6, 4, generator=seeded(5))
    labels = torch.tensor([0, 1, 2, 0, 1, 3])
    modality = torch.tensor([0, 0, 0, 1, 1, 1])
    expected = F.cross_entropy(logits[:3], labels[:3]) + F.cross_entropy(logits[3:], labels[3:])
    assert per_modality_identity_loss(logits, labels, modality, 0.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_eval_feature_is_fused_bn_global_plus_local():
    images, modality, _ = _batch()
    for test_feature in ("fused", "global"):
        model = _tiny(test_feature=test_feature).eval()
        with torch.no_grad():
            fmap = model.backbone(images, modality)
            bn_global = model.neck.bn(model.pool(fmap))
            expected = bn_global + model.local(fmap)[0] if test_feature == "fused" else bn_global
            torch.testing.assert_close(model.extract(images, modality)["feat"], F.normalize(expected, dim=1))


def test_total_loss_is_eq13():
    images, modality, labels = _batch()
    model = _tiny()
    out = model(images, modality)
    total, logs = model.compute_loss(out, labels, modality)
    torch.testing.assert_close(logs["id"], label_smoothed_cross_entropy(out["logits"], labels, 0.0).detach())
    torch.testing.assert_close(logs["tri"], weighted_regularized_triplet_loss(out["feat"], labels).detach())
    torch.testing.assert_close(logs["affinity"], affinity_loss(out["feat"], labels, "margin", 1.0).detach())
    expected = logs["id"] + logs["tri"] + 1.1 * logs["fusion"] + 1.5 * logs["affinity"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_forward_backward_finite_for_each_option():
    images, modality, labels = _batch()
    for params in ({}, {"affinity_loss": "l1", "baseline_triplet": "hard", "affinity_reduction": "sum"}):
        model = _tiny(**params)
        total, _ = model.compute_loss(model(images, modality), labels, modality)
        total.backward()
        assert torch.isfinite(total)
        assert model.local.score[0].weight.grad is not None
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_params_name_the_key():
    with pytest.raises(InputError, match="num_parts"):
        method_params(ModelConfig(method="df2am", params={"num_parts": 0}))
    with pytest.raises(InputError, match="affinity_los"):
        method_params(ModelConfig(method="df2am", params={"affinity_los": "l1"}))


def test_tiny_config_trains_on_cpu(tmp_path):
    result = train_tiny_config("df2am", tmp_path)
    assert result["summary"]["epochs"] == 2
    assert result["after"] < result["before"]
    assert np.isfinite(result["features"]["feat"]).all()
    assert np.isfinite(result["summary"]["history"][-1]["mAP"])
