"""One stage's settings (§III-A): params.yaml's ``loss``, the keys ``train`` shares between
the stages, and ``train.<stage>``; and which of them a resumed run may change."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mtl import distributed
from mtl.params import section_config

STAGES = ("frozen", "finetune")
BATCHNORM_POLICIES = ("frozen", "train")
SOURCES = ("images", "features")
# Fields that may differ when a run is resumed (they do not change what is learned).
RESUMABLE_DIFFERENCES = {"device", "num_workers", "distributed_backend"}


@dataclass
class StageConfig:
    """One stage's settings: params.yaml's ``loss``, the keys ``train`` shares between the
    stages, and ``train.<stage>`` (see :meth:`from_params`; the values live there only)."""

    stage: str                    # "frozen" (branches only) or "finetune" (everything)
    epochs: int
    lr: float
    weight_decay: float
    instances_per_batch: int      # K originals per batch ...
    views_per_instance: int       # ... x V views each = batch size (paper: 64)
    image_size: int
    seed: int
    device: str                   # "auto" = CUDA when present, else CPU
    amp: bool                     # mixed precision; CUDA only (ignored on CPU)
    channels_last: bool           # faster convolutions on CPU and tensor cores
    num_workers: int              # data loading processes (used by the CLI's batches)
    memory_size: int              # cross-batch memory entries (paper: 10,240 negatives)
    # What keeps a memory shorter than an epoch from collapsing the embedding (beyond the
    # paper; README "The cross-batch memory at scale"; 0 / nonzero / false = the paper's):
    memory_momentum: float        # > 0: a momentum (EMA) copy of the network fills the memory (MoCo)
    memory_warmup_steps: int      # the memory holds only the current batch for this many steps (XBM)
    memory_refresh_steps: int     # > 0: every this many steps the stored views are embedded again
                                  # by the current model (from stored taps: stage 1 from the cache;
                                  # a stage that learns from images leaves the memory as it is)
    negative_reduction: str       # "nonzero": mean over active negatives (PML); "all": over every compared one
    memory_positives: bool        # also compare each anchor with its picture's last stored view
    margin: float                 # contrastive margin alpha (paper: 0.45)
    lambda_cls: float             # weight of the content-type cross-entropy
    lambda_koleo: float           # weight of the entropy regularizer (beyond the paper; 0 = off)
    lambda_distill: float         # stage 2: weight of 1 - cos(backbone's pooled output, ImageNet's), keeping
                                  # ImageNet's generality where data is thin (LwF / L2-SP style; 0 = off)
    photo_repeats: int            # each real photograph appears this many times per epoch, with other views
    final_lr_fraction: float      # cosine ends at lr * this
    warmup_steps: int             # linear warm-up of the learning rate, in optimizer steps
    branch_lr_scale: float        # finetune: the branches' lr = lr * this (the backbone's is lr)
    bn: str                       # finetune: backbone BatchNorm "frozen" (eval mode) or "train"
    views: str                    # view recipe (mtl.data.batches.VIEW_RECIPES)
    source: str                   # frozen: "images", or "features" (stored backbone taps)
    max_steps_per_epoch: int | None  # cap, for smoke tests; None = the whole epoch
    distributed_backend: str      # under torchrun: "auto" (nccl on GPUs, gloo on CPUs), "gloo", "nccl"

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        for name in ("epochs", "instances_per_batch", "views_per_instance", "image_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr < 0 or self.weight_decay < 0 or self.branch_lr_scale < 0 or self.warmup_steps < 0:
            raise ValueError(f"need lr, weight_decay, branch_lr_scale and warmup_steps >= 0, got "
                             f"{self.lr}, {self.weight_decay}, {self.branch_lr_scale}, {self.warmup_steps}")
        if self.bn not in BATCHNORM_POLICIES:
            raise ValueError(f"bn must be one of {BATCHNORM_POLICIES}, got {self.bn!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.distributed_backend not in distributed.BACKENDS:
            raise ValueError(f"distributed_backend must be one of {distributed.BACKENDS}, "
                             f"got {self.distributed_backend!r}")
        if self.source == "features" and self.stage != "frozen":
            raise ValueError("source 'features' (stored backbone taps) needs a frozen backbone: stage 'frozen'")
        if self.views_per_instance < 2:
            raise ValueError("views_per_instance must be >= 2: positives are views of one original")
        if self.lambda_distill < 0 or int(self.photo_repeats) < 1:
            raise ValueError(f"need lambda_distill >= 0 and photo_repeats >= 1, got {self.lambda_distill}, "
                             f"{self.photo_repeats}")
        if not 0 <= self.memory_momentum < 1:
            raise ValueError(f"memory_momentum must be in [0, 1), got {self.memory_momentum}")
        if self.memory_warmup_steps < 0 or self.memory_refresh_steps < 0:
            raise ValueError("memory_warmup_steps and memory_refresh_steps must be >= 0")
        if self.memory_size and self.memory_size < self.batch_size:
            raise ValueError(f"memory_size={self.memory_size} is smaller than the batch "
                             f"({self.batch_size}); use 0 (within-batch loss) or >= the batch")

    @property
    def batch_size(self) -> int:
        return self.instances_per_batch * self.views_per_instance

    @classmethod
    def from_params(cls, params: dict, stage: str) -> "StageConfig":
        """Build from loaded parameters (a recipe already applied, see
        :func:`mtl.params.recipe_params`): ``loss``, then the keys ``train`` shares
        between the stages, then ``train.<stage>``."""
        train = params.get("train", {})
        if stage not in train:
            raise KeyError(f"params have no train.{stage} section (stages: {sorted(s for s in STAGES if s in train)})")
        shared = {k: v for k, v in train.items() if k not in STAGES}
        return section_config(cls, {**params.get("loss", {}), **shared, **train[stage]},
                              f"loss + train + train.{stage}", stage=stage)


def config_differences(saved: dict[str, Any], current: StageConfig) -> dict[str, tuple[Any, Any]]:
    return {k: (saved.get(k), v) for k, v in asdict(current).items()
            if k not in RESUMABLE_DIFFERENCES and saved.get(k) != v}
