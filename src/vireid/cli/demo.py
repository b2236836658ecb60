"""``vireid demo``: the main job — synthetic data, training, extraction, evaluation, report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vireid.cli import add_subcommand
from vireid.cli.options import add_device_option, add_threads_option


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_subcommand(
        subparsers, "demo", "run the whole pipeline on the built-in synthetic dataset (CPU, minutes)",
        "Render the synthetic SYSU-MM01-layout dataset (cached), train a small two-stream baseline (a CPU is "
        "enough; --device picks another), "
        "extract features, evaluate SYSU all-search single-shot over 10 trials with plain, aim, sim and krr "
        "distances, print the table and write results.json and report.html. No downloads.")
    p.add_argument("--quick", action="store_true",
                   help="smaller dataset and fewer epochs (about 2 minutes; what CI runs)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: a new folder runs/demo-YYYYmmdd-HHMMSS)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the rendered dataset is cached (default: $VIREID_CACHE or ~/.cache/vireid)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset, the sampler and the weights")
    add_threads_option(p)
    add_device_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vireid.cli.options import torch_device
    from vireid.engine.demo import run_demo

    device = torch_device(args.device)
    out = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    run_demo(out, quick=args.quick, cache_dir=args.cache_dir, seed=args.seed, device=str(device))
    return 0
