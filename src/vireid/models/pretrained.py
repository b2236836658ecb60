"""Where a backbone's pretrained weights come from: torchvision's weights API, timm's pretrained
tags, or a file -- always read from a local cache, downloaded only when asked.

``model.pretrained``:

* ``auto`` -- the backbone's ImageNet weights: torchvision ``ResNet{18,34,50,101}_Weights.IMAGENET1K_V1``
  for ``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101`` (the weights the VI-ReID papers
  start from), timm's pretrained tag for ``timm:<name>[.<tag>]`` backbones (the default tag
  when the name has none);
* ``none`` or null -- random initialisation;
* a path -- a ``state_dict`` file (``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors``) with
  torchvision or timm key names.

torchvision files are cached in ``$TORCH_HOME/hub/checkpoints/`` (``torch.hub.get_dir()``),
timm files in the Hugging Face cache (``$HF_HOME``) or, for weights published by URL, torch
hub's. :func:`resolve_pretrained` finds the cached file; when it is missing it downloads it if
``download`` is true (the trainer lets only one process per machine download, the others wait)
and otherwise -- or when the download fails, e.g. offline -- raises a one-line
:class:`~vireid.errors.InputError` naming the file to place and where. The result records the
source, the file and its SHA-256, which the trainer writes into the run's summary.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from vireid.errors import InputError

log = logging.getLogger(__name__)

#: Backbone name prefix of timm models (``timm:resnet50.a1_in1k``, ``timm:vit_small_patch16_224``).
TIMM_PREFIX = "timm:"
#: torchvision ResNets -> the name of their weights enum; ``IMAGENET1K_V1`` is used.
TORCHVISION_WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights",
                       "resnet50": "ResNet50_Weights", "resnet101": "ResNet101_Weights"}
TORCHVISION_TAG = "IMAGENET1K_V1"
NO_WEIGHTS = ("none",)
AUTO = "auto"


@dataclass(frozen=True)
class PretrainedWeights:
    """A resolved weights file: what it is, where it came from, where it is, its SHA-256."""

    backbone: str
    source: str
    file: str
    url: str | None
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wants_weights(pretrained: str | os.PathLike[str] | None) -> bool:
    """False for ``none`` / null (random initialisation)."""
    return pretrained is not None and str(pretrained).strip().lower() not in NO_WEIGHTS


def resolve_pretrained(backbone: str, pretrained: str | os.PathLike[str] | None, *, download: bool = True,
                       progress: bool = False) -> PretrainedWeights | None:
    """The weights file ``model.pretrained`` names for ``backbone`` (None: random initialisation)."""
    if not wants_weights(pretrained):
        return None
    if str(pretrained) != AUTO:
        path = Path(pretrained).expanduser()  # type: ignore[arg-type]
        if not path.is_file():
            raise InputError(f"model.pretrained: weights file not found: {path}")
        return PretrainedWeights(backbone, "file", str(path.resolve()), None, file_sha256(path))
    if backbone.startswith(TIMM_PREFIX):
        return _timm_weights(backbone, download, progress)
    if backbone in TORCHVISION_WEIGHTS:
        return _torchvision_weights(backbone, download, progress)
    raise InputError(f"model.pretrained: auto: no ImageNet weights are published for backbone {backbone!r}; "
                     "set model.pretrained: none (random initialisation) or the path of a weights file")


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def torchvision_weights_file(backbone: str) -> tuple[str, str, Path]:
    """(source name, URL, cache file) of ``backbone``'s torchvision ImageNet weights."""
    import torchvision.models

    enum_name = TORCHVISION_WEIGHTS[backbone]
    weights = getattr(getattr(torchvision.models, enum_name), TORCHVISION_TAG)
    file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    return f"torchvision {enum_name}.{TORCHVISION_TAG}", weights.url, file


def _torchvision_weights(backbone: str, download: bool, progress: bool) -> PretrainedWeights:
    source, url, file = torchvision_weights_file(backbone)
    if not file.is_file():
        _fetch_url(url, file, source, download, progress)
    sha256 = file_sha256(file)
    match = torch.hub.HASH_REGEX.search(file.name)
    if match and not sha256.startswith(match.group(1)):
        log.warning("%s: SHA-256 %s does not start with %s as the published file's does", file, sha256[:12],
                    match.group(1))
    return PretrainedWeights(backbone, source, str(file), url, sha256)


def _fetch_url(url: str, file: Path, source: str, download: bool, progress: bool) -> None:
    reason = "downloading is left to another process"
    if download:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            match = torch.hub.HASH_REGEX.search(file.name)
            torch.hub.download_url_to_file(url, str(file), hash_prefix=match.group(1) if match else None,
                                           progress=progress)
            log.info("downloaded %s to %s", url, file)
            return
        except Exception as exc:  # offline, proxy, disk full, hash mismatch: one line for the user
            reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    if not file.is_file():
        raise InputError(f"model.pretrained: {source} is not cached and could not be downloaded ({reason}); "
                         f"place {url} at {file}, or set model.pretrained: none")


def _timm_weights(backbone: str, download: bool, progress: bool) -> PretrainedWeights:
    from timm.models import get_pretrained_cfg

    name = backbone[len(TIMM_PREFIX):]
    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise InputError(f"model.pretrained: auto: timm publishes no pretrained weights for {name!r}; "
                         "set model.pretrained: none or the path of a weights file")
    source = f"timm {cfg.architecture}.{cfg.tag}" if cfg.tag else f"timm {name}"
    if cfg.hf_hub_id:
        file, url = _hf_hub_file(cfg.hf_hub_id, cfg.hf_hub_filename, source, download)
    else:
        url = cfg.url
        file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if not file.is_file():
            _fetch_url(url, file, source, download, progress)
    return PretrainedWeights(backbone, source, str(file), url, file_sha256(file))


def _hf_hub_file(repo: str, filename: str | None, source: str, download: bool) -> tuple[Path, str]:
    import huggingface_hub
    from huggingface_hub import constants

    names = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
    for name in names:
        cached = huggingface_hub.try_to_load_from_cache(repo, name)
        if isinstance(cached, str):
            return Path(cached), f"https://huggingface.co/{repo}/resolve/main/{name}"
    reason = "downloading is left to another process"
    if download:
        for name in names:
            try:
                return Path(huggingface_hub.hf_hub_download(repo, name)), f"https://huggingface.co/{repo}/resolve/main/{name}"
            except Exception as exc:  # offline, missing file in the repository, gated model
                reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    raise InputError(f"model.pretrained: {source} is not cached and could not be downloaded ({reason}); "
                     f"download {names[0]} of https://huggingface.co/{repo} into the Hugging Face cache "
                     f"({constants.HF_HUB_CACHE}), e.g. `hf download {repo}`, or set "
                     "model.pretrained to the file's path, or none")


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A ``state_dict`` from a ``.safetensors`` file or a ``torch.save`` file (``weights_only``)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: not a readable weights file ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model"):  # checkpoints that wrap the state_dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a state_dict (a mapping of parameter names to tensors)")
    return state
