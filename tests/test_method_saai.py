"""SAAI (SAFL): every equation against an independent computation (loops, float64 numpy,
hand-worked cases), the paper's options against the public code's, the configs' settings."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vireid.engine.config import load_train_config
from vireid.errors import InputError
from vireid.losses.center_separation import center_separation_loss, identity_centers
from vireid.losses.part_diversity import part_diversity_loss
from vireid.models import ModelConfig
from vireid.models.backbone import TwoStreamBackbone
from vireid.models.methods.saai import (
    DualBNNeck,
    SAAIModel,
    SAAIParams,
    SemanticAlignedPooling,
    horizontal_parts,
    resnet_feature_map_size,
)
from vireid.models.registry import method_params

from method_training import random_batch, seeded, tiny_model, train_tiny_config

REPO = Path(__file__).resolve().parents[1]


def _tiny(**params: object) -> SAAIModel:
    return tiny_model("saai", SAAIModel, {"image_size": [64, 32], **params})


def _batch() -> tuple[torch.Tensor, ...]:
    return random_batch(64, 32, modality=[0, 0, 0, 0, 1, 1, 1, 1], labels=[0, 0, 1, 2, 0, 1, 2, 2])


# ---------------------------------------------------------------- independent float64 reference

def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _reference_safl(fmap: np.ndarray, prototypes: np.ndarray, position: np.ndarray,
                    position_in_values: bool) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 1-2 by loops over images, prototypes and positions: (parts (B, p, C), scores (B, p, n))."""
    b_size, channels, height, width = fmap.shape
    n, p = height * width, len(prototypes)
    scores = np.zeros((b_size, p, n))
    parts = np.zeros((b_size, p, channels))
    for b in range(b_size):
        for j in range(n):
            token = fmap[b, :, j // width, j % width]
            key = token + position[:, j // width, j % width]
            value = key if position_in_values else token
            for i in range(p):
                scores[b, i, j] = float(np.dot(prototypes[i], key))
                parts[b, i] += _sigmoid(scores[b, i, j]) * value / n
    return parts, scores


def _reference_bn(feat: np.ndarray, modality: np.ndarray, neck: DualBNNeck) -> np.ndarray:
    out = np.zeros_like(feat)
    for m in np.unique(modality):
        rows = modality == m
        bn = neck.norms[int(m)]
        x = feat[rows]
        out[rows] = (x - x.mean(0)) / np.sqrt(x.var(0) + bn.eps) * _np(bn.weight) + _np(bn.bias)
    return out


def _reference_cross_entropy(logits: np.ndarray, labels: np.ndarray, smoothing: float = 0.0) -> float:
    total = 0.0
    for row, y in zip(logits, labels):
        log_p = row - row.max() - math.log(np.exp(row - row.max()).sum())
        total += -(1.0 - smoothing) * log_p[y] - smoothing * log_p.mean()
    return total / len(labels)


def _reference_separation(feat: np.ndarray, labels: np.ndarray, rho1: float, rho2: float) -> float:
    """Eq. 5 term by term: mean over samples, then mean over unordered centre pairs j < k."""
    ids = sorted(set(labels.tolist()))
    centers = {y: feat[labels == y].mean(0) for y in ids}
    compact = sum(max(float(np.linalg.norm(feat[i] - centers[labels[i]])) - rho1, 0.0)
                  for i in range(len(feat))) / len(feat)
    pairs = [(a, c) for k, a in enumerate(ids) for c in ids[k + 1:]]
    if not pairs:
        return compact
    return compact + sum(max(rho2 - float(np.linalg.norm(centers[a] - centers[c])), 0.0) for a, c in pairs) / len(pairs)


def _reference_diversity(scores: np.ndarray, rms: bool) -> float:
    """Eq. 4 by loops: -(2 / p(p-1)) sum_{i<j} ||s_i - s_j||, mean over images."""
    b_size, p, n = scores.shape
    total = 0.0
    for b in range(b_size):
        for i in range(p):
            for j in range(i + 1, p):
                sq = sum((scores[b, i, t] - scores[b, j, t]) ** 2 for t in range(n))
                total += math.sqrt(sq / n if rms else sq)
    return -total / (b_size * p * (p - 1) / 2)


def _reference_total(model: SAAIModel, images: torch.Tensor, modality: torch.Tensor, labels: torch.Tensor) -> float:
    """Eq. 11 from the backbone's feature map, recomputed without the model's SAFL / neck / loss code."""
    prm = model.params
    with torch.no_grad():
        fmap = _np(model.backbone(images, modality))
    lab, mod = labels.numpy(), modality.numpy()
    if prm.part_pooling == "prototypes":
        parts, scores = _reference_safl(fmap, _np(model.parts.prototypes), _np(model.parts.position),
                                        prm.position_in_values)
    else:
        parts = _reference_stripes(fmap, prm.num_parts)
    feat = np.concatenate([parts.reshape(len(fmap), -1), fmap.mean(axis=(2, 3))], axis=1)
    logits = _reference_bn(feat, mod, model.neck) @ _np(model.classifier.weight).T
    total = _reference_cross_entropy(logits, lab, prm.label_smoothing)
    total += prm.separation_weight * _reference_separation(feat, lab, prm.rho1, prm.rho2)
    if prm.diversity_weight > 0:
        weight = prm.diversity_weight ** (2 if prm.diversity_weight_applied_twice else 1)
        maps = _sigmoid(scores) if prm.diversity_input == "masks" else scores
        total += weight * _reference_diversity(maps, prm.diversity_rms)
    return total


def _reference_stripes(fmap: np.ndarray, p: int) -> np.ndarray:
    """p horizontal stripes: stripe i averages rows floor(i h / p) .. ceil((i + 1) h / p) - 1."""
    height = fmap.shape[2]
    return np.stack([fmap[:, :, (i * height) // p:-((-(i + 1) * height) // p)].mean(axis=(2, 3))
                     for i in range(p)], axis=1)


# ---------------------------------------------------------------- Eq. 1-3: SAFL

@pytest.mark.parametrize("position_in_values", [True, False])
def test_semantic_aligned_pooling_matches_loops(position_in_values):
    module = SemanticAlignedPooling(dim=6, num_parts=3, map_size=(4, 2), position_in_values=position_in_values)
    with torch.no_grad():
        module.prototypes.mul_(3.0)        # scores well away from 0, where sigmoid and its neighbours differ
    fmap = torch.randn(2, 6, 4, 2, generator=seeded(6))
    parts, scores, masks = module(fmap)
    ref_parts, ref_scores = _reference_safl(_np(fmap), _np(module.prototypes), _np(module.position),
                                            position_in_values)
    np.testing.assert_allclose(_np(scores), ref_scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(masks), _sigmoid(ref_scores), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(parts), ref_parts, rtol=1e-5, atol=1e-6)


def test_semantic_aligned_pooling_default_adds_position_to_the_values():
    module = SemanticAlignedPooling(dim=4, num_parts=2, map_size=(3, 2))      # default: the paper's Eq. 2
    fmap = torch.randn(2, 4, 3, 2, generator=seeded(12))
    parts, _, _ = module(fmap)
    args = (_np(fmap), _np(module.prototypes), _np(module.position))
    np.testing.assert_allclose(_np(parts), _reference_safl(*args, True)[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(_np(parts), _reference_safl(*args, False)[0], rtol=1e-3, atol=1e-4)


def test_masks_are_independent_sigmoids_not_a_softmax():
    # Eq. 1 is an element-wise sigmoid: one prototype may claim every position, and a position
    # may belong to several prototypes (a softmax over either axis would make sums equal 1).
    module = SemanticAlignedPooling(dim=2, num_parts=2, map_size=(1, 2))
    with torch.no_grad():
        module.prototypes.copy_(torch.tensor([[10.0, 0.0], [10.0, 0.0]]))
        module.position.zero_()
    fmap = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]]]])    # two positions, channel 0 = 1 and 2
    parts, scores, masks = module(fmap)
    torch.testing.assert_close(scores, torch.tensor([[[10.0, 20.0], [10.0, 20.0]]]))
    assert (masks > 0.99).all()
    # p_i = (1/2)(s_i1 T_1 + s_i2 T_2) ~ (1/2)(1 + 2) in channel 0
    torch.testing.assert_close(parts[0, :, 0], torch.full((2,), 1.5), atol=1e-4, rtol=0)


