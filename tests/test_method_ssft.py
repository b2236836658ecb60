"""cm-SSFT: every equation against a direct (dense, loop) computation, the model's contract,
the test-time transfer modes on feature files."""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vireid.errors import InputError
from vireid.evaluation.evaluator import evaluate_features, evaluate_ranked_lists
from vireid.features import FeatureSet
from vireid.losses.adversarial import projection_adversarial_loss
from vireid.models import ModelConfig, create_model
from vireid.models.methods.ssft import (
    SharedSpecificBackbone,
    SSFTModel,
    SSFTParams,
    SubPixelDecoder,
    _resize_to,
    _transfer_inputs,
    cross_modality_precision,
    ssft_distance,
)
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


def _pad(shared, specific, modality):
    """Eq. 5 row by row: [P; H; 0] for visible, [0; H; P] for infrared."""
    rows = []
    for i in range(len(modality)):
        zero = torch.zeros_like(specific[i])
        rows.append(torch.cat([specific[i], shared[i], zero] if modality[i] == 0 else [zero, shared[i], specific[i]]))
    return torch.stack(rows)


def _dense_propagation(adjacency, z, weight):
    """Eq. 10 directly: ReLU(D^{-1/2} A D^{-1/2} Z W) with dense matrices."""
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


def test_padded_features_of_the_table3_ablations():
    shared, specific = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [4.0]])
    modality = torch.tensor([0, 1])
    assert padded_features(shared, specific, modality, "both").tolist() == [[3, 1, 0], [0, 2, 4]]
    assert padded_features(shared, specific, modality, "shared").tolist() == [[0, 1, 0], [0, 2, 0]]
    assert padded_features(shared, specific, modality, "specific").tolist() == [[3, 0, 0], [0, 0, 4]]
    with pytest.raises(ValueError, match="content"):
        padded_features(shared, specific, modality, "none")


def test_batch_neighbours_keep_topk_per_row_and_block():
    shared, specific = torch.randn(7, 5, generator=seeded(6)), torch.randn(7, 5, generator=seeded(7))
    modality = torch.tensor([0, 0, 1, 0, 1, 1, 0])
    index, weight = batch_neighbours(shared, specific, modality, k=2)
    dense = _dense_topk_graph(shared, specific, modality, k=2)
    rebuilt = torch.zeros(7, 7, dtype=torch.float64)
    rebuilt.scatter_(1, index, weight.double())
    torch.testing.assert_close(rebuilt, dense, atol=1e-5, rtol=1e-5)
    assert index.shape == (7, 4)


def test_propagate_eq10_matches_dense():
    shared, specific = torch.randn(6, 3, generator=seeded(8)), torch.randn(6, 3, generator=seeded(9))
    modality = torch.tensor([0, 1, 1, 0, 0, 1])
    w = torch.randn(5, 9, generator=seeded(10))
    index, weight = batch_neighbours(shared, specific, modality, k=2)
    got = propagate(padded_features(shared, specific, modality) @ w.t(), index, weight)
    adjacency = _dense_topk_graph(shared, specific, modality, k=2)
    expected = _dense_propagation(adjacency, _pad(shared, specific, modality), w)
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
    assert index.dtype == np.int64 and set(index[index < 0].tolist()) == {-1}


def test_searched_neighbours_default_search_is_exact_at_small_sizes():
    shared, specific = np.random.default_rng(1).normal(size=(2, 9, 4)).astype(np.float32)
    modality = np.array([0, 1, 0, 0, 1, 1, 0, 1, 0])
    exact = searched_neighbours(shared, specific, modality, k=2, knn_method="exact")
    default = searched_neighbours(shared, specific, modality, k=2)
    np.testing.assert_array_equal(default[0], exact[0])
    np.testing.assert_allclose(default[1], exact[1], atol=1e-6)


def _transfer_module(dim=4, out=5, seed=14) -> SharedSpecificTransfer:
    torch.manual_seed(seed)
    module = SharedSpecificTransfer(dim, out, num_classes=3).eval()
    module.neck.bn.running_mean.copy_(torch.randn(out, generator=seeded(seed)) * 0.1)
    module.neck.bn.running_var.copy_(torch.rand(out, generator=seeded(seed + 1)) + 0.5)
    module.neck.bn.weight.data.copy_(torch.rand(out, generator=seeded(seed + 2)) + 0.5)
    module.neck.bn.bias.data.copy_(torch.randn(out, generator=seeded(seed + 3)) * 0.1)
    module.neck.bn.eps = 0.05          # not the default 1e-5: T must use the neck's own eps
    return module


def test_all_queries_transfer_matches_dense():
    module = _transfer_module()
    shared, specific = torch.randn(9, 4, generator=seeded(15)), torch.randn(9, 4, generator=seeded(16))
    modality = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
    got = module.transfer_all(shared, specific, modality, k=2, knn_method="exact")
    adjacency = _dense_topk_graph(shared, specific, modality, k=2)
    z = _pad(shared, specific, modality)
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
        t = _bn_eval(module.neck, _dense_propagation(adjacency, _pad(shared, specific, modality), w))
        expected = -(t[1:] @ t[0])
        torch.testing.assert_close(got[q].double(), expected, atol=1e-5, rtol=1e-4)


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


# an unbalanced batch (5 visible, 3 infrared; identity 2 only visible): per-modality means differ
# from batch means, so Eq. 18's per-modality terms are told apart from one mixed-batch mean
UNBALANCED = dict(modality=[0, 0, 0, 0, 0, 1, 1, 1], labels=[0, 0, 1, 1, 2, 0, 1, 1])


