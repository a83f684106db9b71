"""Training and validation batches: K instances x V views, deterministic per (seed, epoch).

A *view* is made by a named view recipe (VIEW_RECIPES): one or a chain of random
`train`-family copy transformations of an original, then a random crop, resized to the
model's square input and normalized with the backbone's mean/std.  The V views of one original share its instance id (the positives of the
contrastive loss, §II-C) and its class id (the content-type head, §II-B).

Determinism: the batch sampler (main process) draws the epoch's instance order from
(seed, epoch); every view is drawn from its own generator seeded by
(seed, epoch, instance, view), so the same epoch gives the same tensors whichever
DataLoader worker computes them.

Speed: originals are <= 384 px JPEGs.  Each process decodes an original once, at
reduced scale (JPEG draft mode), downscaled to about 2x the input size, and keeps it
in memory (a few thousand 224 px images are a few hundred MB); DataLoader workers are
persistent, so their caches survive from epoch to epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import functional as F

from mtl.data.manifest import Original, class_names_from_manifest, read_manifest, split_originals
from mtl.data.transforms import apply_chain

Normalization = tuple[Sequence[float], Sequence[float]]
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# Originals are cached with their shorter side at this multiple of the input size: enough
# room for crops and rescales to keep detail, small enough to decode and transform fast.
CACHE_SCALE = 2
VIEW_CROP_ASPECT = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class ViewRecipe:
    """How a training view is made: `edits` (min, max) different train-family
    transformations chained, then a crop of `crop_area` (min, max) of the area."""

    edits: tuple[int, int]
    crop_area: tuple[float, float]


VIEW_RECIPES = {
    # One edit and a mild crop.
    "single": ViewRecipe(edits=(1, 1), crop_area=(0.6, 1.0)),
    # Harder views in the spirit of the ISC2021 winners: up to three edits chained (colour,
    # JPEG, pixelation, text, emoji, padding, flips, ...) and a crop down to a quarter of the
    # area.  Held-out edits are never used: only the train family is drawn from.
    "chain": ViewRecipe(edits=(1, 3), crop_area=(0.25, 1.0)),
}


# --------------------------------------------------------------------------- pixels

def load_original(path: str | Path, shorter_side: int | None = None) -> Image.Image:
    """Decode an RGB original; with `shorter_side`, downscaled to it (never upscaled).

    JPEG draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale directly, which is
    several times cheaper than a full decode followed by a resize."""
    with Image.open(path) as im:
        if shorter_side is not None:
            im.draft("RGB", (shorter_side, shorter_side))
        img = im.convert("RGB")
    if shorter_side is not None and min(img.size) > shorter_side:
        factor = shorter_side / min(img.size)
        img = img.resize((max(1, round(img.width * factor)), max(1, round(img.height * factor))),
                         Image.Resampling.BILINEAR, reducing_gap=2.0)
    return img


def normalize_batch(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W], (x / 255 - mean) / std, in channels_last memory.

    One vectorised op per batch: per-image small torch ops cost more in thread start-up
    than in arithmetic on a 2-core machine (5x slower loading in the main process)."""
    scale = torch.tensor([1 / (255 * s) for s in std], dtype=torch.float32)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32)
    x = torch.from_numpy(np.ascontiguousarray(pixels)).float()
    return (x * scale + shift).permute(0, 3, 1, 2)


