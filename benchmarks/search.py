"""Per-query latency of the search service's code path on a large synthetic gallery.

Measures, in one run on this machine:

* index build time (neighbour graph, re-ranking structures, files) for a G-image gallery;
* per-query latency (p50 / p95) of ``GalleryIndex.search`` — what ``POST /search`` runs after the
  forward pass: similarity pass, re-ranking, top-k, metadata from SQLite — for each re-ranking
  method and each way of finding the items to score (full float32 / float16 scan; int8 or IVF
  first stage with exact re-scoring), with the ratio to ``plain``, the recall@topk of the first
  stages' final lists against the exact full scan, and where an ``aim`` query's time goes;
* the forward pass of one query image (resnet50 baseline at 288×144), PyTorch and onnxruntime.

Wall-clock latency on a shared machine includes waiting for other processes; the ``cpu`` column
(process CPU time per query, all threads) is what the query itself consumed.

Features follow the golden data's model (identity centres, modality offsets, per-image noise).

    python benchmarks/search.py                      # G = 100,000, d = 2048 and 512
    python benchmarks/search.py --gallery 20000 --dims 256 --queries 50 --no-forward --configs scan-float32 int8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def synthetic_features(gallery: int, queries: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Visible gallery ``c_k + e`` and infrared queries ``c_k + o + u_k + e`` (as the golden sets),
    about 10 images per identity."""
    rng = np.random.default_rng(seed)
    ids = gallery // 10
    scale = (dim / 256) ** 0.25
    centres = rng.standard_normal((ids, dim), dtype=np.float32)
    gallery_ids = rng.integers(0, ids, gallery)
    gallery_feat = centres[gallery_ids]
    gallery_feat += rng.standard_normal((gallery, dim), dtype=np.float32) * (1.5 * scale)
    query_ids = rng.integers(0, ids, queries)
    offset = rng.standard_normal(dim, dtype=np.float32) * scale
    query_feat = (centres[query_ids] + offset + rng.standard_normal((queries, dim), dtype=np.float32) * (2.0 * scale)
                  + rng.standard_normal((queries, dim), dtype=np.float32) * (1.5 * scale))
    return gallery_feat, query_feat


