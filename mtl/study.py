"""The study's stages, one function each, as the DVC pipeline runs them.

Each notebook in notebooks/ is a parameters cell, one call to a function here,
and the figures.  Everything a stage computes lives in this module (and the
modules it calls), so the tiny end-to-end test reaches all of it.

Each stage writes results/<stage>/metrics.json (with its wall time) and its
figures; `mtl.report` gathers them into results/metrics.json.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from mtl.io import UserError, atomic_path, atomic_write_text, file_digest, is_temp_of, some_names, write_csv

RESULTS = Path("results")
# What a training run writes in its folder (besides temporary files of these).
RUN_FILES = ("run.json", "last.pt", "final.pt", "log.csv")


# --------------------------------------------------------------------------- helpers

def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


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

    results_dir = Path(results_dir)
    with stopwatch() as timing:
        report = build_corpus(params["data"])
    corpus_dir = Path(params["data"]["corpus_dir"])
    sheets = [Image.open(corpus_dir / name) for name in report["contact_sheets"].values()]
    combined = Image.new("RGB", (sum(s.width for s in sheets) + 16 * (len(sheets) - 1),
                                 max(s.height for s in sheets)), "white")
    x = 0
    for sheet in sheets:
        combined.paste(sheet, (x, 0))
        x += sheet.width + 16
    with atomic_path(results_dir / "contact_sheets.png") as tmp:
        combined.save(tmp, optimize=True)
    metrics = {key: report[key] for key in ("images", "splits", "counts", "groups", "rejections", "duplicates")}
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


# --------------------------------------------------------------------------- training

def package_digest() -> str:
    """One digest of every source file of the `mtl` package."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


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


def train_run(params: dict, stage: str, out_dir: str | Path, init: str | Path | None = None) -> Path:
    """Train one stage (§III-A) from params; resumes an interrupted run; returns final.pt."""
    from dataclasses import asdict

    from mtl.train import StageConfig, corpus_batches, stage_model, train_stage

    out_dir = Path(out_dir)
    cfg = StageConfig.from_params(params, stage)
    model = stage_model(params, cfg, init)
    manifest = Path(params["data"]["corpus_dir"]) / "manifest.csv"
    prepare_run_dir(out_dir, {"stage_config": asdict(cfg), "model_config": model.config.to_dict(),
                              "init": file_digest(init) if init is not None else None,
                              "corpus": file_digest(manifest), "code": package_digest()})
    return train_stage(model, cfg, *corpus_batches(params, cfg, model), out_dir)


def summarize_log(log: pd.DataFrame) -> dict:
    """Headline numbers of a training log (its last epoch, mean throughput)."""
    last = log.iloc[-1]
    summary = {"epochs": int(last["epoch"]), "images_per_second": float(log["images_per_second"].mean()),
               "wall_seconds": float(log["wall_seconds"].sum())}
    for column in ("train_total", "val_total", "train_contrastive", "val_contrastive", "train_cross_entropy",
                   "val_cross_entropy", "val_class_accuracy"):
        if column in log:
            summary[f"final_{column}"] = float(last[column])
    for column in ("train_total", "train_contrastive"):
        if column in log:
            summary[f"first_{column}"] = float(log[column].iloc[0])
    for column in ("train_negatives", "train_active_negatives", "train_positive_pairs"):
        if column in log:
            summary[f"mean_{column}"] = float(log[column].mean())
    return summary


def train_stage_report(params: dict, run_name: str, stage: str, out_dir: str | Path,
                       init: str | Path | None = None, results_dir: str | Path | None = None) -> dict:
    """Train, then write the log, the loss curves (Fig. 3 / Fig. 4) and the metrics."""
    from mtl import plots

    results_dir = Path(results_dir or RESULTS / run_name)
    with stopwatch() as timing:
        train_run(params, stage, out_dir, init)
    log = pd.read_csv(Path(out_dir) / "log.csv")
    write_csv(log, results_dir / "log.csv")
    title = {"frozen": "Stage 1: backbone frozen, branches trained",
             "finetune": "Stage 2: whole network fine-tuned"}[stage]
    memory = int(params["loss"]["memory_size"])
    plots.loss_curves(log, f"{title} (memory {memory:,})", results_dir / "loss_curves.png")
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

    cfg = params["embeddings"]
    corpus_dir = Path(params["data"]["corpus_dir"])
    originals = split_originals(corpus_dir / "manifest.csv", corpus_dir, "test")
    rng = np.random.default_rng(cfg["seed"])
    chosen = rng.choice(len(originals), size=min(cfg["anchors"], len(originals)), replace=False)
    images, group, is_anchor, names = [], [], [], []
    for a, index in enumerate(sorted(chosen)):
        original = load_original(originals[index].path)
        images.append(original), group.append(a), is_anchor.append(True), names.append("anchor")
        for v in range(cfg["views_per_anchor"]):
            name = EVAL_FAMILY[(a + v) % len(EVAL_FAMILY)]
            images.append(apply(name, original, (cfg["seed"], a, v)))
            group.append(a), is_anchor.append(False), names.append(name)
    return images, np.array(group), np.array(is_anchor), names


