"""Read Qt binary resource files (``.rcc``): list their files and extract them.

Format (Qt's ``rcc --binary``; writer: qtbase ``src/tools/rcc/rcc.cpp``, reader:
``src/corelib/io/qresource.cpp``).  All numbers are unsigned big-endian.

Header, at offset 0::

    magic         4 bytes   b"qres"
    version       4         1, 2 or 3
    tree_offset   4         start of the tree section (absolute file offset)
    data_offset   4         start of the data section
    names_offset  4         start of the names section
    overall_flags 4         version 3 only: the OR of every file's compression flag

Tree section: an array of fixed-size nodes, 14 bytes each in version 1 and 22 in
versions 2 and 3 (which append an 8-byte last-modified time, ms since the epoch,
0 when unknown).  Node 0 is the root folder.  Each node starts with::

    name_offset 4   into the names section
    flags       2   0x01 zlib-compressed, 0x02 folder, 0x04 zstd-compressed

then, for a folder::

    child_count 4
    first_child 4   index (not byte offset) of its first child node; the children
                    are the ``child_count`` consecutive nodes from there, sorted by
                    name hash

or, for a file::

    territory   2   QLocale::Territory (0: any)
    language    2   QLocale::Language  (1: C, i.e. no language)
    data_offset 4   into the data section

Names section, at ``names_offset + name_offset``: a 2-byte length in UTF-16 code
units, a 4-byte ``qt_hash`` of the name, then the name in UTF-16BE.

Data section, at ``data_offset + node.data_offset``: a 4-byte length, then that many
bytes.  For a zlib entry those bytes are ``qCompress`` output: a 4-byte expected
uncompressed size, then a zlib stream.  A zstd entry is one plain zstd frame (reading
it needs the ``zstandard`` package, or ``compression.zstd`` from Python 3.14 on).

A resource path is the names from the root down joined by ``/``; Qt shows it as
``:/prefix/dir/file``, this module as ``prefix/dir/file`` (no leading ``:/``).  The same
path may appear once per locale; `list_entries` returns every copy.

Use: ``list_entries(path)`` -> `RccEntry` rows; ``read_entry(path, name)`` -> bytes;
``extract_all(path, out_dir)`` -> written files.  Anything that is not a well-formed rcc
raises ValueError naming the file and the problem.
"""

from __future__ import annotations

import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

MAGIC = b"qres"
SUPPORTED_VERSIONS = (1, 2, 3)

FLAG_COMPRESSED = 0x01       # zlib (qCompress)
FLAG_DIRECTORY = 0x02
FLAG_COMPRESSED_ZSTD = 0x04
KNOWN_FLAGS = FLAG_COMPRESSED | FLAG_DIRECTORY | FLAG_COMPRESSED_ZSTD

NODE_SIZE_V1 = 14
NODE_SIZE_V2 = 22            # versions 2 and 3: + 8-byte last-modified time


@dataclass(frozen=True)
class RccHeader:
    """The header of an rcc file: its format version and section offsets."""

    version: int
    tree_offset: int
    data_offset: int
    names_offset: int
    overall_flags: int       # 0 before version 3

    @property
    def node_size(self) -> int:
        return NODE_SIZE_V1 if self.version == 1 else NODE_SIZE_V2


@dataclass(frozen=True)
class RccEntry:
    """One file in an rcc: its resource path, how it is stored, and where."""

    path: str                # e.g. "gcompris/src/activities/foo/resource/a.jpg"
    flags: int
    territory: int
    language: int
    data_offset: int         # absolute offset of the 4-byte length of its data
    stored_size: int         # bytes stored (compressed size for compressed entries)
    last_modified_ms: int    # 0 in version 1, or when rcc did not know

    @property
    def compression(self) -> str:
        """'zlib', 'zstd' or 'none'."""
        if self.flags & FLAG_COMPRESSED:
            return "zlib"
        if self.flags & FLAG_COMPRESSED_ZSTD:
            return "zstd"
        return "none"


def qt_hash(name: str) -> int:
    """Qt's ``qt_hash`` over the UTF-16 code units of *name* (the names-section hash)."""
    h = 0
    units = name.encode("utf-16-be")
    for i in range(0, len(units), 2):
        h = (h << 4) + ((units[i] << 8) | units[i + 1])
        h ^= (h & 0xF0000000) >> 23
        h &= 0x0FFFFFFF
    return h


