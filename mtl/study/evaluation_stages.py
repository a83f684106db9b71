"""The evaluation stages of the pipeline: `embeddings` (the paper's Fig. 5, with numbers,
notebooks/embeddings.ipynb) and `evaluate` (every method on the same eval files,
notebooks/evaluate.ipynb).  Each stage writes results/<stage>/metrics.json (with its wall time) and its figures;
`mtl.report` gathers them into results/metrics.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from mtl import plots
from mtl.eval.embed import embed_pictures
from mtl.eval.embeddings import load_npz
from mtl.eval.evaluation import EvalConfig, EvalSplit, compare_backgrounds, evaluate_methods, image_pairs
from mtl.eval.methods import SPLITS, CheckpointPass, embed_backgrounds, embed_methods
from mtl.eval.operating_points import (OPERATING_POINT_METHODS, folder_decisions, load_operating_points,
                                       write_operating_points)
from mtl.eval.space import EmbeddingsConfig, anchor_views, project_tsne, project_umap, score_space
from mtl.io import write_csv, write_json
from mtl.model import MTLNet
from mtl.runtime import resolve_device, seed_everything, stopwatch

RESULTS = Path("results")


def embeddings_stage(params: dict, after_checkpoint: str | Path = "models/best/finetune/final.pt",
                     results_dir: str | Path = RESULTS / "embeddings") -> dict:
    """t-SNE and UMAP of anchors + views before training (pretrained backbone,
    untrained branches) and after stage 2, with the numbers behind the pictures."""
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


# --------------------------------------------------------------------------- retrieval

# The recipes that run both stages, and the stage-1 controls with within-batch negatives
# only (memory 0, Fig. 2 top) that test the paper's cross-batch claim for each recipe.
RECIPES = ("paper", "best")
CONTROLS = ("paper_mem0", "best_mem0")
MODELS = Path("models")
# The headline precision-recall figure (at most 7 methods, in the table's order), and the
# ablations' figure.
HEADLINE_CURVES = ("phash", "dhash", "backbone_gap1280", "paper_finetune", "best_finetune", "best_finetune_160px")
ABLATION_CURVES = ("backbone_pca320", "paper_frozen", "paper_frozen_mem0", "best_frozen", "best_frozen_mem0",
                   "best_finetune", "best_finetune_gate", "best_finetune_fusion", "best_finetune_gap1280")
# The methods whose false positives are counted by content type (the class branch's claim).
FALSE_POSITIVE_KIND_METHODS = ("backbone_gap1280", "paper_finetune", "best_finetune", "best_finetune_norm")
# The methods whose normalization is also measured with a fixed background of training pictures.
BACKGROUND_METHODS = ("backbone_gap1280", "paper_finetune", "best_finetune")


def models_dir(params: dict | None = None) -> Path:
    """Where the pipeline keeps its checkpoints and operating points (params `pipeline.models`)."""
    return Path(((params or {}).get("pipeline") or {}).get("models", MODELS))


def checkpoint_path(recipe: str, stage: str, params: dict | None = None) -> Path:
    """<models>/<recipe>/<stage>/final.pt: where the pipeline keeps a recipe's stage."""
    return models_dir(params) / recipe / stage / "final.pt"


def pipeline_runs(params: dict) -> tuple[list[str], list[str]]:
    """(stage-1 runs, stage-2 runs) the pipeline trains (params.yaml `pipeline`)."""
    pipeline = params.get("pipeline") or {"frozen": [*RECIPES, *CONTROLS], "finetune": list(RECIPES)}
    return list(pipeline["frozen"]), list(pipeline["finetune"])


