"""Two-stream backbones: modality-specific early stages, shared later stages.

The standard VI-ReID baseline (AGW, Ye et al. TPAMI 2021) gives each modality its own stem
(conv1/bn1/relu/maxpool) and shares layer1..layer4; cm-SSFT splits after layer2. ``split``
names the last modality-specific stage. The last stage uses stride 1 (``last_stride``).

Backbones by name:

* ``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101`` -- torchvision ResNets (ImageNet
  weights through torchvision's weights API, :mod:`vireid.models.pretrained`); ``resnet10`` --
  one block per stage, for fast CPU tests and the demo (no published weights);
* ``timm:<name>[.<tag>]`` -- any timm ResNet-family model (stages ``stem``, ``layer1`` ..
  ``layer4``: ResNet, ResNet-D, ResNeXt, SE-/ECA-ResNet, ...) or Vision Transformer (stages
  ``stem`` = the patch embedding and ``blocks``; the token grid is returned as a feature map),
  built with ``timm.create_model``.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

from vireid.errors import InputError
from vireid.models.pretrained import TIMM_PREFIX, load_state_dict_file, resolve_pretrained
from vireid.models.routing import route

log = logging.getLogger(__name__)

#: Stages of a ResNet, in order; the first ``split`` stages are modality-specific.
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
#: Stages of a Vision Transformer: the patch embedding, then every block (and the final norm).
VIT_STAGES = ("stem", "blocks")

_RESNETS = {
    "resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (tv_resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3]),
    "resnet101": (tv_resnet.Bottleneck, [3, 4, 23, 3]),
    # A one-block-per-stage ResNet for fast CPU tests and the demo.
    "resnet10": (tv_resnet.BasicBlock, [1, 1, 1, 1]),
}


def available_backbones() -> list[str]:
    return sorted(_RESNETS) + [f"{TIMM_PREFIX}<timm model name>"]


def backbone_stages(name: str, last_stride: int = 1, pretrained: str | os.PathLike[str] | None = None
                    ) -> tuple[nn.ModuleDict, int]:
    """The ordered stages of backbone ``name`` as a ``ModuleDict`` and its output channels.

    ``pretrained``: ``auto``, ``none`` / None or a weights file (see :mod:`vireid.models.pretrained`).
    """
    if last_stride not in (1, 2):
        raise InputError(f"last_stride must be 1 or 2, got {last_stride}")
    if name.startswith(TIMM_PREFIX):
        return _timm_stages(name, last_stride, pretrained)
    if name not in _RESNETS:
        raise InputError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    block, layers = _RESNETS[name]
    net = tv_resnet.ResNet(block, layers)
    weights = resolve_pretrained(name, pretrained)
    if weights is not None:
        _load_resnet_weights(net, name, weights.file)
    if last_stride == 1:
        _remove_stride(net.layer4[0])
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages = (stem, net.layer1, net.layer2, net.layer3, net.layer4)
    return nn.ModuleDict(dict(zip(STAGES, stages))), 512 * block.expansion


def _remove_stride(block: nn.Module) -> None:
    """Stride 1 in the first block of the last stage: every strided convolution of the block
    (main path and shortcut) gets stride 1, an average-pooling shortcut (ResNet-D) is removed."""
    for name, module in list(block.named_modules()):
        if isinstance(module, nn.Conv2d) and module.stride != (1, 1):
            module.stride = (1, 1)
        elif isinstance(module, nn.AvgPool2d) and module.stride not in (1, (1, 1)):
            parent_name, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, child, nn.Identity())


def _load_resnet_weights(net: nn.Module, name: str, file: str) -> None:
    state = {k: v for k, v in load_state_dict_file(file).items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise InputError(f"{file}: weights do not match {name} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    log.info("loaded %s weights from %s", name, file)


def _timm_stages(name: str, last_stride: int, pretrained: str | os.PathLike[str] | None
                 ) -> tuple[nn.ModuleDict, int]:
    import timm

    model_name = name[len(TIMM_PREFIX):]
    weights = resolve_pretrained(name, pretrained)
    kwargs: dict = {"num_classes": 0}
    if weights is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": weights.file})
    is_vit = _split_arch(model_name) in timm.list_models(module="vision_transformer")
    try:
        net = timm.create_model(model_name, **kwargs, **({"dynamic_img_size": True} if is_vit else {}))
    except RuntimeError as exc:
        raise InputError(f"backbone {name!r}: timm could not build it ({exc})".replace("\n", " ")) from None
    if is_vit:
        stages = (PatchEmbeddingMap(net), TransformerBlocksMap(net))
        return nn.ModuleDict(dict(zip(VIT_STAGES, stages))), net.num_features
    if not all(hasattr(net, s) for s in ("conv1", "bn1", "act1", "maxpool", "layer1", "layer4")):
        raise InputError(f"backbone {name!r}: only timm ResNet-family models (conv1 .. layer4) and Vision "
                         f"Transformers can be split into modality-specific and shared stages; "
                         f"{type(net).__name__} cannot")
    if last_stride == 1:
        _remove_stride(net.layer4[0])
    stem = nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool)
    stages = (stem, net.layer1, net.layer2, net.layer3, net.layer4)
    return nn.ModuleDict(dict(zip(STAGES, stages))), net.num_features


def _split_arch(model_name: str) -> str:
    """``resnet50.a1_in1k`` -> ``resnet50``."""
    return model_name.split(".", 1)[0]


class PatchEmbeddingMap(nn.Module):
    """A timm Vision Transformer's patch embedding, returned as a (B, C, h, w) map."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.patch_embed = vit.patch_embed

    def forward(self, images: Tensor) -> Tensor:
        return self.patch_embed(images).permute(0, 3, 1, 2)  # dynamic_img_size: NHWC tokens


