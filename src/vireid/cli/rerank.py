"""``vireid rerank``: the re-ranked Q×G distance of a feature file, written as ``.npy``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from vireid.cli import add_subcommand
from vireid.cli.options import add_threads_option, parse_key_values

if TYPE_CHECKING:
    from vireid.features import FeatureSet

DESCRIPTION = """\
Re-rank FEATURES.npz (keys query_feat, gallery_feat, query_id, gallery_id, query_cam, gallery_cam)
with one exact method and write the (Q, G) distance (smaller = closer) to DIST.npy, atomically.
Methods: plain (-q.g of L2-normalised features), aim (SAAI affinity inference: k1, k2),
sgr (SIM similarity graph reasoning: lam, K, k_graph), mnnr (SIM mutual nearest-neighbour
reasoning: kq, kg, alpha), sim (SGR then MNNR: all six), krr (k-reciprocal re-ranking: k1, k2, lam).
--variant reference reproduces the public code (quirks included), paper the equations; defaults:
reference for aim/krr, paper for sgr/mnnr/sim. --preset fills in the papers' parameters for a
protocol; --param NAME=VALUE overrides them. With several trials in the file, all rows are used.
With --topk and an approximate --knn (ivf, hnsw, or auto beyond 50,000 items) every neighbour search
is recall-targeted: its recall@k against exact search is measured on --recall-sample rows and nprobe
(IVF) or efSearch (HNSW) raised until it reaches --recall-target; each search's choice and measured
recall is printed and stored in RANKS.npz (key meta_json). A target not met within --recall-budget
and --recall-max-products is said in one line: the search then runs exactly if that is affordable (<= 2e10 inner products:
a 141,000-item graph),
otherwise with the best recall reached."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(subparsers, "rerank", "Write the re-ranked query-gallery distance of a feature file.",
                            DESCRIPTION)
    parser.add_argument("features", metavar="FEATURES.npz", help="feature file (see above)")
    parser.add_argument("--method", required=True, metavar="M", help="plain, aim, sgr, mnnr, sim or krr")
    parser.add_argument("--variant", choices=("reference", "paper"),
                        help="reproduce the reference code or the paper's equations (default: per method)")
    parser.add_argument("--preset", metavar="P",
                        help="the papers' parameters: sysu, sysu-multishot, sysu-indoor, regdb")
    parser.add_argument("--param", metavar="NAME=VALUE", action="append", default=[],
                        help="set one method parameter, overriding the preset (repeatable)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="precision of the computation and of the written distance")
    parser.add_argument("--topk", type=int, metavar="K",
                        help="ranked-list mode (aim, sim, krr; float32): write the top-K gallery rows and "
                        "distances of each query (ranked_index, ranked_dist) to an .npz instead of the Q×G matrix")
    parser.add_argument("--knn", choices=("auto", "exact", "ivf", "hnsw"), default="auto",
                        help="neighbour search of the ranked-list mode (auto: exact up to 50,000 items, IVF beyond)")
    parser.add_argument("--recall-target", type=float, default=0.99, metavar="R",
                        help="ranked-list mode, approximate --knn: recall@k each neighbour search must reach against "
                        "exact search (0: fixed nprobe 16 / 64, efSearch 128, recall not measured)")
    parser.add_argument("--recall-sample", type=int, default=1000, metavar="S",
                        help="rows per neighbour search on which the recall is measured")
    parser.add_argument("--recall-budget", type=float, default=0.25, metavar="F",
                        help="most inner products an approximate search may compute, as a fraction of an exact search's")
    parser.add_argument("--recall-max-products", type=float, default=2e10, metavar="N",
                        help="most inner products an approximate search may compute in all (bounds large searches: "
                        "2e10 is 2%% of a million-item graph)")
    parser.add_argument("--out", required=True, metavar="DIST.npy", help="output file (Q, G), or RANKS.npz with --topk")
    add_threads_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from vireid.features import load_features
    from vireid.io import save_npy_atomic
    from vireid.retrieval import rerank, resolve_rerank

    params = parse_key_values(args.param, "--param", typed=False)
    features = load_features(args.features)
    if args.topk is not None:
        return run_ranked(args, features, params)
    settings = resolve_rerank(args.method, num_gallery=len(features.gallery_feat), variant=args.variant,
                              params=params, preset=args.preset, dtype=args.dtype)
    dist = rerank(settings.method, features.query_feat, features.gallery_feat, variant=settings.variant,
                  params=settings.params, dtype=settings.dtype)
    save_npy_atomic(args.out, np.ascontiguousarray(dist))
    shown = ", ".join(f"{name}={value}" for name, value in settings.params.items()) or "no parameters"
    print(f"{settings.method} ({settings.variant}, {shown}, {settings.dtype}): "
          f"{dist.shape[0]}x{dist.shape[1]} distance written to {args.out}")
    return 0


def run_ranked(args: argparse.Namespace, features: FeatureSet, params: dict[str, str]) -> int:
    """``--topk``: million-scale ranked lists (:func:`vireid.retrieval.ranked.rerank_ranked`)."""
    import json
    import logging
    import sys

    import numpy as np

    from vireid.errors import InputError
    from vireid.io import save_npz_atomic
    from vireid.retrieval.knn import RecallTarget
    from vireid.retrieval.ranked import RankedOptions, rerank_ranked

    if args.dtype != "float32":
        raise InputError("--topk (ranked-list mode) computes in float32; drop --dtype float64")
    if args.recall_target < 0:
        raise InputError(f"--recall-target {args.recall_target}: must be in (0, 1], or 0 for fixed parameters")
    recall = None if args.recall_target == 0 else RecallTarget(
        target=args.recall_target, sample=args.recall_sample, max_scan_fraction=args.recall_budget,
        max_scan_products=args.recall_max_products)
    handler = logging.StreamHandler(sys.stdout)  # one line per neighbour search, as it is decided
    handler.setFormatter(logging.Formatter("%(message)s"))
    knn_log = logging.getLogger("vireid.retrieval.knn")
    knn_log.addHandler(handler)
    level = knn_log.level
    knn_log.setLevel(logging.INFO)
    try:
        result = rerank_ranked(
            args.method, features.query_feat, features.gallery_feat, topk=args.topk, params=params,
            variant=args.variant, preset=args.preset, options=RankedOptions(knn=args.knn, recall=recall, progress=True))
    finally:
        knn_log.removeHandler(handler)
        knn_log.setLevel(level)
    meta = {"method": args.method, "topk": args.topk, "knn": args.knn,
            "recall_target": None if recall is None else recall.target, "searches": result.knn_summary()}
    save_npz_atomic(args.out, ranked_index=result.ranked_index, ranked_dist=result.ranked_dist,
                    meta_json=np.array(json.dumps(meta)))
    print(f"{args.method} ranked lists (top {args.topk}, knn {args.knn}): {result.ranked_index.shape[0]} queries "
          f"written to {args.out}")
    return 0