def _loop_triplet_sum(x, labels, modality, pairs, margin):
    """Eq. 3 (``intra``) / Eq. 4 (``cross``) by loops: the sum over the two anchor modalities of the
    batch-hard triplet averaged over that modality's anchors."""
    total = 0.0
    for anchor_modality in (0, 1):
        losses = []
        for i in range(len(labels)):
            if modality[i] != anchor_modality:
                continue
            allowed = [j for j in range(len(labels)) if (modality[j] == modality[i]) == (pairs == "intra") and j != i]
            pos = [float(torch.linalg.norm(x[i] - x[j])) for j in allowed if labels[j] == labels[i]]
            neg = [float(torch.linalg.norm(x[i] - x[j])) for j in allowed if labels[j] != labels[i]]
            if pos and neg:
                losses.append(max(0.0, margin + max(pos) - min(neg)))
        total += sum(losses) / len(losses) if losses else 0.0
    return total


def _loop_ce(logits, labels, rows=None, smoothing=0.0):
    rows = range(len(labels)) if rows is None else rows
    values = []
    for i in rows:
        log_p = torch.log_softmax(logits[i].detach().double(), 0)
        values.append(-(1 - smoothing) * float(log_p[labels[i]]) - smoothing * float(log_p.mean()))
    return sum(values) / len(values)


def _reference_loss(model, out, images, labels, modality):
    """Eq. 20 with Eq. 18, 19 and 13, each piece computed independently of the model's loss code."""
    p = model.params
    h, sp = out["shared"].detach(), out["specific"].detach()
    eps = p.label_smoothing
    l_h = _loop_ce(out["shared_logits"], labels, smoothing=eps) + p.shared_triplet_weight * _loop_triplet_sum(
        h, labels, modality, "cross", p.shared_margin)
    per_modality_ce = [_loop_ce(out["specific_logits"], labels, [i for i in range(len(labels)) if modality[i] == m],
                                eps) for m in (0, 1)]
    l_p = 0.5 * sum(per_modality_ce) + p.specific_triplet_weight * _loop_triplet_sum(
        sp, labels, modality, "intra", p.specific_margin)
    l_t = 0.0
    if model.transfer is not None:
        t = out["transferred"].detach()
        l_t = _loop_ce(out["transfer_logits"], labels, smoothing=eps) + p.transfer_triplet_weight * (
            _loop_triplet_sum(t, labels, modality, "cross", p.shared_margin)
            + _loop_triplet_sum(t, labels, modality, "intra", p.specific_margin))
    l_re = float(((out["reconstruction"].detach() - images) ** 2).mean())
    disc = model.discriminator(h)
    l_ma = _loop_ce(disc, modality)
    l_conf = sum(-float(torch.log_softmax(disc[i].double(), 0).mean()) for i in range(len(labels))) / len(labels)
    l_pa = sum(float(torch.linalg.norm(model.projections[int(m)](sp[i]) - h[i])) for i, m in enumerate(modality))
    l_pa /= len(labels)
    modality_term = -p.modality_weight * l_ma if p.modality_adversary == "literal" else p.modality_weight * l_conf
    return l_h + l_p + l_t + p.reconstruction_weight * l_re + modality_term - p.projection_weight * l_pa


@pytest.mark.parametrize("params", [
    {},                                                                        # the paper's weights
    {"shared_triplet_weight": 0.3, "specific_triplet_weight": 0.7, "transfer_triplet_weight": 0.9,
     "shared_margin": 1.5, "specific_margin": 2.5, "reconstruction_weight": 0.6, "modality_weight": 0.45,
     "projection_weight": 0.15, "label_smoothing": 0.1},
    {"modality_adversary": "literal", "shared_margin": 2.5, "specific_margin": 1.5},
    {"transfer_content": "none", "test_mode": "shared"},
])
def test_total_loss_is_eq20_with_eq18_19_and_13(params):
    model = _tiny(**params) if params else _tiny()
    images, modality, labels = random_batch(32, 16, **UNBALANCED)
    out = model(images, modality)
    total, logs = model.compute_loss(out, labels, modality)
    assert total.item() == pytest.approx(_reference_loss(model, out, images, labels, modality), rel=1e-5, abs=1e-5)
    names = {"shared", "specific", "re", "ma", "pa", "disc_acc", "adv_grad_h", "id_grad_h"}
    if model.transfer is not None:
        names |= {"transfer", "neighbour_precision"}
    if model.params.modality_adversary == "confusion":
        names.add("conf")
    assert set(logs) == names
    assert out["reconstruction"].shape == images.shape
    assert ("transfer" in logs) == (model.transfer is not None) and ("conf" in logs) == (
        model.params.modality_adversary == "confusion")
    total.backward()        # the affinity's distance to itself is 0: its gradient must stay finite
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    if model.transfer is not None:
        assert model.transfer.projection.weight.grad is not None


def test_paper_defaults():
    """§4.1 and Eq. 18: k = 4, λ1 = 1.0, λ2 = λ3 = 0.2, weights 0.5 / 0.5 / 0.25, 4 × 64-channel decoders."""
    p = SSFTParams()
    assert (p.graph_k, p.single_query_amplify, p.reconstruction_weight, p.modality_weight, p.projection_weight) == (
        4, None, 1.0, 0.2, 0.2)
    assert (p.shared_triplet_weight, p.specific_triplet_weight, p.transfer_triplet_weight) == (0.5, 0.5, 0.25)
    assert (p.decoder_channels, p.decoder_layers, p.transfer_content, p.label_smoothing) == (64, 4, "both", 0.0)
    assert (p.test_mode, p.modality_adversary, p.shared_margin, p.specific_margin) == ("all", "confusion", 0.3, 0.3)


