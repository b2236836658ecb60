"""``vireid serve``: the search service and web page over a gallery index."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vireid.cli import add_subcommand
from vireid.cli.options import add_threads_option


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(
        subparsers, "serve", "serve a gallery index over HTTP (search API, enrolment, web page at /)",
        "FastAPI + uvicorn. The token (from $VIREID_SERVE_TOKEN or --token-file, at least 16 characters) is "
        "required for enrolment (POST /gallery) and, unless --public-reads, for searching and reading the "
        "gallery; without a token, enrolment is disabled and reads are open. See docs/serving.md for the "
        "threat model.")
    parser.add_argument("index", type=Path, help="index folder (from `vireid index build`)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (anything but loopback prints a warning)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                        help="a host name clients may use in the Host header (repeatable; default: the loopback "
                             "names, plus --host when it is an address; '*' accepts any, which reopens DNS "
                             "rebinding)")
    parser.add_argument("--token-file", type=Path, default=None, help="file whose first line is the token")
    parser.add_argument("--public-reads", action="store_true",
                        help="with a token: let anyone search and read gallery images and metadata (the token "
                             "then guards enrolment only)")
    parser.add_argument("--max-upload-mb", type=float, default=8.0, help="largest accepted image upload (MiB)")
    parser.add_argument("--max-enrol-mb", type=float, default=64.0, help="largest enrolment request, all images (MiB)")
    parser.add_argument("--max-pixels", type=int, default=16_000_000, help="largest accepted decoded image (pixels)")
    parser.add_argument("--max-aspect", type=float, default=16.0, help="largest ratio of an image's long to short side")
    parser.add_argument("--decode-slots", type=int, default=2,
                        help="images decoded and encoded at once; further requests wait (503 when the wait is "
                             "too long)")
    parser.add_argument("--queue-limit", type=int, default=32,
                        help="requests that may wait for a decode slot; beyond, 503 with Retry-After at once")
    parser.add_argument("--queue-timeout", type=float, default=30.0,
                        help="seconds a request waits for a decode slot before 503 with Retry-After")
    parser.add_argument("--max-connections", type=int, default=64,
                        help="open connections served at once (uvicorn limit_concurrency; more get 503)")
    parser.add_argument("--scan-dtype", default="float32", choices=("float32", "float16"),
                        help="precision of the in-memory gallery copy the per-query pass reads")
    parser.add_argument("--first-stage", default="int8", choices=("int8", "scan", "ivf"),
                        help="how plain/aim find the items they score exactly: an int8 scan of the gallery, "
                             "a full float scan (exact), or a faiss IVF index")
    parser.add_argument("--candidates", type=int, default=256,
                        help="items the int8 or IVF first stage keeps (at least twice max(topk, AIM k1))")
    parser.add_argument("--nprobe", type=int, default=32, help="IVF lists probed per query with --first-stage ivf")
    add_threads_option(parser, default=1, default_text="1: requests run in parallel, each with these threads; "
                       "one each keeps latency stable on a shared machine")
    parser.set_defaults(func=run)


def allowed_hosts(host: str, given: list[str] | None) -> tuple[str, ...]:
    """The Host header values to accept: ``given``, else the loopback names and ``host`` itself
    when it is a specific address."""
    from vireid.serve.app import LOOPBACK_HOSTS

    if given:
        return tuple(given)
    extra = () if host in ("0.0.0.0", "::", "") else (host,)
    return tuple(dict.fromkeys((*LOOPBACK_HOSTS, *extra)))


def run(args: argparse.Namespace) -> int:
    from vireid.extras import require

    for module in ("fastapi", "python_multipart"):
        require(module, "vireid serve")
    uvicorn = require("uvicorn", "vireid serve")
    from vireid.serve.app import ServiceConfig, bind_warning, create_app, read_token

    config = ServiceConfig(
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_enrol_bytes=int(args.max_enrol_mb * 1024 * 1024),
        max_pixels=args.max_pixels, max_aspect=args.max_aspect, decode_slots=args.decode_slots,
        queue_limit=args.queue_limit, queue_timeout_s=args.queue_timeout,
        token=read_token(args.token_file), public_reads=args.public_reads,
        allowed_hosts=allowed_hosts(args.host, args.allowed_host), scan_dtype=args.scan_dtype,
        first_stage=args.first_stage, candidates=args.candidates, nprobe=args.nprobe, threads=args.cpu_threads)
    warning = bind_warning(args.host)
    if warning is not None:
        print(f"vireid serve: warning: {warning}", file=sys.stderr, flush=True)
    app = create_app(args.index, config)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", limit_concurrency=args.max_connections,
                timeout_keep_alive=5, server_header=False)
    return 0
