"""``vireid train``: train a method from a YAML config, or resume a run."""

from __future__ import annotations

import argparse
import json
import os

from vireid.cli import add_subcommand
from vireid.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(
        subparsers, "train", "train a VI-ReID model from a YAML config",
        description="Train a method (baseline, xiv, df2am, saai, ssft) as a YAML config says. "
        "Checkpoints, TensorBoard logs and summary.json go to output_dir. "
        "Multi-process: torchrun --nproc_per_node=N -m vireid train --config ...",
    )
    parser.add_argument("--config", metavar="CONFIG.yaml",
                        help="training config (see configs/); required unless --resume is given")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override a config value, dotted key, YAML value (e.g. --set optim.lr=0.01); repeatable")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR exactly where its last checkpoint stopped, with "
                        "the config stored there (--set may change it, e.g. epochs)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vireid.engine.config import load_train_config
    from vireid.engine.trainer import resume_config, train

    if args.resume and args.config:
        raise InputError("--resume continues with the run's stored config; give --set to change it, not --config")
    if not args.resume and not args.config:
        raise InputError("give --config CONFIG.yaml (or --resume RUN_DIR)")
    if args.resume:
        cfg = resume_config(args.resume, args.overrides)
    else:
        cfg = load_train_config(args.config, args.overrides)
    check_pretrained(cfg.model.pretrained, cfg.model.backbone)
    summary = train(cfg, resume=bool(args.resume))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    best = summary["best"]
    line = {"run_dir": summary["run_dir"], "epochs": summary["epochs"], "wall_time_s": round(summary["wall_time_s"], 1)}
    if best is not None:
        line["best"] = {k: (f"{100 * v:.2f}%" if k in ("rank1", "rank5", "mAP", "mINP") else v) for k, v in best.items()}
    print(json.dumps(line))
    return 0


def check_pretrained(pretrained: str | None, backbone: str) -> None:
    """Refuse an unreadable ImageNet weights file (``model.pretrained``, or the cached file that
    ``auto`` uses) with one line, before any training work starts."""
    from pathlib import Path

    import torch

    from vireid.models.backbone import DEFAULT_WEIGHTS_DIR

    if pretrained is None:
        return
    path = DEFAULT_WEIGHTS_DIR / f"{backbone}.pth" if str(pretrained) == "auto" else Path(pretrained)
    if not path.is_file():
        return  # "auto" without a cached file trains from scratch; a missing explicit file is reported later
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # an old, non-zip file
    except Exception as exc:  # torch raises many types for damaged files
        raise InputError(f"{path}: not a readable weights file for model.pretrained ({type(exc).__name__}); "
                         f"download it again or set model.pretrained: null") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: model.pretrained must hold a state_dict, found {type(state).__name__}")