@pytest.mark.parametrize("adversary", ["literal", "confusion"])
def test_logged_gradients_reaching_h_and_discriminator_accuracy(adversary):
    model = _tiny(modality_adversary=adversary)
    images, modality, labels = _batch()
    out = model(images, modality)
    _, logs = model.compute_loss(out, labels, modality)
    h = out["shared"].detach().requires_grad_()
    logits = model.discriminator(h)
    if adversary == "literal":
        term = 0.2 * torch.stack([torch.log_softmax(logits[i], 0)[modality[i]] for i in range(8)]).mean()
    else:
        term = -0.2 * torch.log_softmax(logits, 1).mean()
    (adv,) = torch.autograd.grad(term, h)
    (ident,) = torch.autograd.grad(F.cross_entropy(model.shared_neck(h)[1], labels), h)
    assert logs["adv_grad_h"].item() == pytest.approx(float(adv.norm()), rel=1e-4)
    assert logs["id_grad_h"].item() == pytest.approx(float(ident.norm()), rel=1e-4)
    correct = sum(int(logits[i].argmax()) == int(modality[i]) for i in range(8))
    assert logs["disc_acc"].item() == pytest.approx(correct / 8)
    with torch.no_grad():                                    # no gradient logs without autograd
        _, quiet = model.compute_loss(model(images, modality), labels, modality)
        detached = model(images, modality)
    assert "adv_grad_h" not in quiet and "disc_acc" in quiet
    _, quiet = model.compute_loss(detached, labels, modality)  # nor on outputs computed without it
    assert "adv_grad_h" not in quiet and "id_grad_h" not in quiet


def test_logged_neighbour_precision_is_the_same_identity_share_of_cross_modality_neighbours():
    model = _tiny()
    images, modality, labels = _batch()
    out = model(images, modality)
    _, logs = model.compute_loss(out, labels, modality)
    kept = _dense_topk_graph(out["shared"].detach(), out["specific"].detach(), modality, k=2)
    hits = total = 0
    for i in range(8):
        for j in range(8):
            if kept[i, j] > 0 and modality[i] != modality[j]:
                total += 1
                hits += int(labels[i] == labels[j])
    assert total == 16 and logs["neighbour_precision"].item() == pytest.approx(hits / total)


def test_cross_modality_precision_hand_worked():
    index = torch.tensor([[0, 2, 3], [1, 3, -1], [2, 0, 1], [3, 1, 0]])
    labels = torch.tensor([0, 1, 0, 0])
    modality = torch.tensor([0, 0, 1, 1])
    # cross pairs: (0,2) same, (0,3) same, (1,3) diff, (2,0) same, (2,1) diff, (3,1) diff, (3,0) same
    assert cross_modality_precision(index, labels, modality).item() == pytest.approx(4 / 7)
    assert cross_modality_precision(torch.tensor([[0], [1]]), labels[:2], modality[:2]).item() == 0.0
    one = torch.tensor([[0, 2], [1, -1], [2, -1]])             # a single cross-modality pair, same identity
    assert cross_modality_precision(one, labels[:3], modality[:3]).item() == 1.0


def test_no_transfer_model_has_no_sstn():
    model = _tiny(transfer_content="none", test_mode="shared")
    images, modality, _ = _batch()
    out = model(images, modality)
    assert model.transfer is None and "transferred" not in out and "neighbour_index" not in out
    fs = _feature_set(model, trials=False)
    assert model.finalize_features(fs) is fs
    with pytest.raises(InputError, match="transfer_content=none"):
        model.finalize_features(fs, mode="all")
    with pytest.raises(InputError, match="test_mode"):
        method_params(ModelConfig(method="ssft", params={"transfer_content": "none"}))


@pytest.mark.parametrize("content", ["shared", "specific"])
def test_transfer_content_ablations_pad_only_what_is_transferred(content):
    model = _tiny(transfer_content=content)
    images, modality, _ = _batch()
    out = model(images, modality)
    h, sp = out["shared"].detach(), out["specific"].detach()
    if content == "shared":
        sp = torch.zeros_like(sp)
    else:
        h = torch.zeros_like(h)
    graph = _dense_topk_graph(out["shared"].detach(), out["specific"].detach(), modality, k=2)
    z = torch.cat([sp * (modality == 0).unsqueeze(1), h, sp * (modality == 1).unsqueeze(1)], dim=1)
    expected = _dense_propagation(graph, z, model.transfer.projection.weight.detach())
    torch.testing.assert_close(out["transferred"].detach().double(), expected, atol=1e-4, rtol=1e-3)


def _bn_train(neck, x):
    """BNNeck in training mode by hand: batch mean and biased variance, then the classifier."""
    bn = neck.bn
    normed = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias
    return normed @ neck.classifier.weight.t()


