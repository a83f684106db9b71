"""The training loop of the two stages of §III-A.

- ``frozen``: the backbone is frozen (no gradients, BatchNorm in eval mode, so its
  weights and running statistics stay bit-identical); only the two branches learn.
- ``finetune``: the whole network learns, starting from the ``frozen`` checkpoint.

Both minimize the multi-task objective of :mod:`mtl.objective` (cross-batch contrastive
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

A memory shorter than an epoch (README "The cross-batch memory at scale") can be kept
from collapsing the embedding by settings of the ``loss`` section: a momentum (EMA) copy
of the network that fills the memory (``memory_momentum``, MoCo), a memory that holds
only the current batch for the first steps (``memory_warmup_steps``, XBM), stored views
embedded again by the current model every few hundred steps (``memory_refresh_steps``,
from stored taps), the mean over every compared negative (``negative_reduction: all``)
and a bank of each picture's last view (``memory_positives``, in mtl.loss).

Several processes (``torchrun --nproc-per-node N -m mtl.train ...``, :mod:`mtl.distributed`):
each takes a contiguous K/N instances x V views of every global K x V batch, the loss
sees the whole global batch and every rank's memory stores every rank's entries, the
gradients are summed over ranks and BatchNorm layers that learn use global-batch
statistics, so a step equals the single-process step on the same batch (to float
rounding).  Only rank 0 writes checkpoints and logs; every rank resumes from them.
Validation is not sharded: every rank scores the whole (small) val split alike.
"""

from __future__ import annotations

import copy
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from mtl import distributed
from mtl.backbones import forward_head, forward_tap
from mtl.data.batches import Batch
from mtl.io import atomic_path
from mtl.loss import CrossBatchContrastiveLoss
from mtl.objective import LossParts, MultiTaskLoss
from mtl.model import MTLNet, load_checkpoint
from mtl.runtime import git_revision, progress, resolve_device, seed_everything
from mtl.training.config import StageConfig, config_differences
from mtl.training.outputs import LOG_COLUMNS, epoch_line, plain_row, print_header, write_logs


# --------------------------------------------------------------------------- RNG states

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
                  "distill": _zero_if_none(parts.distill, parts.total),
                  **{k: v.float() for k, v in counts.items()}}
        self.sums = values if self.sums is None else {k: self.sums[k] + v for k, v in values.items()}
        self.steps += 1

    def means(self, prefix: str) -> dict[str, float]:
        if not self.steps:
            return {}
        return {f"{prefix}_{k}": float(v) / self.steps for k, v in (self.sums or {}).items()}


