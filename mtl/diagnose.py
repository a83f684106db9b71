"""Why training did or did not move the model: three recorded measurements.

1. BatchNorm in stage 2 (:func:`batchnorm_drift`): stage 2 from the stage-1 checkpoint
   with the learning rate at 0, once with the backbone's BatchNorm in train mode and once
   in eval mode.  With lr 0 no weight moves: whatever changes is the running statistics.
2. Active negatives (:func:`active_negatives`): the share of compared negatives inside
   the margin at every step, for several margins and memory sizes (short stage-1 runs
   from the feature cache), with each run's val μAP.  A negative outside the margin
   contributes nothing, so a margin that leaves almost none active trains only the
   positive term, and the memory's extra negatives change nothing.
3. Memory staleness (:func:`memory_staleness`): during a stage-1 run, how old (in steps)
   the stored entries are when they are compared, and how far they have drifted from
   what the current model makes of the same stored view (1 − cosine).

`python -m mtl.diagnose` (and the `diagnose` pipeline stage) runs all three and writes
results/diagnose/{batchnorm,active_negatives,active_summary,staleness}.csv and a figure.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mtl import plots
from mtl.eval.evaluation import EvalConfig, checkpoint_scores
from mtl.params import load_params, recipe_params
from mtl.training.config import StageConfig
from mtl.training.loop import StageRun, train_stage
from mtl.training.stage import corpus_batches, feature_batches, stage_model

RESULTS = Path("results") / "diagnose"


def _val_scores(checkpoint: Path, params: dict) -> dict[str, float]:
    scores = checkpoint_scores(checkpoint, params["evalset"]["dir"], "val", EvalConfig.from_params(params["eval"]))
    return {f"{kind}_{key}": value for kind, values in scores.items() for key, value in values.items()}


# --------------------------------------------------------------------------- 1. BatchNorm

def batchnorm_drift(params: dict, init: Path, steps: int, work_dir: Path) -> pd.DataFrame:
    """Val scores of the stage-1 model, and after `steps` stage-2 steps at lr 0 with the
    backbone's BatchNorm in train mode and in eval mode."""
    rows = [{"run": "stage-1 checkpoint", "bn": "-", "steps": 0, **_val_scores(init, params)}]
    base = StageConfig.from_params(params, "finetune")
    for policy in ("train", "frozen"):
        cfg = replace(base, lr=0.0, epochs=1, max_steps_per_epoch=steps, bn=policy, warmup_steps=0)
        out_dir = work_dir / f"bn_{policy}"
        shutil.rmtree(out_dir, ignore_errors=True)
        model = stage_model(params, cfg, init)
        final = train_stage(model, cfg, *corpus_batches(params, cfg, model), out_dir)
        rows.append({"run": f"stage 2, lr 0, BatchNorm {policy}", "bn": policy, "steps": steps,
                     **_val_scores(final, params)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- 2. active negatives

def active_negatives(params: dict, margins: list[float], memory_sizes: list[int], epochs: int,
                     work_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Short stage-1 runs from the feature cache: every margin at the largest memory,
    every memory size at the recipe's margin.  Returns (per-step shares, per-run summary)."""
    base = StageConfig.from_params(params, "frozen")
    runs = [(m, max(memory_sizes)) for m in margins]
    runs += [(base.margin, size) for size in memory_sizes if (base.margin, size) not in runs]
    steps, summary = [], []
    for margin, memory in runs:
        cfg = replace(base, margin=margin, memory_size=memory, epochs=epochs, source="features")
        out_dir = work_dir / f"margin{margin}_memory{memory}"
        shutil.rmtree(out_dir, ignore_errors=True)
        model = stage_model(params, cfg)
        final = train_stage(model, cfg, *feature_batches(params, cfg, model), out_dir)
        log = pd.read_csv(out_dir / "steps.csv")
        log["active_share"] = log["active_negatives"] / log["negatives_compared"].clip(lower=1)
        steps.append(log.assign(margin=margin, memory_size=memory))
        first, last = log[log["epoch"] == 1], log[log["epoch"] == log["epoch"].max()]
        scores = _val_scores(final, params)
        summary.append({"margin": margin, "memory_size": memory,
                        "active_share_first_epoch": first["active_share"].mean(),
                        "active_share_last_epoch": last["active_share"].mean(),
                        "active_per_step_last_epoch": last["active_negatives"].mean(),
                        "compared_per_step": log["negatives_compared"].iloc[-1],
                        "val_muap": scores["mtl_muap"], "val_acc_at_1": scores["mtl_acc_at_1"]})
    return pd.concat(steps, ignore_index=True), pd.DataFrame(summary)


# --------------------------------------------------------------------------- 3. staleness

@torch.no_grad()
def _current_embeddings(run: StageRun, epoch_batches, rows: np.ndarray, chunk: int = 2048) -> torch.Tensor:
    was_training = run.model.training
    run.model.eval()
    out = [run.model.heads(epoch_batches.load(rows[i:i + chunk])[0].to(run.device)).embedding
           for i in range(0, len(rows), chunk)]
    run.model.train(was_training)
    return torch.cat(out)


def memory_staleness(params: dict, epochs: int, every: int, work_dir: Path) -> pd.DataFrame:
    """Age and drift of the memory's entries over a stage-1 run of the recipe (from the
    feature cache), measured every `every` steps; see the module docstring."""
    cfg = replace(StageConfig.from_params(params, "frozen"), epochs=epochs, source="features")
    model = stage_model(params, cfg)
    make_train, _ = feature_batches(params, cfg, model)
    run = StageRun(model, cfg, work_dir, len(make_train(1)))
    loss = run.criterion.contrastive
    if loss.memory_size == 0:
        raise ValueError("memory staleness needs a memory: the recipe has memory_size 0")
    slot_row = np.zeros(loss.memory_size, dtype=np.int64)
    slot_step = np.zeros(loss.memory_size, dtype=np.int64)
    rows_out, step = [], 0
    run.model.train()
    for epoch in range(1, epochs + 1):
        batches = make_train(epoch)
        for keys in batches.keys():
            batch_rows = batches.rows(keys)
            slots = (int(loss.write_pointer) + np.arange(len(batch_rows))) % loss.memory_size
            slot_row[slots], slot_step[slots] = batch_rows, step
            run.epoch = epoch - 1
            run.train_step(batches.load(batch_rows), step)
            step += 1
            if step % every:
                continue
            filled = loss.stored
            stored = loss.memory_embeddings[:filled]
            drift = 1.0 - (stored * _current_embeddings(run, batches, slot_row[:filled])).sum(dim=1)
            ages = step - 1 - slot_step[:filled]
            active = _active_columns(run, batches.load(batch_rows), filled)
            rows_out.append({"step": step, "epoch": epoch, "stored": filled, "mean_age": ages.mean(),
                             "max_age": ages.max(), "mean_age_active": ages[active].mean() if active.any() else np.nan,
                             "mean_drift": float(drift.mean()),
                             "mean_drift_active": float(drift[torch.from_numpy(active)].mean()) if active.any()
                             else np.nan, "active_entries": int(active.sum())})
    return pd.DataFrame(rows_out)


@torch.no_grad()
def _active_columns(run: StageRun, batch, filled: int) -> np.ndarray:
    """Which stored entries are an active negative of some anchor of `batch` now."""
    inputs, labels, _ = run._to_device(batch)
    was_training = run.model.training
    run.model.eval()
    anchors = run.model.heads(inputs).embedding.float()
    run.model.train(was_training)
    loss = run.criterion.contrastive
    distance = torch.cdist(anchors, loss.memory_embeddings[:filled])
    negative = labels[:, None] != loss.memory_labels[:filled][None, :]
    return ((distance < loss.margin) & negative).any(dim=0).cpu().numpy()


# --------------------------------------------------------------------------- the stage

def diagnose(params: dict, init: Path, results_dir: Path = RESULTS, work_dir: Path = Path("models") / "diagnose",
             ) -> dict[str, pd.DataFrame]:
    """All three measurements with the settings of params ``diagnose``; CSVs and a figure."""
    cfg = params["diagnose"]
    results_dir.mkdir(parents=True, exist_ok=True)
    tables = {"batchnorm": batchnorm_drift(params, init, cfg["bn_steps"], work_dir)}
    tables["active_negatives"], tables["active_summary"] = active_negatives(
        params, cfg["margins"], cfg["memory_sizes"], cfg["epochs"], work_dir)
    tables["staleness"] = memory_staleness(params, cfg["epochs"], cfg["staleness_every"], work_dir)
    for name, table in tables.items():
        table.to_csv(results_dir / f"{name}.csv", index=False)
    plots.diagnosis(tables["active_negatives"], tables["staleness"], results_dir / "diagnosis.png")
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtl.diagnose", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--recipe", default="best", help="the recipe whose settings the short runs use")
    parser.add_argument("--init", default="models/paper/frozen/final.pt",
                        help="the stage-1 checkpoint stage 2 starts from in the BatchNorm measurement")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    params = recipe_params(load_params(args.params, args.set), args.recipe)
    tables = diagnose(params, Path(args.init))
    for name in ("batchnorm", "active_summary"):
        print(tables[name].to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
