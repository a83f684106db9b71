"""The model of the paper's Fig. 1: branch dimensions, unit embeddings, one-pass description,
frozen backbone, and checkpoints that restore the model with no other file."""

import numpy as np
import pytest
import torch
from torch import nn

from mtl import backbones
from mtl.model import (ClassificationBranch, EmbeddingBranch, ModelConfig, MTLNet, count_parameters,
                       load_checkpoint)
from tests.configs import study_params

BACKBONES = sorted(backbones.BACKBONES)


def random_model(backbone: str = "tf_efficientnet_lite0", **overrides) -> MTLNet:
    torch.manual_seed(0)
    return MTLNet(ModelConfig(backbone=backbone, pretrained=False, **overrides))


def images(batch: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def layer_shapes(module: nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every conv and linear layer, in order."""
    return [(m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
            for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# ---------------------------------------------------------------- dimensions (§II-A, §II-B)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_branch_dimensions_follow_the_paper(backbone):
    model = random_model(backbone)
    assert layer_shapes(model.embedding) == [(320, 640), (640, 480), (480, 320)]
    assert layer_shapes(model.classifier) == [(320, 480), (480, 160), (160, 64), (64, 2)]
    for branch in (model.embedding, model.classifier):  # every conv is conv + BN + activation
        convs = [m for m in branch.modules() if isinstance(m, nn.Conv2d)]
        norms = [m for m in branch.modules() if isinstance(m, nn.BatchNorm2d)]
        assert [c.out_channels for c in convs] == [n.num_features for n in norms]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_outputs_have_the_paper_shapes(backbone):
    model = random_model(backbone).eval()
    x = images()
    with torch.no_grad():
        out = model(x)
        gap = model.backbone_gap(x)
    assert out.embedding.shape == (3, 320)
    assert out.logits.shape == (3, 2)
    assert gap.shape == (3, 1280)


def test_backbone_has_no_imagenet_classifier_left():
    model = random_model()
    assert not any(isinstance(m, nn.Linear) and m.out_features == 1000 for m in model.modules())


@pytest.mark.parametrize("backbone", BACKBONES)
def test_embedding_rows_are_unit_vectors_in_train_and_eval(backbone):
    model = random_model(backbone)
    for mode in (True, False):
        model.train(mode)
        norms = model(images(4)).embedding.norm(dim=1)
        torch.testing.assert_close(norms, torch.ones(4))


def test_branches_accept_other_widths():
    embed = EmbeddingBranch(in_channels=32, conv_channels=16, hidden=8, embed_dim=4, kernel_size=3)
    cls = ClassificationBranch(in_channels=32, channels=(12, 6, 5), hidden=7, num_classes=3)
    tap = torch.randn(2, 32, 5, 5)
    assert embed(tap).shape == (2, 4) and cls(tap).shape == (2, 3)
    assert layer_shapes(cls) == [(32, 12), (12, 6), (6, 5), (5, 7), (7, 3)]


def test_embed_dim_and_num_classes_follow_the_config():
    model = random_model(embed_dim=128, num_classes=3, class_names=("scene", "clipart", "text")).eval()
    with torch.no_grad():
        out = model(images(2))
    assert out.embedding.shape == (2, 128) and out.logits.shape == (2, 3)


def test_config_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="class_names"):
        ModelConfig(num_classes=3)
    with pytest.raises(ValueError, match="supported"):
        ModelConfig(backbone="vgg16")
    with pytest.raises(ValueError, match="odd"):
        ModelConfig(conv_kernel_size=2)


def test_config_round_trips_through_a_plain_dict():
    config = ModelConfig(backbone="mobilenetv2_100", weights_path="w.pth", cls_channels=(480, 160, 80))
    plain = config.to_dict()
    assert all(isinstance(v, (str, int, bool, list, type(None))) for v in plain.values())
    assert ModelConfig.from_dict(plain) == config
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**plain, "dropout": 0.1})


@pytest.mark.parametrize("backbone", BACKBONES)
def test_normalization_is_the_backbones(backbone):
    assert random_model(backbone).normalization == backbones.backbone_spec(backbone).normalization


# ---------------------------------------------------------------- one pass for evaluation


def test_describe_equals_forward_plus_backbone_gap():
    model = random_model().eval()
    x = images()
    with torch.no_grad():
        described = model.describe(x)
        out, gap = model(x), model.backbone_gap(x)
    torch.testing.assert_close(described.embedding, out.embedding, rtol=0, atol=0)
    torch.testing.assert_close(described.logits, out.logits, rtol=0, atol=0)
    torch.testing.assert_close(described.gap, gap, rtol=0, atol=0)


def test_describe_runs_the_backbone_once():
    model = random_model().eval()
    calls = []
    model.backbone.blocks.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model.describe(images(1))
    assert len(calls) == 1


def test_channels_last_gives_the_same_outputs():
    model = random_model().eval()
    x = images()
    with torch.no_grad():
        expected = model.describe(x)
        model = model.to(memory_format=torch.channels_last)
        got = model.describe(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- frozen backbone (§III-A stage 1)


def batchnorm_modes(module: nn.Module) -> set[bool]:
    return {m.training for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_parameter_groups_partition_the_model():
    model = random_model()
    backbone, branches = list(model.backbone_parameters()), list(model.branch_parameters())
    assert {id(p) for p in backbone}.isdisjoint(id(p) for p in branches)
    assert len(backbone) + len(branches) == len(list(model.parameters()))


def test_frozen_backbone_stays_in_eval_mode_and_unchanged_by_a_train_step():
    model = random_model().freeze_backbone(True)
    model.train()
    assert batchnorm_modes(model.backbone) == {False}
    assert batchnorm_modes(model.embedding) == {True} and batchnorm_modes(model.classifier) == {True}
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}

    out = model(images(4))
    (out.embedding.sum() + out.logits.sum()).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone_parameters())
    assert all(p.grad is not None for p in model.branch_parameters())
    for key, value in model.backbone.state_dict().items():  # BN running stats included
        assert torch.equal(value, before[key]), key


def test_frozen_batchnorm_policy_keeps_statistics_while_weights_learn():
    """Stage 2's `bn: frozen`: the backbone's BatchNorm layers stay in eval mode through
    model.train() (the branches' do not), and a forward pass leaves their statistics."""
    model = random_model().freeze_backbone_batchnorm(True)
    model.train()
    assert batchnorm_modes(model.backbone) == {False}
    assert batchnorm_modes(model.embedding) == {True}
    assert all(p.requires_grad for p in model.backbone_parameters())
    before = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running_" in k}
    model(images(4)).logits.sum().backward()
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in before.items())
    model.freeze_backbone_batchnorm(False).train()
    assert batchnorm_modes(model.backbone) == {True}


def test_heads_on_a_tap_equal_the_full_forward():
    model = random_model().eval()
    x = images(3)
    with torch.no_grad():
        tap = backbones.forward_tap(model.backbone, x)
        direct, from_tap = model(x), model.heads(tap)
    assert torch.equal(direct.embedding, from_tap.embedding) and torch.equal(direct.logits, from_tap.logits)


def test_gem_pooling_is_a_generalized_mean_between_average_and_max():
    from mtl.model import generalized_mean_pool, global_average_pool

    x = torch.rand(2, 5, 4, 4, generator=torch.Generator().manual_seed(3)) * 6
    gem = generalized_mean_pool(x)
    torch.testing.assert_close(gem, x.pow(3).mean(dim=(2, 3)).pow(1 / 3))
    assert torch.all(global_average_pool(x) <= gem + 1e-6) and torch.all(gem <= x.amax(dim=(2, 3)) + 1e-6)
    model = random_model(embed_pool="gem").eval()
    assert model.embedding.pool is generalized_mean_pool
    with torch.no_grad():
        assert torch.allclose(model(images(2)).embedding.norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="embed_pool"):
        ModelConfig(pretrained=False, embed_pool="max")


def test_unfreezing_restores_training_of_the_backbone():
    model = random_model().freeze_backbone(True).freeze_backbone(False)
    model.train()
    assert batchnorm_modes(model.backbone) == {True}
    assert all(p.requires_grad for p in model.backbone_parameters())
    out = model(images(2))
    out.logits.sum().backward()
    # conv_head/bn2 (the 1280-d baseline head) are not on the branches' path
    tapped = [model.backbone.conv_stem, model.backbone.bn1, model.backbone.blocks]
    assert all(p.grad is not None for m in tapped for p in m.parameters())
    assert all(p.grad is None for p in model.backbone.conv_head.parameters())


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_restores_identical_outputs(tmp_path):
    model = random_model()
    model.train()
    model(images(4))  # move the BN running statistics away from their initial values
    model.eval()
    path = tmp_path / "ckpt" / "last.pt"
    model.save_checkpoint(path, epoch=3, stage={"name": "frozen", "lr": 1e-3}, memory=torch.randn(5, 320))

    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 3 and raw["stage"]["name"] == "frozen" and raw["memory"].shape == (5, 320)
    assert raw["model_config"] == model.config.to_dict()
    assert load_checkpoint(path)["epoch"] == 3

    restored = MTLNet.from_checkpoint(path).eval()
    assert restored.config == model.config
    x = images()
    with torch.no_grad():
        for a, b in zip(restored.describe(x), model.describe(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [p.name for p in tmp_path.joinpath("ckpt").iterdir()] == ["last.pt"]  # no temp file left


def test_from_checkpoint_needs_no_pretrained_weights(tmp_path, monkeypatch):
    """A model made with ImageNet weights restores without the weights package or internet."""
    model = MTLNet(ModelConfig(pretrained=True))
    model.save_checkpoint(tmp_path / "m.pt")

    def unavailable(*args, **kwargs):
        raise AssertionError("from_checkpoint must not load backbone weights")

    monkeypatch.setattr(backbones, "_lite0_package_state_dict", unavailable)
    monkeypatch.setattr(backbones, "_download_timm_weights", unavailable)
    restored = MTLNet.from_checkpoint(tmp_path / "m.pt")
    assert restored.config.pretrained  # the record of how it was made is kept
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_save_checkpoint_overwrites_atomically(tmp_path):
    model = random_model()
    model.save_checkpoint(tmp_path / "c.pt", epoch=1)
    model.save_checkpoint(tmp_path / "c.pt", epoch=2)
    assert load_checkpoint(tmp_path / "c.pt")["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_save_checkpoint_rejects_what_weights_only_cannot_load(tmp_path):
    model = random_model()
    with pytest.raises(TypeError, match=r"rng\['numpy'\]\[1\]"):
        model.save_checkpoint(tmp_path / "c.pt", rng={"numpy": ("MT19937", np.zeros(3))})
    with pytest.raises(ValueError, match="model_state"):
        model.save_checkpoint(tmp_path / "c.pt", model_state={})
    assert not (tmp_path / "c.pt").exists()


def test_load_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an MTLNet checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_count_parameters_splits_backbone_and_branches():
    model = random_model()
    total = count_parameters(model)
    assert total == count_parameters(model.backbone) + count_parameters(model.embedding) + count_parameters(model.classifier)
    # 320*640 conv + BN, 640*480+480, 480*320+320  (bias-free convs: BN follows)
    assert count_parameters(model.embedding) == 320 * 640 + 2 * 640 + 640 * 480 + 480 + 480 * 320 + 320


def test_defaults_of_the_model_section_are_the_parameters():
    """The branch widths (Fig. 1) are defined in code; what params.yaml's `model` section
    names must have the same values here, so `ModelConfig()` is the study's model."""
    section = study_params()["model"]
    assert {key: getattr(ModelConfig(), key) for key in section} == section
