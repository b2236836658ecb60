"""SIM's ablation (Jia et al., IJCAI 2020, Table 4: baseline, SGR only, MNNR only, SGR + MNNR) on the
synthetic benchmark, over several training seeds of the baseline, with the paper's SYSU preset and
with parameters chosen on the validation identities.

Per seed: the ``vireid demo`` recipe (synthetic SYSU layout at the demo's difficulty, resnet10
two-stream baseline, held-out validation identities) is trained once; features of the test set and
of the validation identities are extracted under SYSU all-search single-shot and multi-shot (10
seeded trials each; the paper reports multi-shot). Each inference (``plain``, ``sgr``, ``mnnr``,
``sim``) is evaluated with the paper's parameters (``sysu`` / ``sysu-multishot`` preset) and with
the values its grid search picks on the validation identities (best mAP; the test set is never
read for the choice). Diagnostics on the validation identities: the intra-modality (gallery to
gallery) against cross-modality (query to gallery) retrieval of the paper's Table 1, and SIM's
sensitivity to one parameter at a time around the preset.

Run (each seed trains once and is cached in ``--out``):

    python benchmarks/sim_ablation.py --seeds 0 1 2 [--quick] [--threads 2] [--out runs/sim_ablation]
    python benchmarks/sim_ablation.py --stage train --seed-only 1       # one seed's training (cached)
    python benchmarks/sim_ablation.py --stage evaluate --seed-only 1    # one seed's evaluation (cached)

Prints mean ± std over the seeds (percent) and writes ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vireid.data.synthetic import SynthConfig, render_dataset
from vireid.engine.checkpoint import load_checkpoint_model
from vireid.engine.demo import DemoSettings, demo_train_config
from vireid.engine.pipeline import extract_protocol_features, held_out_records, validation_query_modality
from vireid.engine.trainer import train
from vireid.evaluation.evaluator import evaluate_features
from vireid.evaluation.metrics import evaluate_distance
from vireid.evaluation.tuning import evaluate_rerank, preset_and_tuned
from vireid.features import FeatureSet, load_features, save_features
from vireid.io import write_json_atomic
from vireid.retrieval import resolve_rerank

REPO = Path(__file__).resolve().parents[1]
INFERENCES = ("plain", "sgr", "mnnr", "sim")
PROTOCOLS = {"single-shot": ({"mode": "all", "shots": 1, "permutations": "seeded"}, "sysu"),
             "multi-shot": ({"mode": "all", "shots": 10, "permutations": "seeded"}, "sysu-multishot")}
SENSITIVITY = {"lam": (0.0, 0.01, 0.1, 0.3, 1.0), "K": (1, 3, 5, 9, 13), "alpha": (0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
               "kq": (3, 6, 12, 20), "kg": (5, 10, 20)}
"""One parameter at a time around the preset, SIM on the validation identities (paper Sec. 4.4 / Fig. 4)."""


def train_seed(seed: int, settings: DemoSettings, root: Path, out: Path, threads: int) -> None:
    """Train the demo recipe with ``seed``; write both protocols' feature files (with validation)."""
    folder = out / f"seed{seed}"
    if all((folder / f"features_{name}.npz").is_file() for name in PROTOCOLS):
        return
    torch.set_num_threads(threads)
    cfg = demo_train_config(settings, root, folder, seed)
    cfg.progress_bar = False
    start = time.perf_counter()
    summary = train(cfg)
    print(f"seed {seed}: trained in {time.perf_counter() - start:.0f} s", flush=True)
    model, _ = load_checkpoint_model(summary["last_checkpoint"])
    for name, (params, _) in PROTOCOLS.items():
        features = extract_protocol_features(
            model, cfg.transforms, dataset="sysu", root=str(root), protocol="sysu", protocol_params=dict(params),
            batch_size=128, validation_records=held_out_records(cfg), validation_query=validation_query_modality(cfg))
        save_features(folder / f"features_{name}.npz", features)


def intra_versus_cross(features: FeatureSet) -> dict[str, float]:
    """Paper Table 1 on validation trial 0: infrared queries against the visible gallery, and each
    gallery image against the rest of the gallery (itself removed), plain distance, image-level CMC."""
    trial = features.trial(0)
    qn = trial.query_feat / np.linalg.norm(trial.query_feat, axis=1, keepdims=True)
    gn = trial.gallery_feat / np.linalg.norm(trial.gallery_feat, axis=1, keepdims=True)
    cross = evaluate_distance(-(qn @ gn.T), trial.query_id, trial.gallery_id, trial.query_cam, trial.gallery_cam,
                              "regdb")
    own = np.arange(len(gn)) + 1            # one camera per image: the market rule removes exactly itself
    intra = evaluate_distance(-(gn @ gn.T), trial.gallery_id, trial.gallery_id, own, own, "market")
    per_id = np.bincount(np.unique(trial.gallery_id, return_inverse=True)[1])
    return {"cross_r1": cross.rank(1), "cross_mAP": float(cross.mAP), "intra_r1": intra.rank(1),
            "intra_mAP": float(intra.mAP), "gallery_images_per_id": float(per_id.mean())}


