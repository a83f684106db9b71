"""Gather every stage's numbers into results/metrics.json and write the measured tables of
the README and of the docs/ pages from it, so no number in them is typed by hand.

Tables live between marker comments in any of those pages:
    <!-- table:NAME -->  ...generated...  <!-- /table:NAME -->

    python -m mtl.report --readme README.md      # README.md and every docs/*.md page
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from mtl.io import atomic_write_text
from mtl.params import load_params, recipe_params
from mtl.scale_report import scale_tables
from mtl.tables import (HEADLINE_COLUMNS, RETRIEVAL_COLUMNS, fmt, markdown_table, scientific, split_normalized,
                        stage_rank)
from mtl.training.config import StageConfig

RESULTS = Path("results")
RECIPES = ("paper", "best")
TRAINING_RUNS = ("paper/frozen", "paper_mem0/frozen", "paper/finetune", "best/frozen", "best_mem0/frozen",
                 "best/finetune")
STAGE_METRICS = {
    "corpus": "corpus/metrics.json",
    "evalset": "evalset/metrics.json",
    "features": "features/metrics.json",
    **{f"train/{run}": f"train/{run}/metrics.json" for run in TRAINING_RUNS},
    "embeddings": "embeddings/metrics.json",
    "retrieval": "evaluate/metrics.json",
}


def gather_metrics(results_dir: Path = RESULTS) -> dict:
    """One dict keyed by stage; a stage that has not run yet is left out."""
    gathered = {}
    for key, rel in STAGE_METRICS.items():
        path = results_dir / rel
        if path.is_file():
            gathered[key] = json.loads(path.read_text())
    return gathered


def retrieval_table(methods_csv: Path) -> str:
    frame = pd.read_csv(methods_csv)
    rows = frame.to_dict("records")
    present = [(k, h) for k, h in RETRIEVAL_COLUMNS if k in frame.columns]
    return markdown_table(rows, present)


# The headline rows: the hashes, the ImageNet backbone, each recipe's final model and the
# larger input; each raw and normalized (when it has a normalized row).
HEADLINE_METHODS = ("phash", "dhash", "backbone_gap1280", "paper_finetune", "best_finetune", "backbone_gap1280_160px",
                    "best_finetune_160px")


def headline_table(methods_csv: Path) -> str:
    """The README's retrieval table: the headline methods, each raw and normalized."""
    frame = pd.read_csv(methods_csv).set_index("method")
    rows = []
    for method in HEADLINE_METHODS:
        for name in (method, f"{method}_norm"):
            if name in frame.index:
                base, scale = split_normalized(name)
                rows.append({**frame.loc[name].to_dict(), "method": f"`{base}`", "scale": scale})
    return markdown_table(rows, [(k, h) for k, h in HEADLINE_COLUMNS
                                 if k in frame.columns or k in ("method", "scale")])


def backgrounds_table(backgrounds_csv: Path) -> str:
    """The normalization's backgrounds side by side (results/evaluate/backgrounds.csv)."""
    rows = pd.read_csv(backgrounds_csv).to_dict("records")
    for row in rows:
        row["method"] = f"`{row['method']}`"
        row["k"] = int(row["k"]) if row.get("k") == row.get("k") and row.get("k") is not None else None
        row["beta"] = f"{row['beta']:g}"
        row["background"] = {"raw": "none (cosine)", "references": "the references",
                             "fixed": f"{int(row['background_images']):,} training pictures"
                             if row.get("background_images") == row.get("background_images") else "training pictures"
                             }.get(row["background"], row["background"])
    columns = [("method", "method"), ("background", "background"), ("k", "k"), ("beta", "β"),
               ("val_muap", "val μAP"), ("muap", "test μAP"), ("recall_at_p90", "test R@P90"),
               ("acc_at_1", "test acc@1")]
    return markdown_table(rows, columns)


BENCHMARK_DECISIONS = {"mtl_trained_raw": ("best", "raw"), "mtl_trained": ("best", "normalized"),
                       "mtl_trained_combined": ("best", "combined"), "mtl_imagenet_raw": ("imagenet", "raw"),
                       "mtl_imagenet": ("imagenet", "normalized"), "mtl_phash_raw": ("phash", "raw"),
                       "mtl_phash": ("phash", "normalized")}


def large_folder_rows(benchmark_csv: Path) -> pd.DataFrame:
    """The dedup benchmark's large folder (`mtl dedup` itself, with the same operating
    points) in the layout of results/evaluate/folder.csv.  Its extra pictures carry no labels
    among themselves (benchmarks/dedup_vs_imagededup.py): `precision` and `f1` leave those
    pairs out, `precision_all` counts them as wrong (a lower bound)."""
    frame = pd.read_csv(benchmark_csv)
    if "folder" not in frame:
        return pd.DataFrame()
    large = frame[(frame["folder"] == "large") & frame["method"].isin(list(BENCHMARK_DECISIONS))]
    rows = []
    for row in large.to_dict("records"):
        name, decision = BENCHMARK_DECISIONS[row["method"]]
        threshold = str(row["threshold"]).split(" ")[0]
        radius = str(row["threshold"]).split("≤ ")[1].split(" ")[0] if "≤" in str(row["threshold"]) else None
        rows.append({"name": name, "decision": decision, "split": "large", "images": row["images"],
                     "threshold": float(threshold), "hamming_radius": float(radius) if radius else np.nan,
                     "accepted": row["predicted_pairs"], "true_positives": row["true_positives"],
                     "n_true_pairs": row["true_pairs"], "precision": row.get("precision_labelled", row["precision"]),
                     "precision_all": row["precision"], "recall": row["recall"],
                     "f1": row.get("f1_labelled", row["f1"])})
    return pd.DataFrame(rows)


def folder_table(folder_csv: Path, benchmark_csv: Path | None = None) -> str:
    """The operating points' folder decisions on val (where they were chosen) and test
    (results/evaluate/folder.csv), and on the large folder of the dedup benchmark when it
    has been run: how far a threshold transfers to a larger folder."""
    frame = pd.read_csv(folder_csv)
    if benchmark_csv is not None and benchmark_csv.is_file():
        large = large_folder_rows(benchmark_csv)
        if not large.empty:
            defaults = frame.drop_duplicates(["name", "decision"]).set_index(["name", "decision"])["default"]
            large["default"] = [defaults.get((n, d), False) for n, d in zip(large["name"], large["decision"])]
            frame = pd.concat([frame, large], ignore_index=True)
    order = {"best": 0, "imagenet": 1, "phash": 2, "dhash": 3}
    frame = frame.sort_values(["name", "decision", "images"], key=lambda c: c.map(order) if c.name == "name" else c,
                              kind="stable")
    if "precision_all" in frame:  # val and test folders are labelled throughout
        frame["precision_all"] = frame["precision_all"].fillna(frame["precision"])
    rows = frame.to_dict("records")
    for row in rows:
        row["name"] = f"`{row['name']}`" + (" (default)" if row.get("default") in (True, "True") else "")
        row["decision"] = {"raw": "raw", "normalized": "normalized",
                           "combined": f"normalized or pHash ≤ {int(row['hamming_radius'])} bits"
                           if row.get("hamming_radius") == row.get("hamming_radius") else "combined"
                           }.get(row["decision"], row["decision"])
    columns = [("name", "operating point"), ("decision", "scores"), ("split", "folder"), ("images", "images"),
               ("threshold", "threshold"), ("accepted", "pairs accepted"), ("precision", "precision"),
               ("precision_all", "precision, unlabelled pairs as wrong"), ("recall", "recall"), ("f1", "F1")]
    return markdown_table(rows, [c for c in columns if c[0] in frame.columns])


