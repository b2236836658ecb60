"""``vireid search``: one query image against a gallery index."""

from __future__ import annotations

import argparse
from pathlib import Path

from vireid.cli import add_subcommand
from vireid.cli.options import add_threads_option


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(subparsers, "search", "search a gallery index with one query image")
    parser.add_argument("index", type=Path, help="index folder (from `vireid index build`)")
    parser.add_argument("--image", required=True, type=Path, help="query image")
    parser.add_argument("--modality", default="infrared", help="modality of the query image")
    parser.add_argument("--rerank", default="aim", choices=("plain", "aim", "sgr", "mnnr", "sim", "krr"),
                        help="re-ranking (parameters: those the index was built with, `vireid index info`)")
    parser.add_argument("--topk", type=int, default=20, help="results to print")
    parser.add_argument("--json", action="store_true",
                        help="print the results as the JSON of `POST /search` (same keys and meaning)")
    add_threads_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import time

    from vireid.data.records import Modality
    from vireid.errors import InputError
    from vireid.serve.app import search_response
    from vireid.serve.encoder import encode_images, load_encoder, read_image_file
    from vireid.serve.index import GalleryIndex

    try:
        modality = Modality.parse(args.modality)
    except ValueError as exc:
        raise InputError(f"--modality: {exc}") from None
    index = GalleryIndex.open(args.index, first_stage="scan")  # one query: int8 codes would cost more than they save
    if index.model_file is None:
        raise InputError(f"{args.index}: index has no stored model to encode the query with")
    encoder = load_encoder(index.model_file, threads=args.cpu_threads)
    image, _ = read_image_file(args.image)
    t0 = time.perf_counter()
    query = encode_images(encoder, [image], modality)[0]
    t1 = time.perf_counter()
    hits = index.search(query, args.rerank, args.topk)
    t2 = time.perf_counter()
    if args.json:
        print(json.dumps(search_response(index, hits, modality, args.rerank, encode_s=t1 - t0, search_s=t2 - t1),
                         indent=2))
        return 0
    print(f"{'rank':>4} {'id':>7} {'distance':>10} {'pid':>5} {'cam':>4}  name")
    for rank, hit in enumerate(hits, 1):
        item = hit.item
        print(f"{rank:>4} {hit.index:>7} {hit.distance:>10.4f} {_show(item.pid):>5} {_show(item.cam):>4}  {item.name}")
    return 0


def _show(value: int | None) -> str:
    return "-" if value is None else str(value)
