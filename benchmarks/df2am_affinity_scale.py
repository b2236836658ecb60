"""Scale of DF2AM's affinity loss at initialisation: Eq. 12 summed over the (2K*)^2 pairs vs. averaged.

Builds the paper's DF2AM (ResNet-50 at random initialisation, GAP, 395 identities as SYSU-MM01) and one
batch of 8 identities x (4 visible + 4 infrared) random 256x128 images, and prints each loss term and
the gradient norm that L_A (summed) and L_BH put on the global features. It justifies the default
``affinity_reduction: mean`` (docs/methods/df2am.md).

Run: ``python benchmarks/df2am_affinity_scale.py [--seed 0]``
"""

from __future__ import annotations

import argparse

import torch

from vireid.losses.affinity import affinity_loss
from vireid.models import ModelConfig
from vireid.models.methods.df2am import baseline_loss
from vireid.models.registry import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = create_model(ModelConfig(method="df2am", backbone="resnet50", pooling="avg", pretrained=None), 395)
    labels = torch.arange(8).repeat_interleave(8)
    modality = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]).repeat(8)
    out = model(torch.randn(64, 3, 256, 128), modality)
    _, logs = model.compute_loss(out, labels, modality)
    params = model.params
    feat = out["feat"].detach().requires_grad_(True)
    summed = affinity_loss(feat, labels, params.affinity_loss, params.affinity_margin, "sum")
    grad_summed = torch.autograd.grad(summed, feat)[0].norm()
    feat = out["feat"].detach().requires_grad_(True)
    _, triplet = baseline_loss(out["logits"].detach(), feat, labels, modality, params)
    grad_triplet = torch.autograd.grad(triplet, feat)[0].norm()
    print(f"L_B (identity + L_BH, both modalities): {(logs['id'] + logs['tri']).item():.3f}")
    print(f"L_D: {logs['fusion'].item():.3f}")
    print(f"L_A, mean over the 4096 pairs: {logs['affinity'].item():.3f}")
    print(f"L_A, sum over the 4096 pairs (Eq. 12 as written): {summed.item():.1f}")
    print(f"gradient norm on f_g: L_A summed {grad_summed.item():.3g}, L_BH {grad_triplet.item():.3g}")


if __name__ == "__main__":
    main()
