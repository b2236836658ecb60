"""``vireid evaluate``: metrics of a feature file (or of a distance / ranked lists computed from it)."""

from __future__ import annotations

import argparse
import logging
import sys
import zipfile
import zlib
from pathlib import Path

from typing import TYPE_CHECKING

from vireid.cli import add_subcommand
from vireid.cli.options import add_threads_option, parse_key_values

if TYPE_CHECKING:
    import numpy as np

    from vireid.evaluation.evaluator import ProtocolEvaluation
    from vireid.evaluation.report import TrialDistance
    from vireid.features import FeatureSet

    Reported = tuple[str, ProtocolEvaluation, TrialDistance]
    """A method in the HTML report: name, evaluation, distance of one trial."""

PROTOCOL_CHOICES = ("sysu", "regdb", "llcm", "market")

log = logging.getLogger(__name__)

DESCRIPTION = """\
Evaluate FEATURES.npz (keys query_feat, gallery_feat, query_id, gallery_id, query_cam, gallery_cam;
optional trial_query_index / trial_gallery_index for several trials) under a protocol and print
CMC rank-1/5/10/20, mAP and mINP in percent. The default distance is the negative inner product of
L2-normalised features; a file from an XIV model (key gallery_feat_x) uses XIV's Eq. 2 distance instead. Queries without a valid true match are skipped and counted, as the reference
evaluators do. --protocol is the metric rule: sysu (AGW eval_sysu: cam-3 queries ignore cam-2 gallery,
identity-level CMC), regdb (AGW eval_regdb: nothing removed, image-level CMC), llcm (LLCM eval_llcm:
same identity and camera removed, identity-level CMC), market (Market-1501/torchreid: same identity
and camera removed, image-level CMC). The data protocol of `vireid extract --protocol` chose which
images are queries and gallery and recorded its metric rule in the file (meta_json); without
--protocol that rule is used (the same names; sysu-agw uses sysu), and a --protocol that differs
from it is warned about.

--rerank takes one method or a comma-separated list (aim,sim,krr). With --tune-on val, each method's
parameters are chosen by a grid search on the validation identities stored in the file (keys
val_query_feat, ...; written by `vireid extract` when the training run held identities out): the best
--tune-metric over the validation trials wins, then the test set is evaluated once with the preset
(or default) values and once with the chosen values; both are printed and written to --json. Grids:
aim k1 2,4,8,20,30 x k2 1,2,6; sgr lam 0.01,0.1,0.3 x K 1,3,5,9; mnnr kq 4,8,12 x kg 5,10,20 x
alpha 0.3,0.6,0.9; sim lam 0.01,0.1 x K 1,3,9 x kq 4,12 x kg 5,20 x alpha 0.3,0.6,0.9; krr k1 5,10,20
x k2 1,3,6 x lam 0.1,0.3,0.6 (other parameters keep the preset or default; --param values are never
searched).

--html writes one self-contained page (no network needed to view it): the CMC curves of every
evaluated method (zoomable; hover for rank and value) beside the table of rank-1/5/10/20, mAP and
mINP, and rank lists: for 6 queries of the first trial (drawn with seed 0), one row per method with
its top 10 gallery images, each tile framed green (the query's identity) or red and labelled with
identity, camera and distance. With --rerank the plain distance is added for comparison when the
list does not name it. Thumbnails come from the file's query_path / gallery_path (written by
`vireid extract`); tiles of absent or unreadable images show no thumbnail."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(subparsers, "evaluate", "Evaluate features, a distance matrix or ranked lists "
                            "under a protocol (CMC, mAP, mINP).", DESCRIPTION)
    parser.add_argument("features", metavar="FEATURES.npz", help="feature file (see above)")
    parser.add_argument("--protocol", choices=PROTOCOL_CHOICES,
                        help="metric rule: which gallery items a query's ranking ignores and whether the CMC is "
                        "identity- or image-level (see above) (default: the rule the file's data protocol recorded, "
                        "written by `vireid extract`)")
    parser.add_argument("--json", metavar="OUT.json", help="also write the result as JSON (metrics as fractions, "
                        "protocol, distance method and parameters, per-trial results, skipped queries)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--distance", metavar="D.npy", help="evaluate this precomputed (Q, G) distance over all "
                        "rows of FEATURES.npz (smaller = closer) instead of computing one")
    source.add_argument("--ranked", metavar="RANKS.npz", help="evaluate ranked lists: key ranked_index (Q, K) of "
                        "gallery rows, best first, -1 pads; positives outside a list count as not retrieved")
    source.add_argument("--rerank", metavar="M[,M...]", help="re-rank with method M (plain, aim, sgr, mnnr, sim, "
                        "krr) per trial, then evaluate; a comma-separated list evaluates each")
    parser.add_argument("--variant", choices=("reference", "paper"),
                        help="with --rerank: reproduce the reference code or the paper's equations "
                        "(unset: the method's own default)")
    parser.add_argument("--preset", metavar="P", help="with --rerank: the papers' parameters for a protocol "
                        "(sysu, sysu-multishot, sysu-indoor, regdb)")
    parser.add_argument("--param", metavar="NAME=VALUE", action="append", default=[],
                        help="with --rerank of one method: set one parameter, overriding the preset (repeatable)")
    parser.add_argument("--tune-on", choices=("val",), default=None,
                        help="with --rerank: also choose each method's parameters by a grid search on the file's "
                        "validation identities (never the test set) and report preset and tuned results")
    parser.add_argument("--tune-metric", choices=("mAP", "r1", "mINP"), default=None,
                        help="with --tune-on: the validation metric the grid search maximises (default: mAP)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="precision of the computed distance (plain or re-ranked)")
    parser.add_argument("--max-rank", type=int, default=20, help="longest CMC rank reported")
    parser.add_argument("--html", metavar="OUT.html", help="also write an HTML report: CMC curves and metric "
                        "table of every evaluated method, rank lists of 6 seeded queries with thumbnails "
                        "(see above; not with --ranked)")
    parser.add_argument("--image-root", metavar="DIR", help="with --html: the folder the file's relative image "
                        "paths are under (default: the dataset folder recorded by `vireid extract`, else the "
                        "current folder)")
    add_threads_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from vireid.errors import InputError
    from vireid.evaluation.evaluator import evaluate_precomputed, evaluate_ranked_lists
    from vireid.evaluation.report import format_table, recorded_distance, write_result_json
    from vireid.features import load_features

    if args.max_rank < 1:
        raise InputError(f"--max-rank must be >= 1, got {args.max_rank}")
    rerank_only = [flag for flag, value in (("--variant", args.variant), ("--preset", args.preset),
                                            ("--param", args.param), ("--tune-on", args.tune_on)) if value]
    if rerank_only and not args.rerank:
        raise InputError(f"{', '.join(rerank_only)} only apply with --rerank")
    if args.tune_metric and not args.tune_on:
        raise InputError("--tune-metric only applies with --tune-on")
    if args.html and args.ranked:
        raise InputError("--html needs distances for its rank lists: not available with --ranked")
    if args.image_root and not args.html:
        raise InputError("--image-root only applies with --html")
    methods = [m.strip() for m in args.rerank.split(",")] if args.rerank else []
    if args.rerank and (not all(methods) or len(set(methods)) != len(methods)):
        raise InputError(f"--rerank {args.rerank!r}: expected distinct method names separated by commas")
    if args.param and len(methods) > 1:
        raise InputError("--param applies to one method; give --rerank a single method to set parameters")
    features = load_features(args.features)
    args.protocol = metric_rule(args.protocol, features, args.features)
    if args.tune_on or len(methods) > 1:
        return _several(args, features, methods)
    if args.distance:
        dist = _load_npy(Path(args.distance))
        evaluation = evaluate_precomputed(features, dist, args.protocol, source=args.distance,
                                          max_rank=args.max_rank)
        name = f"precomputed ({Path(args.distance).name})"
        reported = [(name, evaluation, lambda t: np.asarray(dist[np.ix_(*features.trial_rows(t))]))]
    elif args.ranked:
        ranked_index = _load_ranked(Path(args.ranked))
        evaluation = evaluate_ranked_lists(features, ranked_index, args.protocol, source=args.ranked,
                                           max_rank=args.max_rank)
        name = f"ranked lists ({Path(args.ranked).name})"
        reported = []
    elif args.rerank:
        from vireid.evaluation.tuning import evaluate_rerank, smallest_gallery
        from vireid.retrieval import resolve_rerank

        settings = resolve_rerank(methods[0], num_gallery=smallest_gallery(features), variant=args.variant,
                                  params=parse_key_values(args.param, "--param", typed=False), preset=args.preset,
                                  dtype=args.dtype)
        evaluation = evaluate_rerank(features, args.protocol, settings, max_rank=args.max_rank)
        name = f"{settings.method} ({settings.variant})"
        reported = [(name, evaluation, recorded_distance(features, evaluation.distance))]
        if settings.method != "plain" and args.html:
            reported.insert(0, _baseline(args, features))
    else:
        name, evaluation, distance = _baseline(args, features)
        reported = [(name, evaluation, distance)]
    rows = [(f"trial {t}", r) for t, r in enumerate(evaluation.trials)] if len(evaluation.trials) > 1 else []
    mean = evaluation.mean
    rows.append((name if len(evaluation.trials) == 1 else f"{name}, mean", mean))
    print(f"protocol {evaluation.protocol.name}: {evaluation.protocol.removal}; "
          f"{evaluation.protocol.cmc_kind}-level CMC; {len(evaluation.trials)} trial(s)")
    print(format_table(rows))
    if mean.num_skipped:
        print(f"skipped {mean.num_skipped} of {mean.num_queries} queries without a valid true match in the gallery")
    if args.json:
        write_result_json(args.json, evaluation)
        print(f"wrote {args.json}")
    if args.html:
        _write_report(args, features, reported)
    return 0


def metric_rule(given: str | None, features: FeatureSet, source: str) -> str:
    """The metric rule to evaluate with: ``given`` (``--protocol``), else the one the file's data
    protocol recorded in ``meta_json`` (said on the console); a given rule that differs from the
    recorded one is evaluated, with a warning."""
    from vireid.errors import InputError

    recorded = features.meta.get("protocol")
    name, metric = (recorded.get("name"), recorded.get("metric")) if isinstance(recorded, dict) else (None, None)
    if given is None:
        if metric is None:
            raise InputError(f"{source}: its metadata (meta_json) names no protocol; give --protocol "
                             f"{{{','.join(PROTOCOL_CHOICES)}}}")
        if metric not in PROTOCOL_CHOICES:
            raise InputError(f"{source}: meta_json names the metric rule {metric!r}, not one of "
                             f"{', '.join(PROTOCOL_CHOICES)}; give --protocol")
        log.info("protocol %s: the metric rule of data protocol %s, read from %s", metric, name or metric, source)
        return metric
    if metric is not None and metric != given:
        print(f"vireid evaluate: warning: --protocol {given} differs from the metric rule {metric!r} of the data "
              f"protocol {name or metric!r} recorded in {source}; evaluating with {given}", file=sys.stderr)
    return given


def _baseline(args: argparse.Namespace, features: FeatureSet) -> Reported:
    """The distance without re-ranking: XIV's Eq. 2 for a file from an XIV model, else plain."""
    import numpy as np

    from vireid.evaluation.evaluator import evaluate_features
    from vireid.evaluation.report import recorded_distance

    if "gallery_feat_x" in features.extras:
        from vireid.models.methods.xiv import xiv_distance

        dtype = np.dtype(args.dtype)
        evaluation = evaluate_features(
            features, args.protocol, distance_fn=lambda trial: xiv_distance(trial, dtype=dtype),
            distance_info={"method": "xiv", "equation": "XIV Eq. 2", "dtype": args.dtype}, max_rank=args.max_rank)
        return "xiv (Eq. 2)", evaluation, lambda t: xiv_distance(features.trial(t), dtype=dtype)
    evaluation = evaluate_features(features, args.protocol, dtype=np.dtype(args.dtype), max_rank=args.max_rank)
    return "plain", evaluation, recorded_distance(features, evaluation.distance)