def to_model_input(img: Image.Image, image_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Evaluation input [3, S, S]: shorter side resized to S, centre crop, normalized."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    img = F.resize(img, image_size, interpolation=F.InterpolationMode.BICUBIC, antialias=True)
    pixels = np.array(F.center_crop(img, [image_size, image_size]))[None]  # a writable copy
    return normalize_batch(pixels, mean, std)[0]


def random_crop(img: Image.Image, rng: np.random.Generator, image_size: int,
                area_range: tuple[float, float]) -> Image.Image:
    """A random crop of `area_range` of the area (aspect 3/4..4/3), resized to the square input."""
    w, h = img.size
    area = rng.uniform(*area_range) * w * h
    aspect = float(np.exp(rng.uniform(np.log(VIEW_CROP_ASPECT[0]), np.log(VIEW_CROP_ASPECT[1]))))
    cw = int(min(w, max(1, round(np.sqrt(area * aspect)))))
    ch = int(min(h, max(1, round(np.sqrt(area / aspect)))))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return F.resized_crop(img, top, left, ch, cw, [image_size, image_size],
                          interpolation=F.InterpolationMode.BILINEAR, antialias=True)


def training_view(original: Image.Image, rng: np.random.Generator, image_size: int,
                  recipe: str = "single") -> np.ndarray:
    """One view, uint8 [S, S, 3], made by a named view recipe (VIEW_RECIPES).
    (Normalization happens per batch, in `normalize_batch`.)"""
    view = view_recipe(recipe)
    low, high = view.edits
    edited = apply_chain("train", original, rng, low if low == high else int(rng.integers(low, high + 1)))
    return np.asarray(random_crop(edited, rng, image_size, view.crop_area))


def view_recipe(name: str) -> ViewRecipe:
    if name not in VIEW_RECIPES:
        raise ValueError(f"unknown view recipe {name!r}; known: {', '.join(VIEW_RECIPES)}")
    return VIEW_RECIPES[name]


# --------------------------------------------------------------------------- dataset + sampler

@dataclass(frozen=True)
class ViewKey:
    """What one batch slot asks the dataset for: view `view` of instance `instance` in `epoch`."""

    epoch: int
    instance: int
    view: int


class InstanceViews(Dataset):
    """Views of one split's originals, addressed by ViewKey (`instance` = position in the
    split's id-sorted list).  The label of an instance is `labels[instance]` (by default its
    position); class ids index `class_names`."""

    def __init__(self, originals: Sequence[Original], class_names: Sequence[str], image_size: int,
                 normalization: Normalization, seed: int, labels: Sequence[int] | None = None,
                 views: str = "single"):
        unknown = sorted({o.class_name for o in originals} - set(class_names))
        if unknown:
            raise ValueError(f"classes {unknown} are not in class_names {list(class_names)}")
        if labels is not None and len(labels) != len(originals):
            raise ValueError(f"{len(labels)} labels for {len(originals)} originals")
        self.originals = list(originals)
        self.labels = list(range(len(originals))) if labels is None else [int(v) for v in labels]
        self.class_ids = [list(class_names).index(o.class_name) for o in self.originals]
        self.image_size = image_size
        self.mean, self.std = (tuple(float(v) for v in normalization[0]), tuple(float(v) for v in normalization[1]))
        self.seed = seed
        view_recipe(views)  # an unknown name fails here, not in a worker
        self.views = views
        self._cache: dict[int, Image.Image] = {}  # per process: decoded, downscaled originals

    def __len__(self) -> int:
        return len(self.originals)

    def original(self, instance: int) -> Image.Image:
        img = self._cache.get(instance)
        if img is None:
            img = load_original(self.originals[instance].path, CACHE_SCALE * self.image_size)
            self._cache[instance] = img
        return img

    def __getitem__(self, key: ViewKey) -> tuple[np.ndarray, int, int]:
        rng = np.random.default_rng((self.seed, key.epoch, key.instance, key.view))
        view = training_view(self.original(key.instance), rng, self.image_size, self.views)
        return view, self.labels[key.instance], self.class_ids[key.instance]

    def collate(self, items: list[tuple[np.ndarray, int, int]]) -> Batch:
        """Stack the views of one batch, normalize them in one go, attach the labels."""
        views, instances, classes = zip(*items)
        images = normalize_batch(np.stack(views), self.mean, self.std)
        return images, torch.tensor(instances, dtype=torch.long), torch.tensor(classes, dtype=torch.long)


class InstanceBatchSampler(Sampler):
    """Batches of `instances_per_batch` distinct instances x `views_per_instance` views,
    the instances in an order drawn from (seed, epoch).  Set `epoch` before iterating.

    `shard` = (rank, processes): this process's part of every batch, a contiguous
    K / processes of its instances with all their views, so the processes' parts in rank
    order are the single-process batch (training under torchrun, mtl.distributed).

    `repeats[i]`: how many times instance i appears per epoch (default once); its r-th
    appearance takes views r·V .. r·V + V - 1, so a repeated instance brings other views
    (two appearances may share a batch: they are positives of each other)."""

    def __init__(self, num_instances: int, instances_per_batch: int, views_per_instance: int, seed: int,
                 drop_last: bool = True, shard: tuple[int, int] = (0, 1), repeats: Sequence[int] | None = None):
        if instances_per_batch < 1 or views_per_instance < 1:
            raise ValueError("instances_per_batch and views_per_instance must be >= 1")
        rank, processes = shard
        if not 0 <= rank < processes:
            raise ValueError(f"shard {rank} of {processes} does not exist")
        if processes > 1 and (instances_per_batch % processes or not drop_last):
            raise ValueError(f"{processes} processes cannot share batches of {instances_per_batch} instances "
                             "equally: instances_per_batch must be a multiple of the number of processes "
                             "(and incomplete batches dropped)")
        self.num_instances = num_instances
        self.repeats = np.ones(num_instances, np.int64) if repeats is None else np.asarray(repeats, np.int64)
        if len(self.repeats) != num_instances or (self.repeats < 1).any():
            raise ValueError(f"repeats must give each of the {num_instances} instances a count >= 1")
        self.instances_per_batch = instances_per_batch
        self.views_per_instance = views_per_instance
        self.seed = seed
        self.drop_last = drop_last
        self.shard = shard
        self.epoch = 0

    def __len__(self) -> int:
        full, rest = divmod(int(self.repeats.sum()), self.instances_per_batch)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def __iter__(self) -> Iterator[list[ViewKey]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        if (self.repeats == 1).all():  # every instance once: the order as it always was
            order, rounds = rng.permutation(self.num_instances), np.zeros(self.num_instances, np.int64)
        else:
            instances = np.repeat(np.arange(self.num_instances), self.repeats)
            appearance = np.concatenate([np.arange(r) for r in self.repeats])
            shuffled = rng.permutation(len(instances))
            order, rounds = instances[shuffled], appearance[shuffled]
        rank, processes = self.shard
        share = self.instances_per_batch // processes
        v = self.views_per_instance
        for b in range(len(self)):
            part = slice(b * self.instances_per_batch, (b + 1) * self.instances_per_batch)
            chunk, chunk_rounds = order[part], rounds[part]
            if processes > 1:
                mine = slice(rank * share, (rank + 1) * share)
                chunk, chunk_rounds = chunk[mine], chunk_rounds[mine]
            yield [ViewKey(self.epoch, int(i), int(r) * v + k) for i, r in zip(chunk, chunk_rounds) for k in range(v)]


# --------------------------------------------------------------------------- what the trainer calls

def corpus_labels(manifest_csv: str | Path, originals: Sequence[Original]) -> list[int]:
    """Instance labels unique across the whole corpus (an original's rank among all ids).

    Validation scores its batches against the *training* memory: were labels positions
    within a split, val image i and train image i would share a label and count as a
    positive pair."""
    rank = {image_id: i for i, image_id in enumerate(sorted(r["id"] for r in read_manifest(manifest_csv)))}
    return [rank[o.id] for o in originals]


def make_stage_batches(manifest_csv: str | Path, corpus_dir: str | Path, split: str, instances_per_batch: int,
                       views_per_instance: int, image_size: int, normalization: Normalization, seed: int,
                       num_workers: int = 0, class_names: Sequence[str] | None = None, views: str = "single",
                       shard: tuple[int, int] = (0, 1), photo_repeats: int = 1) -> Callable[[int], Iterable[Batch]]:
    """`batches(epoch) -> iterable of (images [K*V,3,S,S], instance_ids [K*V], class_ids [K*V])`.

    Train drops the last incomplete batch (every batch is exactly K x V); val keeps it, so
    every val original is scored.  The same epoch gives the same batches.  `shard` =
    (rank, processes): this process's K/processes x V part of each batch.  Train takes each
    real photograph `photo_repeats` times per epoch (InstanceBatchSampler's repeats)."""
    originals = split_originals(manifest_csv, corpus_dir, split)
    if len(originals) < 2:
        raise ValueError(f"split {split!r} of {manifest_csv} has {len(originals)} images; need at least 2")
    drop_last = split == "train"
    if drop_last and len(originals) < instances_per_batch:
        raise ValueError(f"split {split!r} has {len(originals)} images, fewer than instances_per_batch="
                         f"{instances_per_batch}: no full batch")
    class_names = list(class_names) if class_names is not None else class_names_from_manifest(manifest_csv)
    dataset = InstanceViews(originals, class_names, image_size, normalization, seed,
                            labels=corpus_labels(manifest_csv, originals), views=views)
    repeats = [photo_repeats if o.photo else 1 for o in originals] if drop_last and photo_repeats > 1 else None
    sampler = InstanceBatchSampler(len(dataset), instances_per_batch, views_per_instance, seed, drop_last, shard,
                                   repeats)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=dataset.collate,
                        persistent_workers=num_workers > 0)

    def batches(epoch: int = 0) -> Iterable[Batch]:
        return EpochBatches(loader, sampler, epoch)

    return batches


class EpochBatches:
    """The batches of one epoch; iterating twice gives the same batches again."""

    def __init__(self, loader: DataLoader, sampler: InstanceBatchSampler, epoch: int):
        self.loader, self.sampler, self.epoch = loader, sampler, epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        # The sampler runs in this process and reads its epoch when iteration starts, so a
        # persistent worker pool can serve any epoch.
        self.sampler.epoch = self.epoch
        return iter(self.loader)
