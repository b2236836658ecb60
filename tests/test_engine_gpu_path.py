"""The GPU training path, pinned on the CPU: collectives on the model's device, float32 losses
under autocast, each process's batch composition, resume across process counts, a non-finite
loss on one process, pretrained weights from files the tests make, routing, logging."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from conftest import script_module
from vireid.cli import main as cli_main
from vireid.data.protocols import build_protocol, regdb_trials_for_split
from vireid.engine import distributed
from vireid.engine.config import load_train_config
from vireid.engine.distributed import DistInfo
from vireid.engine.trainer import LossWindow, Trainer, float32_outputs, train
from vireid.errors import InputError
from vireid.losses import batch_hard_triplet_loss, pairwise_euclidean
from vireid.models.backbone import TwoStreamBackbone
from vireid.models.base import ReIDModel
from vireid.models.pretrained import resolve_pretrained, torchvision_weights_file
from vireid.models.registry import ModelConfig, create_model, register_method
from vireid.models.routing import sorted_counts, sorted_modality_layout

from method_training import write_tiny_manifest
from test_engine import _config_dict, _write_config

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_manifest(tmp_path_factory.mktemp("data"), ids=8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, world: int, spec: dict, timeout: float = 240, env: dict | None = None) -> list[dict]:
    """``world`` instrumented training processes (gloo, no torchrun agent that would kill the others
    when one fails: a process left waiting shows up as a timeout). Returns each rank's record."""
    out = tmp / f"out{len(list(tmp.glob('out*')))}"
    spec = {**spec, "out": str(out)}
    spec_file = out.with_suffix(".json")
    spec_file.write_text(json.dumps(spec))
    port = _free_port()
    procs = []
    for rank in range(world):
        rank_env = {**os.environ, **(env or {}), "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO / 'tests'}",
                    "OMP_NUM_THREADS": "1"}
        if world > 1:
            rank_env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(spec_file)], env=rank_env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    records = []
    for rank, text in enumerate(outputs):
        path = out / f"rank{rank}.json"
        assert path.is_file(), f"rank {rank} wrote no record:\n{text[-3000:]}"
        records.append(json.loads(path.read_text()))
    return records


def _ddp_config(manifest: Path, run: Path, **extra: object) -> dict:
    data = _config_dict(manifest, run, **extra)
    data["data"]["val_ids"] = 0
    data["eval"]["period"] = 0
    return data


# ----------------------------------------------------------------------------- collectives


def test_two_processes_run_every_collective_on_the_model_device(tmp_path: Path, manifest: Path) -> None:
    """2 gloo processes, with validation and ImageNet weights to fetch: every collective's tensors
    are on the model's device, only local rank 0 downloads the weights, the other process waits
    and reads the same file."""
    fake = _fake_resnet18_file(tmp_path / "fake.pth")
    data = _ddp_config(manifest, tmp_path / "run", epochs=1, log_every=2)
    data["data"]["val_ids"] = 2
    data["eval"]["period"] = 1
    data["model"].update(backbone="resnet18", pretrained="auto")
    records = launch(tmp_path, 2, {"config": str(_write_config(tmp_path / "c.yaml", data)), "fake_weights": str(fake)},
                     env={"TORCH_HOME": str(tmp_path / "torch")})
    for record in records:
        assert "error" not in record, record.get("error")
        model_device = {s["model_device"] for s in record["steps"]}
        assert model_device == {"cpu"}
        ops = {c["op"] for c in record["collectives"]}
        assert {"all_reduce", "broadcast_object_list"} <= ops
        for call in record["collectives"]:
            assert set(call["devices"]) <= model_device, call
            if call["op"] == "broadcast_object_list":
                assert call.get("device_argument") == "cpu", call
    assert len(records[0]["downloads"]) == 1 and records[1]["downloads"] == []
    assert records[0]["summary"]["pretrained"]["sha256"] == records[1]["summary"]["pretrained"]["sha256"]