def training_table(metrics: dict) -> str:
    rows = [{"run": run, **metrics[f"train/{run}"]} for run in TRAINING_RUNS if f"train/{run}" in metrics]
    columns = [("run", "recipe / stage"), ("epochs", "epochs"), ("steps", "steps"), ("final_train_total", "train loss"),
               ("final_val_total", "val loss"), ("final_val_contrastive", "val contrastive"),
               ("final_val_class_accuracy", "val class acc."), ("active_share_last_epoch", "active neg. share"),
               ("images_per_second", "img/s"), ("wall_seconds", "wall s")]
    return markdown_table(rows, columns)


def features_table(metrics: dict) -> str:
    cache = metrics.get("features", {})
    rows = [{"split": split, **cache[split]} for split in ("train", "val") if split in cache]
    columns = [("split", "split"), ("images", "images"), ("views", "views each"), ("megabytes", "MB (float16)"),
               ("build_seconds", "build s"), ("views_per_second", "views/s")]
    table = markdown_table(rows, columns)
    if "speedup" in cache:
        table += (f"\n\nStage-1 optimizer steps per second (batch 64), side by side in one run: "
                  f"{fmt(cache['steps_per_second_images'])} from images, {fmt(cache['steps_per_second_features'])} "
                  f"from the cache: **{cache['speedup']:.0f}× faster**.")
    return table


RECIPE_SETTINGS = [
    ("margin", "margin α"), ("memory_size", "memory"), ("memory_fix", "memory remedy"), ("lambda_koleo", "KoLeo λ"),
    ("views", "views"), ("photo_repeats", "photo repeats"), ("source", "stage-1 input"), ("epochs", "epochs"), ("lr", "lr"),
    ("warmup_steps", "warm-up steps"), ("branch_lr_scale", "branch lr ×"), ("bn", "backbone BatchNorm"),
    ("embed_pool", "pooling"),
]


def _memory_fix(cfg: StageConfig) -> str:
    parts = []
    if cfg.memory_momentum:
        parts.append(f"momentum {cfg.memory_momentum:g}")
    if cfg.memory_warmup_steps:
        parts.append(f"warm-up {cfg.memory_warmup_steps:,} steps")
    if cfg.memory_refresh_steps:
        parts.append(f"refresh every {cfg.memory_refresh_steps:,}")
    if cfg.negative_reduction != "nonzero":
        parts.append("mean over all pairs")
    if cfg.memory_positives:
        parts.append("stored positives")
    return ", ".join(parts) or "none (the paper's)"


def recipes_table(params: dict) -> str:
    """The settings of both recipes, per stage, read from the parameters themselves, as a
    reader writes them (learning rates in scientific notation); a `paper` cell that
    differs from `best` is in bold."""
    values = {}
    for recipe in RECIPES:
        resolved = recipe_params(params, recipe)
        for stage in ("frozen", "finetune"):
            cfg = StageConfig.from_params(resolved, stage)
            row = {k: getattr(cfg, k) for k, _ in RECIPE_SETTINGS if hasattr(cfg, k)}
            row.update(memory_fix=_memory_fix(cfg), embed_pool=resolved["model"].get("embed_pool", "avg"),
                       lr=scientific(cfg.lr), margin=f"{cfg.margin:g}", lambda_koleo=f"{cfg.lambda_koleo:g}",
                       branch_lr_scale=f"{cfg.branch_lr_scale:g}")
            if stage == "frozen":
                row["bn"], row["branch_lr_scale"] = "frozen (whole backbone)", "–"
            values[(recipe, stage)] = {k: fmt(v) if not isinstance(v, str) else v for k, v in row.items()}
    rows = []
    for (recipe, stage), row in values.items():
        best = values[("best", stage)]
        shown = {k: f"**{v}**" if recipe != "best" and v != best[k] else v for k, v in row.items()}
        rows.append({"run": f"{recipe} / {stage}", **shown})
    return markdown_table(rows, [("run", "recipe / stage"), *RECIPE_SETTINGS])


def sweep_tables(results_dir: Path) -> dict[str, str]:
    """The recorded sweeps (results/sweep/<name>/table.csv), scored on val."""
    tables = {}
    for table_csv in sorted((results_dir / "sweep").glob("*/table.csv")):
        frame = pd.read_csv(table_csv)
        columns = [("variant", "variant"), ("overrides", "overrides"), ("val_muap", "val μAP"),
                   ("val_acc_at_1", "val acc@1"), ("val_recall_at_p90", "val R@P90"),
                   ("val_muap_held_out", "val μAP held-out"), ("val_muap_photo", "val μAP photos"),
                   ("val_muap_clipart", "val μAP clip art"), ("val_muap_norm", "val μAP normalized"),
                   ("val_muap_photo_norm", "val μAP photos, normalized"), ("val_muap_160px", "val μAP at 160 px"),
                   ("wall_seconds", "wall s")]
        tables[f"sweep_{table_csv.parent.name}"] = markdown_table(
            frame.to_dict("records"), [(k, h) for k, h in columns if k in frame.columns])
    return tables


def generalization_method(name: str) -> str:
    """A generalization row's method as the tables name it: `imagenet_gap1280`, or a checkpoint
    path models/<recipe>/<stage>/final.pt as <recipe>_<stage>."""
    return name if name == "imagenet_gap1280" else Path(name).parent.parent.name + "_" + Path(name).parent.name


def generalization_table(table_csv: Path) -> str:
    """The last `python -m mtl.eval.generalization` (results/generalization/table.csv)."""
    frame = pd.read_csv(table_csv)
    frame["method"] = [generalization_method(m) for m in frame["method"]]
    columns = [("method", "method"), ("image_size", "input px"), ("muap", "μAP"), ("acc_at_1", "acc@1"),
               ("recall_at_p90", "R@P90"), ("muap_photo", "μAP photos"), ("muap_clipart", "μAP clip art"),
               ("muap_norm", "μAP normalized"), ("recall_at_p90_norm", "R@P90 normalized"),
               ("muap_photo_norm", "μAP photos, normalized"), ("muap_clipart_norm", "μAP clip art, normalized")]
    return markdown_table(frame.to_dict("records"), [c for c in columns if c[0] in frame.columns])


