"""The multi-task feature extractor of the paper's Fig. 1, top to bottom.

    image -> backbone (stem + blocks) -> 320-channel map ─┬─ EmbeddingBranch      -> 320-d unit vector  [§II-A]
                                                          ├─ ClassificationBranch -> class logits       [§II-B]
                                                          └─ backbone's own head  -> 1280-d baseline

The backbone is tapped at its last block, before the 1x1 conv that would widen it to the
1280-d descriptor MobileNetV2 usually emits; the two branches replace that widening.
The 1280-d head is kept (same weights) as the paper's baseline descriptor, so a single
backbone pass yields both the baseline and the MTL outputs (:meth:`MTLNet.describe`).

Checkpoints are plain dicts {"model_config": dict, "model_state": state_dict, **extra}
(a trained one records the ``image_size`` it was trained at) that ``torch.load(weights_only=True)`` reads: every value must be a tensor, a number, a
string, a bool, None, or a dict/list/tuple of those (no numpy arrays, no custom classes).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mtl.backbones import Normalization, backbone_spec, create_backbone, forward_head, forward_tap
from mtl.io import UserError, atomic_path


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "tf_efficientnet_lite0"  # the paper's is mobilenetv2_100 (weights online only)
    pretrained: bool = True                  # ImageNet weights for the backbone
    weights_path: str | None = None          # local backbone state_dict (timm/torchvision/lukemelas naming)
    embed_dim: int = 320                     # §II-A: the compact descriptor, 1/4 of MobileNetV2's 1280
    embed_conv_channels: int = 640           # §II-A: conv block 320 -> 640
    embed_hidden: int = 480                  # §II-A: DNN 640 -> 480 -> 320
    cls_channels: tuple[int, ...] = (480, 160)  # §II-B: two convs 320 -> 480 -> 160
    # The paper only says "a DNN that reduces the representation to a final 2-class output".
    # One hidden layer of 64 keeps the narrowing of the branch (480 -> 160 -> 64 -> 2) for
    # ~10k parameters: two classes from 160 pooled features need no more capacity.
    cls_hidden: int = 64
    num_classes: int = 2
    class_names: tuple[str, ...] = ("scene", "clipart")
    # 1x1 branch convs: like the backbone's own 320 -> 1280 conv_head they replace, they
    # re-mix channels, not space.  At our 112 px inputs the tap is only 4x4, where a 3x3
    # kernel would mostly see padding while costing 9x the parameters (1.84 M vs 0.2 M
    # for 320 -> 640).  The paper does not state the kernel size.
    conv_kernel_size: int = 1
    # Pooling of the embedding branch: "avg" (the paper's global pooling) or "gem"
    # (generalized mean, p = 3 fixed, as SSCD uses at inference: it weights the strongest
    # responses more; a learned p grows without bound there).
    embed_pool: str = "avg"

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names {self.class_names} must name num_classes={self.num_classes} classes")
        if self.conv_kernel_size % 2 != 1:
            raise ValueError(f"conv_kernel_size must be odd (same-size padding), got {self.conv_kernel_size}")
        if self.embed_pool not in POOLINGS:
            raise ValueError(f"embed_pool must be one of {sorted(POOLINGS)}, got {self.embed_pool!r}")
        backbone_spec(self.backbone)  # unknown names fail here, with the supported list
        if self.weights_path is not None:  # a Path would not survive weights_only loading
            object.__setattr__(self, "weights_path", str(self.weights_path))

    def to_dict(self) -> dict[str, Any]:
        """Plain python types only (tuples become lists): safe for weights_only loading."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class ConvBNAct(nn.Sequential):
    """conv (no bias: BN follows) + BatchNorm + ReLU6, the backbone's own activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


def global_average_pool(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C]; works on any input size and memory format."""
    return x.mean(dim=(2, 3))


GEM_P = 3.0


