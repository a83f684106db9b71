"""The rates the full profile's time estimate rests on, measured on a small sample of a
built corpus with the default recipe (`best`):

  feature cache   views/s through the frozen backbone (decode, view, forward)
  stage 1         optimizer steps/s from the feature cache (the branches only)
  stage 2         training images/s from images (the whole network)

    python benchmarks/full_profile_rates.py --corpus-dir data/corpus --images 96 --steps 12

Prints one JSON line (with the load average before and after: on a shared machine the
rates fall with it).  README "Data at scale" turns these into hours for the full corpus.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--corpus-dir", default="data/corpus")
    parser.add_argument("--images", type=int, default=96, help="training images in the sample")
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per stage")
    args = parser.parse_args(argv)

    import torch

    from mtl.data.splits import write_train_subset
    from mtl.features import CacheSpec, build_feature_cache, cache_batches
    from mtl.params import load_params, recipe_params
    from mtl.training.config import StageConfig
    from mtl.training.loop import StageRun
    from mtl.training.stage import corpus_batches, stage_model

    load_before = os.getloadavg()[0]
    params = recipe_params(load_params(args.params, profile=args.profile), "best")
    params["data"]["corpus_dir"] = args.corpus_dir
    manifest = Path(args.corpus_dir) / "manifest.csv"
    work = Path(tempfile.mkdtemp(prefix="rates-"))
    sample = write_train_subset(manifest, work / "manifest.csv", args.images, seed=0)
    frozen = StageConfig.from_params(params, "frozen")
    model = stage_model(params, frozen)

    spec = CacheSpec("train", params["features"]["views"] // 4, frozen.image_size, frozen.views, frozen.seed)
    started = time.perf_counter()
    cache = build_feature_cache(sample, args.corpus_dir, work / "features", spec, model,
                                batch_size=params["features"]["batch_size"], num_workers=frozen.num_workers,
                                device=frozen.device)
    views_per_second = args.images * spec.views / (time.perf_counter() - started)

    def steps_per_second(run: StageRun, batches_of_epoch) -> float:
        run.model.train()
        iterator = itertools.chain.from_iterable(batches_of_epoch(epoch) for epoch in itertools.count())
        run.train_step(next(iterator), 0)  # starts the loader; not timed
        started = time.perf_counter()
        for step in range(args.steps):
            run.train_step(next(iterator), step + 1)
        return args.steps / (time.perf_counter() - started)

    cfg1 = replace(frozen, epochs=1)
    stage1 = steps_per_second(StageRun(model, cfg1, work, args.steps + 1),
                              cache_batches(cache, cfg1.instances_per_batch, cfg1.views_per_instance, cfg1.seed,
                                            train=True))
    cfg2 = replace(StageConfig.from_params(params, "finetune"), epochs=1)
    params["data"]["corpus_dir"] = args.corpus_dir
    model2 = stage_model(params, frozen)
    make_train, _ = corpus_batches({**params, "data": {**params["data"], "train_pictures": args.images}}, cfg2, model2)
    stage2 = steps_per_second(StageRun(model2, cfg2, work, args.steps + 1), make_train)
    batch = cfg2.instances_per_batch * cfg2.views_per_instance
    print(json.dumps({"feature_cache_views_per_second": round(views_per_second, 1),
                      "stage1_steps_per_second": round(stage1, 2),
                      "stage2_images_per_second": round(stage2 * batch, 1), "batch": batch,
                      "image_size": frozen.image_size, "threads": torch.get_num_threads(),
                      "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
