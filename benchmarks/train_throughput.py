"""Trainer throughput vs a bare forward + backward, and the loss's share of a step.

Side by side in one process, on synthetic tensors, same model, batch and image size:

- bare:    model(x) -> (embedding.sum() + logits.sum()).backward(), nothing else;
- trainer: the loop `train_stage` runs (``StageRun.train_epoch``): device transfer,
           channels_last, autocast (CUDA), the multi-task loss with a *full* cross-batch
           memory, the non-finite check, backward, AdamW step.

Repetitions alternate bare step / trainer step / loss call, so that load from other
processes hits all alike; medians are reported.  Goals: trainer / bare >= 0.9; loss (forward + backward with
10,240 stored entries) <= 5 % of a trainer step; also timed in its worst case, every
negative inside the margin.

    python benchmarks/train_throughput.py [--stages frozen finetune] [--steps 1] [--reps 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from mtl.loss import CrossBatchContrastiveLoss
from mtl.model import MTLNet, ModelConfig
from mtl.params import load_params
from mtl.runtime import resolve_device
from mtl.training.config import StageConfig
from mtl.training.loop import StageRun


# time.perf_counter (wall) by default; time.process_time (CPU seconds of this process)
# with --clock cpu, which on a machine shared with other jobs counts only our own work
# (meaningful with --threads 1, where no thread spins waiting for another).
clock = time.perf_counter


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(cfg: StageConfig, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=generator)
    instance_ids = torch.arange(cfg.instances_per_batch).repeat_interleave(cfg.views_per_instance)
    return images, instance_ids, instance_ids % num_classes


def fill_memory(loss: CrossBatchContrastiveLoss, bunched: bool = False) -> None:
    """Start from a full memory: the steady state of a long run (10,240 negatives).
    ``bunched``: all entries near one direction, so every negative is inside the margin
    (the worst case, as with a fresh embedding branch)."""
    device = loss.memory_embeddings.device
    loss.load_state_dict({"memory_embeddings": unit_rows(loss.memory_size, loss.embed_dim, bunched, device),
                          "memory_labels": torch.arange(loss.memory_size, device=device) + 1_000_000,  # never positives
                          "write_pointer": torch.zeros((), dtype=torch.long, device=device),
                          "filled": torch.tensor(loss.memory_size, device=device)})


def unit_rows(rows: int, dim: int, bunched: bool, device: torch.device) -> torch.Tensor:
    noise = torch.randn(rows, dim, device=device)
    if bunched:
        noise = torch.ones(1, dim, device=device) / dim**0.5 + 0.01 * noise
    return torch.nn.functional.normalize(noise, dim=1)


def time_bare(run: StageRun, batch, steps: int) -> float:
    """Seconds per step of a plain forward + backward of the same (prepared) model."""
    model, device = run.model, run.device
    images = batch[0].to(device)
    if run.cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    model.train()
    synchronize(device)
    start = clock()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp):
            output = model(images)
        (output.embedding.float().sum() + output.logits.float().sum()).backward()
    synchronize(device)
    return (clock() - start) / steps


def time_trainer(run: StageRun, batch, steps: int) -> float:
    """Seconds per step of the trainer's own loop over `steps` copies of the batch."""
    fill_memory(run.criterion.contrastive)
    synchronize(run.device)
    start = clock()
    run.train_epoch([batch] * steps)
    synchronize(run.device)
    return (clock() - start) / steps


def time_loss(run: StageRun, bunched: bool = False) -> float:
    """Seconds of the contrastive loss's forward + backward against a full memory."""
    loss_fn = run.criterion.contrastive
    fill_memory(loss_fn, bunched)
    cfg, device = run.cfg, run.device
    labels = torch.arange(cfg.instances_per_batch, device=device).repeat_interleave(cfg.views_per_instance)
    embeddings = unit_rows(cfg.batch_size, loss_fn.embed_dim, bunched, device).requires_grad_()
    synchronize(device)
    start = clock()
    loss_fn(embeddings, labels).backward()
    synchronize(device)
    return clock() - start


