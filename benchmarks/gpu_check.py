"""GPU check of the training path: every method's ResNet-50 config and the tiny config, trained for
a few hundred steps with bf16 and with fp16 on every visible GPU (DDP through torchrun + NCCL).

For each run it checks that the loss falls (mean of the first three logged windows against the
last three) and prints images/s, step time, peak GPU memory per process and the fraction of the
training time spent waiting for the data loader. A second pass checks that resuming is exact:
two epochs in one go against one epoch, a stop, and ``--resume`` for the second, with
deterministic kernels; the final weights must be bit-identical. Extra baseline runs: with
``torch.compile``, with channels-last memory format, and (on several GPUs) with SyncBN.

The data are rendered here (``vireid synth``, SYSU-MM01 layout at 288x144); nothing is downloaded.
ImageNet weights are used when torchvision's file is already in the torch hub cache, otherwise the
runs start from random weights (``model.pretrained: none``), and the script says which.

    python benchmarks/gpu_check.py [--steps 200] [--methods baseline xiv df2am saai ssft]
                                   [--amp bf16 fp16] [--out DIR] [--skip-resume] [--skip-extras]

It refuses to run without CUDA. ``--cpu-smoke`` runs the same orchestration on the CPU with the
methods' tiny configs (gloo, 2 processes, float32) to test this script itself; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's vireid, installed or not
METHODS = ("baseline", "xiv", "df2am", "saai", "ssft")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (at least)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--amp", nargs="+", default=["bf16", "fp16"], choices=("bf16", "fp16"))
    parser.add_argument("--gpus", type=int, default=None, help="processes (default: every visible GPU)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader processes per training process (default: CPU cores / processes, at most 8)")
    parser.add_argument("--ids", type=int, default=100, help="synthetic identities to render (80 %% train)")
    parser.add_argument("--out", type=Path, default=None, help="folder for runs and results.json (default: a temporary one)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per training run")
    parser.add_argument("--skip-resume", action="store_true", help="skip the exact-resume pass")
    parser.add_argument("--skip-extras", action="store_true",
                        help="skip the baseline runs with torch.compile, channels-last (and SyncBN on several GPUs)")
    parser.add_argument("--cpu-smoke", action="store_true", help="test this script on the CPU (tiny configs only)")
    args = parser.parse_args()

    import torch

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); this check trains on "
              "GPUs and refuses to run on the CPU. Run it on a CUDA machine.", file=sys.stderr)
        return 2
    world = args.gpus or (2 if smoke else torch.cuda.device_count())
    workers = args.workers if args.workers is not None else max(1, min(8, (os.cpu_count() or 2) // world))
    out = args.out or Path(tempfile.mkdtemp(prefix="vireid_gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    height, width = (32, 16) if smoke else (288, 144)
    device = "CPU smoke test (figures meaningless)" if smoke else ", ".join(
        sorted({torch.cuda.get_device_name(i) for i in range(world)}))
    print(f"gpu_check: torch {torch.__version__}, {world} x {device}, {workers} loader workers per process, "
          f"out {out}", flush=True)

    root = out / "synthetic_sysu"
    render(root, args.ids, height, width)
    pretrained = imagenet_weights_available()
    print(f"ImageNet weights: {'torchvision cache ' + pretrained if pretrained else 'not cached: model.pretrained none (random init)'}",
          flush=True)

    common = [f"data.root={root}", "data.dataset=sysu", "data.val_ids=0", f"data.num_workers={workers}",
              "eval.period=0", "checkpoint_every=0", f"log_every={max(1, min(10, args.steps // 20))}", "progress_bar=false",
              "schedule.warmup_epochs=1"]
    if smoke:
        common += ["device=cpu", "threads=1", f"transforms.height={height}", f"transforms.width={width}",
                   "transforms.pad=2"]
    runs = []
    for method in args.methods:
        names = [f"{method}_synthetic_tiny"] if smoke else ([f"{method}_sysu"] + (["baseline_synthetic_tiny"]
                                                                                     if method == "baseline" else []))
        for name in names:
            if "tiny" in name:  # resnet10 at the config's own size (the CPU smoke test: its size)
                model_sets = tiny_overrides(name, height, width) if smoke else []
            else:
                model_sets = [f"model.pretrained={'auto' if pretrained else 'none'}"]
            for amp in (["none"] if smoke else args.amp):
                epochs = epochs_for(REPO / "configs" / f"{name}.yaml", root, world, args.steps)
                run_dir = out / "runs" / f"{name}_{amp}"
                result = train_run(name, run_dir, world, common + model_sets + [f"amp={amp}", f"epochs={epochs}"],
                                   args.timeout)
                runs.append({"config": name, "amp": amp, **result})
                print_row(runs[-1], flush=True)

    resume = []
    if not args.skip_resume:
        for method in args.methods:
            name = f"{method}_synthetic_tiny" if smoke else f"{method}_sysu"
            model_sets = tiny_overrides(name, height, width) if smoke else [f"model.pretrained={'auto' if pretrained else 'none'}"]
            amp = "none" if smoke else args.amp[0]
            sets = common + model_sets + [f"amp={amp}", "sampler.epoch_length=identities", "deterministic=true"]
            resume.append({"config": name, "amp": amp, **resume_run(name, out / "resume" / name, world, sets,
                                                                   args.timeout)})
            print(f"resume {name} ({amp}): {resume[-1]['verdict']}", flush=True)

    extras = []
    if not args.skip_extras and not smoke:
        amp = args.amp[0]
        epochs = epochs_for(REPO / "configs" / "baseline_sysu.yaml", root, world, args.steps)
        variants = {"torch.compile": ["compile=true"], "channels_last": ["model.channels_last=true"]}
        if world > 1:
            variants["sync_bn"] = ["sync_bn=true"]
        for label, sets in variants.items():
            extras.append({"config": f"baseline_sysu + {label}", "amp": amp, **train_run(
                "baseline_sysu", out / "runs" / f"baseline_sysu_{label.replace('.', '_')}", world,
                common + [f"model.pretrained={'auto' if pretrained else 'none'}", f"amp={amp}", f"epochs={epochs}",
                          *sets], args.timeout)})
            print_row(extras[-1], flush=True)

    print()
    print(f"{'config':<32} {'amp':<5} {'steps':>6} {'img/s':>8} {'step ms':>8} {'GPU GiB':>8} {'data wait':>9} "
          f"{'loss first -> last':>20} {'falls':>6}")
    for row in runs + extras:
        print_row(row)
    for row in resume:
        print(f"resume {row['config']:<25} {row['amp']:<5} {row['verdict']}")
    failures = [r for r in runs if not r.get("ok") or not r.get("loss_falls")]
    failures += [r for r in resume if not r.get("exact")]
    failures += [r for r in extras if not r.get("ok")]
    results = {"device": device, "world_size": world, "torch": torch.__version__, "pretrained": pretrained,
               "runs": runs, "resume": resume, "extras": extras, "failures": len(failures)}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\n{len(failures)} failure(s); results in {out / 'results.json'}")
    return 1 if failures else 0


def render(root: Path, ids: int, height: int, width: int) -> None:
    cmd = [sys.executable, "-m", "vireid", "synth", "--layout", "sysu", "--out", str(root), "--ids", str(ids),
           "--images-per-camera", "10", "--height", str(height), "--width", str(width),
           "--workers", str(max(1, min(16, os.cpu_count() or 1)))]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL)
    print(f"rendered {ids} synthetic identities at {height}x{width} in {time.perf_counter() - start:.0f} s", flush=True)


def imagenet_weights_available() -> str | None:
    """The cached torchvision ResNet-50 file, or None (never downloads)."""
    from vireid.errors import InputError
    from vireid.models.pretrained import resolve_pretrained

    try:
        weights = resolve_pretrained("resnet50", "auto", download=False)
    except InputError:
        return None
    return weights.file if weights else None


def tiny_overrides(name: str, height: int, width: int) -> list[str]:
    sets = [f"transforms.height={height}", f"transforms.width={width}"]
    if name.startswith("saai"):
        sets.append(f"model.params.image_size=[{height},{width}]")
    return sets


def epochs_for(config: Path, root: Path, world: int, steps: int) -> int:
    """Epochs of at least ``steps`` steps in total (and at least 2) for ``config`` on ``root``."""
    from vireid.data.datasets import build_dataset
    from vireid.data.sampler import CrossModalityBatchSampler
    from vireid.engine.config import load_train_config

    cfg = load_train_config(config, [f"data.root={root}"])
    records = list(build_dataset("sysu", root).train)
    sampler = CrossModalityBatchSampler(records, cfg.sampler.num_ids, cfg.sampler.per_modality,
                                        epoch_length=cfg.sampler.epoch_length, world_size=world)
    return max(2, math.ceil(steps / len(sampler)))


def train_run(name: str, run_dir: Path, world: int, sets: list[str], timeout: int,
              resume: bool = False) -> dict:
    """``torchrun --nproc_per_node=world -m vireid train`` (or --resume); its summary and loss curve."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "vireid", "train"]
    cmd += ["--resume", str(run_dir)] if resume else ["--config", str(REPO / "configs" / f"{name}.yaml"),
                                                      "--set", f"output_dir={run_dir}"]
    for item in sets:
        cmd += ["--set", item]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s"}
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"ok": False, "error": "\n".join(tail), "wall_s": wall}
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = loss_curve(run_dir)
    first, last = (sum(losses[:3]) / 3, sum(losses[-3:]) / 3) if len(losses) >= 6 else (None, None)
    return {
        "ok": True, "wall_s": wall, "steps": summary["global_step"], "images_per_s": summary["images_per_s"],
        "step_time_s": summary["step_time_s"], "max_gpu_memory_gib": summary["max_gpu_memory_gib"],
        "data_wait_fraction": summary["data_wait_fraction"], "loss_first": first, "loss_last": last,
        "loss_falls": first is not None and last < first, "pretrained": summary["pretrained"],
        "amp_resolved": summary["amp"], "world_size": summary["world_size"],
    }


