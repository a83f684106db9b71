"""A stage made from the study's parameters: the network it starts from, its batches
(views of the corpus's images, or the stage-1 feature cache of mtl.features), the
fingerprint of everything else that decides what it learns, and the run itself
(:func:`train_run`, as the pipeline trains), plus the speed of the two batch sources."""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from mtl import distributed
from mtl.data.batches import Batch, make_stage_batches
from mtl.data.manifest import class_names_from_manifest, is_photo_row, read_manifest, split_originals
from mtl.data.splits import write_train_subset
from mtl.features import cache_batches, split_caches
from mtl.io import file_digest
from mtl.model import MTLNet, ModelConfig
from mtl.runtime import seed_everything
from mtl.training.config import StageConfig
from mtl.training.loop import StageRun, train_stage
from mtl.training.outputs import prepare_run_dir


def stage_model(params: dict, cfg: StageConfig, init: str | Path | None = None) -> MTLNet:
    """The network a stage starts from: `init` (the frozen stage's checkpoint, which the
    finetune stage needs), or a fresh network with the classes the corpus has, its
    branches initialized from the stage's seed."""
    if init is not None:
        return MTLNet.from_checkpoint(init)
    if cfg.stage == "finetune":
        raise ValueError("the finetune stage starts from the frozen stage's checkpoint: pass init")
    classes = tuple(class_names_from_manifest(Path(params["data"]["corpus_dir"]) / "manifest.csv"))
    seed_everything(cfg.seed)
    return MTLNet(ModelConfig.from_dict({**params["model"], "num_classes": len(classes), "class_names": classes}))


def corpus_batches(params: dict, cfg: StageConfig, model: MTLNet
                   ) -> tuple[Callable[[int], Iterable[Batch]], Callable[[], Iterable[Batch]]]:
    """(make_train_batches, make_val_batches) over the corpus of params.yaml, in the
    model's normalization and class order: views of images, or (``source: features``)
    the stored backbone taps of such views (built first when missing or stale)."""
    corpus_dir = Path(params["data"]["corpus_dir"])
    manifest = training_manifest(params)
    if cfg.source == "features":
        return feature_batches(params, cfg, model)

    def batches_for(split: str, shard: tuple[int, int] = (0, 1)) -> Callable[[int], Iterable[Batch]]:
        return make_stage_batches(manifest, corpus_dir, split, cfg.instances_per_batch, cfg.views_per_instance,
                                  cfg.image_size, model.normalization, cfg.seed, num_workers=cfg.num_workers,
                                  class_names=model.config.class_names, views=cfg.views, shard=shard,
                                  photo_repeats=cfg.photo_repeats)

    val_batches = batches_for("val")  # not sharded: every rank validates on all of it
    return batches_for("train", distributed.shard()), lambda: val_batches(0)


def training_manifest(params: dict) -> Path:
    """The manifest a stage trains on: the corpus's, or with ``data.train_pictures`` set,
    a copy whose train split is that seeded subset (`mtl.data.splits.train_subset`; val
    and test rows unchanged), written beside the corpus."""
    data = params["data"]
    manifest = Path(data["corpus_dir"]) / "manifest.csv"
    if data.get("train_pictures") is None:
        return manifest
    out = manifest.parent.parent / "train_subsets" / f"{manifest.parent.name}-{data['train_pictures']}-seed{data['seed']}.csv"
    return write_train_subset(manifest, out, int(data["train_pictures"]), int(data["seed"]))


