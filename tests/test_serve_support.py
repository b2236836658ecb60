"""Helpers shared by the deployment tests (export, index, service): a tiny checkpoint and images."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from typing import Any
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
    from vireid.retrieval.gallery_state import SingleQueryParams
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


class ServerProcess:
    """``vireid serve INDEX`` in its own process on a free loopback port (so that its memory and
    its temporary files can be measured); ``env`` adds variables (a token, ``TMPDIR``). The
    server's stderr goes to a file (a pipe nobody reads fills up and blocks the server's logging);
    ``log_text()`` reads it."""

    def __init__(self, index: Path, *args: str, env: dict[str, str] | None = None, src: Path | None = None) -> None:
        import os
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "vireid", "serve", str(index), "--host", "127.0.0.1",
                        "--port", str(self.port), *args]
        self.env = {**os.environ, "PYTHONPATH": str(src or Path(__file__).resolve().parents[1] / "src"), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def __enter__(self) -> "ServerProcess":
        import tempfile
        import time

        import httpx

        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def log_text(self) -> str:
        """What the server wrote to stderr so far."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def memory_kib(self, field: str = "VmRSS") -> int:
        """``VmRSS`` (resident now) or ``VmHWM`` (peak) of the server, KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def open_file_bytes(self, folder: Path) -> int:
        """Bytes in the regular files the server holds open under ``folder`` (deleted ones too:
        spooled uploads are unnamed temporary files)."""
        import os

        total = 0
        fds = Path(f"/proc/{self.pid}/fd")
        for fd in list(fds.iterdir()) if fds.is_dir() else []:
            try:
                if os.readlink(fd).startswith(str(folder)):
                    total += os.stat(fd).st_size
            except OSError:
                continue
        return total


class ResourceSampler:
    """Samples a :class:`ServerProcess`'s resident memory and open temporary-file bytes every few
    milliseconds while a ``with`` block runs; ``peak_rss_mib`` and ``peak_disk_mib`` above the start."""

    def __init__(self, server: ServerProcess, spool: Path, interval: float = 0.005) -> None:
        self.server, self.spool, self.interval = server, spool, interval
        self.peak_rss_mib = self.peak_disk_mib = 0.0

    def __enter__(self) -> "ResourceSampler":
        import threading

        self._start_rss = self.server.memory_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = (self.server.memory_kib() - self._start_rss) / 1024
                disk = self.server.open_file_bytes(self.spool) / 2**20
            except (OSError, KeyError):
                return
            self.peak_rss_mib, self.peak_disk_mib = max(self.peak_rss_mib, rss), max(self.peak_disk_mib, disk)
            self._stop.wait(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def send_raw(url: str, method: str, path: str, headers: dict[str, str], body_chunks: Iterator[bytes],
             chunked: bool = True, timeout: float = 60.0) -> int | None:
    """Send a request over a plain socket, the body as it comes (chunked transfer encoding unless
    ``chunked`` is False and a Content-Length header is given); stop sending when the server has
    closed the connection. Returns the response status, None when no response came."""
    import socket
    from urllib.parse import urlparse

    parts = urlparse(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        head = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}"] + [f"{k}: {v}" for k, v in headers.items()]
        if chunked:
            head.append("Transfer-Encoding: chunked")
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        try:
            for chunk in body_chunks:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            status_line = sock.recv(4096).split(b"\r\n", 1)[0].decode()
        except (ConnectionResetError, TimeoutError, OSError):
            return None
    return int(status_line.split()[1]) if status_line.startswith("HTTP/") else None


def multipart_stream(field: str, filename: str, size: int, boundary: str = "vireidboundary",
                     chunk: int = 1 << 20) -> Iterator[bytes]:
    """A multipart body whose one file part holds ``size`` bytes, produced a chunk at a time."""
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
           f"Content-Type: application/octet-stream\r\n\r\n").encode()
    block = b"\xab" * chunk
    for start in range(0, size, chunk):
        yield block[: min(chunk, size - start)]
    yield f"\r\n--{boundary}--\r\n".encode()
