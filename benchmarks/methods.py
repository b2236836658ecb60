"""Like-for-like method benchmark: every variant trained with ONE common recipe, over several seeds.

Every variant of every method is trained on the same rendered synthetic SYSU-MM01-layout data with
the same backbone, input size, sampler, optimiser, learning-rate schedule, schedule length,
augmentation, pooling, BNNeck and label smoothing (the *common recipe*, printed by ``--show-recipe``).
A variant differs from the baseline only in what its paper specifies: its model (``model.method``),
its modules, losses and their weights, given in ``benchmarks/variants/<method>.yaml``::

    method: saai                            # model.method of every variant in this file
    source: "Fang et al., ICCV 2023, Tables 3-4"
    common_overrides:                       # paper settings shared by the file's variants
      - model.params.image_size=[{height}, {width}]   # {placeholders}: values of the common recipe
    variants:
      - name: saai                          # unique over all files
        overrides: []                       # `vireid train --set` syntax, on top of the recipe
        inference: [plain, aim]             # test-time distances evaluated for this variant
        note: ""                            # optional, shown in the JSON
    claims:                                 # the paper's own ablation directions
      - better: saai/aim                    # variant/inference
        worse: saai-no-lpd/plain
        metric: mAP                         # r1 | mAP | mINP (default mAP)
        source: "Table 4, rows 3 vs 4"

Overrides may not touch the common recipe (data, sampler, input size, crop padding, flip, channel
augmentation, erasing, normalisation, backbone, pooling, pretrained weights, label smoothing,
optimiser and its learning rates, schedule, epochs, seed, evaluation): such a key is an error.
A paper's own augmentation (``transforms.grayscale_prob``), architecture (``model.split``,
``model.last_stride``), method parameters (``model.params.*``), ``optim.adversary_lr`` and
``optim.grad_clip`` are open. Placeholders: ``{height}``, ``{width}``, ``{num_ids}``,
``{per_modality}``, ``{images_per_id}`` (= 2 × per_modality), ``{epochs}``.

Default size (measured on the 2-core CPU, seconds per training step on two free cores: baseline,
DF2AM and SAAI 0.33-0.37, XIV 0.57, cm-SSFT 0.93): 150 identities at ``vireid demo``'s difficulty,
resnet10 at 64×32, 16 epochs of 15 batches (240 steps), so that the baseline and about 15 variants
over 3 seeds take about 90 minutes. Difficulty: after 300 steps the baseline reached 41 % rank-1 /
48 % mAP at the demo's difficulty and only 17 % / 25 % at the generator's default (chance: 3 %
rank-1) -- too weak a neighbourhood for the re-rankers and cm-SSFT's transfer, which build on the
neighbours a feature finds (``--difficulty default`` runs it anyway).

Evaluation: the synthetic test identities, SYSU official protocol (all-search, single-shot, 10
trials with seeded gallery permutations; the trial permutations follow the run's seed), percent.
Inference names (one registry, ``INFERENCES``): plain, aim, sgr, mnnr, sim, krr (``sysu`` presets of
``vireid.retrieval``), xiv-eq2 (XIV Eq. 2), sstn-all / sstn-single (cm-SSFT's test-time transfer,
all-queries and single-query Eq. 22). A cm-SSFT ``plain`` row is its shared feature H.

Cache: ``OUT/cache/<key>/`` holds one trained run (checkpoint, features, ``run.json``) keyed by the
resolved training config, the seed, the rendered data's parameters, the torch version and a hash of
every ``vireid`` source file the training imports (and of this script's training code); each
inference result is keyed by that key plus the hash of the evaluation code. A change in a method's
module retrains that method only; a rerun with nothing changed only prints the tables.

Claims: for each claim Δ = metric(better) − metric(worse) per seed (paired: same seed, same data,
same gallery permutations); the table gives mean Δ ± std (n − 1), the seeds where Δ > 0, and a
verdict from the one-sided paired t-test at 5 %: *reproduced* (Δ > 0 significant), *not reproduced*
(Δ < 0 significant: the opposite direction), *within noise* (neither; always with one seed).

Run (heavy: wrap it in the shared CPU lock)::

    python benchmarks/methods.py --seeds 0 1 2                       # every variant file
    python benchmarks/methods.py --methods baseline saai --seeds 0 1 2

Outputs: ``OUT/results.json`` and ``OUT/results.md`` (also printed).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml

import vireid
from vireid.config import apply_overrides, from_dict, to_dict
from vireid.data.synthetic import Difficulty, SynthConfig, render_dataset
from vireid.engine.config import TrainConfig
from vireid.engine.demo import DemoSettings
from vireid.errors import InputError
from vireid.evaluation.evaluator import DistanceFn
from vireid.features import FeatureSet
from vireid.io import write_json_atomic, write_text_atomic
from vireid.models.registry import method_params

REPO = Path(__file__).resolve().parents[1]
VARIANTS_DIR = REPO / "benchmarks" / "variants"
DEFAULT_OUT = REPO / "runs" / "bench_methods"
METRICS = ("r1", "mAP", "mINP")
DIFFICULTIES = {
    "default": Difficulty(),              # the generator's default difficulty
    "demo": DemoSettings.difficulty,      # `vireid demo`'s: easier, near-infrared-like brightness
}


# --------------------------------------------------------------------------- the common recipe

@dataclass(frozen=True)
class Recipe:
    """The settings every variant shares (the command-line options of the same names)."""

    ids: int = 150
    difficulty: str = "demo"
    epochs: int = 16
    height: int = 64
    width: int = 32
    backbone: str = "resnet10"
    num_ids: int = 8
    per_modality: int = 4
    lr: float = 3.5e-3
    label_smoothing: float = 0.1
    threads: int = 2

    def synth(self) -> SynthConfig:
        """The rendered data: one set for every variant and seed (the data seed is fixed at 0)."""
        return SynthConfig("sysu", num_ids=self.ids, seed=0, difficulty=DIFFICULTIES[self.difficulty])

    def placeholders(self) -> dict[str, str]:
        return {"height": str(self.height), "width": str(self.width), "num_ids": str(self.num_ids),
                "per_modality": str(self.per_modality), "images_per_id": str(2 * self.per_modality),
                "epochs": str(self.epochs)}

    def config(self, data_root: str, seed: int) -> dict[str, Any]:
        """The common training config (a ``TrainConfig`` mapping) before the variant's overrides."""
        return {
            "data": {"dataset": "sysu", "root": data_root, "val_ids": 0, "num_workers": 0},
            "sampler": {"num_ids": self.num_ids, "per_modality": self.per_modality, "epoch_length": "identities"},
            "transforms": {"height": self.height, "width": self.width, "pad": 4, "flip_prob": 0.5,
                           "channel_aug_prob": 0.0, "grayscale_prob": 0.0, "erasing_prob": 0.0},
            "model": {"method": "baseline", "backbone": self.backbone, "pooling": "gem", "pretrained": None,
                      "params": {"label_smoothing": self.label_smoothing}},
            "optim": {"name": "adam", "lr": self.lr, "weight_decay": 5e-4, "backbone_lr_factor": 1.0},
            "schedule": {"warmup_epochs": 1, "warmup_factor": 0.1,
                         "milestones": [max(1, round(0.7 * self.epochs))], "gamma": 0.1},
            "eval": {"period": 0, "batch_size": 128},
            "epochs": self.epochs, "seed": seed, "threads": self.threads, "device": "auto", "amp": "none",
            "output_dir": "", "progress_bar": False, "log_every": 10, "checkpoint_every": 0,
        }


