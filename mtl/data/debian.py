"""Pictures from Debian packages: download (`apt-get download`, cached in ``raw_dir``),
unpack (`dpkg-deb -x`, no root needed once the package lists exist), and find the
source files of each row of the package table (`mtl.data.packages`).

Listed rows (the real photographs, `mtl.data.packages` grouping ``listed``) take exactly
the files of their list, each with the picture the list gives it; a listed
``FILE.rcc:/resource`` is extracted from the Qt resource file into ``FILE.rcc.d/`` beside
it, once (`mtl.data.rcc`).  A listed file the package no longer ships is counted
(``listed_missing``), not an error: a new package version may drop one.

One file per picture: a tiled row (wallpapers, maps, painted backgrounds) keeps the
largest file of each group (its other sizes and colourings are copies of it); a row of
whole images keeps one file per group, a seeded choice (`pick: seeded`, e.g. one of the
numbered variants of a clip-art drawing) or the largest (`pick: largest`, e.g. an icon's
biggest size).  Symbolic links (a file filed twice) are skipped, and so are vector files
except in rows of SVG icon themes (`vector`), which are rendered (`mtl.data.decode`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image

from mtl.data import rcc
from mtl.data.decode import SourceImage
from mtl.data.imageio import IMAGE_SUFFIXES, VECTOR_SUFFIXES
from mtl.data.manifest import rank_key, slug, unique_ids
from mtl.data.packages import (PackageSource, package_names, package_rows, picture_of, read_listing,
                               refuse_reserved)
from mtl.io import atomic_path

RCC_MARK = ".rcc:/"



def fetch_packages(packages: Sequence[str], raw_dir: Path) -> dict[str, Path]:
    """The .deb file of each package in `raw_dir`, downloading those not there yet."""
    for package in packages:
        refuse_reserved(package)
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


def header_pixels(path: Path) -> int:
    try:
        with Image.open(path) as im:
            return im.width * im.height
    except Exception:  # noqa: BLE001 - unreadable files are judged later by load_image
        return 0


def listed_file(package_root: Path, listed: str) -> Path:
    """The file a listing line names: a path in the package, or an entry of a Qt resource
    file (``FILE.rcc:/resource``), extracted beside it once."""
    if RCC_MARK not in listed:
        return package_root / listed
    archive, resource = listed.split(RCC_MARK, 1)
    target = package_root / f"{archive}.rcc.d" / resource
    if not target.is_file() and (package_root / f"{archive}.rcc").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            tmp.write_bytes(rcc.read_entry(package_root / f"{archive}.rcc", resource))
    return target


def listed_files(row: PackageSource, package_root: Path, skipped: Counter) -> dict[Path, str]:
    """{file: picture} of a listed row (see the module docstring)."""
    files = {}
    for listed, picture in read_listing(row.listing).items():
        try:
            path = listed_file(package_root, listed)
        except (KeyError, ValueError):  # the resource file no longer holds it, or is damaged
            path = None
        if path is None or not path.is_file():
            skipped["listed_missing"] += 1
        elif path.is_symlink():
            skipped["symlink"] += 1
        else:
            files[path] = picture
    return dict(sorted(files.items()))


def row_files(row: PackageSource, package_root: Path, skipped: Counter) -> list[Path]:
    """The row's raster files below its root, sorted; symbolic links and vector files counted."""
    if row.listing is not None:
        return list(listed_files(row, package_root, skipped))
    root = package_root / row.root
    files = []
    for path in sorted(root.rglob("*")):
        suffix = path.suffix.lower()
        if suffix not in IMAGE_SUFFIXES | VECTOR_SUFFIXES or not row.matches(path.relative_to(root).as_posix()):
            continue
        if path.is_symlink():
            skipped["symlink"] += 1
        elif suffix in VECTOR_SUFFIXES and not row.vector:
            skipped["vector_image"] += 1
        elif path.is_file():
            files.append(path)
    return files


