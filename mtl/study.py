"""The study's stages, one function each, as the DVC pipeline runs them.

Each notebook in notebooks/ is a parameters cell, one call to a function here,
and the figures.  Everything a stage computes lives in this module (and the
modules it calls), so the tiny end-to-end test reaches all of it.

Each stage writes results/<stage>/metrics.json (with its wall time) and its
figures; `mtl.report` gathers them into results/metrics.json.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from mtl.io import atomic_path, file_digest, write_csv, write_json

RESULTS = Path("results")


# --------------------------------------------------------------------------- helpers

@contextmanager
def stopwatch() -> Iterator[dict]:
    """`with stopwatch() as t: ...` then t["seconds"]."""
    timing = {"started": time.perf_counter()}
    yield timing
    timing["seconds"] = round(time.perf_counter() - timing["started"], 2)


# --------------------------------------------------------------------------- corpus

def corpus_stage(params: dict, results_dir: str | Path = RESULTS / "corpus") -> dict:
    """Build the corpus; write the per-class contact sheets side by side and the counts."""
    from PIL import Image

    from mtl.data.corpus import build_corpus
    from mtl.data.sheets import side_by_side

    results_dir = Path(results_dir)
    with stopwatch() as timing:
        report = build_corpus(params["data"])
    corpus_dir = Path(params["data"]["corpus_dir"])
    combined = side_by_side([Image.open(corpus_dir / name) for name in report["contact_sheets"].values()])
    with atomic_path(results_dir / "contact_sheets.png") as tmp:
        combined.save(tmp, optimize=True)
    with atomic_path(results_dir / "near_blank.png") as tmp:
        shutil.copyfile(corpus_dir / report["near_blank_sheet"], tmp)
    if report.get("package_sheets"):
        from mtl.scale_report import package_overview

        package_overview(corpus_dir, results_dir / "packages.png")
    metrics = {key: report[key] for key in ("images", "splits", "counts", "groups", "rejections", "duplicates",
                                            "timings", "disk", "decode", "per_package") if key in report}
    metrics["wall_seconds"] = timing["seconds"]
    write_json(results_dir / "metrics.json", metrics)
    return report


# --------------------------------------------------------------------------- evaluation set

def evalset_stage(params: dict, results_dir: str | Path = RESULTS / "evalset") -> dict:
    from mtl.data.evalset import build_evalset

    results_dir = Path(results_dir)
    corpus_dir = Path(params["data"]["corpus_dir"])
    eval_dir = Path(params["evalset"]["dir"])
    with stopwatch() as timing:
        summary = build_evalset(corpus_dir / "manifest.csv", corpus_dir, eval_dir, params["evalset"])
    with atomic_path(results_dir / "gallery.png") as tmp:
        shutil.copyfile(eval_dir / "gallery.png", tmp)
    metrics = {"splits": summary["splits"], "transformations": len(summary["transformations"]),
               "held_out_transformations": len(summary["held_out"]), "wall_seconds": timing["seconds"]}
    write_json(results_dir / "metrics.json", metrics)
    return summary


# --------------------------------------------------------------------------- stage-1 feature cache

def features_stage(params: dict, results_dir: str | Path = RESULTS / "features") -> dict:
    """Build the train and val feature caches the frozen stages learn from (mtl.features),
    and measure stage-1 steps/s from the cache against the image path."""
    from mtl.training.config import StageConfig
    from mtl.training.stage import feature_batches, stage_model, step_rates

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


# --------------------------------------------------------------------------- training

def train_stage_report(params: dict, run_name: str, stage: str, out_dir: str | Path,
                       init: str | Path | None = None, results_dir: str | Path | None = None) -> dict:
    """Train, then write the log, the loss curves (Fig. 3 / Fig. 4) and the metrics."""
    from mtl import plots
    from mtl.training.outputs import summarize_log
    from mtl.training.stage import train_run

    results_dir = Path(results_dir or RESULTS / run_name)
    with stopwatch() as timing:
        train_run(params, stage, out_dir, init)
    log = pd.read_csv(Path(out_dir) / "log.csv")
    write_csv(log, results_dir / "log.csv")
    title = {"frozen": "Stage 1: backbone frozen, branches trained",
             "finetune": "Stage 2: whole network fine-tuned"}[stage]
    memory, margin = int(params["loss"]["memory_size"]), params["loss"]["margin"]
    plots.loss_curves(log, f"{title} (margin {margin}, memory {memory:,})", results_dir / "loss_curves.png")
    metrics = summarize_log(log)
    metrics["memory_size"] = memory
    metrics["stage_wall_seconds"] = timing["seconds"]
    write_json(results_dir / "metrics.json", metrics)
    return metrics


# --------------------------------------------------------------------------- embedding space (Fig. 5)

def anchor_views(params: dict) -> tuple[list, np.ndarray, np.ndarray, list[str]]:
    """Test-split anchors and their eval-family transformed views, seeded.

    Returns (images, group, is_anchor, transformation names)."""
    from mtl.data.batches import load_original, split_originals
    from mtl.data.transforms import EVAL_FAMILY, apply
    from mtl.eval.space import EmbeddingsConfig

    cfg = EmbeddingsConfig.from_params(params["embeddings"])
    corpus_dir = Path(params["data"]["corpus_dir"])
    originals = split_originals(corpus_dir / "manifest.csv", corpus_dir, "test")
    rng = np.random.default_rng(cfg.seed)
    chosen = rng.choice(len(originals), size=min(cfg.anchors, len(originals)), replace=False)
    images, group, is_anchor, names = [], [], [], []
    for a, index in enumerate(sorted(chosen)):
        original = load_original(originals[index].path)
        images.append(original), group.append(a), is_anchor.append(True), names.append("anchor")
        for v in range(cfg.views_per_anchor):
            name = EVAL_FAMILY[(a + v) % len(EVAL_FAMILY)]
            images.append(apply(name, original, (cfg.seed, a, v)))
            group.append(a), is_anchor.append(False), names.append(name)
    return images, np.array(group), np.array(is_anchor), names


def embeddings_stage(params: dict, after_checkpoint: str | Path = "models/best/finetune/final.pt",
                     results_dir: str | Path = RESULTS / "embeddings") -> dict:
    """t-SNE and UMAP of anchors + views before training (pretrained backbone,
    untrained branches) and after stage 2, with the numbers behind the pictures."""
    from mtl import plots
    from mtl.eval.embed import embed_pictures
    from mtl.eval.evaluation import EvalConfig
    from mtl.eval.space import EmbeddingsConfig, project_tsne, project_umap, score_space
    from mtl.model import MTLNet
    from mtl.runtime import resolve_device, seed_everything

    results_dir = Path(results_dir)
    cfg = EmbeddingsConfig.from_params(params["embeddings"])
    device = resolve_device(EvalConfig.from_params(params["eval"]).device)
    with stopwatch() as timing:
        images, group, is_anchor, _ = anchor_views(params)
        after = MTLNet.from_checkpoint(after_checkpoint).to(device)
        seed_everything(cfg.seed)
        before = MTLNet(after.config).to(device)  # same backbone weights source, fresh branches
        vectors = {"before": embed_pictures(before, images, cfg.image_size),
                   "after": embed_pictures(after, images, cfg.image_size)}
        scores = {when: score_space(v, group, is_anchor).as_dict() for when, v in vectors.items()}
        panels = {}
        for when, v in vectors.items():
            panels[f"t-SNE, {when} training"] = project_tsne(v, cfg.seed)
        for when, v in vectors.items():
            panels[f"UMAP, {when} training"] = project_umap(v, cfg.seed)
    plots.projections(panels, group, is_anchor, results_dir / "projections.png",
                      title=f"{int(is_anchor.sum())} test anchors (stars) and their transformed views")
    metrics = {**scores, "anchors": int(is_anchor.sum()), "views": int((~is_anchor).sum()),
               "wall_seconds": timing["seconds"]}
    write_json(results_dir / "metrics.json", metrics)
    return metrics


# --------------------------------------------------------------------------- retrieval (evaluation)

# The recipes that run both stages, and the stage-1 controls with within-batch negatives
# only (memory 0, Fig. 2 top) that test the paper's cross-batch claim for each recipe.
RECIPES = ("paper", "best")
CONTROLS = ("paper_mem0", "best_mem0")
MODELS = Path("models")


def checkpoint_path(recipe: str, stage: str) -> Path:
    """models/<recipe>/<stage>/final.pt: where the pipeline keeps a recipe's stage."""
    return MODELS / recipe / stage / "final.pt"


