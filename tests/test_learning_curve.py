"""The learning curve's promises: a training subset is seeded, made of whole groups,
keeps each class's share and leaves val and test untouched (so every point is scored on
the same evaluation set); the curve's table, baseline and figure come from one call."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtl.data.splits import train_subset
from mtl.features import CachedEpoch, FeatureCache
from mtl.data.batches import InstanceBatchSampler, ViewKey

REPO = Path(__file__).resolve().parents[1]


def _rows(seed: int = 0) -> list[dict[str, str]]:
    """A manifest: 60 scene tiles in 6 pictures and 140 clip-art drawings, in three splits."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(30):
        for k in range(10 if g < 6 else 1):
            cls = "scene" if g < 6 else "clipart"
            rows.append({"id": f"{cls}-{g}-{k}", "class": cls, "group": f"g{g}", "split": "train"})
    for i in range(140 - 24):
        rows.append({"id": f"clipart-x{i}", "class": "clipart", "group": f"x{i}",
                     "split": str(rng.choice(["train", "val", "test"], p=[0.6, 0.2, 0.2]))})
    return rows


def test_train_subset_leaves_val_and_test_identical_and_is_seeded():
    rows = _rows()
    train = [r for r in rows if r["split"] == "train"]
    for pictures in (10, 37, len(train)):
        subset = train_subset(rows, pictures, seed=0)
        assert [r for r in subset if r["split"] != "train"] == [r for r in rows if r["split"] != "train"]
        chosen = [r for r in subset if r["split"] == "train"]
        assert len(chosen) == pictures
        share = Counter(r["class"] for r in chosen)
        full = Counter(r["class"] for r in train)
        assert all(abs(share[c] - pictures * full[c] / len(train)) <= 1 for c in full)  # class shares kept
    assert train_subset(rows, 37, seed=0) == train_subset(rows, 37, seed=0)
    assert train_subset(rows, 37, seed=0) != train_subset(rows, 37, seed=1)
    with pytest.raises(ValueError, match="training images"):
        train_subset(rows, len(train) + 1, seed=0)


def test_smaller_subsets_lie_inside_larger_ones_as_whole_groups():
    rows = _rows()
    ids = {n: {r["id"] for r in train_subset(rows, n, 0) if r["split"] == "train"} for n in (10, 20, 40, 80)}
    assert ids[10] <= ids[20] <= ids[40] <= ids[80]
    by_group = defaultdict(set)
    for r in rows:
        by_group[r["group"]].add(r["id"])
    partial = [g for g, members in by_group.items() if 0 < len(members & ids[40]) < len(members)]
    assert len(partial) <= 2  # at most the last group of each class is cut


def test_feature_cache_subset_reads_the_stored_rows_of_its_images():
    views = 3
    taps = np.arange(5 * views, dtype=np.float16).reshape(5 * views, 1, 1, 1)
    cache = FeatureCache(Path("."), taps, ["a", "b", "c", "d", "e"], np.array([10, 11, 12, 13, 14]),
                         np.array([0, 1, 0, 1, 0]), views)
    sub = cache.subset(["d", "b"])
    assert sub.num_instances == 2 and sub.ids == ["d", "b"]
    epoch = CachedEpoch(sub, InstanceBatchSampler(2, 2, 2, 0, drop_last=True), 0, 0, random_views=False)
    rows = epoch.rows([ViewKey(0, 0, 0), ViewKey(0, 1, 1)])
    assert rows.tolist() == [3 * views + 0, 1 * views + 1]
    taps_out, labels, classes = epoch.load(rows)
    assert labels.tolist() == [13, 11] and classes.tolist() == [1, 1]
    assert taps_out.flatten().tolist() == [9.0, 4.0]
    with pytest.raises(KeyError):
        cache.subset(["zz"])


# ---------------------------------------------------------------------------- the whole curve, tiny


