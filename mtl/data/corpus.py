"""Build the image corpus: real pictures anyone can rebuild offline, with ground
truth that cannot be wrong.

Sources (`data.source` in params.yaml):

* ``debian`` -- pictures shipped by Debian packages (`mtl.data.debian`): the rows of
  the package table (`mtl.data.packages`) in the set ``data.packages`` names.  Two
  content classes, as in the paper's content-type branch:

  - **scene**: full-frame pictures (wallpapers, painted backgrounds, maps, textures).
    A picture shipped in several resolutions or colourings counts once (the largest
    file); it is cut into non-overlapping square tiles of ``tile_size`` source pixels,
    of which at most ``max_tiles_per_picture`` (seeded choice) that pass the content
    test are kept.  group = the picture, so all its tiles land in one split.
  - **clipart**: drawn objects (openclipart, icon themes, game sprites), used whole,
    one file per group (numbered variants of a drawing, the sizes of an icon, the
    frames of a sprite); transparency goes onto white.

* ``folder`` -- a user's folder with one sub-folder per class (the ImageFolder
  convention, two or more classes); group = the file stem.

Every kept image is decoded once (`mtl.data.decode`, in ``workers`` processes, resumable
after a kill), shrunk to ``max_side`` and written as ``<corpus_dir>/images/<class>/<id>.jpg``.
Then exact and near duplicates are dropped across the whole corpus and splits are
assigned per group (`mtl.data.splits`).  Outputs: ``manifest.csv`` (`mtl.data.manifest`),
``report.json`` (counts, rejections, MB per phase; the times and decode counts of the last
build go beside the folder, ``<corpus_dir>.build.json``), ``contact_<class>.png`` and
one contact sheet per package (``contact_packages/``) (`mtl.data.corpus_report`).  The build refuses (and touches nothing)
when ``corpus_dir`` overlaps the folder it reads, or holds files no build made (a build
marks the folder as its own).

Run it as ``mtl corpus --params params.yaml [--profile profiles/full.yaml] [--set max_side=256]``
(`--set` takes keys of the data section, with or without the ``data.`` prefix).
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mtl.data.corpus_report import (disk_report, make_report, per_package, summary, write_contact_sheets,
                                    write_package_sheets, write_rejected_sheet, write_report)
from mtl.data.debian import debian_sources
from mtl.data.decode import SourceImage, decode_all, remove_unkept, restore_files
from mtl.data.manifest import MANIFEST_COLUMNS, SPLITS, rank_key, slug, unique_ids, write_manifest
from mtl.data.packages import PACKAGE_SETS, is_photo_source
from mtl.data.splits import assign_splits, cap_per_class, drop_duplicates
from mtl.io import UserError, claim_folder, overlaps, refuse_foreign_folder
from mtl.params import load_params, section_config

# Decode files for this many times `max_per_class` images at most: enough that
# rejections and duplicates still leave a full class (about a quarter of the
# clip art is too small or a duplicate), and no more: decoding is the cost.
DECODE_OVERSAMPLE = 1.5


@dataclass
class CorpusConfig:
    """The `data` section of params.yaml (paths relative to the working directory)."""

    source: str                   # 'debian' (the package table) or 'folder' (a user's ImageFolder tree)
    packages: str                 # the package set (mtl.data.packages): default | full
    folder: str | None            # source=folder: one sub-folder per class
    raw_dir: str                  # .deb cache
    corpus_dir: str
    max_side: int                 # longest side of a stored image (px)
    min_side: int                 # shorter side of a whole (non-tiled) image below this: too small (source px)
    tile_size: int                # wallpaper tiles are this many source pixels square
    max_tiles_per_picture: int
    # Content test for wallpaper tiles, measured on the stored (max_side) tile in
    # grey levels 0-255.  A tile is kept only if its grey std is >= min_tile_std
    # AND at least min_tile_edges of its pixels are edge pixels (a step of
    # EDGE_STEP grey levels to the right/lower neighbour).  Wallpapers are full of
    # smooth gradients and empty sky: on the Debian wallpapers about half of all
    # tiles have std < 12 (a flat colour plus JPEG noise has std 2-5), and a
    # gradient or soft blur has almost no edge pixels even when its std is high.
    # Such tiles carry no picture to recognize and are near-duplicates of each
    # other.  With 12 / 0.02 about 37 % of all tiles pass; kept tiles show shapes,
    # textures or objects (see contact_scene.png).
    min_tile_std: float
    min_tile_edges: float
    # Near-blank test for every stored image (tiles and whole drawings): at least this
    # share of the stored canvas must differ from its background colour (see
    # content_share).  Clip art is often a tiny drawing on a large empty page; at the
    # model's input size such a canvas is a white square, and two of them are
    # indistinguishable, so the eval set would count their match as a false positive.
    # 0.02 rejects ~2 % of the clip art, all visibly near blank
    # (results/corpus/near_blank.png); 0.02-0.04 already holds clear drawings and flags.
    min_content_share: float
    max_per_class: int            # cap per class (seeded subset)
    near_dup_hamming: int         # pHash distance <= this counts as the same picture
    split_fractions: dict
    # The real photographs' own split (a stratum of their own, mtl.data.splits): null = the
    # same fractions; a profile whose test share is small keeps enough photographs to test on.
    photo_split_fractions: dict | None
    max_source_pixels: int        # larger files are skipped as decompression bombs
    jpeg_quality: int
    contact_sheet_images: int
    workers: int                  # decode processes; 1 = in this process
    seed: int
    # Read by training, not by the build: train on a seeded subset of this many training
    # images (whole groups; val and test untouched, mtl.data.splits.train_subset); null = all.
    train_pictures: int | None

    @classmethod
    def from_params(cls, data: Mapping[str, Any]) -> "CorpusConfig":
        return section_config(cls, data, "data")

    def __post_init__(self) -> None:
        if self.source not in {"debian", "folder"}:
            raise ValueError(f"data.source must be 'debian' or 'folder', not {self.source!r}")
        if self.source == "folder" and not self.folder:
            raise ValueError("data.source=folder needs data.folder: a folder with one sub-folder per class")
        for key in ("split_fractions", "photo_split_fractions"):
            if getattr(self, key) is None and key == "photo_split_fractions":
                continue
            fractions = dict(getattr(self, key))
            if set(fractions) != set(SPLITS) or any(v < 0 for v in fractions.values()):
                raise ValueError(f"data.{key} needs non-negative train, val and test; got {fractions}")
            if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
                raise ValueError(f"data.{key} must sum to 1; got {fractions}")
        if self.packages not in PACKAGE_SETS:
            raise ValueError(f"data.packages must be one of {PACKAGE_SETS}, not {self.packages!r}")
        for name in ("max_side", "tile_size", "max_tiles_per_picture", "max_per_class", "min_side", "workers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.train_pictures is not None and int(self.train_pictures) < 1:
            raise ValueError(f"data.train_pictures must be a positive number of images or null, got {self.train_pictures}")
        if not 0 <= self.near_dup_hamming <= 64:
            raise ValueError(f"data.near_dup_hamming is a distance between 64-bit hashes, got {self.near_dup_hamming}")




# ---------------------------------------------------------------------------
# What to decode (Debian packages: mtl.data.debian)


def folder_sources(folder: Path, skipped: Counter) -> list[SourceImage]:
    """One SourceImage per file of an ImageFolder tree (every file is tried: load_image judges)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"data.folder {str(folder)!r} is not a folder")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(
            f"data.folder {str(folder)!r} has {len(classes)} class folder(s) {classes}: the ImageFolder "
            "convention needs one sub-folder per class and at least two classes (e.g. photos/ and drawings/)")
    skipped["outside_class_folder"] += sum(1 for p in folder.iterdir() if p.is_file())
    items = []
    for class_name in classes:
        files = sorted(p for p in (folder / class_name).rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        ids = unique_ids(slug(str(p.relative_to(folder).with_suffix(""))) for p in files)
        items += [SourceImage(p, class_name, "folder", p.stem.lower(), i, tiled=False) for p, i in zip(files, ids)]
    return items


def subsample_before_decoding(items: list[SourceImage], cfg: CorpusConfig, skipped: Counter) -> list[SourceImage]:
    """Per class, the first files in seeded order, enough to fill `max_per_class`.

    Chosen before decoding, because decoding is the build's cost: whole images
    take DECODE_OVERSAMPLE x max_per_class files (room for rejections and
    duplicates); tiled pictures take as many as DECODE_OVERSAMPLE x max_per_class
    tiles need at max_tiles_per_picture each.  With the default parameters every
    wallpaper is used; small profiles decode only a few.
    """
    by_class: dict[str, list[SourceImage]] = defaultdict(list)
    for item in items:
        by_class[item.class_name].append(item)
    chosen = []
    for class_items in by_class.values():
        ordered = sorted(class_items, key=lambda it: rank_key(cfg.seed, it.image_id))
        budget, taken = DECODE_OVERSAMPLE * cfg.max_per_class, 0
        for item in ordered:
            if budget <= 0:
                break
            budget -= cfg.max_tiles_per_picture if item.tiled else 1
            taken += 1
        skipped["not_decoded_over_cap"] += len(ordered) - taken
        chosen += ordered[:taken]
    return chosen


def made_before_the_marker(corpus_dir: Path) -> bool:
    """A corpus built before folders were marked: its manifest has our header."""
    manifest = corpus_dir / "manifest.csv"
    try:
        with manifest.open(newline="") as handle:
            return next(csv.reader(handle), None) in (list(MANIFEST_COLUMNS), list(MANIFEST_COLUMNS[:-1]))
    except (OSError, UnicodeDecodeError):
        return False


def check_corpus_dir(cfg: CorpusConfig) -> None:
    """Refuse a `cfg.corpus_dir` the build may not rebuild: one that overlaps the
    folder it reads (whose pictures clear_outputs could delete), or that holds
    files no build made."""
    source = ("data.folder", cfg.folder) if cfg.source == "folder" else ("data.raw_dir", cfg.raw_dir)
    if overlaps(source[1], cfg.corpus_dir):
        raise UserError(f"data.corpus_dir {cfg.corpus_dir!r} and {source[0]} {source[1]!r} overlap (one is or "
                        "holds the other): the build would delete or read its own input; give two separate folders")
    refuse_foreign_folder(cfg.corpus_dir, "data.corpus_dir", made_before_the_marker)


def clear_outputs(corpus_dir: Path) -> None:
    """Remove what a previous build wrote besides the decoded images and their record
    (kept for a resumed build; `remove_unkept` tidies the images at the end)."""
    shutil.rmtree(corpus_dir / "contact_packages", ignore_errors=True)
    for name in ["manifest.csv", "report.json", *[p.name for p in corpus_dir.glob("contact_*.png")]]:
        (corpus_dir / name).unlink(missing_ok=True)



# ---------------------------------------------------------------------------
# The build


def build_corpus(cfg: CorpusConfig | Mapping[str, Any]) -> dict:
    """Build `cfg.corpus_dir`; return the report (also written to report.json).

    Sources decoded by an earlier (perhaps killed) build with the same decode settings
    are taken from its record instead of being decoded again (`mtl.data.decode`)."""
    if not isinstance(cfg, CorpusConfig):
        cfg = CorpusConfig.from_params(cfg)
    started = time.perf_counter()
    check_corpus_dir(cfg)  # before a download: a wrong folder is told at once
    skipped: Counter = Counter()
    timings: dict[str, float] = {}
    packages: dict[str, dict] = {}
    if cfg.source == "debian":
        items, packages = debian_sources(cfg.packages, Path(cfg.raw_dir), cfg.seed, skipped, timings)
    else:
        items = folder_sources(Path(cfg.folder), skipped)
    items = subsample_before_decoding(items, cfg, skipped)
    # Only now: a bad source leaves the previous corpus as it was.
    corpus_dir = claim_folder(cfg.corpus_dir, "data.corpus_dir", made_before_the_marker)
    clear_outputs(corpus_dir)

    start = time.perf_counter()
    decoded, reasons, decode_counts = decode_all(items, cfg)
    for image in decoded:  # from the table as it is now, never from a decode record
        image.photo = is_photo_source(image.source)
    skipped += reasons
    timings["decode_s"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    dedup = drop_duplicates(decoded, cfg.near_dup_hamming, cfg.seed)
    kept, over_cap = cap_per_class(dedup.kept, cfg.max_per_class, cfg.seed)
    skipped["over_class_cap"] += over_cap
    decode_counts["restored"] = restore_files(kept, items, cfg)
    remove_unkept(kept, cfg)
    split_of = assign_splits(kept, cfg.split_fractions, cfg.seed, cfg.photo_split_fractions)
    for image in kept:
        image.split = split_of[image.group]
    timings["dedup_split_s"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    write_manifest(kept, corpus_dir / "manifest.csv")
    sheets = write_contact_sheets(kept, cfg)
    package_sheets = write_package_sheets(kept, cfg) if cfg.source == "debian" else {}
    rejected_sheet = write_rejected_sheet(cfg)
    timings["outputs_s"] = round(time.perf_counter() - start, 2)
    timings["build_s"] = round(time.perf_counter() - started, 2)
    report = make_report(cfg, kept, dedup, skipped, timings, packages, sheets)
    report.update(near_blank_sheet=rejected_sheet, package_sheets=package_sheets, decode=decode_counts,
                  disk=disk_report(cfg, kept, packages), per_package=per_package(kept, items))
    write_report(report, corpus_dir)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtl corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="parameter file (its `data` section)")
    parser.add_argument("--profile", default=None, help="a profile YAML overlaid on the parameters")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a data key, e.g. --set max_side=256 or --set data.max_side=256 (repeatable)")
    args = parser.parse_args(argv)
    params = load_params(args.params, [key if key.startswith("data.") else f"data.{key}" for key in args.set],
                         args.profile)
    report = build_corpus(CorpusConfig.from_params(params["data"]))
    print(summary(report))
    print(f"wrote {Path(report['config']['corpus_dir']) / 'manifest.csv'} and report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
