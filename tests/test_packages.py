"""The package table: reserved packages are refused, the default set is what it always
was, and what counts as one picture (icon sizes, sprite frames, clip-art variants)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from mtl.data import debian
from mtl.data.packages import (PACKAGES, PackageSource, glob_regex, icon_name, is_photo_source, is_reserved,
                               package_names, package_rows, photo_packages, picture_of, read_listing, sprite_name)


@pytest.mark.parametrize("package", ["tuxpaint-data", "tuxpaint-stamps-default", "stellarium", "stellarium-data",
                                     "python3-skimage", "python-skimage-doc", "python3-sklearn", "scikit-learn-data"])
def test_reserved_packages_are_refused_everywhere(package, tmp_path):
    assert is_reserved(package)
    with pytest.raises(ValueError, match="reserved"):
        PackageSource(package, "scene", ("**/*",), "file", "test")
    with pytest.raises(ValueError, match="reserved"):
        debian.fetch_packages([package], tmp_path)
    assert not any(is_reserved(row.package) for row in PACKAGES)


def test_default_package_set_is_the_first_corpus_plus_the_most_photographs_per_mb():
    first = ["plasma-workspace-wallpapers", "mate-backgrounds", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04",
             "ukui-wallpapers", "gnome-backgrounds", "openclipart-png"]
    photographs = ["endless-sky-data", "gcompris-qt-data", "scribus-template", "palapeli-data"]
    assert package_names("default") == first + photographs
    rows = {row.package: row for row in package_rows("default")}
    assert all(rows[p].tiled and rows[p].class_name == "scene" and rows[p].grouping == "wallpaper"
               for p in first[:-1])
    clipart = rows["openclipart-png"]
    assert (clipart.class_name, clipart.grouping, clipart.pick, clipart.tiled) == ("clipart", "family", "seeded", False)
    assert all(rows[p].photo and rows[p].class_name == "scene" and not rows[p].tiled for p in photographs)
    assert set(package_names("default")) < set(package_names("full"))
    assert photo_packages() >= set(photographs) and not photo_packages() & set(first)


def test_every_listing_names_its_files_and_pictures():
    for row in PACKAGES:
        if row.listing is None:
            continue
        listed = read_listing(row.listing)
        assert listed and all(path and picture for path, picture in listed.items()), row.package
        assert not any(path.startswith("/") or ".." in Path(path).parts for path in listed), row.package
    photos = sum(len(set(read_listing(r.listing).values())) for r in PACKAGES if r.photo)
    assert photos >= 600  # distinct photographs across the archive (mtl/data/photos/)


def test_a_package_is_all_photographs_or_none():
    mixed = (PackageSource("p", "scene", (), "listed", "photos of things", listing="x.txt", photo=True),
             PackageSource("p", "scene", ("**/*",), "file", "paintings of things"))
    with pytest.raises(ValueError, match="one or the other"):
        photo_packages(mixed)
    with pytest.raises(ValueError, match="not tiled"):
        PackageSource("p", "scene", ("**/*",), "file", "photos of things", tiled=True, photo=True)
    with pytest.raises(ValueError, match="go together"):
        PackageSource("p", "scene", ("**/*",), "listed", "photos of things")
    assert is_photo_source("debian:endless-sky-data") and not is_photo_source("debian:openclipart-png")
    assert not is_photo_source("folder")


def test_listed_files_come_from_the_package_and_from_inside_qt_resource_files(tmp_path, monkeypatch):
    from mtl.data import packages

    fixtures = Path(__file__).parent / "data" / "rcc"
    root = tmp_path / "pkg"
    (root / "usr/share/app/rcc").mkdir(parents=True)
    (root / "usr/share/app/rcc/tiny.rcc").write_bytes((fixtures / "tiny.rcc").read_bytes())
    (root / "usr/share/app/photo.jpg").write_bytes(b"jpeg bytes")
    listings = tmp_path / "listings"
    listings.mkdir()
    (listings / "pkg.txt").write_text("# a note\nusr/share/app/photo.jpg\tphoto\n"
                                      "usr/share/app/rcc/tiny.rcc:/app/images/noise.bin\tnoise\n"
                                      "usr/share/app/gone.jpg\tgone\n")
    monkeypatch.setattr(packages, "LISTINGS", listings)
    packages.read_listing.cache_clear()
    try:
        row = PackageSource("pkg", "scene", (), "listed", "test photographs", listing="pkg.txt", photo=True)
        skipped = Counter()
        files = debian.listed_files(row, root, skipped)
        extracted = root / "usr/share/app/rcc/tiny.rcc.d/app/images/noise.bin"
        assert files == {extracted: "noise", root / "usr/share/app/photo.jpg": "photo"}
        assert extracted.read_bytes() == (fixtures / "tiny_src/images/noise.bin").read_bytes()
        assert skipped == {"listed_missing": 1}
        (listings / "bad.txt").write_text("usr/share/app/photo.jpg photo\n")
        with pytest.raises(ValueError, match="bad.txt:1: expected"):
            read_listing("bad.txt")
    finally:
        packages.read_listing.cache_clear()


def test_every_row_states_its_class_and_reason():
    for row in PACKAGES:
        assert row.class_name in {"scene", "clipart"} and len(row.reason) > 10, row


def test_globs_stay_within_a_folder_unless_double_starred():
    assert glob_regex("**/*.png").match("a.png") and glob_regex("**/*.png").match("a/b/c.png")
    assert glob_regex("units/*.png").match("units/x.png") and not glob_regex("units/*.png").match("units/a/x.png")
    assert glob_regex("units/**/*.png").match("units/a/b/x.png")
    icons = package_rows("full")[[r.package for r in package_rows("full")].index("oxygen-icon-theme")]
    assert icons.matches("64x64/apps/konqueror.png")
    assert not icons.matches("64x64/status/network-symbolic.png") and not icons.matches("symbolic/apps/a.png")


@pytest.mark.parametrize("paths", [
    ["16x16/apps/firefox.png", "64x64/apps/firefox.png", "256x256/apps/firefox.png", "256x256@2x/apps/firefox.png"],
    ["apps/48/gimp.png", "apps/96/gimp.png", "apps/scalable/gimp.png"],
])
def test_every_size_of_an_icon_is_one_picture(paths):
    assert len({picture_of("icon", Path(p))[1] for p in paths}) == 1
    assert icon_name(Path("64x64/apps/firefox.png")) != icon_name(Path("64x64/apps/thunderbird.png"))


def test_every_frame_of_a_sprite_is_one_picture():
    frames = ["units/human-loyalists/spearman.png", "units/human-loyalists/spearman-attack-1.png",
              "units/human-loyalists/spearman-ne-defend-2.png", "units/human-loyalists/spearman_moving.png"]
    assert {sprite_name(Path(f)) for f in frames} == {"units/human-loyalists/spearman"}
    assert sprite_name(Path("units/human-loyalists/bowman-attack-1.png")) != sprite_name(Path(frames[0]))
    assert sprite_name(Path("units/undead/spearman.png")) != sprite_name(Path(frames[0]))  # another folder
    assert picture_of("folder", Path("droids/123/portrait_0001.jpg"))[1] == picture_of(
        "folder", Path("droids/123/portrait_0007.jpg"))[1]
    assert picture_of("family", Path("shapes/jigsaw_red_05.png"))[1] == "jigsaw_red"


def _png(path: Path, side: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), (side % 255, 40, 90)).save(path)


def test_one_file_per_group_the_largest_icon_or_a_seeded_frame(tmp_path):
    theme = tmp_path / "usr/share/icons/T"
    for size in (32, 64, 128):
        _png(theme / f"{size}x{size}/apps/editor.png", size)
    _png(theme / "64x64/apps/viewer.png", 64)
    _png(theme / "64x64/status/viewer-symbolic.png", 64)
    (theme / "128x128/apps/editor-alias.png").symlink_to(theme / "128x128/apps/editor.png")
    row = PackageSource("some-icon-theme", "clipart", ("**/*.png",), "icon", "test rows need a reason",
                        root="usr/share/icons/T", pick="largest", exclude=("**/*symbolic*",))
    skipped = Counter()
    items = debian.whole_sources(row, tmp_path, seed=0, skipped=skipped)
    assert {(item.group, item.path.parent.parent.name) for item in items} == {
        ("some-icon-theme:editor", "128x128"), ("some-icon-theme:viewer", "64x64")}
    assert skipped == {"other_version": 2, "symlink": 1}
    assert all(item.image_id.startswith("clipart-some-icon-theme-") for item in items)

    sprites = tmp_path / "sprites"
    for frame in ("hero", "hero-attack-1", "hero-attack-2", "ghost-1"):
        _png(sprites / "units" / f"{frame}.png", 72)
    row = PackageSource("some-game-data", "clipart", ("units/*.png",), "sprite", "test rows need a reason",
                        root="sprites")
    picks = [debian.whole_sources(row, tmp_path, seed=s, skipped=Counter()) for s in (0, 0, 1, 2, 3)]
    assert [sorted(i.group for i in p) for p in picks][0] == ["some-game-data:units/ghost", "some-game-data:units/hero"]
    assert picks[0] == picks[1]  # seeded
    assert len({next(i.path.name for i in p if i.group.endswith("hero")) for p in picks}) > 1


def test_svg_icons_are_rendered_where_a_row_says_so(tmp_path):
    from mtl.data.decode import process_source
    from tests.configs import corpus_config

    if debian.shutil.which("rsvg-convert") is None:
        pytest.skip("needs rsvg-convert (Debian librsvg2-bin)")
    theme = tmp_path / "usr/share/icons/S/64x64/apps"
    theme.mkdir(parents=True)
    (theme / "globe.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
                                     '<circle cx="32" cy="32" r="28" fill="#2a7"/><rect x="20" y="20" width="24" '
                                     'height="10" fill="#c33"/></svg>')
    (theme / "globe-symbolic.svg").write_text((theme / "globe.svg").read_text())
    vector = next(r for r in PACKAGES if r.package == "papirus-icon-theme")
    row = PackageSource("svg-theme", "clipart", vector.globs, "icon", "test rows need a reason",
                        root="usr/share/icons/S", pick="largest", exclude=vector.exclude, vector=True)
    skipped = Counter()
    (item,) = debian.whole_sources(row, tmp_path, seed=0, skipped=skipped)
    assert item.path.name == "globe.svg" and not skipped
    stored, reasons = process_source(item, corpus_config(corpus_dir=str(tmp_path / "corpus")))
    assert not reasons and (stored[0].width, stored[0].height) == (256, 256)
    skipped = Counter()
    assert debian.whole_sources(replace(row, vector=False), tmp_path, 0, skipped) == []
    assert skipped == {"vector_image": 1}