def test_identity_logits_are_on_the_bnneck_features_and_reconstruction_on_p_then_h():
    model = _tiny()
    images, modality, labels = random_batch(32, 16, **UNBALANCED)
    out = model(images, modality)
    h, sp = out["shared"].detach(), out["specific"].detach()
    torch.testing.assert_close(out["shared_logits"].detach(), _bn_train(model.shared_neck, h), atol=1e-5, rtol=1e-4)
    for m in (0, 1):                              # Feat^m: each modality's own BNNeck, its own batch statistics
        rows = modality == m
        torch.testing.assert_close(out["specific_logits"][rows].detach(), _bn_train(model.specific_necks[m], sp[rows]),
                                   atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["transfer_logits"].detach(),
                               _bn_train(model.transfer.neck, out["transferred"].detach()), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        shared_map, specific_map = model.backbone(images, modality)
        for i, m in enumerate(modality.tolist()):  # Eq. 16: De^m([P^m; H^m]) on the feature maps
            expected = model.decoders[m](torch.cat([specific_map[i:i + 1], shared_map[i:i + 1]], 1))
            torch.testing.assert_close(out["reconstruction"][i:i + 1], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out["modality_logits"], model.discriminator(h), atol=1e-6, rtol=1e-5)
        projected = torch.stack([model.projections[m](sp[i]) for i, m in enumerate(modality.tolist())])
        torch.testing.assert_close(out["projected"], projected, atol=1e-6, rtol=1e-5)


def test_transferred_feature_in_training_is_the_batch_sstn():
    model = _tiny()
    images, modality, _ = _batch()
    out = model(images, modality)
    adjacency = _dense_topk_graph(out["shared"].detach(), out["specific"].detach(), modality, k=2)
    z = _pad(out["shared"].detach(), out["specific"].detach(), modality)
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

        def decode(i, p_map, h_map):
            return model.decoders[int(modality[i])](torch.cat([p_map[i:i + 1], h_map[i:i + 1]], 1))

        zeros_p, zeros_h = torch.zeros_like(specific_map), torch.zeros_like(shared_map)
        for i in (0, 1):
            torch.testing.assert_close(rec["full"][i:i + 1], decode(i, specific_map, shared_map), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(rec["shared"][i:i + 1], decode(i, zeros_p, shared_map), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(rec["specific"][i:i + 1], decode(i, specific_map, zeros_h), atol=1e-5, rtol=1e-4)
    assert set(rec) == {"full", "shared", "specific"}


def test_reconstruction_is_resized_to_inputs_the_decoder_cannot_match():
    model = _tiny()
    images, modality, _ = random_batch(40, 24, modality=[0, 1, 0, 1], labels=[0, 0, 1, 1])
    out = model(images, modality)
    with torch.no_grad():
        shared_map, specific_map = model.backbone(images, modality)
        decoded = torch.cat([model.decoders[int(m)](torch.cat([specific_map[i:i + 1], shared_map[i:i + 1]], 1))
                             for i, m in enumerate(modality)])
    assert decoded.shape[-2:] == (48, 32)                          # 3×2 map, 4 sub-pixel ×2 layers
    expected = F.interpolate(decoded, size=(40, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["reconstruction"].detach(), expected, atol=1e-5, rtol=1e-4)
    assert model.reconstruct(images, modality)["full"].shape == images.shape


def test_eval_forward_and_extract_give_the_normalised_bn_shared_feature():
    model = _tiny().eval()
    images, modality, _ = _batch()
    with torch.no_grad():
        out = model.extract(images, modality)
        shared_map, specific_map = model.backbone(images, modality)
    bn = model.shared_neck.bn
    h = shared_map.mean(dim=(2, 3))
    expected = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(out["feat"], expected / expected.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["shared"], h, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["specific"], specific_map.mean(dim=(2, 3)), atol=1e-5, rtol=1e-4)
    assert out["modality"].dtype == torch.float32 and out["modality"].tolist() == modality.float().tolist()


@pytest.mark.parametrize(("key", "value"), [
    ("graph_k", 0), ("transfer_dim", 0), ("single_query_amplify", 0.0), ("shared_margin", -0.1),
    ("specific_margin", -0.1), ("shared_triplet_weight", -1.0), ("specific_triplet_weight", -1.0),
    ("transfer_triplet_weight", -1.0), ("reconstruction_weight", -1.0), ("modality_weight", -1.0),
    ("projection_weight", -1.0), ("discriminator_hidden", 0), ("decoder_channels", 0), ("decoder_layers", 0),
    ("label_smoothing", 1.0), ("label_smoothing", -0.1), ("transfer_content", "all"),
    ("modality_adversary", "gradient"), ("test_mode", "every"),
])
def test_bad_params_name_the_key(key, value):
    with pytest.raises(InputError, match=f"model.params.{key}"):
        method_params(ModelConfig(method="ssft", params={key: value}))


def test_boundary_params_are_accepted():
    params = method_params(ModelConfig(method="ssft", params={
        "graph_k": 1, "transfer_dim": 1, "single_query_amplify": 1e-3, "shared_margin": 0.0, "specific_margin": 0.0,
        "shared_triplet_weight": 0.0, "specific_triplet_weight": 0.0, "transfer_triplet_weight": 0.0,
        "reconstruction_weight": 0.0, "modality_weight": 0.0, "projection_weight": 0.0, "discriminator_hidden": 1,
        "decoder_channels": 1, "decoder_layers": 1, "label_smoothing": 0.0, "transfer_content": "specific",
        "modality_adversary": "literal", "test_mode": "single"}))
    assert params.graph_k == 1 and params.transfer_content == "specific"


def test_bad_split_names_the_key():
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
    fs.meta = {"protocol": {"name": "regdb"}}
    out = model.finalize_features(fs, mode="all", knn="exact")
    assert out.meta["protocol"] == {"name": "regdb"} and out.query_feat.dtype == np.float32
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
    assert out.trial_gallery_index.tolist() == [[0, 1, 2, 3, -1], [4, 5, 6, 7, 8]]
    assert out.gallery_feat.dtype == np.float32 and out.query_feat.dtype == np.float32
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


def test_finalize_rejects_bad_options_and_feature_files():
    model = _tiny()
    fs = _feature_set(model, trials=False)
    for options, message in (({"k": 0}, "k must be >= 1"), ({"amplify": 0}, "amplify > 0"),
                             ({"k": "four"}, "k must be an integer"), ({"amplify": "x"}, "amplify a number")):
        with pytest.raises(InputError, match=message):
            model.finalize_features(fs, **options)
    short = _feature_set(model, trials=False)
    short.extras["query_shared"] = short.extras["query_shared"][:3]
    with pytest.raises(InputError, match="query_shared has 3 rows but the file has 4 query rows"):
        model.finalize_features(short)
    odd = _feature_set(model, trials=False)
    odd.extras["gallery_modality"] = np.full(6, 2.0, dtype=np.float32)
    with pytest.raises(InputError, match="gallery_modality must hold 0"):
        model.finalize_features(odd)


def test_single_query_amplification_defaults_to_k():
    """Eq. 22 multiplies the query's column by the k of T(·, k): the default follows the test's k."""
    model = _tiny()
    fs = _feature_set(model, trials=False)
    for k in (2, 3):
        default = model.finalize_features(fs, mode="single", k=k, knn="exact")
        assert default.meta["ssft"] == {"mode": "single", "k": k, "amplify": float(k), "knn": "exact"}
        explicit = model.transfer_distance(fs, "single", k=k, amplify=k, knn="exact")
        np.testing.assert_allclose(default.extras["ranked_dist"], np.sort(explicit, axis=1), atol=1e-6)
        assert not np.allclose(explicit, model.transfer_distance(fs, "single", k=k, amplify=1.0, knn="exact"))
    fixed = _tiny(single_query_amplify=7.0)
    assert fixed.finalize_features(_feature_set(fixed, trials=False), mode="single").meta["ssft"]["amplify"] == 7.0


def test_shared_mode_distance_is_the_negative_cosine_of_the_plain_features():
    model = _tiny()
    fs = _feature_set(model, trials=False)
    q = fs.query_feat / np.linalg.norm(fs.query_feat, axis=1, keepdims=True)
    g = fs.gallery_feat / np.linalg.norm(fs.gallery_feat, axis=1, keepdims=True)
    np.testing.assert_allclose(model.transfer_distance(fs, "shared"), -(q @ g.T), atol=1e-5)
    np.testing.assert_allclose(ssft_distance(model, "shared")(fs), -(q @ g.T), atol=1e-5)


def test_propagate_in_several_chunks_matches_dense(monkeypatch):
    import vireid.models.methods.ssft_transfer as transfer_module

    monkeypatch.setattr(transfer_module, "_GATHER_ELEMENTS", 20)          # 20 // (4 · 3) = 1 row per chunk
    shared, specific = torch.randn(5, 3, generator=seeded(40)), torch.randn(5, 3, generator=seeded(41))
    modality = torch.tensor([0, 1, 0, 1, 1])
    w = torch.randn(3, 9, generator=seeded(42))
    index, weight = batch_neighbours(shared, specific, modality, k=2)
    got = propagate(padded_features(shared, specific, modality) @ w.t(), index, weight)
    expected = _dense_propagation(_dense_topk_graph(shared, specific, modality, k=2), _pad(shared, specific, modality), w)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)


def test_batch_neighbours_keep_a_whole_block_smaller_than_k():
    shared, specific = torch.randn(5, 3, generator=seeded(43)), torch.randn(5, 3, generator=seeded(44))
    modality = torch.tensor([0, 1, 0, 0, 0])
    index, weight = batch_neighbours(shared, specific, modality, k=3)
    assert index.shape == (5, 4)                     # 3 visible + the only infrared image
    rebuilt = torch.zeros(5, 5, dtype=torch.float64).scatter_(1, index, weight.double())
    torch.testing.assert_close(rebuilt, _dense_topk_graph(shared, specific, modality, k=3), atol=1e-5, rtol=1e-5)


def test_three_trials_get_disjoint_row_blocks():
    model = _tiny()
    fs = _feature_set(model, trials=False)
    fs.trial_query_index = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]])
    fs.trial_gallery_index = np.array([[0, 1, 2, -1], [3, 4, 5, -1], [0, 2, 4, 5]])
    out = model.finalize_features(fs, knn="exact")
    assert out.trial_query_index.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert out.trial_gallery_index.tolist() == [[0, 1, 2, -1], [3, 4, 5, -1], [6, 7, 8, 9]]
    for t in range(3):
        got = out.trial(t)
        expected = -model.transfer_distance(fs.trial(t), "all", knn="exact")
        np.testing.assert_allclose(got.query_feat @ got.gallery_feat.T, expected, atol=1e-5)


