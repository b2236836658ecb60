"""cm-SSFT diagnostics on the synthetic SYSU layout: does the modality adversary make the shared
feature H modality-invariant, and does the SSTN then transfer from the right neighbours?

Trains cm-SSFT variants (named ``--set`` overrides) with the like-for-like benchmark's common
recipe (``benchmarks/methods.py``: synthetic SYSU, 150 identities, default difficulty, resnet10,
64×32, 8 ids × (4 + 4), Adam 3.5e-3, label smoothing 0.1, GeM, 20 epochs, ×0.1 at 70 %) and reports,
per variant and seed:

* training (from the run's TensorBoard scalars, means over quarters of the run): the modality
  discriminator's accuracy on the batch's H (``disc_acc``), the norms of the gradients that the
  modality term and the identity loss L_c(H) send to H (``adv_grad_h``, ``id_grad_h``), and the
  share of the cross-modality neighbours kept by T(·, k) in the batch that have the anchor's
  identity (``neighbour_precision``; chance 1/8 with 8 identities per batch);
* test identities (all test images): the trained discriminator's accuracy on H, the accuracy of a
  fresh linear modality probe on H (trained on half the identities, tested on the other half), the
  cross-modality top-k neighbour precision of H (each infrared image's k nearest visible images
  by Eq. 7, and the reverse) against chance, and in the all-queries SSTN graph of trial 0 the
  share of each query's propagated mass (D^-1/2 A D^-1/2 weights, itself excluded) that comes from
  images of its own identity;
* retrieval (SYSU all-search single-shot, 10 seeded trials, percent): the plain shared feature
  and the SSTN in all-queries and single-query (Eq. 22) mode.

Run (heavy: wrap it in the shared CPU lock)::

    python benchmarks/ssft_diagnostics.py --seeds 0 \\
        --variant literal model.params.modality_adversary=literal \\
        --variant confusion model.params.modality_adversary=confusion
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vireid.config import apply_overrides, from_dict
from vireid.data.datasets import build_dataset
from vireid.data.protocols import build_protocol, protocol_feature_set, protocol_images
from vireid.data.records import Modality
from vireid.data.synthetic import Difficulty, SynthConfig, render_dataset
from vireid.engine.checkpoint import load_checkpoint_model
from vireid.engine.config import TrainConfig
from vireid.engine.extraction import extract_features
from vireid.engine import distributed
from vireid.engine.schedule import build_scheduler
from vireid.engine.trainer import Trainer
from vireid.evaluation.evaluator import evaluate_features
from vireid.io import write_json_atomic
from vireid.models.methods.ssft import SSFTModel, ssft_distance
from vireid.models.methods.ssft_transfer import affinity, searched_neighbours

REPO = Path(__file__).resolve().parents[1]
SCALARS = ("disc_acc", "adv_grad_h", "id_grad_h", "neighbour_precision", "ma", "pa")


def recipe(data_root: Path, out: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The like-for-like benchmark's common recipe with cm-SSFT's paper architecture (split after layer2)."""
    return {
        "data": {"dataset": "sysu", "root": str(data_root), "val_ids": 0, "num_workers": 0},
        "sampler": {"num_ids": 8, "per_modality": 4, "epoch_length": "identities"},
        "transforms": {"height": 64, "width": 32, "pad": 4, "flip_prob": 0.5, "channel_aug_prob": 0.0,
                       "grayscale_prob": 0.0, "erasing_prob": 0.0},
        "model": {"method": "ssft", "backbone": "resnet10", "split": "layer2", "pooling": "gem", "pretrained": None,
                  "params": {"label_smoothing": 0.1}},
        "optim": {"name": "adam", "lr": 3.5e-3, "weight_decay": 5e-4, "backbone_lr_factor": 1.0},
        "schedule": {"warmup_epochs": 1, "warmup_factor": 0.1, "milestones": [max(1, round(0.7 * args.epochs))],
                     "gamma": 0.1},
        "eval": {"period": 0, "batch_size": 128},
        "epochs": args.epochs, "seed": seed, "threads": args.threads, "amp": "none", "output_dir": str(out),
        "progress_bar": False, "log_every": args.log_every,
    }


def train_run(cfg: TrainConfig) -> dict[str, Any]:
    """Train on the CPU as ``vireid.engine.trainer.train`` does, with the adversary's learning rate
    following the run's schedule (the paper decays the whole algorithm): where the engine's
    scheduler drives only the main optimiser, a second one, stepped after each adversary step,
    drives the adversary optimiser."""
    torch.set_num_threads(cfg.threads or 2)
    trainer = Trainer(cfg, distributed.DistInfo(), torch.device("cpu"))
    if trainer.adversary_optimizer is not None and hasattr(trainer, "scheduler"):
        adversary_scheduler = build_scheduler(trainer.adversary_optimizer, cfg.schedule, len(trainer.sampler))
        trainer.adversary_optimizer.register_step_post_hook(lambda *_: adversary_scheduler.step())
    summary = trainer.run()
    summary["final_lr"] = {"network": trainer.optimizer.param_groups[0]["lr"],
                           "adversary": trainer.adversary_optimizer.param_groups[0]["lr"]
                           if trainer.adversary_optimizer is not None else None}
    return summary


