"""Named, seedable copy transformations: the edits a copy detector must survive.

Each transformation takes an RGB PIL image and a ``numpy.random.Generator`` and
returns an RGB PIL image; every random parameter is drawn from that generator,
so ``apply(name, img, seed)`` gives the same picture for the same seed in any
process.  The edit families follow DISC21 / AugLy (crop, scale, aspect, pad,
rotation, flip, colour, blur, sharpen, noise, JPEG, pixelate, opacity, text,
emoji, screenshot overlay, perspective, meme caption, and chains of these).

Two families:
  TRAIN_FAMILY  the edits the model sees while training;
  EVAL_FAMILY   every train edit plus held-out ones never used in training
                (perspective, meme caption, screenshot overlay, compositions),
                so the evaluation can report generalization to unseen edits.

We call torchvision.transforms.v2.functional and AugLy where they work.  Own
code only where neither does the job: AugLy's ``meme_format`` and
``perspective_transform`` are broken on Pillow 13 / numpy 2; AugLy's ``opacity``
only sets an alpha channel (invisible once converted back to RGB); its
``random_noise`` reseeds numpy's global generator, which would break
per-item determinism inside DataLoader workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.v2 import functional as F

Transform = Callable[[Image.Image, np.random.Generator], Image.Image]


@dataclass(frozen=True)
class Transformation:
    name: str
    fn: Transform
    held_out: bool  # True: evaluation only, never seen in training
    description: str


# --------------------------------------------------------------------------- assets

@lru_cache(maxsize=None)
def _augly():
    """AugLy's image module, imported on first use: a heavy import most processes never need."""
    import augly.image

    return augly.image


def _augly_assets() -> Path:
    return Path(_augly().__file__).parent.parent / "assets"


# Latin fonts shipped in the AugLy wheel (each has the .pkl character list AugLy needs).
TEXT_FONTS = ("Impact", "OpenSans-Bold", "Raleway-ExtraBold", "Montserrat-Bold", "Ubuntu-B",
              "IBMPlexSans-Bold", "Lobster_1.3", "Pacifico", "NotoSerif-Regular", "Chunkfive")
CAPTION_FONT = "Raleway-ExtraBold"
CAPTION_WORDS = ("when", "you", "finally", "me", "nobody", "monday", "the", "cat", "is", "that",
                 "feeling", "my", "face", "again", "so", "true", "wait", "for", "it", "lol", "why")


@lru_cache(maxsize=None)
def _emoji_paths() -> tuple[str, ...]:
    return tuple(sorted(str(p) for p in (_augly_assets() / "twemojis").rglob("*.png")))


@lru_cache(maxsize=64)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_augly_assets() / "fonts" / f"{name}.ttf"), size)


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


# --------------------------------------------------------------------------- geometry