class _Stop(Exception):
    pass


def test_engine_collectives_keep_tensors_on_a_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL registers CUDA tensors only: with (fake) CUDA loss terms, every tensor the engine hands
    to a collective is a CUDA tensor, and objects are broadcast through the training device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    seen: list[str] = []

    def all_reduce(tensor: Tensor, *args: object, **kwargs: object) -> None:
        seen.append(str(tensor.device))
        raise _Stop

    def broadcast_object_list(objects: list, src: int = 0, group: object = None, device: object = None) -> None:
        seen.append(str(device))
        raise _Stop

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast_object_list)
    info, cuda = DistInfo(rank=0, world_size=2, local_rank=0), torch.device("cuda", 0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        window = LossWindow()
        window.add({"loss": torch.ones((), device=cuda), "id": torch.ones((), device=cuda)})
        with pytest.raises(_Stop):
            window.flush(info)
        with pytest.raises(_Stop):
            distributed.all_ranks_succeeded(True, info, cuda)
        param = torch.zeros(3, device=cuda, requires_grad=True)
        param.grad = torch.ones(3, device=cuda)
        with pytest.raises(_Stop):
            distributed.average_gradients([param], info)
    with pytest.raises(_Stop):
        distributed.broadcast_object({"epoch": 1}, info, cuda)
    assert seen == ["cuda:0"] * 4


# ----------------------------------------------------------------------------- mixed precision


def realistic_features(distance: float = 0.448, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The 2048-d ResNet-50-like features of ``benchmarks/amp_loss_precision.py`` (2 identities x
    (2 visible + 2 infrared), images 0 and 1 ``distance`` apart), with their modality."""
    with script_module("benchmarks/amp_loss_precision.py", "amp_loss_precision") as bench:
        feats, labels = bench.features(seed, distance)
    return feats, labels, torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])


class FixedFeatures(ReIDModel):
    """Returns fixed float32 features (times a parameter equal to 1); the loss is the batch-hard
    triplet; the distance between images 0 and 1 is logged."""

    def __init__(self, features: Tensor) -> None:
        super().__init__()
        self.register_buffer("features", features)
        self.scale = nn.Parameter(torch.ones(()))
        self.backbone = nn.Identity()

    def forward(self, images: Tensor, modality: Tensor) -> dict[str, Tensor]:
        return {"feat": self.features * self.scale}

    def compute_loss(self, outputs: dict[str, Tensor], labels: Tensor, modality: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        d01 = pairwise_euclidean(outputs["feat"])[0, 1]
        return batch_hard_triplet_loss(outputs["feat"], labels, margin=0.3), {"d01": d01.detach()}


@dataclass
class NoParams:
    pass


@register_method("test_fixed_features", NoParams)
def _build_fixed(cfg: ModelConfig, params: NoParams, num_classes: int) -> FixedFeatures:
    return FixedFeatures(realistic_features()[0])


def naive_distances(x: Tensor) -> Tensor:
    """``sqrt(|x_i|^2 + |x_j|^2 - 2 x_i.x_j)`` as the triplet losses computed it before (no shift)."""
    sq = x.pow(2).sum(1, keepdim=True) + x.pow(2).sum(1).unsqueeze(0) - 2.0 * x @ x.t()
    return sq.clamp(min=1e-12).sqrt()


def test_bf16_training_step_computes_losses_in_float32(tmp_path: Path) -> None:
    feats, labels, modality = realistic_features()
    exact = torch.cdist(feats.double(), feats.double())[0, 1].item()
    reference = batch_hard_triplet_loss(feats.double(), labels, margin=0.3).item()
    assert abs(exact - 0.448) < 1e-6 and reference > 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what losses inside autocast computed
        assert abs(naive_distances(feats)[0, 1].item() - exact) > 0.1
        assert abs(pairwise_euclidean(feats)[0, 1].item() - exact) > 1e-5

    manifest = write_tiny_manifest(tmp_path, ids=2, per_modality=2)
    data = _ddp_config(manifest, tmp_path / "run", epochs=1, amp="bf16")
    data["model"] = {"method": "test_fixed_features", "backbone": "resnet10", "pretrained": None}
    trainer = Trainer(load_train_config(_write_config(tmp_path / "c.yaml", data)), DistInfo(), torch.device("cpu"))
    assert trainer.amp == "bf16"
    logs = trainer._train_step(torch.zeros(8, 3, 32, 16), labels, modality)
    assert abs(float(logs["d01"]) - exact) < 1e-5
    assert abs(float(logs["loss"]) - reference) < 1e-5


def test_float32_outputs_casts_only_floating_tensors() -> None:
    out = float32_outputs({"a": torch.ones(2, dtype=torch.bfloat16), "b": torch.tensor([1, 2]), "c": 3})
    assert out["a"].dtype == torch.float32 and out["b"].dtype == torch.int64 and out["c"] == 3


def test_amp_auto_is_float32_on_the_cpu(tmp_path: Path, manifest: Path) -> None:
    data = _ddp_config(manifest, tmp_path / "run", epochs=1)
    cfg = load_train_config(_write_config(tmp_path / "c.yaml", data))
    assert cfg.amp == "auto" and Trainer(cfg, DistInfo(), torch.device("cpu")).amp == "none"


# ----------------------------------------------------------------------------- batch composition


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, manifest: Path) -> tuple[Path, dict]:
    """A 2-epoch single-process run (every step logged and checkpointed): config and record."""
    tmp = tmp_path_factory.mktemp("reference")
    config = _write_config(tmp / "c.yaml", _ddp_config(manifest, tmp / "run", epochs=2, log_every=1,
                                                       checkpoint_every=1))
    record = launch(tmp, 1, {"config": str(config)})[0]
    assert "error" not in record, record.get("error")
    return config, record


def test_each_process_trains_on_a_whole_batch_of_the_single_process_sequence(
        tmp_path: Path, reference: tuple[Path, dict]) -> None:
    """2 gloo processes: each step of each process is a full 2 ids x (2 visible + 2 infrared) batch,
    process r's step s is batch 2s + r of the sequence one process trains on, and each process's
    first loss equals the loss of the initial model on that batch."""
    config, single = reference
    ranks = launch(tmp_path, 2, {"config": str(config), "overrides": [f"output_dir={tmp_path / 'ddp'}", "epochs=1"]})
    sequence = [s for s in single["steps"] if s["epoch"] == 0]
    assert len(sequence) == 6 and all(len(r["steps"]) == 3 for r in ranks)  # 8 ids x 3 images / (2 x 2)
    for rank, record in enumerate(ranks):
        for s, step in enumerate(record["steps"]):
            assert step["modality"] == [0] * 4 + [1] * 4
            assert len(set(step["labels"])) == 2 and step["labels"][:4] == step["labels"][4:]
            assert step["labels"] == sequence[2 * s + rank]["labels"]

    cfg = load_train_config(config, [f"output_dir={tmp_path / 'probe'}"])
    probe = Trainer(cfg, DistInfo(), torch.device("cpu"))
    batches = iter(probe.loader)
    first_losses = []
    for _ in range(2):
        images, labels, modality, _ = next(batches)
        with torch.no_grad(), sorted_modality_layout(sorted_counts(modality)):
            loss, _ = probe.model.compute_loss(probe.model.train()(images, modality), labels, modality)
        first_losses.append(float(loss))
    assert sequence[0]["loss"] == pytest.approx(first_losses[0], abs=1e-5)
    assert ranks[0]["steps"][0]["loss"] == pytest.approx(first_losses[0], abs=1e-5)
    assert ranks[1]["steps"][0]["loss"] == pytest.approx(first_losses[1], abs=1e-5)
    print(f"\n2-process objective check: per-process batch {ranks[0]['steps'][0]['labels']} (labels), modality "
          f"{ranks[0]['steps'][0]['modality']}; first loss rank 0 {ranks[0]['steps'][0]['loss']:.6f} / rank 1 "
          f"{ranks[1]['steps'][0]['loss']:.6f}; single process on the same batches {first_losses[0]:.6f} / "
          f"{first_losses[1]:.6f}")


def test_resume_a_two_process_run_in_one_process(tmp_path: Path, reference: tuple[Path, dict]) -> None:
    config, single = reference
    run = [f"output_dir={tmp_path / 'run'}"]
    interrupted = launch(tmp_path, 2, {"config": str(config), "overrides": run, "stop_after": 2})
    assert all("Interrupted" in r.get("error", "") for r in interrupted)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["progress"]
    assert saved == {"epoch": 0, "step_in_epoch": 2, "global_step": 2, "global_batches": 4, "world_size": 2}

    resumed = launch(tmp_path, 1, {"resume": True, "run_dir": str(tmp_path / "run")})[0]
    assert "error" not in resumed, resumed.get("error")
    # the single process continues with batch 4 of epoch 1 (2 steps x 2 processes were trained) ...
    first_epoch = [s for s in single["steps"] if s["epoch"] == 0]
    resumed_first = [s for s in resumed["steps"] if s["epoch"] == 0]
    assert [s["labels"] for s in resumed_first] == [s["labels"] for s in first_epoch[4:]]
    # ... then trains epoch 2 as a single process does, at the same learning rates
    second = [s for s in resumed["steps"] if s["epoch"] == 1]
    assert [s["labels"] for s in second] == [s["labels"] for s in single["steps"] if s["epoch"] == 1]
    assert [s["lr"] for s in resumed["steps"]] == [s["lr"] for s in single["steps"][4:]]
    summary = resumed["summary"]
    assert summary["epochs"] == 2 and summary["world_size"] == 1
    assert summary["global_batches"] == 4 + len(resumed["steps"])


def test_resume_a_one_process_run_on_two_processes(tmp_path: Path, reference: tuple[Path, dict]) -> None:
    """5 of the epoch's 6 batches trained by one process; two processes continue: the 6th batch
    would be half a step, so it is skipped (and logged), and epoch 2 is shared as usual."""
    config, single = reference
    first = launch(tmp_path, 1, {"config": str(config), "overrides": [f"output_dir={tmp_path / 'run'}"],
                                 "stop_after": 5})[0]
    assert "Interrupted" in first["error"]
    resumed = launch(tmp_path, 2, {"resume": True, "run_dir": str(tmp_path / "run")})
    assert all("error" not in r for r in resumed), [r.get("error") for r in resumed]
    second_epoch = [s["labels"] for s in single["steps"] if s["epoch"] == 1]
    for rank, record in enumerate(resumed):
        assert [s["epoch"] for s in record["steps"]] == [1, 1, 1]
        assert [s["labels"] for s in record["steps"]] == second_epoch[rank::2]
    assert resumed[0]["summary"]["global_batches"] == 5 + 6
    assert "1 batch(es) of epoch 1 are skipped" in (tmp_path / "run" / "log.txt").read_text()


def test_a_nan_on_one_process_stops_every_process(tmp_path: Path, manifest: Path) -> None:
    config = _write_config(tmp_path / "c.yaml", _ddp_config(manifest, tmp_path / "run", epochs=2, log_every=3))
    records = launch(tmp_path, 2, {"config": str(config), "nan_at": [1, 1]}, timeout=120)
    for record in records:
        assert "FloatingPointError: non-finite loss" in record.get("error", ""), record.get("error")
        assert len(record["steps"]) == 3  # both stop at the end of the log window holding the NaN step
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


# ----------------------------------------------------------------------------- pretrained weights


def _fake_resnet18_file(path: Path, seed: int = 5) -> Path:
    import torchvision

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def _no_download(*args: object, **kwargs: object) -> None:
    raise OSError("network is unreachable")


def test_imagenet_weights_come_from_the_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        manifest: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    source, url, file = torchvision_weights_file("resnet18")
    assert source == "torchvision ResNet18_Weights.IMAGENET1K_V1" and file.parent == tmp_path / "torch" / "hub" / "checkpoints"
    _fake_resnet18_file(file)
    expected = torch.load(file, weights_only=True)["conv1.weight"]
    backbone = TwoStreamBackbone("resnet18", pretrained="auto")
    assert all(torch.equal(s[0][0].weight, expected) for s in backbone.streams)

    data = _ddp_config(manifest, tmp_path / "run", epochs=1)
    data["model"].update(backbone="resnet18", pretrained="auto")
    summary = train(load_train_config(_write_config(tmp_path / "c.yaml", data)))
    import hashlib
    assert summary["pretrained"] == {"backbone": "resnet18", "source": source, "file": str(file), "url": url,
                                     "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
    assert "pretrained weights: torchvision ResNet18_Weights.IMAGENET1K_V1" in (tmp_path / "run" / "log.txt").read_text()


def test_offline_without_cached_weights_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    _, url, file = torchvision_weights_file("resnet50")
    with pytest.raises(InputError) as err:
        resolve_pretrained("resnet50", "auto")
    message = str(err.value)
    assert "\n" not in message and url in message and str(file) in message and "model.pretrained: none" in message
    assert resolve_pretrained("resnet50", "none") is None and resolve_pretrained("resnet50", None) is None
    with pytest.raises(InputError, match="resnet10"):
        resolve_pretrained("resnet10", "auto")
    data = _ddp_config(manifest, tmp_path / "run", epochs=1)
    data["model"].update(backbone="resnet50", pretrained="auto")
    assert cli_main(["train", "--config", str(_write_config(tmp_path / "c.yaml", data))]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("vireid train: error: model.pretrained:")


def test_timm_backbones_by_name_with_weights_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    import timm

    torch.manual_seed(2)
    file = tmp_path / "timm_resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), file)
    backbone = TwoStreamBackbone("timm:resnet18", split="layer1", pretrained=str(file))
    assert torch.equal(backbone.streams[1][0][0].weight, torch.load(file, weights_only=True)["conv1.weight"])
    images, modality = torch.randn(4, 3, 64, 32), torch.tensor([0, 0, 1, 1])
    assert backbone(images, modality).shape == (4, 512, 4, 2)  # last stride 1
    vit = TwoStreamBackbone("timm:vit_tiny_patch16_224", pretrained=None)
    assert vit(images, modality).shape == (4, 192, 4, 2)  # the 16x16 patch grid as a feature map

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_download)
    with pytest.raises(InputError) as err:
        resolve_pretrained("timm:resnet18.a1_in1k", "auto")
    assert "timm/resnet18.a1_in1k" in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- routing, compile


def test_sorted_routing_matches_gathered_routing_and_keeps_channels_last() -> None:
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="resnet10", pretrained=None), num_classes=3).train()
    model = model.to(memory_format=torch.channels_last)
    images = torch.randn(8, 3, 32, 16).contiguous(memory_format=torch.channels_last)
    modality = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert sorted_counts(modality) == (4, 4) and sorted_counts(torch.tensor([0, 1, 0, 1])) is None
    gathered = model.backbone.specific(images, modality)
    with sorted_modality_layout((4, 4)):
        sliced = model.backbone.specific(images, modality)
        with pytest.raises(RuntimeError, match="sorted layout"):
            model.backbone.specific(images, modality.flip(0))
    assert torch.equal(sliced, gathered) and sliced.is_contiguous(memory_format=torch.channels_last)


def test_the_forward_pass_compiles_without_graph_breaks() -> None:
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="resnet10", pretrained=None), num_classes=3).train()
    images, modality = torch.randn(8, 3, 32, 16), torch.tensor([0] * 4 + [1] * 4)
    with sorted_modality_layout((4, 4)):
        explanation = torch._dynamo.explain(model)(images, modality)
    assert explanation.graph_break_count == 0, explanation.break_reasons


# ----------------------------------------------------------------------------- logs, protocols


def test_tensorboard_keeps_every_point_across_a_resume(tmp_path: Path, manifest: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _write_config(tmp_path / "c.yaml", _ddp_config(manifest, tmp_path / "run", epochs=2, log_every=1))
    train(load_train_config(config))
    assert cli_main(["train", "--resume", str(tmp_path / "run"), "--set", "epochs=3", "--set", "progress_bar=false"]) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(1, 19))  # 3 epochs x 6 steps, each logged once


def _write_image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((32, 16, 3), value, dtype=np.uint8)
    pixels[16:] = 255 - value
    Image.fromarray(pixels).save(path)


def make_regdb_images(root: Path, ids: int = 8, per_id: int = 2) -> Path:
    """A RegDB tree with real images: split t trains on half the identities, tests on the rest."""
    pids = list(range(1, ids + 1))
    for pid in pids:
        for i in range(per_id):
            _write_image(root / "Visible" / str(pid) / f"v_{i}.bmp", 20 * pid + i)
            _write_image(root / "Thermal" / str(pid) / f"t_{i}.bmp", 20 * pid + 5 + i)
    (root / "idx").mkdir(parents=True, exist_ok=True)
    for t in range(1, 11):
        order = pids[t % ids:] + pids[:t % ids]
        for split, chosen in (("train", order[:ids // 2]), ("test", order[ids // 2:])):
            for modality, folder, letter in (("visible", "Visible", "v"), ("thermal", "Thermal", "t")):
                lines = [f"{folder}/{pid}/{letter}_{i}.bmp {pid}" for pid in chosen for i in range(per_id)]
                (root / "idx" / f"{split}_{modality}_{t}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_regdb_evaluation_is_tied_to_the_training_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vireid.data.datasets import build_dataset
    from vireid.features import load_features

    root = make_regdb_images(tmp_path / "regdb")
    assert [len(t.query) for t in build_protocol("regdb", build_dataset("regdb", root), trials=3).trials] == [8]
    assert build_protocol("regdb", build_dataset("regdb", root), trials="2,4").params["trials"] == [2, 4]
    assert regdb_trials_for_split({}, 3) == ({"trials": [3]}, None)
    params, warning = regdb_trials_for_split({"trials": [3, 5]}, 3)
    assert params == {"trials": [3, 5]} and "5" in warning and "split 3" in warning

    data = {"data": {"dataset": "regdb", "root": str(root), "options": {"trial": 3}, "num_workers": 0},
            "sampler": {"num_ids": 2, "per_modality": 2}, "transforms": {"height": 32, "width": 16, "pad": 2},
            "model": {"backbone": "resnet10", "pretrained": None}, "optim": {"name": "adam", "lr": 1e-3},
            "eval": {"period": 0}, "epochs": 1, "threads": 1, "output_dir": str(tmp_path / "run"),
            "progress_bar": False}
    train(load_train_config(_write_config(tmp_path / "c.yaml", data)))
    out = tmp_path / "f.npz"
    assert cli_main(["extract", "--checkpoint", str(tmp_path / "run"), "--protocol", "regdb", "--out", str(out),
                     "--workers", "0"]) == 0
    captured = capsys.readouterr()
    assert f"checkpoint: {tmp_path / 'run' / 'checkpoints' / 'last.pt'}" in captured.out
    features = load_features(out)
    assert features.num_trials == 1 and features.meta["protocol"]["trials"] == [3]
    assert cli_main(["extract", "--checkpoint", str(tmp_path / "run"), "--protocol", "regdb", "--out", str(out),
                     "--protocol-param", "trials=[3,4]", "--workers", "1"]) == 0
    assert "warning: RegDB trial(s) 4" in capsys.readouterr().err
    assert load_features(out).num_trials == 2


def test_extract_defaults_to_the_validation_selected_checkpoint(tmp_path: Path, manifest: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    data = _config_dict(manifest, tmp_path / "run", epochs=1)
    train(load_train_config(_write_config(tmp_path / "c.yaml", data)))
    from vireid.engine.checkpoint import resolve_checkpoint

    path, description = resolve_checkpoint(tmp_path / "run")
    assert path == tmp_path / "run" / "checkpoints" / "best.pt"
    assert "selected on the validation identities" in description and "mAP" in description


def test_paper_configs_train_on_every_training_identity() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if "synthetic" in path.name:
            continue
        cfg = load_train_config(path)
        assert cfg.data.val_ids == 0, path.name
        assert cfg.amp == "auto", path.name
        assert cfg.data.num_workers >= 4, path.name


# ----------------------------------------------------------------------------- optimisers, options


def _minmax_trainer(tmp_path: Path, **schedule: object) -> Trainer:
    import test_engine_baseline  # noqa: F401  (registers the test_minmax method)

    manifest = write_tiny_manifest(tmp_path, ids=4, per_modality=2)
    data = _ddp_config(manifest, tmp_path / "run", epochs=2)
    data["model"]["method"] = "test_minmax"
    data["model"]["params"] = {"adversarial_weight": 0.5}
    data["optim"].update(name="adam", lr=1e-3, adversary_lr=0.05)
    data["schedule"].update(schedule)
    return Trainer(load_train_config(_write_config(tmp_path / "c.yaml", data)), DistInfo(), torch.device("cpu"))


def test_the_adversary_follows_the_learning_rate_schedule(tmp_path: Path) -> None:
    trainer = _minmax_trainer(tmp_path, warmup_epochs=1, warmup_factor=0.1, milestones=[1], gamma=0.1)
    steps = len(trainer.sampler)
    assert steps == 2
    for epoch, step, factor in ((0, 0, 0.1), (0, 1, 0.1 + 0.9 / 2), (1, 0, 0.1), (1, 1, 0.1)):
        trainer.schedule.set_position(epoch, step)
        assert trainer.adversary_optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * factor)
        assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([1e-4 * factor, 1e-3 * factor])


def test_the_gradient_scaler_steps_every_optimiser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _minmax_trainer(tmp_path)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled, stepped = [], []
    original_scale, original_step = trainer.scaler.scale, trainer.scaler.step
    monkeypatch.setattr(trainer.scaler, "scale", lambda loss: scaled.append(float(loss.detach())) or original_scale(loss))
    monkeypatch.setattr(trainer.scaler, "step", lambda opt: stepped.append(opt) or original_step(opt))
    before = trainer.model.discriminator.weight.detach().clone()
    images, labels, modality, _ = next(iter(trainer.loader))
    logs = trainer._train_step(images, labels, modality)
    assert len(scaled) == 2 and stepped == [trainer.optimizer, trainer.adversary_optimizer]
    assert scaled[1] == pytest.approx(float(logs["adversary_loss"]))
    assert not torch.equal(before, trainer.model.discriminator.weight)


def test_sync_bn_is_refused_on_the_cpu(tmp_path: Path, manifest: Path) -> None:
    data = _ddp_config(manifest, tmp_path / "run", epochs=1, sync_bn=True)
    cfg = load_train_config(_write_config(tmp_path / "c.yaml", data))
    with pytest.raises(InputError, match="sync_bn"):
        Trainer(cfg, DistInfo(rank=0, world_size=2), torch.device("cpu"))


def test_gpu_check_refuses_to_run_without_cuda() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], cwd=REPO, text=True,
                          capture_output=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "refuses" in proc.stderr
