"""Tests of the Qt rcc reader against tiny fixtures made by Qt's own ``rcc`` tool
(qt6-base-dev-tools 6.4.2, ``rcc --binary``; source: tiny_src/tiny.qrc) and against
files built here byte by byte."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from mtl.data import rcc

HERE = Path(__file__).parent / "data" / "rcc"
SRC = HERE / "tiny_src"
TINY = HERE / "tiny.rcc"            # format 3, zlib      (rcc --compress-algo zlib)
TINY_V1 = HERE / "tiny_v1.rcc"      # format 1, zlib      (--format-version 1)
TINY_V2 = HERE / "tiny_v2.rcc"      # format 2, zlib      (--format-version 2)
TINY_ZSTD = HERE / "tiny_zstd.rcc"  # format 3, zstd      (--compress-algo zstd)

PATHS = ["app/hello.txt", "app/hello.txt", "app/images/deep/note.txt", "app/images/noise.bin"]
C_LANGUAGE, FRENCH = 1, 85          # QLocale::C, QLocale::French (Qt 6 numbering)


def have_zstd() -> bool:
    try:
        rcc._zstd_decompress(b"")
    except ValueError:
        return False
    except Exception:
        return True                 # a decoder exists (b"" is simply not a frame)
    return True


# --- a minimal writer, independent of Qt, for cases Qt's tool will not make --------

def build_rcc(files: dict[str, tuple[bytes, int]], version: int = 3) -> bytes:
    """An rcc holding *files* {path: (stored bytes, flags)}; paths use '/'; children
    are laid out in name order (the reader must not rely on hash order)."""
    tree: dict = {}
    for path, value in files.items():
        node = tree
        *dirs, leaf = path.split("/")
        for d in dirs:
            node = node.setdefault(d, {})
        node[leaf] = value
    data, names, nodes = bytearray(), bytearray(), []
    name_at: dict[str, int] = {}

    def name_offset(name: str) -> int:
        if name not in name_at:
            name_at[name] = len(names)
            units = name.encode("utf-16-be")
            names.extend(struct.pack(">HI", len(units) // 2, rcc.qt_hash(name)) + units)
        return name_at[name]

    nodes.append(None)              # root, filled below
    queue = [(0, "", tree)]
    while queue:
        index, name, children = queue.pop(0)
        first = len(nodes)
        items = sorted(children.items())
        nodes.extend([None] * len(items))
        nodes[index] = ("dir", name, len(items), first)
        for i, (child, value) in enumerate(items):
            if isinstance(value, dict):
                queue.append((first + i, child, value))
            else:
                stored, flags = value
                nodes[first + i] = ("file", child, flags, len(data))
                data.extend(struct.pack(">I", len(stored)) + stored)
    tree_bytes = bytearray()
    for kind, name, a, b in nodes:
        noff = name_offset(name) if name else 0
        if kind == "dir":
            tree_bytes += struct.pack(">IHII", noff, rcc.FLAG_DIRECTORY, a, b)
        else:
            tree_bytes += struct.pack(">IHHHI", noff, a, 0, C_LANGUAGE, b)
        if version >= 2:
            tree_bytes += struct.pack(">Q", 0)
    header_size = 24 if version >= 3 else 20
    data_off = header_size
    names_off = data_off + len(data)
    tree_off = names_off + len(names)
    header = b"qres" + struct.pack(">IIII", version, tree_off, data_off, names_off)
    if version >= 3:
        header += struct.pack(">I", 0)
    return header + bytes(data) + bytes(names) + bytes(tree_bytes)


def qcompress(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + zlib.compress(raw)


# --- listing -----------------------------------------------------------------------

@pytest.mark.parametrize("fixture, version", [(TINY_V1, 1), (TINY_V2, 2), (TINY, 3), (TINY_ZSTD, 3)])
def test_header_and_listing_every_version(fixture: Path, version: int) -> None:
    buf = fixture.read_bytes()
    assert len(buf) < 1000
    header = rcc.parse_header(buf, str(fixture))
    assert header.version == version
    assert header.node_size == (14 if version == 1 else 22)
    entries = rcc.list_entries(fixture)
    assert [e.path for e in entries] == PATHS


def test_compression_flags_and_overall_flags() -> None:
    kinds = {e.path: e.compression for e in rcc.list_entries(TINY)}
    assert kinds["app/hello.txt"] == "zlib"
    assert kinds["app/images/noise.bin"] == "none"   # incompressible: stored as is
    assert rcc.parse_header(TINY.read_bytes()).overall_flags == rcc.FLAG_COMPRESSED
    assert rcc.parse_header(TINY_ZSTD.read_bytes()).overall_flags == rcc.FLAG_COMPRESSED_ZSTD
    assert rcc.parse_header(TINY_V2.read_bytes()).overall_flags == 0   # no field before v3
    assert {e.compression for e in rcc.list_entries(TINY_ZSTD)} == {"zstd", "none"}


def test_locales_and_timestamps() -> None:
    entries = rcc.list_entries(TINY)
    hello = [e for e in entries if e.path == "app/hello.txt"]
    assert [e.language for e in hello] == [C_LANGUAGE, FRENCH]
    assert all(e.last_modified_ms == 1_700_000_000_000 for e in entries)   # SOURCE_DATE_EPOCH
    assert all(e.last_modified_ms == 0 for e in rcc.list_entries(TINY_V1))


def test_name_hashes_match_qt_hash() -> None:
    buf = TINY.read_bytes()
    header = rcc.parse_header(buf)
    pos, seen = header.names_offset, 0
    while pos < header.tree_offset:
        length, stored_hash = struct.unpack_from(">HI", buf, pos)
        name = buf[pos + 6:pos + 6 + 2 * length].decode("utf-16-be")
        assert rcc.qt_hash(name) == stored_hash, name
        pos += 6 + 2 * length
        seen += 1
    assert seen == 6   # app, hello.txt, images, noise.bin, deep, note.txt


# --- extraction --------------------------------------------------------------------

@pytest.mark.parametrize("fixture", [TINY_V1, TINY_V2, TINY])
def test_read_compressed_and_uncompressed(fixture: Path) -> None:
    assert rcc.read_entry(fixture, "app/hello.txt") == (SRC / "hello.txt").read_bytes()
    assert rcc.read_entry(fixture, ":/app/images/noise.bin") == (SRC / "images/noise.bin").read_bytes()
    assert rcc.read_entry(fixture, "/app/images/deep/note.txt") == (SRC / "images/deep/note.txt").read_bytes()


def test_extract_all_keeps_folders_and_prefers_neutral_locale(tmp_path: Path) -> None:
    written = rcc.extract_all(TINY, tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == sorted(set(PATHS))
    assert (tmp_path / "app/hello.txt").read_bytes() == (SRC / "hello.txt").read_bytes()
    assert (tmp_path / "app/images/deep/note.txt").read_bytes() == (SRC / "images/deep/note.txt").read_bytes()
    assert (tmp_path / "app/images/noise.bin").read_bytes() == (SRC / "images/noise.bin").read_bytes()


def test_zstd_entries() -> None:
    if have_zstd():
        assert rcc.read_entry(TINY_ZSTD, "app/hello.txt") == (SRC / "hello.txt").read_bytes()
    else:
        with pytest.raises(ValueError, match="zstd"):
            rcc.read_entry(TINY_ZSTD, "app/hello.txt")
    # the stored (uncompressed) entry reads either way
    assert rcc.read_entry(TINY_ZSTD, "app/images/noise.bin") == (SRC / "images/noise.bin").read_bytes()


@pytest.mark.parametrize("version", [1, 2, 3])
def test_hand_built_file(tmp_path: Path, version: int) -> None:
    raw = b"abc" * 50
    path = tmp_path / "hand.rcc"
    path.write_bytes(build_rcc({"a/b/c/z.txt": (qcompress(raw), rcc.FLAG_COMPRESSED),
                                "a/plain.bin": (b"\x00\x01", 0), "top.txt": (b"", 0)}, version))
    assert [e.path for e in rcc.list_entries(path)] == ["a/b/c/z.txt", "a/plain.bin", "top.txt"]
    assert rcc.read_entry(path, "a/b/c/z.txt") == raw
    assert rcc.read_entry(path, "top.txt") == b""


def test_missing_entry_is_key_error() -> None:
    with pytest.raises(KeyError, match="nope"):
        rcc.read_entry(TINY, "app/nope.txt")


# --- errors ------------------------------------------------------------------------

def test_not_an_rcc(tmp_path: Path) -> None:
    bad = tmp_path / "image.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    with pytest.raises(ValueError, match=r"image\.png: not a Qt rcc file"):
        rcc.list_entries(bad)
    empty = tmp_path / "empty.rcc"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.rcc: not a Qt rcc file"):
        rcc.list_entries(empty)
    with pytest.raises(ValueError, match=r"missing\.rcc: cannot read"):
        rcc.list_entries(tmp_path / "missing.rcc")


def test_every_truncation_is_a_value_error(tmp_path: Path) -> None:
    buf = TINY.read_bytes()
    cut = tmp_path / "cut.rcc"
    for n in range(len(buf)):
        cut.write_bytes(buf[:n])
        with pytest.raises(ValueError, match=r"cut\.rcc: (not a Qt rcc|truncated)"):
            rcc.extract_all(cut, tmp_path / "out")


def test_unsupported_version_and_flags(tmp_path: Path) -> None:
    buf = bytearray(TINY.read_bytes())
    path = tmp_path / "v4.rcc"
    path.write_bytes(bytes(buf[:4]) + struct.pack(">I", 4) + bytes(buf[8:]))
    with pytest.raises(ValueError, match=r"v4\.rcc: unsupported rcc format version 4"):
        rcc.list_entries(path)
    path.write_bytes(bytes(buf[:20]) + struct.pack(">I", 0x80) + bytes(buf[24:]))
    with pytest.raises(ValueError, match="unknown overall flags"):
        rcc.list_entries(path)
    path.write_bytes(build_rcc({"x": (b"1", 0x40)}))
    with pytest.raises(ValueError, match="unknown flags 0x40"):
        rcc.list_entries(path)


def test_corrupt_zlib(tmp_path: Path) -> None:
    path = tmp_path / "bad.rcc"
    path.write_bytes(build_rcc({"x.txt": (struct.pack(">I", 10) + b"not zlib", rcc.FLAG_COMPRESSED)}))
    with pytest.raises(ValueError, match=r"bad\.rcc: corrupt zlib entry 'x.txt'"):
        rcc.read_entry(path, "x.txt")
    path.write_bytes(build_rcc({"x.txt": (qcompress(b"12345")[:4] + zlib.compress(b"1234"), rcc.FLAG_COMPRESSED)}))
    with pytest.raises(ValueError, match="size prefix says 5"):
        rcc.read_entry(path, "x.txt")


def test_unsafe_paths_are_not_extracted(tmp_path: Path) -> None:
    path = tmp_path / "evil.rcc"
    path.write_bytes(build_rcc({"../escape.txt": (b"x", 0)}))
    assert [e.path for e in rcc.list_entries(path)] == ["../escape.txt"]
    with pytest.raises(ValueError, match="unsafe resource path"):
        rcc.extract_all(path, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_cycle_in_tree_is_an_error(tmp_path: Path) -> None:
    buf = bytearray(build_rcc({"d/x": (b"1", 0)}))
    header = rcc.parse_header(bytes(buf))
    # node 1 is folder "d" with first child 2: point it back at node 1 (itself)
    struct.pack_into(">I", buf, header.tree_offset + header.node_size + 10, 1)
    path = tmp_path / "loop.rcc"
    path.write_bytes(bytes(buf))
    with pytest.raises(ValueError, match="reached twice"):
        rcc.list_entries(path)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert rcc.main([str(TINY)]) == 0
    assert "zlib app/images/deep/note.txt" in capsys.readouterr().out
    assert rcc.main([str(TINY), str(tmp_path)]) == 0
    assert (tmp_path / "app/hello.txt").exists()
    assert rcc.main([str(tmp_path / "app/hello.txt")]) == 1
    assert "not a Qt rcc" in capsys.readouterr().err
