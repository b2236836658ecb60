"""cm-SSFT (Lu et al., "Cross-Modality Person Re-Identification with Shared-Specific Feature
Transfer", CVPR 2020).

Feature extractor (§3.1): Conv1^m (modality-specific stem + layer1 + layer2) feeds a shared
stream Conv2^S + Feat^S giving the shared feature H^m and a modality-specific stream Conv2^m +
Feat^m giving the specific feature P^m (Conv2 = layer3 + layer4, last stride 1; Feat = pooling +
BNNeck). ``ModelConfig.split`` names the last Conv1 stage (``layer2`` in the paper).

Shared-specific transfer (§3.2, :mod:`vireid.models.methods.ssft_transfer`): the top-k affinity
graph over the batch propagates padded features into the transferred feature T.

Complementary learning (§3.3): a 3-layer FC modality discriminator on H (L_ma), per-modality
projections Θ^m from P to H (L_pa), per-modality decoders of sub-pixel convolutions from [P; H]
back to the image (L_re), :mod:`vireid.losses.adversarial`.

Optimisation (§3.4, Eq. 20–21), run by the engine's min-max alternation:

* min step (network, discriminator and projections fixed):
  L_min = L_feat + λ1 L_re − λ2 L_ma − λ3 L_pa, with
  L_feat = w_H L(H) + w_P L(P) + w_T L(T) (Eq. 18), L(H) = L_c(H) + L_t^cross(H; ρ1),
  L(P) = L_c(P) + L_t^intra(P; ρ2), L(T) = L_c(T) + 0.25 (L_t^cross(T; ρ1) + L_t^intra(T; ρ2)) (Eq. 13);
* max step (discriminator and projections only, on detached features): maximise
  L_max = −λ2 L_ma − λ3 L_pa, i.e. minimise λ2 L_ma + λ3 L_pa (:meth:`SSFTModel.adversary_loss`).

Test time (:meth:`SSFTModel.finalize_features`): ``mode="all"`` runs the SSTN over the whole
query + gallery set of each trial (the paper's main numbers); ``mode="single"`` is Eq. 22 (each
query alone with the gallery, its block amplified by k); ``mode="shared"`` keeps the plain shared
feature. The graph is a top-k neighbour list, so memory stays O(N·k).
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
from vireid.losses import batch_hard_triplet_loss, label_smoothed_cross_entropy
from vireid.losses.adversarial import (
    modality_adaptation_loss,
    projection_adversarial_loss,
    reconstruction_loss,
)
from vireid.models.backbone import TwoStreamBackbone
from vireid.models.base import ReIDModel
from vireid.models.heads import BNNeck, l2_normalize, make_pool
from vireid.models.methods.ssft_transfer import SharedSpecificTransfer
from vireid.models.registry import ModelConfig, register_method
from vireid.models.routing import route

TestMode = Literal["all", "single", "shared"]
TEST_MODES: tuple[str, ...] = ("all", "single", "shared")
#: extras of a cm-SSFT feature file that the test-time transfer needs (``query_`` / ``gallery_`` prefixed).
TRANSFER_EXTRAS = ("shared", "specific", "modality")


@dataclass
class SSFTParams:
    """cm-SSFT hyper-parameters (paper values where the paper gives them)."""

    graph_k: int = 4                        # k of T(·, k): neighbours kept per row and modality block
    single_query_amplify: float = 4.0       # Eq. 22: factor of the query's block column
    transfer_dim: int | None = None         # d' = columns of W (Eq. 9); null: the backbone's channels
    shared_margin: float = 0.3              # ρ1, cross-modality triplet margin
    specific_margin: float = 0.3            # ρ2, single-modality triplet margin
    transfer_triplet_weight: float = 0.25   # Eq. 13
    shared_weight: float = 1.0              # Eq. 18 weights of L(H), L(P), L(T)
    specific_weight: float = 1.0
    transfer_weight: float = 1.0
    reconstruction_weight: float = 1.0      # λ1
    modality_weight: float = 0.2            # λ2
    projection_weight: float = 0.2          # λ3
    discriminator_hidden: int = 512
    decoder_channels: int = 64
    decoder_layers: int = 4
    label_smoothing: float = 0.0
    test_mode: TestMode = "all"             # what finalize_features does without a mode option

    def validate(self) -> None:
        if self.graph_k < 1:
            raise InputError(f"model.params.graph_k must be >= 1, got {self.graph_k}")
        if self.transfer_dim is not None and self.transfer_dim < 1:
            raise InputError(f"model.params.transfer_dim must be >= 1 or null, got {self.transfer_dim}")
        for key in ("single_query_amplify", "shared_margin", "specific_margin", "transfer_triplet_weight",
                    "shared_weight", "specific_weight", "transfer_weight", "reconstruction_weight",
                    "modality_weight", "projection_weight"):
            if getattr(self, key) < 0:
                raise InputError(f"model.params.{key} must be >= 0, got {getattr(self, key)}")
        if self.single_query_amplify == 0:
            raise InputError("model.params.single_query_amplify must be > 0")
        for key in ("discriminator_hidden", "decoder_channels", "decoder_layers"):
            if getattr(self, key) < 1:
                raise InputError(f"model.params.{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise InputError(f"model.params.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.test_mode not in TEST_MODES:
            raise InputError(f"model.params.test_mode must be one of {TEST_MODES}, got {self.test_mode!r}")


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
        if len(self.low.shared) == 0:
            raise InputError(f"model.split: cm-SSFT needs stages after {split!r} for its two Conv2 streams "
                             "(the paper splits after layer2)")
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
        self.transfer = SharedSpecificTransfer(dim, params.transfer_dim or dim, num_classes)
        hidden = params.discriminator_hidden
        self.discriminator = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
                                           nn.ReLU(inplace=True), nn.Linear(hidden, self.num_modalities))
        self.projections = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(self.num_modalities))
        self.decoders = nn.ModuleList(SubPixelDecoder(2 * dim, params.decoder_channels, params.decoder_layers)
                                      for _ in range(self.num_modalities))

    # ------------------------------------------------------------------ training
    def features(self, images: Tensor, modality: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(shared map, specific map, H, P): the feature maps and their pooled features."""
        shared_map, specific_map = self.backbone(images, modality)
        return (shared_map, specific_map, self.shared_pool(shared_map).float(),
                self.specific_pool(specific_map).float())

    def forward(self, images: Tensor, modality: Tensor) -> dict[str, Tensor]:
        shared_map, specific_map, shared, specific = self.features(images, modality)
        if not self.training:
            return {"feat": l2_normalize(self.shared_neck.bn(shared)), "shared": shared, "specific": specific}
        _, shared_logits = self.shared_neck(shared)
        _, specific_logits = route_by_modality(self.specific_necks, specific, modality)
        transferred, _, transfer_logits = self.transfer(shared, specific, modality, self.params.graph_k)
        decoded = route_by_modality(self.decoders, torch.cat([specific_map, shared_map], dim=1), modality)
        return {
            "shared": shared, "specific": specific, "transferred": transferred,
            "shared_logits": shared_logits, "specific_logits": specific_logits, "transfer_logits": transfer_logits,
            "modality_logits": self.discriminator(shared),
            "projected": route_by_modality(self.projections, specific, modality),
            "reconstruction": _resize_to(decoded, tuple(images.shape[-2:])), "images": images,
        }

    def feature_loss(self, outputs: dict[str, Tensor], labels: Tensor, modality: Tensor) -> dict[str, Tensor]:
        """cm-SSFT L(H), L(P), L(T) (Eq. 13 for T) as named terms."""
        p = self.params

        def ce(logits: Tensor) -> Tensor:
            return label_smoothed_cross_entropy(logits, labels, p.label_smoothing)

        transfer_triplet = (batch_hard_triplet_loss(outputs["transferred"], labels, modality, "cross", p.shared_margin)
                            + batch_hard_triplet_loss(outputs["transferred"], labels, modality, "intra",
                                                      p.specific_margin))
        return {
            "shared": ce(outputs["shared_logits"])
            + batch_hard_triplet_loss(outputs["shared"], labels, modality, "cross", p.shared_margin),
            "specific": ce(outputs["specific_logits"])
            + batch_hard_triplet_loss(outputs["specific"], labels, modality, "intra", p.specific_margin),
            "transfer": ce(outputs["transfer_logits"]) + p.transfer_triplet_weight * transfer_triplet,
        }

    def compute_loss(self, outputs: dict[str, Tensor], labels: Tensor,
                     modality: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """cm-SSFT Eq. 20: L_min = L_feat + λ1 L_re − λ2 L_ma − λ3 L_pa (Eq. 18 for L_feat)."""
        p = self.params
        terms = self.feature_loss(outputs, labels, modality)
        feat = (p.shared_weight * terms["shared"] + p.specific_weight * terms["specific"]
                + p.transfer_weight * terms["transfer"])
        terms["re"] = reconstruction_loss(outputs["reconstruction"], outputs["images"])
        terms["ma"] = modality_adaptation_loss(outputs["modality_logits"], modality)
        terms["pa"] = projection_adversarial_loss(outputs["projected"], outputs["shared"])
        total = (feat + p.reconstruction_weight * terms["re"] - p.modality_weight * terms["ma"]
                 - p.projection_weight * terms["pa"])
        return total, {k: v.detach() for k, v in terms.items()}

    def adversary_parameters(self) -> list[nn.Parameter]:
        """The modality discriminator and the projections Θ^m: updated only in the max step."""
        return [*self.discriminator.parameters(), *self.projections.parameters()]

    def adversary_loss(self, outputs: dict[str, Tensor], labels: Tensor, modality: Tensor) -> Tensor:
        """cm-SSFT Eq. 21: maximise −λ2 L_ma − λ3 L_pa over discriminator and projections, i.e. minimise
        λ2 L_ma + λ3 L_pa on detached features (the network's parameters get no gradient)."""
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
        query, gallery = _transfer_inputs(features, "query"), _transfer_inputs(features, "gallery")
        if mode == "single":
            return self.transfer.single_query_distance(query, gallery, k, amplify, knn).numpy()
        transferred = self._transfer_all(query, gallery, k, knn)
        q, g = transferred[: len(features.query_id)], transferred[len(features.query_id):]
        return (-(q @ g.t())).numpy()

    def finalize_features(self, features: FeatureSet, **options: Any) -> FeatureSet:
        """Test-time transfer of every trial. Options: ``mode`` (all | single | shared; default
        ``params.test_mode``), ``k`` (default ``params.graph_k``), ``amplify`` (single mode, default
        ``params.single_query_amplify``), ``knn`` (auto | exact | ivf | hnsw).

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
        try:
            k = self.params.graph_k if k is None else int(k)
            amplify = self.params.single_query_amplify if amplify is None else float(amplify)
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
        return self.transfer.transfer_all(shared, specific, modality, k, knn)

    def _transfer_trials(self, features: FeatureSet, k: int, knn: str) -> tuple[np.ndarray, np.ndarray]:
        """All-queries mode per trial; the rows of different trials are disjoint (see :func:`_expand_trials`)."""
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
