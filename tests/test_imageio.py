"""load_image: every kind of bad file is converted or skipped with its reason, never raised."""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtl.data.imageio import LoadResult, fit_within, load_image


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def handmade_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes = b"") -> bytes:
    """A PNG written byte by byte: lets us make 48-bit files and bomb headers Pillow cannot write."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = _png_chunk(b"IDAT", zlib.compress(rows)) if rows else b""
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + body + _png_chunk(b"IEND", b"")


def _rgb48_png(photo: Image.Image) -> bytes:
    """A 16-bit-per-channel RGB PNG of `photo` (each 8-bit value v stored as v*257)."""
    pixels = np.asarray(photo).astype(">u2") * 257
    rows = b"".join(b"\x00" + row.tobytes() for row in pixels)
    return handmade_png(photo.width, photo.height, 16, 2, rows)


def _rgba_with_hole(photo: Image.Image) -> Image.Image:
    """The photo with a fully transparent square in its middle."""
    rgba = photo.convert("RGBA")
    alpha = np.full((photo.height, photo.width), 255, np.uint8)
    alpha[photo.height // 4: 3 * photo.height // 4, photo.width // 4: 3 * photo.width // 4] = 0
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def write_bad_files(folder: Path, photo: Image.Image) -> dict[str, str | None]:
    """Seed `folder` with one file of each awkward kind; return file name -> expected reason."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}

    def add(name: str, reason: str | None) -> Path:
        expected[name] = reason
        return folder / name

    add("empty.jpg", "empty").write_bytes(b"")
    photo.save(folder / "whole.jpg", quality=90)
    add("truncated.jpg", "truncated").write_bytes((folder / "whole.jpg").read_bytes()[:1500])
    (folder / "whole.jpg").unlink()
    photo.save(folder / "whole.png")
    add("truncated.png", "truncated").write_bytes((folder / "whole.png").read_bytes()[:3000])
    (folder / "whole.png").unlink()
    add("notes.png", "not_an_image").write_text("this is a text file with an image name\n")
    add("drawing.svg", "not_an_image").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    add("one_pixel.png", "too_small").write_bytes(b"")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "one_pixel.png")
    add("bomb.png", "too_large").write_bytes(handmade_png(100_000, 100_000, 8, 2))
    photo.convert("CMYK").save(add("cmyk.jpg", None), quality=90)
    grey16 = (np.asarray(photo.convert("L")).astype(np.uint16) * 257)
    Image.fromarray(grey16).save(add("grey16.png", None))
    add("rgb48.png", None).write_bytes(_rgb48_png(photo))
    rgba = _rgba_with_hole(photo)
    rgba.save(add("rgba.png", None))
    rgba.convert("LA").save(add("la.png", None))
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=255)
    colours = palette.getpalette()
    palette.putpalette(colours + [0, 0, 0] * (256 - len(colours) // 3))  # index 255: black, transparent
    palette.putpixel((0, 0), 255)
    palette.save(add("palette_transparent.png", None), transparency=255)
    photo.save(add("plain.jpg", None), quality=90)
    return expected


@pytest.fixture()
def photo(small_real_photos) -> Image.Image:
    return small_real_photos["coffee"]


def test_each_bad_file_kind_gets_its_reason(tmp_path, photo):
    expected = write_bad_files(tmp_path, photo)
    results = {name: load_image(tmp_path / name, min_side=2) for name in expected}
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


def test_sixteen_bit_files_are_scaled_not_clipped(tmp_path, photo):
    write_bad_files(tmp_path, photo)
    grey = load_image(tmp_path / "grey16.png").image
    rgb = load_image(tmp_path / "rgb48.png").image
    assert _mean_abs_difference(grey, photo.convert("L").convert("RGB")) < 1.0
    assert _mean_abs_difference(rgb, photo) < 1.0


def test_cmyk_keeps_the_colours(tmp_path, photo):
    write_bad_files(tmp_path, photo)
    assert _mean_abs_difference(load_image(tmp_path / "cmyk.jpg").image, photo) < 12.0


@pytest.mark.parametrize("name", ["rgba.png", "la.png"])
def test_transparency_is_composited_onto_white(tmp_path, photo, name):
    write_bad_files(tmp_path, photo)
    pixels = np.asarray(load_image(tmp_path / name).image)
    hole = pixels[photo.height // 3: 2 * photo.height // 3, photo.width // 3: 2 * photo.width // 3]
    assert (hole == 255).all()
    assert pixels[: photo.height // 5].mean() < 250  # the opaque border keeps the photo


def test_palette_transparent_index_becomes_white(tmp_path, photo):
    write_bad_files(tmp_path, photo)
    pixels = np.asarray(load_image(tmp_path / "palette_transparent.png").image)
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert pixels.std() > 20  # the rest is still the photo


def test_bomb_is_rejected_from_the_header_whatever_the_limit(tmp_path):
    (tmp_path / "bomb.png").write_bytes(handmade_png(100_000, 100_000, 8, 2))
    # Our own limit, then Pillow's DecompressionBombError when ours is set higher.
    assert load_image(tmp_path / "bomb.png").reason == "too_large"
    assert load_image(tmp_path / "bomb.png", max_pixels=10**11).reason == "too_large"


def test_size_limits_are_parameters(tmp_path, photo):
    photo.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png", min_side=photo.height + 1).reason == "too_small"
    assert load_image(tmp_path / "p.png", max_pixels=photo.width * photo.height - 1).reason == "too_large"
    assert load_image(tmp_path / "p.png", max_pixels=photo.width * photo.height).ok


def test_exif_orientation_is_applied(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the viewer rotates 90 degrees clockwise
    photo.save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    upright = load_image(tmp_path / "sideways.jpg").image
    assert upright.size == (photo.height, photo.width)
    expected = photo.transpose(Image.Transpose.ROTATE_270)
    assert _mean_abs_difference(upright, expected) < 6.0


def test_fit_within_shrinks_only(photo):
    shrunk = fit_within(photo, 64)
    assert max(shrunk.size) == 64
    assert abs(shrunk.width / shrunk.height - photo.width / photo.height) < 0.05
    assert fit_within(photo, 4000).size == photo.size
