"""XIV: every equation against a direct loop computation, the model's contract, options."""

from __future__ import annotations

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
    modality_respective_loss,
    xiv_distance,
)
from vireid.models.registry import method_params

from method_training import random_batch, seeded, tiny_model, train_tiny_config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _tiny(**params: object) -> XIVModel:
    return tiny_model("xiv", XIVModel, params)


def _batch() -> tuple[torch.Tensor, ...]:
    return random_batch(64, 32, modality=[0, 1, 0, 1, 0, 1, 0, 1], labels=[0, 0, 0, 0, 1, 1, 1, 1])


def _hard_triplet_loop(feats: torch.Tensor, labels: torch.Tensor, anchors: list[int], candidates: list[int],
                       margin: float) -> float:
    """Mean over anchors of [margin + max_pos d - min_neg d]_+ with candidates from ``candidates``."""
    losses = []
    for a in anchors:
        pos = [(feats[a] - feats[c]).norm().item() for c in candidates if c != a and labels[c] == labels[a]]
        neg = [(feats[a] - feats[c]).norm().item() for c in candidates if labels[c] != labels[a]]
        if pos and neg:
            losses.append(max(margin + max(pos) - min(neg), 0.0))
    return sum(losses) / len(losses)


def test_learned_generator_matches_per_pixel_formula():
    torch.manual_seed(0)
    gen = LearnedXGenerator()
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
    rgb = torch.rand(1, 3, 2, 2, generator=seeded(3))
    normalised = (rgb - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    out = FixedXTransform(kind, MEAN, STD)(normalised)
    restored = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    for i in range(2):
        for j in range(2):
            expected = single(*(rgb[0, c, i, j].item() for c in range(3)))
            for c in range(3):
                assert restored[0, c, i, j].item() == pytest.approx(expected, abs=1e-5)


def test_mrg_matches_loop():
    feats = torch.randn(12, 4, generator=seeded(4))
    logits = torch.randn(12, 3, generator=seeded(5))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    group = torch.tensor([1, 1, 1, 1, 1, 1, 2, 2, 2, 0, 0, 0])
    total, terms = modality_respective_loss(logits, feats, labels, group, margin=0.3)
    expected = 0.0
    for g in (0, 1, 2):
        idx = [i for i in range(12) if group[i] == g]
        ce = sum(-F.log_softmax(logits[i], 0)[labels[i]].item() for i in idx) / len(idx)
        expected += ce + (_hard_triplet_loop(feats, labels, idx, idx, 0.3) if g == 1 else 0.0)
    # groups 0 and 2 hold one image per identity: no positive, so no triplet term.
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert set(terms) == {"mrg_I", "mrg_X", "mrg_V"}


def test_cmg_matches_two_directional_loop():
    feats = torch.randn(12, 4, generator=seeded(6))
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2])
    group = torch.tensor([1] * 6 + [X_GROUP] * 6)
    ir, x = list(range(6)), list(range(6, 12))
    expected = _hard_triplet_loop(feats, labels, ir, x, 0.5) + _hard_triplet_loop(feats, labels, x, ir, 0.5)
    got = cross_modality_triplet(feats, labels, group, 1, X_GROUP, margin=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_training_batch_is_3m_with_copied_labels():
    model = _tiny()
    images, modality, labels = _batch()
    out = model(images, modality)
    assert out["feat"].shape[0] == 12
    assert out["group"].tolist() == modality.tolist() + [X_GROUP] * 4
    assert labels[out["source_index"]][8:].tolist() == labels[modality == 0].tolist()
    total, logs = model.compute_loss(out, labels, modality)
    assert total.item() == pytest.approx((logs["mrg"] + 0.1 * logs["cmg"]).item(), rel=1e-5)
    total.backward()
    assert model.x_generator.reduce.weight.grad is not None
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_extract_gives_x_features_of_visible_images_only():
    model = _tiny().eval()
    images, modality, _ = _batch()
    out = model.extract(images, modality)
    torch.testing.assert_close(out["feat_x"][modality == 1], out["feat"][modality == 1])
    with torch.no_grad():
        vis = images[modality == 0]
        x_feat = model.neck.bn(model.pool(model.backbone(model.x_generator(vis), torch.zeros(4, dtype=torch.long))))
    torch.testing.assert_close(out["feat_x"][modality == 0], F.normalize(x_feat, dim=1), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out["feat_x"][modality == 0], out["feat"][modality == 0])


def test_own_x_stream_starts_as_a_copy_of_the_visible_stem():
    model = _tiny(x_stream="own", x_generator="gray")
    assert model.num_modalities == 3 and len(model.backbone.streams) == 3
    for a, b in zip(model.backbone.streams[0].parameters(), model.backbone.streams[X_GROUP].parameters()):
        torch.testing.assert_close(a, b)
    images, modality, labels = _batch()
    total, _ = model.compute_loss(model(images, modality), labels, modality)
    total.backward()
    assert model.backbone.streams[X_GROUP][0][0].weight.grad is not None


def test_xiv_distance_is_eq2_and_an_evaluator_distance():
    rng = np.random.default_rng(0)
    q, g, gx = rng.normal(size=(3, 5)), rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    ids, cams = np.array([0, 1, 2]), np.array([3, 3, 6])
    fs = FeatureSet(q, g, ids, np.array([0, 1, 2, 3]), cams, np.array([1, 2, 4, 5]),
                    extras={"gallery_feat_x": gx})

    def d(a: np.ndarray, b: np.ndarray) -> float:
        return -float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))

    got = xiv_distance(fs, dtype=np.float64)
    for i in range(3):
        for j in range(4):
            assert got[i, j] == pytest.approx(d(q[i], g[j]) + d(q[i], gx[j]), abs=1e-12)
    qx = rng.normal(size=(3, 5))
    fs.extras["query_feat_x"] = qx
    assert xiv_distance(fs, dtype=np.float64)[1, 2] == pytest.approx(d(q[1], g[2]) + d(qx[1], gx[2]), abs=1e-12)
    result = evaluate_features(fs, "sysu", distance_fn=xiv_distance, distance_info={"method": "xiv"})
    assert result.distance == {"method": "xiv"} and result.mean.num_queries == 3
    del fs.extras["gallery_feat_x"]
    with pytest.raises(InputError, match="gallery_feat_x"):
        xiv_distance(fs)


def test_bad_params_name_the_key():
    with pytest.raises(InputError, match="x_generator"):
        method_params(ModelConfig(method="xiv", params={"x_generator": "sepia"}))
    with pytest.raises(InputError, match="cross_weight"):
        method_params(ModelConfig(method="xiv", params={"cross_weight": -1.0}))


def test_tiny_config_trains_on_cpu(tmp_path):
    result = train_tiny_config("xiv", tmp_path)
    assert result["summary"]["epochs"] == 2
    assert result["after"] < result["before"]
    feats = result["features"]
    assert set(feats) == {"feat", "feat_x"}
    assert np.isfinite(feats["feat"]).all() and np.isfinite(feats["feat_x"]).all()
    assert np.isfinite(result["summary"]["history"][-1]["mAP"])