@pytest.fixture()
def tiny_study(tmp_path, small_real_photos):
    """A 112-image corpus (a 4 x 4 grid of crops of each of 7 real photos, each crop its
    own picture) and val/test evaluation sets that use every eval transformation once."""
    from mtl.data.evalset import build_evalset
    from mtl.data.transforms import EVAL_FAMILY

    corpus = tmp_path / "corpus"
    (corpus / "images").mkdir(parents=True)
    lines, n = ["id,path,class,source,group,split,hash,width,height"], 0
    for p, (name, photo) in enumerate(sorted(small_real_photos.items())):
        w, h = photo.size
        for k in range(16):
            x, y = (k % 4) * w // 4, (k // 4) * h // 4
            image_id = f"{name}-{k}"
            photo.crop((x, y, x + w // 4, y + h // 4)).resize((48, 48)).save(corpus / "images" / f"{image_id}.jpg")
            split = ("train", "val", "test")[n % 3] if n < 108 else "train"
            lines.append(f"{image_id},images/{image_id}.jpg,{('scene', 'clipart')[p % 2]},test,{image_id},{split},"
                         f"{n},48,48")
            n += 1
    (corpus / "manifest.csv").write_text("\n".join(lines) + "\n")
    every = len(EVAL_FAMILY)
    counts = {"references": every, "positive_queries": every, "distractor_queries": every}
    no_photos = {"references": 0, "positive_queries": 0, "distractor_queries": 0}
    build_evalset(corpus / "manifest.csv", corpus, tmp_path / "eval", {"dir": str(tmp_path / "eval"), "seed": 1,
                                                                        "val": counts, "test": counts, "workers": 1,
                                                                        "photos": {"val": no_photos, "test": no_photos}})
    overrides = [f"data.corpus_dir={corpus}", f"evalset.dir={tmp_path / 'eval'}", "model.pretrained=false",
                 f"features.dir={tmp_path / 'features'}", "features.views=2", "loss.memory_size=16",
                 "train.instances_per_batch=2", "train.views_per_instance=2", "train.image_size=48",
                 "train.num_workers=0", "train.device=cpu", "train.amp=false", "train.frozen.epochs=1",
                 "train.finetune.epochs=1", "train.frozen.warmup_steps=1", "train.finetune.warmup_steps=1",
                 "eval.image_size=48", "eval.device=cpu"]
    return tmp_path, overrides


def test_learning_curve_table_baseline_and_figure(tiny_study, monkeypatch):
    from mtl import learning_curve
    from mtl.params import load_params, recipe_params, set_dotted
    from mtl.training.stage import train_run

    tmp_path, overrides = tiny_study
    trained = []

    def in_process(recipe, run_name, stage, out_dir, init, point_overrides, params_path):
        params = recipe_params(load_params(params_path), recipe)
        for assignment in point_overrides:
            set_dotted(params, assignment)
        trained.append((params["data"]["train_pictures"], stage))
        train_run(params, stage, out_dir, init)

    spec = tmp_path / "curve.yaml"
    spec.write_text("recipe: best\ntrain_pictures: [4, 8, null]\n")
    out = tmp_path / "results"
    table = learning_curve.run_learning_curve(spec, str(REPO / "params.yaml"), None, overrides, out,
                                              tmp_path / "models", runner=in_process)
    assert trained == [(4, "frozen"), (4, "finetune"), (8, "frozen"), (8, "finetune"),
                       (None, "frozen"), (None, "finetune")]
    saved = pd.read_csv(out / "table.csv")
    assert list(saved.columns[:5]) == ["train_pictures", "muap_val", "muap_test", "acc1_test", "recall_at_p90_test"]
    assert saved["train_pictures"].tolist() == [4, 8, 40] == table["train_pictures"].tolist()
    assert saved[["muap_val", "muap_test", "acc1_test", "recall_at_p90_test"]].apply(
        lambda c: c.between(0, 1)).all().all()
    baseline = json.loads((out / "baseline.json").read_text())
    assert 0 <= baseline["muap_test"] <= 1
    assert (out / "learning_curve.png").stat().st_size > 10_000
    # every point read the same evaluation files; the subsets were written beside the corpus
    assert sorted(p.name for p in (tmp_path / "train_subsets").glob("*.csv")) == ["corpus-4-seed0.csv",
                                                                                 "corpus-8-seed0.csv"]
    assert set(saved["stages"]) == {"frozen+finetune"}

    # stage 1 only: one run per point, recorded as such
    trained.clear()
    spec.write_text("recipe: best\nstages: frozen\ntrain_pictures: [4]\n")
    frozen_only = learning_curve.run_learning_curve(spec, str(REPO / "params.yaml"), None, overrides,
                                                    tmp_path / "frozen_only", tmp_path / "models_frozen",
                                                    runner=in_process)
    assert trained == [(4, "frozen")]
    assert frozen_only["stages"].tolist() == ["frozen"]


def test_a_spec_with_unknown_stages_is_refused(tmp_path):
    from mtl.learning_curve import load_spec

    spec = tmp_path / "curve.yaml"
    spec.write_text("train_pictures: [4]\nstages: finetune\n")
    with pytest.raises(ValueError, match="stages must be one of"):
        load_spec(spec)
