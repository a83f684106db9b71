"""The paper's cross-batch memory at scale: what a memory shorter than an epoch does to
stage 1, recorded step by step.

The hypothesis under test (README "The cross-batch memory at scale"): with no stored
positive to anchor it, the cloud of current embeddings runs away from the memory's stale
past as a whole and bunches.  At every `every`-th step of a stage-1 run (from the feature
cache), before the step itself, the probe records for the batch's anchors a_i and the
memory's older entries m_j (the batch excluded):

    mean_norm          |mean_i a_i|: 1 when the batch lies in one direction, ~0 when spread
    batch_similarity   mean cosine between anchors of different pictures
    memory_alignment   cos(mean_i a_i, mean_j m_j): where the batch sits against the memory
    active_memory,     negatives inside the margin, from the memory and from the batch
    active_batch
    grad_memory,       the mean gradient norm on an anchor from the memory's negatives and
    grad_batch         from the batch's, each its part of the loss's mean over active terms
    grad_angle         the angle (degrees) between those two gradients, all anchors together

The hypothesis holds if, with the memory, mean_norm and batch_similarity climb from the
run's start over its early steps while the batch points away from the memory's mean
(memory_alignment below 0), and neither happens without the memory; in part if the run
without a memory bunches too, less far.  The bunching is a transient of the early steps,
so the summary keeps their extremes besides their means (EXTREMES).

    python -m mtl.memory_study --profile profiles/full.yaml --set data.train_pictures=5000 \\
        --memory-sizes 10240 0 --out results/memory/probe

writes probe.csv (one row per recorded step and run), summary.csv (each run's start, early
steps and last tenth, and its val scores; scores.json keeps the scores) and probe.png.
`--momenta 0.99` adds a run of the largest memory filled by a momentum encoder (the remedy
that measured best, sweeps/memory.yaml), to see what it changes; `--add` keeps the runs
already in --out that this call does not repeat.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mtl import plots
from mtl.eval.evaluation import EvalConfig, checkpoint_scores
from mtl.params import load_params, recipe_params
from mtl.runtime import progress
from mtl.training.config import StageConfig
from mtl.training.loop import StageRun
from mtl.training.stage import feature_batches, stage_model

PROBE_COLUMNS = ("mean_norm", "batch_similarity", "memory_alignment", "memory_mean_norm", "active_memory",
                 "active_batch", "share_from_memory", "grad_memory", "grad_batch", "grad_angle")


class _FrozenStatistics:
    """BatchNorm layers keep their running statistics during the probe's extra forward."""

    def __init__(self, model: torch.nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.momenta = [m.momentum for m in self.layers]
        for layer in self.layers:
            layer.momentum = 0.0
        return self

    def __exit__(self, *exc):
        for layer, momentum in zip(self.layers, self.momenta):
            layer.momentum = momentum


def probe_step(run: StageRun, batch) -> dict[str, float]:
    """The quantities of the module docstring for one batch, before its step."""
    inputs, labels, _ = run._to_device(batch)
    loss = run.criterion.contrastive
    filled = loss.stored
    old = loss.memory_embeddings[:filled].detach().clone()
    old_labels = loss.memory_labels[:filled].clone()
    with _FrozenStatistics(run.model):
        anchors = F.normalize(run._forward(run.model, inputs).embedding.float(), dim=1)
    margin = loss.margin
    different = labels[:, None] != labels[None, :]
    batch_distance = torch.cdist(anchors, anchors.detach()).clamp_min(1e-12)
    batch_terms = F.relu(margin - batch_distance) * different
    if filled:
        memory_distance = torch.cdist(anchors, old).clamp_min(1e-12)
        memory_terms = F.relu(margin - memory_distance) * (labels[:, None] != old_labels[None, :])
    else:
        memory_terms = anchors.new_zeros((len(anchors), 0))
    active_memory, active_batch = int((memory_terms > 0).sum()), int((batch_terms > 0).sum())
    count = max(active_memory + active_batch, 1)
    grads = {}
    for name, terms in (("memory", memory_terms), ("batch", batch_terms)):
        part = terms.sum() / count
        grads[name] = torch.autograd.grad(part, anchors, retain_graph=True, allow_unused=True)[0] \
            if part.requires_grad else None
        if grads[name] is None:
            grads[name] = torch.zeros_like(anchors)
    gm, gb = grads["memory"].flatten(), grads["batch"].flatten()
    denominator = float(gm.norm() * gb.norm())
    angle = math.degrees(math.acos(max(-1.0, min(1.0, float(gm @ gb) / denominator)))) if denominator > 0 else np.nan
    with torch.no_grad():
        mean = anchors.mean(dim=0)
        cosine = anchors @ anchors.T
        memory_mean = old.mean(dim=0) if filled else None
        return {
            "stored": filled,
            "mean_norm": float(mean.norm()),
            "batch_similarity": float(cosine[different].mean()),
            "memory_alignment": float(F.cosine_similarity(mean, memory_mean, dim=0)) if filled else np.nan,
            "memory_mean_norm": float(memory_mean.norm()) if filled else np.nan,
            "active_memory": active_memory, "active_batch": active_batch,
            "share_from_memory": active_memory / count if active_memory + active_batch else np.nan,
            "grad_memory": float(grads["memory"].norm(dim=1).mean()),
            "grad_batch": float(grads["batch"].norm(dim=1).mean()),
            "grad_angle": angle,
        }


def run_name(memory_size: int, momentum: float = 0.0) -> str:
    """A probe run's key in probe.csv and scores.json: "10240", "0", "10240_m0.99"."""
    return f"{memory_size}_m{momentum:g}" if momentum else str(memory_size)


def run_label(memory_size: int, momentum: float = 0.0) -> str:
    """How tables and plots name a run."""
    if not memory_size:
        return "no memory"
    return f"memory {memory_size:,}" + (f", momentum encoder m={momentum:g}" if momentum else "")


def probe_run(params: dict, memory_size: int, every: int, work_dir: Path,
              epochs: int | None = None, momentum: float = 0.0) -> tuple[pd.DataFrame, Path]:
    """A stage-1 run of the recipe from the feature cache with `memory_size` entries (filled
    by a momentum encoder when `momentum` > 0), probed every `every` steps; returns the
    records and the final checkpoint."""
    cfg = StageConfig.from_params(params, "frozen")
    cfg = replace(cfg, source="features", memory_size=memory_size, memory_momentum=momentum,
                  epochs=epochs or cfg.epochs)
    model = stage_model(params, cfg)
    make_train, _ = feature_batches(params, cfg, model)
    run = StageRun(model, cfg, work_dir, len(make_train(1)))
    rows, step = [], 0
    run.model.train()
    for epoch in range(1, cfg.epochs + 1):
        run.epoch = epoch - 1
        batches = make_train(epoch)
        for batch in progress(batches, len(batches), f"probe {run_label(memory_size, momentum)} epoch "
                              f"{epoch}/{cfg.epochs}", unit="step", lines=0, leave=False):
            if step % every == 0:
                rows.append({"run": run_name(memory_size, momentum), "memory_size": memory_size, "momentum": momentum,
                             "step": step, "epoch": epoch, **probe_step(run, batch)})
            parts, counts = run.train_step(batch, step)
            if step % every == 0:
                rows[-1].update(loss=float(parts.contrastive.detach()), active_negatives=int(counts["active_negatives"]),
                                negatives_compared=int(counts["negatives_compared"]))
            step += 1
    run.epoch = cfg.epochs
    final = work_dir / "final.pt"
    run.save(final)
    return pd.DataFrame(rows), final


# The windows of a run the summary compares: its first record (the untrained branches),
# the early steps (after the first 1 % of the run, up to 10 %: where a bunching shows), and
# its last tenth.
WINDOWS = ("start", "early", "end")
# The bunching and the run from the memory are transients of the early steps: the summary
# also keeps how far they go there (the highest norm and within-batch cosine, the lowest
# cosine to the memory's mean).
EXTREMES = {"mean_norm": "max", "batch_similarity": "max", "memory_alignment": "min"}


def with_run_names(probe: pd.DataFrame) -> pd.DataFrame:
    """Each record's run name and label, from its memory size and momentum (a probe.csv written
    before momentum runs has neither column: its runs had none)."""
    probe = probe.copy()
    probe["momentum"] = probe["momentum"].fillna(0.0) if "momentum" in probe else 0.0
    probe["run"] = [run_name(int(size), float(m)) for size, m in zip(probe["memory_size"], probe["momentum"])]
    probe["label"] = [run_label(int(size), float(m)) for size, m in zip(probe["memory_size"], probe["momentum"])]
    return probe


def summarize(probe: pd.DataFrame, scores: dict[str, dict]) -> pd.DataFrame:
    """Per run: each quantity at its start, over its early steps and over its last tenth
    (WINDOWS), and the run's val scores."""
    rows = []
    for name, run in with_run_names(probe).groupby("run", sort=False):
        steps = int(run["step"].max()) + 1
        windows = {"start": run.head(1),
                   "early": run[(run["step"] >= 0.01 * steps) & (run["step"] < 0.1 * steps)],
                   "end": run[run["step"] >= 0.9 * steps]}
        row = {"run": name, "label": run["label"].iloc[0], "memory_size": int(run["memory_size"].iloc[0]),
               "momentum": float(run["momentum"].iloc[0]), "steps": steps}
        for column in PROBE_COLUMNS:
            for window_name, window in windows.items():
                row[f"{column}_{window_name}"] = window[column].mean()
        for column, extreme in EXTREMES.items():  # a transient the early window's mean blurs
            row[f"{column}_early_{extreme}"] = windows["early"][column].agg(extreme)
        row.update({f"val_{k}": v for k, v in scores.get(name, {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def read_scores(out: Path) -> dict[str, dict]:
    return json.loads((out / "scores.json").read_text()) if (out / "scores.json").is_file() else {}


def resummarize(out: Path) -> pd.DataFrame:
    """summary.csv again from probe.csv, keeping the val scores it holds (scores.json)."""
    summary = summarize(pd.read_csv(out / "probe.csv"), read_scores(out))
    summary.to_csv(out / "summary.csv", index=False)
    return summary


def earlier_records(out: Path, repeated: set[str]) -> tuple[list[pd.DataFrame], dict[str, dict]]:
    """The records and scores already in `out`, less the runs about to run again (--add)."""
    if not (out / "probe.csv").is_file():
        return [], {}
    probe = with_run_names(pd.read_csv(out / "probe.csv"))
    kept = probe[~probe["run"].isin(repeated)]
    return ([kept] if len(kept) else []), {k: v for k, v in read_scores(out).items() if k not in repeated}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtl.memory_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None, help="a profiles/*.yaml overlay")
    parser.add_argument("--recipe", default="best")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--memory-sizes", nargs="*", type=int, default=[10240, 0])
    parser.add_argument("--momenta", nargs="*", type=float, default=[],
                        help="also a run of the largest memory filled by a momentum encoder of each m")
    parser.add_argument("--add", action="store_true", help="keep the runs already in --out that are not repeated")
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's stage-1 epochs")
    parser.add_argument("--every", type=int, default=10, help="steps between records")
    parser.add_argument("--out", default="results/memory/probe")
    parser.add_argument("--models", default="models/memory_probe")
    parser.add_argument("--summarize", action="store_true", help="only summary.csv and probe.png again, from probe.csv")
    args = parser.parse_args(argv)
    if args.summarize:
        out = Path(args.out)
        print(resummarize(out).to_string(index=False))
        plots.memory_probe(with_run_names(pd.read_csv(out / "probe.csv")), out / "probe.png")
        return 0
    params = recipe_params(load_params(args.params, args.set, args.profile), args.recipe)
    out, models = Path(args.out), Path(args.models)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(size, 0.0) for size in args.memory_sizes]
    if args.momenta:
        largest = max(args.memory_sizes or [int(params["loss"]["memory_size"])])
        if largest <= 0:
            raise SystemExit("--momenta needs a memory: give --memory-sizes with one above 0")
        runs += [(largest, m) for m in args.momenta]
    if not runs:
        raise SystemExit("nothing to probe: give --memory-sizes or --momenta")
    records, scores = earlier_records(out, {run_name(*run) for run in runs}) if args.add else ([], {})
    for memory_size, momentum in runs:
        work_dir = models / f"memory{run_name(memory_size, momentum)}"
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
        probe, final = probe_run(params, memory_size, args.every, work_dir, args.epochs, momentum)
        records.append(probe)
        scores[run_name(memory_size, momentum)] = checkpoint_scores(
            final, params["evalset"]["dir"], "val", EvalConfig.from_params(params["eval"]))["mtl"]
        (out / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
        table = with_run_names(pd.concat(records, ignore_index=True))
        table.to_csv(out / "probe.csv", index=False)
        summary = summarize(table, scores)
        summary.to_csv(out / "summary.csv", index=False)
        print(summary.to_string(index=False), flush=True)
    plots.memory_probe(table, out / "probe.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
