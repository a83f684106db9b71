"""The corpus as rows: image ids made from file names, seeded orders, and
``manifest.csv`` (``id, path, class, source, group, split, hash, width, height``; `path`
relative to the corpus folder), written by the corpus build and read by everything after
it, with the originals of a split as the training batches and the evaluation set take them.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from mtl.io import atomic_path

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("id", "path", "class", "source", "group", "split", "hash", "width", "height", "photo")
# photo: True for a real photograph (a package row marked so, mtl.data.packages): the eval
# set gives photographs a part of their own.  Manifests written before it lack the column.


# --------------------------------------------------------------------------- ids and orders

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


# --------------------------------------------------------------------------- manifest.csv

@dataclass
class CorpusImage:
    """One stored image as the corpus build knows it: a manifest row, plus its pHash."""

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
    photo: bool = False  # set by the build from the package table, never from a decode record


@dataclass(frozen=True)
class Original:
    """One manifest row as the batches need it."""

    id: str
    path: Path     # absolute (corpus dir joined)
    class_name: str
    group: str = ""  # the picture it comes from (tiles of one wallpaper share it); "" = its own id
    photo: bool = False  # a real photograph (the manifest's `photo` column)

    @property
    def picture(self) -> str:
        """The group, or the id for a manifest without groups: what 'the same picture' means."""
        return self.group or self.id


def write_manifest(images: Sequence[CorpusImage], path: Path) -> None:
    """The kept images' rows, by class and id, atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for im in sorted(images, key=lambda im: (im.class_name, im.image_id)):
            writer.writerow([im.image_id, im.path, im.class_name, im.source, im.group, im.split, im.hash,
                             im.width, im.height, im.photo])


def read_manifest(manifest_csv: str | Path) -> list[dict[str, str]]:
    manifest_csv = Path(manifest_csv)
    if not manifest_csv.is_file():
        raise FileNotFoundError(f"manifest not found: {manifest_csv} (build the corpus first: mtl corpus)")
    with manifest_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"id", "path", "class", "split"} - set(rows[0] if rows else {})
    if rows and missing:
        raise ValueError(f"{manifest_csv}: missing columns {sorted(missing)}")
    return rows


def class_names_from_manifest(manifest_csv: str | Path) -> list[str]:
    """The sorted class names: class id i is the i-th name, in every split."""
    return sorted({row["class"] for row in read_manifest(manifest_csv)})


def split_originals(manifest_csv: str | Path, corpus_dir: str | Path, split: str) -> list[Original]:
    """The originals of one split, sorted by id (a stable order for seeded choices)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    corpus_dir = Path(corpus_dir)
    rows = [r for r in read_manifest(manifest_csv) if r["split"] == split]
    return sorted((Original(r["id"], corpus_dir / r["path"], r["class"], r.get("group") or "",
                            is_photo_row(r)) for r in rows), key=lambda o: o.id)


def is_photo_row(row: Mapping[str, str]) -> bool:
    """A manifest row's `photo` flag (False in manifests written before the column)."""
    return str(row.get("photo", "")).strip().lower() == "true"
