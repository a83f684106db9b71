"""Move duplicates aside, never delete them; and move them back exactly.

    mtl dedup FOLDER --move-duplicates-to DIR            # dry run: prints the plan
    mtl dedup FOLDER --move-duplicates-to DIR --apply    # moves; writes OUT/moves.csv first
    mtl dedup --undo OUT/moves.csv                       # every file back, verified

Every non-keeper FOLDER/sub/x.jpg goes to DIR/sub/x.jpg.  Safety rules:
- DIR may not lie inside FOLDER: the next run would scan the moved files again;
- nothing is ever overwritten: a taken destination stops the run before the first move,
  and each move itself refuses to replace a file (a hard link, or an exclusive-create
  copy across file systems, then the original is unlinked);
- moves.csv (source, destination, digest, bytes) is written atomically *before* the
  first move, so an interrupted run can still be undone, and an existing moves.csv
  (the record of an earlier move) is never replaced;
- undo checks every file first (its digest unchanged, its original path free) and
  moves nothing unless all are fine; files already back are skipped.  A completed undo
  renames the record to moves.csv.undone.
"""

from __future__ import annotations

import csv
import errno
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from mtl.io import atomic_path, file_digest

MOVES_COLUMNS = ("source", "destination", "digest", "bytes")


class MoveError(Exception):
    """A move or undo that would lose or overwrite something; nothing was moved."""


@dataclass(frozen=True)
class Move:
    source: Path        # absolute
    destination: Path   # absolute
    digest: str         # mtl.io.file_digest of the bytes moved
    bytes: int


def check_destination(folder: str | Path, destination: str | Path) -> None:
    """Refuse a destination inside the scanned folder (its files would be found again)."""
    folder, destination = Path(folder).resolve(), Path(destination).resolve()
    if destination == folder or folder in destination.parents:
        raise MoveError(f"--move-duplicates-to {destination} lies inside {folder}, which is scanned "
                        "recursively: the moved files would be found again; choose a folder outside it")


def plan_moves(result, destination: str | Path) -> list[Move]:
    """Every non-keeper of a DedupResult, mirrored from its folder into `destination`."""
    check_destination(result.folder, destination)
    folder, destination = Path(result.folder).resolve(), Path(destination).resolve()
    moves = []
    for id_ in result.duplicates_to_remove():
        source = folder / id_
        moves.append(Move(source, destination / id_, file_digest(source), source.stat().st_size))
    return moves


def apply_moves(moves: list[Move], moves_csv: str | Path) -> None:
    """Record, then move.  MoveError before the first move if anything is in the way."""
    moves_csv = Path(moves_csv)
    if moves_csv.exists():
        raise MoveError(f"{moves_csv} already records earlier moves: undo them (mtl dedup --undo {moves_csv}) "
                        "or keep that file elsewhere first")
    problems = [f"{m.destination} exists (never overwritten)" for m in moves if m.destination.exists()]
    problems += [f"{m.source} is gone" for m in moves if not m.source.is_file()]
    _refuse_if(problems, "nothing moved")
    write_moves_csv(moves, moves_csv)
    for move in moves:
        move_without_overwrite(move.source, move.destination, move.digest)


def write_moves_csv(moves: list[Move], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MOVES_COLUMNS)
        writer.writerows((m.source, m.destination, m.digest, m.bytes) for m in moves)


def read_moves_csv(path: str | Path) -> list[Move]:
    path = Path(path)
    if not path.is_file():
        raise MoveError(f"no moves record at {path}")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and set(MOVES_COLUMNS) - set(rows[0]):
        raise MoveError(f"{path} is not a moves record (columns {MOVES_COLUMNS})")
    return [Move(Path(r["source"]), Path(r["destination"]), r["digest"], int(r["bytes"])) for r in rows]


def move_without_overwrite(source: Path, destination: Path, digest: str) -> None:
    """Move one file, keeping its bytes and times, never replacing an existing file."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)  # fails if destination exists: the no-overwrite guarantee
    except FileExistsError:
        raise MoveError(f"{destination} appeared meanwhile; {source} left in place") from None
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
            raise
        # Another file system (or no hard links there): copy into a new file only.
        with open(source, "rb") as reader, open(destination, "xb") as writer:
            shutil.copyfileobj(reader, writer)
        shutil.copystat(source, destination)
        if file_digest(destination) != digest:
            destination.unlink()
            raise MoveError(f"copy of {source} to {destination} differs; original left in place") from None
    source.unlink()


def undo_moves(moves_csv: str | Path) -> tuple[int, int]:
    """Move every recorded file back; (restored, already in place).  MoveError, with
    every problem listed, before anything moves."""
    moves = read_moves_csv(moves_csv)
    to_restore, in_place, problems = [], 0, []
    for m in moves:
        if m.destination.is_file() and not m.source.exists():
            if file_digest(m.destination) == m.digest:
                to_restore.append(m)
            else:
                problems.append(f"{m.destination} changed since it was moved (digest differs)")
        elif m.source.is_file() and not m.destination.exists() and file_digest(m.source) == m.digest:
            in_place += 1  # never moved (interrupted run) or already undone
        elif m.source.exists():
            problems.append(f"{m.source} is occupied by another file")
        else:
            problems.append(f"{m.destination} is missing")
    _refuse_if(problems, "nothing moved back")
    for m in to_restore:
        move_without_overwrite(m.destination, m.source, m.digest)
    _remove_emptied_folders(to_restore)
    # Done: set the record aside, so that a later --apply may write a new one.
    Path(moves_csv).replace(Path(moves_csv).with_name(Path(moves_csv).name + ".undone"))
    return len(to_restore), in_place


def _remove_emptied_folders(moves: list[Move]) -> None:
    """The sub-folders of the destination that undo emptied (the destination itself stays)."""
    for move in moves:
        root = _mirror_root(move)
        folder = move.destination.parent
        while folder != root and root in folder.parents and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent


def _mirror_root(move: Move) -> Path:
    """DIR of a move FOLDER/sub/x.jpg -> DIR/sub/x.jpg: strip the path tail both share."""
    source, destination = move.source.parts, move.destination.parts
    shared = 0
    while shared < min(len(source), len(destination)) - 1 and source[-1 - shared] == destination[-1 - shared]:
        shared += 1
    return Path(*destination[:len(destination) - shared])


def _refuse_if(problems: list[str], consequence: str) -> None:
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise MoveError(f"{consequence}: {shown}")


# --------------------------------------------------------------------------- commands (mtl dedup)

def move_command(result, destination: Path, moves_csv: Path, apply: bool) -> int:
    try:
        moves = plan_moves(result, destination)
        total = sum(m.bytes for m in moves) / 1e6
        if not moves:
            print("no duplicates to move")
            return 0
        if not apply:
            print(f"dry run: would move {len(moves)} files ({total:.1f} MB) to {destination}; add --apply to move")
            for m in moves[:10]:
                print(f"  {m.source} -> {m.destination}")
            return 0
        apply_moves(moves, moves_csv)
    except MoveError as error:
        print(f"mtl dedup: {error}", file=sys.stderr)
        return 1
    print(f"moved {len(moves)} files ({total:.1f} MB) to {destination}; record: {moves_csv} "
          f"(undo: mtl dedup --undo {moves_csv})")
    return 0


def undo_command(moves_csv: Path) -> int:
    try:
        restored, in_place = undo_moves(moves_csv)
    except MoveError as error:
        print(f"mtl dedup --undo: {error}", file=sys.stderr)
        return 1
    print(f"moved {restored} files back ({in_place} were already in place)")
    return 0