def build_time(root: Path, feats: np.ndarray, knn: str) -> dict[str, float]:
    from vireid.serve.index import GalleryItem, IndexSettings, NewImage, build_index

    marks: list[tuple[float, str]] = []
    items = [NewImage(GalleryItem(name=f"g{i:06d}.jpg", pid=i // 10, cam=1 + i % 4)) for i in range(len(feats))]
    start = time.perf_counter()
    build_index(root, feats, items, settings=IndexSettings(knn=knn),
                progress=lambda message: marks.append((time.perf_counter(), message)))
    total = time.perf_counter() - start
    stamps = {message.split(" ")[0]: t for t, message in marks}
    return {
        "graph_s": stamps["re-ranking"] - start,
        "structures_s": stamps["storing"] - stamps["re-ranking"],
        "write_s": stamps["done:"] - stamps["storing"],
        "total_s": total,
    }


def open_index(root: Path, config: str, candidates: int, nprobe: int):
    """``config``: ``scan-float32`` / ``scan-float16`` (every item scored) or ``int8`` / ``ivf``
    (first stage for plain and aim, see ``GalleryIndex.open``)."""
    from vireid.serve.index import GalleryIndex

    if config.startswith("scan-"):
        return GalleryIndex.open(root, scan_dtype=config.split("-")[1], first_stage="scan")
    return GalleryIndex.open(root, first_stage=config, candidates=candidates, nprobe=nprobe)


def query_latency(index, queries: np.ndarray, methods: list[str], topk: int) -> dict[str, dict[str, float]]:
    out = {}
    for method in methods:
        index.search(queries[0], method, topk)  # warm-up
        times, cpu = [], []
        for q in queries:
            start, start_cpu = time.perf_counter(), time.process_time()
            index.search(q, method, topk)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        p50, p95 = np.percentile(times, [50, 95]) * 1000
        out[method] = {"p50_ms": float(p50), "p95_ms": float(p95), "cpu_p50_ms": float(np.median(cpu) * 1000)}
    return out


def recall_at_topk(exact, approximate, queries: np.ndarray, topk: int) -> dict[str, float]:
    """Mean fraction of the exact path's top-k (full float32 scan) that the first stage's top-k holds."""
    out = {}
    for method in ("plain", "aim"):
        overlap = [len({h.index for h in exact.search(q, method, topk)} & {h.index for h in approximate.search(q, method, topk)})
                   for q in queries]
        out[method] = float(np.mean(overlap) / topk)
    return out


def aim_stages(index, queries: np.ndarray, topk: int) -> dict[str, float]:
    """Median ms of each stage of an ``aim`` search: the similarity pass (full scan, or first stage
    with exact re-scoring of its candidates), AIM's re-ranking, the top-k selection and the
    metadata lookup in SQLite."""
    from vireid.retrieval.single import aim_from_candidates, aim_query, l2_normalize_rows, top_k

    stages: dict[str, list[float]] = {"similarity": [], "aim": [], "top-k": [], "metadata": []}
    for q in queries:
        unit = l2_normalize_rows(q[None])[0]
        t0 = time.perf_counter()
        if index.first_stage == "scan":
            sim = index.similarity(unit)
            t1 = time.perf_counter()
            rows, dist = np.arange(index.count), aim_query(sim, index.state)
        else:
            cand, cand_sim = index.first_stage_candidates(unit, topk)
            t1 = time.perf_counter()
            rows, dist = aim_from_candidates(unit, index.feats, index.state, cand, cand_sim, keep=topk)
        t2 = time.perf_counter()
        best = rows[top_k(dist, topk)]
        t3 = time.perf_counter()
        index.items(best)
        t4 = time.perf_counter()
        for name, span in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            stages[name].append(span)
    return {name: float(np.median(values) * 1000) for name, values in stages.items()}


def forward_latency(runs: int, folder: Path) -> dict[str, dict[str, float]]:
    """One 288×144 image through a resnet50 baseline: PyTorch eager and onnxruntime."""
    from PIL import Image

    from vireid.data.records import Modality
    from vireid.data.transforms import TransformConfig
    from vireid.models import ModelConfig, create_model
    from vireid.serve.encoder import OnnxEncoder, TorchEncoder, encode_images, export_onnx

    transform = TransformConfig(height=288, width=144)
    model = create_model(ModelConfig(backbone="resnet50", pretrained=None), 395).eval()
    onnx_path = folder / "resnet50.onnx"
    export_onnx(model, transform, onnx_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (288, 144, 3), dtype=np.uint8))
    out = {}
    for name, encoder in (("pytorch", TorchEncoder(model, transform, Path("resnet50"))), ("onnxruntime", OnnxEncoder(onnx_path))):
        encode_images(encoder, [image], Modality.INFRARED)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            encode_images(encoder, [image], Modality.INFRARED)
            times.append(time.perf_counter() - start)
        p50, p95 = np.percentile(times, [50, 95]) * 1000
        out[name] = {"p50_ms": float(p50), "p95_ms": float(p95)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[2048, 512])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=["plain", "aim", "sim", "krr"])
    parser.add_argument("--configs", nargs="+", default=["scan-float32", "scan-float16", "int8", "ivf"],
                        help="scan-float32 / scan-float16: every item scored (all methods); int8 / ivf: first stage "
                             "for plain and aim (the other methods scan)")
    parser.add_argument("--candidates", type=int, default=256, help="items the int8 / ivf first stage keeps")
    parser.add_argument("--nprobe", type=int, default=32, help="IVF lists probed per query")
    parser.add_argument("--knn", default="auto", help="gallery graph search (auto: IVF beyond 50,000)")
    parser.add_argument("--forward-runs", type=int, default=30)
    parser.add_argument("--no-forward", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    results: dict[str, object] = {"gallery": args.gallery, "queries": args.queries, "topk": args.topk,
                                  "threads": args.threads, "knn": args.knn, "candidates": args.candidates,
                                  "nprobe": args.nprobe, "load_average": os.getloadavg()}
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        for dim in args.dims:
            gallery, queries = synthetic_features(args.gallery, args.queries, dim, args.seed)
            root = Path(tmp) / f"index_d{dim}"
            build = build_time(root, gallery, args.knn)
            del gallery
            print(f"\nG={args.gallery:,} d={dim}: index build {build['total_s']:.1f} s "
                  f"(graph {build['graph_s']:.1f} s, structures {build['structures_s']:.1f} s, write {build['write_s']:.1f} s)")
            exact = open_index(root, "scan-float32", args.candidates, args.nprobe)
            latency, recall, stages = {}, {}, {}
            for config in args.configs:
                index = exact if config == "scan-float32" else open_index(root, config, args.candidates, args.nprobe)
                methods = args.methods if config.startswith("scan-") else [m for m in ("plain", "aim") if m in args.methods]
                latency[config] = query_latency(index, queries, methods, args.topk)
                stages[config] = aim_stages(index, queries, args.topk)
                if config != "scan-float32":
                    recall[config] = recall_at_topk(exact, index, queries, args.topk)
                del index
            print(f"{'config':>13} {'method':>6} {'p50 ms':>8} {'p95 ms':>8} {'cpu p50':>8} {'x plain':>8} "
                  f"{'recall@' + str(args.topk):>10}")
            for config, rows in latency.items():
                for method, row in rows.items():
                    ratio = row["p50_ms"] / rows["plain"]["p50_ms"] if "plain" in rows else float("nan")
                    rec = f"{recall[config][method]:.3f}" if method in recall.get(config, {}) else (
                        "exact" if config == "scan-float32" else "-")
                    print(f"{config:>13} {method:>6} {row['p50_ms']:>8.1f} {row['p95_ms']:>8.1f} "
                          f"{row['cpu_p50_ms']:>8.1f} {ratio:>8.2f} {rec:>10}")
            print("aim stages, median ms: " + "; ".join(
                f"{config}: " + ", ".join(f"{name} {ms:.2f}" for name, ms in parts.items()) for config, parts in stages.items()))
            del exact
            print(f"load average now: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
            results[f"d{dim}"] = {"build": build, "latency": latency, "recall_at_topk": recall, "aim_stages_ms": stages}
            shutil.rmtree(root)
        if not args.no_forward:
            forward = forward_latency(args.forward_runs, Path(tmp))
            print(f"\nforward pass, resnet50 baseline, one 288x144 image, {args.threads} threads:")
            for name, row in forward.items():
                print(f"{name:>12}: p50 {row['p50_ms']:.1f} ms, p95 {row['p95_ms']:.1f} ms")
            print(f"{'ratio':>12}: onnxruntime / pytorch p50 = {forward['onnxruntime']['p50_ms'] / forward['pytorch']['p50_ms']:.2f}")
            results["forward"] = forward
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