def evaluation_passes(params: dict) -> list:
    """Which checkpoints the evaluation embeds, and the methods each pass yields."""
    from mtl.eval.evaluation import EvalConfig
    from mtl.eval.methods import CheckpointPass

    larger = EvalConfig.from_params(params["eval"]).larger_image_size
    passes = []
    for recipe in RECIPES:
        imagenet = recipe == "best"  # a frozen stage's backbone is the untouched ImageNet one
        passes += [
            CheckpointPass(checkpoint_path(recipe, "frozen"), mtl=f"{recipe}_frozen",
                           gap1280="backbone_gap1280" if imagenet else None,
                           pca320="backbone_pca320" if imagenet else None),
            CheckpointPass(checkpoint_path(f"{recipe}_mem0", "frozen"), mtl=f"{recipe}_frozen_mem0"),
            CheckpointPass(checkpoint_path(recipe, "finetune"), mtl=f"{recipe}_finetune",
                           gap1280=f"{recipe}_finetune_gap1280"),
        ]
    # Evaluated larger than trained (SSCD's finding), next to the ImageNet baseline at that size.
    passes += [CheckpointPass(checkpoint_path("best", "frozen"), gap1280=f"backbone_gap1280_{larger}px",
                              image_size=larger),
               CheckpointPass(checkpoint_path("best", "finetune"), mtl=f"best_finetune_{larger}px",
                              image_size=larger)]
    return passes