def embed_pil(model, images: list, image_size: int, batch_size: int = 64) -> np.ndarray:
    """Embeddings of in-memory images (eval preprocessing), on the model's device."""
    import torch

    from mtl.data.batches import to_model_input

    mean, std = model.normalization
    device = next(model.parameters()).device
    model.eval()
    rows = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.stack([to_model_input(im, image_size, mean, std) for im in images[start:start + batch_size]])
            rows.append(model(batch.to(device)).embedding.float().cpu().numpy())
    return np.concatenate(rows)


def embeddings_stage(params: dict, after_checkpoint: str | Path = "models/finetune/final.pt",
                     results_dir: str | Path = RESULTS / "embeddings") -> dict:
    """t-SNE and UMAP of anchors + views before training (pretrained backbone,
    untrained branches) and after stage 2, with the numbers behind the pictures."""
    from mtl import plots
    from mtl.eval.space import project_tsne, project_umap, score_space
    from mtl.model import MTLNet
    from mtl.runtime import resolve_device, seed_everything

    results_dir = Path(results_dir)
    cfg = params["embeddings"]
    device = resolve_device(params["eval"].get("device", "auto"))
    with stopwatch() as timing:
        images, group, is_anchor, _ = anchor_views(params)
        after = MTLNet.from_checkpoint(after_checkpoint).to(device)
        seed_everything(cfg["seed"])
        before = MTLNet(after.config).to(device)  # same backbone weights source, fresh branches
        vectors = {"before": embed_pil(before, images, cfg["image_size"]),
                   "after": embed_pil(after, images, cfg["image_size"])}
        scores = {when: score_space(v, group, is_anchor).as_dict() for when, v in vectors.items()}
        panels = {}
        for when, v in vectors.items():
            panels[f"t-SNE, {when} training"] = project_tsne(v, cfg["seed"])
        for when, v in vectors.items():
            panels[f"UMAP, {when} training"] = project_umap(v, cfg["seed"])
    plots.projections(panels, group, is_anchor, results_dir / "projections.png",
                      title=f"{int(is_anchor.sum())} test anchors (stars) and their transformed views")
    metrics = {**scores, "anchors": int(is_anchor.sum()), "views": int((~is_anchor).sum()),
               "wall_seconds": timing["seconds"]}
    write_json(results_dir / "metrics.json", metrics)
    return metrics


# --------------------------------------------------------------------------- retrieval (evaluation)

CHECKPOINTS = {"mtl_frozen": "models/frozen/final.pt",
               "mtl_finetune_mem0": "models/finetune_mem0/final.pt",
               "mtl_finetune": "models/finetune/final.pt"}


def evaluate_stage(params: dict, checkpoints: dict | None = None, embeddings_dir: str | Path = "data/embeddings",
                   results_dir: str | Path = RESULTS / "evaluate"):
    """Every method on the same eval files, one table; PR curves, recall per
    transformation, and the worst errors as image pairs."""
    from mtl import plots
    from mtl.eval.methods import embed_methods, evaluate_methods, image_pairs

    results_dir = Path(results_dir)
    cfg = params["eval"]
    eval_dir = params["evalset"]["dir"]
    with stopwatch() as timing:
        paths = embed_methods(eval_dir, embeddings_dir, checkpoints or CHECKPOINTS,
                              corpus_dir=params["data"]["corpus_dir"], image_size=cfg["image_size"],
                              batch_size=cfg["batch_size"], device=cfg.get("device", "auto"), overwrite=True)
        evaluation = evaluate_methods(eval_dir, paths, k=cfg["top_k"], target_precision=cfg["target_precision"])
    evaluation.save(results_dir)
    plots.pr_curves(evaluation.pr_curve_arrays(), results_dir / "pr_curves.png")
    per_t = evaluation.per_transformation
    plots.bar_chart(per_t, x="transformation", y="recall_at_threshold", hue="method", path=results_dir / "per_transformation.png",
                    title="recall at the val threshold, per transformation (held-out marked *)")
    plots.image_pairs(image_pairs(evaluation.worst_false_positives(8)), results_dir / "worst_false_positives.png",
                      title="mtl_finetune: highest-scoring false matches")
    plots.image_pairs(image_pairs(evaluation.missed_copies(8)), results_dir / "missed_copies.png",
                      title="mtl_finetune: copies ranked lowest")
    metrics_path = results_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["wall_seconds"] = timing["seconds"]
    write_json(metrics_path, metrics)
    return evaluation
