"""Training batches: K instances x V views with the right labels, deterministic per
(seed, epoch), different across epochs, identical with DataLoader workers."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from mtl.data.batches import class_names_from_manifest, make_stage_batches, to_model_input

NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
SIZE = 32


def write_tiny_corpus(root: Path, per_split: dict[str, int]) -> Path:
    """Crops of scikit-image photos as a corpus: class 'scene' from colour photos,
    'clipart' from grayscale ones (converted to RGB), split as asked."""
    sources = {"scene": [data.chelsea(), data.coffee(), data.astronaut()],
               "clipart": [np.stack([data.camera()] * 3, -1), np.stack([data.moon()] * 3, -1)]}
    rows, n = [], 0
    for split, count in per_split.items():
        for i in range(count):
            cls = ("scene", "clipart")[n % 2]
            photo = sources[cls][n % len(sources[cls])]
            y, x = (n * 37) % (photo.shape[0] - 96), (n * 53) % (photo.shape[1] - 96)
            path = root / "images" / f"img{n:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo[y:y + 96, x:x + 96]).save(path, quality=90)
            rows.append({"id": f"img{n:03d}", "path": f"images/img{n:03d}.jpg", "class": cls, "source": "test",
                         "group": f"g{n}", "split": split, "hash": f"{n:016x}", "width": 96, "height": 96})
            n += 1
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"), {"train": 10, "val": 5, "test": 3})


def _batches(manifest: Path, split: str = "train", seed: int = 0, workers: int = 0, k: int = 4, v: int = 3):
    return make_stage_batches(manifest, manifest.parent, split, k, v, SIZE, NORM, seed, workers)


def _all(batches) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return list(batches)


def test_class_names_follow_sorted_order_not_row_order(corpus: Path) -> None:
    first_row = next(csv.DictReader(corpus.open()))
    assert first_row["class"] == "scene"
    assert class_names_from_manifest(corpus) == ["clipart", "scene"]


def test_train_batches_are_k_instances_by_v_views_with_right_labels(corpus: Path) -> None:
    batches = _all(_batches(corpus)(0))
    assert len(batches) == 10 // 4  # the incomplete last batch is dropped in training
    names = class_names_from_manifest(corpus)
    rows = sorted(csv.DictReader(corpus.open()), key=lambda r: r["id"])
    train_classes = [names.index(r["class"]) for r in rows if r["split"] == "train"]
    seen = []
    for images, instances, classes in batches:
        assert images.shape == (12, 3, SIZE, SIZE) and images.dtype == torch.float32
        assert instances.dtype == classes.dtype == torch.long
        assert instances.view(4, 3).unique(dim=1).shape == (4, 1)  # V consecutive views share an id
        assert len(instances.unique()) == 4
        assert classes.tolist() == [train_classes[i] for i in instances.tolist()]
        assert -1.0 - 1e-6 <= images.min() and images.max() <= 1.0 + 1e-6  # (x - 0.5) / 0.5
        seen += instances.unique().tolist()
    assert len(seen) == len(set(seen))  # each instance at most once per epoch


def test_instance_labels_are_unique_across_splits(corpus: Path) -> None:
    # Validation is scored against the training memory: a val label equal to a train
    # label would make two different pictures a "positive" pair.
    train = {int(i) for _, ids, _ in _batches(corpus, "train")(0) for i in ids}
    val = {int(i) for _, ids, _ in _batches(corpus, "val")(0) for i in ids}
    test = {int(i) for _, ids, _ in _batches(corpus, "test", k=3)(0) for i in ids}
    assert len(val) == 5 and len(test) == 3
    assert not train & val and not train & test and not val & test


def test_views_of_one_instance_differ(corpus: Path) -> None:
    images, _, _ = next(iter(_batches(corpus)(0)))
    assert not torch.equal(images[0], images[1])


def test_same_seed_and_epoch_give_identical_batches_even_with_workers(corpus: Path) -> None:
    first = _all(_batches(corpus)(3))
    again = _all(_batches(corpus)(3))
    make_with_workers = _batches(corpus, workers=2)
    next(iter(make_with_workers(2)))  # persistent workers, an epoch left half-read
    with_workers = _all(make_with_workers(3))
    for a, b, c in zip(first, again, with_workers, strict=True):
        for x, y, z in zip(a, b, c):
            assert torch.equal(x, y) and torch.equal(x, z)


def test_epochs_and_seeds_differ(corpus: Path) -> None:
    make = _batches(corpus)
    e0, e1 = _all(make(0)), _all(make(1))
    other_seed = _all(_batches(corpus, seed=1)(0))
    assert not torch.equal(e0[0][0], e1[0][0])
    assert not torch.equal(e0[0][0], other_seed[0][0])
    assert [b[1].tolist() for b in e0] != [b[1].tolist() for b in e1]  # a new instance order


def test_view_recipes_name_how_views_are_made(corpus: Path) -> None:
    """`chain` views (several edits, a crop down to a quarter) differ from `single` views
    of the same keys; both are deterministic; an unknown recipe fails before any work."""
    single = next(iter(make_stage_batches(corpus, corpus.parent, "train", 4, 3, SIZE, NORM, 0)(1)))
    chain = make_stage_batches(corpus, corpus.parent, "train", 4, 3, SIZE, NORM, 0, views="chain")
    first, again = next(iter(chain(1))), next(iter(chain(1)))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], single[1])
    assert not torch.equal(first[0], single[0])
    with pytest.raises(ValueError, match="unknown view recipe"):
        make_stage_batches(corpus, corpus.parent, "train", 4, 3, SIZE, NORM, 0, views="strong")


def test_val_split_keeps_its_last_partial_batch(corpus: Path) -> None:
    batches = _all(_batches(corpus, split="val")(0))
    assert [len(b[1]) for b in batches] == [12, 3]
    assert sorted(torch.cat([b[1] for b in batches]).unique().tolist()) == list(range(10, 15))  # corpus ranks


def test_processes_share_each_batch_in_rank_order(corpus: Path) -> None:
    """torchrun: rank r takes a contiguous K/N instances x V views of every batch; the
    ranks' parts, concatenated in rank order, are the single-process batch."""
    def sharded(rank: int, processes: int):
        return make_stage_batches(corpus, corpus.parent, "train", 4, 3, SIZE, NORM, 0, shard=(rank, processes))

    whole = _all(sharded(0, 1)(1))
    parts = [_all(sharded(rank, 2)(1)) for rank in range(2)]
    assert [len(p) for p in parts] == [len(whole)] * 2  # the same steps on every rank
    for b, batch in enumerate(whole):
        assert all(len(part[b][1]) == 6 for part in parts)  # 2 instances x 3 views each
        for i in range(3):
            assert torch.equal(torch.cat([part[b][i] for part in parts]), batch[i])
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        sharded(0, 3)
    with pytest.raises(ValueError, match="does not exist"):
        sharded(2, 2)


