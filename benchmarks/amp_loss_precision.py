"""How accurately the triplet losses see distances between realistic 2048-d features under AMP.

Features like ResNet-50's pooled ones (positive, per-channel mean ~0.5, norm ~28; 2 identities x
(2 visible + 2 infrared), nearby identity centres so the margin is active; images 0 and 1 exactly
0.448 apart). Compared with float64: the distance d(0, 1), the batch-hard triplet loss (margin 0.3)
and AGW's weighted regularised triplet loss, computed

* before: inside bf16 autocast with ``sqrt(|x|^2 + |y|^2 - 2 x.y)`` (the matrix product in bf16);
* float32, unshifted: the same formula in float32 (what autocast-free code computed before);
* after: as the trainer computes losses now -- outside autocast, in float32, features shifted by
  the batch mean first (``vireid.losses.pairwise_euclidean``).

    python benchmarks/amp_loss_precision.py [--seeds 5]
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
from torch import Tensor

from vireid.losses import batch_hard_triplet_loss, triplet, weighted_regularized_triplet_loss


def features(seed: int, distance: float = 0.448) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def unit(*shape: int) -> Tensor:
        v = torch.randn(*shape, generator=gen)
        return v / v.norm(dim=-1, keepdim=True)

    base = torch.randn(2048, generator=gen).abs() * 0.6 + 0.05
    feats = (base + 0.3 * unit(2, 2048)).repeat_interleave(4, dim=0) + 0.25 * unit(8, 2048)
    feats[1] = feats[0] + distance * unit(2048)
    return feats, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def unshifted(x: Tensor, y: Tensor | None = None, eps: float = 1e-12) -> Tensor:
    y = x if y is None else y
    x, y = x.float(), y.float()
    sq = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * x @ y.t()
    return sq.clamp(min=eps).sqrt()


def measure(feats: Tensor, labels: Tensor) -> dict[str, tuple[float, float, float]]:
    """(d01, batch-hard, weighted) per way of computing them."""

    def values(distance_fn) -> tuple[float, float, float]:  # noqa: ANN001
        with mock.patch.object(triplet, "pairwise_euclidean", distance_fn):
            return (distance_fn(feats)[0, 1].item(), batch_hard_triplet_loss(feats, labels, margin=0.3).item(),
                    weighted_regularized_triplet_loss(feats, labels).item())

    exact = (torch.cdist(feats.double(), feats.double())[0, 1].item(),
             batch_hard_triplet_loss(feats.double(), labels, margin=0.3).item(),
             weighted_regularized_triplet_loss(feats.double(), labels).item())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = values(unshifted)
    return {"float64": exact, "before (bf16 autocast)": before, "float32, unshifted": values(unshifted),
            "after (float32, shifted)": values(triplet.pairwise_euclidean)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    worst: dict[str, list[float]] = {}
    print(f"{'seed':<5} {'computation':<26} {'d(0,1)':>9} {'batch-hard':>11} {'weighted':>9}")
    for seed in range(args.seeds):
        feats, labels = features(seed)
        rows = measure(feats, labels)
        exact = rows["float64"]
        for name, row in rows.items():
            print(f"{seed:<5} {name:<26} {row[0]:>9.5f} {row[1]:>11.5f} {row[2]:>9.5f}")
            errors = [abs(a - b) for a, b in zip(row, exact)]
            worst[name] = [max(a, b) for a, b in zip(worst.get(name, [0.0] * 3), errors)]
    print(f"\nlargest absolute error over {args.seeds} seeds (d(0,1), batch-hard, weighted):")
    for name, errors in worst.items():
        if name != "float64":
            print(f"  {name:<26} {errors[0]:.2e}  {errors[1]:.2e}  {errors[2]:.2e}")


if __name__ == "__main__":
    main()