def _u16(buf: bytes, pos: int, what: str, source: str) -> int:
    _need(buf, pos, 2, what, source)
    return struct.unpack_from(">H", buf, pos)[0]


def _u32(buf: bytes, pos: int, what: str, source: str) -> int:
    _need(buf, pos, 4, what, source)
    return struct.unpack_from(">I", buf, pos)[0]


def _u64(buf: bytes, pos: int, what: str, source: str) -> int:
    _need(buf, pos, 8, what, source)
    return struct.unpack_from(">Q", buf, pos)[0]


def _need(buf: bytes, pos: int, size: int, what: str, source: str) -> None:
    if pos < 0 or pos + size > len(buf):
        raise ValueError(f"{source}: truncated rcc: {what} needs bytes {pos}..{pos + size} "
                         f"but the file has {len(buf)}")


def parse_header(buf: bytes, source: str = "<bytes>") -> RccHeader:
    """Read and check the header of the rcc held in *buf*."""
    if len(buf) < 4 or buf[:4] != MAGIC:
        raise ValueError(f"{source}: not a Qt rcc file (magic {bytes(buf[:4])!r}, want {MAGIC!r})")
    version = _u32(buf, 4, "header", source)
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"{source}: unsupported rcc format version {version} "
                         f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    tree, data, names = (_u32(buf, pos, "header", source) for pos in (8, 12, 16))
    flags = _u32(buf, 20, "header", source) if version >= 3 else 0
    for label, offset in (("tree", tree), ("data", data), ("names", names)):
        if offset >= len(buf):
            raise ValueError(f"{source}: truncated rcc: {label} section offset {offset} "
                             f"is past the end of the file ({len(buf)} bytes)")
    if flags & ~(FLAG_COMPRESSED | FLAG_COMPRESSED_ZSTD):
        raise ValueError(f"{source}: unknown overall flags {flags:#x} in rcc header")
    return RccHeader(version, tree, data, names, flags)


def _name(buf: bytes, header: RccHeader, name_offset: int, source: str) -> str:
    pos = header.names_offset + name_offset
    length = _u16(buf, pos, "name length", source)
    _need(buf, pos + 6, 2 * length, "name", source)
    return buf[pos + 6:pos + 6 + 2 * length].decode("utf-16-be", errors="replace")


def _walk(buf: bytes, header: RccHeader, source: str) -> Iterator[RccEntry]:
    """Yield every file node, depth first, with its full resource path."""
    n_nodes = (len(buf) - header.tree_offset) // header.node_size
    stack: list[tuple[int, str]] = [(0, "")]
    seen: set[int] = set()
    while stack:
        index, prefix = stack.pop()
        if index in seen:
            raise ValueError(f"{source}: corrupt rcc: tree node {index} is reached twice")
        seen.add(index)
        if index >= n_nodes:
            raise ValueError(f"{source}: truncated rcc: tree node {index} is past the end "
                             f"of the file ({n_nodes} nodes fit)")
        pos = header.tree_offset + index * header.node_size
        flags = _u16(buf, pos + 4, "tree node", source)
        if flags & ~KNOWN_FLAGS:
            raise ValueError(f"{source}: unknown flags {flags:#x} on tree node {index}")
        name = "" if index == 0 else _name(buf, header, _u32(buf, pos, "tree node", source), source)
        path = f"{prefix}/{name}" if prefix else name
        modified = _u64(buf, pos + 14, "tree node", source) if header.version >= 2 else 0
        if flags & FLAG_DIRECTORY:
            count = _u32(buf, pos + 6, "tree node", source)
            first = _u32(buf, pos + 10, "tree node", source)
            if first + count > n_nodes:
                raise ValueError(f"{source}: truncated rcc: folder {path or '/'!r} has children "
                                 f"{first}..{first + count - 1} but only {n_nodes} nodes fit")
            stack.extend((child, path) for child in reversed(range(first, first + count)))
        elif index == 0:
            raise ValueError(f"{source}: corrupt rcc: the root tree node is not a folder")
        else:
            data_pos = header.data_offset + _u32(buf, pos + 10, "tree node", source)
            size = _u32(buf, data_pos, f"data length of {path!r}", source)
            _need(buf, data_pos + 4, size, f"data of {path!r}", source)
            yield RccEntry(path=path, flags=flags,
                           territory=_u16(buf, pos + 6, "tree node", source),
                           language=_u16(buf, pos + 8, "tree node", source),
                           data_offset=data_pos, stored_size=size, last_modified_ms=modified)


