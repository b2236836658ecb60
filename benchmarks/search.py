"""Per-query latency of the search service's code path on a large synthetic gallery.

Measures, in one run on this machine:

* index build time (neighbour graph, re-ranking structures, files) for a G-image gallery;
* per-query latency (p50 / p95) of ``GalleryIndex.search`` — what ``POST /search`` runs after the
  forward pass: similarity pass, re-ranking, top-k, metadata from SQLite — for each re-ranking
  method and each precision of the in-memory gallery copy, with the ratio to ``plain``;
* the forward pass of one query image (resnet50 baseline at 288×144), PyTorch and onnxruntime.

Wall-clock latency on a shared machine includes waiting for other processes; the ``cpu`` column
(process CPU time per query, all threads) is what the query itself consumed.

Features follow the golden data's model (identity centres, modality offsets, per-image noise).

    python benchmarks/search.py                      # G = 100,000, d = 2048 and 512
    python benchmarks/search.py --gallery 20000 --dims 256 --queries 50 --no-forward
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


def query_latency(root: Path, queries: np.ndarray, methods: list[str], scan_dtype: str, topk: int,
                  candidates: int = 0, nprobe: int = 32) -> dict[str, dict[str, float]]:
    from vireid.serve.index import GalleryIndex

    index = GalleryIndex.open(root, scan_dtype=scan_dtype, candidates=candidates, nprobe=nprobe)
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


def candidate_recall(root: Path, queries: np.ndarray, topk: int, candidates: int, nprobe: int) -> dict[str, float]:
    """Mean fraction of the full scan's top-k that the candidate search returns."""
    from vireid.serve.index import GalleryIndex

    exact = GalleryIndex.open(root)
    approximate = GalleryIndex.open(root, candidates=candidates, nprobe=nprobe)
    out = {}
    for method in ("plain", "aim"):
        overlap = [len({h.index for h in exact.search(q, method, topk)} & {h.index for h in approximate.search(q, method, topk)})
                   for q in queries]
        out[method] = float(np.mean(overlap) / topk)
    return out


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
    parser.add_argument("--scan-dtypes", nargs="+", default=["float32", "float16"])
    parser.add_argument("--candidates", type=int, default=256, help="also time plain/aim from IVF candidates (0: skip)")
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
                                  "threads": args.threads, "knn": args.knn, "load_average": os.getloadavg()}
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        for dim in args.dims:
            gallery, queries = synthetic_features(args.gallery, args.queries, dim, args.seed)
            root = Path(tmp) / f"index_d{dim}"
            build = build_time(root, gallery, args.knn)
            del gallery
            print(f"\nG={args.gallery:,} d={dim}: index build {build['total_s']:.1f} s "
                  f"(graph {build['graph_s']:.1f} s, structures {build['structures_s']:.1f} s, write {build['write_s']:.1f} s)")
            latency = {dtype: query_latency(root, queries, args.methods, dtype, args.topk) for dtype in args.scan_dtypes}
            if args.candidates:
                approximate = query_latency(root, queries, ["plain", "aim"], "float32", args.topk, args.candidates, args.nprobe)
                recall = candidate_recall(root, queries, args.topk, args.candidates, args.nprobe)
                for method, row in approximate.items():
                    print(f"{method + ' ivf':>10}: p50 {row['p50_ms']:.1f} ms, p95 {row['p95_ms']:.1f} ms, cpu p50 "
                          f"{row['cpu_p50_ms']:.1f} ms ({args.candidates} candidates, nprobe {args.nprobe}); "
                          f"top-{args.topk} overlap with the full scan {recall[method]:.3f}")
                latency["ivf_candidates"] = {**approximate, "overlap": recall}
            print(f"{'method':>8} " + " ".join(f"{dtype + ' p50/p95 ms':>24} {'cpu p50':>8} {'x plain':>8}"
                                                for dtype in args.scan_dtypes))
            for method in args.methods:
                cells = []
                for dtype in args.scan_dtypes:
                    row = latency[dtype][method]
                    base = latency[dtype]["plain"]["p50_ms"] if "plain" in latency[dtype] else float("nan")
                    cells.append(f"{row['p50_ms']:>11.1f} / {row['p95_ms']:>10.1f} {row['cpu_p50_ms']:>8.1f} "
                                 f"{row['p50_ms'] / base:>8.2f}")
                print(f"{method:>8} " + " ".join(cells))
            results[f"d{dim}"] = {"build": build, "latency": latency}
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
