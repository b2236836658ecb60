"""cm-SSFT's complementary-learning losses (Lu et al., "Cross-Modality Person Re-Identification
with Shared-Specific Feature Transfer", CVPR 2020, §3.3).

Pure functions of tensors; which side minimises or maximises each term is decided by the
caller (the model's min step subtracts ``L_ma`` and ``L_pa``, the adversary step adds them).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def modality_adaptation_loss(modality_logits: Tensor, modality: Tensor) -> Tensor:
    """cm-SSFT L_ma: cross-entropy of the modality discriminator on shared features, mean over the batch."""
    return F.cross_entropy(modality_logits.float(), modality.long())


def projection_adversarial_loss(projected_specific: Tensor, shared: Tensor) -> Tensor:
    """cm-SSFT L_pa = E ||Θ^m P − H||_2: mean Euclidean distance between the projected specific
    feature Θ^m P and the shared feature H of the same image."""
    return (projected_specific.float() - shared.float()).norm(p=2, dim=1).mean()


def reconstruction_loss(reconstruction: Tensor, images: Tensor) -> Tensor:
    """cm-SSFT L_re: mean squared (L2) error between the decoder's reconstruction and the input image."""
    return F.mse_loss(reconstruction.float(), images.float())
