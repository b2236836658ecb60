"""Identity (classification) losses."""

from __future__ import annotations

from torch import Tensor


def label_smoothed_cross_entropy(logits: Tensor, labels: Tensor, epsilon: float = 0.1) -> Tensor:
    """Label-smoothed identity loss (Szegedy et al. 2016; BoT Eq. 2), mean over the batch.

    q_i = 1 - eps + eps/K for the true class, eps/K otherwise; loss = -sum_i q_i log p_i.
    ``epsilon = 0`` is the plain cross-entropy.
    """
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
    log_probs = logits.float().log_softmax(dim=1)
    nll = -log_probs.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    uniform = -log_probs.mean(dim=1)
    return ((1.0 - epsilon) * nll + epsilon * uniform).mean()
