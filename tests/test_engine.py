"""Training engine on a tiny manifest dataset: config, loop, checkpoints, exact resume after SIGKILL, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from vireid.cli import main as cli_main
from vireid.engine.checkpoint import load_checkpoint, load_checkpoint_model
from vireid.engine.config import ScheduleConfig, load_train_config
from vireid.engine.schedule import lr_factor
from vireid.engine.trainer import train
from vireid.errors import InputError

from method_training import write_tiny_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_manifest(tmp_path_factory.mktemp("data"), ids=8)


def _config_dict(manifest: Path, out: Path, **extra: object) -> dict:
    cfg = {
        "data": {"dataset": "manifest", "root": str(manifest), "val_ids": 2, "num_workers": 0},
        "sampler": {"num_ids": 2, "per_modality": 2, "epoch_length": "images"},
        "transforms": {"height": 32, "width": 16, "pad": 2},
        "model": {"backbone": "resnet10", "pretrained": None, "params": {"triplet": "weighted"}},
        "optim": {"name": "sgd", "lr": 0.01, "grad_clip": 5.0},
        "schedule": {"warmup_epochs": 1, "milestones": [2]},
        "eval": {"period": 1},
        "epochs": 3, "threads": 1, "seed": 3, "output_dir": str(out), "log_every": 2, "progress_bar": False,
    }
    cfg.update(extra)
    return cfg


def _write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_config_rejects_unknown_key_with_suggestion(tmp_path: Path, manifest: Path) -> None:
    data = _config_dict(manifest, tmp_path / "run")
    data["optim"]["weight_decy"] = 0.1
    with pytest.raises(InputError, match="optim.weight_decy.*did you mean 'optim.weight_decay'"):
        load_train_config(_write_config(tmp_path / "c.yaml", data))
    cfg = load_train_config(_write_config(tmp_path / "ok.yaml", _config_dict(manifest, tmp_path / "run")), ["optim.lr=0.5"])
    assert cfg.optim.lr == 0.5 and cfg.model.backbone == "resnet10"
    with pytest.raises(InputError, match="data.root"):
        load_train_config(None, ["epochs=1"])


def test_shipped_configs_load() -> None:
    for path in sorted((REPO / "configs").glob("baseline_*.yaml")):
        cfg = load_train_config(path)
        assert cfg.model.method == "baseline", path


def test_warmup_then_multistep_schedule() -> None:
    cfg = ScheduleConfig(warmup_epochs=2, warmup_factor=0.1, milestones=[3, 5], gamma=0.1)
    assert lr_factor(0, 10, cfg) == pytest.approx(0.1)
    assert lr_factor(10, 10, cfg) == pytest.approx(0.55)
    assert lr_factor(20, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(35, 10, cfg) == pytest.approx(0.1)
    assert lr_factor(50, 10, cfg) == pytest.approx(0.01)


def test_train_writes_checkpoints_summary_and_logs(tmp_path: Path, manifest: Path) -> None:
    cfg = load_train_config(_write_config(tmp_path / "c.yaml", _config_dict(manifest, tmp_path / "run", epochs=2)))
    summary = train(cfg)
    run = tmp_path / "run"
    assert summary["epochs"] == 2 and summary["num_train_ids"] == 6 and summary["num_val_ids"] == 2
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert all(0.0 <= h["mAP"] <= 1.0 and 0.0 <= h["rank1"] <= 1.0 for h in summary["history"])
    assert (run / "summary.json").is_file() and (run / "config.yaml").is_file()
    assert any((run / "tensorboard").iterdir())
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    steps = 2 * summary["steps_per_epoch"]
    assert last["progress"] == {"epoch": 2, "step_in_epoch": 0, "global_step": steps, "global_batches": steps,
                                "world_size": 1}
    assert set(last) >= {"model", "optimizer", "sampler", "rng", "config"}
    log_text = (run / "log.txt").read_text()
    assert "training" in log_text and "epoch 2 validation" in log_text and "done: 2 epochs" in log_text
    model, loaded_cfg = load_checkpoint_model(run / "checkpoints" / "best.pt")
    assert loaded_cfg.model.backbone == "resnet10" and not model.training
    feat = model.extract(torch.zeros(2, 3, 32, 16), torch.tensor([0, 1]))["feat"]
    assert torch.allclose(feat.norm(dim=1), torch.ones(2), atol=1e-5)


def _run_cli(args: list[str], **kwargs: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vireid", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path, manifest: Path) -> None:
    straight = train(load_train_config(_write_config(tmp_path / "a.yaml", _config_dict(manifest, tmp_path / "straight"))))
    config = _write_config(tmp_path / "b.yaml", _config_dict(manifest, tmp_path / "killed", checkpoint_every=3))
    proc = _run_cli(["train", "--config", str(config)])
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode() if proc.stdout else ""
    assert not (tmp_path / "killed" / "summary.json").exists()
    killed_at = load_checkpoint(last)["progress"]
    assert 0 < killed_at["step_in_epoch"] and killed_at["global_step"] < straight["global_step"]  # mid-epoch

    assert cli_main(["train", "--resume", str(tmp_path / "killed"), "--set", "progress_bar=false"]) == 0
    resumed = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert resumed["global_step"] == straight["global_step"]
    assert resumed["history"] == straight["history"]
    a = load_checkpoint(tmp_path / "straight")["model"]
    b = load_checkpoint(tmp_path / "killed")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_cli_train_errors_are_one_line(tmp_path: Path, manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _config_dict(manifest, tmp_path / "run")
    data["sampler"]["num_idz"] = 3
    assert cli_main(["train", "--config", str(_write_config(tmp_path / "c.yaml", data))]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "sampler.num_idz" in err and "sampler.num_ids" in err
    assert cli_main(["train"]) == 2
    assert cli_main(["train", "--config", "x.yaml", "--resume", str(tmp_path)]) == 2
    assert cli_main(["train", "--resume", str(tmp_path / "no_run")]) == 2


def test_ddp_two_processes_on_cpu(tmp_path: Path, manifest: Path) -> None:
    config = _write_config(tmp_path / "ddp.yaml", _config_dict(manifest, tmp_path / "ddp", epochs=1))
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "vireid", "train", "--config", str(config)],
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    assert output.count('"run_dir"') == 1  # only rank 0 reports
    summary = yaml.safe_load((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["history"]
    # each process trains on its own 2 ids x (2 + 2) batch; the single-process epoch of
    # 6 training ids x 3 images / (2 ids x 2) = 5 batches is shared: 3 steps of 2 processes
    assert summary["steps_per_epoch"] == 3 and summary["global_step"] == 3 and summary["global_batches"] == 6
    assert summary["batch_size_per_process"] == 8
    assert (tmp_path / "ddp" / "checkpoints" / "last.pt").is_file()