def whole_sources(row: PackageSource, package_root: Path, seed: int, skipped: Counter) -> list[SourceImage]:
    """One file per group of a row of whole images (see the module docstring)."""
    root = package_root / row.root
    listed = listed_files(row, package_root, skipped) if row.listing is not None else None
    files = list(listed) if listed is not None else row_files(row, package_root, skipped)
    prefix = f"{row.class_name}-{row.prefix + '-' if row.prefix else ''}"
    ids = unique_ids(slug(prefix + _short_name(p, root, listed is not None)) for p in files)
    members: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    for path, image_id in zip(files, ids):
        group = listed[path] if listed is not None else picture_of(row.grouping, path.relative_to(root))[1]
        members[group].append((path, image_id))
    chosen = []
    for group, candidates in members.items():
        if row.pick == "largest":
            best = max(candidates, key=lambda c: (header_pixels(c[0]), rank_key(seed, c[1])))
        else:
            best = min(candidates, key=lambda c: rank_key(seed, c[1]))
        if len(candidates) > 1:
            skipped["other_version" if row.pick == "largest" else "family_variant"] += len(candidates) - 1
        group_name = group if not row.prefix else f"{row.prefix}:{group}"
        chosen.append(SourceImage(best[0], row.class_name, f"debian:{row.package}", group_name, best[1], tiled=False))
    return sorted(chosen, key=lambda item: item.image_id)


def _short_name(path: Path, root: Path, listed: bool) -> str:
    """A file's name for its id, without the suffix: the path below the row's root, or for
    a listed file its folder and name (listed files lie anywhere in the package)."""
    if listed:
        return str(Path(*path.parts[-2:]).with_suffix(""))
    return str(path.relative_to(root).with_suffix(""))


def tiled_sources(rows: Sequence[PackageSource], unpacked: Mapping[str, Path],
                  skipped: Counter) -> list[SourceImage]:
    """The largest file of each group of the tiled rows (all sizes and colourings of a picture)."""
    largest: dict[tuple[str, str], tuple[int, Path, str, PackageSource]] = {}
    for row in rows:
        root = unpacked[row.package] / row.root
        for path in row_files(row, unpacked[row.package], skipped):
            picture, group = picture_of(row.grouping, path.relative_to(root))
            key = (row.package, group if not row.prefix else f"{row.prefix}:{group}")
            pixels = header_pixels(path)
            if key in largest:
                skipped["other_version"] += 1
                if pixels <= largest[key][0]:
                    continue
            largest[key] = (pixels, path, picture, row)
    keys = sorted(largest)
    ids = unique_ids(slug(f"{largest[k][3].class_name}-{largest[k][3].prefix + '-' if largest[k][3].prefix else ''}"
                          f"{largest[k][2]}") for k in keys)
    return [SourceImage(largest[k][1], largest[k][3].class_name, f"debian:{k[0]}", k[1], image_id, tiled=True)
            for k, image_id in zip(keys, ids)]


def debian_sources(package_set: str, raw_dir: Path, seed: int, skipped: Counter,
                   timings: dict) -> tuple[list[SourceImage], dict]:
    """Every source file of a package set, and per package its .deb and sizes (MB)."""
    start = time.perf_counter()
    debs = fetch_packages(package_names(package_set), raw_dir)
    timings["download_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    unpacked = {package: unpack_package(deb, raw_dir / "unpacked") for package, deb in debs.items()}
    timings["unpack_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    rows = package_rows(package_set)
    items = tiled_sources([r for r in rows if r.tiled], unpacked, skipped)
    for row in rows:
        if not row.tiled:
            items += whole_sources(row, unpacked[row.package], seed, skipped)
    timings["discover_s"] = round(time.perf_counter() - start, 2)
    packages = {package: {"deb": deb.name, "deb_mb": round(os.path.getsize(deb) / 2**20, 1)}
                for package, deb in debs.items()}
    return items, packages
