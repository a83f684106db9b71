"""The corpus: clean ground truth (no duplicates, no group in two splits), bad
files counted by reason, and the real default corpus from the Debian packages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import imagehash
import numpy as np
import pytest
import yaml
from PIL import Image

from mtl.data import corpus, debian, decode
from mtl.data.corpus import CorpusConfig, build_corpus
from mtl.data.corpus_report import read_report
from mtl.data.decode import content_share, tile_content
from mtl.data.manifest import MANIFEST_COLUMNS, CorpusImage, read_manifest
from mtl.data.packages import PACKAGES, PackageSource, clipart_family, scene_picture
from mtl.data.splits import SPLITS, assign_splits, drop_duplicates, near_duplicate_pairs
from tests import configs

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# helpers


def _stored_phashes(corpus_dir: Path, rows: list[dict]) -> np.ndarray:
    with_hashes = []
    for row in rows:
        with Image.open(corpus_dir / row["path"]) as im:
            with_hashes.append(int(str(imagehash.phash(im.convert("RGB"))), 16))
    return np.array(with_hashes, dtype=np.uint64)


def assert_corpus_invariants(corpus_dir: Path, radius: int) -> list[dict]:
    """What every corpus promises; returns the manifest rows."""
    manifest = corpus_dir / "manifest.csv"
    assert manifest.read_text().splitlines()[0].split(",") == list(MANIFEST_COLUMNS)
    rows = read_manifest(manifest)
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["hash"] for r in rows}) == len(rows), "exact duplicates left in the corpus"
    splits_of_group = defaultdict(set)
    for row in rows:
        splits_of_group[row["group"]].add(row["split"])
        assert row["split"] in SPLITS
        with Image.open(corpus_dir / row["path"]) as im:
            assert im.mode == "RGB" and im.size == (int(row["width"]), int(row["height"]))
    assert all(len(s) == 1 for s in splits_of_group.values()), "a group lies in two splits"
    # Hashes of the stored JPEGs: encoding moves a hash by a bit or two at most,
    # so the stored images must still be further apart than the radius minus 2.
    close = near_duplicate_pairs(_stored_phashes(corpus_dir, rows), max(radius - 2, 0))
    assert len(close) == 0, [(rows[i]["id"], rows[j]["id"]) for i, j in close[:5]]
    return rows


def _image(image_id: str, phash: int, group: str, pixels: str = "", class_name: str = "a") -> CorpusImage:
    return CorpusImage(image_id, class_name, "test", group, f"images/{image_id}.jpg", pixels or image_id, phash, 8, 8)


# ---------------------------------------------------------------------------
# pure parts


def test_near_duplicate_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=40, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, size=(40, 3)).astype(np.uint64)
    hashes = np.concatenate([base, base ^ flips[:, 0] ^ flips[:, 1] ^ flips[:, 2]])  # <= 3 bits away
    found = {tuple(p) for p in near_duplicate_pairs(hashes, radius=4, block=7).tolist()}
    brute = {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
             if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 4}
    assert found == brute and len(found) >= 40


def test_drop_duplicates_leaves_no_pair_within_radius():
    images = [_image("a", 0b0, "g1"), _image("a_copy", 0b0, "g2", pixels="a"),   # exact
              _image("b", 0b111, "g1"),                                             # 3 bits from a
              _image("c", (1 << 40) - 1, "g3"), _image("d", 0xFFFF_FFFF_0000_0000, "g4")]
    result = drop_duplicates(images, radius=4, seed=0)
    assert len(result.exact) == 1 and len(result.near) == 1 and len(result.kept) == 3
    kept = np.array([im.phash for im in result.kept], dtype=np.uint64)
    assert len(near_duplicate_pairs(kept, 4)) == 0
    assert {im.image_id for im in result.kept} >= {"c", "d"}


def test_splits_keep_groups_together_and_meet_the_fractions():
    rng = np.random.default_rng(1)
    images = [_image(f"g{g}-{k}", 0, f"g{g}", class_name="scene" if g < 80 else "clipart")
              for g in range(400) for k in range(int(rng.integers(1, 25)))]
    fractions = {"train": 0.6, "val": 0.1, "test": 0.3}
    split_of = assign_splits(images, fractions, seed=0)
    assert set(split_of) == {im.group for im in images}
    for class_name in ("scene", "clipart"):
        members = [im for im in images if im.class_name == class_name]
        shares = Counter(split_of[im.group] for im in members)
        largest_group = max(Counter(im.group for im in members).values())
        for split, fraction in fractions.items():
            assert abs(shares[split] - fraction * len(members)) <= largest_group
    assert assign_splits(images, fractions, seed=0) == split_of
    assert assign_splits(images, fractions, seed=1) != split_of


@pytest.mark.parametrize("path, picture, group", [
    ("usr/share/wallpapers/Flow/contents/images/5120x2880.jpg", "Flow", "flow"),
    ("usr/share/wallpapers/Flow/contents/images_dark/720x1440.jpg", "Flow-dark", "flow"),
    ("usr/share/wallpapers/Flow/contents/screenshot.png", "Flow", "flow"),
    ("usr/share/backgrounds/mate/abstract/Elephants_5640x3172.jpg", "Elephants", "elephants"),
    ("usr/share/backgrounds/mate/abstract/Elephants.jpg", "Elephants", "elephants"),
    ("usr/share/backgrounds/gnome/adwaita-d.webp", "adwaita-d", "adwaita"),
    ("usr/share/backgrounds/Fossa_by_Jasper_Roks.jpg", "Fossa_by_Jasper_Roks", "fossa_by_jasper_roks"),
])
def test_every_size_of_a_wallpaper_is_one_picture(path, picture, group):
    assert scene_picture(Path(path)) == (picture, group)


def test_one_wallpaper_file_per_picture_the_largest(tmp_path, small_real_photos):
    photo = small_real_photos["flower"]
    kde = tmp_path / "plasma" / "usr/share/wallpapers/Flow/contents"
    files = {kde / "images/1280x800.jpg": (128, 80), kde / "images/2560x1600.jpg": (256, 160),
             kde / "images_dark/2560x1600.jpg": (250, 160), kde / "screenshot.jpg": (40, 25),
             tmp_path / "gnome/adwaita-l.webp": (100, 100), tmp_path / "gnome/adwaita-d.webp": (100, 100)}
    for path, size in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        photo.resize(size).save(path)
    (tmp_path / "gnome/blobs-l.svg").write_text("<svg/>")
    (kde / "images/1920x1200.jpg").symlink_to(kde / "images/1280x800.jpg")
    skipped = Counter()
    rows = [PackageSource(name, "scene", ("**/*",), "wallpaper", "test", tiled=True, id_prefix="")
            for name in ("plasma", "gnome")]
    items = debian.tiled_sources(rows, {"plasma": tmp_path / "plasma", "gnome": tmp_path / "gnome"}, skipped)
    assert {(item.group, item.path) for item in items} == {
        ("flow", kde / "images/2560x1600.jpg"), ("adwaita", tmp_path / "gnome/adwaita-d.webp")}
    assert skipped == {"other_version": 4, "symlink": 1, "vector_image": 1}


def test_numbered_clipart_variants_are_one_family():
    assert clipart_family("jigsaw_red_05") == clipart_family("jigsaw_red_11") == "jigsaw_red"
    assert clipart_family("star_66pt07step") == clipart_family("star_5pt2step")
    assert clipart_family("tangram_erwan_02") != clipart_family("jigsaw_red_05")
    assert clipart_family("2009") == "2009"


def test_one_clipart_file_per_family(tmp_path, small_real_photos):
    for name in ("jigsaw_red_01", "jigsaw_red_02", "jigsaw_red_03", "tangram_01"):
        (tmp_path / "shapes").mkdir(exist_ok=True)
        small_real_photos["coffee"].save(tmp_path / "shapes" / f"{name}.png")
    (tmp_path / "shapes" / "link_01.png").symlink_to(tmp_path / "shapes" / "tangram_01.png")
    skipped = Counter()
    openclipart = next(row for row in PACKAGES if row.package == "openclipart-png")
    items = debian.whole_sources(replace(openclipart, root=""), tmp_path, seed=0, skipped=skipped)
    assert sorted(item.group for item in items) == ["jigsaw_red", "tangram"]
    assert skipped == {"family_variant": 2, "symlink": 1}


def test_tile_content_rejects_flat_and_smooth_tiles(small_real_photos):
    flat = Image.new("RGB", (96, 96), (90, 120, 200))
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (96, 1))).convert("RGB")
    photo = small_real_photos["chelsea"].crop((0, 0, 96, 96))
    std_flat, edges_flat = tile_content(flat)
    std_ramp, edges_ramp = tile_content(ramp)
    std_photo, edges_photo = tile_content(photo)
    cfg = configs.corpus_config()
    assert std_flat < cfg.min_tile_std
    assert std_ramp > cfg.min_tile_std and edges_ramp < cfg.min_tile_edges  # a gradient: no content
    assert std_photo > cfg.min_tile_std and edges_photo > cfg.min_tile_edges


def _on_canvas(picture: Image.Image, canvas: tuple[int, int], colour=(255, 255, 255)) -> Image.Image:
    page = Image.new("RGB", canvas, colour)
    page.paste(picture, ((canvas[0] - picture.width) // 2, (canvas[1] - picture.height) // 2))
    return page


def test_content_share_measures_what_differs_from_the_background(small_real_photos):
    photo = small_real_photos["chelsea"]
    assert content_share(Image.new("RGB", (200, 200), "white")) == 0.0
    assert content_share(photo) > 0.5
    tiny = _on_canvas(photo.resize((20, 14)), (300, 300))          # a small drawing on a big page
    assert content_share(tiny) < configs.corpus_config().min_content_share
    drawing = _on_canvas(photo.resize((90, 60)), (300, 300))       # a drawing that fills some of it
    assert content_share(drawing) > configs.corpus_config().min_content_share
    # The background is the border's colour, not white: a flag's field is not content.
    flag = _on_canvas(Image.new("RGB", (40, 40), (255, 220, 0)), (300, 200), colour=(200, 20, 30))
    assert abs(content_share(flag) - 40 * 40 / (300 * 200)) < 0.005


def test_near_blank_canvases_are_rejected_counted_and_shown(tmp_path, small_real_photos):
    folder = tmp_path / "photos"
    for class_name in ("photo", "drawing"):
        (folder / class_name).mkdir(parents=True)
    for name in ("chelsea", "coffee", "rocket"):
        small_real_photos[name].save(folder / "photo" / f"{name}.png")
    astronaut = small_real_photos["astronaut"]
    _on_canvas(astronaut.resize((120, 120)), (300, 300)).save(folder / "drawing" / "large.png")
    _on_canvas(astronaut.resize((18, 18)), (300, 300)).save(folder / "drawing" / "speck.png")
    _on_canvas(Image.new("RGB", (60, 60), (255, 220, 0)), (300, 200), (200, 20, 30)).save(folder / "drawing" / "flag.png")
    _on_canvas(Image.new("RGB", (8, 8), (255, 220, 0)), (300, 200), (200, 20, 30)).save(folder / "drawing" / "dot.png")
    report = build_corpus(_folder_config(folder, tmp_path / "corpus"))
    ids = {r["id"] for r in read_manifest(tmp_path / "corpus" / "manifest.csv")}
    assert report["rejections"]["near_blank"] == 2
    assert {"drawing-large", "drawing-flag"} <= ids and not {"drawing-speck", "drawing-dot"} & ids
    rejected = tmp_path / "corpus" / decode.REJECTED_DIR
    assert sorted(p.stem for p in rejected.glob("*.jpg")) == ["drawing-dot", "drawing-speck"]
    sheet = Image.open(tmp_path / "corpus" / report["near_blank_sheet"])
    assert sheet.width > 2 * decode.REJECTED_THUMB  # the contact sheet shows them


def test_wallpapers_are_cut_into_capped_square_tiles(tmp_path, real_photos):
    wallpaper = real_photos["china"].resize((1280, 854))
    wallpaper.save(tmp_path / "china.jpg", quality=95)
    item = decode.SourceImage(tmp_path / "china.jpg", "scene", "test", "china", "scene-china", tiled=True)
    cfg = configs.corpus_config(corpus_dir=str(tmp_path / "out"), tile_size=256, max_side=128,
                                max_tiles_per_picture=5, min_tile_std=0, min_tile_edges=0)
    stored, skipped = decode.process_source(item, cfg)
    assert len(stored) == 5 and skipped["over_tile_cap"] == 5 * 3 - 5
    assert all((im.width, im.height) == (128, 128) and im.group == "china" for im in stored)
    assert len({im.image_id for im in stored}) == 5
    again, _ = decode.process_source(item, cfg)
    assert [im.image_id for im in again] == [im.image_id for im in stored]  # seeded choice


def test_files_are_chosen_before_decoding_to_fill_the_class_cap():
    pictures = [decode.SourceImage(Path(f"p{i}.jpg"), "scene", "t", f"p{i}", f"scene-p{i}", tiled=True)
                for i in range(10)]
    drawings = [decode.SourceImage(Path(f"d{i}.png"), "clipart", "t", f"d{i}", f"clipart-d{i}", tiled=False)
                for i in range(20)]
    cfg = configs.corpus_config(max_per_class=8, max_tiles_per_picture=4)
    skipped = Counter()
    chosen = corpus.subsample_before_decoding(pictures + drawings, cfg, skipped)
    per_class = Counter(item.class_name for item in chosen)
    assert per_class == {"scene": 3, "clipart": 12}  # 1.5 x 8 tiles / 4 per picture; 1.5 x 8 files
    assert skipped["not_decoded_over_cap"] == 7 + 8
    assert corpus.subsample_before_decoding(pictures + drawings, cfg, Counter()) == chosen


def test_config_rejects_unknown_keys_and_bad_fractions():
    with pytest.raises(ValueError, match="unknown key"):
        configs.corpus_config(max_sied=10)
    with pytest.raises(ValueError, match="lacks max_side"):
        CorpusConfig.from_params({k: v for k, v in configs.study_params()["data"].items() if k != "max_side"})
    with pytest.raises(ValueError, match="sum to 1"):
        configs.corpus_config(split_fractions={"train": 0.5, "val": 0.1, "test": 0.1})
    with pytest.raises(ValueError, match="data.folder"):
        configs.corpus_config(source="folder")


def test_missing_package_lists_say_how_to_fix_them(tmp_path, monkeypatch):
    def apt_without_lists(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package openclipart-png\n")

    monkeypatch.setattr(debian.shutil, "which", lambda name: "/usr/bin/apt-get")
    monkeypatch.setattr(debian.subprocess, "run", apt_without_lists)
    with pytest.raises(RuntimeError, match=r"sudo apt-get update"):
        debian.fetch_packages(["openclipart-png"], tmp_path)


# ---------------------------------------------------------------------------
# a folder-source build of small real photos


@pytest.fixture()
def photo_folder(tmp_path, small_real_photos, awkward_images) -> Path:
    """Two classes of real photos, plus an exact copy, two near copies and bad files."""
    root = tmp_path / "photos"
    (root / "colour").mkdir(parents=True)
    (root / "mixed").mkdir()
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        small_real_photos[name].save(root / "colour" / f"{name}.png")
    for name in ("camera", "china", "flower"):
        small_real_photos[name].save(root / "mixed" / f"{name}.png")
    shutil.copy(root / "colour" / "chelsea.png", root / "mixed" / "chelsea_again.png")    # exact duplicate
    rocket = small_real_photos["rocket"]
    rocket.resize((rocket.width * 3 // 4, rocket.height * 3 // 4)).save(root / "mixed" / "rocket_small.jpg")
    china = small_real_photos["china"]
    china.crop((2, 1, china.width - 2, china.height - 1)).save(root / "colour" / "china_trimmed.png")
    awkward, _, _ = awkward_images  # variants of 'coffee' and the bad files
    shutil.copytree(awkward, root / "mixed" / "awkward")
    (root / "README.txt").write_text("not in a class folder\n")
    return root


def _folder_config(folder: Path, out: Path, **overrides) -> CorpusConfig:
    values = dict(source="folder", folder=str(folder), corpus_dir=str(out), max_side=128, workers=1,
                  split_fractions={"train": 0.5, "val": 0.2, "test": 0.3})
    return configs.corpus_config(**{**values, **overrides})


def test_folder_build_gives_clean_ground_truth(tmp_path, photo_folder, awkward_images):
    _, expected_reasons, _ = awkward_images
    report = build_corpus(_folder_config(photo_folder, tmp_path / "corpus"))
    rows = assert_corpus_invariants(tmp_path / "corpus", radius=4)
    ids = {r["id"] for r in rows}
    assert len(ids & {"colour-chelsea", "mixed-chelsea_again"}) == 1
    assert len(ids & {"colour-rocket", "mixed-rocket_small"}) == 1
    assert len(ids & {"mixed-china", "colour-china_trimmed"}) == 1
    assert report["duplicates"]["exact"] >= 1 and report["duplicates"]["near"] >= 2
    assert report["duplicates"]["near_across_groups"] >= 2
    bad = Counter(reason for reason in expected_reasons.values() if reason)
    assert report["rejections"] == {**bad, "outside_class_folder": 1}
    assert {r["class"] for r in rows} == {"colour", "mixed"}
    assert all(max(int(r["width"]), int(r["height"])) <= 128 for r in rows)
    assert report["images"] == len(rows) == sum(report["splits"].values())
    assert sum(row["total"] for row in report["counts"].values()) == len(rows)
    assert (tmp_path / "corpus" / "contact_colour.png").is_file()
    on_disk = {p.relative_to(tmp_path / "corpus").as_posix() for p in (tmp_path / "corpus" / "images").rglob("*.jpg")}
    assert on_disk == {r["path"] for r in rows}  # dropped images leave no file behind


def test_folder_build_is_the_same_with_two_workers(tmp_path, photo_folder):
    build_corpus(_folder_config(photo_folder, tmp_path / "one"))
    build_corpus(_folder_config(photo_folder, tmp_path / "two", workers=2))
    assert (tmp_path / "one" / "manifest.csv").read_text() == (tmp_path / "two" / "manifest.csv").read_text()


def test_folder_with_one_class_is_a_clear_error(tmp_path, small_real_photos):
    (tmp_path / "photos" / "only").mkdir(parents=True)
    small_real_photos["coffee"].save(tmp_path / "photos" / "only" / "coffee.png")
    with pytest.raises(ValueError, match="at least two classes"):
        build_corpus(_folder_config(tmp_path / "photos", tmp_path / "corpus"))
    with pytest.raises(ValueError, match="overlap"):
        build_corpus(_folder_config(tmp_path / "photos", tmp_path / "photos" / "corpus"))


def test_command_line_reads_params_and_overrides(tmp_path, photo_folder, capsys):
    data = {**configs.study_params()["data"], "source": "folder", "folder": str(photo_folder),
            "corpus_dir": str(tmp_path / "c"), "max_side": 96}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": data}))
    argv = ["--params", str(tmp_path / "params.yaml"), "--set", "max_side=64", "--set", "data.workers=1"]
    assert corpus.main(argv) == 0
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["config"]["max_side"] == 64 and report["config"]["workers"] == 1
    assert "colour" in capsys.readouterr().out
    with pytest.raises(KeyError, match="unknown key 'max_sied'"):  # the dotted overrides of every command
        corpus.main(["--params", str(tmp_path / "params.yaml"), "--set", "max_sied=64"])


# ---------------------------------------------------------------------------
# the real default corpus


def _raw_cache(tmp_path: Path) -> Path:
    """Reuse the project's package cache when there is one (saves the download)."""
    if os.environ.get("MTL_RAW_CACHE"):
        return Path(os.environ["MTL_RAW_CACHE"])
    return REPO / "data" / "raw" if (REPO / "data" / "raw").is_dir() else tmp_path / "raw"


