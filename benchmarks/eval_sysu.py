"""Time all 10 SYSU-MM01 trials of the chunked evaluator at full size, beside one Q x G matmul.

Synthetic, identity-clustered features with the real SYSU-MM01 test-set shape: 96 identities,
3,803 infrared queries (1,883 cam 3 + 1,920 cam 6), a visible gallery of 301 (identity, camera)
pairs (56 / 56 / 94 / 95 identities in cams 1 / 2 / 4 / 5) with 1 image per pair (single-shot,
301 images) or 10 (multi-shot, 3,010 images), a different seeded gallery per trial.

Printed, all from this one run: the metrics time of the 10 trials (distances precomputed), the
end-to-end time (plain distance + metrics, through ``evaluate_features``), the time of one
float32 Q x G matmul of the same shapes, and the time of one trial with a per-query Python loop
(the shape of the classic evaluators) with its ratio to ours. The reference AGW ``eval_sysu`` takes about 9 s per
trial at 3,803 x 3,010 on the project's 2-core machine (``tests/golden/REFERENCES.md``).

    python benchmarks/eval_sysu.py [--dim 2048] [--trials 10] [--seed 0] [--repeat 3] [--shots 1 10]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from vireid.evaluation.evaluator import evaluate_features, plain_distance
from vireid.evaluation.metrics import evaluate_distance
from vireid.features import FeatureSet

NUM_IDS = 96
QUERY_CAMS = {3: 1883, 6: 1920}
GALLERY_CAM_IDS = {1: 56, 2: 56, 4: 94, 5: 95}
IMAGES_PER_PAIR = 13


def synthetic_sysu(dim: int, trials: int, shots: int, seed: int) -> FeatureSet:
    """SYSU-shaped features; trial t's gallery takes ``shots`` images of every (identity, camera) pair."""
    rng = np.random.default_rng(seed)
    scale = (dim / 256) ** 0.25
    centres = rng.standard_normal((NUM_IDS, dim)).astype(np.float32)
    ir_offset = (4.0 * scale * rng.standard_normal((NUM_IDS, dim))).astype(np.float32)
    q_cam = np.concatenate([np.full(n, cam) for cam, n in QUERY_CAMS.items()])
    q_id = np.concatenate([np.sort(rng.integers(0, NUM_IDS, n)) for n in QUERY_CAMS.values()])
    query = centres[q_id] + ir_offset[q_id] + 1.5 * scale * rng.standard_normal((len(q_id), dim), dtype=np.float32)
    pairs = [(pid, cam) for cam, n in GALLERY_CAM_IDS.items() for pid in np.sort(rng.permutation(NUM_IDS)[:n])]
    g_id = np.repeat([p for p, _ in pairs], IMAGES_PER_PAIR)
    g_cam = np.repeat([c for _, c in pairs], IMAGES_PER_PAIR)
    gallery = centres[g_id] + 1.5 * scale * rng.standard_normal((len(g_id), dim), dtype=np.float32)
    trial_index = np.stack([
        np.concatenate([p * IMAGES_PER_PAIR + rng.choice(IMAGES_PER_PAIR, shots, replace=False)
                        for p in range(len(pairs))]) for _ in range(trials)])
    return FeatureSet(query, gallery, q_id.astype(np.int64), g_id.astype(np.int64), q_cam.astype(np.int64),
                      g_cam.astype(np.int64), trial_gallery_index=trial_index)


def per_query_loop_sysu(dist: np.ndarray, q_id: np.ndarray, g_id: np.ndarray, q_cam: np.ndarray,
                        g_cam: np.ndarray, max_rank: int = 20) -> tuple[np.ndarray, float]:
    """The classic evaluator's shape: one full argsort, then a Python loop over queries
    (identity-deduplicated CMC via ``np.unique`` per query). A same-run speed baseline only."""
    order = np.argsort(dist, axis=1)
    cmc_rows, aps = [], []
    for i in range(len(q_id)):
        ranked = order[i][~((q_cam[i] == 3) & (g_cam[order[i]] == 2))]
        ids = g_id[ranked]
        matches = ids == q_id[i]
        if not matches.any():
            continue
        _, first = np.unique(ids, return_index=True)
        distinct = ids[np.sort(first)]
        cmc_rows.append(np.cumsum(distinct == q_id[i])[:max_rank] > 0)
        hits = np.cumsum(matches)
        aps.append(float((hits[matches] / (np.flatnonzero(matches) + 1)).mean()))
    return np.asarray(cmc_rows, dtype=np.float32).mean(0), float(np.mean(aps))


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension")
    parser.add_argument("--trials", type=int, default=10, help="gallery trials")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic features")
    parser.add_argument("--repeat", type=int, default=3, help="timings are the best of this many runs")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 10], choices=[1, 10],
                        help="gallery images per (identity, camera): 1 single-shot, 10 multi-shot")
    args = parser.parse_args()
    print(f"SYSU-MM01-sized evaluation, {args.trials} trials, d = {args.dim}, best of {args.repeat}")
    print(f"{'setting':<13}{'Q x G':>13}{'metrics s':>11}{'end-to-end s':>14}{'1 matmul s':>12}"
          f"{'metrics/matmul':>16}{'loop s/trial':>14}{'loop/ours':>11}{'mean R1 %':>11}{'mean mAP %':>12}")
    for shots in args.shots:
        name = "single-shot" if shots == 1 else "multi-shot"
        fs = synthetic_sysu(args.dim, args.trials, shots, args.seed)
        views = [fs.trial(t) for t in range(args.trials)]
        dists = [plain_distance(v.query_feat, v.gallery_feat) for v in views]

        def metrics_only() -> None:
            for v, d in zip(views, dists):
                evaluate_distance(d, v.query_id, v.gallery_id, v.query_cam, v.gallery_cam, "sysu")

        metrics_s = best_of(args.repeat, metrics_only)
        result = {}
        end_to_end_s = best_of(args.repeat, lambda: result.update(mean=evaluate_features(fs, "sysu").mean))
        query, gallery = views[0].query_feat, views[0].gallery_feat
        matmul_s = best_of(args.repeat, lambda: query @ gallery.T)
        v = views[0]
        loop_s = best_of(1, lambda: per_query_loop_sysu(dists[0], v.query_id, v.gallery_id, v.query_cam, v.gallery_cam))
        mean = result["mean"]
        shape = f"{len(query)} x {len(gallery)}"
        print(f"{name:<13}{shape:>13}{metrics_s:>11.3f}{end_to_end_s:>14.3f}{matmul_s:>12.4f}"
              f"{metrics_s / matmul_s:>16.1f}{loop_s:>14.3f}{loop_s * args.trials / metrics_s:>11.1f}"
              f"{100 * mean.rank(1):>11.2f}{100 * mean.mAP:>12.2f}")


if __name__ == "__main__":
    main()
