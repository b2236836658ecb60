"""Exact re-rankers against their matmul floor: time ratio and peak extra memory, one run.

For each size and method a fresh subprocess generates identity-clustered synthetic features
(:func:`vireid.retrieval.synthetic.synthetic_features`, not timed), measures the float32 Gram
matmuls the method needs (``Q·Gᵀ``; ``G·Gᵀ`` for all but plain; ``Q·Qᵀ`` for krr; best of
``--repeats`` + 1, alternating with the method's runs so both see the same machine load),
then the method itself (best of ``--repeats``), and the peak extra resident memory of its first
call: ``VmHWM − VmRSS`` after resetting the high-water mark (``/proc/self/clear_refs`` = 5).
One untimed call on 32 × 64 rows comes first, so per-process one-time costs are not counted:
loading kernels, and numba compiling SGR's loop (about 1 s and 120 MiB, once per process).

Goals (issue 3 §3): time <= 2.0 × floor; peak extra memory <= 2 × (inputs + one Q×G float32).

Sizes: ``sysu`` = SYSU-MM01 all-search multi-shot (3,803 × 3,010, d = 2048, 96 identities),
``market`` = Market-1501 (3,368 × 15,913, d = 512, 751 identities).

Run: ``python benchmarks/rerank.py [--sizes sysu market] [--methods plain aim ...] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SIZES = {
    "sysu": {"num_query": 3803, "num_gallery": 3010, "dim": 2048, "num_ids": 96},
    "market": {"num_query": 3368, "num_gallery": 15913, "dim": 512, "num_ids": 751},
}
# (label, method, variant, preset): the default variants, and the non-default ones
CASES = {
    "plain": ("plain", None, None),
    "aim": ("aim", "reference", "sysu-multishot"),
    "aim-paper": ("aim", "paper", "sysu-multishot"),
    "sgr": ("sgr", "paper", "sysu"),
    "sgr-reference": ("sgr", "reference", "sysu"),
    "mnnr": ("mnnr", "paper", "sysu"),
    "mnnr-reference": ("mnnr", "reference", "sysu"),
    "sim": ("sim", "paper", "sysu"),
    "sim-reference": ("sim", "reference", "sysu"),
    "krr": ("krr", "reference", "sysu"),
    "krr-paper": ("krr", "paper", "sysu"),
}
DEFAULT_CASES = ("plain", "aim", "sgr", "mnnr", "sim", "krr", "sgr-reference", "sim-reference", "krr-paper")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(size: str, case: str, repeats: int, seed: int) -> dict:
    """Runs inside the subprocess: the floor and the method, alternating; returns the figures."""
    import numpy as np

    from vireid.retrieval import rerank
    from vireid.retrieval.synthetic import synthetic_features

    method, variant, preset = CASES[case]
    fs = synthetic_features(**SIZES[size], seed=seed)
    q, g = fs.query_feat, fs.gallery_feat
    rerank(method, q[:32], g[:64], variant=variant, preset=preset)   # one-time costs: kernels, compilation
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)

    def matmuls() -> float:
        start = time.perf_counter()
        qg = qn @ gn.T
        gg = gn @ gn.T if method != "plain" else None
        qq = qn @ qn.T if method == "krr" else None
        seconds = time.perf_counter() - start
        del qg, gg, qq
        return seconds

    floor = matmuls()
    best = float("inf")
    peak_extra_kib = 0
    for attempt in range(repeats):                                # floor and method alternate: same load
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _rss_kib("VmRSS")
        start = time.perf_counter()
        dist = rerank(method, q, g, variant=variant, preset=preset)
        best = min(best, time.perf_counter() - start)
        if attempt == 0:
            peak_extra_kib = _rss_kib("VmHWM") - before
        del dist
        floor = min(floor, matmuls())
    qg_bytes = len(q) * len(g) * 4
    budget = 2 * (q.nbytes + g.nbytes + qg_bytes)
    return {"size": size, "case": case, "seconds": best, "floor_seconds": floor, "ratio": best / floor,
            "peak_extra_mib": peak_extra_kib / 1024, "budget_mib": budget / 2**20,
            "memory_ratio": peak_extra_kib * 1024 / budget}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per method (best kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT.json", help="also write the rows as JSON")
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.repeats, args.seed)))
        return
    rows = []
    header = f"{'size':7} {'method':15} {'time s':>8} {'floor s':>8} {'ratio':>6} {'peak MiB':>9} {'budget':>8} goals"
    print(header)
    for size in args.sizes:
        for case in args.methods:
            done = subprocess.run(
                [sys.executable, __file__, "--child", size, case, "--repeats", str(args.repeats),
                 "--seed", str(args.seed)], capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            goals = ("time ok" if row["ratio"] <= 2.0 else "time MISSED") + ", " + (
                "memory ok" if row["memory_ratio"] <= 1.0 else "memory MISSED")
            print(f"{size:7} {case:15} {row['seconds']:8.3f} {row['floor_seconds']:8.3f} {row['ratio']:6.2f} "
                  f"{row['peak_extra_mib']:9.0f} {row['budget_mib']:8.0f} {goals}", flush=True)
    if args.json:
        from vireid.io import write_json_atomic

        write_json_atomic(args.json, rows)


if __name__ == "__main__":
    main()
