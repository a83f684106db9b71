"""The gallery of every copy transformation applied to one image: the evaluation set's
gallery.png and `mtl gallery`."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from PIL import Image, ImageFont

from mtl.data.sheets import in_rows, thumbnail_grid
from mtl.data.transforms import REGISTRY, as_generator
from mtl.io import atomic_path


def render_gallery(img: Image.Image, path: str | Path, seed: int = 0, tile: int = 192,
                   columns: int = 6) -> Path:
    """A PNG grid: the original, then every transformation applied to it, each labelled
    (held-out ones marked '[held out]', in red)."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    items = [("original", img)] + [(name + (" [held out]" if t.held_out else ""), t.fn(img, as_generator(seed)))
                                   for name, t in REGISTRY.items()]
    label_h = 18
    labels = [(((i % columns) * tile + 4, (i // columns) * (tile + label_h) + 3), label,
               (200, 0, 0) if "held out" in label else (0, 0, 0)) for i, (label, _) in enumerate(items)]
    # 4 px inside the tile on every side; the label band above it.
    sheet = thumbnail_grid(in_rows([out for _, out in items], columns), tile - 8, (tile, tile + label_h),
                           (4, label_h + 4), (columns * tile, math.ceil(len(items) / columns) * (tile + label_h)),
                           labels=labels, font=ImageFont.load_default(size=12))
    with atomic_path(path) as tmp:
        sheet.save(tmp)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtl gallery", description="render every copy transformation on one image")
    parser.add_argument("--image", required=True, help="an image file")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-side", type=int, default=384, help="downscale the image to this longest side first")
    args = parser.parse_args(argv)
    with Image.open(args.image) as im:
        img = im.convert("RGB")  # loads the pixels before the file closes
    img.thumbnail((args.max_side, args.max_side))
    out = render_gallery(img, args.out, seed=args.seed)
    print(f"wrote {out} ({len(REGISTRY)} transformations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
