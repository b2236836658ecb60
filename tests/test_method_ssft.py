"""cm-SSFT: every equation against a direct (dense, loop) computation, the model's contract,
the test-time transfer modes on feature files."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vireid.errors import InputError
from vireid.evaluation.evaluator import evaluate_features, evaluate_ranked_lists
from vireid.features import FeatureSet
from vireid.losses import batch_hard_triplet_loss
from vireid.losses.adversarial import (
    modality_adaptation_loss,
    projection_adversarial_loss,
    reconstruction_loss,
)
from vireid.models import ModelConfig, create_model
from vireid.models.methods.ssft import SSFTModel, ssft_distance
from vireid.models.methods.ssft_transfer import (
    SharedSpecificTransfer,
    affinity,
    batch_neighbours,
    padded_features,
    propagate,
    searched_neighbours,
)
from vireid.models.registry import method_params

from method_training import random_batch, seeded, tiny_model

torch.set_num_threads(2)


def _build(**params: object) -> SSFTModel:
    return tiny_model("ssft", SSFTModel, {"discriminator_hidden": 16, "decoder_channels": 8, "graph_k": 2, **params},
                      split="layer2", pooling="avg")


_default_model = functools.cache(_build)


def _tiny(**params: object) -> SSFTModel:
    """A tiny cm-SSFT model in train mode without gradients (the default one is built once)."""
    if params:
        return _build(**params)
    model = _default_model()
    model.zero_grad(set_to_none=True)
    return model.train()


def _batch() -> tuple[torch.Tensor, ...]:
    return random_batch(32, 16, modality=[0, 1, 0, 1, 0, 1, 0, 1], labels=[0, 0, 1, 1, 0, 0, 1, 1])


def _direct_d(a: torch.Tensor, b: torch.Tensor) -> float:
    return 1.0 - 0.5 * float(torch.linalg.norm(a / a.norm() - b / b.norm()))


def _dense_topk_graph(shared, specific, modality, k, own_block=None):
    """Eq. 6–8 by loops: A_ij = d(P) within a modality, d(H) across; keep the top k per row and block.
    ``own_block`` lets a node form its own block (the single query of Eq. 22)."""
    n = len(modality)
    blocks = [-1 if i == own_block else int(modality[i]) for i in range(n)]
    full = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            source = specific if modality[i] == modality[j] else shared
            full[i, j] = _direct_d(source[i].double(), source[j].double())
    kept = torch.zeros_like(full)
    for i in range(n):
        for b in sorted(set(blocks)):
            cols = [j for j in range(n) if blocks[j] == b]
            best = sorted(cols, key=lambda j: -full[i, j].item())[:k]
            kept[i, best] = full[i, best]
    return kept


def _dense_propagation(adjacency, z, weight):
    """Eq. 9 directly: ReLU(D^{-1/2} A D^{-1/2} Z W) with dense matrices."""
    d = torch.diag(adjacency.sum(1).rsqrt())
    return F.relu(d @ adjacency @ d @ z.double() @ weight.double().t())


def _bn_eval(neck, x):
    bn = neck.bn
    return F.normalize((x - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps)
                       * bn.weight.double() + bn.bias.double(), dim=1)


# ---------------------------------------------------------------------------- SSTN equations
def test_affinity_eq7_matches_direct():
    a, b = torch.randn(4, 6, generator=seeded(2)), torch.randn(5, 6, generator=seeded(3))
    got = affinity(a, b)
    for i in range(4):
        for j in range(5):
            assert got[i, j].item() == pytest.approx(_direct_d(a[i], b[j]), abs=1e-5)
    assert affinity(a, a).diagonal().numpy() == pytest.approx(np.ones(4), abs=1e-5)


def test_padded_features_eq5():
    shared, specific = torch.randn(3, 4, generator=seeded(4)), torch.randn(3, 4, generator=seeded(5))
    modality = torch.tensor([0, 1, 0])
    z = padded_features(shared, specific, modality)
    zero = torch.zeros(4)
    for i in range(3):
        expected = torch.cat([specific[i], shared[i], zero] if modality[i] == 0 else [zero, shared[i], specific[i]])
        torch.testing.assert_close(z[i], expected)


def test_batch_neighbours_keep_topk_per_row_and_block():
    shared, specific = torch.randn(7, 5, generator=seeded(6)), torch.randn(7, 5, generator=seeded(7))
    modality = torch.tensor([0, 0, 1, 0, 1, 1, 0])
    index, weight = batch_neighbours(shared, specific, modality, k=2)
    dense = _dense_topk_graph(shared, specific, modality, k=2)
    rebuilt = torch.zeros(7, 7, dtype=torch.float64)
    rebuilt.scatter_(1, index, weight.double())
    torch.testing.assert_close(rebuilt, dense, atol=1e-5, rtol=1e-5)
    assert index.shape == (7, 4)


def test_propagate_eq9_matches_dense():
    shared, specific = torch.randn(6, 3, generator=seeded(8)), torch.randn(6, 3, generator=seeded(9))
    modality = torch.tensor([0, 1, 1, 0, 0, 1])
    w = torch.randn(5, 9, generator=seeded(10))
    index, weight = batch_neighbours(shared, specific, modality, k=2)
    got = propagate(padded_features(shared, specific, modality) @ w.t(), index, weight)
    adjacency = _dense_topk_graph(shared, specific, modality, k=2)
    expected = _dense_propagation(adjacency, padded_features(shared, specific, modality), w)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)


def test_propagate_ignores_padding():
    zw = torch.randn(3, 2, generator=seeded(11))
    index = torch.tensor([[0, 1, -1], [1, -1, -1], [2, 0, -1]])
    weight = torch.tensor([[1.0, 0.5, 9.0], [1.0, 9.0, 9.0], [1.0, 0.25, 9.0]])
    dense = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.25, 0.0, 1.0]], dtype=torch.float64)
    expected = _dense_propagation(dense, zw, torch.eye(2))
    torch.testing.assert_close(propagate(zw, index, weight).double(), expected, atol=1e-6, rtol=1e-5)


def test_searched_neighbours_equal_the_dense_topk_graph():
    shared, specific = torch.randn(12, 6, generator=seeded(12)), torch.randn(12, 6, generator=seeded(13))
    modality = torch.tensor([0] * 7 + [1] * 5)
    index, weight = searched_neighbours(shared.numpy(), specific.numpy(), modality.numpy(), k=3, knn_method="exact")
    assert index.shape == (12, 6) and (index >= 0).all()
    rebuilt = torch.zeros(12, 12, dtype=torch.float64)
    rebuilt.scatter_(1, torch.from_numpy(index), torch.from_numpy(weight).double())
    torch.testing.assert_close(rebuilt, _dense_topk_graph(shared, specific, modality, k=3), atol=1e-5, rtol=1e-5)


def test_searched_neighbours_pad_small_blocks():
    shared, specific = np.random.default_rng(0).normal(size=(2, 2, 4)).astype(np.float32)
    index, weight = searched_neighbours(shared, specific, np.array([0, 1]), k=3, knn_method="exact")
    assert (index >= 0).sum(1).tolist() == [2, 2] and (weight[index < 0] == 0).all()


def _transfer_module(dim=4, out=5, seed=14) -> SharedSpecificTransfer:
    torch.manual_seed(seed)
    module = SharedSpecificTransfer(dim, out, num_classes=3).eval()
    module.neck.bn.running_mean.copy_(torch.randn(out, generator=seeded(seed)) * 0.1)
    module.neck.bn.running_var.copy_(torch.rand(out, generator=seeded(seed + 1)) + 0.5)
    return module


def test_all_queries_transfer_matches_dense():
    module = _transfer_module()
    shared, specific = torch.randn(9, 4, generator=seeded(15)), torch.randn(9, 4, generator=seeded(16))
    modality = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
    got = module.transfer_all(shared, specific, modality, k=2, knn_method="exact")
    adjacency = _dense_topk_graph(shared, specific, modality, k=2)
    z = padded_features(shared, specific, modality)
    hidden = _dense_propagation(adjacency, z, module.projection.weight.detach())
    torch.testing.assert_close(got.double(), _bn_eval(module.neck, hidden), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("gallery_modality", [[0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 1, 0]])
def test_single_query_eq22_matches_dense(gallery_modality):
    module = _transfer_module(seed=17)
    k, amplify = 2, 4.0
    q_shared, q_specific = torch.randn(3, 4, generator=seeded(18)), torch.randn(3, 4, generator=seeded(19))
    q_modality = torch.tensor([1, 1, 0])
    g_shared, g_specific = torch.randn(6, 4, generator=seeded(20)), torch.randn(6, 4, generator=seeded(21))
    g_modality = torch.tensor(gallery_modality)
    got = module.single_query_distance((q_shared, q_specific, q_modality), (g_shared, g_specific, g_modality),
                                       k, amplify, knn_method="exact", batch_size=2)
    w = module.projection.weight.detach()
    for q in range(3):
        shared = torch.cat([q_shared[q:q + 1], g_shared])
        specific = torch.cat([q_specific[q:q + 1], g_specific])
        modality = torch.cat([q_modality[q:q + 1], g_modality])
        adjacency = _dense_topk_graph(shared, specific, modality, k, own_block=0)
        adjacency[:, 0] *= amplify                       # Eq. 22: the query's (left) block column × k
        t = _bn_eval(module.neck, _dense_propagation(adjacency, padded_features(shared, specific, modality), w))
        expected = -(t[1:] @ t[0])
        torch.testing.assert_close(got[q].double(), expected, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- complementary losses
def test_modality_adaptation_loss_is_cross_entropy():
    logits = torch.randn(5, 2, generator=seeded(22))
    modality = torch.tensor([0, 1, 1, 0, 1])
    expected = -sum(torch.log_softmax(logits[i], 0)[modality[i]].item() for i in range(5)) / 5
    assert modality_adaptation_loss(logits, modality).item() == pytest.approx(expected, rel=1e-5)


def test_projection_adversarial_loss_is_mean_distance():
    projected, shared = torch.randn(4, 3, generator=seeded(23)), torch.randn(4, 3, generator=seeded(24))
    expected = sum(float(torch.sqrt(((projected[i] - shared[i]) ** 2).sum())) for i in range(4)) / 4
    assert projection_adversarial_loss(projected, shared).item() == pytest.approx(expected, rel=1e-5)


def test_reconstruction_loss_is_mean_squared_error():
    a, b = torch.randn(2, 3, 4, 2, generator=seeded(25)), torch.randn(2, 3, 4, 2, generator=seeded(26))
    assert reconstruction_loss(a, b).item() == pytest.approx(float(((a - b) ** 2).sum()) / a.numel(), rel=1e-5)


# ---------------------------------------------------------------------------- the model
def test_architecture_streams_and_decoder():
    model = _tiny()
    low = model.backbone.low
    assert len(low.streams) == 2 and len(low.streams[0]) == 3           # stem, layer1, layer2 per modality
    assert len(low.shared) == 2 and len(model.backbone.specific) == 2    # layer3 + layer4, shared and per modality
    assert model.backbone.specific[0][0] is not model.backbone.specific[1][0]
    convs = [m for m in model.decoders[0].modules() if isinstance(m, torch.nn.Conv2d)]
    shuffles = [m for m in model.decoders[0].modules() if isinstance(m, torch.nn.PixelShuffle)]
    assert len(convs) == 4 and len(shuffles) == 4 and convs[0].in_channels == 2 * 512
    assert [c.out_channels for c in convs] == [4 * 8] * 3 + [4 * 3]
    linears = [m for m in model.discriminator if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and linears[-1].out_features == 2


def test_forward_routes_each_modality_through_its_streams():
    model = _tiny().eval()
    images, modality, _ = _batch()
    with torch.no_grad():
        out = model(images, modality)
        for m in (0, 1):
            sel = modality == m
            alone = model(images[sel], modality[sel])
            torch.testing.assert_close(out["specific"][sel], alone["specific"], atol=1e-5, rtol=1e-4)
            low = model.backbone.low.streams[m](images[sel])
            torch.testing.assert_close(alone["specific"], model.backbone.specific[m](low).mean(dim=(2, 3)),
                                       atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(alone["shared"], model.backbone.low.shared(low).mean(dim=(2, 3)),
                                       atol=1e-5, rtol=1e-4)


def test_total_loss_is_eq20_with_eq18_and_eq13_terms():
    model = _tiny(shared_weight=0.7, specific_weight=0.9, transfer_weight=1.1)
    images, modality, labels = _batch()
    out = model(images, modality)
    total, logs = model.compute_loss(out, labels, modality)
    p = model.params
    ce = lambda logits: F.cross_entropy(logits, labels)  # noqa: E731
    tri = batch_hard_triplet_loss
    l_h = ce(out["shared_logits"]) + tri(out["shared"], labels, modality, "cross", p.shared_margin)
    l_p = ce(out["specific_logits"]) + tri(out["specific"], labels, modality, "intra", p.specific_margin)
    l_t = ce(out["transfer_logits"]) + 0.25 * (tri(out["transferred"], labels, modality, "cross", p.shared_margin)
                                               + tri(out["transferred"], labels, modality, "intra", p.specific_margin))
    l_re = ((out["reconstruction"] - images) ** 2).mean()
    l_ma = F.cross_entropy(model.discriminator(out["shared"]), modality)
    projected = torch.stack([model.projections[int(m)](out["specific"][i]) for i, m in enumerate(modality)])
    l_pa = (projected - out["shared"]).norm(dim=1).mean()
    expected = 0.7 * l_h + 0.9 * l_p + 1.1 * l_t + 1.0 * l_re - 0.2 * l_ma - 0.2 * l_pa
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    for key, value in (("shared", l_h), ("specific", l_p), ("transfer", l_t), ("re", l_re), ("ma", l_ma), ("pa", l_pa)):
        assert logs[key].item() == pytest.approx(value.item(), rel=1e-5)
    assert out["reconstruction"].shape == images.shape
    total.backward()        # the affinity's distance to itself is 0: its gradient must stay finite
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert model.transfer.projection.weight.grad is not None and all(torch.isfinite(g).all() for g in grads)


def test_transferred_feature_in_training_is_the_batch_sstn():
    model = _tiny()
    images, modality, _ = _batch()
    out = model(images, modality)
    adjacency = _dense_topk_graph(out["shared"].detach(), out["specific"].detach(), modality, k=2)
    z = padded_features(out["shared"].detach(), out["specific"].detach(), modality)
    expected = _dense_propagation(adjacency, z, model.transfer.projection.weight.detach())
    torch.testing.assert_close(out["transferred"].detach().double(), expected, atol=1e-4, rtol=1e-3)


def test_adversary_loss_is_eq21_and_reaches_only_the_adversary():
    model = _tiny()
    images, modality, labels = _batch()
    out = model(images, modality)
    loss = model.adversary_loss(out, labels, modality)
    expected = (0.2 * F.cross_entropy(model.discriminator(out["shared"]), modality)
                + 0.2 * projection_adversarial_loss(
                    torch.stack([model.projections[int(m)](out["specific"][i]) for i, m in enumerate(modality)]),
                    out["shared"]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    adversary = {id(p) for p in model.adversary_parameters()}
    assert all(p.grad is not None for p in model.adversary_parameters())
    assert all(p.grad is None for p in model.parameters() if id(p) not in adversary)


def test_reconstruct_decodes_shared_specific_and_full():
    model = _tiny().eval()
    images, modality, _ = _batch()
    rec = model.reconstruct(images, modality)
    with torch.no_grad():
        shared_map, specific_map = model.backbone(images, modality)
        full = torch.cat([model.decoders[int(m)](torch.cat([specific_map[i:i + 1], shared_map[i:i + 1]], 1))
                          for i, m in enumerate(modality)])
        shared_only = model.decoders[1](torch.cat([torch.zeros_like(specific_map[1:2]), shared_map[1:2]], 1))
    torch.testing.assert_close(rec["full"], full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rec["shared"][1:2], shared_only, atol=1e-5, rtol=1e-4)
    assert set(rec) == {"full", "shared", "specific"} and rec["specific"].shape == images.shape


def test_bad_params_and_split_name_the_key():
    with pytest.raises(InputError, match="graph_k"):
        method_params(ModelConfig(method="ssft", params={"graph_k": 0}))
    with pytest.raises(InputError, match="test_mode"):
        method_params(ModelConfig(method="ssft", params={"test_mode": "every"}))
    with pytest.raises(InputError, match="model.split"):
        create_model(ModelConfig(method="ssft", backbone="resnet10", split="layer4", pretrained=None), 3)


# ---------------------------------------------------------------------------- feature files
def _feature_set(model: SSFTModel, trials: bool) -> FeatureSet:
    model.eval()
    rng = np.random.default_rng(0)
    q_images = torch.from_numpy(rng.normal(size=(4, 3, 32, 16)).astype(np.float32))
    g_images = torch.from_numpy(rng.normal(size=(6, 3, 32, 16)).astype(np.float32))
    with torch.no_grad():
        q = model.extract(q_images, torch.ones(4, dtype=torch.long))
        g = model.extract(g_images, torch.zeros(6, dtype=torch.long))
    extras = {f"{side}_{k}": v.numpy() for side, out in (("query", q), ("gallery", g))
              for k, v in out.items() if k != "feat"}
    extras["query_path"] = np.array([f"q{i}.png" for i in range(4)])
    fs = FeatureSet(q["feat"].numpy(), g["feat"].numpy(), np.array([0, 1, 2, 0]), np.array([0, 1, 2, 0, 1, 2]),
                    np.full(4, 3), np.full(6, 1), extras=extras)
    if trials:
        fs.trial_query_index = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
        fs.trial_gallery_index = np.array([[0, 1, 2, 3, -1], [1, 2, 3, 4, 5]])
    return fs


def test_finalize_all_mode_replaces_features_by_the_transfer():
    model = _tiny()
    fs = _feature_set(model, trials=False)
    out = model.finalize_features(fs, mode="all", knn="exact")
    shared = torch.from_numpy(np.concatenate([fs.extras["query_shared"], fs.extras["gallery_shared"]]))
    specific = torch.from_numpy(np.concatenate([fs.extras["query_specific"], fs.extras["gallery_specific"]]))
    modality = torch.tensor([1] * 4 + [0] * 6)
    expected = model.transfer.transfer_all(shared, specific, modality, k=2, knn_method="exact").numpy()
    np.testing.assert_allclose(np.concatenate([out.query_feat, out.gallery_feat]), expected, atol=1e-6)
    assert out.meta["ssft"]["mode"] == "all" and out.trial_query_index is None
    assert "query_shared" not in out.extras and "query_shared" in fs.extras   # consumed, input untouched
    assert model.finalize_features(fs, mode="shared") is fs


def test_finalize_all_mode_gives_each_trial_its_own_graph():
    model = _tiny()
    fs = _feature_set(model, trials=True)
    out = model.finalize_features(fs, k=2)
    assert out.query_feat.shape[0] == 8 and out.gallery_feat.shape[0] == 9 and out.num_trials == 2
    assert out.extras["query_path"].tolist() == [f"q{i}.png" for i in range(4)] * 2
    for t in range(2):
        trial = fs.trial(t)
        expected = -(model.transfer_distance(trial, "all", k=2))
        got = out.trial(t)
        np.testing.assert_allclose(got.query_feat @ got.gallery_feat.T, expected, atol=1e-5)
    result = evaluate_features(out, "regdb")
    assert len(result.trials) == 2


def test_finalize_single_mode_writes_ranked_lists_of_eq22():
    model = _tiny()
    fs = _feature_set(model, trials=True)
    out = model.finalize_features(fs, mode="single", amplify=4)
    assert out.extras["ranked_index"].shape == (8, 5)
    for t in range(2):
        q_rows, g_rows = out.trial_rows(t)
        dist = model.transfer_distance(fs.trial(t), "single", amplify=4)
        np.testing.assert_array_equal(out.extras["ranked_index"][q_rows, : len(g_rows)],
                                      g_rows[np.argsort(dist, axis=1, kind="stable")])
    assert out.extras["ranked_index"][0, 4] == -1               # trial 0 has 4 gallery rows
    ranked = evaluate_ranked_lists(out, out.extras["ranked_index"], "regdb")
    direct = evaluate_features(fs, "regdb", distance_fn=ssft_distance(model, "single", amplify=4))
    assert ranked.mean.mAP == pytest.approx(direct.mean.mAP)


def test_finalize_rejects_bad_input():
    model = _tiny()
    fs = _feature_set(model, trials=False)
    del fs.extras["gallery_specific"]
    with pytest.raises(InputError, match="gallery_specific"):
        model.finalize_features(fs)
    with pytest.raises(InputError, match="unknown"):
        model.finalize_features(fs, neighbours=3)
    with pytest.raises(InputError, match="mode"):
        model.finalize_features(fs, mode="every")