@pytest.mark.slow
def test_real_default_corpus_from_debian_packages(tmp_path):
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs a Debian or Ubuntu system (apt-get, dpkg-deb)")
    data = yaml.safe_load((REPO / "params.yaml").read_text())["data"]
    cfg = CorpusConfig.from_params({**data, "raw_dir": str(_raw_cache(tmp_path)),
                                    "corpus_dir": str(tmp_path / "corpus")})
    report = build_corpus(cfg)
    rows = assert_corpus_invariants(tmp_path / "corpus", cfg.near_dup_hamming)
    counts = report["counts"]
    assert set(counts) == {"scene", "clipart"}
    assert counts["clipart"]["total"] == cfg.max_per_class  # enough clip art to fill the cap
    assert 400 <= counts["scene"]["total"] <= cfg.max_per_class
    assert report["groups"]["scene"]["total"] >= 50  # distinct wallpapers
    for class_name, row in counts.items():
        for split, fraction in cfg.split_fractions.items():
            assert abs(row[split] / row["total"] - fraction) < 0.05, (class_name, split, row)
    assert report["rejections"]["uniform_tile"] > 0 and report["subsampling"]["symlink"] > 1000
    assert report["rejections"]["near_blank"] > 0
    assert len(rows) == report["images"]
    assert (tmp_path / "corpus" / "contact_scene.png").is_file()
    photos = [r for r in rows if r["photo"] == "True"]
    assert len(photos) >= 400 and {r["class"] for r in photos} == {"scene"}  # the photo packages, whole
    assert {r["source"] for r in photos} == {f"debian:{p}" for p in ("endless-sky-data", "gcompris-qt-data",
                                                                     "scribus-template", "palapeli-data")}
    for split, fraction in cfg.split_fractions.items():  # photographs are cut on their own
        assert abs(sum(r["split"] == split for r in photos) / len(photos) - fraction) < 0.03
    assert_eval_planning_keeps_pictures_apart(tmp_path / "corpus", tmp_path)


