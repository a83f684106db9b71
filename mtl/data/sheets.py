"""Sheets of thumbnails, for checking the data by eye: the corpus's contact sheets, the
package overview (mtl.scale_report) and the gallery of every copy transformation
(mtl.data.gallery) are all one grid, :func:`thumbnail_grid`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

Label = tuple[tuple[int, int], str, Any]  # (x, y), text, fill colour


def thumbnail_grid(rows: Sequence[Sequence[Image.Image | Path]], box: int, step: tuple[int, int],
                   offset: tuple[int, int], size: tuple[int, int], background: Any = (255, 255, 255),
                   resample: Image.Resampling = Image.Resampling.BICUBIC, labels: Sequence[Label] = (),
                   font: ImageFont.ImageFont | ImageFont.FreeTypeFont | None = None) -> Image.Image:
    """A `size` sheet: image c of row r (a picture, or the file of one) shrunk to fit a
    `box`-pixel square, aspect kept, and centred in the square at offset + (c, r) * step;
    the labels are written first, in `font` (Pillow's default when None)."""
    sheet = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(sheet)
    for xy, text, fill in labels:
        draw.text(xy, text, fill=fill, font=font)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            thumb = _thumbnail(image, box, resample)
            sheet.paste(thumb, (offset[0] + c * step[0] + (box - thumb.width) // 2,
                                offset[1] + r * step[1] + (box - thumb.height) // 2))
    return sheet


def _thumbnail(image: Image.Image | Path, box: int, resample: Image.Resampling) -> Image.Image:
    if isinstance(image, Image.Image):
        thumb = image.convert("RGB")  # a copy
    else:
        with Image.open(image) as opened:
            thumb = opened.convert("RGB")
    thumb.thumbnail((box, box), resample)
    return thumb


def in_rows(items: Sequence, columns: int) -> list[Sequence]:
    return [items[i:i + columns] for i in range(0, len(items), columns)]


def contact_sheet(paths: Sequence[Path], columns: int = 8, thumb: int = 96, pad: int = 4) -> Image.Image:
    """Image files as thumbnails in square cells on light grey (one empty row when none)."""
    cell = thumb + pad
    rows = max(1, math.ceil(len(paths) / columns))
    return thumbnail_grid(in_rows(paths, columns), thumb, (cell, cell), (pad, pad),
                          (columns * cell + pad, rows * cell + pad), (235, 235, 235), Image.Resampling.LANCZOS)


def side_by_side(sheets: Sequence[Image.Image], gap: int = 16) -> Image.Image:
    """Sheets next to each other on white, top-aligned, `gap` pixels apart."""
    combined = Image.new("RGB", (sum(s.width for s in sheets) + gap * (len(sheets) - 1),
                                 max(s.height for s in sheets)), "white")
    x = 0
    for sheet in sheets:
        combined.paste(sheet, (x, 0))
        x += sheet.width + gap
    return combined
