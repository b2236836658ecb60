"""Enrolment cost and search latency under enrolments on a large gallery (library level, no HTTP).

Measures, in one run on this machine, for a synthetic gallery of G items:

* index build and load time;
* search latency per method from one client (int8 first stage for plain and aim);
* the latency of enrolling one image (``add_to_index``: neighbour lists, re-ranking structure
  rows, image and thumbnail, metadata row, delta file, manifest — everything but the forward pass,
  whose features are given) and the bytes it writes;
* search latency (``GalleryIndex.search``, default int8 first stage) from ``--clients`` closed-loop
  threads, first with searches only, then with ``--enrol-fraction`` of the requests being
  enrolments (serialised by one lock, as the service does), and the ratio of the two p95s;
* the time of folding the enrolments' deltas into a new base (``compact``, run in the background
  by the service), and search latency after it.

    python benchmarks/enrol_scale.py --gallery 100000 --dim 512 --json enrol.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from search import synthetic_features


def jpeg(seed: int) -> bytes:
    """A small distinct 'person' image (64×128 JPEG)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (128, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=85)
    return out.getvalue()


def percentiles(values: list[float]) -> dict[str, float]:
    p50, p95 = np.percentile(np.asarray(values) * 1000, [50, 95])
    return {"n": len(values), "p50_ms": float(p50), "p95_ms": float(p95), "max_ms": float(max(values) * 1000)}


class Harness:
    """The live index and one enrolment lock, as the service holds them."""

    def __init__(self, root: Path, index, new_feats: np.ndarray) -> None:
        self.root, self.index, self.new_feats = root, index, new_feats
        self.lock = threading.Lock()
        self.enrolled = 0

    def enrol(self) -> float:
        from vireid.serve.index import GalleryItem, NewImage, add_to_index

        with self.lock:
            k = self.enrolled
            self.enrolled += 1
            start = time.perf_counter()
            self.index, _ = add_to_index(self.root, self.new_feats[k:k + 1],
                                         [NewImage(GalleryItem(name=f"enrolled{k}.jpg", pid=10**6 + k), jpeg(k))],
                                         current=self.index)
            return time.perf_counter() - start

    def search(self, query: np.ndarray, method: str) -> float:
        index = self.index
        start = time.perf_counter()
        index.search(query, method, 20)
        return time.perf_counter() - start


def closed_loop(harness: Harness, queries: np.ndarray, requests: int, clients: int, enrol_fraction: float,
                method: str, seed: int) -> dict[str, dict[str, float]]:
    """``clients`` threads, ``requests`` in all; each request is an enrolment with probability ``enrol_fraction``."""
    kinds = np.random.default_rng(seed).random(requests) < enrol_fraction
    times: dict[str, list[float]] = {"search": [], "enrol": []}
    counter = iter(range(requests))
    guard = threading.Lock()

    def worker() -> None:
        torch.set_num_threads(1)
        while True:
            with guard:
                i = next(counter, None)
            if i is None:
                return
            if kinds[i]:
                elapsed = harness.enrol()
                times["enrol"].append(elapsed)
            else:
                times["search"].append(harness.search(queries[i % len(queries)], method))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {kind: percentiles(values) for kind, values in times.items() if values}