def training_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The run's train/<name> TensorBoard scalars as (step, value) lists."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    return {name: [(e.step, e.value) for e in events.Scalars(f"train/{name}")]
            for name in SCALARS if f"train/{name}" in tags}


def quarters(curve: list[tuple[int, float]]) -> list[float]:
    """Means of the values in each quarter of the run (by step)."""
    if not curve:
        return []
    last = curve[-1][0]
    return [float(np.mean([v for s, v in curve if q * last / 4 < s <= (q + 1) * last / 4] or [np.nan]))
            for q in range(4)]


def linear_probe_accuracy(features: np.ndarray, modality: np.ndarray, pids: np.ndarray, seed: int) -> float:
    """Modality accuracy of a logistic regression on standardised features, trained on half of the
    identities and tested on the others (full-batch L-BFGS, light L2)."""
    ids = np.unique(pids)
    rng = np.random.default_rng(seed)
    train_ids = set(rng.permutation(ids)[: len(ids) // 2].tolist())
    fit = np.array([p in train_ids for p in pids])
    x = torch.from_numpy(features).double()
    x = (x - x[fit].mean(0)) / (x[fit].std(0) + 1e-6)
    y = torch.from_numpy(modality.astype(np.float64))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x[fit] @ w + b, y[fit]) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        predicted = (x[~fit] @ w + b > 0).double()
    return float((predicted == y[~fit]).double().mean())


def neighbour_precision(query: np.ndarray, query_pid: np.ndarray, gallery: np.ndarray, gallery_pid: np.ndarray,
                        k: int) -> tuple[float, float]:
    """(precision, chance): share of each query's k most affine gallery images (Eq. 7) with its identity."""
    scores = affinity(torch.from_numpy(query), torch.from_numpy(gallery))
    top = scores.topk(k, dim=1).indices.numpy()
    precision = float((gallery_pid[top] == query_pid[:, None]).mean())
    chance = float(np.mean([(gallery_pid == p).mean() for p in query_pid]))
    return precision, chance


def transferred_mass(shared: np.ndarray, specific: np.ndarray, modality: np.ndarray, pids: np.ndarray,
                     rows: np.ndarray, k: int) -> dict[str, float]:
    """In the all-queries graph (Eq. 8, 10): for the given rows, the share of D^-1/2 A D^-1/2 mass
    from other images (itself excluded) that comes from the row's identity, split by modality."""
    index, weight = searched_neighbours(shared, specific, modality, k, "exact")
    degree = weight.sum(axis=1)
    norm = weight / np.sqrt(degree[:, None] * degree[np.clip(index, 0, None)])
    norm[index < 0] = 0.0
    out: dict[str, float] = {}
    for name, same_modality in (("intra", True), ("cross", False)):
        safe = np.clip(index[rows], 0, None)
        keep = (index[rows] >= 0) & (safe != rows[:, None]) & ((modality[safe] == modality[rows, None]) == same_modality)
        mass = np.where(keep, norm[rows], 0.0)
        same_id = np.where(pids[safe] == pids[rows, None], mass, 0.0)
        out[f"{name}_same_id_share"] = float(same_id.sum() / max(mass.sum(), 1e-12))
    return out


def diagnose(model: SSFTModel, data_root: Path, cfg: TrainConfig, seed: int) -> dict[str, Any]:
    """Test-identity diagnostics and retrieval of one trained model."""
    k = model.params.graph_k
    dataset = build_dataset("sysu", data_root)
    test = list(dataset.test)
    feats = extract_features(model, test, cfg.transforms, batch_size=cfg.eval.batch_size)
    modality = np.array([int(r.modality) for r in test])
    pids = np.array([r.pid for r in test])
    shared = feats["shared"]
    with torch.no_grad():
        logits = model.discriminator(torch.from_numpy(shared))
    ir, vis = modality == int(Modality.INFRARED), modality == int(Modality.VISIBLE)
    ir_to_vis = neighbour_precision(shared[ir], pids[ir], shared[vis], pids[vis], k)
    vis_to_ir = neighbour_precision(shared[vis], pids[vis], shared[ir], pids[ir], k)
    result: dict[str, Any] = {
        "test_disc_acc": float((logits.argmax(1).numpy() == modality).mean()),
        "test_probe_acc": linear_probe_accuracy(shared, modality, pids, seed),
        "h_precision_ir_to_vis": ir_to_vis[0], "h_precision_vis_to_ir": vis_to_ir[0],
        "h_chance_ir_to_vis": ir_to_vis[1], "h_chance_vis_to_ir": vis_to_ir[1],
    }
    protocol = build_protocol("sysu", dataset, mode="all", shots=1, permutations="seeded", seed=seed)
    queries, galleries = protocol_images(protocol)
    q = extract_features(model, queries, cfg.transforms, batch_size=cfg.eval.batch_size)
    g = extract_features(model, galleries, cfg.transforms, batch_size=cfg.eval.batch_size)
    fs = protocol_feature_set(protocol, q.pop("feat"), g.pop("feat"))
    fs.extras.update({f"query_{name}": v for name, v in q.items()})
    fs.extras.update({f"gallery_{name}": v for name, v in g.items()})
    retrieval = {"plain": evaluate_features(fs, "sysu").mean}
    if model.transfer is not None:
        trial = fs.trial(0)
        nodes = {name: np.concatenate([trial.extras[f"query_{name}"], trial.extras[f"gallery_{name}"]])
                 for name in ("shared", "specific", "modality")}
        node_pids = np.concatenate([trial.query_id, trial.gallery_id])
        result.update(transferred_mass(nodes["shared"], nodes["specific"], nodes["modality"].astype(np.int64),
                                       node_pids, np.arange(len(trial.query_id)), k))
        for mode in ("all", "single"):
            retrieval[f"sstn-{mode}"] = evaluate_features(fs, "sysu", distance_fn=ssft_distance(model, mode)).mean
    result["retrieval"] = {name: {"r1": 100 * r.cmc[0], "mAP": 100 * r.mAP, "mINP": 100 * r.mINP}
                           for name, r in retrieval.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "OVERRIDE"),
                        help="a variant: its name, then `vireid train --set` overrides (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--ids", type=int, default=150, help="synthetic identities (20%% are test identities)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=5, help="training steps per logged scalar")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "ssft_diagnostics")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data_root = args.out / f"synthetic_sysu_{args.ids}"
    render_dataset(SynthConfig("sysu", num_ids=args.ids, seed=0, difficulty=Difficulty()), data_root)
    results: list[dict[str, Any]] = []
    for name, *overrides in args.variant:
        for seed in args.seeds:
            run_dir = args.out / f"{name}_seed{seed}"
            cfg = from_dict(TrainConfig, apply_overrides(recipe(data_root, run_dir, seed, args), overrides))
            start = time.perf_counter()
            summary = train_run(cfg)
            train_s = time.perf_counter() - start
            model, _ = load_checkpoint_model(Path(summary["last_checkpoint"]))
            assert isinstance(model, SSFTModel)
            curves = training_curves(run_dir)
            row = {"variant": name, "overrides": overrides, "seed": seed, "steps": summary["global_step"],
                   "final_lr": summary["final_lr"],
                   "train_s": round(train_s, 1), "first_logged": {n: c[0][1] for n, c in curves.items() if c},
                   "quarters": {n: quarters(c) for n, c in curves.items()}, **diagnose(model, data_root, cfg, seed)}
            results.append(row)
            print(json.dumps(row), flush=True)
    write_json_atomic(args.out / "results.json", results)

    print(f"\n{'variant':<14} {'seed':>4} | {'disc acc by quarter':<23} | {'|adv grad H| / |id grad H| by quarter':<38}"
          f" | {'batch nb prec':<13} | test: disc probe  H prec (chance)  same-id mass x/intra")
    for row in results:
        qd = row["quarters"]
        ratio = [a / i if i else float("nan") for a, i in zip(qd.get("adv_grad_h", []), qd.get("id_grad_h", []))]
        prec = qd.get("neighbour_precision", [])
        print(f"{row['variant']:<14} {row['seed']:>4} | {' '.join(f'{v:.2f}' for v in qd['disc_acc']):<23} | "
              f"{' '.join(f'{v:.1e}' for v in ratio):<38} | {' '.join(f'{v:.2f}' for v in prec[-1:]):<13} | "
              f"{row['test_disc_acc']:.2f} {row['test_probe_acc']:.2f}  "
              f"{row['h_precision_ir_to_vis']:.3f} ({row['h_chance_ir_to_vis']:.3f})  "
              f"{row.get('cross_same_id_share', float('nan')):.3f}/{row.get('intra_same_id_share', float('nan')):.3f}")
    print(f"\n{'variant':<14} {'seed':>4} | " + " | ".join(f"{n:<20}" for n in ("plain", "sstn-all", "sstn-single")))
    for row in results:
        cells = [row["retrieval"].get(n) for n in ("plain", "sstn-all", "sstn-single")]
        print(f"{row['variant']:<14} {row['seed']:>4} | " + " | ".join(
            f"r1 {c['r1']:5.1f} mAP {c['mAP']:5.1f}" if c else f"{'-':<20}" for c in cells))


if __name__ == "__main__":
    main()
