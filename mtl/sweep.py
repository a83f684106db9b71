"""Parameter sweeps with papermill: every variant trains by executing
notebooks/train.ipynb with its overrides, then its last stage is scored on the
**val** split (settings are chosen there; test numbers come only from the pipeline);
one table and one plot gather the variants.

    python -m mtl.sweep sweeps/stage1.yaml [--set train.frozen.epochs=10 ...]

A sweep file names the recipe its variants start from, which stages they train
(`frozen`, `finetune` from a given stage-1 checkpoint, or `both`), optional larger
evaluation image sizes, and the variants (lists of dotted overrides):

    recipe: best
    stages: frozen
    variants:
      margin_0.8: [loss.margin=0.8]

Run `dvc repro features` first (the sweep reads data/corpus, data/eval and the
feature cache).  The DVC-experiments equivalent is in each sweep file.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mtl import plots
from mtl.eval.evaluation import EvalConfig, checkpoint_scores
from mtl.io import UserError, is_inside, write_csv
from mtl.params import load_params, read_yaml, recipe_params, set_dotted

RESULTS = Path("results")
STAGE_PLANS = {"frozen": ("frozen",), "finetune": ("finetune",), "both": ("frozen", "finetune")}
SCORE_KEYS = ("muap", "recall_at_p90", "acc_at_1", "muap_held_out", "acc_at_1_held_out", "muap_photo",
              "muap_clipart", "muap_norm", "recall_at_p90_norm", "muap_photo_norm", "muap_clipart_norm")


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]

    @property
    def parameter(self) -> str:
        """The swept key of a one-override variant (what the plot groups by)."""
        return self.overrides[0].split("=", 1)[0] if len(self.overrides) == 1 else "several"

    @property
    def value(self) -> str:
        return self.overrides[0].split("=", 1)[1] if len(self.overrides) == 1 else self.name


@dataclass(frozen=True)
class Sweep:
    variants: list[Variant]
    recipe: str = "best"
    stages: str = "both"
    init: str | None = None          # stages=finetune: the stage-1 checkpoint to start from
    image_sizes: list[int] = field(default_factory=list)  # also score at these sizes


def load_sweep(path: str | Path, only: list[str] | None = None) -> Sweep:
    spec = read_yaml(path)
    variants = [Variant(name, tuple(overrides)) for name, overrides in (spec.get("variants") or {}).items()]
    if not variants:
        raise UserError(f"{path}: no `variants` mapping")
    if only:
        unknown = sorted(set(only) - {v.name for v in variants})
        if unknown:
            raise KeyError(f"unknown variant(s) {unknown}; {path} has {[v.name for v in variants]}")
        variants = [v for v in variants if v.name in only]
    stages = spec.get("stages", "both")
    if stages not in STAGE_PLANS:
        raise UserError(f"{path}: stages must be one of {sorted(STAGE_PLANS)}, got {stages!r}")
    if stages == "finetune" and not spec.get("init"):
        raise UserError(f"{path}: stages=finetune needs `init`, the stage-1 checkpoint to start from")
    return Sweep(variants, spec.get("recipe", "best"), stages, spec.get("init"), list(spec.get("image_sizes", [])))


def run_notebook(recipe: str, run_name: str, stage: str, out_dir: Path, init: Path | str | None,
                 overrides: list[str], params_path: str, notebooks_out: Path) -> None:
    import papermill

    notebooks_out.mkdir(parents=True, exist_ok=True)
    os.environ["PAPERMILL_EXECUTION"] = "1"  # the kernel inherits it: progress as lines, not live bars
    papermill.execute_notebook(
        "notebooks/train.ipynb", str(notebooks_out / f"{run_name.replace('/', '__')}.ipynb"), kernel_name="mtl",
        parameters={"params_path": params_path, "overrides": overrides, "recipe": recipe, "stage": stage,
                    "out_dir": str(out_dir), "init": str(init) if init else None, "run_name": run_name},
        progress_bar=False, log_output=True)


def sweep_out_dir(out: str | Path) -> Path:
    """`out` as a path relative to results/, checked where it really leads (after
    `..` and symbolic links): the train notebook writes under results/, so the
    sweep must too."""
    if not is_inside(out, RESULTS):
        raise UserError(f"--out {out} is not under results/ (it leads to {Path(out).resolve()}): "
                        "the train notebook writes under results/, so the sweep must too")
    return RESULTS / Path(out).resolve().relative_to(RESULTS.resolve())


def run_variant(sweep: Sweep, variant: Variant, common: list[str], params_path: str, out_root: Path) -> dict:
    """Train the sweep's stages for one variant and score the last one on val."""
    overrides = [*common, *variant.overrides]
    params = recipe_params(load_params(params_path), sweep.recipe)
    for assignment in overrides:  # fails early on a mistyped key
        set_dotted(params, assignment)
    started = time.perf_counter()
    run_root = out_root.relative_to(RESULTS).as_posix()  # the train notebook writes results/<run_name>/
    models = Path("models") / run_root / variant.name
    notebooks_out = RESULTS / "notebooks" / run_root
    init: Path | str | None = sweep.init
    for stage in STAGE_PLANS[sweep.stages]:
        run_notebook(sweep.recipe, f"{run_root}/{variant.name}/{stage}", stage, models / stage, init,
                     overrides, params_path, notebooks_out)
        init = models / stage / "final.pt"
    cfg = EvalConfig.from_params(params["eval"])
    row = {"variant": variant.name, "parameter": variant.parameter, "value": variant.value,
           "overrides": " ".join(variant.overrides), "stage": STAGE_PLANS[sweep.stages][-1]}
    for size in [cfg.image_size, *sweep.image_sizes]:
        scores = checkpoint_scores(init, params["evalset"]["dir"], "val", cfg, size)
        suffix = "" if size == cfg.image_size else f"_{size}px"
        row.update({f"val_{key}{suffix}": scores["mtl"][key] for key in SCORE_KEYS})
    row["wall_seconds"] = round(time.perf_counter() - started, 1)
    return row


