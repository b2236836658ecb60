"""``vireid demo``: the whole pipeline on the built-in synthetic dataset, on a CPU, in minutes.

render (cached) -> train a small two-stream baseline -> extract features -> evaluate SYSU
all-search single-shot over 10 trials with ``plain``, ``aim``, ``sim`` and ``krr`` -> table,
``results.json`` and ``report.html``. The untrained network is evaluated too: it must score near
chance, the trained one well above it.

The synthetic tree has its own identities and image counts, so the dataset authors'
``rand_perm_cam.mat`` tables cannot index it: the demo uses the official gallery rule
(camera order, ascending ids, permutation rows per trial) with seeded permutation tables
(``permutations="seeded"``, see :mod:`vireid.data.protocols`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vireid.config import from_dict
from vireid.data.synthetic import Difficulty, SynthConfig, render_dataset
from vireid.engine.checkpoint import load_checkpoint_model
from vireid.engine.config import TrainConfig
from vireid.engine.pipeline import extract_protocol_features
from vireid.engine.trainer import train
from vireid.evaluation.evaluator import ProtocolEvaluation, evaluate_features
from vireid.evaluation.report import evaluation_to_dict, feature_rank_lists, format_table, write_html_report
from vireid.evaluation.metrics import get_protocol
from vireid.features import FeatureSet, save_features
from vireid.io import write_json_atomic
from vireid.models.registry import create_model
from vireid.retrieval import rerank, resolve_rerank

log = logging.getLogger(__name__)

DEMO_METHODS = ("plain", "aim", "sim", "krr")
PROTOCOL_PARAMS = {"mode": "all", "shots": 1, "permutations": "seeded"}


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo run (``quick``: the CI-sized version)."""

    num_ids: int
    epochs: int
    height: int = 64
    width: int = 32
    backbone: str = "resnet10"
    difficulty: Difficulty = Difficulty(noise=0.5, pose_variation=0.5, viewpoint_variation=0.5, clutter=0.2,
                                        illumination_variation=0.5, shared_outfit_fraction=0.1,
                                        infrared_luminance_coupling=0.9)

    @classmethod
    def for_mode(cls, quick: bool) -> "DemoSettings":
        return cls(num_ids=120, epochs=4) if quick else cls(num_ids=400, epochs=5)


def default_cache_dir() -> Path:
    return Path(os.environ.get("VIREID_CACHE", Path.home() / ".cache" / "vireid"))


def demo_train_config(settings: DemoSettings, root: Path, out_dir: Path, seed: int) -> TrainConfig:
    """The demo's training run: baseline, AGW losses, Adam, identity-balanced 8 × (4 + 4) batches."""
    return from_dict(TrainConfig, {
        "data": {"dataset": "sysu", "root": str(root), "val_ids": 0, "num_workers": 1},
        "sampler": {"num_ids": 8, "per_modality": 4, "epoch_length": "images"},
        "transforms": {"height": settings.height, "width": settings.width, "pad": 4, "erasing_prob": 0.0},
        "model": {"method": "baseline", "backbone": settings.backbone, "pooling": "gem", "pretrained": None,
                  "params": {"triplet": "weighted", "label_smoothing": 0.1}},
        "optim": {"name": "adam", "lr": 3.5e-3, "weight_decay": 5e-4, "backbone_lr_factor": 1.0},
        "schedule": {"warmup_epochs": 1, "milestones": [max(1, settings.epochs - 2)], "gamma": 0.1},
        "eval": {"period": 0},
        "epochs": settings.epochs, "seed": seed, "output_dir": str(out_dir / "train"),
        "progress_bar": True,
    }, source="demo settings")


def evaluate_methods(features: FeatureSet, methods: tuple[str, ...] = DEMO_METHODS) -> dict[str, tuple[ProtocolEvaluation, float]]:
    """Each distance method with its SYSU preset (plain: none); returns evaluation and wall seconds."""
    smallest = min(len(features.trial_rows(t)[1]) for t in range(features.num_trials))
    out = {}
    for method in methods:
        settings = resolve_rerank(method, num_gallery=smallest, preset=None if method == "plain" else "sysu")

        def distance(trial: FeatureSet, s=settings) -> np.ndarray:
            return rerank(s.method, trial.query_feat, trial.gallery_feat, variant=s.variant, params=s.params, dtype=s.dtype)

        start = time.perf_counter()
        evaluation = evaluate_features(features, "sysu", distance_fn=distance, distance_info=settings.to_dict())
        out[method] = (evaluation, time.perf_counter() - start)
    return out