def test_horizontal_stripes_match_loops():
    fmap = torch.randn(2, 3, 18, 9, generator=seeded(8))
    np.testing.assert_allclose(_np(horizontal_parts(fmap, 7)), _reference_stripes(_np(fmap), 7), rtol=1e-5, atol=1e-6)
    # even split, by hand: 4 rows into 2 stripes of 2 rows
    small = torch.arange(8.0).view(1, 1, 4, 2)
    torch.testing.assert_close(horizontal_parts(small, 2), torch.tensor([[[1.5], [5.5]]]))


def test_position_embedding_sized_from_feature_map():
    assert resnet_feature_map_size((288, 144), last_stride=1) == (18, 9)
    assert resnet_feature_map_size((288, 144), last_stride=2) == (9, 5)
    assert resnet_feature_map_size((256, 128), last_stride=1) == (16, 8)
    backbone = TwoStreamBackbone("resnet10", last_stride=1)
    with torch.no_grad():
        fmap = backbone(torch.randn(1, 3, 70, 30), torch.tensor([0]))
    assert tuple(fmap.shape[2:]) == resnet_feature_map_size((70, 30), last_stride=1)
    model = _tiny()
    assert tuple(model.parts.position.shape) == (512, 4, 2)
    assert tuple(model.parts.prototypes.shape) == (7, 512)


