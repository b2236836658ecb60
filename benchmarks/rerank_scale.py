"""Ranked-list re-ranking at scale: time, peak RSS, fidelity and kNN recall of ``aim``, ``sim``, ``krr``.

    python benchmarks/rerank_scale.py --gallery 1000000 --queries 10000 --dim 512
    python benchmarks/rerank_scale.py --gallery 20000 --queries 2000 --compare dense    # fidelity (a)
    python benchmarks/rerank_scale.py --gallery 100000 --queries 2000 --knn ivf --compare exact --fixed-baseline \
        --distribution lowrank,isotropic,heavy,offset --reference-cache runs/rerank_scale_reference.json   # (b)
    python benchmarks/rerank_scale.py --gallery 100000 --queries 2000 --distribution heavy --recall-curve 1000

Features (``--distribution``, :data:`DISTRIBUTIONS`) are identity-clustered: ``lowrank`` (the default)
has identity centres in a 16-dimensional subspace of R^dim, within-identity noise in that subspace, a
per-identity modality offset for the queries (the other modality) and small isotropic noise in all
``dim`` dimensions; ``lowrank64`` the same in 64 dimensions; ``isotropic`` clusters spanning all
dimensions; ``heavy`` Zipf-like identity sizes; ``offset`` a strong common and per-identity modality
offset. Each method runs in a fresh subprocess that regenerates the features from the seed, so its
peak RSS (``ru_maxrss``) is its own; the time is the ``rerank_ranked`` call alone (index build,
recall targeting, graph, re-ranking). Metrics use :func:`vireid.evaluation.metrics.evaluate_ranked`
with the ``regdb`` rule (nothing removed, image-level CMC); positives outside a ranked list count as
not retrieved. Each approximate run prints what every neighbour search chose and the recall it
measured (``--recall-target``, default 0.99; 0 = the fixed parameters). ``--fixed-baseline`` also
runs the fixed parameters (nprobe 16 / query_nprobe 64) and prints the time ratio against them.

``--recall-curve S`` prints instead, per distribution, the IVF recall@k and scanned fraction of the
gallery graph (k = 31: AIM's k1 + self) on ``S`` sampled gallery rows and of the query lists
(k = 100) for every nprobe of the targeting ladder, with the time of an exact search of all rows
extrapolated from its inner products; with ``--knn hnsw``, the same for every efSearch up to 1024
of an HNSW index (and its build time), with the HNSW search of all rows extrapolated from the
sample's.

``--reference-cache FILE.json`` keeps every run; the dense and exact-kNN runs (``--compare``, or
``--knn exact`` itself) are reused from it: they do not depend on the recall settings, so tuning those
re-runs only the approximate side (the ``--fixed-baseline`` runs always run, beside the targeted ones,
so that their time ratio comes from one job). ``--report-only`` prints the tables from the cache
alone, e.g. after the exact and the approximate runs were made in separate jobs. A cached entry is keyed by the arguments that determine it (sizes,
distribution, method, mode, kNN), not by the code: delete the file after changing a method.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vireid.io import write_json_atomic

_GENERATOR_ARGS = ("gallery", "queries", "dim", "topk", "per_identity", "seed")
_IVF_ARGS = ("nlist", "kmeans_iterations")


#: Named feature distributions: generator arguments (see :func:`make_features`); ``lowrank`` is the default.
DISTRIBUTIONS: dict[str, dict[str, float | int | None]] = {
    # identity centres in a 16-d subspace of R^dim, per-identity query offset, small isotropic noise
    "lowrank": {"intrinsic": 16, "noise": 0.35, "modality_gap": 0.6, "modality_shift": 0.0, "size_skew": None,
                "ambient_noise": 0.05},
    # the same in a 64-d subspace (noise and offset scaled to a similar plain rank-1)
    "lowrank64": {"intrinsic": 64, "noise": 0.8, "modality_gap": 1.4, "modality_shift": 0.0, "size_skew": None,
                  "ambient_noise": 0.05},
    # identity clusters spanning all dim dimensions (the golden data's model), no subspace
    "isotropic": {"intrinsic": None, "noise": 2.2, "modality_gap": 2.2, "modality_shift": 0.0, "size_skew": None,
                  "ambient_noise": 0.0},
    # lowrank with Zipf-like identity sizes (probability of identity i ∝ i^-1.1): a few identities with
    # thousands of images (16 % of a 100k gallery in one), the median with three
    "heavy": {"intrinsic": 16, "noise": 0.35, "modality_gap": 0.6, "modality_shift": 0.0, "size_skew": 1.1,
              "ambient_noise": 0.05},
    # lowrank with a strong modality offset: every query also shifted by one common vector (0.5 per
    # subspace dimension, i.e. half the spread of the identity centres)
    "offset": {"intrinsic": 16, "noise": 0.35, "modality_gap": 0.6, "modality_shift": 0.5, "size_skew": None,
               "ambient_noise": 0.05},
}


def make_features(n_gallery: int, n_query: int, dim: int, *, intrinsic: int | None, per_identity: int,
                  noise: float, modality_gap: float, ambient_noise: float, seed: int, modality_shift: float = 0.0,
                  size_skew: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Identity-clustered float32 features ``(query, gallery, query_id, gallery_id)``.

    Identity centres ``N(0, I_r)`` live in a random ``intrinsic``-dimensional subspace of R^dim (all of
    it when ``None``); every image adds ``noise`` within the subspace and ``ambient_noise`` in all
    dimensions; queries (the other modality) add a per-identity offset of scale ``modality_gap`` and a
    common offset of norm ``modality_shift``·sqrt(r). Gallery identities are uniform
    (``per_identity`` images on average) or, with ``size_skew`` = s, drawn with probability ∝ rank^−s.
    """
    rng = np.random.default_rng(seed)
    rank = dim if intrinsic is None else intrinsic
    n_ids = max(1, n_gallery // per_identity)
    basis = None if intrinsic is None else np.linalg.qr(rng.standard_normal((dim, rank)))[0].T.astype(np.float32)
    centres = rng.standard_normal((n_ids, rank)).astype(np.float32)
    if size_skew is None:
        gallery_id = np.sort(rng.integers(0, n_ids, n_gallery))
    else:
        weights = np.arange(1, n_ids + 1, dtype=np.float64) ** -size_skew
        gallery_id = np.sort(rng.choice(n_ids, n_gallery, p=weights / weights.sum()))
    present = np.unique(gallery_id)
    query_id = present[rng.integers(0, len(present), n_query)]
    offsets = modality_gap * rng.standard_normal((n_ids, rank)).astype(np.float32)
    if modality_shift:
        offsets += modality_shift * rng.standard_normal(rank).astype(np.float32)

    def embed(latent_ids: np.ndarray, shift: np.ndarray | None) -> np.ndarray:
        out = np.empty((len(latent_ids), dim), dtype=np.float32)
        step = 65536
        for start in range(0, len(latent_ids), step):
            ids = latent_ids[start:start + step]
            latent = centres[ids] + noise * rng.standard_normal((len(ids), rank), dtype=np.float32)
            if shift is not None:
                latent += shift[ids]
            block = latent if basis is None else latent @ basis
            if ambient_noise:
                block += ambient_noise * rng.standard_normal((len(ids), dim), dtype=np.float32)
            out[start:start + step] = block
        return out

    gallery = embed(gallery_id, None)
    query = embed(query_id, offsets)
    return query, gallery, query_id.astype(np.int64), gallery_id.astype(np.int64)


def features_for(args: argparse.Namespace, distribution: str):
    return make_features(args.gallery, args.queries, args.dim, per_identity=args.per_identity, seed=args.seed,
                         **DISTRIBUTIONS[distribution])


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_child(args: argparse.Namespace) -> dict:
    """One measurement in this process: ranked (or dense / plain) mode of one method on one distribution."""
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    from vireid.evaluation.metrics import evaluate_distance, evaluate_ranked
    from vireid.retrieval.knn import IvfParams, NeighbourIndex, RecallTarget, resolve_knn
    from vireid.retrieval.ranked import RankedOptions, rerank_ranked

    query, gallery, query_id, gallery_id = features_for(args, args.distribution)
    q_cam, g_cam = np.ones(len(query_id), np.int64), np.full(len(gallery_id), 2, np.int64)
    ivf = IvfParams(**{name: getattr(args, name) for name in _IVF_ARGS if getattr(args, name) is not None})
    recall = None if args.recall_target == 0 else RecallTarget(target=args.recall_target, sample=args.recall_sample,
                                                               max_scan_fraction=args.recall_budget)
    rss_before = peak_rss_gib()
    searches: list[dict] = []
    start = time.perf_counter()
    if args.mode == "dense":
        from vireid.retrieval import aim, kreciprocal, sim

        dense = {"aim": aim.aim, "sim": sim.sim, "krr": kreciprocal.krr}[args.method]
        result = evaluate_distance(dense(query, gallery), query_id, gallery_id, q_cam, g_cam, "regdb")
        knn_used = "dense"
    elif args.mode == "plain":
        index = NeighbourIndex(gallery, args.knn, ivf=ivf, recall=recall, seed=args.seed, progress=args.progress)
        ranked_index, _ = index.search(query, args.topk)
        result = evaluate_ranked(ranked_index, query_id, gallery_id, q_cam, g_cam, "regdb")
        knn_used, searches = index.method, [r.to_dict() for r in index.reports]
    else:
        options = RankedOptions(knn=args.knn, ivf=ivf, recall=recall, seed=args.seed, progress=args.progress)
        ranked = rerank_ranked(args.method, query, gallery, topk=args.topk, options=options)
        result = evaluate_ranked(ranked.ranked_index, query_id, gallery_id, q_cam, g_cam, "regdb")
        knn_used = resolve_knn(args.knn, len(gallery) + (len(query) if args.method == "krr" else 0))
        searches = ranked.knn_summary()
    seconds = time.perf_counter() - start
    return {"method": args.method, "mode": args.mode, "knn": knn_used, "distribution": args.distribution,
            "recall_target": args.recall_target if knn_used in ("ivf", "hnsw") else None, "seconds": seconds,
            "peak_rss_gib": peak_rss_gib(), "features_rss_gib": rss_before, "rank1": result.rank(1),
            "mAP": result.mAP, "searches": searches}


def recall_curve(args: argparse.Namespace, distribution: str) -> list[dict]:
    """Recall and cost of every nprobe (``--knn ivf`` or ``auto``) or efSearch (``--knn hnsw``, up to
    1024) of the targeting ladder (module docstring)."""
    import faiss

    from vireid.retrieval.knn import IvfParams, NeighbourIndex, RecallTarget, _probe_pairs, _recall

    faiss.omp_set_num_threads(args.threads)
    query, gallery, _, _ = features_for(args, distribution)
    method = "hnsw" if args.knn == "hnsw" else "ivf"
    ivf = IvfParams(**{name: getattr(args, name) for name in _IVF_ARGS if getattr(args, name) is not None})
    started = time.perf_counter()
    index = NeighbourIndex(gallery, method, ivf=ivf, recall=RecallTarget(), seed=args.seed)
    build_seconds = time.perf_counter() - started
    del gallery
    qn = np.ascontiguousarray(query / np.linalg.norm(query, axis=1, keepdims=True), dtype=np.float32)
    rng = np.random.default_rng(args.seed)
    own = np.sort(rng.choice(len(index), min(args.recall_curve, len(index)), replace=False))
    rows = []
    for name, x, k, self_rows in (("gallery graph", index.base[own], 31, own), ("query lists", qn, 100, None)):
        started = time.perf_counter()
        truth = index._exact_search(x, k, 0, len(index), "")[0]
        exact_rate = len(x) * len(index) / (time.perf_counter() - started)   # inner products per second
        total_rows = len(index) if self_rows is not None else len(qn)
        row = {"distribution": distribution, "search": name, "k": k, "method": method,
               "build_seconds": build_seconds, "exact_seconds_all_rows": total_rows * len(index) / exact_rate}
        if method == "hnsw":
            for value in (ef for ef in index._ladder(k) if ef <= 1024):
                started = time.perf_counter()
                found, fraction = index._hnsw_sample(x, k, 0, len(index), value)
                seconds = (time.perf_counter() - started) * total_rows / len(x)
                rows.append({**row, "parameter": "efSearch", "value": value, "recall": _recall(found, truth, self_rows),
                             "scan_fraction": fraction, "search_seconds_all_rows": seconds})
            continue
        probes = index._probe_rows(x, self_rows, index._ladder(k)[-1])
        fractions = index._scan_fractions(probes, 0, len(index))
        for value in index._ladder(k):
            if fractions[value - 1] > 0.5:
                break
            found = index._ivf_search(x, _probe_pairs(probes[:, :value]), k, 0, len(index), "")[0]
            rows.append({**row, "parameter": "nprobe", "value": value, "recall": _recall(found, truth, self_rows),
                         "scan_fraction": float(fractions[value - 1]), "search_seconds_all_rows": None})
    return rows


def spawn(args: argparse.Namespace, method: str, mode: str, knn: str, distribution: str, recall_target: float) -> dict:
    cmd = [sys.executable, __file__, "--child", "--method", method, "--mode", mode, "--knn", knn,
           "--distribution", distribution, "--recall-target", str(recall_target),
           "--recall-sample", str(args.recall_sample), "--recall-budget", str(args.recall_budget)]
    for name in _GENERATOR_ARGS + ("threads",):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    for name in _IVF_ARGS:
        if getattr(args, name) is not None:
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.progress:
        cmd.append("--progress")
    # idle OpenMP threads sleep instead of spinning: on a shared machine spinning costs up to 10x
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def reference_key(args: argparse.Namespace, run: tuple[str, str, str, str, float]) -> str:
    """Cache key of a run: everything that determines its result (not the code)."""
    method, mode, knn, distribution, recall_target = run
    recall = {} if not recall_target else {"recall_sample": args.recall_sample, "recall_budget": args.recall_budget}
    return json.dumps({"method": method, "mode": mode, "knn": knn, "distribution": distribution,
                       "recall_target": recall_target, **recall, **{name: getattr(args, name) for name in _GENERATOR_ARGS},
                       **{name: getattr(args, name) for name in _IVF_ARGS}}, sort_keys=True)


def load_cache(path: str | None) -> dict[str, dict]:
    if path is None or not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def describe_searches(row: dict) -> str:
    parts = []
    for search in row["searches"]:
        if search["outcome"] == "exact":
            continue
        setting = (f"{search['parameter']} {search['value']}" if search["parameter"] else search["method"])
        recall = "" if search["recall"] is None else f" recall {search['recall']:.3f}"
        flag = {"met": "", "fixed": "", "exact, few rows": " (exact: few rows)", "exact fallback": " (exact fallback)",
                "below target": " (BELOW TARGET)"}
        parts.append(f"{search['name']}: {setting}{recall}{flag[search['outcome']]}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--methods", default="aim,sim,krr")
    parser.add_argument("--distribution", default="lowrank",
                        help=f"comma-separated feature distributions: {', '.join(DISTRIBUTIONS)}")
    parser.add_argument("--knn", default="auto", choices=("auto", "exact", "ivf", "hnsw"))
    parser.add_argument("--topk", type=int, default=100)
    parser.add_argument("--compare", default="none", choices=("none", "dense", "exact"),
                        help="dense: also the dense exact method; exact: also ranked mode with --knn exact")
    parser.add_argument("--fixed-baseline", action="store_true",
                        help="also run the approximate search with its fixed parameters (no recall target)")
    parser.add_argument("--recall-target", type=float, default=0.99, help="0: fixed parameters")
    parser.add_argument("--recall-sample", type=int, default=1000)
    parser.add_argument("--recall-budget", type=float, default=0.25)
    parser.add_argument("--per-identity", type=int, default=20, help="gallery images per identity (on average)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: vireid.retrieval.knn)")
    parser.add_argument("--kmeans-iterations", type=int, default=None, help="IVF k-means iterations")
    parser.add_argument("--reference-cache", default=None,
                        help="JSON file keeping every run; the dense and exact-kNN runs are reused from it")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: print the tables from the --reference-cache runs of these arguments")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1,
                        help="measurements run at once (>1 only for fidelity: concurrent runs share the cores)")
    parser.add_argument("--recall-curve", type=int, default=0, metavar="S",
                        help="print the IVF recall / cost ladder on S sampled gallery rows instead")
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the plain ranking (--no-plain: skip it, e.g. one method per locked run)")
    parser.add_argument("--json", default=None, help="also write every result row to this JSON file")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="aim", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="ranked", help=argparse.SUPPRESS)
    args = parser.parse_args()
    distributions = args.distribution.split(",")
    unknown = sorted(set(distributions) - set(DISTRIBUTIONS))
    if unknown:
        parser.error(f"unknown distribution {', '.join(unknown)} (choose from {', '.join(DISTRIBUTIONS)})")
    if args.child:
        print(json.dumps(run_child(args)))
        return
    if args.recall_curve:
        print(f"gallery {args.gallery:,}  queries {args.queries:,}  d {args.dim}")
        print(f"{'distribution':12} {'search':14} {'k':>4} {'parameter':>12} {'recall':>7} {'scanned %':>9} "
              f"{'search s (all rows)':>19} {'exact s (all rows)':>18} {'build s':>7}")
        rows = []
        for distribution in distributions:
            for row in recall_curve(args, distribution):
                rows.append(row)
                seconds = row["search_seconds_all_rows"]
                print(f"{row['distribution']:12} {row['search']:14} {row['k']:4d} "
                      f"{row['parameter'] + ' ' + str(row['value']):>12} {row['recall']:7.4f} "
                      f"{100 * row['scan_fraction']:9.2f} {'' if seconds is None else f'{seconds:.1f}':>19} "
                      f"{row['exact_seconds_all_rows']:18.1f} {row['build_seconds']:7.1f}", flush=True)
        if args.json:
            write_json_atomic(args.json, rows)
        return

    print(f"gallery {args.gallery:,}  queries {args.queries:,}  d {args.dim}  topk {args.topk}  knn {args.knn}  "
          f"recall target {args.recall_target}  threads {args.threads}")
    runs = []
    for distribution in distributions:
        if args.plain:
            runs.append(("plain", "plain", args.knn, distribution, args.recall_target))
        for method in args.methods.split(","):
            runs.append((method, "ranked", args.knn, distribution, 0.0 if args.knn == "exact" else args.recall_target))
            if args.fixed_baseline:
                runs.append((method, "ranked", args.knn, distribution, 0.0))
            if args.compare == "dense":
                runs.append((method, "dense", args.knn, distribution, 0.0))
            elif args.compare == "exact":
                runs.append((method, "ranked", "exact", distribution, 0.0))
    cache = load_cache(args.reference_cache)
    reference = {run for run in runs if run[1] == "dense" or run[2] == "exact"}  # reused from the cache

    def measure(run: tuple[str, str, str, str, float]) -> dict:
        key = reference_key(args, run)
        if key in cache and (run in reference or args.report_only):
            return {**cache[key], "cached": True}
        if args.report_only:
            raise SystemExit(f"--report-only: no cached result for {key}")
        result = spawn(args, *run)
        cache[key] = result
        if args.reference_cache is not None:
            write_json_atomic(args.reference_cache, cache)
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(measure, runs))
    if args.json:
        write_json_atomic(args.json, results)
    print(f"{'distribution':12} {'method':7} {'run':24} {'seconds':>8} {'peak GiB':>9} {'rank-1 %':>9} {'mAP %':>7}")
    by_run = dict(zip(runs, results))
    for run, row in by_run.items():
        label = f"{row['mode']}/{row['knn']}" + ("" if row["recall_target"] is None else
                                                   f" R={row['recall_target']}" if row["recall_target"] else " fixed")
        label += " (cached)" if row.get("cached") else ""
        print(f"{run[3]:12} {row['method']:7} {label:24} {row['seconds']:8.1f} {row['peak_rss_gib']:9.2f} "
              f"{100 * row['rank1']:9.2f} {100 * row['mAP']:7.2f}")
        if row["searches"] and row["knn"] in ("ivf", "hnsw"):
            print(f"{'':21} {describe_searches(row)}")
    print()
    print(f"{'distribution':12} {'method':7} {'Δ rank-1':>9} {'Δ mAP':>7} {'time / fixed':>12} {'time / exact':>12}")
    for run, row in by_run.items():
        if run[1] != "ranked" or run[2] != args.knn or args.knn == "exact" or (run[4] == 0.0 and args.recall_target):
            continue
        exact = by_run.get((run[0], "ranked", "exact", run[3], 0.0)) or by_run.get((run[0], "dense", args.knn, run[3], 0.0))
        fixed = by_run.get((run[0], "ranked", args.knn, run[3], 0.0)) if args.recall_target else None
        d_r1 = f"{100 * (row['rank1'] - exact['rank1']):+9.2f}" if exact else f"{'':9}"
        d_map = f"{100 * (row['mAP'] - exact['mAP']):+7.2f}" if exact else f"{'':7}"
        t_fixed = f"{row['seconds'] / fixed['seconds']:11.2f}x" if fixed else f"{'':12}"
        t_exact = f"{row['seconds'] / exact['seconds']:11.2f}x" if exact else f"{'':12}"
        print(f"{run[3]:12} {row['method']:7} {d_r1} {d_map} {t_fixed} {t_exact}")


if __name__ == "__main__":
    main()