def _write_report(args: argparse.Namespace, features: FeatureSet, reported: list[Reported]) -> None:
    """The HTML report of ``reported`` (name, evaluation, trial distance): mean CMC curves and
    metrics, rank lists of the first trial."""
    from vireid.evaluation.metrics import get_protocol
    from vireid.evaluation.report import REPORT_QUERIES, method_rank_lists, write_html_report

    rank_lists = method_rank_lists(features, {name: distance for name, _, distance in reported},
                                   get_protocol(args.protocol), image_root=_image_root(args, features))
    trials = features.num_trials
    write_html_report(
        args.html, f"{Path(args.features).name}: protocol {args.protocol}",
        [(name, evaluation.mean) for name, evaluation, _ in reported],
        rank_lists=rank_lists,
        notes=[f"Features {args.features}; protocol {args.protocol}; "
               + (f"mean over {trials} trials." if trials > 1 else "one trial.")],
        rank_list_note=f"{min(REPORT_QUERIES, len(features.trial_rows(0)[0]))} queries of "
                       + (f"trial 1 of {trials}" if trials > 1 else "the file") + " drawn with seed 0.")
    print(f"wrote {args.html}")


def _image_root(args: argparse.Namespace, features: FeatureSet) -> Path | None:
    """--image-root, else the dataset folder `vireid extract` recorded (when it is a folder), else None."""
    if args.image_root:
        return Path(args.image_root)
    recorded = (features.meta.get("dataset") or {}).get("root")
    return Path(recorded) if recorded and Path(recorded).is_dir() else None


