"""Floating-point work of a full training run of each paper config, and the wall time it implies.

For every ``configs/<method>_sysu.yaml`` (ResNet-50 at its input size), one training step
(forward, losses, backward, optimiser step; cm-SSFT's adversary step too) is run on the CPU on a
batch of 2 identities x (K visible + K infrared) random images, its operations counted by
``torch.utils.flop_counter`` (a multiply-add = 2 operations) and divided by the batch's images.
A run's work is that times the images of an epoch times the epochs. SYSU-MM01's epoch: the
visible training images (22,258) in batches of P x K per modality, 2 P K images each; RegDB's:
2,060 visible training images per split (the dataset papers' counts).

The wall time is an ESTIMATE: work / ``--tflops`` (sustained rate of the training step on the
GPU). Replace it with the images/s that ``benchmarks/gpu_check.py`` measures on your GPU.

    python benchmarks/run_cost.py [--tflops 30] [--methods baseline xiv df2am saai ssft]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from vireid.engine.config import load_train_config
from vireid.engine.optim import make_optimizer, parameter_groups
from vireid.models.registry import create_model
from vireid.models.routing import sorted_modality_layout

REPO = Path(__file__).resolve().parents[1]
METHODS = ("baseline", "xiv", "df2am", "saai", "ssft")
VISIBLE_TRAIN_IMAGES = {"sysu": 22258, "regdb": 2060}


def step_flops_per_image(config: Path, ids: int = 2) -> tuple[float, int, int, int]:
    """(GFLOP per input image of one training step, P, K, epochs) of ``config``."""
    cfg = load_train_config(config, ["model.pretrained=none"])
    torch.manual_seed(0)
    model = create_model(cfg.model, num_classes=395).train()
    adversary = list(model.adversary_parameters())
    optimizer = make_optimizer(parameter_groups(model, cfg.optim, {id(p) for p in adversary}), cfg.optim)
    k = cfg.sampler.per_modality
    images = torch.randn(2 * ids * k, 3, cfg.transforms.height, cfg.transforms.width)
    labels = torch.arange(ids).repeat_interleave(k).repeat(2)
    modality = torch.tensor([0] * (ids * k) + [1] * (ids * k))
    with FlopCounterMode(display=False) as counter, sorted_modality_layout((ids * k, ids * k)):
        outputs = model(images, modality)
        loss, _ = model.compute_loss(outputs, labels, modality)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if adversary:
            model.adversary_loss(outputs, labels, modality).backward()
    return counter.get_total_flops() / len(images) / 1e9, cfg.sampler.num_ids, k, cfg.epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--tflops", type=float, default=30.0, help="assumed sustained TFLOP/s of the training step")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'config':<14} {'GFLOP/img':>9} {'P x K':>6} {'epochs':>6} {'SYSU PFLOP':>10} {'SYSU h (est.)':>13} "
          f"{'RegDB PFLOP':>11} {'RegDB h (est.)':>14}")
    for method in args.methods:
        gflop, p, k, epochs = step_flops_per_image(REPO / "configs" / f"{method}_sysu.yaml")
        regdb_epochs = load_train_config(REPO / "configs" / f"{method}_regdb.yaml").epochs
        row = f"{method + '_sysu':<14} {gflop:>9.1f} {f'{p}x{k}':>6} {epochs:>6}"
        for dataset, runs_epochs in (("sysu", epochs), ("regdb", regdb_epochs)):
            per_epoch = math.ceil(VISIBLE_TRAIN_IMAGES[dataset] / (p * k)) * 2 * p * k
            pflop = gflop * per_epoch * runs_epochs / 1e6
            row += f" {pflop:>10.1f} {pflop * 1e3 / args.tflops / 3600:>13.1f}" if dataset == "sysu" else \
                   f" {pflop:>11.1f} {pflop * 1e3 / args.tflops / 3600:>14.2f}"
        print(row, flush=True)
    print(f"hours: estimate at an assumed {args.tflops:g} TFLOP/s sustained; RegDB: one of its 10 splits")


if __name__ == "__main__":
    main()
