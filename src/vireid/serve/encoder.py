"""Image → feature encoders for the search service: a PyTorch checkpoint or an exported ONNX model.

Both take decoded RGB images, apply the evaluation preprocessing of
:mod:`vireid.data.transforms` (bilinear resize to the model's height × width, ImageNet
normalisation) and return L2-normalised float32 features. The ONNX graph has two inputs,
``images`` (N, 3, H, W) float32 and ``modality`` (N,) int64 (0 visible, 1 infrared), a dynamic
batch axis, and carries its preprocessing in the model's metadata, so an ``.onnx`` file alone
is enough to build and search an index.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import types
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vireid.data.records import Modality
from vireid.data.transforms import TransformConfig, normalize
from vireid.errors import InputError
from vireid.extras import require
from vireid.io import atomic_path
from vireid.models.backbone import TwoStreamBackbone
from vireid.models.base import ReIDModel

#: Largest decoded image accepted (pixels); bigger files are refused before their pixels are decoded.
MAX_IMAGE_PIXELS = 16_000_000
#: Largest ratio of the long to the short side (a person crop is about 1:2).
MAX_ASPECT_RATIO = 16.0
#: Largest memory one decode may take (bytes of the decoded image and its RGB copy).
MAX_DECODE_BYTES = 256 * 1024 * 1024
ONNX_METADATA_KEY = "vireid_preprocess"
ONNX_TOLERANCE = 1e-4
#: Formats decoded from untrusted bytes (no plugin that runs external programs, e.g. EPS).
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF")
_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>|0x[0-9a-fA-F]{6,}")


class ImageTooLarge(InputError):
    """An image whose decoded size exceeds the limits (pixels, aspect ratio, memory)."""


def _bytes_per_pixel(mode: str) -> int:
    try:
        bands = Image.getmodebands(mode)
    except (KeyError, ValueError):
        bands = 4
    depth = 4 if mode in ("I", "F", "RGBa", "La") or mode.startswith("I;32") else (2 if mode.startswith("I;16") else 1)
    return bands * depth


def decoded_bytes(width: int, height: int, mode: str) -> int:
    """Memory of decoding a ``mode`` image and converting it to RGB."""
    return width * height * (_bytes_per_pixel(mode) + 3)


def check_image_size(width: int, height: int, mode: str, source: str, max_pixels: int = MAX_IMAGE_PIXELS,
                     max_aspect: float = MAX_ASPECT_RATIO, max_bytes: int = MAX_DECODE_BYTES) -> None:
    """Refuse a header's size before any pixel is decoded: pixels, aspect ratio, decode memory."""
    if width < 1 or height < 1:
        raise ImageTooLarge(f"{source}: image of {width}×{height} pixels has no area")
    if width * height > max_pixels:
        raise ImageTooLarge(f"{source}: image of {width}×{height} pixels exceeds the limit of {max_pixels} pixels")
    if max(width, height) > max_aspect * min(width, height):
        raise ImageTooLarge(f"{source}: image of {width}×{height} pixels is more elongated than {max_aspect:g}:1")
    if decoded_bytes(width, height, mode) > max_bytes:
        raise ImageTooLarge(f"{source}: decoding a {mode} image of {width}×{height} pixels would take more than "
                            f"{max_bytes // (1024 * 1024)} MiB")


def clean_message(text: str) -> str:
    """An exception text without object reprs or heap addresses (``<_io.BytesIO object at 0x…>``)."""
    return _ADDRESS.sub("the data", text)


def decode_image(data: bytes, source: str, max_pixels: int = MAX_IMAGE_PIXELS, *,
                 max_aspect: float = MAX_ASPECT_RATIO, max_bytes: int = MAX_DECODE_BYTES,
                 reduce_to: tuple[int, int] | None = None) -> Image.Image:
    """Decode image bytes to RGB, refusing non-images (and formats outside :data:`IMAGE_FORMATS`),
    truncated files and oversized images (:func:`check_image_size`, from the header, before any
    pixel is decoded). ``reduce_to`` (width, height): a JPEG may be decoded at a reduced scale
    no smaller than this (its DCT scaling), saving memory and time for large photos."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size
            check_image_size(width, height, image.mode, source, max_pixels, max_aspect, max_bytes)
            if reduce_to is not None and image.format == "JPEG":
                image.draft("RGB", reduce_to)
            image.load()
            return image.convert("RGB")
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"{source}: refused as a decompression bomb ({clean_message(str(exc))})") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.UnidentifiedImageError) as exc:
        reason = "unknown or unsupported format" if isinstance(exc, Image.UnidentifiedImageError) else clean_message(str(exc))
        raise InputError(f"{source}: not a readable image ({type(exc).__name__}: {reason})") from None


def read_image_file(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Image.Image, bytes]:
    """An image file's decoded RGB image and its raw bytes."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    return decode_image(data, str(path), max_pixels), data


def preprocess(images: Sequence[Image.Image], cfg: TransformConfig) -> Tensor:
    """(N, 3, H, W) float32 batch: bilinear resize, [0, 1] scaling, mean/std normalisation."""
    batch = []
    for image in images:
        rgb = image.convert("RGB").resize((cfg.width, cfg.height), Image.BILINEAR)
        array = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
        batch.append(normalize(array, cfg.mean, cfg.std))
    return torch.stack(batch).contiguous()


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Encoder(Protocol):
    """What the index and the service need from a model."""

    transform: TransformConfig
    source: Path

    def encode_batch(self, batch: Tensor, modality: Modality) -> np.ndarray: ...