def sensitivity(validation: FeatureSet, preset: str) -> dict[str, list[dict[str, float]]]:
    """SIM's validation mAP and rank-1 with one parameter changed from ``preset`` at a time."""
    out: dict[str, list[dict[str, float]]] = {}
    for name, values in SENSITIVITY.items():
        out[name] = []
        for value in values:
            settings = resolve_rerank("sim", preset=preset, params={name: value})
            result = evaluate_rerank(validation, "sysu", settings).mean
            out[name].append({"value": value, "r1": result.rank(1), "mAP": float(result.mAP)})
    return out


def evaluate_seed(seed: int, out: Path) -> dict[str, Any]:
    """Every inference with its preset and tuned on validation, both protocols; diagnostics.
    Cached in ``seed<N>/evaluation.json`` (delete it to re-evaluate)."""
    cache = out / f"seed{seed}" / "evaluation.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    start = time.perf_counter()
    results: dict[str, Any] = {}
    for name, (_, preset) in PROTOCOLS.items():
        features = load_features(out / f"seed{seed}" / f"features_{name}.npz")
        entry: dict[str, Any] = {"plain": _metrics(evaluate_features(features, "sysu").mean)}
        for method in INFERENCES[1:]:
            both = preset_and_tuned(features, "sysu", method, preset=preset)
            entry[method] = {"preset": _metrics(both.preset.mean), "tuned": _metrics(both.tuned.mean),
                             "chosen": both.tuning.chosen, "validation_preset": both.tuning.base_score,
                             "validation_tuned": both.tuning.best["score"]}
        entry["table1_validation"] = intra_versus_cross(features.validation)
        entry["sensitivity_validation"] = sensitivity(features.validation, preset)
        results[name] = entry
        print(f"seed {seed} {name}: evaluated", flush=True)
    print(f"seed {seed}: evaluated in {time.perf_counter() - start:.0f} s", flush=True)
    write_json_atomic(cache, results)
    return results


def _metrics(result: Any) -> dict[str, float]:
    return {"r1": result.rank(1), "mAP": float(result.mAP), "mINP": float(result.mINP)}


def print_tables(per_seed: dict[int, dict[str, Any]]) -> None:
    seeds = sorted(per_seed)

    def stat(values: list[float]) -> str:
        return f"{100 * np.mean(values):5.2f} ± {100 * np.std(values):4.2f}"

    for name in PROTOCOLS:
        print(f"\nSYSU all-search {name}, 10 seeded trials, mean ± std over seeds {seeds} (percent)")
        print(f"{'inference':<22} {'R1':>13} {'mAP':>13} {'mINP':>13}")
        for method in INFERENCES:
            kinds = [("", None)] if method == "plain" else [(" (paper preset)", "preset"), (" (tuned on val)", "tuned")]
            for label, kind in kinds:
                rows = [per_seed[s][name][method] if kind is None else per_seed[s][name][method][kind] for s in seeds]
                print(f"{method + label:<22} " + " ".join(f"{stat([r[m] for r in rows]):>13}"
                                                         for m in ("r1", "mAP", "mINP")))
        for method in INFERENCES[1:]:
            print(f"  {method} chosen on val: " + "; ".join(
                f"seed {s}: {per_seed[s][name][method]['chosen']}" for s in seeds))
        t1 = [per_seed[s][name]["table1_validation"] for s in seeds]
        print(f"  Table 1 analogue (validation): cross-modality R1 {stat([t['cross_r1'] for t in t1])}, "
              f"mAP {stat([t['cross_mAP'] for t in t1])}; gallery-gallery R1 {stat([t['intra_r1'] for t in t1])}, "
              f"mAP {stat([t['intra_mAP'] for t in t1])}; {np.mean([t['gallery_images_per_id'] for t in t1]):.1f} "
              "gallery images per identity")
        print("  SIM sensitivity on validation, one parameter at a time around the preset (mAP, mean over seeds):")
        for param in SENSITIVITY:
            cells = []
            for i, value in enumerate(SENSITIVITY[param]):
                cells.append(f"{value:g}: {100 * np.mean([per_seed[s][name]['sensitivity_validation'][param][i]['mAP'] for s in seeds]):.2f}")
            print(f"    {param}: " + ", ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the baseline")
    parser.add_argument("--seed-only", type=int, default=None,
                        help="train (--stage train) or evaluate (--stage evaluate) only this seed; its result is cached")
    parser.add_argument("--stage", choices=("train", "evaluate", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick sizes (120 identities, 4 epochs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "sim_ablation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = DemoSettings.for_mode(args.quick)
    out = args.out / ("quick" if args.quick else "full")
    synth = SynthConfig("sysu", settings.num_ids, seed=0, height=settings.height, width=settings.width,
                        difficulty=settings.difficulty)
    root = out / "data"
    render_dataset(synth, root)
    if args.stage in ("train", "all"):
        for seed in [args.seed_only] if args.seed_only is not None else args.seeds:
            train_seed(seed, settings, root, out, args.threads)
    if args.stage == "evaluate" and args.seed_only is not None:
        evaluate_seed(args.seed_only, out)
    elif args.stage in ("evaluate", "all"):
        per_seed = {seed: evaluate_seed(seed, out) for seed in args.seeds}
        write_json_atomic(out / "results.json", {"settings": {"num_ids": settings.num_ids, "epochs": settings.epochs,
                                                               "val_ids": settings.val_ids, "quick": args.quick},
                                                  "seeds": {str(s): r for s, r in per_seed.items()}})
        print_tables(per_seed)
        print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