def test_single_mode_ranked_lists_hold_the_distances_of_the_given_amplification():
    model = _tiny()
    fs = _feature_set(model, trials=True)
    out = model.finalize_features(fs, mode="single", k=3, amplify=6.5, knn="exact")
    ranked_index, ranked_dist = out.extras["ranked_index"], out.extras["ranked_dist"]
    assert ranked_index.dtype == np.int64 and ranked_dist.dtype == np.float32
    for t in range(2):
        q_rows, g_rows = out.trial_rows(t)
        dist = model.transfer_distance(fs.trial(t), "single", k=3, amplify=6.5, knn="exact")
        np.testing.assert_allclose(ranked_dist[q_rows, : len(g_rows)], np.sort(dist, axis=1), atol=1e-6)
    assert np.isinf(ranked_dist[0, 4]) and ranked_index[0, 4] == -1


def test_distance_function_passes_its_options():
    model = _tiny()
    fs = _feature_set(model, trials=False)
    for mode in ("all", "single"):
        np.testing.assert_allclose(ssft_distance(model, mode, k=3, knn="exact")(fs),
                                   model.transfer_distance(fs, mode, k=3, knn="exact"), atol=1e-6)
    assert not np.allclose(model.transfer_distance(fs, "all", k=3), model.transfer_distance(fs, "all"))


