"""CPU training throughput (images/s) of the two-stream baseline at 288x144.

One full training step per iteration (forward, identity + weighted triplet loss, backward,
SGD step) on in-memory batches of 8 identities x (2 visible + 2 infrared) = 32 images, so
the figure is the model's, not the JPEG decoder's. Contiguous and channels-last models are
timed in alternating rounds in the same run (so a shared machine's changing load hits both
alike); the median round of each and their ratio are printed, with the step's floating-point
work per image (``torch.utils.flop_counter``, a multiply-add counted as 2) and the rate it implies.

    .venv/bin/python benchmarks/train_throughput.py [--backbones resnet18 resnet50] [--steps 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from vireid.engine.config import OptimConfig
from vireid.engine.optim import make_optimizer, parameter_groups
from vireid.models.registry import ModelConfig, create_model


def make_train_step(backbone: str, channels_last: bool, batch_size: int, height: int, width: int,
                    num_classes: int = 395) -> Callable[[], None]:
    """A closure running one training step of a fresh model on a fixed random batch."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone=backbone, pretrained=None, channels_last=channels_last), num_classes)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = make_optimizer(parameter_groups(model, OptimConfig()), OptimConfig())
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, height, width, generator=generator).contiguous(memory_format=memory_format)
    ids = batch_size // 4
    labels = torch.arange(ids).repeat_interleave(4)
    modality = torch.tensor([0, 0, 1, 1]).repeat(ids)

    def step() -> None:
        loss, _ = model.compute_loss(model(images, modality), labels, modality)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def flops_per_image(step: Callable[[], None], batch_size: int) -> float:
    """Floating-point operations of one training step (run once, counted), per image."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / batch_size


def timed_rate(step: Callable[[], None], steps: int, batch_size: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--height", type=int, default=288)
    parser.add_argument("--width", type=int, default=144)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per memory format")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, {args.height}x{args.width}, "
          f"{args.warmup} warm-up step(s), {args.rounds} rounds x {args.steps} timed steps per format")
    print(f"{'backbone':<10} {'contiguous img/s':>17} {'channels_last img/s':>20} {'ratio cl/contig':>16} "
          f"{'GFLOP/img':>10} {'GFLOP/s (best)':>15}")
    for backbone in args.backbones:
        steps = {cl: make_train_step(backbone, cl, args.batch_size, args.height, args.width) for cl in (False, True)}
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        gflop = flops_per_image(steps[False], args.batch_size) / 1e9
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for cl, step in steps.items():
                rates[cl].append(timed_rate(step, args.steps, args.batch_size))
        contiguous, channels_last = statistics.median(rates[False]), statistics.median(rates[True])
        best = max(contiguous, channels_last)
        print(f"{backbone:<10} {contiguous:>17.2f} {channels_last:>20.2f} {channels_last / contiguous:>16.2f} "
              f"{gflop:>10.2f} {gflop * best:>15.1f}")


if __name__ == "__main__":
    main()