def loss_curve(run_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


def resume_run(name: str, folder: Path, world: int, sets: list[str], timeout: int) -> dict:
    """Two epochs in one go against one epoch + --resume for the second: identical weights?"""
    import torch

    straight = train_run(name, folder / "straight", world, sets + ["epochs=2"], timeout)
    first = train_run(name, folder / "stopped", world, sets + ["epochs=1"], timeout)
    if not (straight.get("ok") and first.get("ok")):
        return {"exact": False, "verdict": f"FAILED: {straight.get('error') or first.get('error')}"}
    resumed = train_run(name, folder / "stopped", world, ["epochs=2"], timeout, resume=True)
    if not resumed.get("ok"):
        return {"exact": False, "verdict": f"FAILED on resume: {resumed.get('error')}"}
    a = torch.load(folder / "straight" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(folder / "stopped" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    if not differing:
        return {"exact": True, "verdict": f"exact ({len(a)} tensors bit-identical after {straight['steps']} steps)"}
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in differing)
    return {"exact": False, "verdict": f"NOT exact: {len(differing)} of {len(a)} tensors differ, max |diff| {worst:.3g} "
                                       f"(first: {differing[0]})"}


def print_row(row: dict, flush: bool = False) -> None:
    if not row.get("ok"):
        print(f"{row['config']:<32} {row['amp']:<5} FAILED: {row.get('error')}", flush=flush)
        return
    memory = f"{row['max_gpu_memory_gib']:.2f}" if row.get("max_gpu_memory_gib") is not None else "-"
    wait = f"{100 * row['data_wait_fraction']:.1f}%" if row.get("data_wait_fraction") is not None else "-"
    loss = (f"{row['loss_first']:.3f} -> {row['loss_last']:.3f}" if row.get("loss_first") is not None else "too few points")
    print(f"{row['config']:<32} {row['amp']:<5} {row['steps']:>6} {row['images_per_s']:>8.1f} "
          f"{1000 * row['step_time_s']:>8.1f} {memory:>8} {wait:>9} {loss:>20} {'yes' if row['loss_falls'] else 'NO':>6}",
          flush=flush)


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


if __name__ == "__main__":
    sys.exit(main())
