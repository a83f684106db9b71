"""Build the image corpus: real pictures anyone can rebuild offline, with ground
truth that cannot be wrong.

Sources (`data.source` in params.yaml):

* ``debian`` -- pictures shipped by Debian packages, fetched with
  ``apt-get download`` into ``data/raw/`` (a cache, reused) and unpacked with
  ``dpkg-deb -x`` (no root needed once the package lists exist).  Two content
  classes, as in the paper's content-type branch:

  - **scene**: desktop wallpapers (photographs and artwork).  A picture shipped
    in several resolutions, or in light and dark colourings, counts once (the
    largest file: a recoloured picture is a copy of it); it is cut into
    non-overlapping square tiles of ``tile_size`` source pixels, of which at most
    ``max_tiles_per_picture`` (seeded choice) that pass the content test are
    kept.  group = the picture, so all its tiles land in one split.
  - **clipart**: ``openclipart-png``.  Symbolic links (the same file filed in a
    second category) are skipped; transparency goes onto white.  group = the
    file name without its numbers (``foo_01``, ``foo_02`` -> ``foo``): one
    family of variants of a drawing, of which one (seeded) file is used.

* ``folder`` -- a user's folder with one sub-folder per class (the ImageFolder
  convention, two or more classes); group = the file stem.

Every kept image is decoded once (`mtl.data.imageio.load_image`), shrunk to
``max_side`` and written as ``<corpus_dir>/images/<class>/<id>.jpg``.  Then,
across the whole corpus, exact duplicates (same decoded pixels) and near
duplicates (64-bit pHash within ``near_dup_hamming`` bits) are dropped, so every
pair of corpus images is a true non-duplicate.  Splits are assigned per group.
Outputs: ``manifest.csv``, ``report.json`` and ``contact_<class>.png``.  The
build refuses (and touches nothing) when ``corpus_dir`` overlaps the folder it
reads, or holds files no build made (a build marks the folder as its own).

Run it as ``mtl corpus --params params.yaml [--set max_side=256]``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import multiprocessing as mp
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from mtl.data.imageio import DEFAULT_MAX_PIXELS, fit_within, load_image
from mtl.io import UserError, atomic_path, atomic_write_text, claim_folder, overlaps, refuse_foreign_folder

SCENE_PACKAGES = (
    "plasma-workspace-wallpapers",
    "mate-backgrounds",
    "lomiri-wallpapers-16.04",
    "lomiri-wallpapers-20.04",
    "ukui-wallpapers",
    "gnome-backgrounds",
)
CLIPART_PACKAGE = "openclipart-png"
CLIPART_ROOT = Path("usr/share/openclipart/png")
RASTER_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
VECTOR_SUFFIXES = {".svg", ".svgz"}
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("id", "path", "class", "source", "group", "split", "hash", "width", "height")
# Decode files for this many times `max_per_class` images at most: enough that
# rejections and duplicates still leave a full class (about a quarter of the
# clip art is too small or a duplicate), and no more: decoding is the cost.
DECODE_OVERSAMPLE = 1.5
# Edge pixel: neighbouring grey levels differ by at least this much (of 255).
EDGE_STEP = 8.0
# Content pixel: some channel differs from the background colour by more than this
# (of 255): above JPEG ringing and anti-aliasing halos, below any drawn stroke.
CONTENT_STEP = 24
# Rejected near-blank images are kept as small thumbnails, for the contact sheet that
# shows the threshold is right.
REJECTED_DIR = Path("rejected") / "near_blank"
REJECTED_THUMB = 128


@dataclass
class CorpusConfig:
    """The `data` section of params.yaml (paths relative to the working directory)."""

    source: str = "debian"
    folder: str | None = None
    raw_dir: str = "data/raw"
    corpus_dir: str = "data/corpus"
    max_side: int = 384
    tile_size: int = 640
    max_tiles_per_picture: int = 24
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
    min_tile_std: float = 12.0
    min_tile_edges: float = 0.02
    # Near-blank test for every stored image (tiles and whole drawings): at least this
    # share of the stored canvas must differ from its background colour (see
    # content_share).  Clip art is often a tiny drawing on a large empty page; at the
    # model's input size such a canvas is a white square, and two of them are
    # indistinguishable, so the eval set would count their match as a false positive.
    # 0.02 rejects ~2 % of the clip art, all visibly near blank
    # (results/corpus/near_blank.png); 0.02-0.04 already holds clear drawings and flags.
    min_content_share: float = 0.02
    max_per_class: int = 3000
    near_dup_hamming: int = 4
    split_fractions: dict = field(default_factory=lambda: {"train": 0.6, "val": 0.1, "test": 0.3})
    seed: int = 0
    # Not in params.yaml yet; these defaults apply when absent.
    min_side: int = 64            # shorter side of a whole (non-tiled) image, source px
    max_source_pixels: int = DEFAULT_MAX_PIXELS  # larger files are skipped as bombs
    workers: int = 2              # decode processes; 1 = in this process
    jpeg_quality: int = 92
    contact_sheet_images: int = 48

    @classmethod
    def from_params(cls, data: Mapping[str, Any]) -> "CorpusConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown key(s) in the data section: {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**dict(data))

    def __post_init__(self) -> None:
        if self.source not in {"debian", "folder"}:
            raise ValueError(f"data.source must be 'debian' or 'folder', not {self.source!r}")
        if self.source == "folder" and not self.folder:
            raise ValueError("data.source=folder needs data.folder: a folder with one sub-folder per class")
        fractions = dict(self.split_fractions)
        if set(fractions) != set(SPLITS) or any(v < 0 for v in fractions.values()):
            raise ValueError(f"data.split_fractions needs non-negative train, val and test; got {fractions}")
        if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
            raise ValueError(f"data.split_fractions must sum to 1; got {fractions}")
        for name in ("max_side", "tile_size", "max_tiles_per_picture", "max_per_class", "min_side", "workers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 <= self.near_dup_hamming <= 64:
            raise ValueError(f"data.near_dup_hamming is a distance between 64-bit hashes, got {self.near_dup_hamming}")


# ---------------------------------------------------------------------------
# What to decode: one SourceImage per file (whole image) or per picture (tiled)


@dataclass(frozen=True)
class SourceImage:
    path: Path
    class_name: str
    source: str      # 'debian:<package>' or 'folder'
    group: str       # images of one group always share a split
    image_id: str    # the corpus id (tiles append their row and column)
    tiled: bool


@dataclass
class CorpusImage:
    image_id: str
    class_name: str
    source: str
    group: str
    path: str        # relative to corpus_dir
    hash: str        # of the stored image's decoded pixels, before JPEG encoding
    phash: int       # 64-bit perceptual hash
    width: int
    height: int
    split: str = ""


def rank_key(seed: int, name: str) -> str:
    """A seeded, stable pseudo-random order: sorting by this shuffles reproducibly."""
    return hashlib.sha1(f"{seed}:{name}".encode()).hexdigest()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def unique_ids(ids: Iterable[str]) -> list[str]:
    """The ids made distinct where slugging made two of them equal: a repeat gets
    the first suffix -2, -3, ... that is neither among the given ids nor handed
    out already, so ``a, a, a-2`` becomes ``a, a-3, a-2`` (``x.png``, ``x.jpg`` and
    ``x-2.png`` are three pictures, each with its own row and file)."""
    ids = list(ids)
    taken = set(ids)
    seen: set[str] = set()
    out = []
    for image_id in ids:
        if image_id in seen:
            number = 2
            while f"{image_id}-{number}" in taken:
                number += 1
            image_id = f"{image_id}-{number}"
            taken.add(image_id)
        seen.add(image_id)
        out.append(image_id)
    return out


def clipart_family(stem: str) -> str:
    """The drawing a clip-art file is a variant of: its name without digits.

    Numbered variants (``jigsaw_red_05``, ``jigsaw_red_11``) are recolourings or
    re-cuts of one drawing, and openclipart also ships 1,375 generated
    ``star_<N>pt<M>step`` spirographs that differ only in their numbers and look
    alike far beyond any pHash radius.  One family = one group.
    """
    family = re.sub(r"\d+", "", stem).lower().strip("_- ")
    return family or stem.lower()


def scene_picture(relative: Path) -> tuple[str, str]:
    """(picture, group) of a wallpaper file.

    KDE ships ``<Name>/contents/images[_dark]/<W>x<H>.<ext>`` plus a
    ``screenshot``: all sizes are one picture, the dark variant a recoloured
    copy of it (same group).  Elsewhere a ``_<W>x<H>`` suffix marks another size
    (``Elephants_3840x2160.jpg``) and GNOME's ``-l`` / ``-d`` suffixes mark the
    light and dark colourings of one design (``adwaita-l`` vs ``adwaita-d``:
    6-10 pHash bits apart, tile for tile).
    """
    parts = relative.parts
    if "contents" in parts[:-1]:
        at = parts.index("contents")
        name = parts[at - 1] if at else relative.stem
        dark = any(part.startswith("images_dark") for part in parts[at + 1:-1])
        return name + ("-dark" if dark else ""), name.lower()
    picture = re.sub(r"[_-]\d{3,5}x\d{3,5}$", "", relative.stem)
    return picture, re.sub(r"-[ld]$", "", picture).lower()


def _header_pixels(path: Path) -> int:
    try:
        with Image.open(path) as im:
            return im.width * im.height
    except Exception:  # noqa: BLE001 - unreadable files are judged later by load_image
        return 0


def scene_sources(unpacked: Mapping[str, Path], skipped: Counter) -> list[SourceImage]:
    """The largest file of each wallpaper group (all sizes and colourings of a picture)."""
    largest: dict[tuple[str, str], tuple[int, Path, str]] = {}
    for package, root in unpacked.items():
        for path in sorted(root.rglob("*")):
            suffix = path.suffix.lower()
            if suffix not in RASTER_SUFFIXES | VECTOR_SUFFIXES:
                continue
            if path.is_symlink():
                skipped["symlink"] += 1
                continue
            if suffix in VECTOR_SUFFIXES:
                skipped["vector_image"] += 1
                continue
            picture, group = scene_picture(path.relative_to(root))
            key = (package, group)
            pixels = _header_pixels(path)
            if key in largest:
                skipped["other_version"] += 1
                if pixels <= largest[key][0]:
                    continue
            largest[key] = (pixels, path, picture)
    keys = sorted(largest)
    ids = unique_ids(slug(f"scene-{largest[k][2]}") for k in keys)
    return [SourceImage(largest[k][1], "scene", f"debian:{k[0]}", k[1], image_id, tiled=True)
            for k, image_id in zip(keys, ids)]


def clipart_sources(root: Path, seed: int, skipped: Counter) -> list[SourceImage]:
    """One regular PNG per drawing family of openclipart-png (seeded choice).

    Symbolic links are second copies of files filed elsewhere.  Keeping a single
    member per family (see clipart_family) is what makes every pair of clip-art
    images in the corpus two different drawings, not two colours of one.
    """
    files = []
    for path in sorted(root.rglob("*.png")):
        if path.is_symlink():
            skipped["symlink"] += 1
        elif path.is_file():
            files.append(path)
    ids = unique_ids(slug("clipart-" + str(p.relative_to(root).with_suffix(""))) for p in files)
    chosen: dict[str, SourceImage] = {}
    for path, image_id in sorted(zip(files, ids), key=lambda f: rank_key(seed, f[1])):
        family = clipart_family(path.stem)
        if family in chosen:
            skipped["family_variant"] += 1
            continue
        chosen[family] = SourceImage(path, "clipart", f"debian:{CLIPART_PACKAGE}", family, image_id, tiled=False)
    return sorted(chosen.values(), key=lambda item: item.image_id)


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
        per_file = cfg.max_tiles_per_picture if ordered[0].tiled else 1
        limit = math.ceil(DECODE_OVERSAMPLE * cfg.max_per_class / per_file)
        skipped["not_decoded_over_cap"] += max(0, len(ordered) - limit)
        chosen += ordered[:limit]
    return chosen


# ---------------------------------------------------------------------------
# Debian packages


def fetch_packages(packages: Sequence[str], raw_dir: Path) -> dict[str, Path]:
    """The .deb file of each package in `raw_dir`, downloading those not there yet."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not list(raw_dir.glob(f"{p}_*.deb"))]
    if missing:
        if shutil.which("apt-get") is None:
            raise RuntimeError("data.source=debian needs apt-get (Debian or Ubuntu); "
                               "use data.source=folder with your own images elsewhere")
        done = subprocess.run(["apt-get", "download", *missing], cwd=raw_dir, capture_output=True, text=True)
        if done.returncode != 0:
            if "Unable to locate package" in done.stderr:
                raise RuntimeError(
                    f"apt-get cannot find {', '.join(missing)}: the package lists are empty or old. "
                    "Run `sudo apt-get update` (or `make setup`) once, then build again.")
            raise RuntimeError(f"apt-get download {' '.join(missing)} failed:\n{done.stderr.strip()[-2000:]}")
    debs = {}
    for package in packages:
        found = sorted(raw_dir.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise RuntimeError(f"apt-get download {package} left no .deb in {raw_dir}")
        debs[package] = found[-1]
    return debs


def unpack_package(deb: Path, unpack_root: Path) -> Path:
    """`dpkg-deb -x` into unpack_root/<package>, once per .deb file (marker file)."""
    package = deb.name.split("_", 1)[0]
    target = unpack_root / package
    marker = target / ".unpacked-from"
    if marker.is_file() and marker.read_text() == deb.name:
        return target
    unpack_root.mkdir(parents=True, exist_ok=True)
    # Unpack beside the target, then rename: a build that stops half-way (or a
    # second build at the same time) never sees a half-unpacked package.
    staging = Path(tempfile.mkdtemp(prefix=f".{package}-", dir=unpack_root))
    try:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True, capture_output=True, text=True)
        (staging / ".unpacked-from").write_text(deb.name)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"dpkg-deb -x {deb} failed: {err.stderr.strip()}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def debian_sources(cfg: CorpusConfig, skipped: Counter, timings: dict) -> tuple[list[SourceImage], dict]:
    raw_dir = Path(cfg.raw_dir)
    start = time.perf_counter()
    debs = fetch_packages([*SCENE_PACKAGES, CLIPART_PACKAGE], raw_dir)
    timings["download_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    unpacked = {package: unpack_package(deb, raw_dir / "unpacked") for package, deb in debs.items()}
    timings["unpack_s"] = round(time.perf_counter() - start, 2)
    scene = scene_sources({p: unpacked[p] for p in SCENE_PACKAGES}, skipped)
    clipart = clipart_sources(unpacked[CLIPART_PACKAGE] / CLIPART_ROOT, cfg.seed, skipped)
    return scene + clipart, {package: deb.name for package, deb in debs.items()}


# ---------------------------------------------------------------------------
# Decoding, tiling, storing (runs in worker processes)


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


def keep_rejected_thumbnail(image: Image.Image, image_id: str, cfg: CorpusConfig) -> None:
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


def _store(image: Image.Image, item: SourceImage, image_id: str, cfg: CorpusConfig) -> CorpusImage:
    import imagehash

    relative = Path("images") / item.class_name / f"{image_id}.jpg"
    with atomic_path(Path(cfg.corpus_dir) / relative) as tmp:
        image.save(tmp, quality=cfg.jpeg_quality, subsampling=0)  # 4:4:4 keeps clip-art edges clean
    digest = hashlib.sha1(f"{image.size}".encode() + image.tobytes()).hexdigest()[:16]
    return CorpusImage(image_id, item.class_name, item.source, item.group, relative.as_posix(), digest,
                       int(str(imagehash.phash(image)), 16), image.width, image.height)


def process_source(item: SourceImage, cfg: CorpusConfig) -> tuple[list[CorpusImage], Counter]:
    """Decode one source file; store its image (or its tiles); count what was skipped."""
    skipped: Counter = Counter()
    min_side = cfg.tile_size if item.tiled else cfg.min_side
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


def decode_all(items: list[SourceImage], cfg: CorpusConfig) -> tuple[list[CorpusImage], Counter]:
    """Run process_source over all items, in `cfg.workers` processes."""
    work = sorted(items, key=lambda it: not it.tiled)  # big wallpapers first: better load balance
    job = partial(process_source, cfg=cfg)
    images: list[CorpusImage] = []
    skipped: Counter = Counter()
    if cfg.workers == 1 or len(work) < 2:
        results: Iterable = map(job, work)
        for stored, reasons in progress(results, len(work), "decode"):
            images += stored
            skipped += reasons
        return images, skipped
    # fork (as torch's DataLoader does on Linux): no re-import of __main__, so a
    # plain script without an `if __name__ == "__main__"` guard works too.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(min(cfg.workers, len(work))) as pool:
        for stored, reasons in progress(pool.imap_unordered(job, work, chunksize=4), len(work), "decode"):
            images += stored
            skipped += reasons
    return images, skipped


def progress(results: Iterable, total: int, desc: str) -> Iterator:
    """tqdm when a person watches; otherwise four lines (25 %, 50 %, 75 %, done)."""
    from mtl.runtime import is_interactive

    if is_interactive():
        from tqdm import tqdm

        yield from tqdm(results, total=total, desc=desc, unit="file")
        return
    marks = {math.ceil(total * q / 4) for q in (1, 2, 3, 4)}
    start = time.perf_counter()
    for done, result in enumerate(results, 1):
        yield result
        if done in marks:
            print(f"{desc}: {done}/{total} files, {time.perf_counter() - start:.0f} s", flush=True)


# ---------------------------------------------------------------------------
# Ground-truth hygiene and splits (pure functions of the decoded images)


def near_duplicate_pairs(phashes: np.ndarray, radius: int, block: int = 512) -> np.ndarray:
    """All (i, j), i < j, whose 64-bit hashes differ in at most `radius` bits.

    Blocked all-pairs XOR + popcount in numpy: 10k images = 10^8 pairs in ~1 s,
    exact (a BK-tree is only faster for much larger collections).
    """
    hashes = np.asarray(phashes, dtype=np.uint64)
    pairs = []
    for start in range(0, len(hashes), block):
        distances = np.bitwise_count(hashes[start:start + block, None] ^ hashes[None, :])
        i, j = np.nonzero(distances <= radius)
        i = i + start
        keep = j > i
        pairs.append(np.stack([i[keep], j[keep]], axis=1))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)


