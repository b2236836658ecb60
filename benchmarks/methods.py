"""Train the baseline, XIV, DF2AM, SAAI and cm-SSFT on the synthetic SYSU layout with one budget; print one table.

Every method starts from its tiny config (``configs/<method>_synthetic_tiny.yaml``) with the same
data, image size, sampler, epochs and seed, is evaluated on the SYSU official protocol
(all-search, single-shot, 10 seeded trials) with the plain distance and with its own inference:

* baseline, DF2AM: plain (DF2AM's inference is its fused descriptor, already in ``feat``);
* XIV: Eq. 2, D(f(I), f(V)) + D(f(I), f(X(V))) (``vireid.models.methods.xiv.xiv_distance``);
* SAAI: AIM re-ranking with the ``sysu`` preset (k1 4, k2 1);
* cm-SSFT: the SSTN's test-time transfer, all-queries mode and single-query mode (Eq. 22), two rows.

Run: ``python benchmarks/methods.py [--ids 150] [--epochs 8] [--demo-difficulty] [--out runs/bench_methods]``.
Numbers are percent; one run of one seed on a CPU budget, so differences of a few points are noise.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vireid.data.datasets import build_dataset
from vireid.data.protocols import build_protocol, protocol_feature_set, protocol_images
from vireid.data.synthetic import Difficulty, SynthConfig, render_dataset
from vireid.data.transforms import TransformConfig
from vireid.engine.checkpoint import load_checkpoint_model
from vireid.engine.config import load_train_config
from vireid.engine.demo import DemoSettings
from vireid.engine.extraction import extract_features
from vireid.engine.trainer import train
from vireid.evaluation.evaluator import DistanceFn, evaluate_features
from vireid.features import FeatureSet
from vireid.models.methods.ssft import ssft_distance
from vireid.models.methods.xiv import xiv_distance
from vireid.retrieval.api import rerank

REPO = Path(__file__).resolve().parents[1]
METHODS = ("baseline", "xiv", "df2am", "saai", "ssft")
INFERENCE = {"baseline": "plain", "xiv": "xiv Eq. 2", "df2am": "plain (fused)", "saai": "aim sysu",
             "ssft": "sstn all", "ssft-single": "sstn single"}


def inference_distance(method: str, model: torch.nn.Module | None = None) -> DistanceFn | None:
    """The method's test-time distance (None: the evaluator's plain distance)."""
    if method in ("ssft", "ssft-single"):
        return ssft_distance(model, "single" if method == "ssft-single" else "all")
    if method == "xiv":
        return xiv_distance
    if method == "saai":
        return lambda fs: rerank("aim", fs.query_feat, fs.gallery_feat, preset="sysu")
    return None


def features_for(model: torch.nn.Module, protocol, transforms: TransformConfig, batch_size: int) -> FeatureSet:
    queries, galleries = protocol_images(protocol)
    q = extract_features(model, queries, transforms, batch_size=batch_size)
    g = extract_features(model, galleries, transforms, batch_size=batch_size)
    fs = protocol_feature_set(protocol, q.pop("feat"), g.pop("feat"))
    fs.extras.update({f"query_{k}": v for k, v in q.items()})
    fs.extras.update({f"gallery_{k}": v for k, v in g.items()})
    return fs


def run_method(method: str, data_root: Path, out: Path, args: argparse.Namespace) -> list[dict[str, object]]:
    overrides = [
        f"data.root={data_root}", f"output_dir={out / method}", f"epochs={args.epochs}", "data.val_ids=4",
        "eval.period=0", f"sampler.num_ids={args.num_ids}", f"sampler.per_modality={args.per_modality}",
        "sampler.epoch_length=identities", f"transforms.height={args.height}", f"transforms.width={args.width}",
        f"schedule.milestones=[{max(args.epochs - 2, 1)}]", f"seed={args.seed}", f"threads={args.threads}",
        "progress_bar=false", f"model.backbone={args.backbone}",
    ]
    if method == "saai":
        overrides += [f"model.params.image_size=[{args.height}, {args.width}]",
                      f"model.params.separation_stride={2 * args.per_modality}"]
    if method == "ssft":
        overrides += [f"model.params.graph_k={args.per_modality}", f"model.params.single_query_amplify={args.per_modality}"]
    cfg = load_train_config(REPO / "configs" / f"{method}_synthetic_tiny.yaml", overrides)
    start = time.perf_counter()
    summary = train(cfg)
    train_s = time.perf_counter() - start
    model, _ = load_checkpoint_model(Path(summary["last_checkpoint"]))
    dataset = build_dataset("sysu", data_root)
    protocol = build_protocol("sysu", dataset, mode="all", shots=1, permutations="seeded", seed=args.seed)
    fs = features_for(model, protocol, cfg.transforms, cfg.eval.batch_size)
    plain = evaluate_features(fs, "sysu").mean
    variants = [method, "ssft-single"] if method == "ssft" else [method]
    return [{"method": name, "plain": plain,
             "own": evaluate_features(fs, "sysu", distance_fn=inference_distance(name, model)).mean,
             "train_s": train_s, "steps": summary["global_step"]} for name in variants]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", type=int, default=150, help="synthetic identities (20%% are test identities)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--num-ids", type=int, default=8, help="identities per batch")
    parser.add_argument("--per-modality", type=int, default=4, help="images per identity and modality per batch")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--backbone", default="resnet10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--demo-difficulty", action="store_true",
                        help="render with vireid demo's difficulty (near-infrared-like brightness) instead of "
                             "the generator's harder default")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_methods")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    difficulty = DemoSettings.difficulty if args.demo_difficulty else Difficulty()
    data_root = args.out / f"synthetic_sysu_{args.ids}{'_demo' if args.demo_difficulty else ''}"
    render_dataset(SynthConfig("sysu", num_ids=args.ids, seed=args.seed, difficulty=difficulty), data_root)
    rows = []
    for method in args.methods:
        rows.extend(run_method(method, data_root, args.out, args))
        print(f"{method}: done ({rows[-1]['train_s']:.0f} s training)", flush=True)

    level = "demo" if args.demo_difficulty else "default"
    print(f"\nsynthetic SYSU ({args.ids} ids, {level} difficulty), {args.backbone} {args.height}x{args.width}, "
          f"{args.epochs} epochs, "
          f"batches of {args.num_ids} ids x ({args.per_modality}+{args.per_modality}); SYSU all-search single-shot, "
          "10 seeded trials (percent)")
    header = (f"{'method':<11} {'inference':<14} {'r1':>6} {'mAP':>6} {'mINP':>6} | "
              f"{'r1':>6} {'mAP':>6} {'mINP':>6} | {'steps':>5} {'train s':>7}")
    print(f"{'':<26}{'plain':^22}| {'with its inference':^21}|")
    print(header)
    print("-" * len(header))
    for row in rows:
        p, o = row["plain"], row["own"]
        print(f"{row['method']:<11} {INFERENCE[row['method']]:<14} "
              f"{100 * p.cmc[0]:6.2f} {100 * p.mAP:6.2f} {100 * p.mINP:6.2f} | "
              f"{100 * o.cmc[0]:6.2f} {100 * o.mAP:6.2f} {100 * o.mINP:6.2f} | {row['steps']:>5} {row['train_s']:7.1f}")


if __name__ == "__main__":
    main()
