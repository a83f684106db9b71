"""The learning curve: how far more training pictures take the paper's model.

One recipe (``best``) is trained, both stages (or, with ``stages: frozen`` in the spec,
stage 1 only: a fraction of the time, from the feature cache), on seeded subsets of the corpus's training
pictures (`data.train_pictures`, whole groups, `mtl.data.splits.train_subset`) with the
same epochs, so the same budget per picture, and every point is scored on the same val and
test evaluation sets.  The ImageNet backbone's 1280-d output (the untouched backbone of a
stage-1 checkpoint) is the reference line.

    python -m mtl.learning_curve sweeps/learning_curve.yaml [--profile profiles/full.yaml]
    make learning-curve PROFILE=full

Outputs in ``results/learning_curve/``: ``table.csv`` (train_pictures, muap_val,
muap_test, acc1_test, recall_at_p90_test, stages, wall_seconds; written after every point, so a
stopped run keeps what it finished), ``baseline.json`` and ``learning_curve.png``.
Models go to ``models/learning_curve/<points>/``; a point interrupted mid-stage resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import yaml

from mtl import plots
from mtl.data.manifest import read_manifest
from mtl.eval.evaluation import EvalConfig, checkpoint_scores
from mtl.params import load_params, read_yaml, recipe_params, set_dotted
from mtl.sweep import STAGE_PLANS as SWEEP_STAGE_PLANS, run_notebook
from mtl.training.stage import training_manifest

COLUMNS = ("train_pictures", "muap_val", "muap_test", "acc1_test", "recall_at_p90_test", "stages", "wall_seconds")
# Every point trains from scratch, so stage 2 alone (which needs a stage-1 start) is no plan here.
STAGE_PLANS = {name: SWEEP_STAGE_PLANS[name] for name in ("both", "frozen")}
OUT = Path("results") / "learning_curve"
MODELS = Path("models") / "learning_curve"

# runner(recipe, run_name, stage, out_dir, init, overrides, params_path) -> None: trains one stage.
Runner = Callable[[str, str, str, Path, Path | None, list[str], str], None]


def papermill_runner(recipe: str, run_name: str, stage: str, out_dir: Path, init: Path | None,
                     overrides: list[str], params_path: str) -> None:
    """Train one stage by executing notebooks/train.ipynb (as the pipeline does)."""
    run_notebook(recipe, run_name, stage, out_dir, init, overrides, params_path,
                 Path("results") / "notebooks" / "learning_curve")


def load_spec(path: str | Path) -> dict:
    spec = read_yaml(path)
    points = spec.get("train_pictures")
    if not points or not all(p is None or (isinstance(p, int) and p > 0) for p in points):
        raise ValueError(f"{path}: train_pictures must list positive integers (and null for all)")
    stages = spec.get("stages", "both")
    if stages not in STAGE_PLANS:
        raise ValueError(f"{path}: stages must be one of {sorted(STAGE_PLANS)}, got {stages!r}")
    return {"recipe": spec.get("recipe", "best"), "train_pictures": list(points), "stages": stages}


def count_train_pictures(params: dict) -> int:
    return sum(row["split"] == "train" for row in read_manifest(training_manifest(params)))


def score(checkpoint: Path, params: dict, split: str) -> dict[str, dict[str, float]]:
    return checkpoint_scores(checkpoint, params["evalset"]["dir"], split, EvalConfig.from_params(params["eval"]))


def run_point(points: int | None, recipe: str, params_path: str, common: Sequence[str], runner: Runner,
              models: Path, stages: str = "both") -> tuple[dict, Path]:
    """Train the stages (both, or stage 1 only) on one subset; return its table row and
    the stage-1 checkpoint."""
    overrides = [*common, f"data.train_pictures={'null' if points is None else points}"]
    params = recipe_params(load_params(params_path), recipe)
    for assignment in overrides:
        set_dotted(params, assignment)
    name = "all" if points is None else str(points)
    started = time.perf_counter()
    init = None
    for stage in STAGE_PLANS[stages]:
        out_dir = models / name / stage
        runner(recipe, f"learning_curve/{name}/{stage}", stage, out_dir, init, overrides, params_path)
        init = out_dir / "final.pt"
    val, test = score(init, params, "val")["mtl"], score(init, params, "test")["mtl"]
    row = {"train_pictures": count_train_pictures(params), "muap_val": val["muap"], "muap_test": test["muap"],
           "acc1_test": test["acc_at_1"], "recall_at_p90_test": test["recall_at_p90"],
           "stages": "+".join(STAGE_PLANS[stages]), "wall_seconds": round(time.perf_counter() - started, 1)}
    return row, models / name / "frozen" / "final.pt"


def imagenet_baseline(frozen_checkpoint: Path, params: dict) -> dict[str, float]:
    """The ImageNet backbone's 1280-d output: a frozen stage leaves the backbone untouched."""
    val, test = score(frozen_checkpoint, params, "val")["gap1280"], score(frozen_checkpoint, params, "test")["gap1280"]
    return {"muap_val": val["muap"], "muap_test": test["muap"], "acc1_test": test["acc_at_1"],
            "recall_at_p90_test": test["recall_at_p90"]}


def run_learning_curve(spec_file: str | Path, params_path: str = "params.yaml", profile: str | None = None,
                       common: Sequence[str] = (), out_dir: str | Path = OUT, models: str | Path = MODELS,
                       runner: Runner = papermill_runner) -> pd.DataFrame:
    spec = load_spec(spec_file)
    out_dir, models = Path(out_dir), Path(models)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged = load_params(params_path, profile=profile)
    merged_path = out_dir / "params.yaml"  # params + profile: what every point's notebook reads
    merged_path.write_text(yaml.safe_dump(merged, sort_keys=False))
    rows, baseline = [], None
    for i, points in enumerate(spec["train_pictures"], 1):
        print(f"[learning curve] point {i}/{len(spec['train_pictures'])}: "
              f"{'all' if points is None else points} training pictures", flush=True)
        row, frozen = run_point(points, spec["recipe"], str(merged_path), common, runner, models, spec["stages"])
        rows.append(row)
        table = pd.DataFrame(rows, columns=list(COLUMNS)).sort_values("train_pictures")
        table.to_csv(out_dir / "table.csv", index=False)
        if baseline is None:
            params = load_params(str(merged_path), list(common))
            baseline = imagenet_baseline(frozen, params)
            (out_dir / "baseline.json").write_text(json.dumps(baseline, indent=1) + "\n")
    plots.learning_curve(table, baseline, out_dir / "learning_curve.png")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtl.learning_curve", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", nargs="?", default="sweeps/learning_curve.yaml")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None, help="a profile overlaid on the parameters (profiles/full.yaml)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every point")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--models", default=str(MODELS), help="where each point's checkpoints go")
    args = parser.parse_args(argv)
    print(run_learning_curve(args.spec, args.params, args.profile, args.set, args.out, args.models)
          .to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