def test_transfer_accepts_float64_feature_files():
    model = _tiny()
    fs = _feature_set(model, trials=False)
    wide = _feature_set(model, trials=False)
    for key in ("query_shared", "gallery_shared", "query_specific", "gallery_specific"):
        wide.extras[key] = wide.extras[key].astype(np.float64)
    np.testing.assert_allclose(model.finalize_features(wide, knn="exact").query_feat,
                               model.finalize_features(fs, knn="exact").query_feat, atol=1e-6)


def test_finalize_names_every_unknown_option_and_accepts_k_1():
    model = _tiny()
    fs = _feature_set(model, trials=False)
    with pytest.raises(InputError, match=r"unknown depth, neighbours \(mode, k, amplify, knn\)"):
        model.finalize_features(fs, neighbours=3, depth=2)
    assert model.finalize_features(fs, k=1, knn="exact").meta["ssft"]["k"] == 1


# ---------------------------------------------------------------------------- architecture by hand
def _pixel_shuffle_by_loop(x: torch.Tensor) -> torch.Tensor:
    """Sub-pixel ×2 by index: out[c, 2y + dy, 2x + dx] = x[4c + 2dy + dx, y, x]."""
    n, c4, h, w = x.shape
    out = torch.zeros(n, c4 // 4, 2 * h, 2 * w, dtype=x.dtype)
    for c in range(c4 // 4):
        for dy in (0, 1):
            for dx in (0, 1):
                out[:, c, dy::2, dx::2] = x[:, 4 * c + 2 * dy + dx]
    return out


def test_sub_pixel_decoder_by_hand():
    """§4.1: 4 sub-pixel layers of 64 channels (3×3 'same' conv to 4c, shuffle ×2), ReLU between, 3 out."""
    default = SubPixelDecoder(10)
    convs = [m for m in default.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4 * 64] * 3 + [4 * 3] and convs[0].in_channels == 10
    torch.manual_seed(5)
    decoder = SubPixelDecoder(5, channels=3, layers=2)
    first, last = [m for m in decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    x = torch.randn(2, 5, 3, 2, generator=seeded(50))
    hidden = F.relu(_pixel_shuffle_by_loop(F.conv2d(x, first.weight, first.bias, padding=1)))
    expected = _pixel_shuffle_by_loop(F.conv2d(hidden, last.weight, last.bias, padding=1))
    with torch.no_grad():
        got = decoder(x)
    assert got.shape == (2, 3, 12, 8)                 # 3×2 map, two ×2 layers
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-4)
    assert (got < 0).any()                            # no ReLU after the last layer


def test_modality_discriminator_is_three_linear_layers_with_relu_between():
    model = _tiny(discriminator_hidden=5)     # built here (the default model is cached)
    h = torch.randn(6, 512, generator=seeded(51))
    l1, l2, l3 = [m for m in model.discriminator if isinstance(m, torch.nn.Linear)]
    expected = h
    for layer, relu in ((l1, True), (l2, True), (l3, False)):
        expected = expected @ layer.weight.detach().t() + layer.bias.detach()
        expected = expected.clamp(min=0) if relu else expected
    with torch.no_grad():
        torch.testing.assert_close(model.discriminator(h), expected, atol=1e-5, rtol=1e-4)
    assert l1.out_features == l2.out_features == 5    # discriminator_hidden


def test_backbone_streams_follow_the_number_of_modalities():
    default = SharedSpecificBackbone("resnet10", "layer2", 1, None)
    assert len(default.low.streams) == 2 and len(default.specific) == 2

    class ThreeModalities(SSFTModel):
        num_modalities = 3

    cfg = ModelConfig(method="ssft", backbone="resnet10", pretrained=None, split="layer2")
    model = ThreeModalities(cfg, SSFTParams(discriminator_hidden=4, decoder_channels=2, decoder_layers=1), 4)
    assert len(model.backbone.low.streams) == 3 and len(model.backbone.specific) == 3
    assert len(model.decoders) == 3 and len(model.projections) == 3


def test_last_stride_and_split_shape_the_conv2_streams():
    """64×32 images: stem /4, layer2 /2, layer3 /2 give 4×2; layer4 keeps it (stride 1) or halves it."""
    images, modality, _ = random_batch(64, 32, modality=[0, 1], labels=[0, 1])
    params = {"discriminator_hidden": 4, "decoder_channels": 2, "decoder_layers": 1}
    for last_stride, size in ((1, (4, 2)), (2, (2, 1))):
        model = tiny_model("ssft", SSFTModel, params, split="layer2", last_stride=last_stride).eval()
        with torch.no_grad():
            shared_map, specific_map = model.backbone(images, modality)
        assert tuple(shared_map.shape[-2:]) == size and tuple(specific_map.shape[-2:]) == size
    late = tiny_model("ssft", SSFTModel, params, split="layer3")   # Conv2 = layer4 alone
    assert len(late.backbone.low.shared) == 1 and len(late.backbone.low.streams[0]) == 4


def test_pretrained_weights_file_reaches_every_stream(tmp_path):
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(3)
    reference = ResNet(BasicBlock, [1, 1, 1, 1])
    torch.save(reference.state_dict(), tmp_path / "resnet10.pth")
    cfg = ModelConfig(method="ssft", backbone="resnet10", pretrained=str(tmp_path / "resnet10.pth"), split="layer2",
                      params={"discriminator_hidden": 4, "decoder_channels": 2, "decoder_layers": 1})
    model = create_model(cfg, num_classes=4)
    backbone = model.backbone
    for m in (0, 1):
        torch.testing.assert_close(backbone.low.streams[m][0][0].weight, reference.conv1.weight)
        torch.testing.assert_close(backbone.specific[m][-1][0].conv1.weight, reference.layer4[0].conv1.weight)
    torch.testing.assert_close(backbone.low.shared[-1][0].conv1.weight, reference.layer4[0].conv1.weight)


# ---------------------------------------------------------------------------- test time by hand
def _dense_transfer(model, shared, specific, modality, k):
    """All-queries SSTN by dense formulas: T = normalised BN_eval(ReLU(D^-½ A D^-½ Z W)) (Eq. 5-11)."""
    adjacency = _dense_topk_graph(shared, specific, modality, k)
    hidden = _dense_propagation(adjacency, _pad(shared, specific, modality), model.transfer.projection.weight.detach())
    return _bn_eval(model.transfer.neck, hidden).detach()


def _side(fs, side, rows=None):
    arrays = [torch.from_numpy(np.asarray(fs.extras[f"{side}_{name}"], dtype=np.float32))
              for name in ("shared", "specific", "modality")]
    return [a if rows is None else a[rows] for a in arrays]


def test_distance_function_defaults_to_the_all_queries_transfer():
    model = _tiny()
    fs = _feature_set(model, trials=False)
    model.eval()
    (qs, qp, qm), (gs, gp, gm) = _side(fs, "query"), _side(fs, "gallery")
    t = _dense_transfer(model, torch.cat([qs, gs]), torch.cat([qp, gp]), torch.cat([qm, gm]).long(), k=2)
    expected = -(t[:4] @ t[4:].t()).numpy()
    np.testing.assert_allclose(ssft_distance(model)(fs), expected, atol=1e-5)


def test_gallery_only_trials_give_each_trial_its_own_query_rows():
    """Trial indices on the gallery only (every query in every trial): each trial's graph has all
    queries, so the output repeats the query rows per trial."""
    model = _tiny()
    fs = _feature_set(model, trials=False)
    fs.trial_gallery_index = np.array([[0, 1, 2, 3, -1], [1, 2, 3, 4, 5]])
    out = model.finalize_features(fs, knn="exact")
    assert out.trial_query_index.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and out.query_feat.shape[0] == 8
    qs, qp, qm = _side(fs, "query")
    for t, g_rows in enumerate(([0, 1, 2, 3], [1, 2, 3, 4, 5])):
        gs, gp, gm = _side(fs, "gallery", g_rows)
        expected = _dense_transfer(model, torch.cat([qs, gs]), torch.cat([qp, gp]), torch.cat([qm, gm]).long(), k=2)
        got = out.trial(t)
        np.testing.assert_allclose(got.query_feat, expected[:4].numpy(), atol=1e-5)
        np.testing.assert_allclose(got.gallery_feat, expected[4:].numpy(), atol=1e-5)


def test_transfer_inputs_are_float32_features_and_int64_modality():
    model = _tiny()
    fs = _feature_set(model, trials=False)
    fs.extras["query_shared"] = fs.extras["query_shared"].astype(np.float64)
    shared, specific, modality = _transfer_inputs(fs, "query")
    assert shared.dtype == specific.dtype == torch.float32 and modality.dtype == torch.int64
    assert modality.tolist() == [1, 1, 1, 1] and shared.shape == (4, 512)


def test_unknown_knn_method_is_refused_in_every_mode():
    model = _tiny()
    fs = _feature_set(model, trials=True)
    for mode in ("all", "single"):
        with pytest.raises(InputError, match="unknown knn method 'nope'"):
            model.finalize_features(fs, mode=mode, knn="nope")
        with pytest.raises(InputError, match="unknown knn method 'nope'"):
            model.transfer_distance(fs.trial(0), mode, knn="nope")
    x = np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32)
    with pytest.raises(InputError, match="unknown knn method 'nope'"):
        searched_neighbours(x, x, np.array([0, 0, 1, 1]), k=1, knn_method="nope")


def test_single_mode_ranks_tied_gallery_rows_in_gallery_order():
    """20 gallery rows, two people each seen 10 times (identical features): every query sees two
    distances, each 10 times; the ranking keeps the tied rows in gallery order."""
    model = _tiny()
    rng = np.random.default_rng(7)
    people = rng.normal(size=(2, 2, 512)).astype(np.float32)          # (person, shared/specific, d)
    gallery = people[np.arange(20) % 2]
    q = rng.normal(size=(3, 2, 512)).astype(np.float32)
    extras = {"query_shared": q[:, 0], "query_specific": q[:, 1], "query_modality": np.ones(3, np.float32),
              "gallery_shared": gallery[:, 0], "gallery_specific": gallery[:, 1],
              "gallery_modality": np.zeros(20, np.float32)}
    fs = FeatureSet(q[:, 0], gallery[:, 0], np.arange(3), np.arange(20) % 2, np.full(3, 3), np.full(20, 1),
                    extras=extras)
    out = model.finalize_features(fs, mode="single", knn="exact")
    dist = model.transfer_distance(fs, "single", knn="exact")
    for row in range(3):
        assert len(np.unique(dist[row])) == 2
        expected = sorted(range(20), key=lambda j: (dist[row, j], j))
        assert out.extras["ranked_index"][row].tolist() == expected


def test_batch_neighbours_of_a_single_modality_batch():
    shared, specific = torch.randn(5, 3, generator=seeded(52)), torch.randn(5, 3, generator=seeded(53))
    modality = torch.zeros(5, dtype=torch.long)
    index, weight = batch_neighbours(shared, specific, modality, k=2)
    assert index.shape == (5, 2)
    rebuilt = torch.zeros(5, 5, dtype=torch.float64).scatter_(1, index, weight.double())
    torch.testing.assert_close(rebuilt, _dense_topk_graph(shared, specific, modality, k=2), atol=1e-5, rtol=1e-5)


def test_error_messages_name_the_keys_and_the_way_out():
    model = _tiny()
    fs = _feature_set(model, trials=False)
    del fs.extras["query_shared"], fs.extras["query_specific"]
    message = ("cm-SSFT test-time transfer needs key(s) query_shared, query_specific in the feature file "
               "(extract it with a cm-SSFT checkpoint)")
    with pytest.raises(InputError, match=re.escape(message)):
        model.finalize_features(fs)
    plain = _tiny(transfer_content="none", test_mode="shared")
    message = ("cm-SSFT test mode 'single' needs the SSTN, but this model was trained with transfer_content=none: "
               "use mode=shared")
    with pytest.raises(InputError, match=re.escape(message)):
        plain.finalize_features(_feature_set(plain, trials=False), mode="single")


# ---------------------------------------------------------------------------- helpers and params, hand-worked
def test_resize_to_keeps_a_map_already_at_the_size_and_resizes_with_half_pixel_bilinear():
    for shape in ((1, 2, 3, 4), (2, 3, 4), (3, 4)):             # only the last two dimensions are the size
        already = torch.arange(float(np.prod(shape))).view(shape)
        assert _resize_to(already, (3, 4)) is already
    # 1×2 -> 1×4 with half-pixel centres (align_corners=False): source x = (x + ½)·½ − ½, clamped at the
    # borders: [-¼, ¼, ¾, 1¼] -> [0, 1, 3, 4] from [0, 4] (align_corners=True would give [0, 4/3, 8/3, 4])
    got = _resize_to(torch.tensor([[[[0.0, 4.0]]]]), (1, 4))
    assert got.shape == (1, 1, 1, 4) and got.flatten().tolist() == [0.0, 1.0, 3.0, 4.0]


def test_projections_are_bias_free_linear_maps_per_modality():
    """L_pa's Θ^m (Eq. 15) by a loop: projected_i = W_{m_i} P_i, with no bias term."""
    model = _tiny()
    images, modality, _ = _batch()
    with torch.no_grad():
        out = model(images, modality)
    for i, m in enumerate(modality.tolist()):
        weight = model.projections[m].weight.double()
        expected = (weight * out["specific"][i].double().unsqueeze(0)).sum(dim=1)   # row r: Σ_c W_rc P_c
        torch.testing.assert_close(out["projected"][i].double(), expected, atol=1e-5, rtol=1e-4)


def test_decoder_layers_param_sets_the_number_of_subpixel_steps():
    model = _build(decoder_layers=2)
    for decoder in model.decoders:
        convs = [m for m in decoder.modules() if isinstance(m, torch.nn.Conv2d)]
        shuffles = [m for m in decoder.modules() if isinstance(m, torch.nn.PixelShuffle)]
        assert len(convs) == 2 and len(shuffles) == 2
        assert [c.out_channels for c in convs] == [4 * 8, 4 * 3]
        # two ×2 pixel shuffles: a 1×1 map becomes 4×4
        assert decoder(torch.zeros(1, 2 * 512, 1, 1)).shape == (1, 3, 4, 4)


def test_params_validate_messages_in_full():
    """validate() is also the check for params built in Python (the config loader checks the literal first)."""
    with pytest.raises(InputError, match="^" + re.escape(
            "model.params.test_mode must be one of ('all', 'single', 'shared'), got 'every'") + "$"):
        SSFTParams(test_mode="every").validate()
    with pytest.raises(InputError, match="^" + re.escape(
            "model.params.test_mode must be 'shared' when transfer_content is 'none' (no SSTN)") + "$"):
        SSFTParams(transfer_content="none", test_mode="all").validate()


def test_affinity_keeps_small_distances_exact_for_many_rows():
    """Eq. 7 on near-duplicates at sizes where cdist would switch to the 2 − 2·cos matrix product
    (more than 25 rows): that loses distances of ~1e-4 to float32 rounding (errors ~3e-4)."""
    a = torch.randn(40, 64, generator=seeded(21))
    b = a + 1e-4 * torch.randn(40, 64, generator=seeded(22))
    got = affinity(a, b).double()
    for i in range(40):
        for j in (i, (i + 7) % 40):
            assert abs(got[i, j].item() - _direct_d(a[i].double(), b[j].double())) < 1e-6
