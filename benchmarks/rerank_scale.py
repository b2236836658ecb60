"""Ranked-list re-ranking at scale: time, peak RSS and fidelity of ``aim``, ``sim``, ``krr``.

    python benchmarks/rerank_scale.py --gallery 1000000 --queries 10000 --dim 512
    python benchmarks/rerank_scale.py --gallery 20000 --queries 2000 --compare dense    # fidelity (a)
    python benchmarks/rerank_scale.py --gallery 100000 --queries 2000 --knn ivf --compare exact \
        --reference-cache runs/rerank_scale_reference.json                                      # (b)

Features are identity-clustered with a low intrinsic dimension, as real embeddings are: each
identity has a centre in an ``--intrinsic``-dimensional subspace of R^dim, every image adds
within-subspace noise, queries (the other modality) add a per-identity modality offset, and a
small isotropic noise fills all ``dim`` dimensions. Each method runs in a fresh subprocess that
regenerates the features from the seed, so its peak RSS (``ru_maxrss``) is its own; the time is
the ``rerank_ranked`` call alone (index build, graph, re-ranking). Metrics use
:func:`vireid.evaluation.metrics.evaluate_ranked` with the ``regdb`` rule (nothing removed,
image-level CMC); positives outside a ranked list count as not retrieved.

``--recall S`` measures instead how much of the exact neighbour lists the IVF index finds (with the
``--nprobe``/``--query-nprobe``/... settings): the gallery graph on ``S`` sampled rows (k = 21, what
``sim`` needs, and 30, AIM's k1), the query lists (k = 30 and 100), and the k-reciprocal pool graph
(queries + gallery, k = 21) on its query rows and on ``S`` gallery rows.

``--reference-cache FILE.json`` keeps the ``--compare`` runs (dense, or ranked with ``--knn exact``):
they do not depend on the IVF settings, so tuning those re-runs only the approximate side. A
cached entry is keyed by the arguments that determine it (sizes, generator, method, mode, kNN), not
by the code: delete the file after changing a method.
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

_GENERATOR_ARGS = ("gallery", "queries", "dim", "topk", "intrinsic", "per_identity", "noise", "modality_gap",
                   "ambient_noise", "seed")
_IVF_ARGS = ("nlist", "nprobe", "query_nprobe", "kmeans_iterations")


def make_features(n_gallery: int, n_query: int, dim: int, *, intrinsic: int, per_identity: int, noise: float,
                  modality_gap: float, ambient_noise: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Identity-clustered float32 features ``(query, gallery, query_id, gallery_id)`` of low intrinsic dimension."""
    rng = np.random.default_rng(seed)
    n_ids = max(1, n_gallery // per_identity)
    basis = np.linalg.qr(rng.standard_normal((dim, intrinsic)))[0].T.astype(np.float32)   # (r, dim)
    centres = rng.standard_normal((n_ids, intrinsic)).astype(np.float32)
    gallery_id = np.sort(rng.integers(0, n_ids, n_gallery))
    query_id = rng.integers(0, n_ids, n_query)
    offsets = modality_gap * rng.standard_normal((n_ids, intrinsic)).astype(np.float32)

    def embed(latent_ids: np.ndarray, shift: np.ndarray | None) -> np.ndarray:
        out = np.empty((len(latent_ids), dim), dtype=np.float32)
        step = 65536
        for start in range(0, len(latent_ids), step):
            ids = latent_ids[start:start + step]
            latent = centres[ids] + noise * rng.standard_normal((len(ids), intrinsic), dtype=np.float32)
            if shift is not None:
                latent += shift[ids]
            out[start:start + step] = latent @ basis + ambient_noise * rng.standard_normal(
                (len(ids), dim), dtype=np.float32)
        return out

    gallery = embed(gallery_id, None)
    query = embed(query_id, offsets)
    return query, gallery, query_id.astype(np.int64), gallery_id.astype(np.int64)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_child(args: argparse.Namespace) -> dict:
    """One measurement in this process: ranked (or dense / plain) mode of one method."""
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    from vireid.evaluation.metrics import evaluate_distance, evaluate_ranked
    from vireid.retrieval.knn import IvfParams, NeighbourIndex, resolve_knn
    from vireid.retrieval.ranked import RankedOptions, rerank_ranked

    query, gallery, query_id, gallery_id = make_features(
        args.gallery, args.queries, args.dim, intrinsic=args.intrinsic, per_identity=args.per_identity,
        noise=args.noise, modality_gap=args.modality_gap, ambient_noise=args.ambient_noise, seed=args.seed)
    q_cam, g_cam = np.ones(len(query_id), np.int64), np.full(len(gallery_id), 2, np.int64)
    ivf = IvfParams(**{name: getattr(args, name) for name in _IVF_ARGS if getattr(args, name) is not None})
    rss_before = peak_rss_gib()
    start = time.perf_counter()
    if args.mode == "dense":
        from vireid.retrieval import aim, kreciprocal, sim

        dense = {"aim": aim.aim, "sim": sim.sim, "krr": kreciprocal.krr}[args.method]
        result = evaluate_distance(dense(query, gallery), query_id, gallery_id, q_cam, g_cam, "regdb")
        knn_used = "dense"
    elif args.mode == "plain":
        index = NeighbourIndex(gallery, args.knn, ivf=ivf, seed=args.seed, progress=args.progress)
        ranked_index, _ = index.search(query, args.topk)
        result = evaluate_ranked(ranked_index, query_id, gallery_id, q_cam, g_cam, "regdb")
        knn_used = index.method
    else:
        options = RankedOptions(knn=args.knn, ivf=ivf, seed=args.seed, progress=args.progress)
        ranked_index, _ = rerank_ranked(args.method, query, gallery, topk=args.topk, options=options)
        result = evaluate_ranked(ranked_index, query_id, gallery_id, q_cam, g_cam, "regdb")
        knn_used = resolve_knn(args.knn, len(gallery) + (len(query) if args.method == "krr" else 0))
    seconds = time.perf_counter() - start
    return {"method": args.method, "mode": args.mode, "knn": knn_used, "seconds": seconds,
            "peak_rss_gib": peak_rss_gib(), "features_rss_gib": rss_before,
            "rank1": result.rank(1), "mAP": result.mAP, "ivf": vars(ivf) if knn_used == "ivf" else None}


def overlap(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean fraction of each row's exact top-k that the approximate top-k contains."""
    return float(np.mean([np.isin(a, b).mean() for a, b in zip(found[:, :k], exact[:, :k])]))


def measure_recall(args: argparse.Namespace) -> dict:
    """IVF recall against exact search, on sampled gallery rows and all queries (see module docstring)."""
    import faiss

    from vireid.retrieval.knn import IvfParams, NeighbourIndex, normalise_float32

    faiss.omp_set_num_threads(args.threads)
    query, gallery, _, _ = make_features(
        args.gallery, args.queries, args.dim, intrinsic=args.intrinsic, per_identity=args.per_identity,
        noise=args.noise, modality_gap=args.modality_gap, ambient_noise=args.ambient_noise, seed=args.seed)
    qn, gn = normalise_float32(query, name="query"), normalise_float32(gallery, name="gallery")
    pool = np.concatenate([qn, gn])
    sample = np.sort(np.random.default_rng(args.seed).choice(len(gn), min(args.recall, len(gn)), replace=False))
    ivf = IvfParams(**{name: getattr(args, name) for name in _IVF_ARGS if getattr(args, name) is not None})

    def exact(rows: np.ndarray, base: np.ndarray, k: int) -> np.ndarray:
        return faiss.knn(rows, base, k, metric=faiss.METRIC_INNER_PRODUCT)[1]

    index = NeighbourIndex(gn, "ivf", ivf=ivf, seed=args.seed)
    graph, _ = index.self_search(30)
    near, _ = index.search(qn, 100)
    pool_graph, _ = NeighbourIndex(pool, "ivf", ivf=ivf, seed=args.seed).self_search(21, query_rows=len(qn))
    graph_exact, near_exact = exact(gn[sample], gn, 30), exact(qn, gn, 100)
    pool_exact_q, pool_exact_g = exact(qn, pool, 21), exact(pool[len(qn) + sample], pool, 21)
    return {"ivf": vars(ivf), "graph@21": overlap(graph[sample], graph_exact, 21),
            "graph@30": overlap(graph[sample], graph_exact, 30), "query@30": overlap(near, near_exact, 30),
            "query@100": overlap(near, near_exact, 100),
            "pool query rows@21": overlap(pool_graph[:len(qn)], pool_exact_q, 21),
            "pool gallery rows@21": overlap(pool_graph[len(qn) + sample], pool_exact_g, 21)}


def spawn(args: argparse.Namespace, method: str, mode: str, knn: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--method", method, "--mode", mode, "--knn", knn]
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


def reference_key(args: argparse.Namespace, method: str, mode: str, knn: str) -> str:
    """Cache key of a ``--compare`` run: everything that determines its result (not the IVF settings)."""
    return json.dumps({"method": method, "mode": mode, "knn": knn,
                       **{name: getattr(args, name) for name in _GENERATOR_ARGS}}, sort_keys=True)


def load_cache(path: str | None) -> dict[str, dict]:
    if path is None or not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--methods", default="aim,sim,krr")
    parser.add_argument("--knn", default="auto", choices=("auto", "exact", "ivf", "hnsw"))
    parser.add_argument("--topk", type=int, default=100)
    parser.add_argument("--compare", default="none", choices=("none", "dense", "exact"),
                        help="dense: also the dense exact method; exact: also ranked mode with --knn exact")
    parser.add_argument("--intrinsic", type=int, default=16, help="intrinsic dimension of the identity manifold")
    parser.add_argument("--per-identity", type=int, default=20, help="gallery images per identity (on average)")
    parser.add_argument("--noise", type=float, default=0.35, help="within-identity noise (subspace units)")
    parser.add_argument("--modality-gap", type=float, default=0.6, help="per-identity query offset scale")
    parser.add_argument("--ambient-noise", type=float, default=0.05, help="isotropic noise in all dim dimensions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: vireid.retrieval.knn)")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists scanned per item for the graph")
    parser.add_argument("--query-nprobe", type=int, default=None, help="IVF lists scanned per query")
    parser.add_argument("--kmeans-iterations", type=int, default=None, help="IVF k-means iterations")
    parser.add_argument("--reference-cache", default=None,
                        help="JSON file keeping the --compare runs, which do not depend on the IVF settings")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1,
                        help="measurements run at once (>1 only for fidelity: concurrent runs share the cores)")
    parser.add_argument("--recall", type=int, default=0, metavar="S",
                        help="measure IVF recall against exact search on S sampled gallery rows instead")
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the plain ranking (--no-plain: skip it, e.g. one method per locked run)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="aim", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="ranked", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return
    if args.recall:
        result = measure_recall(args)
        print(f"gallery {args.gallery:,}  queries {args.queries:,}  d {args.dim}  ivf {result.pop('ivf')}")
        print("recall of the exact top-k:  " + "  ".join(f"{name} {value:.4f}" for name, value in result.items()))
        return

    print(f"gallery {args.gallery:,}  queries {args.queries:,}  d {args.dim}  topk {args.topk}  knn {args.knn}  "
          f"threads {args.threads}")
    if args.plain:
        plain = spawn(args, "plain", "plain", args.knn)
        print(f"plain ({plain['knn']}): rank-1 {100 * plain['rank1']:.2f} %  mAP {100 * plain['mAP']:.2f} %  "
              f"{plain['seconds']:.1f} s")
    header = (f"{'method':7} {'mode':16} {'seconds':>8} {'peak RSS GiB':>13} {'of it features':>14} "
              f"{'rank-1 %':>9} {'mAP %':>7}")
    print(header)
    runs = []
    for method in args.methods.split(","):
        runs.append((method, "ranked", args.knn))
        if args.compare == "dense":
            runs.append((method, "dense", args.knn))
        elif args.compare == "exact":
            runs.append((method, "ranked", "exact"))
    cache = load_cache(args.reference_cache)
    reference = {run for run in runs if run[1] == "dense" or run[2] == "exact" != args.knn}

    def measure(run: tuple[str, str, str]) -> dict:
        key = reference_key(args, *run)
        if run in reference and key in cache:
            return {**cache[key], "cached": True}
        result = spawn(args, *run)
        if run in reference:
            cache[key] = result
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(measure, runs))
    if args.reference_cache is not None:
        write_json_atomic(args.reference_cache, cache)
    per_method = 2 if args.compare != "none" else 1
    for first in range(0, len(results), per_method):
        rows = results[first:first + per_method]
        for row in rows:
            label = f"{row['mode']}/{row['knn']}" + (" (cached)" if row.get("cached") else "")
            print(f"{row['method']:7} {label:16} {row['seconds']:8.1f} {row['peak_rss_gib']:13.2f} "
                  f"{row['features_rss_gib']:14.2f} "
                  f"{100 * row['rank1']:9.2f} {100 * row['mAP']:7.2f}")
            if row["ivf"] is not None:
                print(f"{'':7} ivf {row['ivf']}")
        if len(rows) == 2:
            print(f"{rows[0]['method']:7} {'difference':16} {rows[0]['seconds'] / rows[1]['seconds']:7.2f}x "
                  f"{'':13} {'':14} {100 * (rows[0]['rank1'] - rows[1]['rank1']):+9.2f} "
                  f"{100 * (rows[0]['mAP'] - rows[1]['mAP']):+7.2f}")


if __name__ == "__main__":
    main()