@dataclass
class Deduplication:
    kept: list[CorpusImage]
    exact: list[CorpusImage]
    near: list[CorpusImage]
    near_across_groups: int


def drop_duplicates(images: list[CorpusImage], radius: int, seed: int) -> Deduplication:
    """Keep images in seeded order unless an already kept one is an exact or near duplicate.

    Afterwards no two kept images share pixels or lie within `radius` pHash bits,
    whichever groups or classes they came from.
    """
    ordered = sorted(images, key=lambda im: rank_key(seed, im.image_id))
    neighbours: dict[int, list[int]] = defaultdict(list)
    pairs = near_duplicate_pairs(np.array([im.phash for im in ordered], dtype=np.uint64), radius)
    for i, j in pairs.tolist():
        neighbours[j].append(i)  # i < j: i comes first in seeded order
    kept_flags = np.zeros(len(ordered), dtype=bool)
    kept_hashes: set[str] = set()
    result = Deduplication([], [], [], 0)
    for index, image in enumerate(ordered):
        if image.hash in kept_hashes:
            result.exact.append(image)
            continue
        blockers = [i for i in neighbours[index] if kept_flags[i]]
        if blockers:
            result.near.append(image)
            result.near_across_groups += any(ordered[i].group != image.group for i in blockers)
            continue
        kept_flags[index] = True
        kept_hashes.add(image.hash)
        result.kept.append(image)
    return result


