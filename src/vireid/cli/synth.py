"""``vireid synth``: render a synthetic visible-infrared dataset in a real dataset's on-disk layout."""

from __future__ import annotations

import argparse

from vireid.cli import add_subcommand

DESCRIPTION = """\
Render procedurally drawn pedestrians into OUT in the exact on-disk layout of SYSU-MM01, RegDB or
LLCM, so the real dataset readers (and any reference code) read it unchanged. Visible cameras render
colour; infrared cameras render thermal grey images (no hue; skin warmest; garment brightness
unrelated to colour). Deterministic for a seed. A marker file written last tells a complete set from
an interrupted one; re-running with the same options resumes. Difficulty options scale the task
(see docs/synthetic.md)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(subparsers, "synth", "Render a synthetic visible-infrared dataset "
                            "(SYSU-MM01, RegDB or LLCM layout).", DESCRIPTION)
    parser.add_argument("--layout", required=True, choices=("sysu", "regdb", "llcm"),
                        help="on-disk layout (and camera set) of the real dataset to imitate")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (new, empty, or an earlier "
                        "render of the same options, which is resumed)")
    parser.add_argument("--ids", type=int, default=200, help="number of identities (person ids 1..N)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    parser.add_argument("--images-per-camera", type=int, default=None, metavar="K",
                        help="images per identity and camera (default: sysu 10, regdb 10, llcm 5)")
    parser.add_argument("--height", type=int, default=128, help="image height in pixels")
    parser.add_argument("--width", type=int, default=64, help="image width in pixels")
    parser.add_argument("--workers", type=int, default=0, help="rendering processes (0: up to 2, by CPU count)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier synthetic render with other options in DIR")
    parser.add_argument("--contact-sheet", metavar="PNG", help="also write a contact sheet of the first 8 "
                        "identities: one image per visible camera beside one per infrared camera")
    knobs = parser.add_argument_group("difficulty")
    knobs.add_argument("--noise", type=float, default=1.0, help="sensor noise multiplier (0 = clean)")
    knobs.add_argument("--pose-variation", type=float, default=1.0,
                       help="multiplier of walking swing, position and scale jitter (0 = rigid)")
    knobs.add_argument("--viewpoint-variation", type=float, default=1.0,
                       help="0: each camera sees one fixed viewpoint; 1: a camera-specific random mix")
    knobs.add_argument("--clutter", type=float, default=0.5, help="background clutter and occluder rate, 0..1")
    knobs.add_argument("--illumination-variation", type=float, default=1.0,
                       help="multiplier of per-camera and per-image lighting changes")
    knobs.add_argument("--shared-outfit-fraction", type=float, default=0.35,
                       help="fraction of identities sharing an outfit with a small group (confusers), 0..1")
    knobs.add_argument("--outfit-group-size", type=int, default=3, help="mean size of a shared-outfit group")
    knobs.add_argument("--infrared-luminance-coupling", type=float, default=0.0,
                       help="how far a garment's infrared level follows its visible luminance, 0..1 "
                       "(0: independent, like a thermal camera; 1: light colours light in infrared, like "
                       "near-infrared reflectance); hue never reaches infrared")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vireid.data.synthetic import Difficulty, SynthConfig, contact_sheet, render_dataset

    difficulty = Difficulty(
        noise=args.noise, pose_variation=args.pose_variation, viewpoint_variation=args.viewpoint_variation,
        clutter=args.clutter, illumination_variation=args.illumination_variation,
        shared_outfit_fraction=args.shared_outfit_fraction, outfit_group_size=args.outfit_group_size,
        infrared_luminance_coupling=args.infrared_luminance_coupling,
    )
    config = SynthConfig(layout=args.layout, num_ids=args.ids, seed=args.seed,
                         images_per_camera=args.images_per_camera, height=args.height, width=args.width,
                         difficulty=difficulty)
    summary = render_dataset(config, args.out, workers=args.workers, overwrite=args.overwrite)
    state = "already complete" if summary.rendered == 0 else f"rendered {summary.rendered} images"
    print(f"{args.layout} layout, {args.ids} identities, {summary.num_images} images in {summary.root} "
          f"({state}, {summary.seconds:.1f} s)")
    if args.contact_sheet:
        pids = list(range(1, min(8, args.ids) + 1))
        width, height = contact_sheet(config, pids, args.contact_sheet)
        print(f"contact sheet ({width} x {height} px): {args.contact_sheet}")
    return 0