def benchmark_stage(stage: str, args: argparse.Namespace) -> dict[str, float]:
    cfg = replace(StageConfig.from_params(load_params(args.params), stage), epochs=1, source="images",
                  instances_per_batch=args.instances, views_per_instance=args.views, image_size=args.image_size,
                  device=args.device, memory_size=args.memory_size, channels_last=not args.no_channels_last)
    torch.manual_seed(0)
    model = MTLNet(ModelConfig(backbone=args.backbone, pretrained=False))
    run = StageRun(model, cfg, Path(tempfile.mkdtemp()), steps_per_epoch=args.reps * args.steps + 10)
    batch = synthetic_batch(cfg, model.config.num_classes)
    for _ in range(2):  # warm-up: allocator, kernels, autotuning
        time_bare(run, batch, 1), time_trainer(run, batch, 1), time_loss(run), time_loss(run, bunched=True)
    # Interleaved at the finest grain (bare step, trainer step, loss call, repeat), so that
    # load from other processes falls on all three alike; medians drop the outliers.
    bare, trainer, loss, worst_loss = [], [], [], []
    for _ in range(args.reps):
        bare.append(time_bare(run, batch, args.steps))
        trainer.append(time_trainer(run, batch, args.steps))
        loss.append(time_loss(run))
        worst_loss.append(time_loss(run, bunched=True))
    bare_step, trainer_step, loss_step, worst_step = (statistics.median(t) for t in (bare, trainer, loss, worst_loss))
    return {
        "bare_img_s": cfg.batch_size / bare_step,
        "trainer_img_s": cfg.batch_size / trainer_step,
        "ratio": bare_step / trainer_step,
        "loss_ms": 1000 * loss_step,
        "step_ms": 1000 * trainer_step,
        "loss_share": loss_step / trainer_step,
        "worst_loss_ms": 1000 * worst_step,
        "worst_loss_share": worst_step / trainer_step,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="the stage settings not given here")
    parser.add_argument("--stages", nargs="+", default=["frozen", "finetune"], choices=["frozen", "finetune"])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--memory-size", type=int, default=10240)
    parser.add_argument("--steps", type=int, default=1, help="steps per timed repetition")
    parser.add_argument("--reps", type=int, default=15, help="alternating repetitions (median reported)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu = this process's CPU seconds (use with --threads 1 on a shared machine)")
    parser.add_argument("--no-channels-last", action="store_true")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if device.type == "cuda":
            parser.error("--clock cpu cannot time GPU work; use the default wall clock")
        global clock
        clock = time.process_time
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} backbone={args.backbone} "
          f"batch={args.instances}x{args.views} image={args.image_size}px memory={args.memory_size} "
          f"steps={args.steps} reps={args.reps} clock={args.clock}")
    print(f"{'stage':<9} {'bare img/s':>10} {'trainer img/s':>13} {'ratio':>6} {'step ms':>8} {'loss ms':>8} "
          f"{'loss share':>10} {'all-active loss ms':>18} {'share':>6}")
    for stage in args.stages:
        r = benchmark_stage(stage, args)
        print(f"{stage:<9} {r['bare_img_s']:>10.1f} {r['trainer_img_s']:>13.1f} {r['ratio']:>6.3f} "
              f"{r['step_ms']:>8.1f} {r['loss_ms']:>8.2f} {100 * r['loss_share']:>9.2f}% "
              f"{r['worst_loss_ms']:>18.2f} {100 * r['worst_loss_share']:>5.1f}%", flush=True)
    print("goals: ratio >= 0.9 (trainer vs bare forward+backward); loss share <= 5 % of a step\n"
          "(loss: random unit vectors, few negatives inside the margin; all-active: every one of the\n"
          " 10,240 x batch negatives inside the margin, the worst case, e.g. a fresh embedding branch)")


if __name__ == "__main__":
    main()