def cap_per_class(images: list[CorpusImage], max_per_class: int, seed: int) -> tuple[list[CorpusImage], int]:
    """At most `max_per_class` images per class, the first in seeded order."""
    by_class: dict[str, list[CorpusImage]] = defaultdict(list)
    for image in sorted(images, key=lambda im: rank_key(seed, im.image_id)):
        by_class[image.class_name].append(image)
    kept = [im for members in by_class.values() for im in members[:max_per_class]]
    return kept, len(images) - len(kept)


def assign_splits(images: list[CorpusImage], fractions: Mapping[str, float], seed: int) -> dict[str, str]:
    """group -> split; every image of a group gets its group's split.

    Per class (a group spanning classes belongs to its majority class), groups
    are put in seeded hash order and the class's images are cut at the split
    fractions: a group goes to the split that holds the middle of its run of
    images.  Pure hashing per group would also be stable, but with ~80 wallpapers
    of very unequal tile counts it misses the fractions by a lot; this meets them
    to within one group, and the same inputs and seed always give the same splits.
    """
    sizes: Counter = Counter(im.group for im in images)
    class_votes: dict[str, Counter] = defaultdict(Counter)
    for image in images:
        class_votes[image.group][image.class_name] += 1
    owner = {g: min(votes, key=lambda c: (-votes[c], c)) for g, votes in class_votes.items()}
    bounds = np.cumsum([fractions[s] for s in SPLITS])
    split_of: dict[str, str] = {}
    for class_name in sorted(set(owner.values())):
        groups = sorted((g for g in owner if owner[g] == class_name), key=lambda g: rank_key(seed, g))
        total, before = sum(sizes[g] for g in groups), 0
        for group in groups:
            middle = (before + sizes[group] / 2) / total
            split_of[group] = SPLITS[min(int(np.searchsorted(bounds, middle, side="right")), len(SPLITS) - 1)]
            before += sizes[group]
    return split_of