#: keys of the common recipe a variant file may not override (a key equal to one, or below one).
LOCKED_KEYS = (
    "data", "sampler", "transforms.height", "transforms.width", "transforms.pad", "transforms.flip_prob",
    "transforms.channel_aug_prob", "transforms.erasing_prob", "transforms.mean", "transforms.std",
    "model.method", "model.backbone", "model.pooling", "model.pretrained", "model.channels_last",
    "model.params.label_smoothing", "optim.name", "optim.lr", "optim.weight_decay", "optim.momentum",
    "optim.nesterov", "optim.backbone_lr_factor", "schedule", "epochs", "seed", "eval", "threads", "device", "amp",
    "output_dir", "progress_bar", "log_every", "checkpoint_every",
)

#: finalize options that keep a method's raw features (its test-time transform is an inference name).
RAW_FEATURE_OPTIONS: dict[str, dict[str, Any]] = {"ssft": {"mode": "shared"}}


# --------------------------------------------------------------------------- inference registry

@dataclass(frozen=True)
class Inference:
    """A test-time distance: ``make(load_model)`` returns the evaluator's per-trial distance (None: plain)."""

    name: str
    summary: str
    make: Callable[[Callable[[], torch.nn.Module]], DistanceFn | None]
    modules: tuple[str, ...]
    methods: tuple[str, ...] = ()


def _rerank_inference(name: str, summary: str) -> Inference:
    def make(_load_model: Callable[[], torch.nn.Module]) -> DistanceFn:
        from vireid.retrieval.api import rerank

        return lambda trial: rerank(name, trial.query_feat, trial.gallery_feat, preset="sysu")

    return Inference(name, summary, make, ("vireid.retrieval.api",))


