"""SAAI (SAFL): every equation against a direct loop computation, the model's contract, options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vireid.errors import InputError
from vireid.losses.center_separation import center_separation_loss
from vireid.losses.part_diversity import part_diversity_loss
from vireid.models import ModelConfig
from vireid.models.backbone import TwoStreamBackbone
from vireid.models.methods.saai import (
    DualBNNeck,
    SAAIModel,
    SemanticAlignedPooling,
    resnet_feature_map_size,
)
from vireid.models.registry import method_params

from method_training import random_batch, seeded, tiny_model, train_tiny_config


def _tiny(**params: object) -> SAAIModel:
    return tiny_model("saai", SAAIModel, {"image_size": [64, 32], **params})


def _batch() -> tuple[torch.Tensor, ...]:
    return random_batch(64, 32, modality=[0, 0, 0, 0, 1, 1, 1, 1], labels=[0, 0, 1, 1, 0, 0, 1, 1])


def test_part_diversity_matches_loop():
    masks = torch.rand(3, 5, 12, generator=seeded(2))
    b, p, n = masks.shape
    total, count = 0.0, 0
    for k in range(b):
        for i in range(p):
            for j in range(i + 1, p):
                total += math.sqrt(sum((masks[k, i, t] - masks[k, j, t]).item() ** 2 for t in range(n)) / n)
                count += 1
    assert part_diversity_loss(masks).item() == pytest.approx(-total / count, rel=1e-5)


def test_part_diversity_rejects_one_part():
    with pytest.raises(ValueError, match="attention"):
        part_diversity_loss(torch.rand(2, 1, 4))


def _centers_loop(feats: torch.Tensor, labels: torch.Tensor) -> dict[int, torch.Tensor]:
    return {int(y): feats[labels == y].mean(0) for y in labels.unique()}


def test_center_separation_identities_matches_loop():
    feats = torch.randn(12, 6, generator=seeded(3)) * 0.3
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2])
    rho1, rho2 = 0.01, 0.7
    centers = _centers_loop(feats, labels)
    compact = sum(max((feats[i] - centers[int(labels[i])]).norm().item() - rho1, 0.0) for i in range(12)) / 12
    ids = sorted(centers)
    separation = 0.0
    for a in ids:
        separation += sum(max(rho2 - (centers[a] - centers[b]).norm().item(), 0.0) for b in ids if b != a) / (len(ids) - 1)
    separation /= len(ids)
    got = center_separation_loss(feats, labels, rho1, rho2, anchors="identities")
    assert got.item() == pytest.approx(compact + separation, rel=1e-5)


def test_center_separation_batch_stride_matches_public_code_loop():
    # The public code's layout: all visible (2 per id), then all infrared; rows 0, k, 2k visited.
    feats = torch.randn(16, 5, generator=seeded(4)) * 0.3
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 1, 1, 2, 2, 3, 3])
    k, rho1, rho2 = 4, 0.01, 0.7
    centers = _centers_loop(feats, labels)
    sample_centers = torch.stack([centers[int(y)] for y in labels])
    compact = sum(max((feats[i] - sample_centers[i]).norm().item() - rho1, 0.0) for i in range(16)) / 16
    rows = []
    for i in range(0, 16, k):
        gaps = [max(rho2 - (sample_centers[i] - sample_centers[j]).norm().item(), 0.0)
                for j in range(16) if labels[j] != labels[i]]
        rows.append(sum(gaps) / len(gaps))
    expected = compact + sum(rows) / len(rows)
    got = center_separation_loss(feats, labels, rho1, rho2, anchors="batch_stride", stride=k)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # rows 0, 4, 8, 12 are identities 0, 2, 0, 2: identities 1 and 3 are never anchors.
    assert sorted(set(labels[::k].tolist())) == [0, 2]


def test_center_separation_single_identity_is_compactness_only():
    feats = torch.randn(4, 3, generator=seeded(5), requires_grad=True)
    labels = torch.zeros(4, dtype=torch.long)
    loss = center_separation_loss(feats, labels)
    loss.backward()
    assert torch.isfinite(feats.grad).all()


def test_semantic_aligned_pooling_matches_loop():
    torch.manual_seed(0)
    module = SemanticAlignedPooling(dim=6, num_parts=3, map_size=(4, 2))
    fmap = torch.randn(2, 6, 4, 2, generator=seeded(6))
    parts, masks = module(fmap)
    n = 8
    for b in range(2):
        tokens = [fmap[b, :, t // 2, t % 2] for t in range(n)]
        pos = [module.position[:, t // 2, t % 2] for t in range(n)]
        for i in range(3):
            s = [torch.sigmoid(sum(module.prototypes[i, c] * (tokens[t][c] + pos[t][c]) for c in range(6))) for t in range(n)]
            for t in range(n):
                assert masks[b, i, t].item() == pytest.approx(s[t].item(), rel=1e-5)
            expected = sum(s[t] * tokens[t] for t in range(n)) / n
            torch.testing.assert_close(parts[b, i], expected, rtol=1e-5, atol=1e-6)


def test_position_embedding_sized_from_feature_map():
    assert resnet_feature_map_size((288, 144), last_stride=1) == (18, 9)
    assert resnet_feature_map_size((288, 144), last_stride=2) == (9, 5)
    backbone = TwoStreamBackbone("resnet10", last_stride=1)
    with torch.no_grad():
        fmap = backbone(torch.randn(1, 3, 70, 30), torch.tensor([0]))
    assert tuple(fmap.shape[2:]) == resnet_feature_map_size((70, 30), last_stride=1)
    model = _tiny()
    assert tuple(model.parts.position.shape[1:]) == (4, 2)


def test_other_input_size_resizes_position_embedding():
    model = _tiny().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 48), torch.tensor([0, 1]))
    assert out["feat"].shape == (2, 512 * 8)
    assert torch.isfinite(out["feat"]).all()


def test_dual_bnneck_uses_one_norm_per_modality():
    neck = DualBNNeck(5)
    feat = torch.randn(6, 5, generator=seeded(7))
    modality = torch.tensor([1, 0, 1, 0, 0, 1])
    out = neck(feat, modality)
    for m in (0, 1):
        sel = modality == m
        mean, var = feat[sel].mean(0), feat[sel].var(0, unbiased=False)
        expected = (feat[sel] - mean) / torch.sqrt(var + neck.norms[m].eps)
        torch.testing.assert_close(out[sel], expected, rtol=1e-4, atol=1e-5)
    neck.eval()
    out = neck(feat, modality)
    for m in (0, 1):
        bn = neck.norms[m]
        expected = (feat[modality == m] - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight
        torch.testing.assert_close(out[modality == m], expected, rtol=1e-4, atol=1e-5)


def test_descriptor_is_parts_then_average():
    model = _tiny()
    images, modality, labels = _batch()
    out = model(images, modality)
    fmap = model.backbone(images, modality)
    parts, _ = model.parts(fmap)
    torch.testing.assert_close(out["feat"], torch.cat([parts.flatten(1), fmap.mean(dim=(2, 3))], 1))
    assert out["masks"].shape == (8, 7, 8)


def test_total_loss_is_eq6_and_code_weight_option():
    images, modality, labels = _batch()
    for twice, weight in ((False, 0.5), (True, 0.25)):
        model = _tiny(diversity_weight_applied_twice=twice)
        out = model(images, modality)
        total, logs = model.compute_loss(out, labels, modality)
        assert total.item() == pytest.approx((logs["id"] + logs["cs"] + weight * logs["pd"]).item(), rel=1e-5)


def test_forward_backward_and_extract_are_finite():
    model = _tiny(separation_anchors="batch_stride", separation_stride=2)
    images, modality, labels = _batch()
    total, _ = model.compute_loss(model(images, modality), labels, modality)
    total.backward()
    assert model.parts.prototypes.grad is not None and model.parts.position.grad is not None
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    feats = model.extract(images, modality)["feat"]
    assert feats.shape == (8, 512 * 8)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(8))


def test_bad_params_name_the_key():
    with pytest.raises(InputError, match="num_parts"):
        method_params(ModelConfig(method="saai", params={"num_parts": 1}))
    with pytest.raises(InputError, match="separation_anchors"):
        method_params(ModelConfig(method="saai", params={"separation_anchors": "every"}))


def test_tiny_config_trains_on_cpu(tmp_path):
    result = train_tiny_config("saai", tmp_path, ("model.params.image_size=[32, 16]",))
    assert result["summary"]["epochs"] == 2
    assert result["after"] < result["before"]
    feats = result["features"]["feat"]
    assert feats.shape[1] == 512 * 8 and np.isfinite(feats).all()
    assert np.isfinite(result["summary"]["history"][-1]["mAP"])