def method_order(paths: dict) -> dict:
    """Baselines first, then each recipe's methods stage by stage, the larger input last."""
    first = [name for name in ("phash", "dhash", "backbone_gap1280", "backbone_pca320") if name in paths]
    return {name: paths[name] for name in [*first, *sorted(set(paths) - set(first), key=_recipe_order)]}


def _recipe_order(name: str) -> tuple:
    recipe, _, rest = name.partition("_")
    stages = ["frozen", "frozen_mem0", "finetune", "finetune_gap1280"]
    larger = name.endswith("px")  # the larger-input rows close the table
    return (larger, RECIPES.index(recipe) if recipe in RECIPES else -1,
            stages.index(rest) if rest in stages else len(stages), rest)


def evaluate_stage(params: dict, embeddings_dir: str | Path = "data/embeddings",
                   results_dir: str | Path = RESULTS / "evaluate", passes: list | None = None):
    """Every method on the same eval files, one table; PR curves, recall per
    transformation, the worst errors as image pairs, and the operating points."""
    from mtl import plots
    from mtl.eval.evaluation import EvalConfig, evaluate_methods, image_pairs
    from mtl.eval.methods import embed_methods
    from mtl.eval.operating_points import write_operating_points

    results_dir = Path(results_dir)
    cfg = EvalConfig.from_params(params["eval"])
    eval_dir = params["evalset"]["dir"]
    with stopwatch() as timing:
        paths = embed_methods(eval_dir, embeddings_dir, passes or evaluation_passes(params),
                              corpus_dir=params["data"]["corpus_dir"], image_size=cfg.image_size,
                              batch_size=cfg.batch_size, device=cfg.device, overwrite=True)
        evaluation = evaluate_methods(eval_dir, method_order(paths), k=cfg.top_k,
                                      target_precision=cfg.target_precision,
                                      decisions_from=[f"{r}_finetune" for r in RECIPES if f"{r}_finetune" in paths])
    evaluation.save(results_dir)
    write_operating_points(evaluation.table, cfg, checkpoint_path("best", "finetune"), MODELS / "operating_points.json")
    plots.pr_curves(evaluation.pr_curve_arrays(), results_dir / "pr_curves.png")
    per_t = evaluation.per_transformation
    shown = per_t[per_t["method"].isin(["phash", "backbone_gap1280", "paper_finetune", "best_finetune"])]
    plots.bar_chart(shown, x="transformation", y="recall_at_threshold", hue="method",
                    path=results_dir / "per_transformation.png",
                    title="recall at the val threshold, per transformation (held out: perspective, meme, "
                          "screenshot, compose)")
    plots.image_pairs(image_pairs(evaluation.worst_false_positives(8), ("score", "transformation", "source_group")),
                      results_dir / "worst_false_positives.png",
                      title="best_finetune: highest-scoring false matches")
    plots.image_pairs(image_pairs(evaluation.missed_copies(8)), results_dir / "missed_copies.png",
                      title="best_finetune: copies ranked lowest")
    metrics_path = results_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["wall_seconds"] = timing["seconds"]
    write_json(metrics_path, metrics)
    return evaluation