def crop_resize(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Keep a random 30-85 % of the area (aspect 3/4..4/3), resize back to the original size."""
    w, h = img.size
    area = rng.uniform(0.30, 0.85) * w * h
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = int(round(min(w, max(1, math.sqrt(area * aspect)))))
    ch = int(round(min(h, max(1, math.sqrt(area / aspect)))))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return F.resized_crop(img, top, left, ch, cw, [h, w], antialias=True)


def scale(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Uniform rescale by 0.3-1.5x (DISC21 queries come at any resolution)."""
    factor = rng.uniform(0.3, 1.5)
    w, h = img.size
    return F.resize(img, [max(1, round(h * factor)), max(1, round(w * factor))], antialias=True)


def aspect(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Stretch one axis: width/height ratio changed by 0.5-2x."""
    ratio = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    w, h = img.size
    return F.resize(img, [h, max(1, round(w * ratio))], antialias=True)


def pad_border(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A solid border of 5-30 % per side, in a random colour."""
    w, h = img.size
    left, right = (int(round(w * f)) for f in rng.uniform(0.05, 0.30, size=2))
    top, bottom = (int(round(h * f)) for f in rng.uniform(0.05, 0.30, size=2))
    return F.pad(img, [left, top, right, bottom], fill=_colour(rng))


def rotate_small(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotate by 5-25 degrees either way, canvas expanded (black corners, as in DISC21)."""
    angle = rng.uniform(5, 25) * rng.choice([-1, 1])
    return F.rotate(img, float(angle), interpolation=F.InterpolationMode.BILINEAR, expand=True)


def rotate90(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotate by 90, 180 or 270 degrees."""
    op = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
    return img.transpose(op[int(rng.integers(0, 3))])


def hflip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Mirror left-right (no random parameter; the generator is accepted for uniformity)."""
    return F.horizontal_flip(img)


def perspective(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Move each corner inwards by up to 25 % of the side: a photo of a screen or print."""
    w, h = img.size
    start = [[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]
    d = rng.uniform(0.03, 0.25, size=(4, 2)) * np.array([w - 1, h - 1])
    signs = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    end = (np.array(start) + signs * d).round().astype(int).tolist()
    return F.perspective(img, start, end, interpolation=F.InterpolationMode.BILINEAR, fill=_colour(rng))


# --------------------------------------------------------------------------- pixels

def color_jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast, saturation 0.5-1.6x and a hue shift of up to 0.1 turn."""
    b, c, s = rng.uniform(0.5, 1.6, size=3)
    hue = rng.uniform(-0.1, 0.1)
    out = F.adjust_brightness(img, float(b))
    out = F.adjust_contrast(out, float(c))
    out = F.adjust_saturation(out, float(s))
    return F.adjust_hue(out, float(hue))


def grayscale(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Drop colour (kept as 3 identical channels)."""
    return F.rgb_to_grayscale(img, num_output_channels=3)


def blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur, radius 0.5-2.5 % of the shorter side."""
    return _rgb(_augly().blur(img, radius=float(rng.uniform(0.005, 0.025) * min(img.size))))


def sharpen(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Unsharp enhancement, factor 2-8."""
    return _rgb(_augly().sharpen(img, factor=float(rng.uniform(2.0, 8.0))))


def noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Additive Gaussian noise, sigma 4-25 grey levels, drawn from the item's own generator."""
    sigma = rng.uniform(4.0, 25.0)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, sigma, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def jpeg(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """JPEG re-encode at quality 8-40."""
    return _rgb(_augly().encoding_quality(img, quality=int(rng.integers(8, 41))))


def pixelate(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Down- and up-sample with nearest neighbour; blocks of 1/0.1..1/0.4 px."""
    return _rgb(_augly().pixelization(img, ratio=float(rng.uniform(0.1, 0.4))))


def opacity(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The picture made 30-70 % transparent over a flat colour."""
    background = Image.new("RGB", img.size, _colour(rng))
    return Image.blend(background, img, float(rng.uniform(0.3, 0.7)))


# --------------------------------------------------------------------------- overlays

def text_overlay(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """1-2 lines of random characters, 8-20 % of the shorter side high, random font/colour/place."""
    font = TEXT_FONTS[int(rng.integers(len(TEXT_FONTS)))]
    lines = [rng.integers(0, 1000, size=int(rng.integers(4, 12))).tolist()
             for _ in range(int(rng.integers(1, 3)))]
    # AugLy truncates the size to whole pixels; a zero-pixel font would raise on tiny images.
    font_size = min(1.0, max(float(rng.uniform(0.08, 0.20)), 1.0 / min(img.size)))
    out = _augly().overlay_text(
        img, text=lines, font_file=str(_augly_assets() / "fonts" / f"{font}.ttf"),
        font_size=font_size, opacity=float(rng.uniform(0.6, 1.0)), color=_colour(rng),
        x_pos=float(rng.uniform(0.0, 0.6)), y_pos=float(rng.uniform(0.0, 0.8)))
    return _rgb(out)


def emoji_overlay(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One of AugLy's ~900 Twemoji, 15-40 % of the image, anywhere."""
    emojis = _emoji_paths()
    size = float(rng.uniform(0.15, 0.40))
    out = _augly().overlay_emoji(
        img, emoji_path=emojis[int(rng.integers(len(emojis)))], opacity=float(rng.uniform(0.7, 1.0)),
        emoji_size=size, x_pos=float(rng.uniform(0.0, 1.0 - size)), y_pos=float(rng.uniform(0.0, 1.0 - size)))
    return _rgb(out)


def overlay_on_screenshot(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The picture shown inside a web page or phone screenshot (AugLy templates), then the
    screenshot brought back to about the picture's own size, as a re-shared capture would be."""
    template = ("web.png", "mobile.png")[int(rng.integers(2))]
    templates = _augly_assets() / "screenshot_templates"
    out = _rgb(_augly().overlay_onto_screenshot(
        img, template_filepath=str(templates / template),
        template_bboxes_filepath=str(templates / "bboxes.json"),
        crop_src_to_fit=bool(rng.integers(2))))
    limit = max(img.size) * rng.uniform(1.0, 1.5)
    factor = min(1.0, limit / max(out.size))
    return out.resize((max(1, round(out.width * factor)), max(1, round(out.height * factor))),
                      Image.Resampling.BILINEAR)


def meme_caption(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A white (or light) band above the picture, 15-35 % of its height, with a caption
    in a bold font: the classic meme format."""
    w, h = img.size
    band = max(1, int(round(h * rng.uniform(0.15, 0.35))))
    background = tuple(int(v) for v in rng.integers(215, 256, size=3))
    canvas = Image.new("RGB", (w, h + band), background)
    canvas.paste(img, (0, band))
    words = [CAPTION_WORDS[int(i)] for i in rng.integers(0, len(CAPTION_WORDS), size=int(rng.integers(2, 6)))]
    text = " ".join(words).upper() if rng.random() < 0.5 else " ".join(words)
    size = max(1, int(band * 0.6))
    font = _font(CAPTION_FONT, size)
    # Shrink until the caption fits the width (a few steps; long captions get small).
    while size > 1 and font.getlength(text) > 0.95 * w:
        size = max(1, int(size * 0.8))
        font = _font(CAPTION_FONT, size)
    draw = ImageDraw.Draw(canvas)
    x = (w - font.getlength(text)) / 2
    draw.text((x, band / 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas


# --------------------------------------------------------------------------- compositions

def _compose(count: int) -> Transform:
    def composed(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        names = rng.choice(BASE_NAMES, size=count, replace=False)
        for name in names:
            img = REGISTRY[str(name)].fn(img, rng)
        return img

    composed.__doc__ = f"{count} different base transformations chained, chosen by the seed."
    return composed


# --------------------------------------------------------------------------- registry

_TRAIN: list[Transform] = [crop_resize, scale, aspect, pad_border, rotate_small, rotate90, hflip,
                           color_jitter, grayscale, blur, sharpen, noise, jpeg, pixelate, opacity,
                           text_overlay, emoji_overlay]
_HELD_OUT_BASE: list[Transform] = [perspective, meme_caption, overlay_on_screenshot]


def _entry(fn: Transform, held_out: bool, name: str | None = None) -> Transformation:
    doc = (fn.__doc__ or "").strip().split("\n")[0]
    return Transformation(name or fn.__name__, fn, held_out, doc)


REGISTRY: dict[str, Transformation] = {
    **{fn.__name__: _entry(fn, False) for fn in _TRAIN},
    **{fn.__name__: _entry(fn, True) for fn in _HELD_OUT_BASE},
    "compose2": _entry(_compose(2), True, "compose2"),
    "compose3": _entry(_compose(3), True, "compose3"),
}
# Compositions chain any single edit, held-out ones included (they are themselves held out).
BASE_NAMES: tuple[str, ...] = tuple(n for n in REGISTRY if not n.startswith("compose"))
TRAIN_FAMILY: tuple[str, ...] = tuple(n for n, t in REGISTRY.items() if not t.held_out)
EVAL_FAMILY: tuple[str, ...] = tuple(REGISTRY)
FAMILIES: dict[str, tuple[str, ...]] = {"train": TRAIN_FAMILY, "eval": EVAL_FAMILY}


def is_held_out(name: str) -> bool:
    """True for an evaluation-only edit, never used to make training views."""
    return _get(name).held_out


def _get(name: str) -> Transformation:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown transformation {name!r}; known: {', '.join(REGISTRY)}") from None


def as_generator(rng_or_seed: np.random.Generator | int | tuple[int, ...]) -> np.random.Generator:
    """A Generator as is; an int or a tuple of ints (e.g. (seed, epoch, index)) seeds a new one."""
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def apply(name: str, img: Image.Image, rng_or_seed: np.random.Generator | int | tuple[int, ...]) -> Image.Image:
    """Apply the named transformation; the same seed gives the same RGB image."""
    return _get(name).fn(_rgb(img), as_generator(rng_or_seed))


def _family(family: str) -> tuple[str, ...]:
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[family]


def apply_random(family: str, img: Image.Image,
                 rng_or_seed: np.random.Generator | int | tuple[int, ...]) -> tuple[str, Image.Image]:
    """Pick one transformation of `family` ('train' or 'eval') with the generator, apply it."""
    names, rng = _family(family), as_generator(rng_or_seed)
    name = names[int(rng.integers(len(names)))]
    return name, apply(name, img, rng)


def apply_chain(family: str, img: Image.Image, rng_or_seed: np.random.Generator | int | tuple[int, ...],
                count: int) -> Image.Image:
    """`count` different transformations of `family`, drawn with the generator, applied in
    turn (count 1 is :func:`apply_random`'s edit)."""
    names, rng = _family(family), as_generator(rng_or_seed)
    if not 1 <= count <= len(names):
        raise ValueError(f"count must be 1..{len(names)}, got {count}")
    chosen = [names[int(i)] for i in rng.choice(len(names), size=count, replace=False)] if count > 1 \
        else [names[int(rng.integers(len(names)))]]
    for name in chosen:
        img = apply(name, img, rng)
    return img
