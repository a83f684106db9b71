"""Stage-1 feature cache: the frozen backbone's taps of V views per image, computed once.

While the backbone is frozen (stage 1, §III-A) its 320-channel tap is a pure function of
the augmented view, so the branches can learn from stored taps instead of images: the
views are decoded, edited and pushed through the backbone once, and every later epoch
costs only the two small branches and the loss.

Layout of a split's cache, ``<dir>/<split>/``:
    taps.npy    float16 [N * V, C, h, w], memory-mapped (row = instance * V + view)
    meta.json   ids, corpus-wide instance labels, class ids, V, and the fingerprint

The fingerprint covers everything that determines the taps: the split's image bytes, the
view recipe and the code that lists originals and draws views, the backbone's weights and normalization, the
input size and the seed.  Opening a cache whose fingerprint differs rebuilds it.

Which views are stored: view v of instance i is exactly the image path's view
``ViewKey(epoch=0, instance=i, view=v)``.  Training batches draw `views_per_instance` of
the V stored views per instance and epoch (seeded); validation batches take views
0..V'-1 in the image path's epoch-0 order, so validation from the cache scores the very
batches validation from images would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

import mtl.data.batches as batches_module
import mtl.data.manifest as manifest_module
import mtl.data.transforms as transforms_module
from mtl.backbones import forward_tap
from mtl.data.batches import Batch, InstanceBatchSampler, InstanceViews, ViewKey, corpus_labels
from mtl.data.manifest import split_originals
from mtl.model import MTLNet
from mtl.runtime import progress, resolve_device

CACHE_FORMAT = 1


@dataclass(frozen=True)
class CacheSpec:
    """What a split's cache holds: V views of each image, made like training views."""

    split: str
    views: int
    image_size: int
    view_recipe: str
    seed: int

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError(f"a feature cache needs at least one view per image, got {self.views}")


@dataclass
class FeatureCache:
    """An opened cache: memory-mapped taps and the labels of its instances."""

    directory: Path
    taps: np.ndarray        # float16 [N * V, C, h, w], memory-mapped
    ids: list[str]
    labels: np.ndarray      # [N] corpus-wide instance labels (the contrastive positives)
    class_ids: np.ndarray   # [N]
    views: int
    # A subset (`subset`): the stored instance behind each of `ids`; labels, class ids and
    # rows stay those of the stored instances.  None: every stored instance, in order.
    instances: np.ndarray | None = None

    @property
    def num_instances(self) -> int:
        return len(self.ids)

    def stored_instance(self, instance: int) -> int:
        return instance if self.instances is None else int(self.instances[instance])

    def subset(self, ids: Sequence[str]) -> "FeatureCache":
        """The same stored taps, restricted to `ids` (in that order): a learning-curve point
        trains on the very views the full cache holds for its images."""
        position = {image_id: i for i, image_id in enumerate(self.ids)}
        missing = [i for i in ids if i not in position]
        if missing:
            raise KeyError(f"{self.directory}: {len(missing)} id(s) not in the cache, e.g. {missing[:3]}")
        chosen = np.array([self.stored_instance(position[i]) for i in ids], dtype=np.int64)
        return FeatureCache(self.directory, self.taps, list(ids), self.labels, self.class_ids, self.views, chosen)

    @classmethod
    def open(cls, directory: str | Path) -> "FeatureCache":
        directory = Path(directory)
        meta = json.loads((directory / "meta.json").read_text())
        taps = np.load(directory / "taps.npy", mmap_mode="r")
        return cls(directory, taps, list(meta["ids"]), np.asarray(meta["labels"], dtype=np.int64),
                   np.asarray(meta["class_ids"], dtype=np.int64), int(meta["views"]))


# --------------------------------------------------------------------------- fingerprint

