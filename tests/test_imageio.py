"""load_image: every kind of bad file is converted or skipped with its reason, never raised."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from conftest import handmade_png
from mtl.data.imageio import LoadResult, fit_within, load_image


@pytest.fixture()
def photo(small_real_photos) -> Image.Image:
    return small_real_photos["coffee"]


def test_each_bad_file_kind_gets_its_reason(awkward_images):
    folder, expected, photo = awkward_images
    results = {name: load_image(folder / name, min_side=2) for name in expected}
    assert {name: r.reason for name, r in results.items()} == expected
    kept = [r for r in results.values() if r.ok]
    assert all(r.image.mode == "RGB" and r.image.size == photo.size for r in kept)
    assert Counter(r.reason for r in results.values() if not r.ok) == Counter(
        {"empty": 1, "truncated": 2, "not_an_image": 2, "too_small": 1, "too_large": 1})


def test_missing_path_is_a_reason_not_an_exception(tmp_path):
    assert load_image(tmp_path / "nowhere.jpg") == LoadResult(None, "missing")
    assert load_image(tmp_path).reason == "missing"  # a folder is not an image file


def _mean_abs_difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


def test_sixteen_bit_files_are_scaled_not_clipped(awkward_images):
    folder, _, photo = awkward_images
    grey = load_image(folder / "grey16.png").image
    rgb = load_image(folder / "rgb48.png").image
    assert _mean_abs_difference(grey, photo.convert("L").convert("RGB")) < 1.0
    assert _mean_abs_difference(rgb, photo) < 1.0


def test_cmyk_keeps_the_colours(awkward_images):
    folder, _, photo = awkward_images
    assert _mean_abs_difference(load_image(folder / "cmyk.jpg").image, photo) < 12.0


@pytest.mark.parametrize("name", ["rgba.png", "la.png"])
def test_transparency_is_composited_onto_white(awkward_images, name):
    folder, _, photo = awkward_images
    pixels = np.asarray(load_image(folder / name).image)
    hole = pixels[photo.height // 3: 2 * photo.height // 3, photo.width // 3: 2 * photo.width // 3]
    assert (hole == 255).all()
    assert pixels[: photo.height // 5].mean() < 250  # the opaque border keeps the photo


def test_palette_transparent_index_becomes_white(awkward_images):
    folder, _, photo = awkward_images
    pixels = np.asarray(load_image(folder / "palette_transparent.png").image)
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert pixels.std() > 20  # the rest is still the photo


def test_bomb_is_rejected_from_the_header_whatever_the_limit(awkward_images):
    folder, _, _ = awkward_images  # bomb.png: a 100,000 x 100,000 header and no pixel data
    # Our own limit, then Pillow's DecompressionBombError when ours is set higher.
    assert load_image(folder / "bomb.png").reason == "too_large"
    assert load_image(folder / "bomb.png", max_pixels=10**11).reason == "too_large"


def test_size_limits_are_parameters(tmp_path, photo):
    photo.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png", min_side=photo.height + 1).reason == "too_small"
    assert load_image(tmp_path / "p.png", max_pixels=photo.width * photo.height - 1).reason == "too_large"
    assert load_image(tmp_path / "p.png", max_pixels=photo.width * photo.height).ok
    aspect = max(photo.size) / min(photo.size)
    assert load_image(tmp_path / "p.png", max_aspect=aspect * 0.99).reason == "extreme_aspect"


def test_a_slender_strip_is_rejected_from_the_header(tmp_path):
    (tmp_path / "strip.png").write_bytes(handmade_png(8, 150_000, 8, 2))  # header only: decoding would fail
    assert load_image(tmp_path / "strip.png").reason == "extreme_aspect"


def test_exif_orientation_is_applied(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the viewer rotates 90 degrees clockwise
    photo.save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    upright = load_image(tmp_path / "sideways.jpg").image
    assert upright.size == (photo.height, photo.width)
    expected = photo.transpose(Image.Transpose.ROTATE_270)
    assert _mean_abs_difference(upright, expected) < 6.0


def test_max_side_shrinks_while_decoding(tmp_path, real_photos):
    photo = real_photos["rocket"]
    photo.save(tmp_path / "rocket.jpg", quality=95)
    photo.save(tmp_path / "rocket.png")
    full_then_shrunk = fit_within(load_image(tmp_path / "rocket.png").image, 100)
    for name in ("rocket.jpg", "rocket.png"):
        small = load_image(tmp_path / name, max_side=100).image
        assert small.size == full_then_shrunk.size
        assert _mean_abs_difference(small, full_then_shrunk) < 6.0


def test_fit_within_shrinks_only(photo):
    shrunk = fit_within(photo, 64)
    assert max(shrunk.size) == 64
    assert abs(shrunk.width / shrunk.height - photo.width / photo.height) < 0.05
    assert fit_within(photo, 4000).size == photo.size
