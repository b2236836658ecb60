"""Within-modality against cross-modality retrieval of the runs in the method benchmark's last report.

A model can separate identities well inside each modality and still fail across modalities; this
script says which, for every run of the last ``benchmarks/methods.py`` report (``OUT/results.json``).
Per run, on the test identities' features (all query and gallery images, no trial sampling):

* infrared -> visible: every infrared image against every visible image (nothing removed);
* visible -> visible and infrared -> infrared: every image against the other images of its own
  modality, items with the query's identity and camera ignored (the Market-1501 rule).

Prints mean ± std over the seeds of each variant (percent mAP and rank-1)::

    python benchmarks/modality_gap.py [--out runs/bench_methods] [--variants baseline df2am ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from vireid.evaluation.metrics import evaluate_distance
from vireid.retrieval.exact import l2_normalize

REPO = Path(__file__).resolve().parents[1]


def _retrieval(query: np.ndarray, q_id: np.ndarray, q_cam: np.ndarray, gallery: np.ndarray, g_id: np.ndarray,
               g_cam: np.ndarray, protocol: str) -> tuple[float, float]:
    dist = 2.0 - 2.0 * l2_normalize(query, np.dtype(np.float64), name="query") @ l2_normalize(gallery, np.dtype(np.float64), name="gallery").T
    result = evaluate_distance(dist, q_id, g_id, q_cam, g_cam, protocol)
    return 100 * result.mAP, 100 * float(result.cmc[0])


def run_gaps(features: Path) -> dict[str, tuple[float, float]]:
    """mAP and rank-1 of the three retrieval directions of one feature file."""
    with np.load(features) as z:
        q, q_id, q_cam = z["query_feat"], z["query_id"], z["query_cam"]
        g, g_id, g_cam = z["gallery_feat"], z["gallery_id"], z["gallery_cam"]
    return {"infrared -> visible": _retrieval(q, q_id, q_cam, g, g_id, g_cam, "regdb"),
            "visible -> visible": _retrieval(g, g_id, g_cam, g, g_id, g_cam, "market"),
            "infrared -> infrared": _retrieval(q, q_id, q_cam, q, q_id, q_cam, "market")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_methods",
                        help="output folder of benchmarks/methods.py (default: runs/bench_methods)")
    parser.add_argument("--variants", nargs="+", help="only these variants (default: every cached run)")
    args = parser.parse_args()
    results = json.loads((args.out / "results.json").read_text(encoding="utf-8"))
    per_variant: dict[str, list[dict[str, tuple[float, float]]]] = defaultdict(list)
    for run in results["runs"]:  # the runs of the last report (a changed method leaves older runs in the cache)
        if args.variants and run["variant"] not in args.variants:
            continue
        per_variant[run["variant"]].append(run_gaps(args.out / "cache" / run["key"][:24] / "features.npz"))
    directions = ("infrared -> visible", "visible -> visible", "infrared -> infrared")
    print("| variant | seeds | " + " | ".join(f"{d} mAP / rank-1" for d in directions) + " |")
    print("|---|---|" + "---|" * len(directions))
    for variant, runs in sorted(per_variant.items()):
        cells = []
        for d in directions:
            maps, r1s = [r[d][0] for r in runs], [r[d][1] for r in runs]
            spread = f" ± {statistics.stdev(maps):.1f}" if len(maps) > 1 else ""
            cells.append(f"{statistics.mean(maps):.1f}{spread} / {statistics.mean(r1s):.1f}")
        print(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
