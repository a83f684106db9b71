"""Fixtures shared by the test suite: small real photographs that ship with
scikit-image and scikit-learn, so tests need no download and no generated noise."""

from __future__ import annotations

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
