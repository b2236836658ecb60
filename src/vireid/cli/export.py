"""``vireid export``: a checkpoint to ONNX, checked against PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path

from vireid.cli import add_subcommand
from vireid.cli.options import add_threads_option


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(
        subparsers, "export", "export a checkpoint to ONNX (dynamic batch, both modality streams)",
        "Write an ONNX model with inputs images (N,3,H,W) and modality (N,; 0 visible, 1 infrared) and "
        "output feat (N,d); then compare onnxruntime with PyTorch on a random mixed batch and fail "
        "if the largest absolute feature difference reaches the tolerance.")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file or run folder")
    parser.add_argument("--out", required=True, type=Path, help="ONNX file to write")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    parser.add_argument("--check-batch", type=int, default=5, help="images in the PyTorch/onnxruntime comparison")
    add_threads_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vireid.engine.checkpoint import load_checkpoint_model
    from vireid.serve.encoder import ONNX_TOLERANCE, export_onnx, onnx_max_abs_difference

    model, cfg = load_checkpoint_model(args.checkpoint)
    export_onnx(model, cfg.transforms, args.out, opset=args.opset)
    diff = onnx_max_abs_difference(model, cfg.transforms, args.out, batch=args.check_batch, threads=args.cpu_threads)
    print(f"wrote {args.out} (input {cfg.transforms.height}x{cfg.transforms.width}); "
          f"max abs difference onnxruntime vs PyTorch: {diff:.3e} (tolerance {ONNX_TOLERANCE:.0e})")
    if not diff < ONNX_TOLERANCE:
        args.out.unlink(missing_ok=True)
        print(f"vireid export: error: difference {diff:.3e} >= {ONNX_TOLERANCE:.0e}; {args.out} removed")
        return 1
    return 0