def assert_eval_planning_keeps_pictures_apart(corpus_dir: Path, tmp_path: Path) -> None:
    """The default eval-set counts fit the real corpus, with one reference per wallpaper
    and no distractor cut from a reference's wallpaper (many tiles per group here)."""
    from mtl.data.manifest import split_originals
    from mtl.data.evalset import EVAL_SPLITS, EvalsetConfig, plan_split

    cfg = EvalsetConfig.from_params(yaml.safe_load((REPO / "params.yaml").read_text())["evalset"])
    for split, counts in cfg.splits.items():
        originals = split_originals(corpus_dir / "manifest.csv", corpus_dir, split)
        assert max(Counter(o.picture for o in originals).values()) > 5  # several tiles of one wallpaper
        photo_counts = cfg.photos[split]
        references, jobs = plan_split(originals, counts, cfg.seed, EVAL_SPLITS.index(split), tmp_path, split,
                                      photo_counts)
        reference_pictures = {r.picture for r in references}
        assert len(reference_pictures) == len(references) == counts.references + photo_counts.references
        assert sum(r.photo for r in references) == photo_counts.references
        distractors = [j for j in jobs if not j.reference_id]
        assert not {j.source.picture for j in distractors} & reference_pictures
        assert sum(j.part == "photo" for j in distractors) == photo_counts.distractor_queries
        general = [j for j in distractors if j.part == "general"]
        assert len({j.source.id for j in general}) == counts.distractor_queries  # each its own image


