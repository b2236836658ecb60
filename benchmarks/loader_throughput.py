"""Training input pipeline on the CPU: the data loader alone, and whole training steps.

1. Loader alone: the training dataset and batch sampler as the trainer builds them, iterated for
   ``--epochs`` short epochs, (a) with a DataLoader rebuilt every epoch without persistent workers
   and (b) with one DataLoader whose workers persist; images/s of each and their ratio, measured
   in alternating rounds in one run.
2. Training: ``vireid.engine.train`` on ``configs/baseline_synthetic_tiny.yaml`` (resnet10, 64x32)
   for ``--train-epochs`` epochs with ``--workers`` loader processes; images/s from its summary
   (and the loader-wait fraction where the engine reports it). Run the script once with each
   version of the code on PYTHONPATH to compare them.

    PYTHONPATH=src python benchmarks/loader_throughput.py [--data DIR] [--workers 2] [--epochs 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vireid.data.datasets import build_dataset
from vireid.data.image_dataset import ImageDataset
from vireid.data.records import relabel
from vireid.data.sampler import CrossModalityBatchSampler
from vireid.data.synthetic import SynthConfig, render_dataset
from vireid.data.transforms import TrainTransform, TransformConfig
from vireid.engine.config import load_train_config
from vireid.engine.trainer import train

REPO = Path(__file__).resolve().parents[1]


def loader_rate(dataset: ImageDataset, sampler: CrossModalityBatchSampler, workers: int, epochs: int,
                persistent: bool) -> float:
    """Images/s of ``epochs`` epochs of batches, the DataLoader kept (persistent) or rebuilt per epoch."""
    images = 0
    start = time.perf_counter()
    loader = None
    for epoch in range(epochs):
        sampler.set_state(epoch)
        if loader is None or not persistent:
            loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                persistent_workers=persistent and workers > 0)
        for batch in loader:
            images += len(batch[0])
    rate = images / (time.perf_counter() - start)
    del loader
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="synthetic SYSU-layout folder (rendered if missing)")
    parser.add_argument("--ids", type=int, default=60)
    parser.add_argument("--height", type=int, default=288)
    parser.add_argument("--width", type=int, default=144)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4, help="loader epochs per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-epochs", type=int, default=3, help="epochs of the training measurement (0: skip it)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-loader", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = args.data or Path(tempfile.gettempdir()) / f"vireid_loader_bench_{args.ids}_{args.height}x{args.width}"
    render_dataset(SynthConfig("sysu", num_ids=args.ids, seed=0, height=args.height, width=args.width), root)
    records = list(build_dataset("sysu", root).train)
    print(f"torch {torch.__version__}, {args.threads} threads, {len(records)} training images at "
          f"{args.height}x{args.width}, {args.workers} loader workers")

    if not args.skip_loader:
        tcfg = TransformConfig(height=args.height, width=args.width)
        dataset = ImageDataset(records, args.height, args.width, TrainTransform(tcfg), relabel(records))
        sampler = CrossModalityBatchSampler(records, 8, 4, epoch_length="identities")
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for persistent in (False, True):
                rates[persistent].append(loader_rate(dataset, sampler, args.workers, args.epochs, persistent))
        rebuilt, kept = statistics.median(rates[False]), statistics.median(rates[True])
        print(f"loader alone, {len(sampler)} batches of 64 per epoch, {args.epochs} epochs, median of {args.rounds}: "
              f"rebuilt every epoch {rebuilt:.1f} img/s, persistent workers {kept:.1f} img/s, ratio {kept / rebuilt:.2f}")

    if args.train_epochs < 1:
        return
    with tempfile.TemporaryDirectory() as out:
        tiny = root.parent / f"{root.name}_64x32"
        render_dataset(SynthConfig("sysu", num_ids=args.ids, seed=0, height=64, width=32), tiny)
        cfg = load_train_config(REPO / "configs" / "baseline_synthetic_tiny.yaml", [
            f"data.root={tiny}", "data.val_ids=0", f"data.num_workers={args.workers}", "sampler.epoch_length=images",
            f"epochs={args.train_epochs}", f"threads={args.threads}", f"output_dir={out}", "progress_bar=false",
            "eval.period=0"])
        summary = train(cfg)
        wait = summary.get("data_wait_fraction")
        print(f"training (tiny config, resnet10 at 64x32, {summary['global_step']} steps of "
              f"{2 * cfg.sampler.num_ids * cfg.sampler.per_modality} images): {summary['images_per_s']:.1f} img/s"
              + (f", loader wait {100 * wait:.1f}% of training time" if wait is not None else ""))


if __name__ == "__main__":
    main()
