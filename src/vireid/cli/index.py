"""``vireid index build|add|info|verify|restore|gc``: the persistent gallery index."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vireid.cli import add_subcommand
from vireid.cli.options import add_threads_option, parse_key_values

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(subparsers, "index", "build or extend a gallery index for `vireid search` / `vireid serve`")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    build = add_subcommand(actions, "build", "encode gallery images into a new index",
                           "Encode gallery images into a new index. An existing index is refused unless --replace "
                           "is given; the replaced version then stays recoverable (`vireid index restore`) until "
                           "`vireid index gc`.")
    build.add_argument("--model", required=True, type=Path, help="checkpoint (.pt / run folder) or exported .onnx")
    _source_arguments(build)
    build.add_argument("--out", required=True, type=Path, help="index folder (created)")
    build.add_argument("--replace", action="store_true",
                       help="make the new gallery the live version of an existing index (the old one is kept "
                            "until `vireid index gc`)")
    build.add_argument("--preset", metavar="P",
                       help="the papers' re-ranking parameters for a protocol: sysu, sysu-multishot, sysu-indoor, "
                            "regdb (unset: each method's defaults, as in `vireid rerank`)")
    build.add_argument("--param", metavar="METHOD.NAME=VALUE", action="append", default=[],
                       help="set one re-ranking parameter, overriding the preset, e.g. aim.k1=20 or sim.alpha=0.5 "
                            "(names as in `vireid rerank --help`; repeatable)")
    build.add_argument("--knn", default="auto", choices=("auto", "exact", "ivf", "hnsw"),
                       help="gallery neighbour graph search (auto: exact up to 200,000 items, faiss IVF beyond; "
                            "enrolments cost more on an approximate graph)")
    build.set_defaults(func=run_build)

    add = add_subcommand(actions, "add", "append images to an index (cost in proportion to the images added; "
                                         "content already enrolled is skipped)",
                         "Encode images with the model stored in the index and enrol them as a new version, at a "
                         "cost in proportion to the images added. Images whose content is already enrolled are "
                         "skipped; after many enrolments the index is compacted.")
    add.add_argument("index", type=Path, help="index folder")
    _source_arguments(add)
    add.set_defaults(func=run_add)

    info = add_subcommand(actions, "info", "print an index's version, size and settings",
                          "Print, as JSON, the live version, item count, feature dimension, stored images, "
                          "enrolment deltas, versions on disk, re-ranking and neighbour-graph settings, the stored "
                          "model and the versions kept for recovery.")
    info.add_argument("index", type=Path, help="index folder")
    info.set_defaults(func=run_info)

    verify = add_subcommand(actions, "verify", "read every file of the live version and check they agree "
                                               "(exit 2 naming the first damaged file)",
                            "Read every file the live version references (features, re-ranking state, metadata "
                            "database, stored images, model) and check that they agree. A consistent index prints "
                            "one summary line; a damaged one exits with code 2 naming the first damaged file.")
    verify.add_argument("index", type=Path, help="index folder")
    verify.set_defaults(func=run_verify)

    restore = add_subcommand(actions, "restore", "make a kept earlier version (e.g. one replaced by "
                                                 "`build --replace`) live again",
                             "Make a kept earlier version live again, e.g. the gallery that `vireid index build "
                             "--replace` replaced. Kept versions are listed by `vireid index info` and removed by "
                             "`vireid index gc`.")
    restore.add_argument("index", type=Path, help="index folder")
    restore.add_argument("version", help="the version to bring back, e.g. v000003 (see `vireid index info`)")
    restore.set_defaults(func=run_restore)

    gc = add_subcommand(actions, "gc", "remove earlier versions no reader holds (replaced ones included), "
                                       "unreferenced files and what interrupted writers left",
                        "Remove earlier versions that no reader holds (versions replaced by `build --replace` "
                        "included, which then can no longer be restored), files and stored images no remaining "
                        "version references, and temporary files left by interrupted writers. The live version "
                        "is kept.")
    gc.add_argument("index", type=Path, help="index folder")
    gc.set_defaults(func=run_gc)


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path,
                        help="folder of images (recursive; hidden files and folders skipped), one image, or CSV manifest "
                             "(path[,person_id,camera,time,modality])")
    parser.add_argument("--modality", default="visible", help="modality of the images (a manifest column overrides it)")
    parser.add_argument("--no-store-images", action="store_true", help="keep only features and metadata, not the images")
    add_threads_option(parser)


def _progress(message: str) -> None:
    log.info(message)


def _sources(args: argparse.Namespace):
    from vireid.data.records import Modality
    from vireid.errors import InputError
    from vireid.serve.sources import gallery_sources

    try:
        modality = Modality.parse(args.modality)
    except ValueError as exc:
        raise InputError(f"--modality: {exc}") from None
    return gallery_sources(args.images, modality)


def _encode(args: argparse.Namespace, model_path: Path, sources):
    from vireid.serve.encoder import load_encoder
    from vireid.serve.enrol import encode_sources

    encoder = load_encoder(model_path, threads=args.cpu_threads)
    _progress(f"encoding {len(sources)} images with {model_path}")
    return encoder, encode_sources(encoder, sources, keep_images=not args.no_store_images, progress=_progress)


def _rerank_params(args: argparse.Namespace):
    from vireid.errors import InputError
    from vireid.retrieval.gallery_state import SingleQueryParams

    per_method: dict[str, dict[str, str]] = {}
    for key, value in parse_key_values(args.param, "--param", typed=False).items():
        method, dot, name = key.partition(".")
        if not dot or not name:
            raise InputError(f"--param {key}={value}: expected METHOD.NAME=VALUE, e.g. aim.k1=20")
        per_method.setdefault(method, {})[name] = value
    return SingleQueryParams.resolve(args.preset, per_method)


def run_build(args: argparse.Namespace) -> int:
    from vireid.errors import InputError
    from vireid.serve.encoder import transform_summary
    from vireid.serve.index import IndexSettings, build_index, current_version, store_model

    settings = IndexSettings(rerank=_rerank_params(args), knn=args.knn)
    if current_version(args.out) is not None and not args.replace:
        raise InputError(f"{args.out} already holds an index (live version {current_version(args.out)}); pass "
                         f"--replace to make the new gallery live (the current one stays recoverable until "
                         f"`vireid index gc`)")
    sources = _sources(args)
    encoder, (feats, images) = _encode(args, args.model, sources)
    model = store_model(args.out, args.model, {"kind": "onnx" if args.model.suffix == ".onnx" else "checkpoint",
                                               "transform": transform_summary(encoder.transform)})
    version = build_index(args.out, feats, images, settings=settings, model=model, replace=args.replace,
                          progress=_progress)
    print(f"{args.out}: version {version}, {len(images)} images, d={feats.shape[1]}")
    return 0


def run_add(args: argparse.Namespace) -> int:
    import hashlib

    from vireid.errors import InputError
    from vireid.serve.index import GalleryIndex, add_to_index

    current = GalleryIndex.open(args.index, first_stage="scan")
    if current.model_file is None:
        raise InputError(f"{args.index}: index has no stored model to encode new images with")
    sources = _sources(args)
    hashes = []
    for path, _ in sources:
        try:
            hashes.append(hashlib.sha256(path.read_bytes()).hexdigest())
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    known = current.known(hashes)
    todo = [source for source, sha in zip(sources, hashes) if sha not in known]
    skipped = len(sources) - len(todo)
    if skipped:
        _progress(f"skipping {skipped} image(s) already in the gallery")
    if not todo:
        print(f"{args.index}: version {current.version}, nothing to add ({skipped} image(s) already enrolled)")
        return 0
    _, (feats, images) = _encode(args, current.model_file, todo)
    index, ids = add_to_index(args.index, feats, images, current=current, progress=_progress)
    fresh = sorted(i for i in ids if i >= current.count)
    print(f"{args.index}: version {index.version}, added {len(fresh)} images"
          + (f" (ids {fresh[0]}..{fresh[-1]})" if fresh else "")
          + (f", skipped {skipped + len(ids) - len(fresh)} already enrolled" if skipped or len(fresh) < len(ids) else ""))
    if index.needs_compaction():
        from vireid.serve.index import compact

        compact(args.index, index, progress=_progress)
    return 0


def run_info(args: argparse.Namespace) -> int:
    import json

    from vireid.serve.index import GalleryIndex, verify_index

    summary = verify_index(args.index, images=False)
    index = GalleryIndex.open(args.index, first_stage="scan")
    print(json.dumps({**summary, "settings": index.manifest["settings"], "model": index.manifest.get("model"),
                      "kept_for_recovery": index.manifest.get("keep", [])}, indent=2))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from vireid.serve.index import verify_index

    summary = verify_index(args.index)
    print(f"{args.index}: {summary['version']} is consistent: {summary['count']} items (d={summary['dim']}), "
          f"{summary['images']} stored images, {summary['deltas']} enrolment deltas; versions on disk: "
          f"{', '.join(summary['versions'])}")
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from vireid.serve.index import restore_version

    name = restore_version(args.index, args.version)
    print(f"{args.index}: {args.version} is live again as {name}")
    return 0


def run_gc(args: argparse.Namespace) -> int:
    from vireid.serve.index import collect_garbage

    removed = collect_garbage(args.index)
    print(f"{args.index}: removed {removed['versions']} earlier versions, {removed['files']} unreferenced files, "
          f"{removed['images']} unreferenced image and thumbnail files")
    return 0
