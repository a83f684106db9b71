"""What a training run leaves in its folder and prints: ``log.csv`` (one row per epoch)
and ``steps.csv`` (one row per optimizer step), both rewritten from the checkpointed
history; the header and one line per epoch; ``run.json``, the fingerprint that lets the
pipeline resume a folder only for the same run; and a summary of a log."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mtl import distributed
from mtl.io import UserError, atomic_path, is_temp_of, some_names, write_json
from mtl.model import MTLNet
from mtl.runtime import git_revision
from mtl.training.config import StageConfig

LOG_COLUMNS = (
    "epoch",
    "train_contrastive", "train_cross_entropy", "train_koleo", "train_distill", "train_total",
    "val_contrastive", "val_cross_entropy", "val_koleo", "val_distill", "val_total", "val_class_accuracy",
    "train_positive_pairs", "train_negatives_compared", "train_active_negatives",
    "val_positive_pairs", "val_negatives_compared", "val_active_negatives",
    "lr", "train_steps", "images_per_second", "wall_seconds",
)
PAIR_COUNTS = ("positive_pairs", "negatives_compared", "active_negatives")
# One row per optimizer step (steps.csv): how the loss and its active pairs evolve.
STEP_COLUMNS = ("step", "epoch", "lr", "total", "contrastive", "cross_entropy", "koleo", "distill", *PAIR_COUNTS)
# What a training run writes in its folder (besides temporary files of these).
RUN_FILES = ("run.json", "last.pt", "final.pt", "log.csv", "steps.csv")


# --------------------------------------------------------------------------- logs

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


def plain_row(row: dict[str, Any]) -> dict[str, float]:
    """A step row with its device tensors read out (once per epoch: no sync per step)."""
    return {k: float(v) for k, v in row.items()}


def write_logs(out_dir: Path, history: list[dict[str, float]], step_rows: list[dict[str, float]]) -> None:
    write_log(out_dir / "log.csv", history)
    write_log(out_dir / "steps.csv", step_rows, STEP_COLUMNS)


def summarize_log(log: pd.DataFrame) -> dict:
    """Headline numbers of a training log (LOG_COLUMNS): its last epoch, the
    first epoch's losses, the mean throughput and the share of active negatives."""
    last, first = log.iloc[-1], log.iloc[0]
    summary = {"epochs": int(last["epoch"]), "steps": int(log["train_steps"].sum()),
               "images_per_second": float(log["images_per_second"].mean()),
               "wall_seconds": float(log["wall_seconds"].sum())}
    for column in ("train_total", "val_total", "train_contrastive", "val_contrastive", "train_cross_entropy",
                   "val_cross_entropy", "val_class_accuracy"):
        summary[f"final_{column}"] = float(last[column])
    for column in ("train_total", "train_contrastive"):
        summary[f"first_{column}"] = float(first[column])
    for column in ("train_negatives_compared", "train_active_negatives", "train_positive_pairs"):
        summary[f"mean_{column}"] = float(log[column].mean())
    summary["active_share_first_epoch"] = float(first["train_active_negatives"] / max(first["train_negatives_compared"], 1))
    summary["active_share_last_epoch"] = float(last["train_active_negatives"] / max(last["train_negatives_compared"], 1))
    return summary


# --------------------------------------------------------------------------- the run folder

def is_run_file(path: Path) -> bool:
    return path.is_file() and any(path.name == name or is_temp_of(path.name, name) for name in RUN_FILES)


def read_run_marker(marker: Path) -> Any:
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def prepare_run_dir(out_dir: Path, fingerprint: dict) -> None:
    """Keep a run folder only for the same settings and starting point.

    DVC re-runs a stage when its parameters or inputs change; checkpoints are
    `persist`ed so that an *interrupted* run resumes.  A folder left by other
    settings, another corpus, other code or another stage-1 checkpoint must not
    be resumed: its run files are removed.  A folder is a run's when its
    `run.json` (written here, before training starts) is there and it holds
    nothing but RUN_FILES; any other folder is refused, untouched."""
    marker = out_dir / "run.json"
    fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back: lists, not tuples
    if marker.is_file() and read_run_marker(marker) == fingerprint:
        return
    if out_dir.is_dir() and any(out_dir.iterdir()):
        foreign = [p.name for p in sorted(out_dir.iterdir()) if not is_run_file(p)]
        if foreign or not marker.is_file():
            raise UserError(f"{out_dir} holds files a training run did not make "
                            f"({some_names(out_dir, foreign or None)}): choose a new or empty folder as out_dir")
        print(f"{out_dir}: settings changed since the last run; starting this stage over")
        for path in out_dir.iterdir():
            path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, fingerprint)
