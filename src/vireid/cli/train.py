"""``vireid train``: train a method from a YAML config, or resume a run."""

from __future__ import annotations

import argparse
import json
import os
import sys

from vireid.cli import add_subcommand
from vireid.cli.options import add_device_option, add_threads_option
from vireid.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(
        subparsers, "train", "train a VI-ReID model from a YAML config",
        description="Train a method (baseline, xiv, df2am, saai, ssft) as a YAML config says. "
        "Checkpoints, log.txt, TensorBoard logs and summary.json go to output_dir; the log also goes to the "
        "console. Several GPUs: torchrun --nproc_per_node=N -m vireid train --config ... (each process trains "
        "on its own batch of sampler.num_ids identities, the epoch is shared between the processes).",
    )
    parser.add_argument("--config", metavar="CONFIG.yaml",
                        help="training config (see configs/); required unless --resume is given")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override a config value, dotted key, YAML value (e.g. --set optim.lr=0.01); repeatable")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR exactly where its last checkpoint stopped, with "
                        "the config stored there (--set may change it, e.g. epochs)")
    add_threads_option(parser, default_text="the config's threads, else all available cores; "
                       "given, it overrides the config")
    add_device_option(parser, default=None, default_text="the config's device, auto unless set; given, it "
                      "overrides the config")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vireid.engine.config import load_train_config
    from vireid.engine.trainer import resume_config, train

    if args.resume and args.config:
        raise InputError("--resume continues with the run's stored config; give --set to change it, not --config")
    if not args.resume and not args.config:
        raise InputError("give --config CONFIG.yaml (or --resume RUN_DIR)")
    overrides = list(args.overrides)
    overrides += [f"threads={args.threads}"] if args.threads is not None else []
    overrides += [f"device={args.device}"] if args.device is not None else []
    if args.resume:
        cfg = resume_config(args.resume, overrides)
    else:
        cfg = load_train_config(args.config, overrides)
    try:
        summary = train(cfg, resume=bool(args.resume))
    except FloatingPointError as exc:
        print(f"vireid train: error: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    best = summary["best"]
    line = {"run_dir": summary["run_dir"], "epochs": summary["epochs"], "wall_time_s": round(summary["wall_time_s"], 1)}
    if best is not None:
        line["best"] = {k: (f"{100 * v:.2f}%" if k in ("rank1", "rank5", "mAP", "mINP") else v) for k, v in best.items()}
    print(json.dumps(line))
    return 0