def _load(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def list_entries_bytes(buf: bytes, source: str = "<bytes>") -> list[RccEntry]:
    """Every file in the rcc held in *buf*, sorted by path."""
    header = parse_header(buf, source)
    return sorted(_walk(buf, header, source), key=lambda e: (e.path, e.territory, e.language))


def list_entries(path: str | Path) -> list[RccEntry]:
    """Every file in the rcc file at *path*, sorted by resource path."""
    return list_entries_bytes(_load(path), str(path))


def _zstd_decompress(data: bytes) -> bytes:
    try:
        from compression import zstd  # type: ignore[import-not-found]  # Python >= 3.14
        return zstd.decompress(data)
    except ImportError:
        pass
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ValueError("zstd-compressed rcc entry, but neither compression.zstd nor "
                         "the zstandard package is available") from exc
    return zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 31)


def entry_bytes(buf: bytes, entry: RccEntry, source: str = "<bytes>") -> bytes:
    """The (decompressed) content of *entry* from the rcc held in *buf*."""
    start = entry.data_offset + 4
    stored = bytes(buf[start:start + entry.stored_size])
    if len(stored) != entry.stored_size:
        raise ValueError(f"{source}: truncated rcc: data of {entry.path!r} is cut short")
    if entry.flags & FLAG_COMPRESSED:
        if len(stored) < 4:
            raise ValueError(f"{source}: corrupt zlib entry {entry.path!r}: no size prefix")
        expected = struct.unpack_from(">I", stored, 0)[0]
        try:
            out = zlib.decompress(stored[4:])
        except zlib.error as exc:
            raise ValueError(f"{source}: corrupt zlib entry {entry.path!r}: {exc}") from exc
        if len(out) != expected:
            raise ValueError(f"{source}: zlib entry {entry.path!r} gives {len(out)} bytes, "
                             f"its size prefix says {expected}")
        return out
    if entry.flags & FLAG_COMPRESSED_ZSTD:
        try:
            return _zstd_decompress(stored)
        except ValueError as exc:
            raise ValueError(f"{source}: entry {entry.path!r}: {exc}") from exc
        except Exception as exc:  # zstandard.ZstdError and friends
            raise ValueError(f"{source}: corrupt zstd entry {entry.path!r}: {exc}") from exc
    return stored


def read_entry(path: str | Path, name: str) -> bytes:
    """The content of the file *name* (resource path, leading ``:/`` or ``/`` optional)."""
    buf = _load(path)
    wanted = name.removeprefix(":").lstrip("/")
    for entry in list_entries_bytes(buf, str(path)):
        if entry.path == wanted:
            return entry_bytes(buf, entry, str(path))
    raise KeyError(f"{path}: no file {wanted!r} in this rcc")


def _safe_target(out_dir: Path, resource_path: str, source: str) -> Path:
    parts = resource_path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{source}: refusing to extract unsafe resource path {resource_path!r}")
    return out_dir.joinpath(*parts)


def extract_all(path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write every file of the rcc at *path* under *out_dir*, keeping its resource
    path as folders; returns the files written.  Of several locale copies of one path
    the first (in `list_entries` order) wins."""
    buf = _load(path)
    out = Path(out_dir)
    written: list[Path] = []
    done: set[str] = set()
    for entry in list_entries_bytes(buf, str(path)):
        if entry.path in done:
            continue
        done.add(entry.path)
        target = _safe_target(out, entry.path, str(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(entry_bytes(buf, entry, str(path)))
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m mtl.data.rcc FILE.rcc [OUT_DIR]``: list, or extract into OUT_DIR."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m mtl.data.rcc FILE.rcc [OUT_DIR]", file=sys.stderr)
        return 2
    try:
        if len(args) == 2:
            print(f"{len(extract_all(args[0], args[1]))} files written to {args[1]}")
        else:
            for e in list_entries(args[0]):
                print(f"{e.stored_size:>10} {e.compression:<4} {e.path}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