class _GridSize(nn.Module):
    """What ``VisionTransformer._pos_embed`` reads from the patch embedding: its grid size."""

    def __init__(self, grid_size: tuple[int, int]) -> None:
        super().__init__()
        self.grid_size = grid_size


class TransformerBlocksMap(nn.Module):
    """Position embedding, prefix tokens, every block and the final norm of a timm Vision
    Transformer, from a (B, C, h, w) patch map to a (B, C, h, w) map of the output patch tokens."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        vit.patch_embed = _GridSize(tuple(vit.patch_embed.grid_size))
        self.vit = vit

    def forward(self, patches: Tensor) -> Tensor:
        vit = self.vit
        batch, _, height, width = patches.shape
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(patches.permute(0, 2, 3, 1))))
        tokens = vit.norm(vit.blocks(tokens))[:, vit.num_prefix_tokens:]
        return tokens.transpose(1, 2).reshape(batch, -1, height, width)


class TwoStreamBackbone(nn.Module):
    """Modality-specific stages up to ``split`` (inclusive), shared stages after it.

    ``forward(images, modality)`` routes each image through the stream of its modality
    index (0 visible, 1 infrared, further indices for extra modalities such as XIV's X)
    and returns the shared feature map (B, C, h, w) in the input order
    (:func:`vireid.models.routing.route`).
    """

    def __init__(self, name: str = "resnet50", split: str = "stem", last_stride: int = 1,
                 pretrained: str | Path | None = None, num_modalities: int = 2) -> None:
        super().__init__()
        stages, self.out_channels = backbone_stages(name, last_stride=last_stride, pretrained=pretrained)
        names = list(stages)
        if split not in names[:-1]:
            raise InputError(f"model.split: unknown split stage {split!r} for backbone {name!r}; choose one of "
                             f"{', '.join(names[:-1])}")
        cut = names.index(split) + 1
        specific = nn.Sequential(*[stages[s] for s in names[:cut]])
        self.streams = nn.ModuleList([copy.deepcopy(specific) for _ in range(num_modalities)])
        self.shared = nn.Sequential(*[stages[s] for s in names[cut:]])
        self.num_modalities = num_modalities

    def specific(self, images: Tensor, modality: Tensor) -> Tensor:
        """Run each image through its modality's stream; output in input order."""
        if modality.shape[0] != images.shape[0]:
            raise ValueError("modality must have one entry per image")
        return route(self.streams, images, modality)

    def forward(self, images: Tensor, modality: Tensor) -> Tensor:
        return self.shared(self.specific(images, modality))
