"""ONNX export: dynamic batch, both modality streams, onnxruntime equals PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from test_serve_support import make_checkpoint, person_image
from vireid.cli import main
from vireid.data.records import Modality
from vireid.engine.checkpoint import load_checkpoint_model
from vireid.serve.encoder import OnnxEncoder, TorchEncoder, decode_image, encode_images, load_encoder


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("export")
    checkpoint = make_checkpoint(folder)
    out = folder / "model.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return checkpoint, out


def test_export_command_prints_difference_below_tolerance(exported: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint, out = exported
    again = out.with_name("again.onnx")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(again), "--check-batch", "3"]) == 0
    line = capsys.readouterr().out
    difference = float(line.split("PyTorch: ")[1].split()[0])
    assert difference < 1e-4
    assert again.is_file()


def test_onnx_features_match_pytorch_for_both_modalities_and_batch_sizes(exported: tuple[Path, Path]) -> None:
    checkpoint, out = exported
    model, cfg = load_checkpoint_model(checkpoint)
    torch_encoder, onnx_encoder = TorchEncoder(model, cfg.transforms, checkpoint), OnnxEncoder(out)
    assert (onnx_encoder.transform.height, onnx_encoder.transform.width) == (cfg.transforms.height, cfg.transforms.width)
    images = [decode_image(person_image(pid, 0), f"p{pid}") for pid in range(1, 8)]
    for modality in Modality:
        for n in (1, 7):
            expected = encode_images(torch_encoder, images[:n], modality)
            got = encode_images(onnx_encoder, images[:n], modality)
            assert got.shape == expected.shape == (n, 512)
            assert np.abs(got - expected).max() < 1e-4
    # the two stems differ, so the modality input really routes images
    visible = encode_images(onnx_encoder, images[:2], Modality.VISIBLE)
    infrared = encode_images(onnx_encoder, images[:2], Modality.INFRARED)
    assert np.abs(visible - infrared).max() > 1e-3


def test_mixed_modality_batch_routes_each_image(exported: tuple[Path, Path]) -> None:
    checkpoint, out = exported
    model, cfg = load_checkpoint_model(checkpoint)
    images = torch.randn(4, 3, cfg.transforms.height, cfg.transforms.width)
    modality = torch.tensor([1, 0, 0, 1])
    with torch.inference_mode():
        expected = model.extract(images, modality)["feat"].numpy()
    got = OnnxEncoder(out).session.run(["feat"], {"images": images.numpy(), "modality": modality.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4


def test_load_encoder_rejects_missing_and_foreign_files(tmp_path: Path) -> None:
    from vireid.errors import InputError

    with pytest.raises(InputError, match="not found"):
        load_encoder(tmp_path / "missing.onnx")
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a loadable ONNX model"):
        load_encoder(bogus)