def test_too_few_images_for_a_batch_fail_clearly(corpus: Path) -> None:
    with pytest.raises(ValueError, match="fewer than instances_per_batch"):
        _batches(corpus, k=11)
    with pytest.raises(ValueError, match="unknown split"):
        _batches(corpus, split="holdout")


def test_to_model_input_resizes_shorter_side_and_centre_crops() -> None:
    img = Image.fromarray(data.chelsea())  # 451 x 300
    x = to_model_input(img, 64, *NORM)
    assert x.shape == (3, 64, 64)
    mean = np.asarray(img, dtype=np.float32).mean() / 255
    assert abs(float(x.mean()) * 0.5 + 0.5 - mean) < 0.05
    tiny = to_model_input(Image.fromarray(data.camera()).resize((8, 8)), 64, *NORM)
    assert tiny.shape == (3, 64, 64)


# Digests of the exact bytes the view code makes, with this environment's torch,
# torchvision, Pillow and AugLy: a refactor of the data code must leave every view (and
# so the feature cache and every trained number) unchanged.  Regenerate them only for a
# deliberate change of the views or of those libraries.
PINNED_VIEWS = {"single": "582d9a3f4bcd0f7f", "chain": "6f78e6f6fc384b4e"}
PINNED_MODEL_INPUT = "1ae2fc85b875c5c2"


def _digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("views", sorted(PINNED_VIEWS))
def test_views_are_byte_identical_to_the_pinned_ones(views: str, tmp_path: Path) -> None:
    manifest = write_tiny_corpus(tmp_path, {"train": 10, "val": 5, "test": 3})
    batches = make_stage_batches(manifest, tmp_path, "train", 4, 3, SIZE, NORM, 0, views=views)(1)
    assert _digest(*(t.numpy() for batch in batches for t in batch)) == PINNED_VIEWS[views]


def test_evaluation_input_is_byte_identical_to_the_pinned_one() -> None:
    img = Image.fromarray(data.chelsea())
    img.thumbnail((96, 96))
    assert _digest(to_model_input(img, 40, *NORM).numpy()) == PINNED_MODEL_INPUT


def test_a_repeated_instance_appears_that_often_per_epoch_with_other_views():
    from collections import Counter

    from mtl.data.batches import InstanceBatchSampler

    repeats = [3, 1, 1, 1, 1, 1, 1, 3]  # instances 0 and 7: photographs shown three times
    sampler = InstanceBatchSampler(8, 4, 2, seed=0, repeats=repeats)
    sampler.epoch = 1
    keys = [k for batch in sampler for k in batch]
    assert len(sampler) == sum(repeats) // 4 and len(keys) == len(sampler) * 4 * 2
    seen = Counter(k.instance for k in keys)
    assert seen[0] <= 6 and seen[7] <= 6 and seen[0] + seen[7] > 2 * 2  # up to 3 appearances x 2 views
    views = {(k.instance, k.view) for k in keys}
    assert len(views) == len(keys)  # every appearance brings its own views
    plain, ones = InstanceBatchSampler(8, 4, 2, seed=0), InstanceBatchSampler(8, 4, 2, seed=0, repeats=[1] * 8)
    plain.epoch = ones.epoch = 1
    assert list(plain) == list(ones)  # no repeats: the order as it always was
    with pytest.raises(ValueError, match="repeats"):
        InstanceBatchSampler(8, 4, 2, seed=0, repeats=[0] * 8)