def feature_batches(params: dict, cfg: StageConfig, model: MTLNet
                    ) -> tuple[Callable[[int], Iterable[Batch]], Callable[[], Iterable[Batch]]]:
    """Stage-1 batches from the feature cache of params ``features`` (mtl.features)."""
    corpus_dir = Path(params["data"]["corpus_dir"])
    features = params["features"]
    with distributed.main_first():  # rank 0 builds a missing cache, the others then open it
        caches = split_caches(corpus_dir / "manifest.csv", corpus_dir, features["dir"], model,
                              views=features["views"], val_views=cfg.views_per_instance, image_size=cfg.image_size,
                              view_recipe=cfg.views, seed=cfg.seed, batch_size=features["batch_size"],
                              num_workers=cfg.num_workers, device=cfg.device)
    train_cache = caches["train"]
    if params["data"].get("train_pictures") is not None:  # the full split's cache, cut to the subset
        subset = split_originals(training_manifest(params), corpus_dir, "train")
        train_cache = train_cache.subset([original.id for original in subset])
    repeats = None
    if cfg.photo_repeats > 1:
        photos = {row["id"] for row in read_manifest(training_manifest(params)) if is_photo_row(row)}
        repeats = [cfg.photo_repeats if image_id in photos else 1 for image_id in train_cache.ids]
    train = cache_batches(train_cache, cfg.instances_per_batch, cfg.views_per_instance, cfg.seed, train=True,
                          shard=distributed.shard(), repeats=repeats)
    val = cache_batches(caches["val"], cfg.instances_per_batch, cfg.views_per_instance, cfg.seed, train=False)
    return train, lambda: val(0)


# The code that decides what a stage learns (part of the run fingerprint): the training
# package and these modules.
STAGE_CODE = ("loss.py", "objective.py", "distributed.py", "model.py", "backbones.py", "features.py", "data/batches.py",
              "data/transforms.py")


def corpus_digest(params: dict, splits: tuple[str, ...] = ("train", "val")) -> str:
    """A digest of the bytes of every image a stage learns or validates on (and its
    manifest row): another JPEG quality or a rebuilt corpus changes it."""
    corpus_dir = Path(params["data"]["corpus_dir"])
    digest = hashlib.sha256()
    for row in sorted(read_manifest(training_manifest(params)), key=lambda r: r["id"]):
        if row["split"] in splits:
            digest.update(repr(sorted(row.items())).encode())
            digest.update((corpus_dir / row["path"]).read_bytes())
    return digest.hexdigest()[:16]


def run_fingerprint(params: dict, cfg: StageConfig, model: MTLNet, init: str | Path | None) -> dict[str, Any]:
    """Everything besides the stage settings that changes what a run learns: the model
    config, the starting checkpoint, the images, the feature cache's settings, and the
    code of the stage."""
    package = Path(__file__).parent.parent
    files = [*sorted((package / "training").glob("*.py")), *(package / name for name in STAGE_CODE)]
    code = hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()[:16]
    return {"model_config": model.config.to_dict(), "init": file_digest(init) if init is not None else None,
            "corpus": corpus_digest(params), "code": code,
            "features": params["features"] if cfg.source == "features" else None}


def train_run(params: dict, stage: str, out_dir: str | Path, init: str | Path | None = None) -> Path:
    """Train one stage (§III-A) from params (a recipe already applied); resumes an
    interrupted run; returns final.pt."""
    out_dir = Path(out_dir)
    cfg = StageConfig.from_params(params, stage)
    model = stage_model(params, cfg, init)
    fingerprint = run_fingerprint(params, cfg, model, init)
    prepare_run_dir(out_dir, {"stage_config": asdict(cfg), **fingerprint})
    return train_stage(model, cfg, *corpus_batches(params, cfg, model), out_dir, fingerprint=fingerprint)


def step_rates(params: dict, steps: int = 20, rounds: int = 3) -> dict[str, float]:
    """Stage-1 optimizer steps per second from images and from the cache, measured side
    by side: `rounds` alternating rounds of `steps` steps each (the first batch of a
    round is not timed: it starts the loader), median of the rounds.  Everything is the
    real trainer (StageRun.train_step); only the batch source differs."""
    base = StageConfig.from_params(params, "frozen")
    rates: dict[str, list[float]] = {"images": [], "features": []}
    for round_ in range(rounds):
        for source in rates:
            cfg = replace(base, source=source, epochs=1)
            model = stage_model(params, cfg)
            make_train, _ = corpus_batches(params, cfg, model)
            run = StageRun(model, cfg, Path("."), steps + 1)
            run.model.train()
            batches = iter(make_train(round_ + 1))
            run.train_step(next(batches), 0)
            started = time.perf_counter()
            for step in range(steps):
                run.train_step(next(batches), step + 1)
            rates[source].append(steps / (time.perf_counter() - started))
    images, features = float(np.median(rates["images"])), float(np.median(rates["features"]))
    return {"steps_per_second_images": images, "steps_per_second_features": features, "speedup": features / images,
            "benchmark_steps": steps, "benchmark_rounds": rounds}
