"""``vireid demo``: the whole pipeline on the built-in synthetic dataset, on a CPU, in minutes.

render (cached) -> train a small two-stream baseline (a few training identities held out for
validation) -> extract features of the test set and of the validation identities -> evaluate SYSU
all-search single-shot over 10 trials with ``plain``, ``aim``, ``sim`` and ``krr`` -> table,
``results.json`` and ``report.html``. Each re-ranker is reported twice: with the papers' SYSU
preset, and with the parameters chosen on the validation identities (a small grid, best mAP over
3 of the 10 validation trials; :mod:`vireid.evaluation.tuning`), never on the test set. The untrained network is evaluated too:
it must score near chance, the trained one well above it.

The synthetic tree has its own identities and image counts, so the dataset authors'
``rand_perm_cam.mat`` tables cannot index it: the demo uses the official gallery rule
(camera order, ascending ids, permutation rows per trial) with seeded permutation tables
(``permutations="seeded"``, see :mod:`vireid.data.protocols`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vireid.config import from_dict
from vireid.data.synthetic import Difficulty, SynthConfig, render_dataset
from vireid.engine.checkpoint import load_checkpoint_model
from vireid.engine.config import TrainConfig
from vireid.engine.pipeline import extract_protocol_features, held_out_records, validation_query_modality
from vireid.engine.trainer import train
from vireid.evaluation.evaluator import ProtocolEvaluation, evaluate_features
from vireid.evaluation.tuning import PresetAndTuned, preset_and_tuned
from vireid.evaluation.report import (
    REPORT_QUERIES,
    evaluation_to_dict,
    format_table,
    method_rank_lists,
    recorded_distance,
    write_html_report,
)
from vireid.evaluation.metrics import get_protocol
from vireid.features import FeatureSet, save_features
from vireid.io import default_cache_dir, write_json_atomic
from vireid.models.registry import create_model

log = logging.getLogger(__name__)

DEMO_METHODS = ("plain", "aim", "sim", "krr")
TUNE_METRIC = "mAP"
TUNE_TRIALS = 3
"""Validation trials the demo's grid searches average over (of 10), to keep the demo's wall time."""
PROTOCOL_PARAMS = {"mode": "all", "shots": 1, "permutations": "seeded"}


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo run (``quick``: the CI-sized version)."""

    num_ids: int
    epochs: int
    val_ids: int
    height: int = 64
    width: int = 32
    backbone: str = "resnet10"
    difficulty: Difficulty = Difficulty(noise=0.5, pose_variation=0.5, viewpoint_variation=0.5, clutter=0.2,
                                        illumination_variation=0.5, shared_outfit_fraction=0.1,
                                        infrared_luminance_coupling=0.9)

    @classmethod
    def for_mode(cls, quick: bool) -> "DemoSettings":
        return cls(num_ids=120, epochs=4, val_ids=12) if quick else cls(num_ids=400, epochs=5, val_ids=40)