def _xiv_eq2(_load_model: Callable[[], torch.nn.Module]) -> DistanceFn:
    from vireid.models.methods.xiv import xiv_distance

    return xiv_distance


def _sstn(mode: str) -> Callable[[Callable[[], torch.nn.Module]], DistanceFn]:
    def make(load_model: Callable[[], torch.nn.Module]) -> DistanceFn:
        from vireid.models.methods.ssft import ssft_distance

        return ssft_distance(load_model(), mode)  # type: ignore[arg-type]

    return make


INFERENCES: dict[str, Inference] = {inf.name: inf for inf in (
    Inference("plain", "negative cosine of the test feature", lambda _load: None, ()),
    _rerank_inference("aim", "SAAI affinity inference, sysu preset (k1 4, k2 1)"),
    _rerank_inference("sgr", "SIM similarity graph reasoning, sysu preset"),
    _rerank_inference("mnnr", "SIM mutual nearest-neighbour reasoning, sysu preset"),
    _rerank_inference("sim", "SIM: SGR then MNNR, sysu preset"),
    _rerank_inference("krr", "k-reciprocal re-ranking (20/6/0.3)"),
    Inference("xiv-eq2", "XIV Eq. 2: D(f(q), f(g)) + D(f(q), f(X(g)))", _xiv_eq2, ("vireid.models.methods.xiv",), ("xiv",)),
    Inference("sstn-all", "cm-SSFT test-time transfer, all queries at once", _sstn("all"),
              ("vireid.models.methods.ssft",), ("ssft",)),
    Inference("sstn-single", "cm-SSFT test-time transfer, one query at a time (Eq. 22)", _sstn("single"),
              ("vireid.models.methods.ssft",), ("ssft",)),
)}


# --------------------------------------------------------------------------- variant files

@dataclass
class VariantSpec:
    name: str = ""
    overrides: list[str] = field(default_factory=list)
    inference: list[str] = field(default_factory=lambda: ["plain"])
    note: str = ""


@dataclass
class ClaimSpec:
    better: str = ""
    worse: str = ""
    metric: Literal["r1", "mAP", "mINP"] = "mAP"
    source: str = ""


@dataclass
class VariantFile:
    method: str = ""
    source: str = ""
    common_overrides: list[str] = field(default_factory=list)
    variants: list[VariantSpec] = field(default_factory=list)
    claims: list[ClaimSpec] = field(default_factory=list)


@dataclass(frozen=True)
class Variant:
    """One variant, resolved: its file, method and the overrides to apply on top of the recipe."""

    name: str
    file: str
    method: str
    overrides: tuple[str, ...]
    inference: tuple[str, ...]
    note: str = ""


@dataclass(frozen=True)
class Claim:
    file: str
    better: tuple[str, str]
    worse: tuple[str, str]
    metric: str
    source: str


_PLACEHOLDER = re.compile(r"\{([A-Za-z_]+)\}")


def _locked(key: str) -> str | None:
    for locked in LOCKED_KEYS:
        if key == locked or key.startswith(locked + "."):
            return locked
    return None


