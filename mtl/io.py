"""Outputs that are whole or absent, written only where the tool may write.

Every file the package writes goes through `atomic_path` (or `atomic_write_text`
/ `atomic_write_bytes`): the data goes to a temporary file beside the target,
which then replaces the target in one `os.replace`.  A run killed mid-write
leaves the previous file (and at worst a stray `.NAME.*.tmp*` file); two
writers of one target never share a temporary file, so the last one to finish
wins, whole, and a reader only ever sees a whole file.  (No fsync: this guards
against a kill, not a power cut, and costs nothing on thousands of images.)

Folders the tool empties must be its own (`claim_folder`), and an output must
not overlap an input (`overlaps`): a refusal is a `UserError`, and nothing is
touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

# Left in every folder the tool builds and may later empty (corpus, eval set).
OWNER_MARKER = ".made-by-mtl"


class UserError(ValueError):
    """Something the user asked for cannot be done as asked (a path, a file, a
    setting).  The message is one line that says what to change; `mtl` prints
    it without a traceback."""


# --------------------------------------------------------------------------- atomic writes

def temp_path(path: Path) -> Path:
    """A temporary name beside `path`, unique per process, thread and call.  It ends
    in the target's suffix, because numpy, Pillow, pandas and matplotlib choose
    the format by it (numpy would append `.npz` to a name without it)."""
    token = f"{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}"
    return path.with_name(f".{path.name}.{token}.tmp{path.suffix}")


def is_temp_of(name: str, target: str) -> bool:
    """True for a temporary file of `target` (ours, or one a killed writer left)."""
    return name.startswith(f".{target}.") and ".tmp" in name


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """`with atomic_path(p) as tmp: write(tmp)`: `p` becomes what was written to
    `tmp` once the block ends without an error, and is left as it was otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """Indented, keys sorted, numpy numbers as floats, atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def write_csv(table, path: str | Path, **options) -> Path:
    """A pandas table as CSV (no index), atomically; options go to `to_csv`."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, **options)
    return Path(path)


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of the file's sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- where the tool may write

def overlaps(a: str | Path, b: str | Path) -> bool:
    """True when `a` and `b` are one path or one lies inside the other, after
    resolving `..` and symbolic links (a textual test is fooled by both)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """True when `path` resolves to `folder` or somewhere under it."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def some_names(folder: Path, names: list[str] | None = None, shown: int = 3) -> str:
    """A few entries of a folder, for an error message."""
    names = sorted(p.name for p in folder.iterdir()) if names is None else names
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def refuse_foreign_folder(folder: str | Path, setting: str,
                          made_by_us: Callable[[Path], bool] = lambda _: False) -> None:
    """Refuse (UserError, nothing touched) a folder the tool may not rebuild.

    The folder is the tool's when it is missing or empty, holds OWNER_MARKER
    (left by an earlier build), or passes `made_by_us` (how folders built before
    the marker existed are recognized).  Anything else belongs to the user."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{setting} {folder} is a file, not a folder")
    if (folder.is_dir() and any(folder.iterdir()) and not (folder / OWNER_MARKER).is_file()
            and not made_by_us(folder)):
        raise UserError(f"{setting} {folder} holds files this tool did not make ({some_names(folder)}); "
                        "choose a new or empty folder")


def claim_folder(folder: str | Path, setting: str, made_by_us: Callable[[Path], bool] = lambda _: False) -> Path:
    """Make `folder` the tool's to rebuild (created and marked), or refuse it."""
    refuse_foreign_folder(folder, setting, made_by_us)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OWNER_MARKER).touch()
    return folder