def diagnosis_tables(results_dir: Path) -> dict[str, str]:
    """The recorded diagnosis runs (results/diagnose/*.csv), as README tables."""
    tables = {}
    batchnorm = results_dir / "diagnose" / "batchnorm.csv"
    if batchnorm.is_file():
        columns = [("run", "run (val split)"), ("steps", "steps"), ("mtl_muap", "embedding μAP"),
                   ("mtl_acc_at_1", "embedding acc@1"), ("gap1280_muap", "backbone 1280-d μAP"),
                   ("gap1280_acc_at_1", "backbone 1280-d acc@1")]
        tables["diagnose_batchnorm"] = markdown_table(pd.read_csv(batchnorm).to_dict("records"), columns)
    active = results_dir / "diagnose" / "active_summary.csv"
    if active.is_file():
        columns = [("margin", "margin"), ("memory_size", "memory"),
                   ("active_share_first_epoch", "active share, epoch 1"),
                   ("active_share_last_epoch", "active share, last epoch"),
                   ("active_per_step_last_epoch", "active per step, last epoch"),
                   ("compared_per_step", "compared per step"), ("val_muap", "val μAP"), ("val_acc_at_1", "val acc@1")]
        tables["diagnose_active"] = markdown_table(pd.read_csv(active).to_dict("records"), columns)
    staleness = results_dir / "diagnose" / "staleness.csv"
    if staleness.is_file():
        frame = pd.read_csv(staleness)
        rows = [frame.iloc[i].to_dict() for i in sorted({0, len(frame) // 2, len(frame) - 1})]
        columns = [("step", "step"), ("stored", "stored entries"), ("mean_age", "mean age (steps)"),
                   ("mean_age_active", "mean age of active negatives"), ("mean_drift", "mean drift (1 − cos)"),
                   ("mean_drift_active", "drift of active negatives")]
        tables["diagnose_staleness"] = markdown_table(rows, columns)
    return tables


PROBE_QUANTITIES = [("mean_norm", "‖batch mean‖"), ("batch_similarity", "cos within batch"),
                    ("memory_alignment", "cos(batch mean, memory mean)"),
                    ("share_from_memory", "active negatives from memory"),
                    ("grad_memory", "gradient from memory"), ("grad_batch", "gradient from batch"),
                    ("grad_angle", "angle between them (°)")]


def memory_probe_table(summary_csv: Path) -> str:
    """The memory probe (mtl.memory_study): each quantity at a stage-1 run's start, over its
    early steps and over its last tenth, with and without the memory, and each run's val μAP."""
    rows = []
    for run in pd.read_csv(summary_csv).to_dict("records"):
        label = run.get("label") if isinstance(run.get("label"), str) else \
            f"memory {int(run['memory_size']):,}" if run["memory_size"] else "no memory"
        for when, text in (("start", "first step"), ("early", "early steps (1-10 %)"), ("end", "last tenth")):
            rows.append({"run": f"{label}, {text}", **{k: run.get(f"{k}_{when}") for k, _ in PROBE_QUANTITIES},
                         "val_muap": run.get("val_muap") if when == "end" else None})
    return markdown_table(rows, [("run", "run (stage 1)"), *PROBE_QUANTITIES, ("val_muap", "val μAP")])


def _early_peak(run: dict, key: str) -> float:
    """A run's highest `key` over its early steps; the early mean in a summary from before the
    extremes were kept (mtl.memory_study.EXTREMES)."""
    return run.get(f"{key}_early_max", run[f"{key}_early"])


def _early_lowest_alignment(run: dict) -> float:
    """A run's lowest cosine between the batch's mean and the memory's over its early steps
    (the early mean in a summary from before the extremes were kept)."""
    return run.get("memory_alignment_early_min", run["memory_alignment_early"])


def memory_reading(summary_csv: Path) -> str:
    """The probe's verdict on the hypothesis (mtl.memory_study). The bunching is a transient of
    the early steps, so it is read from their extremes where the summary has them: with the
    memory the batch bunches further than without (a higher peak of its mean's norm and of its
    within-batch cosine) while it turns away from the memory's mean (their cosine below 0). It
    holds when the run without a memory does not bunch at all; in part when that run bunches
    too, less far."""
    summary = pd.read_csv(summary_csv)
    if "momentum" not in summary:
        summary["momentum"] = 0.0
    runs = {int(r["memory_size"]): r for r in summary[summary["momentum"] == 0].to_dict("records")}
    if 0 not in runs or len(runs) < 2:
        return ""
    size = max(runs)
    mem, none = runs[size], runs[0]
    momentum = summary[(summary["momentum"] > 0) & (summary["memory_size"] == size)].to_dict("records")
    peak = _early_peak

    def climbs(run: dict, key: str) -> bool:
        return peak(run, key) > run[f"{key}_start"] + 0.02

    lowest = _early_lowest_alignment(mem)
    further = all(peak(mem, key) > peak(none, key) + 0.02 for key in ("mean_norm", "batch_similarity"))
    bunches = climbs(mem, "mean_norm") and climbs(mem, "batch_similarity")
    control = climbs(none, "mean_norm") and climbs(none, "batch_similarity")
    away = lowest < 0
    verdict = ("**The hypothesis holds**" if bunches and away and not control else
               "**The hypothesis holds in part**" if bunches and away and further else
               "**The hypothesis does not hold as stated**")
    return (f"{verdict}. Over the early steps (1-10 % of the run) the batch with the memory of {size:,} bunches: "
            f"its mean embedding's norm climbs from {mem['mean_norm_start']:.2f} to {peak(mem, 'mean_norm'):.2f} and "
            f"the within-batch cosine from {mem['batch_similarity_start']:.2f} to "
            f"{peak(mem, 'batch_similarity'):.2f}, while it turns "
            f"{'away from' if away else 'no further than'} the memory's mean (their cosine falls to {lowest:.2f}; "
            f"{mem['memory_alignment_early']:.2f} on average over those steps). Without the memory the batch bunches "
            f"{'too, less far' if control else 'not'} (norm {peak(none, 'mean_norm'):.2f}, cosine "
            f"{peak(none, 'batch_similarity'):.2f} at most) and spreads again. By the last tenth both sit at norm "
            f"{mem['mean_norm_end']:.2f} and {none['mean_norm_end']:.2f}, but with the memory its negatives are "
            f"{mem['share_from_memory_end']:.0%} of the active pairs and give nearly all of the gradient "
            f"({mem['grad_memory_end']:.4f} against {mem['grad_batch_end']:.5f} from the batch). Val μAP "
            f"{mem['val_muap']:.3f} with the memory, {none['val_muap']:.3f} without."
            + "".join(momentum_reading(run, mem) for run in momentum))


def momentum_reading(run: dict, plain: dict) -> str:
    """What a momentum encoder filling the memory changes, against the plain memory run."""
    return (f" With a momentum encoder (m={run['momentum']:g}) filling the same memory, the early batch bunches "
            f"to norm {_early_peak(run, 'mean_norm'):.2f} and cosine {_early_peak(run, 'batch_similarity'):.2f} at "
            f"most and stays with the memory (their cosine {_early_lowest_alignment(run):.2f} at its lowest); the "
            f"memory gives "
            f"{run['share_from_memory_early']:.0%} of the early active negatives "
            f"({plain['share_from_memory_early']:.0%} without momentum) and as much gradient as the batch "
            f"({run['grad_memory_early']:.4f} against {run['grad_batch_early']:.4f}; "
            f"{plain['grad_memory_early']:.4f} against {plain['grad_batch_early']:.4f} without momentum); "
            f"val μAP {run['val_muap']:.3f}.")


def embeddings_table(metrics: dict) -> str:
    space = metrics.get("embeddings", {})
    rows = [{"when": when, **space[when]} for when in ("before", "after") if when in space]
    columns = [("when", "embedding space"), ("knn_view_to_anchor", "view→anchor 1-NN acc."),
               ("silhouette_by_anchor", "silhouette by anchor")]
    return markdown_table(rows, columns)


def evalset_table(metrics: dict) -> str:
    """What each evaluation split holds (results/evalset/metrics.json)."""
    rows = []
    for split, counts in metrics.get("evalset", {}).get("splits", {}).items():
        per_class = counts.get("references_per_class", {})
        rows.append({"split": split, "references": counts["references"],
                     "by_class": ", ".join(f"{c} {n:,}" for c, n in sorted(per_class.items())),
                     "photos": counts.get("photo_references"),
                     "photo_queries": (f"{counts['photo_positive_queries']:,} + {counts['photo_distractor_queries']:,}"
                                       if "photo_positive_queries" in counts else None),
                     "positive_queries": counts["positive_queries"],
                     "held_out": counts["held_out_positive_queries"], "distractors": counts["distractor_queries"],
                     "distinct": counts["distinct_distractor_sources"]})
    columns = [("split", "split"), ("references", "references (one per picture)"), ("by_class", "by class"),
               ("photos", "of them photographs"), ("positive_queries", "copies"),
               ("held_out", "of them by held-out edits"), ("distractors", "distractors"),
               ("distinct", "distinct distractor images"), ("photo_queries", "photo part: copies + distractors")]
    return markdown_table(rows, columns)


def packages_default_table(metrics: dict) -> str | None:
    """The default corpus per package (results/corpus/metrics.json)."""
    from mtl.scale_report import packages_table

    corpus = metrics.get("corpus", {})
    return packages_table(corpus) if corpus.get("per_package") else None


def corpus_table(metrics: dict) -> str:
    counts = metrics.get("corpus", {}).get("counts", {})
    rows = [{"class": c, **splits} for c, splits in counts.items()]
    columns = [("class", "class"), ("train", "train"), ("val", "val"), ("test", "test"), ("total", "total")]
    return markdown_table(rows, columns)


def _work_key(stage: str) -> str:
    if "@" in stage:
        kind, recipe = stage.split("@")
        return f"train/{recipe}/{kind.removeprefix('train_')}"
    return {"evaluate": "retrieval"}.get(stage, stage)


def _stage_work(stage_metrics: dict, stage: str) -> tuple[float | None, str]:
    """A stage's own work in this run and its row label.  A training stage's work is its
    `stage_wall_seconds` (its `wall_seconds` is the training's, which a reused finished run
    did not spend again: the label says so, with what the training once took)."""
    work = stage_metrics.get("stage_wall_seconds", stage_metrics.get("wall_seconds"))
    if stage_metrics.get("reused_finished_run"):
        return work, f"{stage} (its finished run reused; trained in {fmt(stage_metrics['wall_seconds'])} s)"
    return work, stage


def timing_table(metrics: dict, results_dir: Path = RESULTS) -> str:
    """Every stage's wall time as `dvc repro` ran it (results/timing/, written by
    scripts/stage: the interpreter, the notebook kernel and papermill included), its own
    work (the stage's metrics), and the difference; the total is what a user waits, but
    for DVC's own bookkeeping between stages.  A fresh clone's measured `make repro`
    (scripts/time_fresh_clone.sh) closes the table when it has been recorded."""
    records = [*(results_dir / "timing").glob("*.json"), *(results_dir / "report_timing").glob("report.json")]
    walls = {path.stem: json.loads(path.read_text())["wall_seconds"] for path in records if path.stem != "fresh_clone"}
    before_path = results_dir / "timing_before.json"
    before = json.loads(before_path.read_text()) if before_path.is_file() else None
    before_walls = (before or {}).get("stages", {})
    rows = []
    for stage in sorted({*walls, *(s for s, v in before_walls.items() if v is not None)}, key=stage_rank):
        wall, work, label = walls.get(stage), *_stage_work(metrics.get(_work_key(stage)) or {}, stage)
        rows.append({"stage": label, "wall": wall, "work": work if wall is not None else None,
                     "overhead": wall - work if wall is not None and work is not None else None,
                     "before": before_walls.get(stage)})
    total = sum(r["wall"] for r in rows if r["wall"] is not None)
    rows.append({"stage": "**all stages**", "wall": total,
                 "work": sum(r["work"] for r in rows if r["work"] is not None),
                 "before": (before or {}).get("total_seconds")})
    fresh = results_dir / "timing" / "fresh_clone.json"
    if fresh.is_file():
        record = json.loads(fresh.read_text())
        rows.append({"stage": f"**`make repro` on a fresh clone** ({record['date']})", "wall": record["wall_seconds"]})
    columns = [("stage", "stage"), ("wall", "wall s"), ("work", "of it the stage's work, s"),
               ("overhead", "interpreter, kernel, papermill s")]
    if before is not None:
        columns.append(("before", f"before (`{before['commit']}`), wall s"))
    return markdown_table(rows, columns)


def run_times_table(results_dir: Path = RESULTS) -> str | None:
    """Each profile's whole run as a user waits for it, from the run's own start and end: the
    default `make repro` on a fresh clone (results/timing/fresh_clone.json) and the full
    profile's (results/profiles/full/run.json); None while neither has been recorded."""
    runs = [("default", "`make repro` on a fresh clone, after `make setup`", results_dir / "timing" / "fresh_clone.json"),
            ("full", "`make repro PROFILE=full`", results_dir / "profiles" / "full" / "run.json")]
    rows = []
    for profile, command, path in runs:
        if path.is_file():
            record = json.loads(path.read_text())
            rows.append({"profile": profile, "command": command, "minutes": record["wall_seconds"] / 60,
                         "date": record.get("date"), "commit": f"`{record['commit']}`" if record.get("commit") else None})
    if not rows:
        return None
    return markdown_table(rows, [("profile", "profile"), ("command", "run"), ("minutes", "minutes"), ("date", "date"),
                                 ("commit", "commit")])


def _verdict(holds: bool) -> str:
    return "**holds**" if holds else "**does not hold here**"


# A decision rule "suppresses false positives" when it removes at least this share of them
# at the val-chosen threshold, and costs at most MUAP_TOLERANCE of μAP: a handful fewer out
# of hundreds is noise, not a finding.
FP_CUT = 0.05
MUAP_TOLERANCE = 0.01


def suppresses_false_positives(plain: dict, *decided: dict) -> bool:
    return any(d["fp_at_threshold"] <= (1 - FP_CUT) * plain["fp_at_threshold"]
               and d["muap"] >= plain["muap"] - MUAP_TOLERANCE for d in decided)


def _number(value) -> float | None:
    """A finite number, else None (missing and NaN alike)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _fp_claim(fine: dict, gate: dict, fusion: dict | None, fp_key: str = "fp_at_threshold") -> str:
    fused = "" if fusion is None else f" and → {fusion[fp_key]:.0f} with score fusion (μAP → {fusion['muap']:.3f})"
    return (f"false positives at the val-chosen threshold {fine[fp_key]:.0f} → {gate[fp_key]:.0f} with the class "
            f"gate (μAP {fine['muap']:.3f} → {gate['muap']:.3f}){fused}")


def _claims_of_recipe(r: dict, recipe: str) -> list[str]:
    """The paper's claims for one recipe, from the runs the pipeline trained."""
    gap, pca = r["backbone_gap1280"], r.get("backbone_pca320")
    frozen, fine = r.get(f"{recipe}_frozen"), r.get(f"{recipe}_finetune")
    lines = [f"**Recipe `{recipe}`**", ""]
    trained = [k for k in (f"{recipe}_frozen", f"{recipe}_finetune") if k in r]
    best_name = max(trained, key=lambda k: r[k]["muap"])
    best = r[best_name]
    ratio = gap["bytes_per_vector"] / best["bytes_per_vector"]
    pca_text = f" PCA of the same 1280-d output to 320-d gives {pca['muap']:.3f}." if pca else ""
    lines.append(
        f"- *A 320-d embedding instead of the 1280-d backbone output, at {ratio:.0f}× less memory* — "
        f"{_verdict(best['muap'] >= gap['muap'] - 0.01)}: `{best_name}` μAP {best['muap']:.3f} vs. "
        f"`backbone_gap1280` {gap['muap']:.3f} (acc@1 {best['acc_at_1']:.3f} vs. {gap['acc_at_1']:.3f}; "
        f"held-out edits μAP {best['muap_held_out']:.3f} vs. {gap['muap_held_out']:.3f}).{pca_text}")
    if frozen and fine:
        fine_gap = r.get(f"{recipe}_finetune_gap1280", {})
        lines.append(
            f"- *Stage 2 (whole network) improves on stage 1* — {_verdict(fine['muap'] > frozen['muap'])}: "
            f"μAP {fine['muap']:.3f} after stage 2 vs. {frozen['muap']:.3f} after stage 1"
            + (f"; the fine-tuned backbone's own 1280-d output {fine_gap['muap']:.3f} vs. ImageNet's {gap['muap']:.3f}."
               if fine_gap else "."))
    mem0 = r.get(f"{recipe}_frozen_mem0")
    if frozen and mem0:
        lines.append(
            f"- *Cross-batch negatives beat within-batch negatives* (stage 1, same budget) — "
            f"{_verdict(frozen['muap'] > mem0['muap'] + 0.01)}: μAP {frozen['muap']:.3f} with the memory vs. "
            f"{mem0['muap']:.3f} without (a gain under 0.01 μAP is not counted).")
    gate, fusion = r.get(f"{recipe}_finetune_gate"), r.get(f"{recipe}_finetune_fusion")
    if fine and gate:
        text = (f"- *The class branch suppresses false positives (the paper's future work)* — "
                f"{_verdict(suppresses_false_positives(fine, gate, *([fusion] if fusion else [])))}: "
                f"{_fp_claim(fine, gate, fusion)}")
        norm, norm_gate = r.get(f"{recipe}_finetune_norm"), r.get(f"{recipe}_finetune_norm_gate")
        if norm and norm_gate:
            text += (f"; with normalized scores {_verdict(suppresses_false_positives(norm, norm_gate))}: "
                     f"{_fp_claim(norm, norm_gate, r.get(f'{recipe}_finetune_norm_fusion'))}")
        if _number(fine.get("fp_photo")) is not None and _number(gate.get("fp_photo")) is not None:
            cut = (gate["fp_photo"] <= (1 - FP_CUT) * fine["fp_photo"]
                   and gate["muap_photo"] >= fine["muap_photo"] - MUAP_TOLERANCE)
            text += (f"; where it can bite, photo queries in the mixed gallery, {_verdict(cut)}: "
                     f"{fine['fp_photo']:.0f} → {gate['fp_photo']:.0f} (photo μAP {fine['muap_photo']:.3f} → "
                     f"{gate['muap_photo']:.3f})")
        if _number(fine.get("fp_same_type")) is not None and fine["fp_at_threshold"]:
            text += (f". Why: {fine['fp_same_type']:.0f} of its {fine['fp_at_threshold']:.0f} false positives pair "
                     f"two images of one content type (clip art with clip art, photograph with photograph), which "
                     f"no class gate can tell apart, with two classes or with photographs as a third")
        lines.append(text + f". A cut of at least {FP_CUT:.0%} at no more than {MUAP_TOLERANCE} μAP counts.")
    return lines


def findings(metrics: dict) -> str:
    """The paper's claims, each checked for each recipe against this run's numbers, and
    what the study adds (generated, never typed)."""
    r = metrics.get("retrieval", {})
    if "backbone_gap1280" not in r or not any(f"{recipe}_finetune" in r for recipe in RECIPES):
        return "(run `dvc repro` to fill this section)"
    lines = []
    for recipe in RECIPES:
        if f"{recipe}_finetune" in r or f"{recipe}_frozen" in r:
            lines += ([""] if lines else []) + _claims_of_recipe(r, recipe)
    lines += ["", "**Beyond the paper**", ""]
    space = metrics.get("embeddings", {})
    if {"before", "after"} <= set(space):
        b, a = space["before"], space["after"]
        lines += [f"- *Views cluster with their anchor after training (Fig. 5; recipe `best`)* — "
                  f"{_verdict(a['silhouette_by_anchor'] > b['silhouette_by_anchor'])}: silhouette by anchor "
                  f"{b['silhouette_by_anchor']:.3f} before → {a['silhouette_by_anchor']:.3f} after, view→anchor "
                  f"1-NN accuracy {b['knn_view_to_anchor']:.3f} → {a['knn_view_to_anchor']:.3f}. Our *before* is the "
                  f"ImageNet backbone with untrained branches."]
    best, gap = r.get("best_finetune"), r["backbone_gap1280"]
    best_norm, gap_norm = r.get("best_finetune_norm"), r.get("backbone_gap1280_norm")
    if best and best_norm and gap_norm:
        lines.append(
            f"- *Normalized scores* (every score minus the mean of each image's similarity to its nearest "
            f"neighbours, k and β chosen on val) — `best_finetune` μAP {best['muap']:.3f} → "
            f"{best_norm['muap']:.3f}, "
            f"R@P90 {best['recall_at_p90']:.3f} → {best_norm['recall_at_p90']:.3f}, false positives at the val "
            f"threshold {best['fp_at_threshold']:.0f} → {best_norm['fp_at_threshold']:.0f}; the ImageNet backbone "
            f"μAP {gap['muap']:.3f} → {gap_norm['muap']:.3f}.")
    if best and _number(best.get("muap_photo")) is not None and _number(gap.get("muap_photo")) is not None:
        photo_norm = (best_norm["muap_photo"], gap_norm["muap_photo"]) if best_norm and gap_norm else None
        lines.append(
            f"- *The trained model is better than its ImageNet start on photographs* (raw and normalized) — "
            + _photo_comparison((best["muap_photo"], gap["muap_photo"]), photo_norm,
                                (best["muap_clipart"], gap["muap_clipart"]))
            + f" A gain of at least {PHOTO_GAIN} counts, raw and normalized alike.")
    return "\n".join(lines)


# The least μAP gain over the ImageNet backbone, raw and normalized, that counts on photographs.
PHOTO_GAIN = 0.03


def _photo_comparison(photo: tuple[float, float], photo_norm: tuple[float, float] | None,
                      clipart: tuple[float, float]) -> str:
    """'<verdict>: photo μAP .. vs. .. (gain), normalized ..; clip art .. vs. .. (gain).' for
    (trained, ImageNet) pairs; the verdict holds when every photo gain given is >= PHOTO_GAIN."""
    def versus(pair: tuple[float, float]) -> str:
        return f"{pair[0]:.3f} vs. {pair[1]:.3f} ({pair[0] - pair[1]:+.3f})"

    gains = [trained - imagenet for trained, imagenet in (photo, photo_norm or photo)]
    text = f"{_verdict(min(gains) >= PHOTO_GAIN)}: photo μAP {versus(photo)}"
    if photo_norm is not None:
        text += f", normalized {versus(photo_norm)}"
    return text + f"; clip art {versus(clipart)}."


def unseen_photographs(results_dir: Path) -> str:
    """The photo finding again, on the generalization check's photo part (pictures and edits
    the study never trained on: results/generalization/table.csv), at the training size."""
    table_csv = results_dir / "generalization" / "table.csv"
    if not table_csv.is_file():
        return ""
    frame = pd.read_csv(table_csv)
    if "muap_photo" not in frame:
        return ""
    frame = frame[frame["image_size"] == frame["image_size"].min()]
    rows = {generalization_method(m): r for m, r in zip(frame["method"], frame.to_dict("records"))}
    best, gap = rows.get("best_finetune"), rows.get("imagenet_gap1280")
    if best is None or gap is None or _number(best["muap_photo"]) is None or _number(gap["muap_photo"]) is None:
        return ""
    normalized = all(_number(row.get("muap_photo_norm")) is not None for row in (best, gap))
    return (f"- *… and on photographs and edits it never saw* (the generalization check: photographs of the "
            f"packages outside the default set, edits in no training family; "
            f"[docs/data.md](docs/data.md#other-pictures-other-edits-a-generalization-check)) — "
            + _photo_comparison((best["muap_photo"], gap["muap_photo"]),
                                (best["muap_photo_norm"], gap["muap_photo_norm"]) if normalized else None,
                                (best["muap_clipart"], gap["muap_clipart"])))


def memory_at_scale(results_dir: Path) -> str:
    """The cross-batch claim where the memory holds less than an epoch, with the remedy that
    measured best (a momentum encoder fills the memory): stage 1 on val, from the memory
    sweeps (results/sweep/memory_{all,5k,default}/table.csv); empty until the one at all
    training pictures has both rows."""
    def scores(name: str) -> dict[str, dict]:
        table = results_dir / "sweep" / name / "table.csv"
        return pd.read_csv(table).set_index("variant").to_dict("index") if table.is_file() else {}

    every, five, default = scores("memory_all"), scores("memory_5k"), scores("memory_default")
    if not {"no_memory", "momentum_0.99"} <= set(every):
        return ""
    mom, none = every["momentum_0.99"], every["no_memory"]
    text = (f"- *Cross-batch negatives beat within-batch negatives at scale, the memory filled by a momentum "
            f"encoder (m = 0.99, MoCo's remedy)* — {_verdict(mom['val_muap'] - none['val_muap'] >= MUAP_TOLERANCE)}: "
            f"stage 1 on every training picture of the full corpus, where the paper's memory of 10,240 holds less "
            f"than an epoch, val μAP {mom['val_muap']:.3f} vs. {none['val_muap']:.3f} without a memory (R@P90 "
            f"{mom['val_recall_at_p90']:.3f} vs. {none['val_recall_at_p90']:.3f}; normalized μAP "
            f"{mom['val_muap_norm']:.3f} vs. {none['val_muap_norm']:.3f})")
    if {"no_memory", "memory", "momentum_0.99"} <= set(five):
        text += (f"; at 5,000 pictures {five['momentum_0.99']['val_muap']:.3f} vs. {five['no_memory']['val_muap']:.3f}, "
                 f"and {five['memory']['val_muap']:.3f} with the plain memory, which collapses")
    if {"no_memory", "memory", "momentum_0.99"} <= set(default):
        text += (f"; on the default corpus (the memory holds more than an epoch) "
                 f"{default['momentum_0.99']['val_muap']:.3f} vs. {default['no_memory']['val_muap']:.3f}, "
                 f"the plain memory {default['memory']['val_muap']:.3f}")
    return text + (". The runs and why the plain memory collapses: "
                   "[docs/study.md](docs/study.md#the-cross-batch-memory-at-scale).")


def normalization_summary(methods_csv: Path, folder_csv: Path | None, backgrounds_csv: Path | None,
                          benchmark_csv: Path | None) -> str:
    """The normalization's effect in numbers: on the test split, against the fixed
    background, and for folders of growing size (generated for the README)."""
    frame = pd.read_csv(methods_csv).set_index("method")
    normalized = [m for m in frame.index if m.endswith("_norm")]
    if not normalized:
        return "(run `dvc repro` to fill this paragraph)"
    lines = []
    top = max(normalized, key=lambda m: frame.at[m, "muap"])
    raw = top[:-len("_norm")]
    t, b = frame.loc[top], frame.loc[raw]
    lines.append(f"- **Test split:** the best normalized method, `{raw}` (k={int(t['norm_k'])}, "
                 f"β={t['norm_beta']:g}), "
                 f"μAP {b['muap']:.3f} → {t['muap']:.3f} ({t['muap'] - b['muap']:+.3f}), R@P90 "
                 f"{b['recall_at_p90']:.3f} → {t['recall_at_p90']:.3f} "
                 f"({t['recall_at_p90'] - b['recall_at_p90']:+.3f}); "
                 f"μAP gained elsewhere: " + ", ".join(
                     f"`{m[:-5]}` {frame.at[m, 'muap'] - frame.at[m[:-5], 'muap']:+.3f}"
                     for m in normalized if m[:-5] in ("phash", "dhash", "backbone_gap1280", "paper_finetune",
                                                       "best_finetune") and m != top) + ".")
    if backgrounds_csv is not None and backgrounds_csv.is_file():
        bg = pd.read_csv(backgrounds_csv)
        best = bg[bg["method"] == "best_finetune"].set_index("background")
        if {"references", "fixed"} <= set(best.index):
            lines.append(f"- **Which background:** for `best_finetune` the references themselves (test μAP "
                         f"{best.at['references', 'muap']:.3f}) beat a fixed set of training pictures "
                         f"({best.at['fixed', 'muap']:.3f}; raw {best.at['raw', 'muap']:.3f}): an image's "
                         f"neighbours in the collection at hand say more than pictures from elsewhere.")
    if folder_csv is not None and folder_csv.is_file():
        folders = pd.read_csv(folder_csv)
        if benchmark_csv is not None and benchmark_csv.is_file():
            large = large_folder_rows(benchmark_csv)
            folders = pd.concat([folders, large], ignore_index=True) if not large.empty else folders
        trained = folders[folders["name"] == "best"]
        parts = []
        for decision in ("raw", "normalized"):
            rows = trained[trained["decision"] == decision].sort_values("images")
            if len(rows):
                parts.append(f"{decision} " + " → ".join(f"{p:.2f}" for p in rows["precision"]))
        sizes = " → ".join(f"{int(n):,}" for n in sorted(trained["images"].unique()))
        if parts:
            lines.append(f"- **Folders** (`mtl dedup`, the trained model; threshold chosen on the val folder for pair "
                         f"precision 0.9, then applied unchanged to folders of {sizes} images): pair precision "
                         + "; ".join(parts) + ". " + transfer_reading(trained[trained["decision"] == "normalized"])
                         + unlabelled_note(trained))
    return "\n".join(lines)


# A threshold "transfers" when the precision it was chosen for holds within this margin.
TRANSFER_MARGIN = 0.1


def unlabelled_note(trained: pd.DataFrame) -> str:
    """The large folder's lower bound: its precision with every accepted pair of two
    unlabelled extra pictures counted as wrong."""
    if "precision_all" not in trained:
        return ""
    large = trained[(trained["split"] == "large") & (trained["decision"] == "normalized")].dropna(
        subset=["precision_all"])
    if large.empty or (large["precision_all"] == large["precision"]).all():
        return ""
    row = large.iloc[0]
    return (f" The large folder's precision leaves out the pairs of two of its extra pictures, which carry no "
            f"labels among themselves (icon themes hold one design in many variants: "
            f"[a sample](results/dedup/unlabelled_pairs.png)); counting each such pair as wrong, normalized "
            f"precision is {row['precision_all']:.2f}, a lower bound.")


def transfer_reading(normalized: pd.DataFrame, target: float = 0.9) -> str:
    """Whether the normalized threshold keeps its precision in larger folders, read from
    the folder rows (one per size)."""
    rows = normalized.sort_values("images")
    lost = rows[rows["precision"] < target - TRANSFER_MARGIN]
    raw_note = ("A raw cosine threshold loses far more: the wrong pairs of a folder grow with the square of its "
                "size, the copies only with its size.")
    if lost.empty:
        return (f"The normalized threshold keeps its precision within {TRANSFER_MARGIN} of the target at every "
                f"size. " + raw_note)
    first = lost.iloc[0]
    held = rows[rows["images"] < first["images"]]
    if held.empty:
        return (f"The normalized threshold does not keep its precision ({first['precision']:.2f} at "
                f"{int(first['images']):,} images). " + raw_note)
    return (f"The normalized threshold keeps its precision within {TRANSFER_MARGIN} of the target up to "
            f"{int(held['images'].max()):,} images but not at {int(first['images']):,} "
            f"({first['precision']:.2f}): there more of the pairs it admits are wrong, so a folder that large "
            f"wants its own threshold (`mtl dedup --threshold`, on the normalized scale). " + raw_note)


def replace_block(text: str, name: str, content: str) -> str:
    """Swap what stands between the markers of table `name`; other text is kept."""
    pattern = re.compile(rf"(<!-- table:{name} -->\n)(?:.*?\n)?(<!-- /table:{name} -->)", re.S)
    if not pattern.search(text):
        return text
    return pattern.sub(lambda m: m.group(1) + content.rstrip("\n") + "\n" + m.group(2), text)


DEDUP_COLUMNS = [
    ("folder", "folder"), ("images", "images"), ("method", "method"), ("scale", "scores"), ("threshold", "threshold"),
    ("predicted_pairs", "pairs"), ("precision", "precision"), ("precision_labelled", "precision, labelled pairs"),
    ("recall", "recall"), ("f1", "F1"), ("f1_labelled", "F1, labelled pairs"),
    ("s_per_1000_images", "s / 1,000 images"), ("images_per_second", "img/s"),
    ("warm_s_per_1000_images", "rerun s / 1,000"), ("peak_mb", "peak MB"),
]


def dedup_table(benchmark_csv: Path) -> str:
    """The last benchmarks/dedup_vs_imagededup.py run (results/dedup/benchmark.csv); while
    it lacks the trained model, a row says how to add it."""
    frame = pd.read_csv(benchmark_csv, dtype={"threshold": str})
    rows = frame.to_dict("records")
    for row in rows:
        for key in ("predicted_pairs", "new_on_rerun", "images"):
            if isinstance(row.get(key), float) and not math.isnan(row[key]):
                row[key] = int(row[key])
    if "mtl_trained" not in set(frame["method"]) and "mtl_trained_raw" not in set(frame["method"]):
        rows.append({**{k: float("nan") for k, _ in DEDUP_COLUMNS}, "method": "mtl_trained",
                     "threshold": "*to be regenerated*", "threshold_source": "`make repro`, then rerun the benchmark"})
    return markdown_table(rows, [(k, h) for k, h in DEDUP_COLUMNS if k in frame.columns])


INDEX_SCALE_COLUMNS = [
    ("n", "references"), ("index", "index"), ("nprobe", "nprobe"), ("build_s", "build s"),
    ("index_mb", "index MB"), ("peak_rss_mb", "peak RSS MB"), ("ms_per_query_batch", "ms/query, batch"),
    ("ms_single_query", "ms, one query"), ("copy_recall_at_10", "copy recall@10"),
    ("recall_at_10_vs_flat", "top-10 overlap with flat"),
]


def index_scale_table(index_csv: Path) -> str:
    """The last `benchmarks/scale_1m.py --index-sizes` run (results/scale/index.csv)."""
    rows = pd.read_csv(index_csv, dtype={"nprobe": str}).to_dict("records")
    for row in rows:
        if isinstance(row.get("note"), str):  # a flat index too large to build: its size is computed
            row["index"] = f"{row['index']} (not built: {row['index_mb'] / 1024:.1f} GB)"
            row["index_mb"] = float("nan")
    return markdown_table(rows, INDEX_SCALE_COLUMNS)


def density_cost_table(cost_csv: Path) -> str:
    """`benchmarks/density_cost.py` part 1: CPU seconds (one thread) and memory of every
    reference's densities, flat and IVF-PQ; extrapolated rows say so."""
    rows = pd.read_csv(cost_csv).to_dict("records")
    for row in rows:
        if row.get("extrapolated") in (True, "True"):
            row["densities_s"] = f"{row['densities_s']:,.0f} (from {int(row['measured_rows']):,} rows)"
    return markdown_table(rows, [("references", "references"), ("index", "index"), ("build_s", "build CPU s"),
                                 ("densities_s", "densities CPU s"), ("densities_mb", "densities MB"),
                                 ("peak_mb", "peak RSS MB")])


def density_exactness_table(exactness_csv: Path) -> str:
    """`benchmarks/density_cost.py --exactness`: IVF-PQ's densities against exact ones on real
    descriptors, and what they do to normalized retrieval."""
    return markdown_table(pd.read_csv(exactness_csv).to_dict("records"), [
        ("gallery", "gallery"), ("search", "densities and search"), ("nprobe", "nprobe"),
        ("median_density_error", "median error of ρ"), ("p95_density_error", "p95 error of ρ"),
        ("density_rank_correlation", "rank corr. with exact ρ"), ("muap", "μAP"), ("recall_at_p90", "R@P90")])


def render_tables(metrics: dict, results_dir: Path = RESULTS, params: dict | None = None) -> dict[str, str]:
    tables = {
        "corpus": corpus_table(metrics),
        "evalset": evalset_table(metrics),
        "features": features_table(metrics),
        "training": training_table(metrics),
        "embeddings": embeddings_table(metrics),
        "timing": timing_table(metrics, results_dir),
        "findings": "\n".join(part for part in (findings(metrics), unseen_photographs(results_dir),
                                                  memory_at_scale(results_dir)) if part),
        **diagnosis_tables(results_dir),
        **sweep_tables(results_dir),
    }
    if params is not None:
        tables["recipes"] = recipes_table(params)
    if (packages := packages_default_table(metrics)) is not None:
        tables["packages_default"] = packages
    methods_csv = results_dir / "evaluate" / "methods.csv"
    if methods_csv.is_file():
        tables["retrieval"] = retrieval_table(methods_csv)
        tables["headline"] = headline_table(methods_csv)
    backgrounds_csv = results_dir / "evaluate" / "backgrounds.csv"
    if backgrounds_csv.is_file():
        tables["backgrounds"] = backgrounds_table(backgrounds_csv)
    folder_csv = results_dir / "evaluate" / "folder.csv"
    if folder_csv.is_file():
        tables["folder"] = folder_table(folder_csv, results_dir / "dedup" / "benchmark.csv")
    if methods_csv.is_file():
        tables["normalization_summary"] = normalization_summary(methods_csv, folder_csv, backgrounds_csv,
                                                                results_dir / "dedup" / "benchmark.csv")
    probe_csv = results_dir / "memory" / "probe" / "summary.csv"
    if probe_csv.is_file():
        tables["memory_probe"] = memory_probe_table(probe_csv)
        tables["memory_reading"] = memory_reading(probe_csv)
    generalization_csv = results_dir / "generalization" / "table.csv"
    if generalization_csv.is_file():
        tables["generalization"] = generalization_table(generalization_csv)
    dedup_csv = results_dir / "dedup" / "benchmark.csv"
    if dedup_csv.is_file():
        tables["dedup"] = dedup_table(dedup_csv)
    tables.update(scale_tables(results_dir))
    if (run_times := run_times_table(results_dir)) is not None:
        tables["run_times"] = run_times
    for name, make, csv in (("density_cost", density_cost_table, results_dir / "scale" / "densities.csv"),
                            ("density_exactness", density_exactness_table,
                             results_dir / "scale" / "densities_exactness.csv")):
        if csv.is_file():
            tables[name] = make(csv)
    index_csv = results_dir / "scale" / "index.csv"
    if index_csv.is_file():
        tables["index_scale"] = index_scale_table(index_csv)
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtl.report", description=__doc__)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--readme", default=None, help="README to update between table markers (the docs/ "
                        "pages beside it too)")
    parser.add_argument("--params", default="params.yaml", help="the parameters (for the recipes table)")
    args = parser.parse_args(argv)
    results_dir = Path(args.results)
    metrics = gather_metrics(results_dir)
    atomic_write_text(results_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    params = load_params(args.params) if Path(args.params).is_file() else None
    tables = render_tables(metrics, results_dir, params)
    atomic_write_text(results_dir / "tables.md", "\n\n".join(f"## {k}\n\n{v}" for k, v in tables.items()) + "\n")
    if args.readme and Path(args.readme).is_file():
        readme = Path(args.readme)
        for page in [readme, *sorted((readme.parent / "docs").glob("*.md"))]:
            text = page.read_text()
            for name, table in tables.items():
                text = replace_block(text, name, table)
            if text != page.read_text():
                atomic_write_text(page, text)
    print(f"wrote {results_dir / 'metrics.json'} ({len(metrics)} sections)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