def _bilinear_half_pixel(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (x_in = (x_out + 0.5) * in / out - 0.5, clamped)."""
    _, in_h, in_w = grid.shape

    def taps(o: int, size_in: int, size_out: int) -> tuple[int, int, float]:
        x = max((o + 0.5) * size_in / size_out - 0.5, 0.0)
        lo = min(int(math.floor(x)), size_in - 1)
        return lo, min(lo + 1, size_in - 1), x - lo

    out = np.zeros((grid.shape[0], out_h, out_w))
    for y in range(out_h):
        y0, y1, fy = taps(y, in_h, out_h)
        for x in range(out_w):
            x0, x1, fx = taps(x, in_w, out_w)
            out[:, y, x] = ((1 - fy) * ((1 - fx) * grid[:, y0, x0] + fx * grid[:, y0, x1])
                            + fy * ((1 - fx) * grid[:, y1, x0] + fx * grid[:, y1, x1]))
    return out


def test_other_input_size_resizes_position_embedding_bilinearly():
    module = SemanticAlignedPooling(dim=3, num_parts=2, map_size=(4, 2))
    resized = _np(module.position_embedding(8, 4))                       # (n, C)
    expected = _bilinear_half_pixel(_np(module.position), 8, 4).reshape(3, -1).T
    np.testing.assert_allclose(resized, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_np(module.position_embedding(4, 2)), _np(module.position).reshape(3, -1).T)
    model = _tiny().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 48), torch.tensor([0, 1]))
    assert out["feat"].shape == (2, 512 * 8)


def test_position_embedding_at_the_configured_size_is_e_itself():
    # no resampling pass at the configured size: the (n, C) view reads the parameter's own storage
    module = SemanticAlignedPooling(dim=3, num_parts=2, map_size=(4, 2))
    embedding = module.position_embedding(4, 2)
    assert embedding.data_ptr() == module.position.data_ptr()
    assert embedding.shape == (8, 3) and embedding[5, 1].item() == module.position[1, 2, 1].item()


def test_position_embedding_size_follows_the_last_stride():
    # last stride 2: a 64 x 32 input gives a 2 x 1 map (five halvings), the embedding matches it
    model = tiny_model("saai", SAAIModel, {"image_size": [64, 32]}, last_stride=2)
    with torch.no_grad():
        fmap = model.backbone(torch.randn(1, 3, 64, 32), torch.tensor([0]))
    assert tuple(fmap.shape[2:]) == (2, 1)
    assert tuple(model.parts.position.shape) == (512, 2, 1)


def test_pretrained_weights_reach_both_stems(tmp_path):
    from torchvision.models.resnet import BasicBlock, ResNet

    from vireid.models.registry import create_model

    torch.manual_seed(3)
    reference = ResNet(BasicBlock, [1, 1, 1, 1])
    torch.save(reference.state_dict(), tmp_path / "resnet10.pth")
    cfg = ModelConfig(method="saai", backbone="resnet10", pretrained=str(tmp_path / "resnet10.pth"),
                      params={"image_size": [64, 32]})
    model = create_model(cfg, num_classes=4)
    for stream in model.backbone.streams:
        torch.testing.assert_close(stream[0][0].weight, reference.conv1.weight)
    torch.testing.assert_close(model.backbone.shared[-1][0].conv1.weight, reference.layer4[0].conv1.weight)


def test_parameter_initialisation_scales():
    module = SemanticAlignedPooling(dim=512, num_parts=7, map_size=(18, 9))
    expected = math.sqrt(2.0 / 512)                                     # kaiming normal, as the public code
    assert module.prototypes.std().item() == pytest.approx(expected, rel=0.05)
    assert module.position.std().item() == pytest.approx(expected, rel=0.05)
    model = _tiny()
    assert model.classifier.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert model.classifier.bias is None


def test_dual_bnneck_uses_one_norm_per_modality():
    neck = DualBNNeck(5)
    assert len(neck.norms) == 2
    for bn in neck.norms:
        assert not bn.bias.requires_grad and float(bn.bias.abs().max()) == 0.0
    feat = torch.randn(6, 5, generator=seeded(7))
    modality = torch.tensor([1, 0, 1, 0, 0, 1])
    np.testing.assert_allclose(_np(neck(feat, modality)), _reference_bn(_np(feat), modality.numpy(), neck),
                               rtol=1e-4, atol=1e-5)
    neck.eval()
    out = neck(feat, modality)
    for m in (0, 1):
        bn = neck.norms[m]
        expected = (feat[modality == m] - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight
        torch.testing.assert_close(out[modality == m], expected, rtol=1e-4, atol=1e-5)
    bn = neck.norms[1]                                   # a batch of one modality uses that modality's norm only
    expected = (feat[:2] - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight
    torch.testing.assert_close(neck(feat[:2], torch.tensor([1, 1])), expected, rtol=1e-4, atol=1e-5)


def test_descriptor_is_parts_then_average_and_test_output_is_normalised_bn():
    model = _tiny()
    images, modality, labels = _batch()
    out = model(images, modality)
    with torch.no_grad():
        fmap = model.backbone(images, modality)
    parts, _ = _reference_safl(_np(fmap), _np(model.parts.prototypes), _np(model.parts.position), True)
    expected = np.concatenate([parts.reshape(8, -1), _np(fmap).mean(axis=(2, 3))], axis=1)
    np.testing.assert_allclose(_np(out["feat"]), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_np(out["bn_feat"]), _reference_bn(expected, modality.numpy(), model.neck),
                               rtol=1e-3, atol=1e-4)
    assert out["masks"].shape == out["scores"].shape == (8, 7, 8)
    model.eval()
    with torch.no_grad():
        feat = model.extract(images, modality)["feat"]
        fmap = model.backbone(images, modality)               # eval mode: the backbone's running statistics
    parts, _ = _reference_safl(_np(fmap), _np(model.parts.prototypes), _np(model.parts.position), True)
    expected = np.concatenate([parts.reshape(8, -1), _np(fmap).mean(axis=(2, 3))], axis=1)
    bn = np.zeros_like(expected)
    for m in (0, 1):
        norm = model.neck.norms[m]
        rows = modality.numpy() == m
        bn[rows] = (expected[rows] - _np(norm.running_mean)) / np.sqrt(_np(norm.running_var) + norm.eps)
    bn /= np.linalg.norm(bn, axis=1, keepdims=True)
    np.testing.assert_allclose(_np(feat), bn, rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------- Eq. 4: L_pd

def test_part_diversity_hand_worked():
    # two prototypes, two positions: s_1 - s_2 = (3, -4), ||.|| = 5
    scores = torch.tensor([[[3.0, 0.0], [0.0, 4.0]]])
    assert part_diversity_loss(scores).item() == pytest.approx(-5.0)
    assert part_diversity_loss(scores, rms=True).item() == pytest.approx(-5.0 / math.sqrt(2))
    # three prototypes on one position: pair distances 1, 3, 2 -> mean 2; two images average
    three = torch.tensor([[[0.0], [1.0], [3.0]], [[0.0], [0.0], [0.0]]])
    assert part_diversity_loss(three).item() == pytest.approx(-(1 + 3 + 2) / 3 / 2)


@pytest.mark.parametrize("rms", [False, True])
def test_part_diversity_matches_loop(rms):
    scores = torch.randn(3, 5, 12, generator=seeded(2)) * 2
    assert part_diversity_loss(scores, rms=rms).item() == pytest.approx(_reference_diversity(_np(scores), rms), rel=1e-5)


def test_part_diversity_gradient_pushes_scores_apart():
    scores = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], requires_grad=True)
    part_diversity_loss(scores).backward()
    assert scores.grad[0, 0, 0] < 0 < scores.grad[0, 1, 0]        # descent raises s_1, lowers s_2
    identical = torch.zeros(1, 2, 3, requires_grad=True)
    loss = part_diversity_loss(identical)
    assert abs(loss.item()) < 1e-5
    loss.backward()
    assert torch.isfinite(identical.grad).all()


def test_part_diversity_rejects_one_part():
    with pytest.raises(ValueError, match=r"^scores must be \(B, p >= 2, n\), got shape \(2, 1, 4\)$"):
        part_diversity_loss(torch.rand(2, 1, 4))
    with pytest.raises(ValueError, match="got shape"):
        part_diversity_loss(torch.rand(2, 3))


# ---------------------------------------------------------------- Eq. 5: L_cs

def test_center_separation_hand_worked():
    # identity 0 at 0.0 and 0.1 (centre 0.05), identity 1 at 0.5 twice (centre 0.5), 1-D features.
    feats = torch.tensor([[0.0], [0.1], [0.5], [0.5]])
    labels = torch.tensor([0, 0, 1, 1])
    # compact: [0.05 - 0.01]_+ twice, 0 twice -> 0.02; separation: [0.7 - 0.45]_+ = 0.25
    assert center_separation_loss(feats, labels, 0.01, 0.7).item() == pytest.approx(0.27, abs=1e-6)
    assert center_separation_loss(feats, labels).item() == pytest.approx(0.27, abs=1e-6)    # defaults: the paper's
    # rho1 above a sample's distance clears its term; rho2 below the centre gap clears the separation
    assert center_separation_loss(feats, labels, 0.06, 0.4).item() == pytest.approx(0.0, abs=1e-6)
    assert center_separation_loss(feats, labels, 0.0, 0.45).item() == pytest.approx(0.025, abs=1e-6)


def test_center_separation_averages_unordered_centre_pairs():
    # three identities on a line at 0, 0.3, 1.0 (one sample each): gaps 0.3, 1.0, 0.7 -> hinge 0.4, 0, 0
    feats = torch.tensor([[0.0], [0.3], [1.0]])
    labels = torch.tensor([5, 7, 9])
    assert center_separation_loss(feats, labels, 0.01, 0.7).item() == pytest.approx(0.4 / 3, abs=1e-6)


def test_center_separation_matches_loop():
    feats = torch.randn(12, 6, generator=seeded(3)) * 0.3
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 3])
    got = center_separation_loss(feats, labels, 0.05, 0.9)
    assert got.item() == pytest.approx(_reference_separation(_np(feats), labels.numpy(), 0.05, 0.9), rel=1e-5)
    centers, unique, index = identity_centers(feats, labels)
    assert unique.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(centers[index[8]], feats[[2, 3, 8, 9]].mean(0))


def _public_code_separation(feats: torch.Tensor, labels: torch.Tensor, k: int, rho1: float, rho2: float) -> float:
    """The public code's CSLoss by loops: centre per sample, anchors rows 0, k, 2k, ... averaging over
    the samples of other identities."""
    n = len(labels)
    centers = [feats[labels == labels[i]].mean(0) for i in range(n)]
    compact = sum(max((feats[i] - centers[i]).norm().item() - rho1, 0.0) for i in range(n)) / n
    rows = []
    for i in range(0, n, k):
        gaps = [max(rho2 - (centers[i] - centers[j]).norm().item(), 0.0) for j in range(n) if labels[j] != labels[i]]
        rows.append(sum(gaps) / len(gaps))
    return compact + sum(rows) / len(rows)


def test_center_separation_batch_stride_matches_public_code_loop():
    # Unbalanced layout (all visible, then all infrared; 2 per id): rows 0, 4, 8, 12 are ids 0, 2, 0, 2.
    feats = torch.randn(16, 5, generator=seeded(4)) * 0.3
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 1, 1, 2, 2, 3, 3])
    got = center_separation_loss(feats, labels, 0.01, 0.7, anchors="batch_stride", stride=4)
    assert got.item() == pytest.approx(_public_code_separation(feats, labels, 4, 0.01, 0.7), rel=1e-5)
    assert got.item() != pytest.approx(center_separation_loss(feats, labels, 0.01, 0.7).item(), rel=1e-3)


def test_center_separation_batch_stride_default_stride_and_lone_negative():
    feats = torch.randn(16, 3, generator=seeded(11)) * 0.2
    labels = torch.tensor([0] * 7 + [1] + [2] + [3] * 7)
    got = center_separation_loss(feats, labels, 0.01, 0.7, anchors="batch_stride")       # stride 8: rows 0, 8
    assert got.item() == pytest.approx(_public_code_separation(feats, labels, 8, 0.01, 0.7), rel=1e-5)
    assert got.item() != pytest.approx(_public_code_separation(feats, labels, 9, 0.01, 0.7), rel=1e-3)
    # hand-worked: ids 0 (7 samples at 0) and 1 (one sample at 0.4); the anchor row 0 has one negative
    line = torch.tensor([[0.0]] * 7 + [[0.4]])
    lone = center_separation_loss(line, labels[:8], 0.0, 0.7, anchors="batch_stride")
    assert lone.item() == pytest.approx(0.3, abs=1e-5)


def test_center_separation_batch_stride_equals_paper_on_balanced_contiguous_batches():
    # vireid's sampler: each identity's 2k images are consecutive rows -> every identity is an anchor once.
    feats = torch.randn(12, 4, generator=seeded(9)) * 0.2
    labels = torch.tensor([3, 3, 3, 3, 1, 1, 1, 1, 8, 8, 8, 8])
    paper = center_separation_loss(feats, labels, 0.01, 0.7)
    code = center_separation_loss(feats, labels, 0.01, 0.7, anchors="batch_stride", stride=4)
    assert code.item() == pytest.approx(paper.item(), rel=1e-6)
    assert paper.item() == pytest.approx(_reference_separation(_np(feats), labels.numpy(), 0.01, 0.7), rel=1e-5)


def test_center_separation_single_identity_is_compactness_only():
    feats = torch.tensor([[0.0, 0.0], [0.3, 0.4]], requires_grad=True)   # centre (0.15, 0.2), distances 0.25
    labels = torch.zeros(2, dtype=torch.long)
    for anchors in ("identities", "batch_stride"):
        loss = center_separation_loss(feats, labels, 0.05, 0.7, anchors=anchors, stride=1)
        assert loss.item() == pytest.approx(0.2, abs=1e-6)
    loss.backward()
    assert torch.isfinite(feats.grad).all()


def test_center_separation_eps_floors_every_distance_centre_gaps_included():
    # eps floors every squared distance at eps (distance sqrt(eps) = 0.2 here), the centre gaps of
    # both separation forms as well as the sample-to-centre distances. 2-D features:
    # identity 0 at (1, 0), (-1, 0), (0, 0), identity 1 at (0, 1), (0, -1): both centres are (0, 0).
    feats = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    # compact: distances 1, 1, max(0, 0.2) = 0.2, 1, 1 -> hinges (rho1 0.1) 0.9, 0.9, 0.1, 0.9, 0.9 -> 3.7 / 5
    # separation: ||c_0 - c_1|| = 0 floored at 0.2 -> [0.7 - 0.2]_+ = 0.5 (every anchor, every negative)
    expected = 3.7 / 5 + 0.5
    for anchors in ("identities", "batch_stride"):
        got = center_separation_loss(feats, labels, 0.1, 0.7, anchors=anchors, stride=3, eps=0.04)
        assert got.item() == pytest.approx(expected, abs=1e-6), anchors
        # the default eps 1e-12 floors at 1e-6: the coincident centres then cost nearly rho2
        tiny = center_separation_loss(feats, labels, 0.1, 0.7, anchors=anchors, stride=3)
        assert tiny.item() == pytest.approx(3.6 / 5 + 0.7, abs=1e-5), anchors


def test_center_separation_rejects_bad_options():
    feats, labels = torch.zeros(4, 2), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"^stride must be >= 1, got 0$"):
        center_separation_loss(feats, labels, anchors="batch_stride", stride=0)
    with pytest.raises(ValueError, match=r"^anchors must be 'identities' or 'batch_stride', got 'all'$"):
        center_separation_loss(feats, labels, anchors="all")  # type: ignore[arg-type]


# ---------------------------------------------------------------- Eq. 11: the model's loss

@pytest.mark.parametrize("params", [
    {},                                                                     # the paper
    {"position_in_values": False, "diversity_rms": True, "diversity_weight_applied_twice": True},  # public code
    {"diversity_input": "scores"},                                          # Eq. 4 as printed
    {"separation_weight": 0.0, "diversity_weight": 0.0},                    # L_id only
    {"part_pooling": "horizontal", "diversity_weight": 0.0, "separation_weight": 0.0},   # the ablation's Base
    {"diversity_weight": 0.3, "separation_weight": 2.0, "rho1": 0.5, "rho2": 3.0, "label_smoothing": 0.1},
])
def test_total_loss_matches_independent_computation(params):
    model = _tiny(**params)
    images, modality, labels = _batch()
    total, logs = model.compute_loss(model(images, modality), labels, modality)
    assert total.item() == pytest.approx(_reference_total(model, images, modality, labels), rel=1e-4)
    assert ("pd" in logs) == (model.params.diversity_weight > 0)
    assert ("cs" in logs) == (model.params.separation_weight > 0)


def test_public_code_anchors_use_the_configured_stride():
    # batch_stride with k = 2: anchor rows 0, 2, 4, 6 (ids 0, 1, 0, 2); the default k = 8 would use row 0 only.
    # rho2 = 12 exceeds the centre gaps (about 10 to 11.3 here), so every anchor's hinge is active.
    model = _tiny(separation_anchors="batch_stride", separation_stride=2, rho2=12.0)
    images, modality, labels = _batch()
    out = model(images, modality)
    total, logs = model.compute_loss(out, labels, modality)
    feat, logits, masks = out["feat"].detach(), _np(out["logits"]), _np(out["masks"])
    identity = _reference_cross_entropy(logits, labels.numpy())
    separation = _public_code_separation(feat, labels, 2, 0.01, 12.0)
    assert separation != pytest.approx(_public_code_separation(feat, labels, 8, 0.01, 12.0), rel=1e-3)
    diversity = _reference_diversity(masks, rms=False)
    assert logs["id"].item() == pytest.approx(identity, rel=1e-5)
    assert logs["cs"].item() == pytest.approx(separation, rel=1e-5)
    assert total.item() == pytest.approx(identity + separation + 0.5 * diversity, rel=1e-5)


def test_losses_use_the_pre_bn_descriptor_and_the_prototype_masks():
    # The same loss on a different input would change the value: L_cs(F^) != L_cs(BN(F^)),
    # L_pd(masks) != L_pd(scores); the reference total above pins which one the model uses.
    model = _tiny()
    images, modality, labels = _batch()
    out = model(images, modality)
    _, logs = model.compute_loss(out, labels, modality)
    assert logs["cs"].item() == pytest.approx(center_separation_loss(out["feat"], labels).item(), rel=1e-6)
    assert logs["cs"].item() != pytest.approx(center_separation_loss(out["bn_feat"], labels).item(), rel=1e-2)
    assert logs["pd"].item() == pytest.approx(part_diversity_loss(out["masks"]).item(), rel=1e-6)
    assert logs["pd"].item() != pytest.approx(part_diversity_loss(out["scores"]).item(), rel=1e-2)
    assert logs["pd"].item() != pytest.approx(part_diversity_loss(out["masks"], rms=True).item(), rel=1e-2)


def test_gradients_reach_prototypes_positions_and_backbone():
    model = _tiny()
    images, modality, labels = _batch()
    total, _ = model.compute_loss(model(images, modality), labels, modality)
    total.backward()
    assert model.parts.prototypes.grad.abs().sum() > 0 and model.parts.position.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert all(bn.bias.grad is None for bn in model.neck.norms)


def test_horizontal_model_has_no_prototypes():
    model = _tiny(part_pooling="horizontal", diversity_weight=0.0)
    assert model.parts is None
    images, modality, _ = _batch()
    out = model(images, modality)
    assert "masks" not in out and "scores" not in out and out["feat"].shape == (8, 512 * 8)


def _message(params: dict[str, object]) -> str:
    with pytest.raises(InputError) as info:
        method_params(ModelConfig(method="saai", params=params))
    prefix = "model.params (saai): "
    assert str(info.value).startswith(prefix)
    return str(info.value)[len(prefix):]


def test_bad_params_name_the_key():
    assert _message({"num_parts": 1}) == "model.params.num_parts must be >= 2 (Eq. 4 compares parts), got 1"
    assert _message({"image_size": [0, 8]}) == "model.params.image_size must be positive, got (0, 8)"
    assert _message({"image_size": [8, 0]}) == "model.params.image_size must be positive, got (8, 0)"
    for key in ("diversity_weight", "separation_weight", "rho1", "rho2"):
        assert _message({key: -0.5}) == f"model.params.{key} must be >= 0, got -0.5"
    assert _message({"separation_stride": 0}) == "model.params.separation_stride must be >= 1, got 0"
    assert _message({"label_smoothing": 1.0}) == "model.params.label_smoothing must be in [0, 1), got 1.0"
    assert _message({"label_smoothing": -0.1}) == "model.params.label_smoothing must be in [0, 1), got -0.1"
    assert _message({"part_pooling": "horizontal"}) == (
        "model.params.diversity_weight must be 0 with part_pooling=horizontal (L_pd, Eq. 4, compares prototype masks)")
    assert "separation_anchors" in _message({"separation_anchors": "every"})
    assert "diversity_input" in _message({"diversity_input": "probabilities"})
    # boundaries are accepted
    SAAIParams(num_parts=2, image_size=(1, 1), diversity_weight=0.0, separation_weight=0.0, rho1=0.0, rho2=0.0,
               separation_stride=1, label_smoothing=0.0, part_pooling="horizontal").validate()


def test_effective_diversity_weight():
    assert SAAIParams(diversity_weight=0.5).effective_diversity_weight == 0.5
    assert SAAIParams(diversity_weight=0.5, diversity_weight_applied_twice=True).effective_diversity_weight == 0.25


# ---------------------------------------------------------------- configs: the paper's settings (Sec. 4.1)

@pytest.mark.parametrize("dataset", ["sysu", "regdb", "llcm"])
def test_configs_carry_the_papers_settings(dataset):
    cfg = load_train_config(REPO / "configs" / f"saai_{dataset}.yaml")
    params = method_params(cfg.model)
    assert params == SAAIParams()                    # every method default is the paper's value
    assert (params.num_parts, params.diversity_weight, params.rho1, params.rho2) == (7, 0.5, 0.01, 0.7)
    assert (cfg.sampler.num_ids, 2 * cfg.sampler.per_modality) == (16, 8)
    assert (cfg.transforms.height, cfg.transforms.width) == (288, 144) == tuple(params.image_size)
    assert cfg.transforms.channel_aug_prob == 0.0                       # CAJ is not part of SAAI
    assert cfg.transforms.grayscale_prob > 0 and cfg.transforms.grayscale_mode == "luma"
    assert cfg.transforms.erasing_prob > 0 and cfg.transforms.flip_prob > 0 and cfg.transforms.pad > 0
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.backbone_lr_factor) == ("adam", 3.5e-4, 1.0)
    assert cfg.schedule.warmup_epochs > 0 and cfg.schedule.milestones == [80, 120] and cfg.schedule.gamma == 0.1
    assert cfg.epochs == 160 and cfg.model.backbone == "resnet50" and cfg.model.last_stride == 1


def test_tiny_config_trains_on_cpu(tmp_path):
    result = train_tiny_config("saai", tmp_path, ("model.params.image_size=[32, 16]",))
    assert result["summary"]["epochs"] == 2
    assert result["after"] < result["before"]
    feats = result["features"]["feat"]
    assert feats.shape[1] == 512 * 8 and np.isfinite(feats).all()
    assert np.isfinite(result["summary"]["history"][-1]["mAP"])