def evaluation_passes(params: dict) -> list:
    """Which checkpoints the evaluation embeds (the runs the pipeline trains), and the
    methods each pass yields."""
    larger = EvalConfig.from_params(params["eval"]).larger_image_size
    frozen, finetune = pipeline_runs(params)
    if "best" not in frozen or "best" not in finetune:
        raise ValueError("the pipeline must train both stages of `best` (params.yaml pipeline.frozen and .finetune)")
    passes = []
    for recipe in RECIPES:
        imagenet = recipe == "best"  # a frozen stage's backbone is the untouched ImageNet one
        if recipe in frozen:
            passes.append(CheckpointPass(checkpoint_path(recipe, "frozen", params), mtl=f"{recipe}_frozen",
                                         gap1280="backbone_gap1280" if imagenet else None,
                                         pca320="backbone_pca320" if imagenet else None))
        if f"{recipe}_mem0" in frozen:
            passes.append(CheckpointPass(checkpoint_path(f"{recipe}_mem0", "frozen", params),
                                         mtl=f"{recipe}_frozen_mem0"))
        if recipe in finetune:
            passes.append(CheckpointPass(checkpoint_path(recipe, "finetune", params), mtl=f"{recipe}_finetune",
                                         gap1280=f"{recipe}_finetune_gap1280"))
    # Evaluated larger than trained (SSCD's finding), next to the ImageNet baseline at that size.
    passes += [CheckpointPass(checkpoint_path("best", "frozen", params), gap1280=f"backbone_gap1280_{larger}px",
                              image_size=larger),
               CheckpointPass(checkpoint_path("best", "finetune", params), mtl=f"best_finetune_{larger}px",
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
    """Every method on the same eval files, one table, raw and normalized; the normalization's
    backgrounds side by side; PR curves, recall per transformation, the worst errors as image
    pairs; the operating points and how their decisions transfer from the val folder to test."""
    results_dir = Path(results_dir)
    cfg = EvalConfig.from_params(params["eval"])
    eval_dir = params["evalset"]["dir"]
    passes = passes or evaluation_passes(params)
    with stopwatch() as timing:
        paths = embed_methods(eval_dir, embeddings_dir, passes, corpus_dir=params["data"]["corpus_dir"],
                              image_size=cfg.image_size, batch_size=cfg.batch_size, device=cfg.device, overwrite=True)
        backgrounds = embed_backgrounds(embeddings_dir, passes, [m for m in BACKGROUND_METHODS if m in paths],
                                        params["data"]["corpus_dir"], cfg.background_images, cfg.image_size,
                                        cfg.batch_size, cfg.device)
        evaluation = evaluate_methods(eval_dir, method_order(paths), k=cfg.top_k,
                                      target_precision=cfg.target_precision,
                                      decisions_from=[f"{r}_finetune" for r in RECIPES if f"{r}_finetune" in paths],
                                      norm_ks=cfg.norm_k_grid, norm_betas=cfg.norm_beta_grid)
        background_table = compare_backgrounds(eval_dir, paths, backgrounds, cfg.top_k, cfg.target_precision,
                                               cfg.norm_k_grid, cfg.norm_beta_grid)
        splits = {split: EvalSplit.load(eval_dir, split) for split in SPLITS}
        embedded = {split: {method: load_npz(files[split]) for method, files in paths.items()
                            if method in OPERATING_POINT_METHODS} for split in SPLITS}
        points_path = write_operating_points(embedded["val"], splits["val"], cfg,
                                             checkpoint_path("best", "finetune", params),
                                             models_dir(params) / "operating_points.json", evaluation.table)
        folder_table = folder_decisions(load_operating_points(points_path), embedded, splits)
    evaluation.save(results_dir)
    write_csv(background_table, results_dir / "backgrounds.csv")
    write_csv(folder_table, results_dir / "folder.csv")
    kinds = evaluation.false_positive_kinds([m for m in FALSE_POSITIVE_KIND_METHODS if m in evaluation.test_predictions])
    write_csv(kinds, results_dir / "false_positive_kinds.csv")
    curves = evaluation.pr_curve_arrays()
    headline = [m for m in HEADLINE_CURVES if m in curves]
    plots.pr_curves({"raw scores": {m: curves[m] for m in headline},
                     "normalized scores": {m: curves[f"{m}_norm"] for m in headline if f"{m}_norm" in curves}},
                    results_dir / "pr_curves.png", title="test split, every query pooled")
    ablations = [m for m in ABLATION_CURVES if m in curves]
    plots.pr_curves({"raw scores": {m: curves[m] for m in ablations},
                     "normalized scores": {m: curves[f"{m}_norm"] for m in ablations if f"{m}_norm" in curves}},
                    results_dir / "pr_curves_ablations.png", title="test split: the stages, controls and decisions")
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
    for method, same in kinds[kinds["same_type"]].groupby("method")["false_positives"].sum().items():
        metrics[method]["fp_same_type"] = int(same)   # wrong matches no class gate can separate
    write_json(metrics_path, metrics)
    return evaluation
