"""Fixtures shared by the test suite: small real photographs that ship with
scikit-image and scikit-learn, so tests need no download and no generated noise."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _skimage_photos() -> dict[str, Image.Image]:
    from skimage import data

    photos = {
        "chelsea": data.chelsea(),      # a cat
        "coffee": data.coffee(),        # a cup of espresso
        "rocket": data.rocket(),        # a rocket on its launch pad
        "astronaut": data.astronaut(),  # a portrait
        "camera": np.stack([data.camera()] * 3, axis=-1),  # a photographer (grey)
    }
    return {name: Image.fromarray(pixels).convert("RGB") for name, pixels in photos.items()}


def _sklearn_photos() -> dict[str, Image.Image]:
    from sklearn.datasets import load_sample_images

    samples = load_sample_images()
    names = [path.rsplit("/", 1)[-1].split(".")[0] for path in samples.filenames]  # china, flower
    return {name: Image.fromarray(pixels) for name, pixels in zip(names, samples.images)}


@pytest.fixture(scope="session")
def real_photos() -> dict[str, Image.Image]:
    """Seven distinct real RGB photographs (300-640 px), keyed by name."""
    return {**_skimage_photos(), **_sklearn_photos()}


@pytest.fixture(scope="session")
def small_real_photos(real_photos) -> dict[str, Image.Image]:
    """The same photographs with the longer side reduced to 160 px (fast to process)."""
    small = {}
    for name, photo in real_photos.items():
        copy = photo.copy()
        copy.thumbnail((160, 160), Image.Resampling.LANCZOS)
        small[name] = copy
    return small


# ---------------------------------------------------------------------------
# Awkward image files, as found in real folders (see mtl.data.imageio)


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


def _write_awkward_images(folder: Path, photo: Image.Image) -> dict[str, str | None]:
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
def awkward_images(tmp_path, small_real_photos) -> tuple[Path, dict[str, str | None], Image.Image]:
    """(folder, file name -> expected load_image reason or None if it converts, the photo used).

    One file of each awkward kind: empty, truncated JPEG and PNG, text and SVG
    named as images, 1x1, a 100k x 100k bomb header, CMYK, 16-bit grey, 48-bit
    RGB, RGBA and LA with a transparent hole, palette with a transparent index.
    """
    photo = small_real_photos["coffee"]
    folder = tmp_path / "awkward"
    return folder, _write_awkward_images(folder, photo), photo


# ---------------------------------------------------------------------------
# A folder with planted copies (mtl dedup)

# (original, edit): edits that keep the picture's size, so each original stays its group's keeper
# by age alone; all three stay within 10 pHash bits of their original.
PLANTED_EDITS = (("chelsea", "jpeg"), ("coffee", "blur"), ("rocket", "sharpen"))


def write_folder_with_copies(folder: Path, photos: dict[str, Image.Image]) -> set[frozenset[str]]:
    """The seven photographs (four at the top, three in a sub-folder) and an edited copy of
    three of them under copies/; originals are made a day older than the copies.
    Returns the planted pairs of relative paths."""
    import os

    from mtl.data.transforms import apply

    (folder / "sub").mkdir(parents=True)
    (folder / "copies").mkdir()
    originals = {}
    for k, (name, photo) in enumerate(sorted(photos.items())):
        originals[name] = f"{'sub/' if k % 2 else ''}{name}.png"
        photo.save(folder / originals[name])
        os.utime(folder / originals[name], (1.6e9, 1.6e9))  # older than the copies
    planted = set()
    for k, (name, edit) in enumerate(PLANTED_EDITS):
        copy = f"copies/{name}_{edit}.jpg"
        apply(edit, photos[name], k).save(folder / copy, quality=92)
        planted.add(frozenset({originals[name], copy}))
    return planted


@pytest.fixture()
def folder_with_copies(tmp_path, small_real_photos) -> tuple[Path, set[frozenset[str]]]:
    """(folder, planted copy pairs): see write_folder_with_copies."""
    folder = tmp_path / "photos"
    return folder, write_folder_with_copies(folder, small_real_photos)


@pytest.fixture(scope="session")
def imagenet_branches_checkpoint(tmp_path_factory) -> Path:
    """An MTLNet checkpoint: the offline ImageNet backbone with an untrained, seeded
    embedding branch, which keeps the backbone's sense of similarity (copies score >= 0.85
    against their photograph, distinct photographs <= 0.75).  An untrained class branch
    would flip its guess on a JPEG re-encode, so this one answers "scene" for everything."""
    import torch

    from mtl.model import ModelConfig, MTLNet

    torch.manual_seed(0)
    model = MTLNet(ModelConfig())
    last = model.classifier.mlp[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([2.0, 0.0]))
    path = tmp_path_factory.mktemp("checkpoint") / "imagenet_branches.pt"
    model.save_checkpoint(path, image_size=112)  # the input size, as mtl train records it
    return path
