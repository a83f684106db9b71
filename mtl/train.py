"""The two training stages of §III-A.

- ``frozen``: the backbone is frozen (no gradients, BatchNorm in eval mode, so its
  weights and running statistics stay bit-identical); only the two branches learn.
- ``finetune``: the whole network learns, starting from the ``frozen`` checkpoint.

Both minimize the multi-task objective of :mod:`mtl.loss` (cross-batch contrastive
+ lambda * cross-entropy).  :func:`train_stage` logs one CSV row per epoch, writes an
atomic checkpoint after every epoch (model, optimizer, scheduler, loss memory, RNG
states, configs, log history) and resumes from it when rerun with the same ``out_dir``.

Optimizer and schedule: AdamW, the usual choice for fine-tuning ImageNet CNNs with
small batches.  The learning rate rises linearly over ``warmup_steps`` and then follows
a cosine down to ``lr * final_lr_fraction``, stepped once per optimizer step: the paper
states no schedule; a cosine needs no milestones yet ends low, and the warm-up lets the
fresh memory and the optimizer's moment estimates settle before large steps move a
pretrained backbone.  In stage 2 the branches may learn faster than the backbone
(``branch_lr_scale``), as is usual when fine-tuning a pretrained network under a head.

BatchNorm in stage 2 (``bn``): ``frozen`` keeps the backbone's BatchNorm layers in eval
mode (ImageNet running statistics) while their weights learn; ``train`` lets small
augmented batches rewrite the statistics.  Stage 1 always freezes them.

Stage 1 can learn from stored backbone taps (``source: features``, :mod:`mtl.features`)
instead of images: the same model, loss and schedule, many more epochs for the time.

Several processes (``torchrun --nproc-per-node N -m mtl.train ...``, :mod:`mtl.distributed`):
each takes a contiguous K/N instances x V views of every global K x V batch, the loss
sees the whole global batch and every rank's memory stores every rank's entries, the
gradients are summed over ranks and BatchNorm layers that learn use global-batch
statistics, so a step equals the single-process step on the same batch (to float
rounding).  Only rank 0 writes checkpoints and logs; every rank resumes from them.
Validation is not sharded: every rank scores the whole (small) val split alike.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from mtl import distributed
from mtl.io import atomic_path, file_digest
from mtl.loss import CrossBatchContrastiveLoss, LossParts, MultiTaskLoss
from mtl.model import MTLNet, ModelConfig, load_checkpoint
from mtl.params import section_config
from mtl.runtime import git_revision, progress, resolve_device, seed_everything

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
STAGES = ("frozen", "finetune")
LOG_COLUMNS = (
    "epoch",
    "train_contrastive", "train_cross_entropy", "train_koleo", "train_total",
    "val_contrastive", "val_cross_entropy", "val_koleo", "val_total", "val_class_accuracy",
    "train_positive_pairs", "train_negatives_compared", "train_active_negatives",
    "val_positive_pairs", "val_negatives_compared", "val_active_negatives",
    "lr", "train_steps", "images_per_second", "wall_seconds",
)
PAIR_COUNTS = ("positive_pairs", "negatives_compared", "active_negatives")
# One row per optimizer step (steps.csv): how the loss and its active pairs evolve.
STEP_COLUMNS = ("step", "epoch", "lr", "total", "contrastive", "cross_entropy", "koleo", *PAIR_COUNTS)
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
    margin: float                 # contrastive margin alpha (paper: 0.45)
    lambda_cls: float             # weight of the content-type cross-entropy
    lambda_koleo: float           # weight of the entropy regularizer (beyond the paper; 0 = off)
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


# --------------------------------------------------------------------------- RNG + checkpoint state

def rng_states() -> dict[str, Any]:
    """torch / numpy / python RNG states as plain values (weights_only loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def config_differences(saved: dict[str, Any], current: StageConfig) -> dict[str, tuple[Any, Any]]:
    return {k: (saved.get(k), v) for k, v in asdict(current).items()
            if k not in RESUMABLE_DIFFERENCES and saved.get(k) != v}


# --------------------------------------------------------------------------- the run

@dataclass
class EpochMeans:
    """Running sums of one pass over batches, kept on the device to avoid syncs."""

    steps: int = 0
    images: int = 0
    correct: int = 0
    sums: dict[str, torch.Tensor] | None = None

    def add(self, parts: LossParts, counts: dict[str, torch.Tensor]) -> None:
        values = {"contrastive": parts.contrastive.detach(), "cross_entropy": parts.cross_entropy.detach(),
                  "koleo": parts.koleo.detach(), "total": parts.total.detach(),
                  **{k: v.float() for k, v in counts.items()}}
        self.sums = values if self.sums is None else {k: self.sums[k] + v for k, v in values.items()}
        self.steps += 1

    def means(self, prefix: str) -> dict[str, float]:
        if not self.steps:
            return {}
        return {f"{prefix}_{k}": float(v) / self.steps for k, v in (self.sums or {}).items()}


def warmup_cosine(total_steps: int, warmup_steps: int, final_fraction: float) -> Callable[[int], float]:
    """lr multiplier at optimizer step t: linear warm-up to 1, then a cosine to final_fraction."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


class StageRun:
    """Everything one stage holds between epochs; :func:`train_stage` drives it."""

    def __init__(self, model: MTLNet, cfg: StageConfig, out_dir: Path, steps_per_epoch: int):
        self.cfg, self.out_dir = cfg, out_dir
        self.device = resolve_device(cfg.device)
        self.amp = cfg.amp and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else torch.float16
        self.from_taps = cfg.source == "features"
        self.model = model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.freeze_backbone(cfg.stage == "frozen")
        self.model.freeze_backbone_batchnorm(cfg.bn == "frozen")
        self.world = distributed.world_size()
        if self.world > 1:  # the global batch's BatchNorm statistics; every rank starts as rank 0
            distributed.sync_batchnorm(self.model)
            distributed.broadcast_state(self.model)
        contrastive = CrossBatchContrastiveLoss(cfg.margin, cfg.memory_size, model.config.embed_dim)
        self.criterion = MultiTaskLoss(contrastive, cfg.lambda_cls, cfg.lambda_koleo).to(self.device)
        # fused: one kernel for all parameters instead of a dozen small ops per tensor.
        self.optimizer = torch.optim.AdamW(self._parameter_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           fused=self.device.type in ("cpu", "cuda"))
        self.total_steps = cfg.epochs * steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, cfg.warmup_steps, cfg.final_lr_fraction))
        # fp16 needs loss scaling; bf16 (and fp32) do not.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.step_rows: list[dict[str, float]] = []
        self.fingerprint: dict[str, Any] = {}

    def _parameter_groups(self) -> list[dict[str, Any]]:
        """The branches at lr * branch_lr_scale, the backbone (when it learns) at lr."""
        branches = [p for p in self.model.branch_parameters() if p.requires_grad]
        backbone = [p for p in self.model.backbone_parameters() if p.requires_grad]
        groups = [{"params": branches, "lr": self.cfg.lr * self.cfg.branch_lr_scale}]
        if backbone:
            groups.append({"params": backbone, "lr": self.cfg.lr})
        return groups

    # -- checkpoints ------------------------------------------------------------

    def save(self, path: Path) -> None:
        self.model.save_checkpoint(
            path, stage_config=asdict(self.cfg), epoch=self.epoch, history=self.history, step_rows=self.step_rows,
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(), loss_state=self.criterion.contrastive.state_dict(),
            rng=rng_states(), finished=self.epoch >= self.cfg.epochs, git_revision=git_revision(),
            run_fingerprint=self.fingerprint, world_size=self.world, image_size=self.cfg.image_size)

    def restore(self, checkpoint: dict[str, Any]) -> None:
        differences = config_differences(checkpoint["stage_config"], self.cfg)
        if differences:
            raise ValueError(f"{self.out_dir} holds a run with other settings {differences} (saved, now); "
                             "use another out dir or delete it to start over")
        self.model.load_state_dict(checkpoint["model_state"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.criterion.contrastive.load_state_dict(checkpoint["loss_state"])
        restore_rng_states(checkpoint["rng"])
        self.epoch, self.history = int(checkpoint["epoch"]), list(checkpoint["history"])
        self.step_rows = list(checkpoint.get("step_rows", []))

    # -- steps ------------------------------------------------------------------

    def _to_device(self, batch: Batch) -> Batch:
        inputs, instance_ids, class_ids = batch
        inputs = inputs.to(self.device, non_blocking=True)
        if self.cfg.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs, instance_ids.to(self.device), class_ids.to(self.device)

    def _loss(self, batch: Batch, update_memory: bool, across_ranks: bool = False) -> tuple[LossParts, torch.Tensor]:
        inputs, instance_ids, class_ids = batch  # images, or stored backbone taps
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            output = self.model.heads(inputs) if self.from_taps else self.model(inputs)
        # The loss runs in fp32 outside autocast: distances of unit vectors near the margin
        # need more than fp16's 3 digits.
        parts = self.criterion(output.embedding, output.logits, instance_ids, class_ids, update_memory, across_ranks)
        return parts, output.logits

    def train_step(self, batch: Batch, step: int) -> tuple[LossParts, dict[str, torch.Tensor]]:
        """One optimizer step; under torchrun `batch` is this rank's shard of the global batch."""
        parts, _ = self._loss(self._to_device(batch), update_memory=True, across_ranks=True)
        total = float(parts.total.detach())  # one host sync per step, needed to stop at once
        if not math.isfinite(total):
            raise FloatingPointError(f"{self.cfg.stage} stage: non-finite loss {total} at epoch {self.epoch + 1}, "
                                     f"step {step + 1} (contrastive {float(parts.contrastive.detach())}, "
                                     f"cross-entropy {float(parts.cross_entropy.detach())}); lower the lr or check the inputs")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(parts.total).backward()
        distributed.sum_gradients(self.model.parameters())  # each rank holds its share of the gradient
        self.scaler.step(self.optimizer)
        self.scaler.update()
        counts = self.criterion.contrastive.last_counts
        self.step_rows.append({"step": len(self.step_rows) + 1, "epoch": self.epoch + 1,
                               "lr": self.optimizer.param_groups[-1]["lr"], "total": total,
                               "contrastive": parts.contrastive.detach(), "cross_entropy": parts.cross_entropy.detach(),
                               "koleo": parts.koleo.detach(), **counts})
        self.scheduler.step()
        return parts, counts

    def train_epoch(self, batches: Iterable[Batch], with_progress: Callable[[Iterable], Iterable] = lambda b: b
                    ) -> tuple[EpochMeans, float]:
        self.model.train()
        sums, start = EpochMeans(), time.perf_counter()
        for step, batch in enumerate(with_progress(batches)):
            if self.cfg.max_steps_per_epoch is not None and step >= self.cfg.max_steps_per_epoch:
                break
            parts, counts = self.train_step(batch, step)
            sums.add(parts, counts)
            sums.images += len(batch[0]) * self.world
        if not sums.steps:
            raise ValueError(f"epoch {self.epoch + 1} yielded no training batches")
        return sums, time.perf_counter() - start

    @torch.no_grad()
    def validate(self, batches: Iterable[Batch]) -> EpochMeans:
        """Scores against the batch + the training memory; adds nothing to the memory."""
        self.model.eval()
        sums = EpochMeans()
        for batch in batches:
            batch = self._to_device(batch)
            parts, logits = self._loss(batch, update_memory=False)
            sums.add(parts, self.criterion.contrastive.last_counts)
            sums.correct += int((logits.argmax(dim=1) == batch[2]).sum())
            sums.images += len(batch[0])
        return sums

    def log_row(self, train: EpochMeans, train_seconds: float, val: EpochMeans | None, lr: float,
                wall_seconds: float) -> dict[str, float]:
        row: dict[str, float] = {name: float("nan") for name in LOG_COLUMNS}
        row.update(epoch=self.epoch, lr=lr, train_steps=train.steps, wall_seconds=wall_seconds,
                   images_per_second=train.images / max(train_seconds, 1e-9), **train.means("train"))
        if val is not None and val.steps:
            row.update(val.means("val"), val_class_accuracy=val.correct / val.images)
        return row


def write_log(path: Path, history: list[dict[str, float]], columns: tuple[str, ...] = LOG_COLUMNS) -> None:
    """Rewrite log.csv (or steps.csv) from the checkpointed history (atomically), so the
    log and the last checkpoint always agree, also after a kill and a resume."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def print_header(cfg: StageConfig, model: MTLNet, out_dir: Path, device: torch.device, start_epoch: int) -> None:
    print(f"mtl train  stage={cfg.stage}  git={git_revision()}  device={device}  out={out_dir}  "
          f"processes={distributed.world_size()}", flush=True)
    for key, value in sorted(asdict(cfg).items()):
        print(f"  {key}: {value}")
    for key, value in sorted(model.config.to_dict().items()):
        print(f"  model.{key}: {value}")
    if start_epoch:
        print(f"  resuming after epoch {start_epoch} of {cfg.epochs}")
    sys.stdout.flush()


def epoch_line(stage: str, epochs: int, row: dict[str, float]) -> str:
    return (f"[{stage}] epoch {int(row['epoch'])}/{epochs}  train {row['train_total']:.4f} "
            f"(contrastive {row['train_contrastive']:.4f}, ce {row['train_cross_entropy']:.4f})  "
            f"val {row['val_total']:.4f}  val_acc {row['val_class_accuracy']:.3f}  "
            f"active_neg {row['train_active_negatives']:.0f}/{row['train_negatives_compared']:.0f}  "
            f"lr {row['lr']:.2e}  {row['images_per_second']:.1f} img/s  {row['wall_seconds']:.1f} s")


def epoch_progress(batches: Iterable[Batch], cfg: StageConfig, epoch: int) -> Iterable[Batch]:
    """A live bar over one epoch's batches for a person watching (the epoch line says the rest)."""
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    if cfg.max_steps_per_epoch is not None and total is not None:
        total = min(total, cfg.max_steps_per_epoch)
    return progress(batches, total, f"{cfg.stage} {epoch}/{cfg.epochs}", unit="step", lines=0, leave=False)


def _initial_model(model_or_init: MTLNet | str | Path) -> MTLNet:
    if isinstance(model_or_init, MTLNet):
        return model_or_init
    return MTLNet.from_checkpoint(model_or_init)


def train_stage(model_or_init: MTLNet | str | Path, cfg: StageConfig,
                make_train_batches: Callable[[int], Iterable[Batch]],
                make_val_batches: Callable[[], Iterable[Batch]] | None,
                out_dir: str | Path, fingerprint: dict[str, Any] | None = None) -> Path:
    """Train one stage and return the path of its final checkpoint (``out_dir/final.pt``).

    ``model_or_init``: an :class:`MTLNet`, or the path of a checkpoint to start from (the
    ``frozen`` stage's final.pt for ``finetune``).  ``make_train_batches(epoch)``, for
    epoch = 1..epochs, and ``make_val_batches()`` yield ``(images, instance_ids,
    class_ids)``; the same epoch must give the same batches, which (with the restored RNG
    states) makes a resumed run end with the same weights as an uninterrupted one.

    ``fingerprint``: what else determines the result (model config, starting checkpoint,
    data, code), stored in the checkpoints; a finished or interrupted run in ``out_dir``
    is reused only when it matches, never silently returned for other inputs.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last, final = out_dir / "last.pt", out_dir / "final.pt"
    fingerprint = fingerprint or {}
    main_rank = distributed.is_main()  # only rank 0 writes (checkpoints, logs) and prints
    if final.is_file():
        saved = load_checkpoint(final)
        if saved.get("finished") and not config_differences(saved["stage_config"], cfg) \
                and saved.get("run_fingerprint", {}) == fingerprint:
            if main_rank:
                print(f"[{cfg.stage}] {final} is complete; nothing to do")
            return final

    steps_per_epoch = len(make_train_batches(1))
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    run = StageRun(_initial_model(model_or_init), cfg, out_dir, steps_per_epoch)
    run.fingerprint = fingerprint
    if last.is_file():
        checkpoint = load_checkpoint(last, map_location=run.device)
        if checkpoint.get("run_fingerprint", {}) != fingerprint:
            raise ValueError(f"{last} belongs to a run from another model, starting point or data; "
                             "use another out dir or delete it to start over")
        run.restore(checkpoint)
    else:
        seed_everything(cfg.seed)
    if main_rank:
        print_header(cfg, run.model, out_dir, run.device, run.epoch)

    while run.epoch < cfg.epochs:
        started = time.perf_counter()
        epoch = run.epoch + 1

        def with_progress(batches: Iterable[Batch]) -> Iterable[Batch]:
            return epoch_progress(batches, cfg, epoch) if main_rank else batches

        train, train_seconds = run.train_epoch(make_train_batches(epoch), with_progress)
        val = run.validate(make_val_batches()) if make_val_batches is not None else None
        run.epoch = epoch
        run.step_rows = [plain_row(r) for r in run.step_rows]
        lr = next(r["lr"] for r in run.step_rows if r["epoch"] == epoch)  # at the epoch's first step
        row = run.log_row(train, train_seconds, val, lr, time.perf_counter() - started)
        run.history.append(row)
        if main_rank:
            run.save(last)
            write_logs(out_dir, run)
            print(epoch_line(cfg.stage, cfg.epochs, row), flush=True)

    if main_rank:
        _atomic_copy(last, final)
        write_logs(out_dir, run)
    distributed.barrier()  # every rank returns once final.pt is there
    return final


def plain_row(row: dict[str, Any]) -> dict[str, float]:
    """A step row with its device tensors read out (once per epoch: no sync per step)."""
    return {k: float(v) for k, v in row.items()}


def write_logs(out_dir: Path, run: "StageRun") -> None:
    write_log(out_dir / "log.csv", run.history)
    write_log(out_dir / "steps.csv", run.step_rows, STEP_COLUMNS)


def _atomic_copy(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


# --------------------------------------------------------------------------- CLI: mtl train

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtl train", description="Train one stage of §III-A.")
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    parser.add_argument("--profile", default=None, help="a partial YAML overlaid on --params")
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--out", required=True, help="output folder: last.pt, final.pt, log.csv")
    parser.add_argument("--init", default=None,
                        help="checkpoint to start from (required for finetune: the frozen stage's final.pt)")
    parser.add_argument("--recipe", default=None, help="a recipe of the parameters' `recipes` section "
                        "(e.g. paper); default: the parameters as they are")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set loss.memory_size=0 (repeatable)")
    return parser


def stage_model(params: dict, cfg: StageConfig, init: str | Path | None = None) -> MTLNet:
    """The network a stage starts from: `init` (the frozen stage's checkpoint, which the
    finetune stage needs), or a fresh network with the classes the corpus has, its
    branches initialized from the stage's seed."""
    from mtl.data.batches import class_names_from_manifest  # the data stack is only needed here

    if init is not None:
        return MTLNet.from_checkpoint(init)
    if cfg.stage == "finetune":
        raise ValueError("the finetune stage starts from the frozen stage's checkpoint: pass init")
    classes = tuple(class_names_from_manifest(Path(params["data"]["corpus_dir"]) / "manifest.csv"))
    seed_everything(cfg.seed)
    return MTLNet(ModelConfig.from_dict({**params["model"], "num_classes": len(classes), "class_names": classes}))


def corpus_batches(params: dict, cfg: StageConfig, model: MTLNet
                   ) -> tuple[Callable[[int], Iterable[Batch]], Callable[[], Iterable[Batch]]]:
    """(make_train_batches, make_val_batches) over the corpus of params.yaml, in the
    model's normalization and class order: views of images, or (``source: features``)
    the stored backbone taps of such views (built first when missing or stale)."""
    from mtl.data.batches import make_stage_batches

    corpus_dir = Path(params["data"]["corpus_dir"])
    manifest = training_manifest(params)
    if cfg.source == "features":
        return feature_batches(params, cfg, model)

    def batches_for(split: str, shard: tuple[int, int] = (0, 1)) -> Callable[[int], Iterable[Batch]]:
        return make_stage_batches(manifest, corpus_dir, split, cfg.instances_per_batch, cfg.views_per_instance,
                                  cfg.image_size, model.normalization, cfg.seed, num_workers=cfg.num_workers,
                                  class_names=model.config.class_names, views=cfg.views, shard=shard)

    val_batches = batches_for("val")  # not sharded: every rank validates on all of it
    return batches_for("train", distributed.shard()), lambda: val_batches(0)


def training_manifest(params: dict) -> Path:
    """The manifest a stage trains on: the corpus's, or with ``data.train_pictures`` set,
    a copy whose train split is that seeded subset (`mtl.data.splits.train_subset`; val
    and test rows unchanged), written beside the corpus."""
    from mtl.data.splits import write_train_subset

    data = params["data"]
    manifest = Path(data["corpus_dir"]) / "manifest.csv"
    if data.get("train_pictures") is None:
        return manifest
    out = manifest.parent.parent / "train_subsets" / f"{manifest.parent.name}-{data['train_pictures']}-seed{data['seed']}.csv"
    return write_train_subset(manifest, out, int(data["train_pictures"]), int(data["seed"]))


def feature_batches(params: dict, cfg: StageConfig, model: MTLNet
                    ) -> tuple[Callable[[int], Iterable[Batch]], Callable[[], Iterable[Batch]]]:
    """Stage-1 batches from the feature cache of params ``features`` (mtl.features)."""
    from mtl.features import cache_batches, split_caches

    corpus_dir = Path(params["data"]["corpus_dir"])
    features = params["features"]
    with distributed.main_first():  # rank 0 builds a missing cache, the others then open it
        caches = split_caches(corpus_dir / "manifest.csv", corpus_dir, features["dir"], model,
                              views=features["views"], val_views=cfg.views_per_instance, image_size=cfg.image_size,
                              view_recipe=cfg.views, seed=cfg.seed, batch_size=features["batch_size"],
                              num_workers=cfg.num_workers, device=cfg.device)
    train_cache = caches["train"]
    if params["data"].get("train_pictures") is not None:  # the full split's cache, cut to the subset
        from mtl.data.batches import split_originals

        subset = split_originals(training_manifest(params), corpus_dir, "train")
        train_cache = train_cache.subset([original.id for original in subset])
    train = cache_batches(train_cache, cfg.instances_per_batch, cfg.views_per_instance, cfg.seed, train=True,
                          shard=distributed.shard())
    val = cache_batches(caches["val"], cfg.instances_per_batch, cfg.views_per_instance, cfg.seed, train=False)
    return train, lambda: val(0)


# The modules whose code decides what a stage learns (part of the run fingerprint).
STAGE_CODE = ("train.py", "loss.py", "distributed.py", "model.py", "backbones.py", "features.py", "data/batches.py",
              "data/transforms.py")


def corpus_digest(params: dict, splits: tuple[str, ...] = ("train", "val")) -> str:
    """A digest of the bytes of every image a stage learns or validates on (and its
    manifest row): another JPEG quality or a rebuilt corpus changes it."""
    from mtl.data.batches import read_manifest

    corpus_dir = Path(params["data"]["corpus_dir"])
    digest = hashlib.sha256()
    for row in sorted(read_manifest(training_manifest(params)), key=lambda r: r["id"]):
        if row["split"] in splits:
            digest.update(repr(sorted(row.items())).encode())
            digest.update((corpus_dir / row["path"]).read_bytes())
    return digest.hexdigest()[:16]


def run_fingerprint(params: dict, cfg: StageConfig, model: MTLNet, init: str | Path | None) -> dict[str, Any]:
    """Everything besides the stage settings that changes what a run learns: the model
    config, the starting checkpoint, the images, the feature cache's settings, and the
    code of the stage."""
    package = Path(__file__).parent
    code = hashlib.sha256(b"".join((package / name).read_bytes() for name in STAGE_CODE)).hexdigest()[:16]
    return {"model_config": model.config.to_dict(), "init": file_digest(init) if init is not None else None,
            "corpus": corpus_digest(params), "code": code,
            "features": params["features"] if cfg.source == "features" else None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mtl.params import load_params, recipe_params

    params = load_params(args.params, args.set, args.profile)
    if args.recipe:
        params = recipe_params(params, args.recipe)
    cfg = StageConfig.from_params(params, args.stage)
    if args.stage == "finetune" and args.init is None:
        raise SystemExit("mtl train: --stage finetune needs --init (the frozen stage's final.pt)")
    distributed.init_from_env(cfg.distributed_backend)  # torchrun: join the other processes
    try:
        model = stage_model(params, cfg, args.init)
        train_stage(model, cfg, *corpus_batches(params, cfg, model), args.out,
                    fingerprint=run_fingerprint(params, cfg, model, args.init))
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
