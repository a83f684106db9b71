"""Load any image file as an 8-bit RGB picture, or say in one word why not.

Real folders hold zero-byte files, half-downloaded JPEGs, text files named
`.png`, CMYK prints, 16-bit scans, transparent clip art and the occasional
decompression bomb.  `load_image` never raises on such files: it returns a
`LoadResult` whose `reason` is a short key that reports can count:

    missing        the path does not exist or is not a regular file
    empty          zero bytes
    not_an_image   Pillow cannot identify the format (text, SVG, ...)
    too_large      width x height above `max_pixels` (read from the header,
                   before any pixel is decoded), or Pillow's bomb guard fired
    too_small      the shorter side is below `min_side`
    extreme_aspect the longer side is more than `max_aspect` times the shorter
                   (from the header: see DEFAULT_MAX_ASPECT)
    truncated      the header is fine but the pixel data ends early or is corrupt
    unsupported    a pixel mode we do not know how to show as RGB

Everything that can be shown is converted, never skipped: EXIF orientation is
applied; CMYK, YCbCr, LAB, grey and palette become RGB; 16-bit grey is scaled
(not clipped) to 8 bits; transparency (RGBA, LA, palette with a transparent
index) is composited onto white, which is how such pictures look in a viewer
and on the web.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Far above any photograph or wallpaper we meet (the largest Debian wallpaper is
# 6028x3391 = 20 Mpx) and well below Pillow's own bomb limit (89 Mpx): one
# decoded RGBA picture of this size takes 200 MB.
DEFAULT_MAX_PIXELS = 50_000_000
# A picture whose shorter side is below this carries no content worth keeping.
DEFAULT_MIN_SIDE = 8
# Longer side / shorter side.  A model's input is the centre square after the
# shorter side is resized, so at 20:1 it keeps 5 % of the picture; and that
# resize takes memory in proportion to the ratio (an 8 x 150,000 PNG of 9 KB
# added 0.6 GB to the peak memory of `mtl embed`).  With max_pixels it also bounds the longer side: at most
# sqrt(max_pixels * max_aspect), 31,623 px with the defaults.
DEFAULT_MAX_ASPECT = 20.0
WHITE = (255, 255, 255)
# File names the package treats as pictures: raster formats Pillow reads, and vector
# drawings (rendered with librsvg where a corpus row asks for it, mtl.data.decode).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VECTOR_SUFFIXES = frozenset({".svg", ".svgz"})

_TRANSPARENT_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class LoadResult:
    """An RGB image, or None and the reason it was skipped."""

    image: Image.Image | None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.image is not None


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_side: int = DEFAULT_MIN_SIDE, max_aspect: float = DEFAULT_MAX_ASPECT,
               max_side: int | None = None, background: tuple[int, int, int] = WHITE) -> LoadResult:
    """Decode `path` into an upright 8-bit RGB image (transparency onto `background`).

    The size limits are checked on the header, before decoding, so a bomb costs
    nothing.  With `max_side`, the longer side of the result is at most that:
    JPEGs are then decoded at a reduced DCT scale (several times faster for
    camera photos).  Never raises for a bad file; see the module docstring.
    """
    path = Path(path)
    try:
        if not path.is_file():
            return LoadResult(None, "missing")
        if path.stat().st_size == 0:
            return LoadResult(None, "empty")
    except OSError:
        return LoadResult(None, "missing")
    with warnings.catch_warnings():
        # Pillow only *warns* between 1x and 2x its limit; treat that as too large too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                reason = _check_size(im.size, max_pixels, min_side, max_aspect)
                if reason:
                    return LoadResult(None, reason)
                if max_side is not None and im.format == "JPEG":
                    im.draft("RGB", (max_side, max_side))  # picks a scale that stays >= max_side
                im.load()
                result = _to_rgb(_upright(im), background)
                if max_side is not None and result.ok:
                    return LoadResult(fit_within(result.image, max_side))
                return result
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            return LoadResult(None, "too_large")
        except UnidentifiedImageError:
            return LoadResult(None, "not_an_image")
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error):
            # Pillow's decoders report short or corrupt pixel data with any of these.
            return LoadResult(None, "truncated")


def _check_size(size: tuple[int, int], max_pixels: int, min_side: int, max_aspect: float) -> str | None:
    width, height = size
    if width * height > max_pixels:
        return "too_large"
    if min(width, height) < min_side:
        return "too_small"
    if max(width, height) > max_aspect * min(width, height):
        return "extreme_aspect"
    return None


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a broken EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - malformed EXIF comes in many exception types
        return im


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> LoadResult:
    mode = im.mode
    if mode == "RGB":
        return LoadResult(im.copy())
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _TRANSPARENT_MODES:
        return LoadResult(composite_on(im.convert("RGBA"), background))
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        return LoadResult(Image.fromarray(_grey_to_8bit(np.asarray(im), mode)).convert("RGB"))
    if mode in {"1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}:
        return LoadResult(im.convert("RGB"))
    return LoadResult(None, "unsupported")


def composite_on(rgba: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Flatten an RGBA image onto a solid background (alpha-weighted)."""
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def _grey_to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit (or 32-bit int / float) grey to uint8 by scaling, not clipping.

    Pillow's own convert('L') clips at 255, which turns a 16-bit scan white.
    Mode 'I' is ambiguous (Pillow also stores 8-bit data there), so it is only
    scaled when a value exceeds the 8-bit range.
    """
    values = values.astype(np.float64)
    if mode == "F":
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
    elif mode.startswith("I;16") or values.max() > 255:
        scaled = np.clip(values, 0, 65535) / 257.0
    else:
        scaled = values
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def fit_within(image: Image.Image, max_side: int) -> Image.Image:
    """A copy whose longer side is at most `max_side` (never enlarged), aspect kept."""
    width, height = image.size
    scale = max_side / max(width, height)
    if scale >= 1:
        return image.copy()
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # reducing_gap: a cheap box pre-shrink before Lanczos, visually identical, several x faster.
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
