"""The two-stream baseline (AGW-style) against independent computations.

Every expected value here is written out in the test: explicit loops over anchors for the
batch-hard and the weighted regularised triplet, a per-row loop for the label-smoothed
cross-entropy, and batch normalisation / pooling / L2 normalisation by hand. None of them calls
:mod:`vireid.losses`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torchvision.models import resnet as tv_resnet

from vireid.errors import InputError
from vireid.models.heads import AvgPool, GeM
from vireid.models.methods.baseline import BaselineModel, BaselineParams
from vireid.models.registry import ModelConfig, create_model

NUM_CLASSES = 5
# ids 0..2 have two visible and two infrared images; id 3 has a single visible image (no positive
# anywhere: never a valid anchor); id 4 is visible only (no cross-modality positive).
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4, 4, 0, 0, 1, 1, 2, 2])
MODALITY = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])


def _cfg(**overrides: object) -> ModelConfig:
    return ModelConfig(**{"backbone": "resnet10", "pretrained": None, **overrides})  # type: ignore[arg-type]


def _model(**params: object) -> BaselineModel:
    return BaselineModel(_cfg(), BaselineParams(**params), NUM_CLASSES)  # type: ignore[arg-type]


def _outputs(seed: int = 0) -> dict[str, Tensor]:
    """Three unrelated tensors, so a loss evaluated on the wrong one is caught."""
    gen = torch.Generator().manual_seed(seed)
    n = len(LABELS)
    return {"pre_bn": 0.4 * torch.randn(n, 6, generator=gen),
            "bn": 3.0 + torch.randn(n, 6, generator=gen),
            "logits": 2.0 * torch.randn(n, NUM_CLASSES, generator=gen)}


# --------------------------------------------------------------------------- references

def _dist(x: Tensor, i: int, j: int) -> float:
    return math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(x[i], x[j])))


def _allowed(i: int, j: int, pairs: str) -> bool:
    if pairs == "all":
        return True
    same = int(MODALITY[i]) == int(MODALITY[j])
    return not same if pairs == "cross" else same


def _candidates(i: int, pairs: str) -> tuple[list[int], list[int]]:
    n = len(LABELS)
    pos = [j for j in range(n) if j != i and LABELS[j] == LABELS[i] and _allowed(i, j, pairs)]
    neg = [j for j in range(n) if LABELS[j] != LABELS[i] and _allowed(i, j, pairs)]
    return pos, neg


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def ref_batch_hard(x: Tensor, pairs: str, margin: float | None) -> float:
    terms = []
    for i in range(len(LABELS)):
        pos, neg = _candidates(i, pairs)
        if not pos or not neg:
            continue
        d_ap = max(_dist(x, i, j) for j in pos)
        d_an = min(_dist(x, i, k) for k in neg)
        terms.append(_softplus(d_ap - d_an) if margin is None else max(0.0, d_ap - d_an + margin))
    return sum(terms) / len(terms)


def ref_weighted(x: Tensor, pairs: str) -> float:
    terms = []
    for i in range(len(LABELS)):
        pos, neg = _candidates(i, pairs)
        if not pos or not neg:
            continue
        dp = [_dist(x, i, j) for j in pos]
        dn = [_dist(x, i, k) for k in neg]
        wp = [math.exp(d) for d in dp]
        wn = [math.exp(-d) for d in dn]
        d_p = sum(w * d for w, d in zip(wp, dp)) / sum(wp)
        d_n = sum(w * d for w, d in zip(wn, dn)) / sum(wn)
        terms.append(_softplus(d_p - d_n))
    return sum(terms) / len(terms)


def ref_smoothed_ce(logits: Tensor, labels: Tensor, eps: float) -> float:
    total = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        top = max(row)
        log_z = top + math.log(sum(math.exp(v - top) for v in row))
        k = len(row)
        q = [eps / k + (1.0 - eps if c == y else 0.0) for c in range(k)]
        total += -sum(qc * (v - log_z) for qc, v in zip(q, row))
    return total / len(labels)


def ref_accuracy(logits: Tensor, labels: Tensor) -> float:
    hits = 0
    for row, y in zip(logits.tolist(), labels.tolist()):
        hits += max(range(len(row)), key=lambda c: row[c]) == y
    return hits / len(labels)


# --------------------------------------------------------------------------- validate()

@pytest.mark.parametrize(("key", "value"), [("label_smoothing", -0.01), ("label_smoothing", 1.0),
                                            ("label_smoothing", 1.5), ("pairs", "both"),
                                            ("margin", -0.01), ("margin", -1.0)])
def test_validate_rejects_bad_values_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(InputError, match=rf"model\.params\.{key}\b.*{value!r}" if key == "pairs"
                       else rf"model\.params\.{key}\b.*{value}"):
        BaselineParams(**{key: value}).validate()  # type: ignore[arg-type]


@pytest.mark.parametrize(("key", "value"), [("label_smoothing", 0.0), ("label_smoothing", 0.99),
                                            ("margin", 0.0), ("margin", None), ("margin", 2.0),
                                            ("pairs", "all"), ("pairs", "cross"), ("pairs", "intra")])
def test_validate_accepts_the_boundaries(key: str, value: object) -> None:
    BaselineParams(**{key: value}).validate()  # type: ignore[arg-type]  # no exception


def test_config_path_reports_the_key() -> None:
    with pytest.raises(InputError, match=r"model\.params\.margin"):
        create_model(_cfg(params={"margin": -0.5}), num_classes=2)
    with pytest.raises(InputError, match=r"model\.params\.pairs"):
        create_model(_cfg(params={"pairs": "other"}), num_classes=2)


# --------------------------------------------------------------------------- __init__

def test_split_decides_the_modality_specific_stages() -> None:
    stem_only = BaselineModel(_cfg(split="stem"), BaselineParams(), NUM_CLASSES)
    assert len(stem_only.backbone.streams[0]) == 1 and len(stem_only.backbone.shared) == 4
    to_layer2 = BaselineModel(_cfg(split="layer2"), BaselineParams(), NUM_CLASSES)
    assert len(to_layer2.backbone.streams) == 2
    assert len(to_layer2.backbone.streams[0]) == 3 and len(to_layer2.backbone.shared) == 2
    assert to_layer2.backbone.streams[0] is not to_layer2.backbone.streams[1]


@pytest.mark.parametrize(("last_stride", "grid"), [(1, (8, 4)), (2, (4, 2))])
def test_last_stride_sets_the_output_grid(last_stride: int, grid: tuple[int, int]) -> None:
    model = BaselineModel(_cfg(last_stride=last_stride), BaselineParams(), NUM_CLASSES).eval()
    with torch.no_grad():
        fmap = model.backbone(torch.randn(2, 3, 128, 64), torch.tensor([0, 1]))
    assert fmap.shape == (2, 512, *grid)   # 128x64 input: total stride 16, or 32 with a strided last stage
    assert model.backbone.shared[-1][0].conv1.stride == (last_stride, last_stride)


def test_pretrained_weights_file_is_loaded(tmp_path: Path) -> None:
    torch.manual_seed(123)
    source = tv_resnet.ResNet(tv_resnet.BasicBlock, [1, 1, 1, 1])
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)   # far from any default initialisation
    file = tmp_path / "resnet10.pth"
    torch.save(source.state_dict(), file)
    model = BaselineModel(_cfg(pretrained=str(file)), BaselineParams(), NUM_CLASSES)
    for stream in model.backbone.streams:
        assert torch.equal(stream[0][0].weight, source.conv1.weight)      # stem conv of each stream
    layer4 = model.backbone.shared[-1]
    assert torch.equal(layer4[0].conv2.weight, source.layer4[0].conv2.weight)
    assert torch.equal(layer4[0].downsample[1].running_var, source.layer4[0].downsample[1].running_var)
    random = BaselineModel(_cfg(pretrained="none"), BaselineParams(), NUM_CLASSES)
    assert not torch.equal(random.backbone.streams[0][0][0].weight, source.conv1.weight)


class _ThreeStreamBaseline(BaselineModel):
    num_modalities = 3


def test_backbone_gets_one_stream_per_modality() -> None:
    assert len(_model().backbone.streams) == 2
    model = _ThreeStreamBaseline(_cfg(), BaselineParams(), NUM_CLASSES)
    assert len(model.backbone.streams) == 3 and model.backbone.num_modalities == 3


@pytest.mark.parametrize(("pooling", "kind"), [("gem", GeM), ("avg", AvgPool)])
def test_pooling_and_neck_sizes(pooling: str, kind: type) -> None:
    model = BaselineModel(_cfg(pooling=pooling), BaselineParams(), num_classes=7)
    assert isinstance(model.pool, kind)
    assert model.neck.bn.num_features == 512
    assert model.neck.classifier.in_features == 512 and model.neck.classifier.out_features == 7


# --------------------------------------------------------------------------- forward

def _capture_backbone(model: BaselineModel) -> list[Tensor]:
    seen: list[Tensor] = []
    model.backbone.register_forward_hook(lambda _m, _inp, out: seen.append(out.detach().clone()))
    return seen


def _pool_by_hand(fmap: Tensor, pooling: str, p: float = 3.0) -> Tensor:
    if pooling == "avg":
        return fmap.double().mean(dim=(2, 3))
    return fmap.double().clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def _randomise_neck(model: BaselineModel) -> None:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.neck.bn.weight.copy_(0.5 + torch.rand(512, generator=gen))
        model.neck.bn.bias.copy_(torch.randn(512, generator=gen))
        model.neck.bn.running_mean.copy_(torch.randn(512, generator=gen))
        model.neck.bn.running_var.copy_(0.2 + torch.rand(512, generator=gen))
        model.neck.classifier.weight.copy_(torch.randn(NUM_CLASSES, 512, generator=gen))


@pytest.mark.parametrize("pooling", ["gem", "avg"])
def test_train_forward_returns_pre_bn_bn_and_logits(pooling: str) -> None:
    torch.manual_seed(0)
    model = BaselineModel(_cfg(pooling=pooling), BaselineParams(), NUM_CLASSES)
    _randomise_neck(model)
    seen = _capture_backbone(model)
    images, modality = torch.randn(6, 3, 32, 16), torch.tensor([0, 1, 0, 1, 1, 0])
    out = model.train()(images, modality)
    assert set(out) == {"pre_bn", "bn", "logits"}
    pre = _pool_by_hand(seen[0], pooling)
    assert torch.allclose(out["pre_bn"].double(), pre, rtol=1e-5, atol=1e-6)
    mean, var = pre.mean(0), pre.var(0, unbiased=False)          # train-mode BN: batch statistics
    bn = (pre - mean) / torch.sqrt(var + 1e-5) * model.neck.bn.weight.double() + model.neck.bn.bias.double()
    assert torch.allclose(out["bn"].double(), bn, rtol=1e-4, atol=1e-4)
    logits = bn @ model.neck.classifier.weight.double().t()
    assert torch.allclose(out["logits"].double(), logits, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("pooling", ["gem", "avg"])
def test_eval_forward_returns_the_l2_normalised_bn_feature(pooling: str) -> None:
    torch.manual_seed(1)
    model = BaselineModel(_cfg(pooling=pooling), BaselineParams(), NUM_CLASSES)
    _randomise_neck(model)
    seen = _capture_backbone(model)
    images, modality = torch.randn(4, 3, 32, 16), torch.tensor([1, 0, 0, 1])
    with torch.no_grad():
        out = model.eval()(images, modality)
    assert set(out) == {"feat"}
    pre = _pool_by_hand(seen[0], pooling)
    bn = model.neck.bn
    feat = (pre - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + 1e-5)
    feat = feat * bn.weight.double() + bn.bias.double()            # eval-mode BN: running statistics
    feat = feat / torch.sqrt((feat * feat).sum(1, keepdim=True))
    assert torch.allclose(out["feat"].double(), feat, atol=1e-5)
    assert torch.equal(model.extract(images, modality)["feat"], out["feat"])


# --------------------------------------------------------------------------- compute_loss

@pytest.mark.parametrize("pairs", ["all", "cross", "intra"])
@pytest.mark.parametrize("margin", [0.0, 0.5, 1.2, None])
def test_batch_hard_loss_against_a_loop(pairs: str, margin: float | None) -> None:
    out = _outputs(seed=3)
    model = _model(triplet="batch_hard", pairs=pairs, margin=margin, label_smoothing=0.0)
    total, terms = model.compute_loss(out, LABELS, MODALITY)
    triplet = ref_batch_hard(out["pre_bn"], pairs, margin)
    ce = ref_smoothed_ce(out["logits"], LABELS, 0.0)
    assert terms["triplet"].item() == pytest.approx(triplet, rel=1e-5, abs=1e-6)
    assert terms["id"].item() == pytest.approx(ce, rel=1e-5)
    assert total.item() == pytest.approx(ce + triplet, rel=1e-5)


def test_batch_hard_margin_is_active_in_the_fixture() -> None:
    """The margin cases above only test the margin if they give different losses."""
    x = _outputs(seed=3)["pre_bn"]
    for pairs in ("all", "cross", "intra"):
        values = [ref_batch_hard(x, pairs, m) for m in (0.0, 0.3, 0.5, 1.2, None)]
        assert len({round(v, 6) for v in values}) == len(values)


@pytest.mark.parametrize("pairs", ["all", "cross", "intra"])
def test_weighted_triplet_against_a_loop(pairs: str) -> None:
    out = _outputs(seed=4)
    model = _model(triplet="weighted", pairs=pairs, label_smoothing=0.0)
    total, terms = model.compute_loss(out, LABELS, MODALITY)
    triplet = ref_weighted(out["pre_bn"], pairs)
    ce = ref_smoothed_ce(out["logits"], LABELS, 0.0)
    assert terms["triplet"].item() == pytest.approx(triplet, rel=1e-5)
    assert total.item() == pytest.approx(ce + triplet, rel=1e-5)


def test_weighted_pair_sets_differ_in_the_fixture() -> None:
    x = _outputs(seed=4)["pre_bn"]
    values = [ref_weighted(x, p) for p in ("all", "cross", "intra")]
    assert len({round(v, 6) for v in values}) == 3


def test_no_triplet_is_the_identity_loss_alone() -> None:
    out = _outputs(seed=5)
    total, terms = _model(triplet="none", id_weight=0.6, label_smoothing=0.2).compute_loss(out, LABELS, MODALITY)
    assert set(terms) == {"id", "accuracy"}
    assert total.item() == pytest.approx(0.6 * ref_smoothed_ce(out["logits"], LABELS, 0.2), rel=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.35])
def test_label_smoothing_against_a_loop(eps: float) -> None:
    out = _outputs(seed=6)
    total, terms = _model(triplet="none", label_smoothing=eps).compute_loss(out, LABELS, MODALITY)
    expected = ref_smoothed_ce(out["logits"], LABELS, eps)
    assert terms["id"].item() == pytest.approx(expected, rel=1e-5)
    assert total.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("triplet", "id_weight", "triplet_weight"),
                         [("batch_hard", 0.25, 1.0), ("batch_hard", 2.0, 0.4), ("weighted", 1.5, 3.0),
                          ("weighted", 0.0, 0.7)])
def test_loss_weights(triplet: str, id_weight: float, triplet_weight: float) -> None:
    out = _outputs(seed=8)
    model = _model(triplet=triplet, pairs="cross", margin=0.7, label_smoothing=0.1,
                   id_weight=id_weight, triplet_weight=triplet_weight)
    total, _ = model.compute_loss(out, LABELS, MODALITY)
    ce = ref_smoothed_ce(out["logits"], LABELS, 0.1)
    tri = ref_batch_hard(out["pre_bn"], "cross", 0.7) if triplet == "batch_hard" else ref_weighted(out["pre_bn"], "cross")
    assert tri > 0.05 and ce > 0.05
    assert total.item() == pytest.approx(id_weight * ce + triplet_weight * tri, rel=1e-5)


def test_losses_use_pre_bn_for_the_triplet_and_logits_for_the_identity() -> None:
    out = _outputs(seed=9)
    model = _model(triplet="batch_hard", pairs="all", margin=0.3, label_smoothing=0.0)
    base, _ = model.compute_loss(out, LABELS, MODALITY)
    changed_bn, _ = model.compute_loss(out | {"bn": -out["bn"]}, LABELS, MODALITY)
    assert torch.equal(base, changed_bn)   # the BN feature only reaches the loss through the logits
    changed_pre, _ = model.compute_loss(out | {"pre_bn": out["pre_bn"] * 3.0}, LABELS, MODALITY)
    expected = ref_smoothed_ce(out["logits"], LABELS, 0.0) + ref_batch_hard(out["pre_bn"] * 3.0, "all", 0.3)
    assert changed_pre.item() == pytest.approx(expected, rel=1e-5)


def test_accuracy_term_counts_argmax_hits() -> None:
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    logits = torch.full((6, NUM_CLASSES), -1.0)
    for row, cls in enumerate([0, 1, 3, 3, 4, 2]):   # hits on rows 0, 1, 3, 4 (not 1/2: == and != differ)
        logits[row, cls] = 2.0
    out = {"pre_bn": torch.randn(6, 4), "bn": torch.randn(6, 4), "logits": logits}
    _, terms = _model(triplet="none").compute_loss(out, labels, torch.tensor([0, 1, 0, 1, 0, 1]))
    assert ref_accuracy(logits, labels) == pytest.approx(4 / 6)
    assert terms["accuracy"].item() == pytest.approx(4 / 6)
    assert terms["id"].item() == pytest.approx(ref_smoothed_ce(logits, labels, 0.0), rel=1e-5)


def test_terms_are_detached_and_total_carries_the_graph() -> None:
    out = {k: v.requires_grad_() for k, v in _outputs(seed=10).items()}
    total, terms = _model(triplet="weighted").compute_loss(out, LABELS, MODALITY)
    assert total.requires_grad and all(not t.requires_grad for t in terms.values())
    total.backward()
    assert out["pre_bn"].grad is not None and out["logits"].grad is not None and out["bn"].grad is None