def generalized_mean_pool(x: torch.Tensor, p: float = GEM_P, eps: float = 1e-6) -> torch.Tensor:
    """[B, C, H, W] -> [B, C]: (mean x^p)^(1/p) over space; x >= 0 (after ReLU6)."""
    return x.clamp_min(eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


POOLINGS = {"avg": global_average_pool, "gem": generalized_mean_pool}


class EmbeddingBranch(nn.Module):
    """§II-A: conv block 320 -> 640, global pooling, DNN 640 -> 480 -> 320, L2 norm."""

    def __init__(self, in_channels: int, conv_channels: int, hidden: int, embed_dim: int, kernel_size: int = 1,
                 pool: str = "avg"):
        super().__init__()
        self.conv = ConvBNAct(in_channels, conv_channels, kernel_size)
        self.pool = POOLINGS[pool]
        self.mlp = nn.Sequential(nn.Linear(conv_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, embed_dim))

    def forward(self, tap: torch.Tensor) -> torch.Tensor:
        # Unit vectors: Euclidean distance and inner product then rank alike (contrastive
        # loss on distances, faiss inner-product search).
        return F.normalize(self.mlp(self.pool(self.conv(tap))), dim=1)


class ClassificationBranch(nn.Module):
    """§II-B: convs 320 -> 480 -> 160, global pooling, DNN 160 -> 64 -> num_classes logits."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], hidden: int, num_classes: int,
                 kernel_size: int = 1):
        super().__init__()
        widths = (in_channels, *channels)
        self.convs = nn.Sequential(*(ConvBNAct(a, b, kernel_size) for a, b in zip(widths, widths[1:])))
        self.mlp = nn.Sequential(nn.Linear(widths[-1], hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def forward(self, tap: torch.Tensor) -> torch.Tensor:
        return self.mlp(global_average_pool(self.convs(tap)))


class MTLOutput(NamedTuple):
    embedding: torch.Tensor  # [B, embed_dim], unit rows
    logits: torch.Tensor     # [B, num_classes]


class MTLDescription(NamedTuple):
    """Everything evaluation needs from one backbone pass."""

    embedding: torch.Tensor  # [B, embed_dim], unit rows
    logits: torch.Tensor     # [B, num_classes]
    gap: torch.Tensor        # [B, 1280], the backbone's own pooled descriptor (baseline)


class MTLNet(nn.Module):
    """Backbone tapped at 320 channels + embedding branch + classification branch (Fig. 1)."""

    def __init__(self, config: ModelConfig = ModelConfig(), *, load_pretrained: bool = True):
        """``load_pretrained=False`` skips the ImageNet weights whatever the config says;
        used when a checkpoint supplies all weights (no download, no weights package)."""
        super().__init__()
        self.config = config
        self.spec = backbone_spec(config.backbone)
        self.backbone = create_backbone(config.backbone, config.pretrained and load_pretrained, config.weights_path)
        self.backbone.reset_classifier(0)  # the ImageNet fc is not part of Fig. 1
        tap, k = self.spec.tap_channels, config.conv_kernel_size
        self.embedding = EmbeddingBranch(tap, config.embed_conv_channels, config.embed_hidden, config.embed_dim, k,
                                         config.embed_pool)
        self.classifier = ClassificationBranch(tap, config.cls_channels, config.cls_hidden, config.num_classes, k)
        self._backbone_frozen = False
        self._backbone_batchnorm_frozen = False

    # ------------------------------------------------------------------ forward passes

    def forward(self, images: torch.Tensor) -> MTLOutput:
        return self.heads(forward_tap(self.backbone, images))

    def heads(self, tap: torch.Tensor) -> MTLOutput:
        """The two branches on a backbone tap [B, 320, h, w]: what stage 1 trains, also
        from stored taps (mtl.features) when the backbone is frozen."""
        return MTLOutput(self.embedding(tap), self.classifier(tap))

    def backbone_gap(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's own 1280-d pooled descriptor (the paper's baseline), same weights."""
        return forward_head(self.backbone, forward_tap(self.backbone, images))

    def describe(self, images: torch.Tensor) -> MTLDescription:
        """Embedding, logits and the 1280-d baseline descriptor from one backbone pass."""
        tap = forward_tap(self.backbone, images)
        return MTLDescription(self.embedding(tap), self.classifier(tap), forward_head(self.backbone, tap))

    @property
    def normalization(self) -> Normalization:
        """(mean, std) of the inputs the backbone's weights expect."""
        return self.spec.normalization

    # ------------------------------------------------------------------ training stages (§III-A)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def branch_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.embedding.parameters()
        yield from self.classifier.parameters()

    @property
    def backbone_frozen(self) -> bool:
        return self._backbone_frozen

    def freeze_backbone(self, frozen: bool = True) -> "MTLNet":
        """Stage 1 freezes the backbone: no gradients *and* BatchNorm in eval mode, so its
        running statistics (part of the ImageNet weights) stay bit-identical too."""
        self._backbone_frozen = frozen
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        return self.train(self.training)

    def freeze_backbone_batchnorm(self, frozen: bool = True) -> "MTLNet":
        """Stage 2's BatchNorm policy "frozen": the backbone's BatchNorm layers stay in eval
        mode (ImageNet running statistics, no batch statistics) while all weights learn.
        Small augmented batches would otherwise overwrite the running statistics within
        ~50 steps (momentum 0.1), which alone destroys the ImageNet features."""
        self._backbone_batchnorm_frozen = frozen
        return self.train(self.training)

    def train(self, mode: bool = True) -> "MTLNet":
        super().train(mode)
        if self._backbone_frozen:
            self.backbone.eval()  # model.train() must not wake the frozen BatchNorms
        elif self._backbone_batchnorm_frozen:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str | Path, **extra: Any) -> None:
        """Write {"model_config", "model_state", **extra} atomically (tmp file + rename), so
        a run killed mid-write never leaves a truncated checkpoint.  ``extra`` (optimizer,
        loss memory, RNG states, epoch, stage config, ...) must hold plain values only:
        tensors, numbers, strings, bools, None, and dicts/lists/tuples of them."""
        reserved = {"model_config", "model_state"} & set(extra)
        if reserved:
            raise ValueError(f"extra checkpoint entries may not be named {sorted(reserved)}")
        for key, value in extra.items():
            _require_plain(value, key)
        checkpoint = {"model_config": self.config.to_dict(), "model_state": self.state_dict(), **extra}
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "MTLNet":
        """The model saved at ``path``, built from its stored config with no other file."""
        checkpoint = load_checkpoint(path, map_location)
        model = cls(ModelConfig.from_dict(checkpoint["model_config"]), load_pretrained=False)
        model.load_state_dict(checkpoint["model_state"], strict=True)
        return model.to(map_location)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict, read with ``weights_only=True`` (no code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pickle-protocol notes on files we then refuse
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - a damaged file fails in a dozen ways
        raise unreadable_checkpoint(path, error) from error
    missing = {"model_config", "model_state"} - set(checkpoint if isinstance(checkpoint, dict) else ())
    if missing:
        raise UserError(f"{path} is not an MTLNet checkpoint (missing {sorted(missing)})")
    return checkpoint


def trained_image_size(checkpoint: dict[str, Any]) -> int | None:
    """The input size a checkpoint was trained at: its ``image_size`` (``mtl train`` writes
    it), for older checkpoints their stage config's; None for a model saved by hand."""
    size = checkpoint.get("image_size", (checkpoint.get("stage_config") or {}).get("image_size"))
    return None if size is None else int(size)


def unreadable_checkpoint(path: Path, error: Exception) -> UserError:
    """One line on a file torch cannot load with weights_only=True.  Torch's own
    message suggests weights_only=False, i.e. running code stored in the file:
    never the advice to give about a file of unknown origin."""
    detail = str(error).splitlines()[0] if str(error) else ""
    if "weights_only" in str(error) or "Unpickler" in str(error):
        detail = "it holds objects other than tensors and plain values, which are never loaded"
    return UserError(f"{path} is not a readable checkpoint ({type(error).__name__}{': ' if detail else ''}{detail}); "
                     "give a last.pt or final.pt written by mtl train")


_PLAIN_SCALARS = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _require_plain(value: Any, where: str) -> None:
    """Raise a TypeError naming the offending entry if ``value`` would not load with
    weights_only=True; better now at save time than at resume time."""
    if isinstance(value, _PLAIN_SCALARS):
        return
    if type(value) in (dict, OrderedDict):  # subclasses (defaultdict, ...) do not unpickle
        for k, v in value.items():
            _require_plain(k, f"{where} key")
            _require_plain(v, f"{where}[{k!r}]")
        return
    if type(value) in (list, tuple):  # namedtuples do not unpickle either
        for i, v in enumerate(value):
            _require_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint entry {where} is a {type(value).__name__}; weights_only loading "
                    f"accepts only tensors, numbers, strings, bools, None and dicts/lists/tuples of them")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
