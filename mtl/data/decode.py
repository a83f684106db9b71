"""Decode, tile and store the corpus's source files: in parallel, and resumable.

Every source file (a whole image, or a large picture cut into tiles) is decoded once
(`mtl.data.imageio.load_image`), shrunk to ``max_side`` and written as
``<corpus_dir>/images/<class>/<id>.jpg``.  Decoding is the build's cost (tens of
minutes for the full package set on two cores), so it is recorded: after each source,
one line of ``<corpus_dir>/decoded.jsonl`` holds what it gave (images with their hashes,
or the reasons it gave none).  A build that is killed and started again reads the
record and decodes only the sources not in it.  A line counts only for the same file
(size and time) and the same decode settings of its kind (`DECODE_KEYS`: a new tile size
decodes the tiled pictures again, not the clip art); a line cut short by a kill is ignored.

Vector drawings (SVG icon themes) are rendered with librsvg's ``rsvg-convert`` (Debian
``librsvg2-bin``) at VECTOR_SIDE pixels, then treated like any whole image.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Iterable

import imagehash
import numpy as np
from PIL import Image

from mtl.data.imageio import VECTOR_SUFFIXES, LoadResult, composite_on, fit_within, load_image
from mtl.data.manifest import CorpusImage, rank_key
from mtl.io import atomic_path
from mtl.runtime import progress

RECORD = "decoded.jsonl"
RECORD_FORMAT = 2
# The settings that decide what decoding a source gives, per kind of source.
DECODE_KEYS = {
    "whole": ("max_side", "min_side", "min_content_share", "max_source_pixels", "jpeg_quality"),
    "tiled": ("max_side", "tile_size", "max_tiles_per_picture", "min_tile_std", "min_tile_edges",
              "min_content_share", "max_source_pixels", "jpeg_quality", "seed"),
}
VECTOR_SIDE = 256  # rendering size of a vector drawing's longer side (px)
# Edge pixel: neighbouring grey levels differ by at least this much (of 255).
EDGE_STEP = 8.0
# Content pixel: some channel differs from the background colour by more than this
# (of 255): above JPEG ringing and anti-aliasing halos, below any drawn stroke.
CONTENT_STEP = 24
# Rejected near-blank images are kept as small thumbnails, for the contact sheet that
# shows the threshold is right.
REJECTED_DIR = Path("rejected") / "near_blank"
REJECTED_THUMB = 128


@dataclass(frozen=True)
class SourceImage:
    path: Path
    class_name: str
    source: str      # 'debian:<package>' or 'folder'
    group: str       # images of one group always share a split
    image_id: str    # the corpus id (tiles append their row and column)
    tiled: bool


# ---------------------------------------------------------------------------
# Content tests


def tile_content(tile: Image.Image) -> tuple[float, float]:
    """(grey-level std, share of edge pixels) of a tile; see CorpusConfig."""
    grey = np.asarray(tile.convert("L"), dtype=np.float32)
    step_x = np.abs(np.diff(grey, axis=1))[:-1, :]
    step_y = np.abs(np.diff(grey, axis=0))[:, :-1]
    edges = np.hypot(step_x, step_y) >= EDGE_STEP
    return float(grey.std()), float(edges.mean())


def content_share(image: Image.Image) -> float:
    """Share of the canvas whose colour differs from the background.

    The background is the median colour of the outermost pixel ring (clip art is
    composited onto white; a flag or a photo has its own border colour).  A pixel is
    content when one of its channels differs from it by more than CONTENT_STEP."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    return float((np.abs(pixels - background).max(axis=2) > CONTENT_STEP).mean())


def keep_rejected_thumbnail(image: Image.Image, image_id: str, cfg) -> None:
    thumb = image.copy()
    thumb.thumbnail((REJECTED_THUMB, REJECTED_THUMB))
    target = Path(cfg.corpus_dir) / REJECTED_DIR / f"{image_id}.jpg"
    target.parent.mkdir(parents=True, exist_ok=True)
    thumb.save(target, quality=85)


def tile_positions(width: int, height: int, tile: int, seed: int, picture_id: str) -> list[tuple[int, int, int, int]]:
    """(row, col, x, y) of the non-overlapping tiles, centred, in seeded order."""
    rows, cols = height // tile, width // tile
    x0, y0 = (width - cols * tile) // 2, (height - rows * tile) // 2
    grid = [(r, c, x0 + c * tile, y0 + r * tile) for r in range(rows) for c in range(cols)]
    return sorted(grid, key=lambda g: rank_key(seed, f"{picture_id}:{g[0]}:{g[1]}"))