def _zero_if_none(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like).detach() if value is None else value.detach()


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
        contrastive = CrossBatchContrastiveLoss(cfg.margin, cfg.memory_size, model.config.embed_dim,
                                                cfg.negative_reduction, cfg.memory_positives)
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
        # The momentum encoder: an EMA copy of the network whose outputs fill the memory.
        self.key_model = None
        if cfg.memory_momentum > 0 and cfg.memory_size > 0:
            self.key_model = copy.deepcopy(self.model).requires_grad_(False)
        # The stored taps of the memory's entries, to embed them again (from the cache only).
        self.memory_inputs: torch.Tensor | None = None
        # Stage 2's distillation: the backbone as the stage starts (ImageNet's after stage 1),
        # frozen, whose pooled output the learning backbone is kept close to.
        self.teacher = None
        if cfg.lambda_distill > 0 and not self.from_taps:
            self.teacher = copy.deepcopy(self.model.backbone).requires_grad_(False).eval()

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
            key_model_state=None if self.key_model is None else self.key_model.state_dict(),
            memory_inputs=self.memory_inputs,
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
        if self.key_model is not None:
            self.key_model.load_state_dict(checkpoint["key_model_state"])
        self.memory_inputs = checkpoint.get("memory_inputs")
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

    def _forward(self, model: MTLNet, inputs: torch.Tensor):
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            return model.heads(inputs) if self.from_taps else model(inputs)

    def _loss(self, batch: Batch, update_memory: bool, across_ranks: bool = False) -> tuple[LossParts, torch.Tensor]:
        inputs, instance_ids, class_ids = batch  # images, or stored backbone taps
        distance = None
        if self.teacher is not None:
            output, distance = self._forward_distilled(inputs)
        else:
            output = self._forward(self.model, inputs)
        keys = None
        if update_memory and self.key_model is not None:
            with torch.no_grad():
                self.key_model.train(self.model.training)
                keys = self._forward(self.key_model, inputs).embedding
        # The loss runs in fp32 outside autocast: distances of unit vectors near the margin
        # need more than fp16's 3 digits.
        parts = self.criterion(output.embedding, output.logits, instance_ids, class_ids, update_memory, across_ranks,
                               keys)
        if distance is not None:
            parts = parts.with_distillation(distance, self.cfg.lambda_distill)
        return parts, output.logits

    def _forward_distilled(self, images: torch.Tensor):
        """The branches' output and 1 - cos between the learning backbone's pooled 1280-d
        output and the frozen teacher's, from one pass of each (the tap is shared)."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            tap = forward_tap(self.model.backbone, images)
            output = self.model.heads(tap)
            student = forward_head(self.model.backbone, tap)
            with torch.no_grad():
                teacher = forward_head(self.teacher, forward_tap(self.teacher, images))
        cosine = torch.nn.functional.cosine_similarity(student.float(), teacher.float(), dim=1)
        return output, (1.0 - cosine).mean()

    # -- the memory at scale (see the module docstring) ---------------------------

    def _before_step(self, batch: Batch, step: int) -> None:
        """The memory's warm-up (only the current batch while it lasts), and the taps of the
        entries this step stores (for refreshing them later)."""
        loss = self.criterion.contrastive
        if not loss.memory_size:
            return
        if step < self.cfg.memory_warmup_steps:
            loss.reset_memory()
        if self.cfg.memory_refresh_steps and self.from_taps:
            inputs = batch[0]
            if self.world > 1:
                inputs = distributed.gather_rows(inputs.to(self.device)).cpu()
            if self.memory_inputs is None:
                self.memory_inputs = torch.zeros((loss.memory_size, *inputs.shape[1:]), dtype=torch.float16)
            slots = (int(loss.write_pointer) + torch.arange(len(inputs))) % loss.memory_size
            self.memory_inputs[slots] = inputs.detach().to("cpu", torch.float16)

    @torch.no_grad()
    def _after_step(self, step: int) -> None:
        """The momentum encoder follows the network; the memory is embedded again when due."""
        if self.key_model is not None:
            m = self.cfg.memory_momentum
            for key, value in zip(self.key_model.parameters(), self.model.parameters()):
                key.mul_(m).add_(value.detach(), alpha=1.0 - m)
            for key, value in zip(self.key_model.buffers(), self.model.buffers()):
                key.copy_(value)
        every = self.cfg.memory_refresh_steps
        if every and self.from_taps and self.memory_inputs is not None and (step + 1) % every == 0:
            self.refresh_memory()

    @torch.no_grad()
    def refresh_memory(self, chunk: int = 1024) -> None:
        """Every stored entry embedded again, from its stored taps, by the current network
        (the momentum encoder when there is one), in eval mode."""
        loss = self.criterion.contrastive
        model = self.key_model if self.key_model is not None else self.model
        was_training = model.training
        model.eval()
        filled = loss.stored
        for start in range(0, filled, chunk):
            taps = self.memory_inputs[start:min(start + chunk, filled)].to(self.device, torch.float32)
            loss.memory_embeddings[start:start + len(taps)] = self._forward(model, taps).embedding.float()
        loss._drop_selection_memory()
        model.train(was_training)

    def train_step(self, batch: Batch, step: int) -> tuple[LossParts, dict[str, torch.Tensor]]:
        """One optimizer step; under torchrun `batch` is this rank's shard of the global batch."""
        global_step = len(self.step_rows)  # over the whole run, resumed or not
        self._before_step(batch, global_step)
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
        self._after_step(global_step)
        counts = self.criterion.contrastive.last_counts
        self.step_rows.append({"step": len(self.step_rows) + 1, "epoch": self.epoch + 1,
                               "lr": self.optimizer.param_groups[-1]["lr"], "total": total,
                               "contrastive": parts.contrastive.detach(), "cross_entropy": parts.cross_entropy.detach(),
                               "koleo": parts.koleo.detach(), "distill": _zero_if_none(parts.distill, parts.total),
                               **counts})
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
            write_logs(out_dir, run.history, run.step_rows)
            print(epoch_line(cfg.stage, cfg.epochs, row), flush=True)

    if main_rank:
        _atomic_copy(last, final)
        write_logs(out_dir, run.history, run.step_rows)
    distributed.barrier()  # every rank returns once final.pt is there
    return final


def _atomic_copy(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