# ---------------------------------------------------------------------------
# resuming a killed build


def test_a_rebuild_leaves_every_file_of_the_corpus_identical(tmp_path, photo_folder):
    """The corpus folder is the DVC output every later stage depends on: a rebuild (here a
    resumed one, with other times and decode counts) must not change one byte of it."""
    first = build_corpus(_folder_config(photo_folder, tmp_path / "corpus"))
    before = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in (tmp_path / "corpus").rglob("*") if p.is_file()}
    second = build_corpus(_folder_config(photo_folder, tmp_path / "corpus"))
    after = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in (tmp_path / "corpus").rglob("*") if p.is_file()}
    assert second["decode"] != first["decode"]  # the second build resumed from the first's record
    assert after == before
    # the run's times and counts are recorded beside the folder, and read back with the report
    log = json.loads((tmp_path / "corpus.build.json").read_text())
    assert log["decode"] == second["decode"] and log["timings"]["build_s"] == second["timings"]["build_s"]
    assert "timings" not in json.loads((tmp_path / "corpus" / "report.json").read_text())
    assert read_report(tmp_path / "corpus")["decode"] == second["decode"]


def test_a_killed_build_resumes_and_decodes_only_the_rest(tmp_path, photo_folder, monkeypatch):
    whole = build_corpus(_folder_config(photo_folder, tmp_path / "whole"))
    sources = whole["decode"]["decoded_now"]
    real, calls = decode.process_source, []

    def killed_after_five(item, cfg):
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        calls.append(item.image_id)
        return real(item, cfg)

    monkeypatch.setattr(decode, "process_source", killed_after_five)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(_folder_config(photo_folder, tmp_path / "resumed"))
    assert not (tmp_path / "resumed" / "manifest.csv").exists()

    again = []
    monkeypatch.setattr(decode, "process_source", lambda item, cfg: again.append(item.image_id) or real(item, cfg))
    report = build_corpus(_folder_config(photo_folder, tmp_path / "resumed"))
    assert sorted(again) == sorted(set(again)) and not set(again) & set(calls)
    assert len(again) == sources - 5 and report["decode"] == {"decoded_now": sources - 5, "from_record": 5,
                                                             "restored": 0}
    assert (tmp_path / "resumed" / "manifest.csv").read_bytes() == (tmp_path / "whole" / "manifest.csv").read_bytes()
    images = lambda d: sorted(p.relative_to(d).as_posix() for p in (d / "images").rglob("*.jpg"))  # noqa: E731
    assert images(tmp_path / "resumed") == images(tmp_path / "whole")

    again.clear()  # a finished build decodes nothing; other decode settings start over
    build_corpus(_folder_config(photo_folder, tmp_path / "resumed"))
    assert again == []
    build_corpus(_folder_config(photo_folder, tmp_path / "resumed", max_side=96))
    assert len(again) == sources


def test_a_kept_image_whose_file_is_gone_is_decoded_again(tmp_path, photo_folder):
    """The record keeps what an earlier build dropped (a duplicate, over a cap); when such
    an image is kept again its file is restored from its source."""
    corpus_dir = tmp_path / "c"
    build_corpus(_folder_config(photo_folder, corpus_dir))
    before = (corpus_dir / "manifest.csv").read_bytes()
    row = read_manifest(corpus_dir / "manifest.csv")[0]
    stored = (corpus_dir / row["path"]).read_bytes()
    (corpus_dir / row["path"]).unlink()
    report = build_corpus(_folder_config(photo_folder, corpus_dir))
    assert report["decode"] == {"decoded_now": 0, "from_record": report["decode"]["from_record"], "restored": 1}
    assert (corpus_dir / row["path"]).read_bytes() == stored
    assert (corpus_dir / "manifest.csv").read_bytes() == before
