"""Copy transformations: named, deterministic per seed, robust to any small RGB input,
with held-out edits kept out of training."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image
from skimage import data

from mtl.data import transforms as T


def _thumb(arr: np.ndarray, side: int = 96) -> Image.Image:
    img = Image.fromarray(arr)
    img.thumbnail((side, side))
    return img


IMAGES = {
    "colour": _thumb(data.chelsea()),
    "grayscale_derived": _thumb(data.camera()).convert("RGB"),
    "tiny": Image.fromarray(data.coffee()).resize((8, 8)),
}


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


@pytest.mark.parametrize("kind", IMAGES)
@pytest.mark.parametrize("name", T.EVAL_FAMILY)
def test_each_transformation_is_deterministic_per_seed_and_returns_rgb(name: str, kind: str) -> None:
    img = IMAGES[kind]
    first, again = T.apply(name, img, 7), T.apply(name, img, 7)
    assert first.mode == "RGB" and min(first.size) >= 1
    assert first.size == again.size and np.array_equal(_pixels(first), _pixels(again))


@pytest.mark.parametrize("name", [n for n in T.EVAL_FAMILY if n not in {"hflip", "grayscale"}])
def test_random_transformations_change_with_the_seed(name: str) -> None:
    img = IMAGES["colour"]
    outs = [T.apply(name, img, seed) for seed in range(4)]
    distinct = {(o.size, _pixels(o).tobytes()) for o in outs}
    assert len(distinct) > 1, f"{name} ignores its seed"


@pytest.mark.parametrize("name", T.EVAL_FAMILY)
def test_each_transformation_edits_the_image(name: str) -> None:
    img = IMAGES["colour"]
    out = T.apply(name, img, 3)
    assert out.size != img.size or not np.array_equal(_pixels(out), _pixels(img))


def test_a_generator_continues_where_it_left_off() -> None:
    rng = np.random.default_rng(5)
    a, b = T.apply("noise", IMAGES["colour"], rng), T.apply("noise", IMAGES["colour"], rng)
    assert not np.array_equal(_pixels(a), _pixels(b))


def test_input_image_is_not_modified() -> None:
    img = IMAGES["colour"].copy()
    before = _pixels(img).copy()
    for name in T.EVAL_FAMILY:
        T.apply(name, img, 1)
    assert np.array_equal(_pixels(img), before)


def test_families_cover_the_disc21_edit_families() -> None:
    expected = {"crop_resize", "scale", "aspect", "pad_border", "rotate_small", "rotate90", "hflip",
                "color_jitter", "grayscale", "blur", "sharpen", "noise", "jpeg", "pixelate", "opacity",
                "text_overlay", "emoji_overlay", "overlay_on_screenshot", "perspective", "meme_caption",
                "compose2", "compose3"}
    assert expected <= set(T.EVAL_FAMILY)


def test_held_out_edits_are_never_in_the_train_family() -> None:
    held_out = [n for n in T.EVAL_FAMILY if T.is_held_out(n)]
    assert {"perspective", "meme_caption", "overlay_on_screenshot", "compose2", "compose3"} <= set(held_out)
    assert not set(held_out) & set(T.TRAIN_FAMILY)
    assert set(T.TRAIN_FAMILY) < set(T.EVAL_FAMILY)
    assert not any(T.is_held_out(n) for n in T.TRAIN_FAMILY)


def test_apply_random_stays_inside_its_family() -> None:
    names = {T.apply_random("train", IMAGES["tiny"], seed)[0] for seed in range(200)}
    assert names <= set(T.TRAIN_FAMILY) and len(names) > len(T.TRAIN_FAMILY) // 2


def test_chained_views_draw_distinct_train_edits_only(monkeypatch) -> None:
    """A chain of k edits applies k different train-family transformations, never a
    held-out one, the same ones for the same seed."""
    used: list[str] = []
    real = T.apply
    monkeypatch.setattr(T, "apply", lambda name, img, rng: used.append(name) or real(name, img, rng))
    for seed in range(40):
        used.clear()
        T.apply_chain("train", IMAGES["colour"], seed, 3)
        assert len(used) == len(set(used)) == 3 and set(used) <= set(T.TRAIN_FAMILY)
    first = np.asarray(T.apply_chain("train", IMAGES["colour"], 7, 2))
    assert np.array_equal(first, np.asarray(T.apply_chain("train", IMAGES["colour"], 7, 2)))
    with pytest.raises(ValueError, match="count"):
        T.apply_chain("train", IMAGES["colour"], 0, 0)


def test_unknown_names_fail_clearly() -> None:
    with pytest.raises(KeyError, match="unknown transformation"):
        T.apply("sepia", IMAGES["tiny"], 0)
    with pytest.raises(KeyError, match="unknown family"):
        T.apply_random("test", IMAGES["tiny"], 0)


def test_meme_caption_adds_a_band_above_the_unchanged_picture() -> None:
    img = IMAGES["colour"]
    out = T.apply("meme_caption", img, 0)
    band = out.height - img.height
    assert out.width == img.width and band > 0
    assert np.array_equal(_pixels(out)[band:], _pixels(img))


def test_gallery_shows_the_image_then_every_transformation_of_it(tmp_path) -> None:
    """One 192 px cell per picture, six to a row, in registry order after the original: each
    holds the picture made with the gallery's seed, shrunk and centred under a label that is
    red for held-out edits."""
    from mtl.data.gallery import main

    image = IMAGES["colour"]
    assert main(["--image", str(_save(image, tmp_path / "cat.png")), "--out", str(tmp_path / "g.png"), "--seed", "5"]) == 0
    sheet = np.asarray(Image.open(tmp_path / "g.png").convert("RGB")).astype(int)
    tile, label, columns = 192, 18, 6
    shown = [("original", image, False)] + [(name, t.fn(image, T.as_generator(5)), t.held_out)
                                            for name, t in T.REGISTRY.items()]
    assert sheet.shape == (-(-len(shown) // columns) * (tile + label), columns * tile, 3)
    for i, (name, picture, held_out) in enumerate(shown):
        x, y = (i % columns) * tile, (i // columns) * (tile + label)
        thumb = picture.copy()
        thumb.thumbnail((tile - 8, tile - 8))
        top, left = y + label + (tile - thumb.height) // 2, x + (tile - thumb.width) // 2
        assert np.array_equal(sheet[top:top + thumb.height, left:left + thumb.width], np.asarray(thumb)), name
        band = sheet[y:y + label, x:x + tile]
        assert (band.min() < 128) and ((band[..., 0] - band[..., 1]).max() > 60) == held_out, name


def _save(img: Image.Image, path) -> str:
    img.save(path)
    return str(path)


# The exact bytes of every transformation of one image with one seed, with this
# environment's torchvision, Pillow and AugLy (see tests/test_batches.py: views and
# queries must not change under a refactor).
PINNED_EVAL_FAMILY = "c879ae747bc35e69"


def test_every_transformation_is_byte_identical_to_the_pinned_one() -> None:
    digest = hashlib.sha256()
    for name in T.EVAL_FAMILY:
        out = T.apply(name, IMAGES["colour"], 11)
        digest.update(name.encode() + repr(out.size).encode() + out.tobytes())
    assert digest.hexdigest()[:16] == PINNED_EVAL_FAMILY