def cache_fingerprint(manifest_csv: str | Path, corpus_dir: str | Path, spec: CacheSpec, model: MTLNet) -> str:
    """A digest of everything the stored taps depend on (see the module docstring)."""
    digest = hashlib.sha256()
    settings = {**asdict(spec), "format": CACHE_FORMAT, "backbone": model.config.backbone,
                "normalization": model.normalization, "class_names": list(model.config.class_names),
                "torch": torch.__version__}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for module in (transforms_module, batches_module, manifest_module):  # the code that makes the views
        digest.update(Path(module.__file__).read_bytes())
    for original in split_originals(manifest_csv, corpus_dir, spec.split):
        digest.update(original.id.encode())
        digest.update(original.path.read_bytes())
    for name, tensor in sorted(model.backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


# --------------------------------------------------------------------------- building

def build_feature_cache(manifest_csv: str | Path, corpus_dir: str | Path, out_dir: str | Path, spec: CacheSpec,
                        model: MTLNet, batch_size: int = 128, num_workers: int = 1,
                        device: str = "auto") -> FeatureCache:
    """The cache of `spec.split` under `out_dir/<split>`, built unless an up-to-date one
    is there.  Written to a staging folder and renamed: a killed build leaves no cache."""
    target = Path(out_dir) / spec.split
    fingerprint = cache_fingerprint(manifest_csv, corpus_dir, spec, model)
    meta_path = target / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("fingerprint") == fingerprint:
        return FeatureCache.open(target)

    originals = split_originals(manifest_csv, corpus_dir, spec.split)
    dataset = InstanceViews(originals, model.config.class_names, spec.image_size, model.normalization, spec.seed,
                            labels=corpus_labels(manifest_csv, originals), views=spec.view_recipe)
    staging = target.with_name(f".{target.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        seconds = _write_taps(dataset, spec.views, model, staging / "taps.npy", batch_size, num_workers, device,
                              f"feature cache ({spec.split}, {spec.views} views)")
        meta = {"fingerprint": fingerprint, "spec": asdict(spec), "views": spec.views,
                "ids": [o.id for o in originals], "labels": dataset.labels, "class_ids": dataset.class_ids,
                "build_seconds": round(seconds, 2), "views_per_second": round(len(dataset) * spec.views / seconds, 1)}
        (staging / "meta.json").write_text(json.dumps(meta) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return FeatureCache.open(target)


@torch.no_grad()
def _write_taps(dataset: InstanceViews, views: int, model: MTLNet, path: Path, batch_size: int,
                num_workers: int, device: str, desc: str) -> float:
    """Push every stored view through the backbone; taps go straight into the memmap."""
    dev = resolve_device(device)
    backbone = model.backbone.to(dev).eval().to(memory_format=torch.channels_last)
    keys = [ViewKey(0, instance, view) for instance in range(len(dataset)) for view in range(views)]
    loader = DataLoader(dataset, batch_size=batch_size, sampler=keys, collate_fn=dataset.collate,
                        num_workers=num_workers)
    started, row, taps = time.perf_counter(), 0, None
    for images, _, _ in progress(loader, len(loader), desc, unit="batch"):
        tap = forward_tap(backbone, images.to(dev).contiguous(memory_format=torch.channels_last))
        if taps is None:
            taps = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(len(keys), *tap.shape[1:]))
        taps[row:row + len(tap)] = tap.float().cpu().numpy().astype(np.float16)
        row += len(tap)
    taps.flush()
    return time.perf_counter() - started


# --------------------------------------------------------------------------- batches

def cache_batches(cache: FeatureCache, instances_per_batch: int, views_per_instance: int, seed: int,
                  train: bool, shard: tuple[int, int] = (0, 1),
                  repeats: Sequence[int] | None = None) -> Callable[[int], Iterable[Batch]]:
    """`batches(epoch)` of (taps [K*V', C, h, w] float32, instance labels, class ids),
    in the same K x V' structure as image batches.  `train`: drop the last incomplete
    batch and draw V' of the stored views per instance and epoch; otherwise keep every
    instance and take views 0..V'-1 (the image path's validation views).  `shard` =
    (rank, processes): this process's part of each batch, as for image batches.  `repeats`:
    instances that appear more than once per epoch (real photographs) draw other stored
    views for each appearance while they last, then the same ones again."""
    if views_per_instance > cache.views:
        raise ValueError(f"{cache.directory} stores {cache.views} views per image; batches need "
                         f"{views_per_instance}: rebuild it with more views")
    if train and cache.num_instances < instances_per_batch:
        raise ValueError(f"{cache.directory} has {cache.num_instances} images, fewer than "
                         f"instances_per_batch={instances_per_batch}: no full batch")
    sampler = InstanceBatchSampler(cache.num_instances, instances_per_batch, views_per_instance, seed,
                                   drop_last=train, shard=shard, repeats=repeats if train else None)

    def batches(epoch: int = 0) -> Iterable[Batch]:
        return CachedEpoch(cache, sampler, epoch, seed, random_views=train)

    return batches


class CachedEpoch:
    """The batches of one epoch from a cache; iterating twice gives the same batches."""

    def __init__(self, cache: FeatureCache, sampler: InstanceBatchSampler, epoch: int, seed: int,
                 random_views: bool):
        self.cache, self.sampler, self.epoch, self.seed, self.random_views = cache, sampler, epoch, seed, random_views

    def __len__(self) -> int:
        return len(self.sampler)

    def _view(self, key: ViewKey) -> int:
        if not self.random_views:
            return key.view
        # Per (epoch, instance), a seeded choice of distinct stored views.
        chosen = np.random.default_rng((self.seed, self.epoch, key.instance)).permutation(self.cache.views)
        return int(chosen[key.view % self.cache.views])

    def rows(self, keys: Sequence[ViewKey]) -> np.ndarray:
        """The cache rows of one batch's view keys."""
        return np.array([self.cache.stored_instance(k.instance) * self.cache.views + self._view(k) for k in keys])

    def load(self, rows: np.ndarray) -> Batch:
        """(taps as float32, instance labels, class ids) of cache rows, in their order."""
        order = np.argsort(rows)  # ascending reads from the memmap, then back in batch order
        taps = np.empty((len(rows), *self.cache.taps.shape[1:]), dtype=np.float16)
        taps[order] = self.cache.taps[rows[order]]
        instances = rows // self.cache.views
        return (torch.from_numpy(taps).float(), torch.from_numpy(self.cache.labels[instances]),
                torch.from_numpy(self.cache.class_ids[instances]))

    def keys(self) -> Iterator[list[ViewKey]]:
        """The view keys of each batch, in order."""
        self.sampler.epoch = self.epoch
        yield from self.sampler

    def __iter__(self) -> Iterator[Batch]:
        for keys in self.keys():
            yield self.load(self.rows(keys))


def split_caches(manifest_csv: str | Path, corpus_dir: str | Path, out_dir: str | Path, model: MTLNet,
                 views: int, val_views: int, image_size: int, view_recipe: str, seed: int,
                 splits: Sequence[str] = ("train", "val"), **build_options) -> dict[str, FeatureCache]:
    """Build (or open) the train and val caches a frozen stage learns from."""
    counts = {"train": views, "val": val_views}
    return {split: build_feature_cache(manifest_csv, corpus_dir, out_dir,
                                       CacheSpec(split, counts[split], image_size, view_recipe, seed),
                                       model, **build_options)
            for split in splits}
