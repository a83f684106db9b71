"""Parameter sweeps with papermill: every variant trains both stages by
executing notebooks/train.ipynb with its overrides, then its stage-2 model is
scored on the evaluation set; one table and one plot gather the variants.

    python -m mtl.sweep sweeps/ablation.yaml [--set train.finetune.epochs=1 ...]

Run `dvc repro evalset` first (the sweep reads data/corpus and data/eval).
The DVC-experiments equivalent is in sweeps/ablation.yaml.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mtl.io import UserError, is_inside, write_csv
from mtl.params import load_params, read_yaml

RESULTS = Path("results")
RESULT_COLUMNS = ("muap", "recall_at_p90", "acc_at_1", "fp_at_threshold", "bytes_per_vector")


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


def load_variants(path: str | Path, only: list[str] | None = None) -> list[Variant]:
    spec = read_yaml(path).get("variants") or {}
    if not spec:
        raise ValueError(f"{path}: no `variants` mapping")
    variants = [Variant(name, tuple(overrides)) for name, overrides in spec.items()]
    if only:
        unknown = sorted(set(only) - {v.name for v in variants})
        if unknown:
            raise KeyError(f"unknown variant(s) {unknown}; {path} has {[v.name for v in variants]}")
        variants = [v for v in variants if v.name in only]
    return variants


def run_notebook(run_name: str, stage: str, out_dir: Path, init: Path | None, overrides: list[str],
                 params_path: str, notebooks_out: Path) -> None:
    import papermill

    notebooks_out.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        "notebooks/train.ipynb", str(notebooks_out / f"{run_name.replace('/', '__')}.ipynb"), kernel_name="mtl",
        parameters={"params_path": params_path, "overrides": overrides, "run_name": run_name, "stage": stage,
                    "out_dir": str(out_dir), "init": str(init) if init else None},
        progress_bar=False, log_output=True)


def sweep_out_dir(out: str | Path) -> Path:
    """`out` as a path relative to results/, checked where it really leads (after
    `..` and symbolic links): the train notebook writes under results/, so the
    sweep must too."""
    if not is_inside(out, RESULTS):
        raise UserError(f"--out {out} is not under results/ (it leads to {Path(out).resolve()}): "
                        "the train notebook writes under results/, so the sweep must too")
    return RESULTS / Path(out).resolve().relative_to(RESULTS.resolve())


def run_variant(variant: Variant, common: list[str], params_path: str, out_root: Path) -> dict:
    """Train both stages of one variant and score its stage-2 embedding."""
    from mtl.eval.methods import embed_methods, evaluate_methods

    overrides = [*common, *variant.overrides]
    params = load_params(params_path, overrides)  # fails early on a mistyped key
    started = time.perf_counter()
    models = Path("models") / "sweep" / variant.name
    results = out_root / variant.name
    notebooks_out = RESULTS / "notebooks" / "sweep"
    # The train notebook writes results/<run_name>/: name the runs relative to results/.
    run_name = results.relative_to(RESULTS).as_posix()
    run_notebook(f"{run_name}/train_frozen", "frozen", models / "frozen", None, overrides, params_path, notebooks_out)
    run_notebook(f"{run_name}/train_finetune", "finetune", models / "finetune", models / "frozen" / "final.pt",
                 overrides, params_path, notebooks_out)
    cfg = params["eval"]
    paths = embed_methods(params["evalset"]["dir"], Path("data") / "embeddings" / "sweep" / variant.name,
                          {"mtl_finetune": models / "finetune" / "final.pt"}, gap_from="mtl_finetune",
                          corpus_dir=None, image_size=cfg["image_size"], batch_size=cfg["batch_size"],
                          device=cfg.get("device", "auto"), overwrite=True)
    evaluation = evaluate_methods(params["evalset"]["dir"], paths, k=cfg["top_k"],
                                  target_precision=cfg["target_precision"])
    row = evaluation.table.set_index("method").loc["mtl_finetune"]
    return {"variant": variant.name, "parameter": variant.parameter, "value": variant.value,
            "overrides": " ".join(variant.overrides), **{c: row[c] for c in RESULT_COLUMNS if c in row},
            "wall_seconds": round(time.perf_counter() - started, 1)}


def plot_sweep(table: pd.DataFrame, path: Path) -> Path:
    from mtl import plots

    return plots.bar_chart(table, x="variant", y="muap", hue="parameter", path=path,
                           title="stage-2 μAP per sweep variant (test eval set)")


def run_sweep(sweep_file: str | Path, params_path: str = "params.yaml", common: list[str] | None = None,
              only: list[str] | None = None, out_root: str | Path = "results/sweep") -> pd.DataFrame:
    out_root = sweep_out_dir(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, variant in enumerate(load_variants(sweep_file, only), 1):
        print(f"[sweep] variant {i}: {variant.name} ({' '.join(variant.overrides)})", flush=True)
        rows.append(run_variant(variant, list(common or []), params_path, out_root))
        table = pd.DataFrame(rows)
        write_csv(table, out_root / "table.csv")  # after each variant: nothing lost on a stop
    plot_sweep(table, out_root / "muap.png")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtl.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="a sweeps/*.yaml file")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides applied to every variant, e.g. train.finetune.epochs=1")
    parser.add_argument("--only", nargs="*", default=None, help="run just these variants")
    parser.add_argument("--out", default="results/sweep", help="a folder under results/")
    args = parser.parse_args(argv)
    table = run_sweep(args.sweep, args.params, args.set, args.only, args.out)
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
