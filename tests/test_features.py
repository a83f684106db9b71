"""The stage-1 feature cache: stored taps give the branches what images give them, the
cache is rebuilt exactly when what it depends on changes, and its batches have the
structure, labels and determinism of image batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtl.data.batches import make_stage_batches
from mtl.features import CacheSpec, FeatureCache, build_feature_cache, cache_batches
from mtl.model import MTLNet, ModelConfig
from tests.test_batches import write_tiny_corpus

SIZE, K, V = 64, 4, 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"), {"train": 10, "val": 6, "test": 2})


@pytest.fixture(scope="module")
def model() -> MTLNet:
    torch.manual_seed(0)
    return MTLNet(ModelConfig(pretrained=False, class_names=("clipart", "scene"))).eval()


def build(corpus: Path, out: Path, model: MTLNet, split: str = "train", views: int = 3,
          recipe: str = "single") -> FeatureCache:
    return build_feature_cache(corpus, corpus.parent, out, CacheSpec(split, views, SIZE, recipe, 0), model,
                               batch_size=8, num_workers=0, device="cpu")


@pytest.fixture(scope="module")
def train_cache(corpus, model, tmp_path_factory) -> FeatureCache:
    return build(corpus, tmp_path_factory.mktemp("features"), model)


def test_branches_on_stored_taps_equal_branches_on_images(corpus, model, tmp_path):
    """Validation from the cache scores the very views validation from images scores,
    to float16 precision of the stored taps."""
    cache = build(corpus, tmp_path, model, split="val", views=V)
    from_cache = list(cache_batches(cache, K, V, seed=0, train=False)(0))
    from_images = list(make_stage_batches(corpus, corpus.parent, "val", K, V, SIZE, model.normalization, 0,
                                          class_names=model.config.class_names)(0))
    assert len(from_cache) == len(from_images) == 2  # 6 val images, K = 4: one full and one partial batch
    with torch.no_grad():
        for (taps, labels, classes), (images, labels_i, classes_i) in zip(from_cache, from_images):
            assert torch.equal(labels, labels_i) and torch.equal(classes, classes_i)
            cached, direct = model.heads(taps), model(images)
            torch.testing.assert_close(cached.embedding, direct.embedding, atol=3e-3, rtol=0)
            torch.testing.assert_close(cached.logits, direct.logits, atol=3e-3, rtol=1e-2)


def test_cache_holds_views_as_float16_with_its_labels(train_cache, corpus):
    assert train_cache.taps.dtype == np.float16 and train_cache.taps.shape[0] == 10 * 3
    assert train_cache.taps.shape[1] == 320  # the tap the paper's branches read
    meta = json.loads((train_cache.directory / "meta.json").read_text())
    assert meta["views"] == 3 and len(meta["ids"]) == 10 and meta["build_seconds"] > 0
    assert len(set(train_cache.labels)) == 10


def test_train_batches_are_k_by_v_distinct_views_seeded_per_epoch(train_cache):
    batches = cache_batches(train_cache, K, V, seed=0, train=True)
    epoch = list(batches(1))
    assert len(epoch) == 10 // K  # the last incomplete batch is dropped
    for taps, labels, _ in epoch:
        assert taps.shape == (K * V, 320, *train_cache.taps.shape[2:]) and taps.dtype == torch.float32
        assert all(len(set(labels[i * V:(i + 1) * V].tolist())) == 1 for i in range(K))
        for i in range(K):  # the V views of one instance are different stored views
            assert not torch.equal(taps[i * V], taps[i * V + 1])
    again = list(batches(1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch, again))
    other = list(batches(2))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch, other))


def test_processes_share_cached_batches_like_image_batches(train_cache):
    whole = list(cache_batches(train_cache, K, V, seed=0, train=True)(1))
    halves = [list(cache_batches(train_cache, K, V, seed=0, train=True, shard=(rank, 2))(1)) for rank in range(2)]
    for b, batch in enumerate(whole):
        for i in range(3):
            assert torch.equal(torch.cat([half[b][i] for half in halves]), batch[i])


def test_an_up_to_date_cache_is_reused_not_rebuilt(train_cache, corpus, model):
    stamp = (train_cache.directory / "taps.npy").stat().st_mtime_ns
    again = build(corpus, train_cache.directory.parent, model)
    assert (again.directory / "taps.npy").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("change", ["image", "view_recipe", "backbone"])
def test_a_change_of_what_the_taps_depend_on_rebuilds_the_cache(corpus, model, tmp_path, change):
    first = build(corpus, tmp_path, model)
    fingerprint = json.loads((first.directory / "meta.json").read_text())["fingerprint"]
    recipe = "single"
    if change == "image":
        path = corpus.parent / "images" / "img000.jpg"
        original = path.read_bytes()
        Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path, quality=90)
    elif change == "view_recipe":
        recipe = "chain"
    else:
        model = MTLNet(ModelConfig(pretrained=False, class_names=("clipart", "scene"))).eval()
        with torch.no_grad():
            next(model.backbone.parameters()).add_(0.01)
    try:
        second = build(corpus, tmp_path, model, recipe=recipe)
        assert json.loads((second.directory / "meta.json").read_text())["fingerprint"] != fingerprint
        assert not np.array_equal(np.asarray(second.taps), np.asarray(first.taps))
    finally:
        if change == "image":
            path.write_bytes(original)


def test_a_build_that_fails_half_way_leaves_no_cache(corpus, model, tmp_path, monkeypatch):
    import mtl.features as features

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(features, "_write_taps", fail)
    with pytest.raises(KeyboardInterrupt):
        build(corpus, tmp_path, model)
    assert list(tmp_path.iterdir()) == []  # neither a cache nor a staging folder


def test_batches_refuse_more_views_than_stored(train_cache):
    with pytest.raises(ValueError, match="stores 3 views"):
        cache_batches(train_cache, K, 4, seed=0, train=True)