# ---------------------------------------------------------------------------
# One source (runs in worker processes)


def _store(image: Image.Image, item: SourceImage, image_id: str, cfg) -> CorpusImage:
    relative = Path("images") / item.class_name / f"{image_id}.jpg"
    with atomic_path(Path(cfg.corpus_dir) / relative) as tmp:  # a kill never leaves a truncated file
        image.save(tmp, quality=cfg.jpeg_quality, subsampling=0)  # 4:4:4 keeps clip-art edges clean
    digest = hashlib.sha1(f"{image.size}".encode() + image.tobytes()).hexdigest()[:16]
    return CorpusImage(image_id, item.class_name, item.source, item.group, relative.as_posix(), digest,
                       int(str(imagehash.phash(image)), 16), image.width, image.height)


def process_source(item: SourceImage, cfg) -> tuple[list[CorpusImage], Counter]:
    """Decode one source file; store its image (or its tiles); count what was skipped."""
    skipped: Counter = Counter()
    min_side = cfg.tile_size if item.tiled else cfg.min_side
    if item.path.suffix.lower() in VECTOR_SUFFIXES:
        loaded = render_vector(item.path, VECTOR_SIDE, min_side)
    else:
        loaded = load_image(item.path, max_pixels=cfg.max_source_pixels, min_side=min_side)
    if not loaded.ok:
        skipped[loaded.reason] += 1
        return [], skipped
    if not item.tiled:
        image = fit_within(loaded.image, cfg.max_side)
        if content_share(image) < cfg.min_content_share:
            skipped["near_blank"] += 1
            keep_rejected_thumbnail(image, item.image_id, cfg)
            return [], skipped
        return [_store(image, item, item.image_id, cfg)], skipped
    stored = []
    picture = loaded.image
    for row, col, x, y in tile_positions(*picture.size, cfg.tile_size, cfg.seed, item.image_id):
        if len(stored) == cfg.max_tiles_per_picture:
            skipped["over_tile_cap"] += 1
            continue
        tile = fit_within(picture.crop((x, y, x + cfg.tile_size, y + cfg.tile_size)), cfg.max_side)
        std, edges = tile_content(tile)
        if std < cfg.min_tile_std or edges < cfg.min_tile_edges:
            skipped["uniform_tile"] += 1
            continue
        if content_share(tile) < cfg.min_content_share:
            skipped["near_blank"] += 1
            keep_rejected_thumbnail(tile, f"{item.image_id}-r{row}c{col}", cfg)
            continue
        stored.append(_store(tile, item, f"{item.image_id}-r{row}c{col}", cfg))
    return stored, skipped


def render_vector(path: Path, side: int, min_side: int) -> LoadResult:
    """An SVG drawing rendered (longer side `side` px) as RGB on white, or a reason."""
    if shutil.which("rsvg-convert") is None:
        raise RuntimeError("rendering SVG sources needs rsvg-convert: `sudo apt-get install librsvg2-bin` "
                           "(or `make setup`)")
    try:
        done = subprocess.run(["rsvg-convert", "--width", str(side), "--height", str(side), "--keep-aspect-ratio",
                               str(path)], capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        return LoadResult(None, "truncated")
    if done.returncode != 0 or not done.stdout:
        return LoadResult(None, "not_an_image")
    with Image.open(io.BytesIO(done.stdout)) as im:
        if min(im.size) < min_side:
            return LoadResult(None, "too_small")
        return LoadResult(composite_on(im.convert("RGBA")))


def _keyed(item: SourceImage, cfg) -> tuple[str, tuple[list[CorpusImage], Counter]]:
    return source_key(item, cfg), process_source(item, cfg)


# ---------------------------------------------------------------------------
# The record of decoded sources


def decode_settings(cfg, tiled: bool) -> str:
    """A short digest of the settings that decide what decoding one kind of source gives."""
    values = {key: getattr(cfg, key) for key in DECODE_KEYS["tiled" if tiled else "whole"]}
    return hashlib.sha1(json.dumps({**values, "vector_side": VECTOR_SIDE}, sort_keys=True).encode()).hexdigest()[:12]


def source_key(item: SourceImage, cfg) -> str:
    """What a record line is valid for: the source's id, class, group, file with its size
    and time (a re-unpacked or changed package gives new keys), and the decode settings."""
    try:
        stat = os.stat(item.path)
        version = f"{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        version = "missing"
    return (f"{item.image_id}|{item.class_name}|{item.source}|{item.group}|{int(item.tiled)}|{item.path}|{version}|"
            f"{decode_settings(cfg, item.tiled)}")


def open_record(cfg) -> dict[str, tuple[list[CorpusImage], Counter]]:
    """The sources already decoded (source_key -> result).  With no record, or one of
    another format, the stored images are cleared and a new record is started."""
    corpus_dir = Path(cfg.corpus_dir)
    path = corpus_dir / RECORD
    done: dict[str, tuple[list[CorpusImage], Counter]] = {}
    lines = path.read_text().splitlines() if path.is_file() else []
    header = _parse(lines[0]) if lines else None
    if header is None or header.get("format") != RECORD_FORMAT:
        shutil.rmtree(corpus_dir / "images", ignore_errors=True)
        shutil.rmtree(corpus_dir / REJECTED_DIR, ignore_errors=True)
        corpus_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"format": RECORD_FORMAT}) + "\n")
        os.replace(tmp, path)
        return done
    for line in lines[1:]:
        entry = _parse(line)
        if entry is None:  # the line a kill cut short
            continue
        done[entry["key"]] = ([CorpusImage(**image) for image in entry["images"]], Counter(entry["skipped"]))
    return done