def run_demo(out_dir: Path, *, quick: bool = False, cache_dir: Path | None = None, seed: int = 0,
             threads: int | None = None) -> dict[str, Any]:
    """Run the demo into ``out_dir``; returns the ``results.json`` content."""
    start = time.perf_counter()
    settings = DemoSettings.for_mode(quick)
    if threads is not None:
        torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    synth = SynthConfig("sysu", settings.num_ids, seed=seed, height=settings.height, width=settings.width,
                        difficulty=settings.difficulty)
    tag = hashlib.sha256(json.dumps(synth.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    root = (cache_dir or default_cache_dir()) / "synthetic" / f"sysu-{settings.num_ids}ids-{tag}"
    print(f"[1/4] synthetic SYSU-layout dataset: {root}")
    render_dataset(synth, root)

    cfg = demo_train_config(settings, root, out_dir, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        untrained = create_model(cfg.model, num_classes=1).eval()
    print("[2/4] evaluating the untrained network (chance level)")
    untrained_features = _extract(untrained, cfg, root)
    chance = evaluate_methods(untrained_features, ("plain",))["plain"][0]

    print(f"[3/4] training {settings.backbone} two-stream baseline for {settings.epochs} epochs on the CPU")
    summary = train(cfg)
    model, _ = load_checkpoint_model(summary["last_checkpoint"])

    print("[4/4] extracting features and evaluating SYSU all-search single-shot, 10 trials")
    features = _extract(model, cfg, root)
    save_features(out_dir / "features.npz", features)
    results = evaluate_methods(features)

    rows = [("untrained (plain)", chance.mean)] + [(m, ev.mean) for m, (ev, _) in results.items()]
    print(format_table(rows))
    first_trial = features.trial(0)
    protocol = get_protocol("sysu")
    rank_lists = {}
    for method in ("plain", "aim"):
        s = resolve_rerank(method, num_gallery=len(first_trial.gallery_id), preset=None if method == "plain" else "sysu")
        dist = rerank(s.method, first_trial.query_feat, first_trial.gallery_feat, variant=s.variant, params=s.params, dtype=s.dtype)
        rank_lists[f"{method} (trial 1)"] = _absolute_paths(feature_rank_lists(first_trial, dist, protocol, count=8, seed=seed), root)
    wall = time.perf_counter() - start
    payload: dict[str, Any] = {
        "protocol": {"name": "sysu", **PROTOCOL_PARAMS, "trials": features.num_trials},
        "dataset": {"root": str(root), **synth.to_dict()},
        "methods": {m: {**_metrics(ev), "wall_time_s": secs} for m, (ev, secs) in results.items()},
        "untrained": _metrics(chance),
        "train": {k: summary[k] for k in ("epochs", "global_step", "num_train_ids", "num_train_images",
                                          "wall_time_s", "images_per_s", "last_checkpoint")},
        "quick": quick,
        "wall_time_s": wall,
    }
    write_json_atomic(out_dir / "results.json", payload)
    write_html_report(
        out_dir / "report.html", "vireid demo: synthetic SYSU-MM01 layout, all-search single-shot",
        rows, rank_lists=rank_lists,
        notes=[f"{settings.backbone} two-stream baseline, {settings.epochs} epochs on {summary['num_train_ids']} "
               f"synthetic identities; 10 trials, official gallery rule with seeded permutations; "
               f"total wall time {wall:.0f} s."],
    )
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'report.html'} ({wall:.0f} s)")
    return payload


def _extract(model: torch.nn.Module, cfg: TrainConfig, root: Path) -> FeatureSet:
    return extract_protocol_features(model, cfg.transforms, dataset="sysu", root=str(root), protocol="sysu",
                                     protocol_params=dict(PROTOCOL_PARAMS), batch_size=128)


def _metrics(evaluation: ProtocolEvaluation) -> dict[str, Any]:
    data = evaluation_to_dict(evaluation)
    return {k: data[k] for k in ("cmc", "mAP", "mINP") if k in data} | {"distance": evaluation.distance}


def _absolute_paths(rank_lists: list, root: Path) -> list:
    for rank_list in rank_lists:
        rank_list.query_path = str(root / rank_list.query_path)
        rank_list.gallery_paths = [str(root / p) for p in rank_list.gallery_paths]
    return rank_lists
