"""XIV: every equation against an independent computation (explicit loops, hand-worked cases),
the model's losses against a recomputation from the backbone's own features, options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vireid.errors import InputError
from vireid.evaluation.evaluator import evaluate_features
from vireid.features import FeatureSet
from vireid.models import ModelConfig
from vireid.models.methods.xiv import (
    X_GROUP,
    FixedXTransform,
    LearnedXGenerator,
    XIVModel,
    cross_modality_triplet,
    euclidean_distance,
    modality_respective_loss,
    xiv_distance,
)
from vireid.models.registry import method_params

from method_training import random_batch, seeded, tiny_model, train_tiny_config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VIS, IR = 0, 1


def _tiny(**params: object) -> XIVModel:
    return tiny_model("xiv", XIVModel, params, pooling="avg")


def _batch() -> tuple[torch.Tensor, ...]:
    # 3 identities x (2 visible + 2 infrared), shuffled.
    return random_batch(64, 32, modality=[0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 0],
                        labels=[0, 0, 1, 1, 2, 2, 0, 1, 0, 2, 2, 1])


def _dist(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.dist(a.tolist(), b.tolist())


def _directed_loop(feats, labels, anchors: list[int], candidates: list[int], margin: float) -> float:
    """(1/M) sum over anchors of [margin + max_pos D - min_neg D]_+, candidates from the other set (Eq. 5/6)."""
    terms = []
    for a in anchors:
        pos = [_dist(feats[a], feats[c]) for c in candidates if labels[c] == labels[a]]
        neg = [_dist(feats[a], feats[c]) for c in candidates if labels[c] != labels[a]]
        terms.append(max(margin + max(pos) - min(neg), 0.0))
    return sum(terms) / len(anchors)


def _intra_loop(feats, labels, rows: list[int], margin: float) -> float:
    """Eq. 10 / M: batch-hard triplet within one modality (anchor excluded from its positives)."""
    terms = []
    for a in rows:
        pos = [_dist(feats[a], feats[c]) for c in rows if c != a and labels[c] == labels[a]]
        neg = [_dist(feats[a], feats[c]) for c in rows if labels[c] != labels[a]]
        terms.append(max(margin + max(pos) - min(neg), 0.0))
    return sum(terms) / len(rows)


def _mean_ce(logits, labels, rows: list[int]) -> float:
    total = 0.0
    for i in rows:
        row = logits[i].tolist()
        total += math.log(sum(math.exp(v) for v in row)) - row[int(labels[i])]
    return total / len(rows)


def _rows(group, g: int) -> list[int]:
    return [i for i in range(len(group)) if int(group[i]) == g]


# ----------------------------------------------------------------------------- Eq. 1 and Table 5

def test_learned_generator_matches_per_pixel_formula():
    torch.manual_seed(0)
    gen = LearnedXGenerator()
    assert gen.reduce.kernel_size == (1, 1) and gen.expand.kernel_size == (1, 1)
    v = torch.randn(2, 3, 4, 3, generator=seeded(2))
    x = gen(v)
    w1, b1 = gen.reduce.weight.view(3), gen.reduce.bias.item()
    w2, b2 = gen.expand.weight.view(3), gen.expand.bias
    for n in range(2):
        for i in range(4):
            for j in range(3):
                hidden = max(sum(w1[c].item() * v[n, c, i, j].item() for c in range(3)) + b1, 0.0)
                for c in range(3):
                    assert x[n, c, i, j].item() == pytest.approx(w2[c].item() * hidden + b2[c].item(), abs=1e-6)


@pytest.mark.parametrize("kind, single", [
    ("channel_mean", lambda r, g, b: (r + g + b) / 3),
    ("gray", lambda r, g, b: 0.299 * r + 0.587 * g + 0.114 * b),
    ("hsv_v", lambda r, g, b: max(r, g, b)),
    ("ycbcr_y", lambda r, g, b: (16 + 65.481 * r + 128.553 * g + 24.966 * b) / 255),
])
def test_fixed_x_transforms(kind, single):
    rgb = torch.rand(2, 3, 2, 2, generator=seeded(3))
    normalised = (rgb - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    transform = FixedXTransform(kind, MEAN, STD)
    assert transform.state_dict() == {}          # fixed: nothing to store in a checkpoint
    out = transform(normalised)
    restored = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    for n in range(2):
        for i in range(2):
            for j in range(2):
                expected = single(*(rgb[n, c, i, j].item() for c in range(3)))
                for c in range(3):
                    assert restored[n, c, i, j].item() == pytest.approx(expected, abs=1e-5)


def test_unknown_fixed_transform_is_an_error():
    with pytest.raises(InputError, match="sepia"):
        FixedXTransform("sepia", MEAN, STD)


# ----------------------------------------------------------------------------- Eq. 3-10

def test_mrg_matches_loop():
    feats = torch.randn(18, 4, generator=seeded(4))
    logits = torch.randn(18, 3, generator=seeded(5))
    labels = torch.tensor([0, 1, 2, 0, 1, 2] * 3)
    group = torch.tensor([IR] * 6 + [X_GROUP] * 6 + [VIS] * 6)
    total, terms = modality_respective_loss(logits, feats, labels, group, margin=0.3)
    expected = {}
    for name, g in (("I", IR), ("X", X_GROUP), ("V", VIS)):
        rows = _rows(group, g)
        expected[name] = _mean_ce(logits, labels, rows) + _intra_loop(feats, labels, rows, 0.3)
    assert total.item() == pytest.approx(sum(expected.values()), rel=1e-5)
    for name, value in expected.items():
        assert terms[f"mrg_{name}"].item() == pytest.approx(value, rel=1e-5)


def test_mrg_label_smoothing():
    feats = torch.randn(6, 4, generator=seeded(4))
    logits = torch.randn(6, 3, generator=seeded(5))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    group = torch.tensor([IR] * 6)
    eps = 0.2
    lp = F.log_softmax(logits, 1)
    ce = (-(1 - eps) * lp[range(6), labels] - eps * lp.mean(1)).mean().item()
    total, _ = modality_respective_loss(logits, feats, labels, group, margin=0.3, label_smoothing=eps)
    assert total.item() == pytest.approx(ce + _intra_loop(feats, labels, list(range(6)), 0.3), rel=1e-5)


def test_cmg_matches_two_directional_loop():
    feats = torch.randn(12, 4, generator=seeded(6))
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2])
    group = torch.tensor([IR] * 6 + [X_GROUP] * 6)
    ir, x = list(range(6)), list(range(6, 12))
    expected = _directed_loop(feats, labels, ir, x, 0.5) + _directed_loop(feats, labels, x, ir, 0.5)
    got = cross_modality_triplet(feats, labels, group, IR, X_GROUP, margin=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_cmg_hand_worked_case():
    # 1-D features. I: a0 = 0 (id 0), a1 = 4 (id 1); X: b0 = 1 (id 0), b1 = 2 (id 1). alpha1 = 0.5.
    # I->X: a0: [0.5 + 1 - 2]_+ = 0; a1: [0.5 + 2 - 3]_+ = 0.  X->I: b0: [0.5 + 1 - 3]_+ = 0;
    # b1: [0.5 + 2 - 2]_+ = 0.5.  L_cross = (0 + 0 + 0 + 0.5) / M with M = 2.
    feats = torch.tensor([[0.0], [4.0], [1.0], [2.0]])
    labels = torch.tensor([0, 1, 0, 1])
    group = torch.tensor([IR, IR, X_GROUP, X_GROUP])
    got = cross_modality_triplet(feats, labels, group, IR, X_GROUP, margin=0.5)
    assert got.item() == pytest.approx(0.25, abs=1e-6)


# ----------------------------------------------------------------------------- the model

def test_feature_learner_is_shared_by_all_three_modalities():
    model = _tiny().eval()
    assert len(model.backbone.streams) == 1
    images, _, _ = _batch()
    with torch.no_grad():
        as_visible = model.extract(images[:2], torch.tensor([VIS, VIS]))["feat"]
        as_infrared = model.extract(images[:2], torch.tensor([IR, IR]))["feat"]
    torch.testing.assert_close(as_visible, as_infrared)


def test_two_stream_option_routes_x_through_the_visible_or_its_own_stem():
    model = _tiny(feature_learner="two_stream")
    assert len(model.backbone.streams) == 2
    group = torch.tensor([VIS, IR, X_GROUP])
    assert model.stream_of(group).tolist() == [VIS, IR, VIS]
    own = _tiny(feature_learner="two_stream", x_stream="own", x_generator="gray")
    assert len(own.backbone.streams) == 3 and own.stream_of(group).tolist() == [VIS, IR, X_GROUP]
    for a, b in zip(own.backbone.streams[VIS].parameters(), own.backbone.streams[X_GROUP].parameters()):
        torch.testing.assert_close(a, b)
    images, modality, labels = _batch()
    total, _ = own.compute_loss(own(images, modality), labels, modality)
    total.backward()
    assert own.backbone.streams[X_GROUP][0][0].weight.grad.abs().sum() > 0
    assert _tiny().stream_of(group).tolist() == [0, 0, 0]


def test_training_batch_is_3m_with_x_from_the_visible_images():
    model = _tiny()
    model.train()
    model.backbone.eval()          # per-image features (BatchNorm2d without batch statistics)
    images, modality, labels = _batch()
    out = model(images, modality)
    visible = _rows(modality, VIS)
    assert out["group"].tolist() == modality.tolist() + [X_GROUP] * len(visible)
    assert out["source_index"].tolist() == list(range(12)) + visible
    with torch.no_grad():
        x_images = model.x_generator(images[visible])
        x_feat = model.backbone(x_images, torch.zeros(len(visible), dtype=torch.long)).mean(dim=(2, 3))
        own_feat = model.backbone(images, torch.zeros(12, dtype=torch.long)).mean(dim=(2, 3))
    torch.testing.assert_close(out["feat"][12:], x_feat, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["feat"][:12], own_feat, rtol=1e-4, atol=1e-5)


def _expected_total(out, labels, *, cross_weight=0.1, alpha1=0.5, alpha2=0.3, with_x=True) -> float:
    group = out["group"]
    all_labels = labels[out["source_index"]]
    feat = out["feat"].detach()
    mrg = sum(_mean_ce(out["logits"], all_labels, _rows(group, g)) + _intra_loop(feat, all_labels, _rows(group, g), alpha2)
              for g in ((IR, X_GROUP, VIS) if with_x else (IR, VIS)))
    ir, vis, x = _rows(group, IR), _rows(group, VIS), _rows(group, X_GROUP)
    cmg = _directed_loop(feat, all_labels, ir, vis, alpha1) + _directed_loop(feat, all_labels, vis, ir, alpha1)
    if with_x:
        cmg += _directed_loop(feat, all_labels, ir, x, alpha1) + _directed_loop(feat, all_labels, x, ir, alpha1)
    return mrg + cross_weight * cmg


def test_total_loss_is_eq11_on_pre_bn_features():
    model = _tiny()
    images, modality, labels = _batch()
    out = model(images, modality)
    with torch.no_grad():
        all_images = torch.cat([images, model.x_generator(images[_rows(modality, VIS)])])
        pooled = model.backbone(all_images, torch.zeros(18, dtype=torch.long)).mean(dim=(2, 3))
        bn = model.neck.bn
        bn_feat = F.batch_norm(pooled, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    torch.testing.assert_close(out["feat"], pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["logits"], bn_feat @ model.neck.classifier.weight.t(), rtol=1e-4, atol=1e-6)
    total, logs = model.compute_loss(out, labels, modality)
    assert total.item() == pytest.approx(_expected_total(out, labels), rel=1e-5)
    assert set(logs) == {"mrg_I", "mrg_X", "mrg_V", "mrg", "cmg"}
    total.backward()
    assert model.x_generator.reduce.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("params, weights", [
    ({"cross_weight": 0.0}, {"cross_weight": 0.0}),                       # Table 4: Baseline + X
    ({"cross_weight": 0.7, "cross_margin": 0.2, "triplet_margin": 0.6},
     {"cross_weight": 0.7, "alpha1": 0.2, "alpha2": 0.6}),
])
def test_total_loss_weights_and_margins(params, weights):
    model = _tiny(**params)
    images, modality, labels = _batch()
    out = model(images, modality)
    total, _ = model.compute_loss(out, labels, modality)
    assert total.item() == pytest.approx(_expected_total(out, labels, **weights), rel=1e-5)


def test_label_smoothing_reaches_the_identity_losses():
    model = _tiny(label_smoothing=0.2)
    images, modality, labels = _batch()
    out = model(images, modality)
    total, logs = model.compute_loss(out, labels, modality)
    all_labels = labels[out["source_index"]]
    lp = F.log_softmax(out["logits"].detach(), 1)
    smoothed = -0.8 * lp[range(len(all_labels)), all_labels] - 0.2 * lp.mean(1)
    shift = sum(smoothed[out["group"] == g].mean().item() - _mean_ce(out["logits"], all_labels, _rows(out["group"], g))
                for g in (IR, X_GROUP, VIS))
    assert total.item() == pytest.approx(_expected_total(out, labels) + shift, rel=1e-5)


def test_pretrained_weights_reach_the_shared_learner(tmp_path):
    from torchvision.models.resnet import BasicBlock, ResNet

    from vireid.models.registry import create_model

    torch.manual_seed(3)
    reference = ResNet(BasicBlock, [1, 1, 1, 1])
    torch.save(reference.state_dict(), tmp_path / "resnet10.pth")
    cfg = ModelConfig(method="xiv", backbone="resnet10", pretrained=str(tmp_path / "resnet10.pth"))
    model = create_model(cfg, num_classes=4)
    torch.testing.assert_close(model.backbone.streams[0][0][0].weight, reference.conv1.weight)
    torch.testing.assert_close(model.backbone.shared[-1][0].conv1.weight, reference.layer4[0].conv1.weight)


def test_without_x_modality_the_batch_is_2m():
    model = _tiny(x_modality=False)             # Table 4: Baseline (with cross_weight 0)
    assert not hasattr(model, "x_generator")
    images, modality, labels = _batch()
    out = model(images, modality)
    assert out["group"].tolist() == modality.tolist() and out["source_index"].tolist() == list(range(12))
    total, logs = model.compute_loss(out, labels, modality)
    assert "mrg_X" not in logs
    assert total.item() == pytest.approx(_expected_total(out, labels, with_x=False), rel=1e-5)
    model.eval()
    assert set(model.extract(images, modality)) == {"feat"}


@pytest.mark.parametrize("x_modality", [False, True])
def test_trains_inside_the_trainers_sorted_modality_layout(x_modality: bool):
    """The trainer promises a visible-then-infrared batch; XIV's shared learner puts every image
    through one stream, which must not be checked against that promise (it raised before)."""
    from vireid.models.routing import sorted_modality_layout

    model = _tiny(x_modality=x_modality)
    images, _, labels = _batch()
    modality = torch.tensor([0] * 6 + [1] * 6)
    with sorted_modality_layout((6, 6)):
        out = model(images, modality)
    assert out["feat"].shape[0] == (18 if x_modality else 12)
    assert torch.isfinite(model.compute_loss(out, labels, modality)[0])


@pytest.mark.parametrize("x_modality", [False, True])
def test_training_indices_live_on_the_images_device(x_modality: bool):
    """forward builds its index tensors on the images' device, not on torch's default device (the
    CPU stand-in for GPU training: a default device elsewhere must not leak into the outputs)."""
    model = _tiny(x_modality=x_modality)
    images, modality, _ = _batch()
    with torch.device("meta"):
        out = model(images, modality)
    assert {value.device.type for value in out.values()} == {"cpu"}
    assert out["source_index"].tolist() == list(range(12)) + (_rows(modality, VIS) if x_modality else [])


def test_extract_gives_x_features_of_visible_images_only():
    model = _tiny().eval()
    images, modality, _ = _batch()
    out = model.extract(images, modality)
    torch.testing.assert_close(out["feat_x"][modality == IR], out["feat"][modality == IR])
    with torch.no_grad():
        vis = images[modality == VIS]
        zeros = torch.zeros(len(vis), dtype=torch.long)
        x_feat = model.neck.bn(model.backbone(model.x_generator(vis), zeros).mean(dim=(2, 3)))
        v_feat = model.neck.bn(model.backbone(vis, zeros).mean(dim=(2, 3)))
    torch.testing.assert_close(out["feat_x"][modality == VIS], F.normalize(x_feat, dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["feat"][modality == VIS], F.normalize(v_feat, dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(images, modality)["feat"], out["feat"])
    infrared_only = model.extract(images[modality == IR], modality[modality == IR])
    torch.testing.assert_close(infrared_only["feat_x"], infrared_only["feat"])


# ----------------------------------------------------------------------------- Eq. 2

def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_euclidean_distance_hand_worked():
    q = np.array([[3.0, 0.0]])
    g = np.array([[0.0, 5.0], [2.0, 0.0], [-1.0, 0.0]])
    np.testing.assert_allclose(euclidean_distance(q, g, dtype=np.float64), [[math.sqrt(2), 0.0, 2.0]], atol=1e-12)


def test_euclidean_distance_of_a_feature_to_itself_is_zero_not_nan():
    # In float32 the normalised all-ones vector of dimension 7 has a self-cosine that rounds to
    # 1.0000001, so 2 - 2 cos is slightly negative: it must be clamped to 0 before the square root.
    q = np.ones((1, 7))
    g = np.array([[1.0] * 7, [1.0] + [0.0] * 6])
    got = euclidean_distance(q, g)
    assert got.dtype == np.float32 and got[0, 0] == 0.0
    assert got[0, 1] == pytest.approx(math.sqrt(2 - 2 / math.sqrt(7)), rel=1e-6)


def test_xiv_distance_is_eq2_euclidean_and_an_evaluator_distance():
    rng = np.random.default_rng(0)
    q, g, gx = rng.normal(size=(3, 5)), rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    ids, cams = np.array([0, 1, 2]), np.array([3, 3, 6])
    fs = FeatureSet(q, g, ids, np.array([0, 1, 2, 3]), cams, np.array([1, 2, 4, 5]),
                    extras={"gallery_feat_x": gx})

    def d(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(_unit(a) - _unit(b)))

    got = xiv_distance(fs, dtype=np.float64)
    for i in range(3):
        for j in range(4):
            assert got[i, j] == pytest.approx(d(q[i], g[j]) + d(q[i], gx[j]), abs=1e-9)
    assert xiv_distance(fs).dtype == np.float32
    qx = rng.normal(size=(3, 5))
    fs.extras["query_feat_x"] = qx
    assert xiv_distance(fs, dtype=np.float64)[1, 2] == pytest.approx(d(q[1], g[2]) + d(qx[1], gx[2]), abs=1e-9)
    result = evaluate_features(fs, "sysu", distance_fn=xiv_distance, distance_info={"method": "xiv"})
    assert result.distance == {"method": "xiv"} and result.mean.num_queries == 3
    del fs.extras["gallery_feat_x"]
    with pytest.raises(InputError, match="^XIV distance: the feature file has no gallery_feat_x"):
        xiv_distance(fs)


def test_eq2_ranks_by_the_sum_of_euclidean_not_cosine_distances():
    # One query, two gallery items: the sum of Euclidean distances prefers item 0, the sum of
    # negative cosines prefers item 1 (the Euclidean distance is a concave function of the cosine).
    q = np.array([[1.0, 0.0]])
    angle = np.deg2rad
    g = np.array([[np.cos(angle(0)), np.sin(angle(0))], [np.cos(angle(50)), np.sin(angle(50))]])
    gx = np.array([[np.cos(angle(110)), np.sin(angle(110))], [np.cos(angle(55)), np.sin(angle(55))]])
    fs = FeatureSet(q, g, np.array([0]), np.array([0, 1]), np.array([3]), np.array([1, 2]),
                    extras={"gallery_feat_x": gx})
    eq2 = xiv_distance(fs, dtype=np.float64)[0]
    cosine = -(g @ q[0]) - (gx @ q[0])
    assert eq2[0] < eq2[1] and cosine[0] > cosine[1]


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("params, key", [
    ({"x_generator": "sepia"}, "x_generator"), ({"cross_weight": -1.0}, "cross_weight"),
    ({"cross_margin": -0.1}, "cross_margin"), ({"triplet_margin": -0.1}, "triplet_margin"),
    ({"label_smoothing": 1.0}, "label_smoothing"), ({"label_smoothing": -0.1}, "label_smoothing"),
    ({"pixel_std": [0.2, 0.0, 0.2]}, "pixel_std"), ({"x_stream": "own"}, "x_stream"),
])
def test_bad_params_name_the_key(params, key):
    with pytest.raises(InputError, match=rf"(: |')model\.params\.{key}\b"):
        method_params(ModelConfig(method="xiv", params=params))


def test_boundary_params_are_accepted():
    params = {"cross_weight": 0.0, "cross_margin": 0.0, "triplet_margin": 0.0, "label_smoothing": 0.0,
              "feature_learner": "two_stream", "x_stream": "own"}
    assert method_params(ModelConfig(method="xiv", params=params)).x_stream == "own"


def test_tiny_config_trains_on_cpu(tmp_path):
    result = train_tiny_config("xiv", tmp_path)
    assert result["summary"]["epochs"] == 2
    assert result["after"] < result["before"]
    feats = result["features"]
    assert set(feats) == {"feat", "feat_x"}
    assert np.isfinite(feats["feat"]).all() and np.isfinite(feats["feat_x"]).all()
    assert np.isfinite(result["summary"]["history"][-1]["mAP"])
