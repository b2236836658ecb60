"""Two-stream ResNet backbones: modality-specific early stages, shared later stages.

The standard VI-ReID baseline (AGW, Ye et al. TPAMI 2021) gives each modality its own stem
(conv1/bn1/relu/maxpool) and shares layer1..layer4; cm-SSFT splits after layer2. ``split``
names the last modality-specific stage. The last stage uses stride 1 (``last_stride``).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

from vireid.errors import InputError

log = logging.getLogger(__name__)

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")

_RESNETS = {
    "resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (tv_resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3]),
    "resnet101": (tv_resnet.Bottleneck, [3, 4, 23, 3]),
    # A one-block-per-stage ResNet for fast CPU tests and the demo.
    "resnet10": (tv_resnet.BasicBlock, [1, 1, 1, 1]),
}

DEFAULT_WEIGHTS_DIR = Path.home() / ".cache" / "vireid" / "weights"


def available_backbones() -> list[str]:
    return sorted(_RESNETS)


def resnet_stages(name: str, last_stride: int = 1, pretrained: str | Path | None = None) -> nn.ModuleDict:
    """The five stages of a torchvision ResNet as a ``ModuleDict`` (``stem``, ``layer1``..``layer4``).

    ``pretrained``: a local ``state_dict`` file (torchvision key names), ``"auto"`` for
    ``~/.cache/vireid/weights/<name>.pth`` when it exists, or ``None``. Nothing is downloaded.
    """
    if name not in _RESNETS:
        raise InputError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    block, layers = _RESNETS[name]
    net = tv_resnet.ResNet(block, layers)
    _load_pretrained(net, name, pretrained)
    if last_stride not in (1, 2):
        raise InputError(f"last_stride must be 1 or 2, got {last_stride}")
    if last_stride == 1:
        _set_stage_stride(net.layer4, 1)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    return nn.ModuleDict({"stem": stem, "layer1": net.layer1, "layer2": net.layer2,
                          "layer3": net.layer3, "layer4": net.layer4})


def stage_channels(name: str) -> int:
    block, _ = _RESNETS[name]
    return 512 * block.expansion


def _set_stage_stride(layer: nn.Sequential, stride: int) -> None:
    first = layer[0]
    if isinstance(first, tv_resnet.Bottleneck):
        first.conv2.stride = (stride, stride)
    else:
        first.conv1.stride = (stride, stride)
    if first.downsample is not None:
        first.downsample[0].stride = (stride, stride)


def _load_pretrained(net: nn.Module, name: str, pretrained: str | Path | None) -> None:
    if pretrained is None:
        return
    path = DEFAULT_WEIGHTS_DIR / f"{name}.pth" if str(pretrained) == "auto" else Path(pretrained)
    if not path.is_file():
        if str(pretrained) == "auto":
            log.info("no cached ImageNet weights at %s; training from scratch", path)
            return
        raise InputError(f"pretrained weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise InputError(f"{path}: weights do not match {name} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    log.info("loaded ImageNet weights from %s", path)


class TwoStreamBackbone(nn.Module):
    """Modality-specific stages up to ``split`` (inclusive), shared stages after it.

    ``forward(images, modality)`` routes each image through the stream of its modality
    index (0 visible, 1 infrared, further indices for extra modalities such as XIV's X)
    and returns the shared feature map (B, C, h, w) in the input order.
    """

    def __init__(self, name: str = "resnet50", split: str = "stem", last_stride: int = 1,
                 pretrained: str | Path | None = None, num_modalities: int = 2) -> None:
        super().__init__()
        if split not in STAGES:
            raise InputError(f"unknown split stage {split!r}; choose one of {', '.join(STAGES)}")
        stages = resnet_stages(name, last_stride=last_stride, pretrained=pretrained)
        cut = STAGES.index(split) + 1
        specific = nn.Sequential(*[stages[s] for s in STAGES[:cut]])
        self.streams = nn.ModuleList([copy.deepcopy(specific) for _ in range(num_modalities)])
        self.shared = nn.Sequential(*[stages[s] for s in STAGES[cut:]])
        self.out_channels = stage_channels(name)
        self.num_modalities = num_modalities

    def specific(self, images: Tensor, modality: Tensor) -> Tensor:
        """Run each image through its modality's stream; output in input order."""
        if modality.shape[0] != images.shape[0]:
            raise ValueError("modality must have one entry per image")
        present = torch.unique(modality).tolist()
        if len(present) == 1:
            return self.streams[int(present[0])](images)
        outputs: Tensor | None = None
        for m in present:
            idx = torch.nonzero(modality == m, as_tuple=False).squeeze(1)
            out = self.streams[int(m)](images.index_select(0, idx))
            if outputs is None:
                outputs = out.new_empty((images.shape[0], *out.shape[1:]))
            outputs.index_copy_(0, idx, out)
        assert outputs is not None
        return outputs

    def forward(self, images: Tensor, modality: Tensor) -> Tensor:
        return self.shared(self.specific(images, modality))