def encode_images(encoder: Encoder, images: Sequence[Image.Image], modality: Modality, batch_size: int = 32) -> np.ndarray:
    """L2-normalised float32 features (N, d) of decoded images."""
    parts = [encoder.encode_batch(preprocess(images[s:s + batch_size], encoder.transform), modality)
             for s in range(0, len(images), batch_size)]
    return _unit_rows(np.concatenate(parts))


class TorchEncoder:
    """A :class:`~vireid.models.base.ReIDModel` in eval mode (``extract(...)["feat"]``)."""

    def __init__(self, model: ReIDModel, transform: TransformConfig, source: Path) -> None:
        self.model = model.eval()
        self.transform = transform
        self.source = source

    def encode_batch(self, batch: Tensor, modality: Modality) -> np.ndarray:
        with torch.inference_mode():
            mods = torch.full((batch.shape[0],), int(modality), dtype=torch.long)
            return self.model.extract(batch, mods)["feat"].float().numpy()


class OnnxEncoder:
    """An exported model run by onnxruntime on the CPU."""

    def __init__(self, path: str | Path, threads: int = 2) -> None:
        ort = require("onnxruntime", f"running the ONNX model {path}")
        self.source = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise InputError(f"{path}: not a loadable ONNX model ({type(exc).__name__}: {exc})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if ONNX_METADATA_KEY not in meta:
            raise InputError(f"{path}: ONNX model lacks '{ONNX_METADATA_KEY}' metadata (export it with `vireid export`)")
        fields = json.loads(meta[ONNX_METADATA_KEY])
        self.transform = TransformConfig(height=fields["height"], width=fields["width"],
                                         mean=tuple(fields["mean"]), std=tuple(fields["std"]))

    def encode_batch(self, batch: Tensor, modality: Modality) -> np.ndarray:
        mods = np.full((batch.shape[0],), int(modality), dtype=np.int64)
        return self.session.run(["feat"], {"images": batch.numpy(), "modality": mods})[0]


def load_encoder(path: str | Path, threads: int = 2) -> Encoder:
    """An ``.onnx`` file (onnxruntime) or a training checkpoint / run folder (PyTorch)."""
    path = Path(path)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise InputError(f"{path}: ONNX model not found")
        return OnnxEncoder(path, threads)
    model, cfg = _load_checkpoint(path)
    return TorchEncoder(model, cfg.transforms, path)


def _load_checkpoint(path: Path) -> tuple[ReIDModel, object]:
    from vireid.engine.checkpoint import load_checkpoint_model

    return load_checkpoint_model(path)


@contextlib.contextmanager
def _traceable_streams(model: torch.nn.Module) -> Iterator[None]:
    """Route images to modality streams with a gather instead of data-dependent branches, so the
    exported graph keeps ``modality`` as an input (every stream runs on the whole batch)."""
    backbones = [m for m in model.modules() if isinstance(m, TwoStreamBackbone)]

    def gathered(self: TwoStreamBackbone, images: Tensor, modality: Tensor) -> Tensor:
        outs = torch.stack([stream(images) for stream in self.streams])
        index = modality.view(1, -1, *([1] * (outs.dim() - 2))).expand(1, *outs.shape[1:])
        return outs.gather(0, index).squeeze(0)

    for backbone in backbones:
        backbone.specific = types.MethodType(gathered, backbone)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for backbone in backbones:
            del backbone.specific


class _FeatureGraph(torch.nn.Module):
    def __init__(self, model: ReIDModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, modality: Tensor) -> Tensor:
        return self.model.extract(images, modality)["feat"]


def export_onnx(model: ReIDModel, transform: TransformConfig, out: str | Path, opset: int = 17) -> None:
    """Write ``model`` as ONNX (inputs ``images``, ``modality``; output ``feat``; dynamic batch)
    with its preprocessing in the metadata. Written atomically."""
    onnx = require("onnx", "ONNX export")
    model = model.eval()
    dummy = torch.zeros(2, 3, transform.height, transform.width)
    modality = torch.tensor([0, 1], dtype=torch.long)
    buffer = io.BytesIO()
    with _traceable_streams(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _FeatureGraph(model), (dummy, modality), buffer, dynamo=False, opset_version=opset,
            input_names=["images", "modality"], output_names=["feat"],
            dynamic_axes={"images": {0: "batch"}, "modality": {0: "batch"}, "feat": {0: "batch"}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    meta = {"height": transform.height, "width": transform.width,
            "mean": list(transform.mean), "std": list(transform.std)}
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(meta)
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))


def onnx_max_abs_difference(model: ReIDModel, transform: TransformConfig, onnx_path: str | Path,
                            batch: int = 4, seed: int = 0, threads: int = 2) -> float:
    """Largest |PyTorch − onnxruntime| feature difference on a random mixed-modality batch
    (both streams used, odd batch size to exercise the dynamic axis); onnxruntime runs ``threads``
    intra-op threads."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, transform.height, transform.width, generator=generator)
    modality = torch.arange(batch, dtype=torch.long) % 2
    with torch.inference_mode():
        expected = model.eval().extract(images, modality)["feat"].float().numpy()
    encoder = OnnxEncoder(onnx_path, threads)
    got = encoder.session.run(["feat"], {"images": images.numpy(), "modality": modality.numpy()})[0]
    return float(np.abs(expected - got).max())


def transform_summary(transform: TransformConfig) -> dict[str, object]:
    """The preprocessing fields an index records (JSON-able)."""
    fields = asdict(transform)
    return {key: fields[key] for key in ("height", "width", "mean", "std")}
