"""Helpers shared by the deployment tests (export, index, service): a tiny checkpoint and images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

TEST_HEIGHT, TEST_WIDTH = 32, 16


def make_checkpoint(folder: Path, num_classes: int = 4, seed: int = 0) -> Path:
    """A resnet10 baseline checkpoint (input 32×16) in the engine's format."""
    import torch

    from vireid.config import to_dict
    from vireid.data.transforms import TransformConfig
    from vireid.engine.checkpoint import save_checkpoint
    from vireid.engine.config import DataConfig, TrainConfig
    from vireid.models import ModelConfig, create_model

    torch.manual_seed(seed)
    cfg = TrainConfig(data=DataConfig(root="unused"), transforms=TransformConfig(height=TEST_HEIGHT, width=TEST_WIDTH),
                      model=ModelConfig(backbone="resnet10", pretrained=None))
    model = create_model(cfg.model, num_classes)
    with torch.no_grad():  # trained streams differ; freshly copied ones would be identical
        for param in model.backbone.streams[1].parameters():
            param.add_(0.03 * torch.randn_like(param))
    path = folder / "model.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": to_dict(cfg), "num_classes": num_classes})
    return path


def person_image(pid: int, variant: int, size: tuple[int, int] = (24, 48), fmt: str = "JPEG") -> bytes:
    """A synthetic 'person': a colour layout fixed by ``pid`` plus per-image noise."""
    layout = np.random.default_rng(pid).integers(0, 256, (4, 2, 3))
    noise = np.random.default_rng(10_000 * pid + variant).integers(-20, 21, (size[1], size[0], 3))
    pixels = np.kron(layout, np.ones((size[1] // 4, size[0] // 2, 1)))
    image = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def write_gallery(folder: Path, pids: range, per_pid: int, start_variant: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for pid in pids:
        for v in range(start_variant, start_variant + per_pid):
            path = folder / f"{pid:04d}_c1_{v:02d}.jpg"
            path.write_bytes(person_image(pid, v))
            paths.append(path)
    return paths


#: Re-ranking neighbourhoods sized for a gallery of 3 images per person (the papers' suit thousands).
SMALL_GALLERY_PARAMS = {"aim": {"k1": 4, "k2": 2}, "sgr": {"k_graph": 4, "K": 3}, "mnnr": {"kq": 3, "kg": 3},
                        "sim": {"k_graph": 4, "K": 3, "kq": 3, "kg": 3}, "krr": {"k1": 3, "k2": 2}}


def build_image_index(folder: Path, pids: range = range(1, 9), per_pid: int = 3) -> Path:
    """An index of synthetic gallery images encoded by an exported tiny model; returns its folder."""
    from vireid.data.records import Modality
    from vireid.engine.checkpoint import load_checkpoint_model
    from vireid.retrieval.single import SingleQueryParams
    from vireid.serve.encoder import export_onnx, load_encoder, transform_summary
    from vireid.serve.enrol import encode_sources
    from vireid.serve.index import IndexSettings, build_index, store_model
    from vireid.serve.sources import gallery_sources

    model, cfg = load_checkpoint_model(make_checkpoint(folder))
    onnx = folder / "model.onnx"
    export_onnx(model, cfg.transforms, onnx)
    write_gallery(folder / "gallery", pids, per_pid)
    encoder = load_encoder(onnx)
    feats, images = encode_sources(encoder, gallery_sources(folder / "gallery", Modality.VISIBLE))
    index = folder / "index"
    model_entry = store_model(index, onnx, {"kind": "onnx", "transform": transform_summary(encoder.transform)})
    settings = IndexSettings(rerank=SingleQueryParams.resolve(params=SMALL_GALLERY_PARAMS))
    build_index(index, feats, images, settings=settings, model=model_entry)
    return index


class RunningServer:
    """``uvicorn`` serving ``create_app(index, config)`` on a free loopback port, in a thread."""

    def __init__(self, index: Path, config: object) -> None:
        import socket
        import threading

        import uvicorn

        from vireid.serve.app import create_app

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(index, config), host="127.0.0.1", port=port,
                                                    log_level="warning", limit_concurrency=64))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "RunningServer":
        import time

        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
