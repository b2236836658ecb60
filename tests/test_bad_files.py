"""Bad files and a failing disk give one line naming the file, never a traceback: truncated or
meaningless feature files, a damaged ImageNet weights file, a dataset image that trips PIL's
decompression-bomb check, a full disk, an unwritable output, ids beyond 64 bits. And what
:mod:`vireid.io` writes: the umask's permissions, no temporary file left by a killed writer."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vireid.cli import main
from vireid.errors import InputError
from vireid.io import PendingFile, atomic_path, remove_stale_temporaries, save_npy_atomic, write_bytes_atomic

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def features(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(6), 4)
    arrays = {"query_feat": rng.standard_normal((24, 8)).astype(np.float32),
              "gallery_feat": rng.standard_normal((24, 8)).astype(np.float32),
              "query_id": ids, "gallery_id": ids, "query_cam": np.full(24, 3), "gallery_cam": np.full(24, 1)}
    path = tmp_path / "features.npz"
    np.savez(path, **arrays)
    return path


def _with(path: Path, name: str, **changes: np.ndarray) -> Path:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    out = path.with_name(name)
    np.savez(out, **arrays)
    return out


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("command", ["evaluate", "rerank"])
def test_truncated_and_meaningless_feature_files(features: Path, tmp_path: Path, command: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    data = features.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    cut_member = tmp_path / "cut_member.npz"
    cut_member.write_bytes(data[:-200])
    cases = {
        truncated: "truncated or damaged",
        cut_member: "truncated or damaged",
        _with(features, "zero.npz", gallery_feat=np.zeros((24, 8), np.float32)): "all zero",
        _with(features, "flat.npz", query_feat=np.zeros((24, 0), np.float32),
              gallery_feat=np.zeros((24, 0), np.float32)): "zero feature dimensions",
        _with(features, "huge.npz", gallery_feat=np.full((24, 8), 1e39)): "beyond float32",
    }
    for path, message in cases.items():
        args = [command, str(path)] + (["--protocol", "sysu"] if command == "evaluate" else
                                       ["--method", "aim", "--out", str(tmp_path / "d.npy")])
        capsys.readouterr()
        assert main(args) == 2, path
        _one_line_error(capsys, path.name, message)


def test_a_truncated_ranked_list_file(features: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ranked = tmp_path / "ranks.npz"
    np.savez(ranked, ranked_index=np.tile(np.arange(24), (24, 1)))
    ranked.write_bytes(ranked.read_bytes()[:300])
    assert main(["evaluate", str(features), "--protocol", "regdb", "--ranked", str(ranked)]) == 2
    _one_line_error(capsys, "ranks.npz", "truncated or damaged")


def test_unwritable_output_and_full_disk(features: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["rerank", str(features), "--method", "plain", "--out", str(blocker / "d.npy")]) == 2
    _one_line_error(capsys, "d.npy", "cannot write")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "out"
    assert main(["rerank", str(features), "--method", "plain", "--out", str(out / "d.npy")]) == 2
    _one_line_error(capsys, "d.npy", "no space left")
    assert list(out.iterdir()) == []  # no temporary file left behind


def test_a_damaged_pretrained_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"PK\x03\x04 this is not a torch file" * 10)
    manifest = tmp_path / "data.csv"
    for i in range(4):
        Image.new("RGB", (16, 32)).save(tmp_path / f"{i}.jpg")
    manifest.write_text("path,person_id,camera,modality,split\n" + "".join(
        f"{i}.jpg,{i // 2},1,{'visible' if i % 2 else 'infrared'},train\n" for i in range(4)))
    config = tmp_path / "train.yaml"
    config.write_text(f"data: {{root: {manifest}, dataset: manifest}}\nmodel: {{backbone: resnet18, pretrained: {weights}}}\n"
                      "sampler: {num_ids: 2, per_modality: 1}\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    assert main(["train", "--config", str(config)]) == 2
    _one_line_error(capsys, "resnet18.pth", "not a readable weights file")


def test_a_dataset_image_that_trips_the_decompression_bomb_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vireid.data.transforms import load_image

    path = tmp_path / "bomb.png"
    Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over twice this
    with pytest.raises(InputError, match="bomb.png: refused as a decompression bomb"):
        load_image(path, 32, 16)


def test_dataset_manifest_ids_beyond_64_bits(tmp_path: Path) -> None:
    from vireid.data.datasets.manifest import load_manifest

    Image.new("RGB", (16, 32)).save(tmp_path / "a.jpg")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,person_id,camera,modality,split\na.jpg,{2**64},1,visible,train\n")
    with pytest.raises(InputError, match="line 2: person_id .* 64-bit"):
        load_manifest(manifest)


def test_files_get_the_umask_permissions(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "shared.bin", b"x")
        os.umask(0o077)
        save_npy_atomic(tmp_path / "private.npy", np.zeros(3))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "shared.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.npy").stat().st_mode) == 0o600


_KILLED_SAVE = """
import os, signal, sys
import torch
from vireid.engine.checkpoint import save_checkpoint

def dying_save(state, path, *args, **kwargs):
    with open(path, "wb") as fh:
        fh.write(b"half a checkpoint")
        fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = dying_save
save_checkpoint(sys.argv[1], {"model": {}})
"""


def test_a_checkpoint_save_killed_midway_leaves_nothing_the_next_save_keeps(tmp_path: Path) -> None:
    from vireid.engine.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "checkpoints" / "last.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    run = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(path)], env=env, timeout=120)
    assert run.returncode == -signal.SIGKILL
    leftovers = list(path.parent.glob(".last.pt.*.tmp"))
    assert len(leftovers) == 1 and not path.exists()
    with PendingFile(path.parent / "best.pt") as busy:  # a live writer's file is never taken for a leftover
        save_checkpoint(path, {"epoch": 3})
        assert busy.tmp.exists()
    assert list(path.parent.glob(".last.pt.*.tmp")) == []
    assert load_checkpoint(path)["epoch"] == 3
    killed = path.parent / ".best.pt.abcd_123.pt.tmp"
    killed.write_bytes(b"left by a killed writer")
    (path.parent / "notes.tmp").write_text("not ours")
    assert remove_stale_temporaries(path.parent) == 1 and (path.parent / "notes.tmp").exists()


def test_a_write_error_inside_the_block_removes_the_temporary_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []
