"""``vireid serve``: the search service and web page over a gallery index."""

from __future__ import annotations

import argparse
from pathlib import Path

from vireid.cli import add_subcommand


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(
        subparsers, "serve", "serve a gallery index over HTTP (search API, enrolment, web page at /)",
        "FastAPI + uvicorn. Enrolment (POST /gallery) needs a bearer token from $VIREID_SERVE_TOKEN or "
        "--token-file; without one it is disabled (401).")
    parser.add_argument("index", type=Path, help="index folder (from `vireid index build`)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--token-file", type=Path, default=None, help="file whose first line is the enrolment token")
    parser.add_argument("--max-upload-mb", type=float, default=8.0, help="largest accepted image upload (MiB)")
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="largest accepted decoded image (pixels)")
    parser.add_argument("--scan-dtype", default="float32", choices=("float32", "float16"),
                        help="precision of the in-memory gallery copy the per-query pass reads")
    parser.add_argument("--first-stage", default="int8", choices=("int8", "scan", "ivf"),
                        help="how plain/aim find the items they score exactly: an int8 scan of the gallery, "
                             "a full float scan (exact), or a faiss IVF index")
    parser.add_argument("--candidates", type=int, default=256,
                        help="items the int8 or IVF first stage keeps (at least twice max(topk, AIM k1))")
    parser.add_argument("--nprobe", type=int, default=32, help="IVF lists probed per query with --first-stage ivf")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch / onnxruntime threads per request (requests run in parallel; on a shared "
                             "machine one thread each keeps latency stable)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from vireid.serve.app import ServiceConfig, create_app, read_token

    torch.set_num_threads(args.threads)
    config = ServiceConfig(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels,
                           token=read_token(args.token_file), scan_dtype=args.scan_dtype,
                           first_stage=args.first_stage, candidates=args.candidates, nprobe=args.nprobe,
                           threads=args.threads)
    app = create_app(args.index, config)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
