"""The training stages of the pipeline: `features` (the stage-1 feature cache,
notebooks/features.ipynb) and `train_frozen` / `train_finetune` of every recipe
(notebooks/train.ipynb).  Each stage writes results/<stage>/metrics.json (with its wall time) and its figures;
`mtl.report` gathers them into results/metrics.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from mtl import plots
from mtl.io import write_csv, write_json
from mtl.runtime import stopwatch
from mtl.training.config import StageConfig
from mtl.training.outputs import summarize_log
from mtl.training.stage import feature_batches, stage_model, step_rates, train_run

RESULTS = Path("results")


def features_stage(params: dict, results_dir: str | Path = RESULTS / "features") -> dict:
    """Build the train and val feature caches the frozen stages learn from (mtl.features),
    and measure stage-1 steps/s from the cache against the image path."""
    cfg = StageConfig.from_params(params, "frozen")
    with stopwatch() as timing:
        feature_batches(params, cfg, stage_model(params, cfg))
    metrics: dict[str, Any] = {"build_wall_seconds": timing["seconds"]}
    for split in ("train", "val"):
        directory = Path(params["features"]["dir"]) / split
        meta = json.loads((directory / "meta.json").read_text())
        metrics[split] = {"images": len(meta["ids"]), "views": meta["views"],
                          "megabytes": round((directory / "taps.npy").stat().st_size / 2**20, 1),
                          "build_seconds": meta["build_seconds"], "views_per_second": meta["views_per_second"]}
    metrics.update(step_rates(params, params["features"]["benchmark_steps"]))
    metrics["wall_seconds"] = round(time.perf_counter() - timing["started"], 2)
    write_json(Path(results_dir) / "metrics.json", metrics)
    return metrics


def train_stage_report(params: dict, run_name: str, stage: str, out_dir: str | Path,
                       init: str | Path | None = None, results_dir: str | Path | None = None) -> dict:
    """Train, then write the log, the loss curves (Fig. 3 / Fig. 4) and the metrics."""
    results_dir = Path(results_dir or RESULTS / run_name)
    final = Path(out_dir) / "final.pt"
    final_before = final.stat().st_mtime_ns if final.is_file() else None
    with stopwatch() as timing:
        train_run(params, stage, out_dir, init)
    # A finished run of the same inputs is reused, not trained again (mtl.training.loop):
    # the timing table then says so instead of setting the old training time beside this run.
    reused = final_before is not None and final.stat().st_mtime_ns == final_before
    log = pd.read_csv(Path(out_dir) / "log.csv")
    write_csv(log, results_dir / "log.csv")
    title = {"frozen": "Stage 1: backbone frozen, branches trained",
             "finetune": "Stage 2: whole network fine-tuned"}[stage]
    memory, margin = int(params["loss"]["memory_size"]), params["loss"]["margin"]
    plots.loss_curves(log, f"{title} (margin {margin}, memory {memory:,})", results_dir / "loss_curves.png")
    metrics = summarize_log(log)
    metrics["memory_size"] = memory
    metrics["stage_wall_seconds"] = timing["seconds"]
    metrics["reused_finished_run"] = reused
    write_json(results_dir / "metrics.json", metrics)
    return metrics