def _parse(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def append_record(handle, key: str, images: list[CorpusImage], skipped: Counter) -> None:
    handle.write(json.dumps({"key": key, "images": [asdict(im) for im in images], "skipped": dict(skipped)}) + "\n")
    handle.flush()


# ---------------------------------------------------------------------------
# All sources


def decode_all(items: list[SourceImage], cfg) -> tuple[list[CorpusImage], Counter, dict[str, int]]:
    """process_source over every item not in the record, in `cfg.workers` processes.

    Returns the images and skip reasons of all items (recorded and new) and how many
    sources were decoded now and taken from the record.  A recorded image's file may be
    gone (an earlier build dropped it as a duplicate); `restore_files` brings back those
    that are kept this time."""
    done = open_record(cfg)
    keys = {item.image_id: source_key(item, cfg) for item in items}
    todo = [item for item in items if keys[item.image_id] not in done]
    # big pictures first (better load balance); then a fixed order
    todo.sort(key=lambda it: (not it.tiled, it.image_id))
    results: dict[str, tuple[list[CorpusImage], Counter]] = {k: done[k] for k in keys.values() if k in done}
    job = partial(_keyed, cfg=cfg)
    lines = 20 if len(todo) > 2000 else 4
    with open(Path(cfg.corpus_dir) / RECORD, "a") as handle:
        if cfg.workers == 1 or len(todo) < 2:
            stream: Iterable = map(job, todo)
            for key, (stored, reasons) in progress(stream, len(todo), "decode", unit="files", lines=lines):
                append_record(handle, key, stored, reasons)
                results[key] = (stored, reasons)
        else:
            # fork (as torch's DataLoader does on Linux): no re-import of __main__, so a
            # plain script without an `if __name__ == "__main__"` guard works too.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            chunk = max(1, min(16, math.ceil(len(todo) / (cfg.workers * 50))))
            with mp.get_context(method).Pool(min(cfg.workers, len(todo))) as pool:
                stream = pool.imap_unordered(job, todo, chunksize=chunk)
                for key, (stored, reasons) in progress(stream, len(todo), "decode", unit="files", lines=lines):
                    append_record(handle, key, stored, reasons)
                    results[key] = (stored, reasons)
    images: list[CorpusImage] = []
    skipped: Counter = Counter()
    for item in items:
        stored, reasons = results[keys[item.image_id]]
        images += stored
        skipped += reasons
    return images, skipped, {"decoded_now": len(todo), "from_record": len(items) - len(todo)}


def restore_files(kept: list[CorpusImage], items: list[SourceImage], cfg) -> int:
    """Decode again the sources of kept images whose file is missing; returns how many."""
    corpus_dir = Path(cfg.corpus_dir)
    by_id = {item.image_id: item for item in items}
    missing = {}
    for image in kept:
        if not (corpus_dir / image.path).is_file():
            source_id = image.image_id if image.image_id in by_id else re.sub(r"-r\d+c\d+$", "", image.image_id)
            missing[source_id] = by_id[source_id]
    for item in missing.values():
        process_source(item, cfg)
    return len(missing)


def remove_unkept(kept: list[CorpusImage], cfg) -> int:
    """Delete every stored image that is not kept (duplicates, over a cap, other sources)."""
    corpus_dir = Path(cfg.corpus_dir)
    wanted = {image.path for image in kept}
    removed = 0
    for path in (corpus_dir / "images").rglob("*.jpg"):
        if path.relative_to(corpus_dir).as_posix() not in wanted:
            path.unlink()
            removed += 1
    return removed