def plot_sweep(table: pd.DataFrame, path: Path) -> Path:
    return plots.bar_chart(table, x="variant", y="val_muap", hue="parameter", path=path,
                           title="μAP per sweep variant (val split)")


def run_sweep(sweep_file: str | Path, params_path: str = "params.yaml", common: list[str] | None = None,
              only: list[str] | None = None, out_root: str | Path | None = None) -> pd.DataFrame:
    sweep = load_sweep(sweep_file, only)
    out_root = sweep_out_dir(out_root or RESULTS / "sweep" / Path(sweep_file).stem)
    out_root.mkdir(parents=True, exist_ok=True)
    rows = earlier_rows(out_root / "table.csv", keep_out=[v.name for v in sweep.variants])
    for i, variant in enumerate(sweep.variants, 1):
        print(f"[sweep] variant {i}/{len(sweep.variants)}: {variant.name} ({' '.join(variant.overrides)})",
              flush=True)
        rows.append(run_variant(sweep, variant, list(common or []), params_path, out_root))
        table = in_sweep_order(pd.DataFrame(rows), sweep_file)
        write_csv(table, out_root / "table.csv")  # after each variant: nothing lost on a stop
    plot_sweep(table, out_root / "muap.png")
    return table


def earlier_rows(table_path: Path, keep_out: list[str]) -> list[dict]:
    """The rows an earlier run of this sweep wrote, less the variants about to run again: a run
    with --only adds to the table instead of replacing it."""
    if not table_path.is_file():
        return []
    earlier = pd.read_csv(table_path, keep_default_na=False)
    return earlier[~earlier["variant"].isin(keep_out)].to_dict("records")


def in_sweep_order(table: pd.DataFrame, sweep_file: str | Path) -> pd.DataFrame:
    """Rows in the order the sweep file lists its variants (earlier rows of other names last)."""
    order = {v.name: i for i, v in enumerate(load_sweep(sweep_file).variants)}
    rank = table["variant"].map(lambda name: order.get(name, len(order)))
    return table.iloc[rank.argsort(kind="stable")].reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtl.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="a sweeps/*.yaml file")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides applied to every variant, e.g. train.finetune.epochs=1")
    parser.add_argument("--only", nargs="*", default=None, help="run just these variants")
    parser.add_argument("--out", default=None, help="a folder under results/ (default: results/sweep/<file name>)")
    args = parser.parse_args(argv)
    table = run_sweep(args.sweep, args.params, args.set, args.only, args.out)
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
