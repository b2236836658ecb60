"""``vireid index build|add|info``: the persistent gallery index."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vireid.cli import HelpFormatter, add_subcommand


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(subparsers, "index", "build or extend a gallery index for `vireid search` / `vireid serve`")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    build = actions.add_parser("build", help="encode gallery images into a new index version",
                               formatter_class=HelpFormatter)
    build.add_argument("--model", required=True, type=Path, help="checkpoint (.pt / run folder) or exported .onnx")
    _source_arguments(build)
    build.add_argument("--out", required=True, type=Path, help="index folder (created; an existing index gets a new version)")
    build.add_argument("--knn", default="auto", choices=("auto", "exact", "ivf", "hnsw"),
                       help="gallery neighbour graph search (auto: exact up to 50,000 items)")
    build.add_argument("--aim-k1", type=int, default=20, help="AIM k1 (affinities kept per row)")
    build.add_argument("--aim-k2", type=int, default=6, help="AIM k2 (gallery neighbours averaged)")
    build.set_defaults(func=run_build)

    add = actions.add_parser("add", help="append images to an index (incremental graph update)",
                             formatter_class=HelpFormatter)
    add.add_argument("index", type=Path, help="index folder")
    _source_arguments(add)
    add.set_defaults(func=run_add)

    info = actions.add_parser("info", help="print an index's version, size and settings")
    info.add_argument("index", type=Path, help="index folder")
    info.set_defaults(func=run_info)

    gc = actions.add_parser("gc", help="remove files left by interrupted writers (build and add also do this first)")
    gc.add_argument("index", type=Path, help="index folder")
    gc.set_defaults(func=run_gc)


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path,
                        help="folder of images (recursive) or CSV manifest (path[,person_id,camera,time,modality])")
    parser.add_argument("--modality", default="visible", help="modality of the images (a manifest column overrides it)")
    parser.add_argument("--no-store-images", action="store_true", help="keep only features and metadata, not the images")
    parser.add_argument("--threads", type=int, default=2, help="torch / onnxruntime CPU threads")


def _progress(message: str) -> None:
    print(f"[index] {message}", file=sys.stderr, flush=True)


def _encode(args: argparse.Namespace, model_path: Path):
    import torch

    from vireid.data.records import Modality
    from vireid.errors import InputError
    from vireid.serve.encoder import load_encoder
    from vireid.serve.enrol import encode_sources
    from vireid.serve.sources import gallery_sources

    torch.set_num_threads(args.threads)
    try:
        modality = Modality.parse(args.modality)
    except ValueError as exc:
        raise InputError(f"--modality: {exc}") from None
    encoder = load_encoder(model_path, threads=args.threads)
    sources = gallery_sources(args.images, modality)
    _progress(f"encoding {len(sources)} images with {model_path}")
    return encoder, encode_sources(encoder, sources, keep_images=not args.no_store_images, progress=_progress)


def run_build(args: argparse.Namespace) -> int:
    from vireid.serve.encoder import transform_summary
    from vireid.serve.index import IndexSettings, build_index, store_model
    from vireid.serve.rerank import RerankParams

    encoder, (feats, images) = _encode(args, args.model)
    settings = IndexSettings(params=RerankParams(aim_k1=args.aim_k1, aim_k2=args.aim_k2), knn=args.knn)
    model = store_model(args.out, args.model, {"kind": "onnx" if args.model.suffix == ".onnx" else "checkpoint",
                                               "transform": transform_summary(encoder.transform)})
    version = build_index(args.out, feats, images, settings=settings, model=model, progress=_progress)
    print(f"{args.out}: version {version}, {len(images)} items, d={feats.shape[1]}")
    return 0


def run_add(args: argparse.Namespace) -> int:
    from vireid.errors import InputError
    from vireid.serve.index import GalleryIndex, add_to_index

    current = GalleryIndex.open(args.index, first_stage="scan")
    if current.model_file is None:
        raise InputError(f"{args.index}: index has no stored model to encode new images with")
    _, (feats, images) = _encode(args, current.model_file)
    version, ids = add_to_index(args.index, feats, images, progress=_progress)
    print(f"{args.index}: version {version}, added {len(images)} items (ids {ids.start}..{ids.stop - 1})")
    return 0


def run_info(args: argparse.Namespace) -> int:
    import json

    from vireid.serve.index import GalleryIndex

    index = GalleryIndex.open(args.index, first_stage="scan")
    index.verify()
    print(json.dumps({"version": index.version, "count": index.count, "dim": index.dim,
                      "settings": index.manifest["settings"], "model": index.manifest.get("model")}, indent=2))
    return 0


def run_gc(args: argparse.Namespace) -> int:
    from vireid.serve.index import collect_garbage

    removed = collect_garbage(args.index)
    print(f"{args.index}: removed {removed} unreferenced image and thumbnail files")
    return 0