def folder_bytes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in root.rglob("*") if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--enrolments", type=int, default=40, help="enrolments timed one after another")
    parser.add_argument("--requests", type=int, default=400, help="requests of each closed-loop phase")
    parser.add_argument("--clients", type=int, default=2, help="closed-loop client threads")
    parser.add_argument("--enrol-fraction", type=float, default=0.1)
    parser.add_argument("--method", default="aim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)
    from vireid.serve.index import GalleryIndex, GalleryItem, IndexSettings, NewImage, build_index, compact

    total_new = args.enrolments + args.requests + 10
    gallery, queries = synthetic_features(args.gallery + total_new, 200, args.dim, args.seed)
    new_feats, gallery = gallery[args.gallery:], gallery[: args.gallery]
    results: dict[str, object] = {"gallery": args.gallery, "dim": args.dim, "clients": args.clients,
                                  "enrol_fraction": args.enrol_fraction, "method": args.method}
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "index"
        items = [NewImage(GalleryItem(name=f"g{i:06d}.jpg", pid=i // 10, cam=1 + i % 4)) for i in range(args.gallery)]
        start = time.perf_counter()
        build_index(root, gallery, items, settings=IndexSettings())
        results["build_s"] = time.perf_counter() - start
        del items, gallery
        start = time.perf_counter()
        index = GalleryIndex.open(root)
        index.warm_up()
        results["load_s"] = time.perf_counter() - start
        print(f"G={args.gallery:,} d={args.dim}: build {results['build_s']:.1f} s, load {results['load_s']:.1f} s",
              flush=True)
        harness = Harness(root, index, new_feats)
        per_method = {}
        for method in ("plain", "aim", "sgr", "mnnr", "sim", "krr"):
            harness.search(queries[0], method)
            per_method[method] = percentiles([harness.search(q, method) for q in queries[:50]])
        results["search_alone"] = per_method
        print("one client, searches alone: " + "; ".join(
            f"{m} p50 {r['p50_ms']:.1f} / p95 {r['p95_ms']:.1f} ms" for m, r in per_method.items()), flush=True)
        one_by_one, written = [], []
        for _ in range(args.enrolments):
            before = folder_bytes(root)
            one_by_one.append(harness.enrol())
            after = folder_bytes(root)
            written.append(sum(size - before.get(p, 0) for p, size in after.items() if before.get(p) != size))
        results["enrol_alone"] = {**percentiles(one_by_one), "bytes_p50": float(np.median(written))}
        print(f"enrolment of one image (features given): p50 {results['enrol_alone']['p50_ms']:.1f} ms, "
              f"p95 {results['enrol_alone']['p95_ms']:.1f} ms, max {results['enrol_alone']['max_ms']:.1f} ms; "
              f"{np.median(written) / 1024:.0f} KiB written (median)", flush=True)
        searches_only = closed_loop(harness, queries, args.requests, args.clients, 0.0, args.method, args.seed)
        mixed = closed_loop(harness, queries, args.requests, args.clients, args.enrol_fraction, args.method, args.seed + 1)
        results["searches_only"], results["mixed"] = searches_only, mixed
        ratio = mixed["search"]["p95_ms"] / searches_only["search"]["p95_ms"]
        results["search_p95_ratio"] = ratio
        print(f"{args.clients} clients, {args.method}: searches only p50 {searches_only['search']['p50_ms']:.1f} / "
              f"p95 {searches_only['search']['p95_ms']:.1f} ms; with {100 * args.enrol_fraction:.0f}% enrolments "
              f"search p50 {mixed['search']['p50_ms']:.1f} / p95 {mixed['search']['p95_ms']:.1f} ms "
              f"(p95 ratio {ratio:.2f}), enrolment p50 {mixed.get('enrol', {}).get('p50_ms', float('nan')):.1f} / "
              f"p95 {mixed.get('enrol', {}).get('p95_ms', float('nan')):.1f} ms", flush=True)
        snapshot = harness.index
        overlay = snapshot.state.overlay_fraction()
        start = time.perf_counter()
        compacted = compact(root, snapshot)
        results["compaction"] = {"deltas": len(snapshot.manifest["deltas"]), "overlay_fraction": overlay,
                                 "seconds": time.perf_counter() - start}
        assert compacted is not None
        harness.index = compacted
        after = closed_loop(harness, queries, args.requests, args.clients, 0.0, args.method, args.seed + 2)
        results["after_compaction"] = after
        print(f"compaction of {results['compaction']['deltas']} deltas (overlay {overlay:.3f}): "
              f"{results['compaction']['seconds']:.1f} s; searches after it p50 {after['search']['p50_ms']:.1f} / "
              f"p95 {after['search']['p95_ms']:.1f} ms", flush=True)
    results["load_average_end"] = os.getloadavg()
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
