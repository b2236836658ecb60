"""cm-SSFT's complementary-learning losses (Lu et al., "Cross-Modality Person Re-Identification
with Shared-Specific Feature Transfer", CVPR 2020, §3.3, Eq. 14–17).

Pure functions of tensors; which side minimises or maximises each term is decided by the
caller (the model's min step, Eq. 20, and the adversary's max step, Eq. 21).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def modality_adaptation_loss(modality_logits: Tensor, modality: Tensor) -> Tensor:
    """cm-SSFT Eq. 14: L_ma = E[−log p(m | H, Θ_D)], the modality discriminator's cross-entropy on
    the shared features, mean over the batch."""
    return F.cross_entropy(modality_logits.float(), modality.long())


def modality_confusion_loss(modality_logits: Tensor) -> Tensor:
    """Domain confusion (Tzeng et al., "Simultaneous Deep Transfer Across Domains and Tasks", ICCV 2015):
    E[−(1/M) Σ_m log p(m | H, Θ_D)], the cross-entropy of the discriminator's prediction against
    the uniform distribution over the M modalities, mean over the batch.

    Minimised by the feature extractor in place of maximising L_ma (Eq. 14): its minimum is a
    discriminator that cannot tell the modalities apart, and, unlike −L_ma, its gradient does not
    vanish when the discriminator is certain."""
    return -modality_logits.float().log_softmax(dim=1).mean(dim=1).mean()


def discriminator_accuracy(modality_logits: Tensor, modality: Tensor) -> Tensor:
    """Share of the batch whose modality the discriminator predicts correctly (arg-max), a scalar."""
    return (modality_logits.argmax(dim=1) == modality.long()).float().mean()


def projection_adversarial_loss(projected_specific: Tensor, shared: Tensor) -> Tensor:
    """cm-SSFT Eq. 15: L_pa = E ||Θ^m P − H||_2, the mean Euclidean distance between the projected
    specific feature Θ^m P and the shared feature H of the same image."""
    return (projected_specific.float() - shared.float()).norm(p=2, dim=1).mean()


def reconstruction_loss(reconstruction: Tensor, images: Tensor) -> Tensor:
    """cm-SSFT Eq. 17: L_re = E[L2(X, X̂)], read as the mean squared error between the decoder's
    reconstruction X̂ (Eq. 16) and the input image X, per pixel and channel."""
    return F.mse_loss(reconstruction.float(), images.float())