def demo_train_config(settings: DemoSettings, root: Path, out_dir: Path, seed: int) -> TrainConfig:
    """The demo's training run: baseline, AGW losses, Adam, identity-balanced 8 × (4 + 4) batches;
    ``settings.val_ids`` training identities held out (their features choose re-ranking parameters)."""
    return from_dict(TrainConfig, {
        "data": {"dataset": "sysu", "root": str(root), "val_ids": settings.val_ids, "num_workers": 1},
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


def evaluate_methods(features: FeatureSet, methods: tuple[str, ...] = DEMO_METHODS
                     ) -> dict[str, tuple[ProtocolEvaluation | PresetAndTuned, float]]:
    """``plain``, and each re-ranker with its SYSU preset and tuned on ``features.validation``;
    returns the evaluation and its wall seconds per method."""
    out: dict[str, tuple[ProtocolEvaluation | PresetAndTuned, float]] = {}
    for method in methods:
        start = time.perf_counter()
        if method == "plain":
            evaluation: ProtocolEvaluation | PresetAndTuned = evaluate_features(features, "sysu")
        else:
            evaluation = preset_and_tuned(features, "sysu", method, source="demo features", preset="sysu",
                                          metric=TUNE_METRIC, max_trials=TUNE_TRIALS)
        out[method] = (evaluation, time.perf_counter() - start)
    return out


def table_rows(results: dict[str, tuple[ProtocolEvaluation | PresetAndTuned, float]]) -> list[tuple[str, Any]]:
    """(row name, mean result): ``plain``, then ``M (SYSU preset)`` and ``M (tuned on val: values)``."""
    return [(name, evaluation.mean) for name, evaluation in named_evaluations(results)]


def named_evaluations(results: dict[str, tuple[ProtocolEvaluation | PresetAndTuned, float]]
                      ) -> list[tuple[str, ProtocolEvaluation]]:
    """(row name, evaluation) of each table row, in the table's order."""
    rows: list[tuple[str, ProtocolEvaluation]] = []
    for method, (evaluation, _) in results.items():
        if isinstance(evaluation, PresetAndTuned):
            chosen = ", ".join(f"{k} {v:g}" for k, v in evaluation.tuning.chosen.items()
                               if k in evaluation.tuning.grid)
            rows += [(f"{method} (SYSU preset)", evaluation.preset),
                     (f"{method} (tuned on val: {chosen})", evaluation.tuned)]
        else:
            rows.append((method, evaluation))
    return rows


def run_demo(out_dir: Path, *, quick: bool = False, cache_dir: Path | None = None, seed: int = 0,
             device: str = "auto") -> dict[str, Any]:
    """Run the demo into ``out_dir`` on ``device`` (a torch device name, or ``auto``: CUDA when
    available); returns the ``results.json`` content."""
    start = time.perf_counter()
    settings = DemoSettings.for_mode(quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    synth = SynthConfig("sysu", settings.num_ids, seed=seed, height=settings.height, width=settings.width,
                        difficulty=settings.difficulty)
    tag = hashlib.sha256(json.dumps(synth.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    root = (cache_dir or default_cache_dir()) / "synthetic" / f"sysu-{settings.num_ids}ids-{tag}"
    print(f"[1/4] synthetic SYSU-layout dataset: {root}")
    render_dataset(synth, root)

    cfg = replace(demo_train_config(settings, root, out_dir, seed), device=device)
    torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        untrained = create_model(cfg.model, num_classes=1).eval()
    print("[2/4] evaluating the untrained network (chance level)")
    untrained_features = _extract(untrained, cfg, root, torch_device)
    chance = evaluate_features(untrained_features, "sysu")

    print(f"[3/4] training {settings.backbone} two-stream baseline for {settings.epochs} epochs on {torch_device}")
    summary = train(cfg)
    model, _ = load_checkpoint_model(summary["last_checkpoint"])

    print("[4/4] extracting features (test set and validation identities), evaluating SYSU all-search "
          "single-shot, 10 trials; re-ranking parameters also chosen on the validation identities")
    features = _extract(model, cfg, root, torch_device, validation=True)
    save_features(out_dir / "features.npz", features)
    results = evaluate_methods(features)

    print(format_table([("untrained (plain)", chance.mean)] + table_rows(results)))
    rows = table_rows(results) + [("untrained (plain)", chance.mean)]   # the report: plain first
    # rank lists of every row on the first trial; the untrained network's features share its rows
    distances = {name: recorded_distance(features, evaluation.distance)
                 for name, evaluation in named_evaluations(results)}
    distances["untrained (plain)"] = recorded_distance(untrained_features, chance.distance)
    rank_lists = method_rank_lists(features, distances, get_protocol("sysu"), seed=seed, image_root=root)
    wall = time.perf_counter() - start
    payload: dict[str, Any] = {
        "protocol": {"name": "sysu", **PROTOCOL_PARAMS, "trials": features.num_trials},
        "dataset": {"root": str(root), **synth.to_dict()},
        "methods": {m: _method_entry(ev, secs) for m, (ev, secs) in results.items()},
        "validation": features.meta.get("validation"),
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
        rank_list_note=f"{REPORT_QUERIES} queries of trial 1 of {features.num_trials} drawn with seed {seed}.",
        notes=[f"{settings.backbone} two-stream baseline, {settings.epochs} epochs on {summary['num_train_ids']} "
               f"synthetic identities ({settings.val_ids} more held out for validation); 10 trials, official "
               f"gallery rule with seeded permutations; re-rankers with the SYSU preset and with parameters "
               f"chosen on the validation identities (best {TUNE_METRIC} over {TUNE_TRIALS} validation trials); "
               f"total wall time {wall:.0f} s."],
    )
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'report.html'} ({wall:.0f} s)")
    return payload


def _extract(model: torch.nn.Module, cfg: TrainConfig, root: Path, device: torch.device, *,
             validation: bool = False) -> FeatureSet:
    return extract_protocol_features(model, cfg.transforms, dataset="sysu", root=str(root), protocol="sysu",
                                     protocol_params=dict(PROTOCOL_PARAMS), batch_size=128, device=device,
                                     validation_records=held_out_records(cfg) if validation else (),
                                     validation_query=validation_query_modality(cfg))


def _method_entry(evaluation: ProtocolEvaluation | PresetAndTuned, seconds: float) -> dict[str, Any]:
    """results.json entry: the preset's metrics (plain: its own) and, for re-rankers, ``tuned``:
    the metrics with the chosen values, the values, and the validation search."""
    if not isinstance(evaluation, PresetAndTuned):
        return {**_metrics(evaluation), "wall_time_s": seconds}
    tuning = evaluation.tuning
    return {**_metrics(evaluation.preset), "wall_time_s": seconds,
            "tuned": {**_metrics(evaluation.tuned), "params": tuning.chosen, "tuning": tuning.to_dict()}}


def _metrics(evaluation: ProtocolEvaluation) -> dict[str, Any]:
    data = evaluation_to_dict(evaluation)
    return {k: data[k] for k in ("cmc", "mAP", "mINP") if k in data} | {"distance": evaluation.distance}