def _load_npy(path: Path) -> np.ndarray:
    import numpy as np

    from vireid.errors import InputError

    if not path.is_file():
        raise InputError(f"{path}: distance file not found")
    try:
        dist = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npy file ({exc})") from None
    if not isinstance(dist, np.ndarray):
        raise InputError(f"{path}: not a .npy array")
    return dist


def _load_ranked(path: Path) -> np.ndarray:
    import numpy as np

    from vireid.errors import InputError

    if not path.is_file():
        raise InputError(f"{path}: ranked-list file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "ranked_index" not in z.files:
                raise InputError(f"{path}: missing key ranked_index (has: {', '.join(z.files) or 'nothing'})")
            return z["ranked_index"]
    except InputError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise InputError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc}); truncated or damaged?") from None


def _several(args: argparse.Namespace, features: FeatureSet, methods: list[str]) -> int:
    """Each method of ``--rerank``; with ``--tune-on val`` each with its preset (or default) values and
    with the values its grid search picks on the validation identities. One table, one JSON."""
    from vireid.evaluation.report import evaluation_to_dict, format_table, recorded_distance
    from vireid.evaluation.tuning import evaluate_rerank, preset_and_tuned, smallest_gallery
    from vireid.io import write_json_atomic
    from vireid.retrieval import METHODS, resolve_rerank

    params = parse_key_values(args.param, "--param", typed=False)
    metric = args.tune_metric or "mAP"
    for method in methods:                                   # every name checked before any work
        resolve_rerank(method, variant=args.variant, params=params, preset=args.preset, dtype=args.dtype)
    rows, entries, notes = [], {}, []
    reported: list[Reported] = [_baseline(args, features)] if args.html and "plain" not in methods else []
    base = args.preset or "defaults"
    for method in methods:
        if args.tune_on and METHODS[method].params:
            both = preset_and_tuned(features, args.protocol, method, source=args.features, metric=metric,
                                    variant=args.variant, preset=args.preset, fixed=params, dtype=args.dtype,
                                    max_rank=args.max_rank, progress=True)
            tuning = both.tuning
            chosen = ", ".join(f"{k}={v:g}" for k, v in tuning.chosen.items() if k in tuning.grid)
            rows += [(f"{method} ({base})", both.preset.mean), (f"{method} (tuned on val: {chosen})", both.tuned.mean)]
            reported += [(f"{method} ({base})", both.preset, recorded_distance(features, both.preset.distance)),
                         (f"{method} (tuned on val: {chosen})", both.tuned,
                          recorded_distance(features, both.tuned.distance))]
            entries[method] = both.to_dict()
            base_score = "n/a" if tuning.base_score is None else f"{100 * tuning.base_score:.2f}"
            notes.append(f"{method}: validation {metric} {base_score} with {base}, {100 * tuning.best['score']:.2f} "
                         f"with {chosen} ({len(tuning.points)} grid points, {len(tuning.skipped)} skipped)")
        else:
            settings = resolve_rerank(method, num_gallery=smallest_gallery(features), variant=args.variant,
                                      params=params, preset=args.preset, dtype=args.dtype)
            evaluation = evaluate_rerank(features, args.protocol, settings, max_rank=args.max_rank)
            rows.append((f"{method} ({settings.variant})", evaluation.mean))
            reported.append((f"{method} ({settings.variant})", evaluation,
                             recorded_distance(features, evaluation.distance)))
            entries[method] = evaluation_to_dict(evaluation)
    print(f"protocol {args.protocol}; {features.num_trials} trial(s); mean over trials"
          + (f"; parameters tuned on the validation identities by {metric}" if args.tune_on else ""))
    print(format_table(rows))
    for note in notes:
        print(note)
    if args.json:
        write_json_atomic(args.json, {"features": str(args.features), "protocol": args.protocol,
                                      "tune": {"on": args.tune_on, "metric": metric} if args.tune_on else None,
                                      "methods": entries})
        print(f"wrote {args.json}")
    if args.html:
        reported.sort(key=lambda entry: entry[1].distance.get("method") != "plain")   # plain first
        _write_report(args, features, reported)
    return 0
