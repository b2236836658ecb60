"""``vireid ssft-reconstruct``: cm-SSFT's reconstruction figure (input, shared-only, specific-only, full)."""

from __future__ import annotations

import argparse

from vireid.cli import add_subcommand
from vireid.cli.options import add_device_option, add_threads_option


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(
        subparsers, "ssft-reconstruct", "cm-SSFT: decode images from their shared / specific features (paper Fig. 3)",
        description="Run a cm-SSFT checkpoint's reconstruction decoders on some images and write a PNG: one row "
        "per image with the input and the reconstructions from the shared feature only ([0; H]), the specific "
        "feature only ([P; 0]) and both ([P; H]).")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="cm-SSFT checkpoint (.pt) or run folder")
    parser.add_argument("--images", required=True, nargs="+", metavar="IMG", help="image files")
    parser.add_argument("--modality", required=True, nargs="+", metavar="M",
                        help="visible or infrared: one value for all images or one per image")
    parser.add_argument("--out", required=True, metavar="OUT.png", help="output PNG")
    add_device_option(parser)
    add_threads_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vireid.cli.options import torch_device
    from vireid.data.records import Modality
    from vireid.engine.checkpoint import load_checkpoint_model
    from vireid.errors import InputError
    from vireid.models.methods.ssft import SSFTModel
    from vireid.models.methods.ssft_figure import reconstruction_grid, save_png

    try:
        modalities = [Modality.parse(m) for m in args.modality]
    except ValueError as exc:
        raise InputError(f"--modality: {exc}") from None
    if len(modalities) == 1:
        modalities = modalities * len(args.images)
    if len(modalities) != len(args.images):
        raise InputError(f"--modality: give one value or one per image ({len(args.images)}), got {len(modalities)}")
    device = torch_device(args.device)
    model, cfg = load_checkpoint_model(args.checkpoint)
    if not isinstance(model, SSFTModel):
        raise InputError(f"{args.checkpoint}: a {cfg.model.method!r} checkpoint; ssft-reconstruct needs a cm-SSFT one")
    with torch.inference_mode():
        sheet = reconstruction_grid(model.to(device), args.images, modalities, cfg.transforms)
    save_png(sheet, args.out)
    print(f"wrote {args.out} ({len(args.images)} image(s) x input / shared / specific / full)")
    return 0