def check_override(item: str, where: str, recipe: Recipe) -> str:
    """``item`` with placeholders filled in; errors (one line, naming ``where``) for bad syntax or a locked key."""
    if not isinstance(item, str) or "=" not in item:
        raise InputError(f"{where}: override {item!r}: expected KEY=VALUE")
    key = item.split("=", 1)[0].strip()
    locked = _locked(key)
    if locked is not None:
        raise InputError(f"{where}: override {key!r} changes the common recipe ({locked}); "
                         "every variant shares it (see benchmarks/methods.py --show-recipe)")
    values = recipe.placeholders()

    def fill(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise InputError(f"{where}: override {item!r}: unknown placeholder {{{match.group(1)}}} "
                             f"(known: {', '.join('{' + k + '}' for k in values)})")
        return values[match.group(1)]

    return _PLACEHOLDER.sub(fill, item)


def load_variant_file(path: Path, recipe: Recipe) -> tuple[list[Variant], list[Claim]]:
    """Parse and check one variant file; every problem is an :class:`InputError` naming the file and key."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read variant file: {exc}".replace("\n", " ")) from None
    spec = from_dict(VariantFile, data if data is not None else {}, source=str(path))
    if not spec.method:
        raise InputError(f"{path}: key 'method' is required (the model.method of the file's variants)")
    if not spec.variants:
        raise InputError(f"{path}: key 'variants' must list at least one variant")
    common = tuple(check_override(o, f"{path}: common_overrides[{i}]", recipe)
                   for i, o in enumerate(spec.common_overrides))
    variants = []
    for i, v in enumerate(spec.variants):
        where = f"{path}: variants[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", v.name or ""):
            raise InputError(f"{where}.name: expected a name of letters, digits and _ . + -, got {v.name!r}")
        if not v.inference:
            raise InputError(f"{where}.inference: list at least one inference name")
        for j, name in enumerate(v.inference):
            inf = INFERENCES.get(name)
            if inf is None:
                raise InputError(f"{where}.inference[{j}]: unknown inference {name!r} (known: {', '.join(INFERENCES)})")
            if inf.methods and spec.method not in inf.methods:
                raise InputError(f"{where}.inference[{j}]: {name!r} needs a {'/'.join(inf.methods)} model, "
                                 f"this file's method is {spec.method!r}")
        if len(set(v.inference)) != len(v.inference):
            raise InputError(f"{where}.inference: an inference name is listed twice")
        overrides = common + tuple(check_override(o, f"{where}.overrides[{j}]", recipe)
                                   for j, o in enumerate(v.overrides))
        variants.append(Variant(v.name, str(path), spec.method, overrides, tuple(v.inference), v.note))
    claims = []
    for i, c in enumerate(spec.claims):
        refs = []
        for side in ("better", "worse"):
            ref = getattr(c, side)
            if ref.count("/") != 1 or not all(ref.split("/")):
                raise InputError(f"{path}: claims[{i}].{side}: expected VARIANT/INFERENCE, got {ref!r}")
            refs.append(tuple(ref.split("/")))
        claims.append(Claim(str(path), refs[0], refs[1], c.metric, c.source))  # type: ignore[arg-type]
    return variants, claims


def load_variants(folder: Path, recipe: Recipe) -> tuple[dict[str, Variant], list[Claim], dict[str, list[str]]]:
    """Every ``*.yaml`` of ``folder``: variants by name, claims, and the variant names of each file stem."""
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise InputError(f"{folder}: no variant files (*.yaml)")
    variants: dict[str, Variant] = {}
    claims: list[Claim] = []
    by_file: dict[str, list[str]] = {}
    for path in files:
        file_variants, file_claims = load_variant_file(path, recipe)
        for v in file_variants:
            if v.name in variants:
                raise InputError(f"{path}: variant name {v.name!r} is also used in {variants[v.name].file}")
            variants[v.name] = v
        by_file[path.stem] = [v.name for v in file_variants]
        claims.extend(file_claims)
    for claim in claims:
        for side, (name, inference) in (("better", claim.better), ("worse", claim.worse)):
            if name not in variants:
                raise InputError(f"{claim.file}: claim {side} {name}/{inference}: no variant named {name!r}")
            if inference not in variants[name].inference:
                raise InputError(f"{claim.file}: claim {side} {name}/{inference}: variant {name!r} does not list "
                                 f"inference {inference!r} (it lists {', '.join(variants[name].inference)})")
    return variants, claims, by_file


def resolve_config(variant: Variant, recipe: Recipe, seed: int, data_root: str = "DATA") -> TrainConfig:
    """The full training config of ``variant`` at ``seed`` (method parameters validated too)."""
    data = apply_overrides(recipe.config(data_root, seed), [f"model.method={variant.method}", *variant.overrides])
    where = f"{variant.file}: variant {variant.name}"
    cfg = from_dict(TrainConfig, data, source=where)
    try:
        method_params(cfg.model)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    return cfg


# --------------------------------------------------------------------------- cache keys

def _module_file(name: str, src: Path) -> Path | None:
    base = src.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imported_modules(path: Path, module: str) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def source_closure(roots: Sequence[str]) -> list[Path]:
    """The ``vireid`` source files that ``roots`` import, transitively (static imports, parent packages too)."""
    src = Path(vireid.__file__).resolve().parents[1]
    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or not (name == "vireid" or name.startswith("vireid.")):
            continue
        path = _module_file(name, src)
        if path is None:
            continue
        seen[name] = path
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(_imported_modules(path, name))
    return sorted(set(seen.values()))


def code_hash(roots: Sequence[str], functions: Sequence[Callable[..., Any]] = ()) -> str:
    """SHA-256 of the source files ``roots`` import and of the source of ``functions`` (this script's)."""
    src = Path(vireid.__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in source_closure(roots):
        digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes() + b"\0")
    for func in functions:
        digest.update(inspect.getsource(func).encode() + b"\0")
    return digest.hexdigest()


TRAINING_ROOTS = ("vireid.engine.trainer", "vireid.engine.pipeline", "vireid.engine.checkpoint",
                  "vireid.data.datasets.sysu", "vireid.models.methods.{method}")
EVALUATION_ROOTS = ("vireid.evaluation.evaluator", "vireid.data.protocols")
#: settings that do not change what is trained (where it is written, how it is shown, threads).
KEY_EXCLUDED = ("output_dir", "progress_bar", "log_every", "threads", "checkpoint_every")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def training_key_material(cfg: TrainConfig, synth: SynthConfig) -> dict[str, Any]:
    """Everything a trained run depends on (the cache key is its hash)."""
    config = to_dict(cfg)
    for key in KEY_EXCLUDED:
        config.pop(key)
    config["data"].pop("root")
    roots = [r.format(method=cfg.model.method) for r in TRAINING_ROOTS]
    return {"config": config, "data": synth.to_dict(), "torch": torch.__version__,
            "device": "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device,
            "code": code_hash(roots, (train_and_extract,))}


def evaluation_key(train_key: str, inference: str) -> str:
    inf = INFERENCES[inference]
    return _digest({"train": train_key, "inference": inference,
                    "code": code_hash([*EVALUATION_ROOTS, *inf.modules], (evaluate_inference, inf.make))})


# --------------------------------------------------------------------------- running

PROTOCOL = {"mode": "all", "shots": 1, "permutations": "seeded"}


def train_and_extract(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir/train``, extract the protocol's features to ``run_dir/features.npz``."""
    from vireid.engine.checkpoint import load_checkpoint_model
    from vireid.engine.pipeline import extract_protocol_features
    from vireid.engine.trainer import train
    from vireid.features import save_features

    start = time.perf_counter()
    summary = train(cfg)
    train_s = time.perf_counter() - start
    model, _ = load_checkpoint_model(summary["last_checkpoint"])
    device = "cuda" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else "cpu"
    features = extract_protocol_features(
        model, cfg.transforms, dataset="sysu", root=cfg.data.root, protocol="sysu",
        protocol_params={**PROTOCOL, "seed": cfg.seed}, batch_size=cfg.eval.batch_size, device=device,
        finalize_options=RAW_FEATURE_OPTIONS.get(cfg.model.method))
    save_features(run_dir / "features.npz", features)
    return {"train_s": train_s, "steps": summary["global_step"], "num_train_ids": summary["num_train_ids"],
            "extract_s": time.perf_counter() - start - train_s}


def evaluate_inference(features: FeatureSet, inference: str, load_model: Callable[[], torch.nn.Module]) -> dict[str, float]:
    """Mean over the trials of SYSU all-search single-shot with ``inference``'s distance, in percent."""
    from vireid.evaluation.evaluator import evaluate_features

    distance = INFERENCES[inference].make(load_model)
    mean = evaluate_features(features, "sysu", distance_fn=distance).mean
    return {"r1": 100 * float(mean.cmc[0]), "mAP": 100 * float(mean.mAP), "mINP": 100 * float(mean.mINP)}


@dataclass
class RunResult:
    variant: str
    seed: int
    key: str
    train_s: float
    steps: int
    cached: bool
    metrics: dict[str, dict[str, float]]
    errors: dict[str, str] = field(default_factory=dict)


def run_variant(variant: Variant, seed: int, recipe: Recipe, data_root: Path, out: Path, *,
                force: bool = False, progress: bool = False, label: str = "") -> RunResult:
    """Train (or reuse) one variant at one seed and evaluate its inference names (or reuse them)."""
    from vireid.engine.checkpoint import load_checkpoint_model
    from vireid.features import load_features

    cfg = resolve_config(variant, recipe, seed, str(data_root))
    material = training_key_material(cfg, recipe.synth())
    key = _digest(material)
    run_dir = out / "cache" / key[:24]
    marker = run_dir / "run.json"
    cached = marker.is_file() and not force
    if cached:
        record = json.loads(marker.read_text(encoding="utf-8"))
        print(f"{label} {variant.name} seed {seed}: trained run cached ({run_dir.name})", flush=True)
    else:
        # train into a private folder, then rename: a concurrent run of the same key never sees half a run
        partial = run_dir.with_name(f"{run_dir.name}.partial-{os.getpid()}")
        if partial.exists():
            shutil.rmtree(partial)
        cfg.output_dir = str(partial / "train")
        cfg.progress_bar = progress
        print(f"{label} {variant.name} seed {seed}: training {cfg.model.method} for {cfg.epochs} epochs ...",
              flush=True)
        record = {"key": key, "variant": variant.name, "material": material, **train_and_extract(cfg, partial)}
        write_json_atomic(partial / "run.json", record)
        if run_dir.exists() and (force or not marker.is_file()):
            shutil.rmtree(run_dir)  # a forced rerun, or a folder left without its marker
        if run_dir.exists():
            shutil.rmtree(partial)  # another process finished the same run first: keep its copy
            record = json.loads(marker.read_text(encoding="utf-8"))
        else:
            partial.rename(run_dir)
        print(f"{label} {variant.name} seed {seed}: trained in {record['train_s']:.0f} s "
              f"({record['steps']} steps, extraction {record['extract_s']:.0f} s)", flush=True)
    features: FeatureSet | None = None
    model: list[torch.nn.Module] = []

    def load_model() -> torch.nn.Module:
        if not model:
            model.append(load_checkpoint_model(run_dir / "train" / "checkpoints" / "last.pt")[0])
        return model[0]

    metrics: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    for name in variant.inference:
        eval_file = run_dir / "eval" / f"{name}-{evaluation_key(key, name)[:16]}.json"
        if eval_file.is_file() and not force:
            metrics[name] = json.loads(eval_file.read_text(encoding="utf-8"))["metrics"]
            continue
        if features is None:
            features = load_features(run_dir / "features.npz")
        start = time.perf_counter()
        try:
            metrics[name] = evaluate_inference(features, name, load_model)
        except InputError as exc:  # e.g. a preset's k larger than a tiny gallery: reported, not cached
            errors[name] = str(exc)
            print(f"{label} {variant.name} seed {seed}: {name} failed: {exc}", flush=True)
            continue
        write_json_atomic(eval_file, {"inference": name, "metrics": metrics[name], "seconds": time.perf_counter() - start})
    shown = ", ".join(f"{n} r1 {m['r1']:.1f} mAP {m['mAP']:.1f}" for n, m in metrics.items())
    print(f"{label} {variant.name} seed {seed}: {shown}", flush=True)
    return RunResult(variant.name, seed, key, float(record["train_s"]), int(record["steps"]), cached, metrics, errors)


# --------------------------------------------------------------------------- statistics and tables

def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def t_critical(n: int, alpha: float = 0.05) -> float:
    """One-sided critical value of Student's t with n − 1 degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(1 - alpha, n - 1))


def claim_statistics(better: dict[int, float], worse: dict[int, float]) -> dict[str, Any]:
    """Paired Δ = better − worse over the seeds both have: mean, std, seeds with Δ > 0, verdict."""
    seeds = sorted(set(better) & set(worse))
    deltas = [better[s] - worse[s] for s in seeds]
    if not deltas:
        return {"seeds": [], "deltas": [], "mean": None, "std": None, "held": 0, "n": 0, "t": None,
                "verdict": "not run"}
    mean, std = mean_std(deltas)
    n = len(deltas)
    if n < 2:
        t_value = None
    elif std == 0:
        t_value = math.copysign(math.inf, mean) if mean else 0.0
    else:
        t_value = mean / (std / math.sqrt(n))
    verdict = "within noise"
    if t_value is not None and t_value >= t_critical(n) and mean > 0:
        verdict = "reproduced"
    elif t_value is not None and t_value <= -t_critical(n) and mean < 0:
        verdict = "not reproduced"
    return {"seeds": seeds, "deltas": deltas, "mean": mean, "std": std, "held": sum(d > 0 for d in deltas), "n": n,
            "t": t_value, "verdict": verdict}


def summarise(results: list[RunResult], variants: dict[str, Variant], claims: list[Claim]) -> dict[str, Any]:
    per: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    train_s: dict[str, list[float]] = {}
    for r in results:
        train_s.setdefault(r.variant, []).append(r.train_s)
        for inference, m in r.metrics.items():
            per.setdefault(r.variant, {}).setdefault(inference, {})[r.seed] = m
    rows = []
    for name, by_inference in per.items():
        for inference, by_seed in by_inference.items():
            row: dict[str, Any] = {"variant": name, "method": variants[name].method, "inference": inference,
                                   "seeds": sorted(by_seed), "train_s": mean_std(train_s[name])[0]}
            for metric in METRICS:
                row[metric] = dict(zip(("mean", "std"), mean_std([by_seed[s][metric] for s in sorted(by_seed)])))
                row[metric]["per_seed"] = {str(s): by_seed[s][metric] for s in sorted(by_seed)}
            rows.append(row)
    claim_rows = []
    for c in claims:
        values = [{s: m[c.metric] for s, m in per.get(v, {}).get(i, {}).items()} for v, i in (c.better, c.worse)]
        claim_rows.append({"file": Path(c.file).name, "better": "/".join(c.better), "worse": "/".join(c.worse),
                           "metric": c.metric, "source": c.source, **claim_statistics(values[0], values[1])})
    return {"rows": rows, "claims": claim_rows}


def _pm(entry: dict[str, float]) -> str:
    return f"{entry['mean']:.2f} ± {entry['std']:.2f}"


def markdown(summary: dict[str, Any], header: str) -> str:
    lines = [header, "", "| variant | method | inference | r1 | mAP | mINP | seeds | train s |", "|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        lines.append(f"| {row['variant']} | {row['method']} | {row['inference']} | {_pm(row['r1'])} | {_pm(row['mAP'])} "
                     f"| {_pm(row['mINP'])} | {len(row['seeds'])} | {row['train_s']:.0f} |")
    if summary["claims"]:
        lines += ["", "Claims (Δ = better − worse, paired by seed; verdict: one-sided paired t-test at 5 %):", "",
                  "| claim | metric | mean Δ ± std | Δ > 0 in | verdict | source |", "|---|---|---|---|---|---|"]
        for c in summary["claims"]:
            delta = "—" if c["mean"] is None else f"{c['mean']:+.2f} ± {c['std']:.2f}"
            lines.append(f"| {c['better']} > {c['worse']} | {c['metric']} | {delta} | {c['held']}/{c['n']} seeds "
                         f"| {c['verdict']} | {c['source']} ({c['file']}) |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = Recipe()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", metavar="FILE",
                        help="variant files to run, by stem (e.g. baseline saai); variants that their claims compare "
                             "against are run too (default: every file in --variants-dir)")
    parser.add_argument("--variants", nargs="+", metavar="NAME", help="run only these variants (by name)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    parser.add_argument("--variants-dir", type=Path, default=VARIANTS_DIR, help="folder of the variant files "
                        "(default: benchmarks/variants)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder: rendered data, result cache, "
                        "results.json, results.md (default: runs/bench_methods)")
    parser.add_argument("--ids", type=int, default=d.ids, help=f"synthetic identities, 20%% of them test identities "
                        f"(default: {d.ids})")
    parser.add_argument("--difficulty", choices=sorted(DIFFICULTIES), default=d.difficulty,
                        help="synthetic difficulty: the generator's default, or vireid demo's easier near-infrared-like "
                             f"level (default: {d.difficulty})")
    parser.add_argument("--epochs", type=int, default=d.epochs, help=f"training epochs of every variant; an epoch is "
                        f"(training identities / --num-ids) batches (default: {d.epochs})")
    parser.add_argument("--height", type=int, default=d.height, help=f"input height (default: {d.height})")
    parser.add_argument("--width", type=int, default=d.width, help=f"input width (default: {d.width})")
    parser.add_argument("--backbone", default=d.backbone, help=f"backbone of every variant (default: {d.backbone})")
    parser.add_argument("--num-ids", type=int, default=d.num_ids, help=f"identities per batch (default: {d.num_ids})")
    parser.add_argument("--per-modality", type=int, default=d.per_modality,
                        help=f"images per identity and modality in a batch (default: {d.per_modality})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate of every variant (default: {d.lr})")
    parser.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                        help=f"identity-loss label smoothing of every variant (default: {d.label_smoothing})")
    parser.add_argument("--threads", type=int, default=d.threads, help=f"CPU threads (default: {d.threads})")
    parser.add_argument("--force", action="store_true", help="retrain and re-evaluate even when cached")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per training epoch")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the variant files and print each run's cache status; train nothing")
    parser.add_argument("--show-recipe", action="store_true", help="print the common recipe as YAML and exit")
    parser.add_argument("--list-inference", action="store_true", help="print the inference names and exit")
    return parser.parse_args(argv)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    recipe = Recipe(ids=args.ids, difficulty=args.difficulty, epochs=args.epochs, height=args.height, width=args.width,
                    backbone=args.backbone, num_ids=args.num_ids, per_modality=args.per_modality, lr=args.lr,
                    label_smoothing=args.label_smoothing, threads=args.threads)
    from_dict(TrainConfig, recipe.config("DATA", 0), source="common recipe (command-line options)")
    return recipe


def select_variants(args: argparse.Namespace, variants: dict[str, Variant], claims: list[Claim],
                    by_file: dict[str, list[str]]) -> tuple[list[str], list[Claim]]:
    """The variants to run and the claims to check.

    ``--methods``: the files' variants and claims, plus the variants those claims compare against
    (e.g. the baseline); ``--variants``: those variants and the claims between them; both: the
    files' variants that are named, and their claims between them; neither: everything.
    """
    names = list(variants)
    selected = claims
    if args.methods:
        unknown = [m for m in args.methods if m not in by_file]
        if unknown:
            raise InputError(f"--methods: no variant file {', '.join(unknown)} in {args.variants_dir} "
                             f"(files: {', '.join(by_file)})")
        names = [n for m in args.methods for n in by_file[m]]
        files = {variants[n].file for n in names}
        selected = [c for c in claims if c.file in files]
    if args.variants:
        unknown = [n for n in args.variants if n not in variants]
        if unknown:
            raise InputError(f"--variants: unknown variant {', '.join(unknown)}")
        names = [n for n in names if n in args.variants]
        selected = [c for c in selected if c.better[0] in names and c.worse[0] in names]
    for c in selected:
        for name in (c.better[0], c.worse[0]):
            if name not in names:
                names.append(name)
    return names, selected


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = recipe_from_args(args)
        if args.list_inference:
            for inf in INFERENCES.values():
                only = f" ({'/'.join(inf.methods)} only)" if inf.methods else ""
                print(f"{inf.name:<12} {inf.summary}{only}")
            return 0
        if args.show_recipe:
            print(yaml.safe_dump(recipe.config(str(args.out / "data" / "..."), args.seeds[0]), sort_keys=False), end="")
            print("# locked keys (variant files may not override them): " + ", ".join(LOCKED_KEYS))
            return 0
        variants, claims, by_file = load_variants(args.variants_dir, recipe)
        names, selected_claims = select_variants(args, variants, claims, by_file)
        for name in names:
            for seed in args.seeds:
                resolve_config(variants[name], recipe, seed)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    synth = recipe.synth()
    data_tag = _digest({"synth": synth.to_dict(), "code": code_hash(["vireid.data.synthetic"])})[:10]
    data_root = args.out / "data" / f"sysu-{recipe.ids}ids-{recipe.difficulty}-{data_tag}"
    runs = [(name, seed) for name in names for seed in args.seeds]
    if args.dry_run:
        for name, seed in runs:
            cfg = resolve_config(variants[name], recipe, seed, str(data_root))
            key = _digest(training_key_material(cfg, synth))
            state = "cached" if (args.out / "cache" / key[:24] / "run.json").is_file() else "to train"
            print(f"{name} seed {seed}: {state} ({key[:24]}); overrides: {' '.join(variants[name].overrides) or '-'}")
        return 0

    torch.set_num_threads(recipe.threads)
    print(f"data: {data_root}", flush=True)
    render_dataset(synth, data_root)
    start = time.perf_counter()
    results = []
    for i, (name, seed) in enumerate(runs, 1):
        results.append(run_variant(variants[name], seed, recipe, data_root, args.out, force=args.force,
                                   progress=args.progress, label=f"[{i}/{len(runs)}]"))
    wall = time.perf_counter() - start
    summary = summarise(results, variants, selected_claims)
    header = (f"Synthetic SYSU-MM01 layout, {recipe.ids} identities ({recipe.difficulty} difficulty); common recipe: "
              f"{recipe.backbone} {recipe.height}×{recipe.width}, {recipe.epochs} epochs of "
              f"{recipe.num_ids} ids × ({recipe.per_modality} + {recipe.per_modality}) images, Adam {recipe.lr:g}, "
              f"GeM + BNNeck, label smoothing {recipe.label_smoothing:g}, flip + crop; SYSU all-search single-shot, "
              f"10 trials; mean ± std over seeds {' '.join(map(str, args.seeds))} (percent).")
    table = markdown(summary, header)
    payload = {"recipe": recipe.config(str(data_root), args.seeds[0]), "data": synth.to_dict(), "seeds": args.seeds,
               "variants": {n: {"file": variants[n].file, "method": variants[n].method,
                                "overrides": list(variants[n].overrides), "note": variants[n].note} for n in names},
               "runs": [r.__dict__ for r in results], **summary, "wall_s": wall,
               "command": "python benchmarks/methods.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_json_atomic(args.out / "results.json", payload)
    write_text_atomic(args.out / "results.md", table)
    print("\n" + table, end="")
    failed = [f"{r.variant}/{name} seed {r.seed}" for r in results for name in r.errors]
    if failed:
        print(f"\nfailed evaluations (not in the tables): {', '.join(failed)}")
    trained = sum(not r.cached for r in results)
    print(f"\n{len(results)} runs ({trained} trained, {len(results) - trained} cached) in {wall:.0f} s; "
          f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
