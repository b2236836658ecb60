"""cm-SSFT (Lu et al., "Cross-Modality Person Re-Identification with Shared-Specific Feature
Transfer", CVPR 2020).

Feature extractor (§3.1, Eq. 1): Conv1^m (modality-specific stem + layer1 + layer2) feeds a shared
stream Conv2^S + Feat^S giving the shared feature H^m and a modality-specific stream Conv2^m +
Feat^m giving the specific feature P^m (Conv2 = layer3 + layer4, last stride 1; Feat = pooling +
BNNeck). ``ModelConfig.split`` names the last Conv1 stage (``layer2`` in the paper).

Shared-specific transfer (§3.2, Eq. 5–11, :mod:`vireid.models.methods.ssft_transfer`): the top-k
affinity graph over the batch propagates padded features into the transferred feature T.

Complementary learning (§3.3): a 3-layer FC modality discriminator on H (L_ma, Eq. 14),
per-modality projections Θ^m from P to H (L_pa, Eq. 15), per-modality decoders of sub-pixel
convolutions from [P; H] back to the image (Eq. 16, L_re Eq. 17), :mod:`vireid.losses.adversarial`.

Optimisation (§3.4, Eq. 18–21), run by the engine's min-max alternation:

* min step (discriminator and projections fixed): L_min = L_feat + λ1 L_re − λ2 L_ma − λ3 L_pa
  (Eq. 20) with L_feat = L(H) + L(P) + L(T) (Eq. 19) and (Eq. 18)
  L(H) = L_c(H) + 0.5 L_cmT(H), L(P) = 0.5 (L_c(P^R) + L_c(P^I)) + 0.5 L_smT(P),
  L(T) = L_c(T) + 0.25 L_t(T), L_t(T) = L_cmT(T) + L_smT(T) (Eq. 13). With
  ``modality_adversary="confusion"`` the term −λ2 L_ma is replaced by +λ2 L_conf, the domain
  confusion loss (uniform modality target), whose gradient does not vanish once the
  discriminator is certain;
* max step (discriminator and projections only, on detached features): maximise
  L_max = −λ2 L_ma − λ3 L_pa (Eq. 21), i.e. minimise λ2 L_ma + λ3 L_pa (:meth:`SSFTModel.adversary_loss`).

Test time (:meth:`SSFTModel.finalize_features`): ``mode="all"`` runs the SSTN over the whole
query + gallery set of each trial (the paper's main numbers); ``mode="single"`` is Eq. 22 (each
query alone with the gallery, its block column amplified by k); ``mode="shared"`` keeps the plain
shared feature. The graph is a top-k neighbour list, so memory stays O(N·k).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vireid.errors import InputError
from vireid.features import FeatureSet
from vireid.losses import label_smoothed_cross_entropy
from vireid.losses.adversarial import (
    discriminator_accuracy,
    modality_adaptation_loss,
    modality_confusion_loss,
    projection_adversarial_loss,
    reconstruction_loss,
)
from vireid.losses.modality_terms import modality_cross_entropy_terms, modality_triplet_terms
from vireid.models.backbone import TwoStreamBackbone
from vireid.models.base import ReIDModel
from vireid.models.heads import BNNeck, l2_normalize, make_pool
from vireid.models.methods.ssft_transfer import TRANSFER_CONTENTS, SharedSpecificTransfer
from vireid.models.registry import ModelConfig, register_method
from vireid.models.routing import route

TestMode = Literal["all", "single", "shared"]
TEST_MODES: tuple[str, ...] = ("all", "single", "shared")
#: what the SSTN transfers (Table 3: ShT + SpT, ShT only, SpT only) or ``none`` (no SSTN, Table 3 rows 1-5).
CONTENTS: tuple[str, ...] = (*TRANSFER_CONTENTS, "none")
MODALITY_ADVERSARIES: tuple[str, ...] = ("confusion", "literal")
#: extras of a cm-SSFT feature file that the test-time transfer needs (``query_`` / ``gallery_`` prefixed).
TRANSFER_EXTRAS = ("shared", "specific", "modality")


@dataclass
class SSFTParams:
    """cm-SSFT hyper-parameters; the paper's values where it states them (§4.1, Eq. 18)."""

    graph_k: int = 4                        # k of T(·, k) (Eq. 8) and of Eq. 22; §4.1: 4
    single_query_amplify: float | None = None  # Eq. 22's factor of the query's block column; null: graph_k
    transfer_dim: int | None = None         # d' = columns of W (Eq. 10); null: the backbone's channels
    transfer_content: str = "both"          # both | shared | specific | none (Table 3's ShT / SpT columns)
    shared_margin: float = 0.3              # ρ1 of L_cmT (Eq. 4, 13); not stated in the paper (BoT's 0.3)
    specific_margin: float = 0.3            # ρ2 of L_smT (Eq. 3, 13); not stated in the paper (BoT's 0.3)
    shared_triplet_weight: float = 0.5      # Eq. 18: L(H) = L_c(H) + 0.5 L_cmT(H)
    specific_triplet_weight: float = 0.5    # Eq. 18: L(P) = 0.5 (L_c(P^R) + L_c(P^I)) + 0.5 L_smT(P)
    transfer_triplet_weight: float = 0.25   # Eq. 18: L(T) = L_c(T) + 0.25 L_t(T)
    reconstruction_weight: float = 1.0      # λ1 (§4.1)
    modality_weight: float = 0.2            # λ2 (§4.1)
    projection_weight: float = 0.2          # λ3 (§4.1)
    modality_adversary: str = "confusion"   # confusion (uniform target) | literal (−λ2 L_ma of Eq. 20)
    discriminator_hidden: int = 512         # width of the discriminator's hidden layers; not stated
    decoder_channels: int = 64              # §4.1: 4 sub-pixel convolutional layers of 64 channels
    decoder_layers: int = 4
    label_smoothing: float = 0.0            # ε of every identity loss; the paper uses none
    test_mode: TestMode = "all"             # what finalize_features does without a mode option

    def validate(self) -> None:
        if self.graph_k < 1:
            raise InputError(f"model.params.graph_k must be >= 1, got {self.graph_k}")
        if self.transfer_dim is not None and self.transfer_dim < 1:
            raise InputError(f"model.params.transfer_dim must be >= 1 or null, got {self.transfer_dim}")
        if self.single_query_amplify is not None and self.single_query_amplify <= 0:
            raise InputError(f"model.params.single_query_amplify must be > 0 or null, got {self.single_query_amplify}")
        for key in ("shared_margin", "specific_margin", "shared_triplet_weight", "specific_triplet_weight",
                    "transfer_triplet_weight", "reconstruction_weight", "modality_weight", "projection_weight"):
            if getattr(self, key) < 0:
                raise InputError(f"model.params.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("discriminator_hidden", "decoder_channels", "decoder_layers"):
            if getattr(self, key) < 1:
                raise InputError(f"model.params.{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise InputError(f"model.params.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.transfer_content not in CONTENTS:
            raise InputError(f"model.params.transfer_content must be one of {CONTENTS}, got {self.transfer_content!r}")
        if self.modality_adversary not in MODALITY_ADVERSARIES:
            raise InputError(f"model.params.modality_adversary must be one of {MODALITY_ADVERSARIES}, "
                             f"got {self.modality_adversary!r}")
        if self.test_mode not in TEST_MODES:
            raise InputError(f"model.params.test_mode must be one of {TEST_MODES}, got {self.test_mode!r}")
        if self.transfer_content == "none" and self.test_mode != "shared":
            raise InputError("model.params.test_mode must be 'shared' when transfer_content is 'none' (no SSTN)")


def route_by_modality(modules: Sequence[nn.Module], inputs: Tensor, modality: Tensor) -> Any:
    """Apply ``modules[m]`` to the rows of modality m; outputs (a tensor or a tuple) in input order."""
    return route(modules, inputs, modality)


class SharedSpecificBackbone(nn.Module):
    """Conv1^m (modality-specific stages up to ``split``), then Conv2^S (shared) and Conv2^m (specific)."""

    def __init__(self, name: str, split: str, last_stride: int, pretrained: str | None,
                 num_modalities: int = 2) -> None:
        super().__init__()
        self.low = TwoStreamBackbone(name, split=split, last_stride=last_stride, pretrained=pretrained,
                                     num_modalities=num_modalities)
        self.specific = nn.ModuleList(copy.deepcopy(self.low.shared) for _ in range(num_modalities))
        self.out_channels = self.low.out_channels

    def forward(self, images: Tensor, modality: Tensor) -> tuple[Tensor, Tensor]:
        """(shared feature map of Conv2^S, specific feature map of Conv2^m), both (B, C, h, w)."""
        low = self.low.specific(images, modality)
        return self.low.shared(low), route_by_modality(self.specific, low, modality)


class SubPixelDecoder(nn.Module):
    """cm-SSFT reconstruction decoder: ``layers`` sub-pixel convolutions (3×3 conv to 4·c channels,
    pixel shuffle ×2), ``channels`` wide, ReLU between; the last one outputs the 3 image channels."""

    def __init__(self, in_channels: int, channels: int = 64, layers: int = 4) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for i in range(layers):
            last = i == layers - 1
            out = 3 if last else channels
            blocks += [nn.Conv2d(in_channels if i == 0 else channels, 4 * out, 3, padding=1), nn.PixelShuffle(2)]
            if not last:
                blocks.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*blocks)

    def forward(self, feature_map: Tensor) -> Tensor:
        return self.body(feature_map)


def cross_modality_precision(index: Tensor, labels: Tensor, modality: Tensor) -> Tensor:
    """Share of the listed neighbours (``index`` (N, K), ``-1`` pads) of the other modality that have
    the row's identity, over all rows; 0 when no row lists one."""
    valid = index >= 0
    safe = index.clamp(min=0)
    cross = valid & (modality[safe] != modality.unsqueeze(1))
    same = cross & (labels[safe] == labels.unsqueeze(1))
    return same.sum().float() / cross.sum().clamp(min=1).float()


def _resize_to(images: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


class SSFTModel(ReIDModel):
    """Two-stream shared/specific extractor, SSTN, modality discriminator, projections, decoders."""

    def __init__(self, cfg: ModelConfig, params: SSFTParams, num_classes: int) -> None:
        super().__init__()
        self.params = params
        self.backbone = SharedSpecificBackbone(cfg.backbone, cfg.split, cfg.last_stride, cfg.pretrained,
                                               self.num_modalities)
        dim = self.backbone.out_channels
        self.shared_pool = make_pool(cfg.pooling)
        self.specific_pool = make_pool(cfg.pooling)
        self.shared_neck = BNNeck(dim, num_classes)                                        # Feat^S
        self.specific_necks = nn.ModuleList(BNNeck(dim, num_classes) for _ in range(self.num_modalities))  # Feat^m
        self.transfer = (None if params.transfer_content == "none" else
                         SharedSpecificTransfer(dim, params.transfer_dim or dim, num_classes, params.transfer_content))
        hidden = params.discriminator_hidden
        self.discriminator = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
                                           nn.ReLU(inplace=True), nn.Linear(hidden, self.num_modalities))
        self.projections = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(self.num_modalities))
        self.decoders = nn.ModuleList(SubPixelDecoder(2 * dim, params.decoder_channels, params.decoder_layers)
                                      for _ in range(self.num_modalities))

    # ------------------------------------------------------------------ training
    def features(self, images: Tensor, modality: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(shared map, specific map, H, P): the feature maps and their pooled features (Eq. 1)."""
        shared_map, specific_map = self.backbone(images, modality)
        return (shared_map, specific_map, self.shared_pool(shared_map).float(),
                self.specific_pool(specific_map).float())

    def forward(self, images: Tensor, modality: Tensor) -> dict[str, Tensor]:
        shared_map, specific_map, shared, specific = self.features(images, modality)
        if not self.training:
            return {"feat": l2_normalize(self.shared_neck.bn(shared)), "shared": shared, "specific": specific}
        _, shared_logits = self.shared_neck(shared)
        _, specific_logits = route_by_modality(self.specific_necks, specific, modality)
        decoded = route_by_modality(self.decoders, torch.cat([specific_map, shared_map], dim=1), modality)
        outputs = {
            "shared": shared, "specific": specific,
            "shared_logits": shared_logits, "specific_logits": specific_logits,
            "modality_logits": self.discriminator(shared),
            "projected": route_by_modality(self.projections, specific, modality),
            "reconstruction": _resize_to(decoded, tuple(images.shape[-2:])), "images": images,
        }
        if self.transfer is not None:
            transferred, _, transfer_logits, index = self.transfer(shared, specific, modality, self.params.graph_k)
            outputs.update(transferred=transferred, transfer_logits=transfer_logits, neighbour_index=index)
        return outputs

    def feature_loss(self, outputs: dict[str, Tensor], labels: Tensor, modality: Tensor) -> dict[str, Tensor]:
        """cm-SSFT Eq. 18: L(H), L(P) and (with an SSTN) L(T) as named terms.

        L(H) = L_c(H) + w_H L_cmT(H), L(P) = 0.5 (L_c(P^R) + L_c(P^I)) + w_P L_smT(P),
        L(T) = L_c(T) + w_T (L_cmT(T) + L_smT(T)) (Eq. 13); w = 0.5, 0.5, 0.25 in the paper. Triplets
        on the pre-BN features H, P, Z̃ (margins ρ1 cross-modality, ρ2 single-modality); identity
        losses on the BNNeck logits."""
        p = self.params

        def ce(logits: Tensor) -> Tensor:
            return label_smoothed_cross_entropy(logits, labels, p.label_smoothing)

        def triplet(name: str, pairs: Literal["cross", "intra"], margin: float) -> Tensor:
            return modality_triplet_terms(outputs[name], labels, modality, pairs, margin).sum()

        terms = {
            "shared": ce(outputs["shared_logits"]) + p.shared_triplet_weight * triplet("shared", "cross", p.shared_margin),
            "specific": 0.5 * modality_cross_entropy_terms(outputs["specific_logits"], labels, modality,
                                                           p.label_smoothing).sum()
            + p.specific_triplet_weight * triplet("specific", "intra", p.specific_margin),
        }
        if "transferred" in outputs:
            transfer_triplet = (triplet("transferred", "cross", p.shared_margin)
                                + triplet("transferred", "intra", p.specific_margin))
            terms["transfer"] = ce(outputs["transfer_logits"]) + p.transfer_triplet_weight * transfer_triplet
        return terms

    def compute_loss(self, outputs: dict[str, Tensor], labels: Tensor,
                     modality: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """cm-SSFT Eq. 20: L_min = L_feat + λ1 L_re − λ2 L_ma − λ3 L_pa (Eq. 19 and 18 for L_feat); with
        ``modality_adversary="confusion"`` the modality term is +λ2 L_conf instead of −λ2 L_ma.

        Besides the loss terms, the logs hold ``disc_acc`` (the discriminator's accuracy on this
        batch's H), ``adv_grad_h`` / ``id_grad_h`` (norms of the gradients that the modality term and
        L_c(H) send to H) and, with an SSTN, ``neighbour_precision`` (share of the cross-modality
        neighbours kept by T(·, k) that have the anchor's identity)."""
        p = self.params
        terms = self.feature_loss(outputs, labels, modality)
        feat = sum(terms.values())
        terms["re"] = reconstruction_loss(outputs["reconstruction"], outputs["images"])
        terms["ma"] = modality_adaptation_loss(outputs["modality_logits"], modality)
        terms["pa"] = projection_adversarial_loss(outputs["projected"], outputs["shared"])
        if p.modality_adversary == "literal":
            modality_term = -p.modality_weight * terms["ma"]
        else:
            terms["conf"] = modality_confusion_loss(outputs["modality_logits"])
            modality_term = p.modality_weight * terms["conf"]
        total = feat + p.reconstruction_weight * terms["re"] + modality_term - p.projection_weight * terms["pa"]
        logs = {k: v.detach() for k, v in terms.items()}
        logs["disc_acc"] = discriminator_accuracy(outputs["modality_logits"].detach(), modality)
        if "neighbour_index" in outputs:
            logs["neighbour_precision"] = cross_modality_precision(outputs["neighbour_index"], labels, modality)
        shared = outputs["shared"]
        if torch.is_grad_enabled() and shared.requires_grad:
            identity = label_smoothed_cross_entropy(outputs["shared_logits"], labels, p.label_smoothing)
            for name, term in (("adv_grad_h", modality_term), ("id_grad_h", identity)):
                (grad,) = torch.autograd.grad(term, shared, retain_graph=True)
                logs[name] = grad.norm()
        return total, logs

    def adversary_parameters(self) -> list[nn.Parameter]:
        """The modality discriminator and the projections Θ^m: updated only in the max step."""
        return [*self.discriminator.parameters(), *self.projections.parameters()]

    def adversary_loss(self, outputs: dict[str, Tensor], labels: Tensor, modality: Tensor) -> Tensor:
        """cm-SSFT Eq. 21: maximise −λ2 L_ma − λ3 L_pa over discriminator and projections, i.e. minimise
        λ2 L_ma + λ3 L_pa on detached features (the network's parameters get no gradient). The same
        in both ``modality_adversary`` forms: the discriminator always learns to classify the modality."""
        p = self.params
        shared, specific = outputs["shared"].detach(), outputs["specific"].detach()
        projected = route_by_modality(self.projections, specific, modality)
        return (p.modality_weight * modality_adaptation_loss(self.discriminator(shared), modality)
                + p.projection_weight * projection_adversarial_loss(projected, shared))

    # ------------------------------------------------------------------ test time
    def extract(self, images: Tensor, modality: Tensor) -> dict[str, Tensor]:
        """``feat``: the plain shared feature (L2-normalised Feat^S BN feature); ``shared`` H,
        ``specific`` P and ``modality`` for the test-time transfer (:meth:`finalize_features`)."""
        out = self(images, modality)
        return {**out, "modality": modality.float()}

    @torch.no_grad()
    def reconstruct(self, images: Tensor, modality: Tensor) -> dict[str, Tensor]:
        """Decoder outputs from [P; H] (``full``), [0; H] (``shared``) and [P; 0] (``specific``),
        like the paper's Fig. 3."""
        shared_map, specific_map, _, _ = self.features(images, modality)
        size = tuple(images.shape[-2:])
        inputs = {"full": (specific_map, shared_map), "shared": (torch.zeros_like(specific_map), shared_map),
                  "specific": (specific_map, torch.zeros_like(shared_map))}
        return {name: _resize_to(route_by_modality(self.decoders, torch.cat(pair, dim=1), modality), size)
                for name, pair in inputs.items()}

    def transfer_distance(self, features: FeatureSet, mode: TestMode | None = None, k: int | None = None,
                          amplify: float | None = None, knn: str = "auto") -> np.ndarray:
        """The (Q, G) distance of one trial after the test-time transfer (−<T_q, T_g>; smaller is closer)."""
        mode, k, amplify = self._test_options(mode, k, amplify)
        if mode == "shared":
            q, g = (l2_normalize(torch.from_numpy(features.query_feat).float()),
                    l2_normalize(torch.from_numpy(features.gallery_feat).float()))
            return (-(q @ g.t())).numpy()
        assert self.transfer is not None  # _test_options refuses the SSTN modes without one
        query, gallery = _transfer_inputs(features, "query"), _transfer_inputs(features, "gallery")
        if mode == "single":
            return self.transfer.single_query_distance(query, gallery, k, amplify, knn).numpy()
        transferred = self._transfer_all(query, gallery, k, knn)
        q, g = transferred[: len(features.query_id)], transferred[len(features.query_id):]
        return (-(q @ g.t())).numpy()

    def finalize_features(self, features: FeatureSet, **options: Any) -> FeatureSet:
        """Test-time transfer of every trial. Options: ``mode`` (all | single | shared; default
        ``params.test_mode``), ``k`` (default ``params.graph_k``), ``amplify`` (single mode, default
        ``params.single_query_amplify``, else k as in Eq. 22), ``knn`` (auto | exact | ivf | hnsw).

        ``all``: ``query_feat`` / ``gallery_feat`` become the transferred features T. Each trial has
        its own graph, so a file with trials gets one block of rows per trial (the trial indices
        point at them; per-row extras are repeated alike). ``single``: the features stay the plain
        shared ones and ``ranked_index`` / ``ranked_dist`` (rows of the output file's gallery, whole
        trial gallery, best first, ``-1`` pads) hold Eq. 22's ranking, for ``vireid evaluate --ranked``.
        The transfer's inputs (``*_shared``, ``*_specific``, ``*_modality``) are consumed: the
        output does not repeat them per trial.
        """
        unknown = sorted(set(options) - {"mode", "k", "amplify", "knn"})
        if unknown:
            raise InputError(f"cm-SSFT finalize options: unknown {', '.join(unknown)} (mode, k, amplify, knn)")
        mode, k, amplify = self._test_options(options.get("mode"), options.get("k"), options.get("amplify"))
        knn = str(options.get("knn", "auto"))
        if mode == "shared":
            return features
        for side in ("query", "gallery"):
            _transfer_inputs(features, side)
        was_training = self.training
        self.eval()
        try:
            out = _expand_trials(features)
            if mode == "all":
                out.query_feat, out.gallery_feat = self._transfer_trials(out, k, knn)
            else:
                out.extras["ranked_index"], out.extras["ranked_dist"] = self._rank_trials(out, k, amplify, knn)
        finally:
            self.train(was_training)
        for side in ("query", "gallery"):
            for name in TRANSFER_EXTRAS:
                del out.extras[f"{side}_{name}"]
        out.meta = {**out.meta, "ssft": {"mode": mode, "k": k, "amplify": amplify, "knn": knn}}
        return out

    def _test_options(self, mode: Any, k: Any, amplify: Any) -> tuple[TestMode, int, float]:
        mode = self.params.test_mode if mode is None else str(mode)
        if mode not in TEST_MODES:
            raise InputError(f"cm-SSFT test mode must be one of {TEST_MODES}, got {mode!r}")
        if mode != "shared" and self.transfer is None:
            raise InputError(f"cm-SSFT test mode {mode!r} needs the SSTN, but this model was trained with "
                             "transfer_content=none: use mode=shared")
        try:
            k = self.params.graph_k if k is None else int(k)
            amplify = self.params.single_query_amplify if amplify is None else float(amplify)
            amplify = float(k) if amplify is None else amplify     # Eq. 22 amplifies by the graph's k
        except (TypeError, ValueError):
            raise InputError(f"cm-SSFT options: k must be an integer and amplify a number (got k={k!r}, "
                             f"amplify={amplify!r})") from None
        if k < 1 or amplify <= 0:
            raise InputError(f"cm-SSFT options: k must be >= 1 and amplify > 0 (got k={k}, amplify={amplify})")
        return mode, k, amplify  # type: ignore[return-value]

    @torch.no_grad()
    def _transfer_all(self, query: tuple[Tensor, Tensor, Tensor], gallery: tuple[Tensor, Tensor, Tensor],
                      k: int, knn: str) -> Tensor:
        shared, specific, modality = (torch.cat([q, g]) for q, g in zip(query, gallery))
        assert self.transfer is not None
        return self.transfer.transfer_all(shared, specific, modality, k, knn)

    def _transfer_trials(self, features: FeatureSet, k: int, knn: str) -> tuple[np.ndarray, np.ndarray]:
        """All-queries mode per trial; the rows of different trials are disjoint (see :func:`_expand_trials`)."""
        assert self.transfer is not None
        query_feat = np.zeros((len(features.query_id), self.transfer.projection.out_features), dtype=np.float32)
        gallery_feat = np.zeros((len(features.gallery_id), query_feat.shape[1]), dtype=np.float32)
        for t in range(features.num_trials):
            q_rows, g_rows = features.trial_rows(t)
            trial = features.trial(t)
            out = self._transfer_all(_transfer_inputs(trial, "query"), _transfer_inputs(trial, "gallery"), k, knn)
            query_feat[q_rows], gallery_feat[g_rows] = out[: len(q_rows)].numpy(), out[len(q_rows):].numpy()
        return query_feat, gallery_feat

    def _rank_trials(self, features: FeatureSet, k: int, amplify: float, knn: str) -> tuple[np.ndarray, np.ndarray]:
        """Single-query mode per trial: full rankings of the trial's gallery rows."""
        width = max(len(features.trial_rows(t)[1]) for t in range(features.num_trials))
        ranked_index = np.full((len(features.query_id), width), -1, dtype=np.int64)
        ranked_dist = np.full((len(features.query_id), width), np.inf, dtype=np.float32)
        for t in range(features.num_trials):
            q_rows, g_rows = features.trial_rows(t)
            dist = self.transfer_distance(features.trial(t), "single", k, amplify, knn)
            order = np.argsort(dist, axis=1, kind="stable")
            ranked_index[q_rows, : len(g_rows)] = g_rows[order]
            ranked_dist[q_rows, : len(g_rows)] = np.take_along_axis(dist, order, axis=1)
        return ranked_index, ranked_dist


def _transfer_inputs(features: FeatureSet, side: str) -> tuple[Tensor, Tensor, Tensor]:
    """(shared, specific, modality) tensors of one side of a cm-SSFT feature file."""
    keys = [f"{side}_{name}" for name in TRANSFER_EXTRAS]
    missing = [key for key in keys if key not in features.extras]
    if missing:
        raise InputError(f"cm-SSFT test-time transfer needs key(s) {', '.join(missing)} in the feature file "
                         "(extract it with a cm-SSFT checkpoint)")
    rows = len(features.query_id if side == "query" else features.gallery_id)
    shared, specific, modality = (features.extras[key] for key in keys)
    for key, arr in zip(keys, (shared, specific, modality)):
        if arr.shape[0] != rows:
            raise InputError(f"key {key} has {arr.shape[0]} rows but the file has {rows} {side} rows")
    if not np.isin(modality, (0, 1)).all():
        raise InputError(f"key {side}_modality must hold 0 (visible) or 1 (infrared)")
    return (torch.from_numpy(np.asarray(shared, dtype=np.float32)),
            torch.from_numpy(np.asarray(specific, dtype=np.float32)),
            torch.from_numpy(np.asarray(modality).astype(np.int64)))


def _expand_trials(features: FeatureSet) -> FeatureSet:
    """A copy in which every trial owns its own query and gallery rows (a file without trial
    indices is copied as is): row blocks in trial order, trial indices pointing at them, per-row
    extras repeated alike."""
    if features.trial_query_index is None and features.trial_gallery_index is None:
        return FeatureSet(features.query_feat, features.gallery_feat, features.query_id, features.gallery_id,
                          features.query_cam, features.gallery_cam, extras=dict(features.extras),
                          meta=dict(features.meta))
    rows = [features.trial_rows(t) for t in range(features.num_trials)]
    return features.select_rows(
        np.concatenate([q for q, _ in rows]), np.concatenate([g for _, g in rows]),
        trial_query_index=_block_index([len(q) for q, _ in rows]),
        trial_gallery_index=_block_index([len(g) for _, g in rows]))


def _block_index(sizes: list[int]) -> np.ndarray:
    index = np.full((len(sizes), max(sizes)), -1, dtype=np.int64)
    start = 0
    for t, size in enumerate(sizes):
        index[t, :size] = np.arange(start, start + size)
        start += size
    return index


def ssft_distance(model: SSFTModel, mode: TestMode = "all", **options: Any) -> Callable[[FeatureSet], np.ndarray]:
    """A per-trial distance function (for :func:`vireid.evaluation.evaluator.evaluate_features`)."""
    return lambda trial: model.eval().transfer_distance(trial, mode, **options)


@register_method("ssft", SSFTParams)
def build_ssft(cfg: ModelConfig, params: SSFTParams, num_classes: int) -> ReIDModel:
    return SSFTModel(cfg, params, num_classes)
