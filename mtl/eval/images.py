"""The images a method embeds: a folder, a list file or an eval split, as paths and ids;
a shard of such a list; and their decoding in DataLoader workers, where an unreadable
file becomes a reason (mtl.data.imageio), never a crash."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from mtl.data.imageio import IMAGE_SUFFIXES, load_image
from mtl.runtime import progress


@dataclass(frozen=True)
class ImageList:
    """Image files with their ids (and, for an eval split, each one's role)."""

    paths: list[Path]
    ids: list[str]
    roles: list[str] | None = None


def images_in_folder(folder: str | Path) -> ImageList:
    """Image files under `folder` (recursive, by extension); ids are relative paths."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    if not paths:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return ImageList(paths, [p.relative_to(folder).as_posix() for p in paths])


def images_in_list(list_file: str | Path) -> ImageList:
    """One path per line (blank lines and # comments ignored); relative paths are
    relative to the list file; the id is the line as written."""
    list_file = Path(list_file)
    # surrogateescape: a listed name that is not UTF-8 still names its file.
    lines = [ln.strip() for ln in list_file.read_text(encoding="utf-8", errors="surrogateescape").splitlines()]
    entries = [ln for ln in lines if ln and not ln.startswith("#")]
    if not entries:
        raise ValueError(f"{list_file} lists no images")
    paths = [Path(e) if Path(e).is_absolute() else list_file.parent / e for e in entries]
    return ImageList(paths, entries)


def images_in_evalset(split_dir: str | Path) -> ImageList:
    """References then queries of an eval split (data/eval/<split>), with their roles."""
    split_dir = Path(split_dir)
    paths, ids, roles = [], [], []
    for role, csv, id_column in (("reference", "references.csv", "reference_id"), ("query", "queries.csv", "query_id")):
        table_path = split_dir / csv
        if not table_path.is_file():
            raise FileNotFoundError(f"{table_path} missing: build the eval set first (mtl evalset)")
        table = pd.read_csv(table_path, dtype=str, keep_default_na=False)
        paths += [split_dir / p for p in table["path"]]
        ids += list(table[id_column])
        roles += [role] * len(table)
    return ImageList(paths, ids, roles)


def shard_images(images: ImageList, index: int, count: int, batch_size: int) -> ImageList:
    """Part `index` (0..count-1) of the list: a contiguous run of whole batches."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index} of {count} does not exist (0 <= i < n)")
    batches = -(-len(images.paths) // batch_size)
    first, last = (batch_size * (batches * i // count) for i in (index, index + 1))
    return ImageList(images.paths[first:last], images.ids[first:last],
                     None if images.roles is None else images.roles[first:last])


# --------------------------------------------------------------------------- decoding

class ImageDataset:
    """Decodes and prepares one image in a DataLoader worker; bad files become reasons."""

    def __init__(self, paths: Sequence[Path], prepare: Callable):
        self.paths, self.prepare = list(paths), prepare

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        loaded = load_image(self.paths[index])
        if loaded.image is None:
            return index, None, loaded.reason
        try:
            return index, self.prepare(loaded.image), None
        except Exception as error:  # noqa: BLE001 - one odd image must not stop a long run
            return index, None, f"prepare_failed: {type(error).__name__}"


def _collate(items):
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None]
    indices = [i for i, _ in good]
    if not good:
        batch = None
    elif isinstance(good[0][1], np.ndarray):
        batch = np.stack([x for _, x in good])
    else:
        batch = torch.stack([x for _, x in good])
    return indices, batch, bad


def image_batches(paths: Sequence[Path], prepare: Callable, batch_size: int, num_workers: int, desc: str,
                  pin_memory: bool = False) -> Iterator[tuple[list[int], np.ndarray | torch.Tensor | None,
                                                              list[tuple[int, str]]]]:
    """(indices, batch of prepare(image), [(index, why unreadable)]) of each batch of `paths`,
    decoded in `num_workers` DataLoader workers, with progress reports."""
    loader = DataLoader(ImageDataset(paths, prepare), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_collate, pin_memory=pin_memory)
    yield from progress(loader, len(loader), desc, unit="batch")


def failures(image_list: ImageList, bad: list[tuple[int, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, reasons) of the unreadable images."""
    return (np.array([image_list.ids[i] for i, _ in bad], dtype=str),
            np.array([r for _, r in bad], dtype=str))