# ---------------------------------------------------------------------------
# Outputs


def write_manifest(images: list[CorpusImage], path: Path) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for im in sorted(images, key=lambda im: (im.class_name, im.image_id)):
            writer.writerow([im.image_id, im.path, im.class_name, im.source, im.group, im.split, im.hash,
                             im.width, im.height])


def contact_sheet(paths: Sequence[Path], columns: int = 8, thumb: int = 96, pad: int = 4) -> Image.Image:
    """A grid of thumbnails (aspect kept, centred in square cells) on light grey."""
    rows = max(1, math.ceil(len(paths) / columns))
    cell = thumb + pad
    sheet = Image.new("RGB", (columns * cell + pad, rows * cell + pad), (235, 235, 235))
    for index, path in enumerate(paths):
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
        x = pad + (index % columns) * cell + (thumb - im.width) // 2
        y = pad + (index // columns) * cell + (thumb - im.height) // 2
        sheet.paste(im, (x, y))
    return sheet


def write_contact_sheets(images: list[CorpusImage], cfg: CorpusConfig) -> dict[str, str]:
    corpus_dir = Path(cfg.corpus_dir)
    sheets = {}
    for class_name in sorted({im.class_name for im in images}):
        members = sorted((im for im in images if im.class_name == class_name),
                         key=lambda im: rank_key(cfg.seed + 1, im.image_id))[:cfg.contact_sheet_images]
        name = f"contact_{slug(class_name)}.png"
        with atomic_path(corpus_dir / name) as tmp:
            contact_sheet([corpus_dir / im.path for im in members]).save(tmp)
        sheets[class_name] = name
    return sheets


def write_rejected_sheet(cfg: CorpusConfig) -> str:
    """A contact sheet of the images rejected as near blank (up to contact_sheet_images,
    seeded choice; an empty sheet when there were none)."""
    corpus_dir = Path(cfg.corpus_dir)
    thumbs = sorted((corpus_dir / REJECTED_DIR).glob("*.jpg"), key=lambda p: rank_key(cfg.seed + 1, p.stem))
    name = "contact_near_blank.png"
    contact_sheet(thumbs[:cfg.contact_sheet_images]).save(corpus_dir / name)
    return name


def count_table(images: list[CorpusImage], key) -> dict[str, dict[str, int]]:
    """{class: {train, val, test, total}} of key(image) counts (images or distinct groups)."""
    table: dict[str, dict[str, int]] = {}
    for class_name in sorted({im.class_name for im in images}):
        members = [im for im in images if im.class_name == class_name]
        row = {s: len({key(im) for im in members if im.split == s}) for s in SPLITS}
        row["total"] = len({key(im) for im in members})
        table[class_name] = row
    return table


def made_before_the_marker(corpus_dir: Path) -> bool:
    """A corpus built before folders were marked: its manifest has our header."""
    manifest = corpus_dir / "manifest.csv"
    try:
        with manifest.open(newline="") as handle:
            return next(csv.reader(handle), None) == list(MANIFEST_COLUMNS)
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
    """Remove what a previous build wrote (and nothing else a user may keep there)."""
    shutil.rmtree(corpus_dir / "images", ignore_errors=True)
    shutil.rmtree(corpus_dir / REJECTED_DIR, ignore_errors=True)
    for name in ["manifest.csv", "report.json", *[p.name for p in corpus_dir.glob("contact_*.png")]]:
        (corpus_dir / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# The build


def build_corpus(cfg: CorpusConfig | Mapping[str, Any]) -> dict:
    """Build `cfg.corpus_dir` from scratch; return the report (also written to report.json)."""
    if not isinstance(cfg, CorpusConfig):
        cfg = CorpusConfig.from_params(cfg)
    started = time.perf_counter()
    check_corpus_dir(cfg)  # before a download: a wrong folder is told at once
    skipped: Counter = Counter()
    timings: dict[str, float] = {}
    packages: dict[str, str] = {}
    if cfg.source == "debian":
        items, packages = debian_sources(cfg, skipped, timings)
    else:
        items = folder_sources(Path(cfg.folder), skipped)
    items = subsample_before_decoding(items, cfg, skipped)
    # Only now: a bad source leaves the previous corpus as it was.
    corpus_dir = claim_folder(cfg.corpus_dir, "data.corpus_dir", made_before_the_marker)
    clear_outputs(corpus_dir)

    start = time.perf_counter()
    decoded, reasons = decode_all(items, cfg)
    skipped += reasons
    timings["decode_s"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    dedup = drop_duplicates(decoded, cfg.near_dup_hamming, cfg.seed)
    kept, over_cap = cap_per_class(dedup.kept, cfg.max_per_class, cfg.seed)
    skipped["over_class_cap"] += over_cap
    kept_ids = {im.image_id for im in kept}
    for image in decoded:
        if image.image_id not in kept_ids:
            (corpus_dir / image.path).unlink(missing_ok=True)
    split_of = assign_splits(kept, cfg.split_fractions, cfg.seed)
    for image in kept:
        image.split = split_of[image.group]
    timings["dedup_split_s"] = round(time.perf_counter() - start, 2)

    write_manifest(kept, corpus_dir / "manifest.csv")
    sheets = write_contact_sheets(kept, cfg)
    rejected_sheet = write_rejected_sheet(cfg)
    timings["build_s"] = round(time.perf_counter() - started, 2)
    report = make_report(cfg, kept, dedup, skipped, timings, packages, sheets)
    report["near_blank_sheet"] = rejected_sheet
    atomic_write_text(corpus_dir / "report.json", json.dumps(report, indent=1) + "\n")
    return report


# Reasons that are a choice of ours (sampling, caps, one file per picture), not a bad file.
SUBSAMPLING_REASONS = ("family_variant", "not_decoded_over_cap", "over_class_cap", "over_tile_cap",
                       "other_version", "symlink")


def make_report(cfg: CorpusConfig, kept: list[CorpusImage], dedup: Deduplication, skipped: Counter,
                timings: dict, packages: dict, sheets: dict) -> dict:
    by_split = Counter(im.split for im in kept)
    return {
        "source": cfg.source,
        "images": len(kept),
        "splits": {s: by_split[s] for s in SPLITS},
        "counts": count_table(kept, key=lambda im: im.image_id),
        "groups": count_table(kept, key=lambda im: im.group),
        "rejections": {k: v for k, v in sorted(skipped.items()) if k not in SUBSAMPLING_REASONS},
        "subsampling": {k: skipped[k] for k in SUBSAMPLING_REASONS if skipped[k]},
        "duplicates": {"exact": len(dedup.exact), "near": len(dedup.near),
                       "near_across_groups": dedup.near_across_groups},
        "build_seconds": timings["build_s"],
        "timings": timings,
        "packages": packages,
        "contact_sheets": sheets,
        "config": asdict(cfg),
    }


def summary(report: dict) -> str:
    lines = [f"corpus: {report['images']} images ({report['build_seconds']:.0f} s)"]
    for class_name, row in report["counts"].items():
        lines.append(f"  {class_name:<12} " + "  ".join(f"{s} {row[s]:>5}" for s in (*SPLITS, "total")))
    lines.append(f"  duplicates dropped: {report['duplicates']}")
    lines.append(f"  rejections: {report['rejections']}")
    return "\n".join(lines)


def apply_overrides(data: dict, assignments: Sequence[str]) -> dict:
    """`key=value` (or `data.key=value`) overrides of the data section, values parsed as YAML.

    Checked against CorpusConfig rather than params.yaml, so keys with a default
    here (workers, min_side, ...) can be set even where params.yaml omits them.
    """
    import yaml

    known = {f.name for f in fields(CorpusConfig)}
    data = dict(data)
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        key = key.strip().removeprefix("data.")
        if not sep or key not in known:
            raise ValueError(f"--set {assignment!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        data[key] = yaml.safe_load(raw)
    return data


def main(argv: list[str] | None = None) -> int:
    from mtl.params import load_params

    parser = argparse.ArgumentParser(prog="mtl corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="parameter file (its `data` section)")
    parser.add_argument("--profile", default=None, help="a profile YAML overlaid on the parameters")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a data key, e.g. --set max_side=256 (repeatable)")
    args = parser.parse_args(argv)
    params = load_params(args.params, profile=args.profile)
    report = build_corpus(CorpusConfig.from_params(apply_overrides(params.get("data") or {}, args.set)))
    print(summary(report))
    print(f"wrote {Path(report['config']['corpus_dir']) / 'manifest.csv'} and report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
