"""The interface every method model implements, so the engine never changes for a new method.

Training step, as the engine runs it::

    outputs = model(images, modality)                      # train mode
    loss, logs = model.compute_loss(outputs, labels, modality)
    loss.backward(); optimizer.step()
    if model.adversary_parameters():                       # min-max methods (cm-SSFT)
        adv = model.adversary_loss(outputs, labels, modality)  # uses detached inputs
        adv.backward(); adversary_optimizer.step()

How the engine (``vireid.engine.trainer``) treats a model: ``forward`` runs through the DDP
wrapper, ``compute_loss`` / ``adversary_loss`` on the unwrapped model; parameters under a
``backbone`` attribute train at ``optim.lr * optim.backbone_lr_factor``, the rest at
``optim.lr``; adversary parameters get their own optimiser (``optim.adversary_lr``) and, under
DDP, are left out of DDP's reducer (the engine averages their gradients across ranks).

Extraction (eval mode): ``model.extract(images, modality)`` returns at least ``"feat"``
(B, d); extra entries become extra arrays of the feature file (``query_<name>`` /
``gallery_<name>``). After all images are extracted, ``model.finalize_features`` may
transform the whole :class:`~vireid.features.FeatureSet` (cm-SSFT's test-time transfer).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from vireid.features import FeatureSet


class ReIDModel(nn.Module):
    """Base class of method models (see module docstring for the contract)."""

    #: modality indices this model's streams accept (XIV adds a third, X).
    num_modalities: int = 2

    def forward(self, images: Tensor, modality: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute_loss(self, outputs: dict[str, Tensor], labels: Tensor, modality: Tensor) -> tuple[Tensor, dict[str, Tensor]]:  # pragma: no cover - abstract
        """Total loss and a dict of named loss terms (detached scalars) for logging."""
        raise NotImplementedError

    def extract(self, images: Tensor, modality: Tensor) -> dict[str, Tensor]:
        """Test-time features; default: the eval-mode ``forward``'s ``"feat"``."""
        return {"feat": self(images, modality)["feat"]}

    def adversary_parameters(self) -> list[nn.Parameter]:
        """Parameters updated only in the maximisation step (none for most methods)."""
        return []

    def adversary_loss(self, outputs: dict[str, Tensor], labels: Tensor, modality: Tensor) -> Tensor:  # pragma: no cover - only min-max methods
        raise NotImplementedError

    def finalize_features(self, features: FeatureSet, **options: Any) -> FeatureSet:
        """Post-extraction transform of the whole feature set; default: unchanged."""
        return features
