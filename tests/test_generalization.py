"""The generalization check: pictures from packages outside the study's set, edits outside
its families, ground truth by picture like the evaluation set."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtl.data.transforms import REGISTRY
from mtl.eval.generalization import UNSEEN_EDITS, build_split, unseen_pictures


def write_corpus(root: Path, photos: dict[str, Image.Image]) -> Path:
    """Test-split crops of real photos: each photo a picture of three crops, from a package
    outside the default set, plus one picture from a default package."""
    rows = []
    for name, photo in photos.items():
        for i in range(3):
            image_id = f"{name}-{i}"
            photo.crop((i * 20, 0, i * 20 + 96, 96)).save(root / f"{image_id}.jpg", quality=95)
            rows.append({"id": image_id, "path": f"{image_id}.jpg", "class": "clipart", "group": name,
                         "split": "test", "source": "debian:papirus-icon-theme"})
    rows[0]["source"] = "debian:openclipart-png"  # a default-set package: left out
    rows[0]["group"] = "from-the-default-set"
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv"


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_split_keeps_pictures_apart_and_uses_only_unseen_edits(tmp_path, small_real_photos):
    manifest = write_corpus(tmp_path, small_real_photos)
    rows = unseen_pictures(manifest, "default")
    assert len(rows) == 3 * len(small_real_photos) - 1 and all("openclipart" not in r["source"] for r in rows)
    split = build_split(rows, tmp_path, tmp_path / "proxy", references=3)
    with (split / "queries.csv").open(newline="") as handle:
        queries = list(csv.DictReader(handle))
    with (split / "references.csv").open(newline="") as handle:
        references = list(csv.DictReader(handle))
    group_of = {r["id"]: r["group"] for r in rows}
    reference_groups = {group_of[r["reference_id"]] for r in references}
    assert len(reference_groups) == len(references) == 3
    for query in queries:
        assert query["transformation"] in UNSEEN_EDITS and query["transformation"] not in REGISTRY
        if query["reference_id"]:
            assert query["source_id"] == query["reference_id"]
        else:
            assert query["source_group"] not in reference_groups
        assert Image.open(split / query["path"]).mode == "RGB"
    assert len(queries) == 6 and len({q["transformation"] for q in queries}) == 6
    again = build_split(rows, tmp_path, tmp_path / "again", references=3)
    assert _digests(again) == _digests(split)  # seeded: the same files


@pytest.mark.parametrize("name", sorted(UNSEEN_EDITS))
def test_each_unseen_edit_changes_the_picture(name, small_real_photos):
    photo = small_real_photos["coffee"]
    edited = UNSEEN_EDITS[name](photo, np.random.default_rng(0), [small_real_photos["astronaut"]])
    assert edited.mode == "RGB"
    same_size = edited.size == photo.size
    assert not same_size or not np.array_equal(np.asarray(edited), np.asarray(photo))


def test_val_normalizations_come_from_the_operating_points(tmp_path):
    import json

    from mtl.eval.generalization import val_normalizations
    from mtl.eval.normalize import Normalization

    checkpoint = tmp_path / "final.pt"
    checkpoint.write_bytes(b"x")
    points = tmp_path / "operating_points.json"
    assert val_normalizations(points, checkpoint) == {}
    points.write_text(json.dumps({
        "imagenet": {"descriptor": "gap1280", "threshold": 0.8, "search": {"normalization": {"k": 3, "beta": 0.75}}},
        "best": {"descriptor": "mtl", "threshold": 0.9, "checkpoint": str(checkpoint),
                 "search": {"normalization": {"k": 1, "beta": 0.5}}},
        "other": {"descriptor": "mtl", "threshold": 0.9, "checkpoint": str(tmp_path / "other.pt"),
                  "search": {"normalization": {"k": 5, "beta": 1.0}}},
        "phash": {"descriptor": "phash", "threshold": 0.7}}))
    assert val_normalizations(points, checkpoint) == {"gap1280": Normalization(3, 0.75), "mtl": Normalization(1, 0.5)}
    assert val_normalizations(points, tmp_path / "unknown.pt") == {"gap1280": Normalization(3, 0.75)}


def test_the_photo_part_takes_the_unseen_packages_photographs_of_every_split(tmp_path, small_real_photos):
    names = sorted(small_real_photos)
    rows = []
    for number, name in enumerate(names):
        photo = number >= 4                          # the first four: general pictures, the rest photographs
        source = "debian:opencv-doc" if photo else "debian:papirus-icon-theme"
        small_real_photos[name].save(tmp_path / f"{name}.jpg", quality=95)
        rows.append({"id": name, "path": f"{name}.jpg", "class": "scene" if photo else "clipart", "group": name,
                     "split": ("train", "val", "test")[number % 3] if photo else "test", "source": source,
                     "photo": str(photo)})
    rows.append({**rows[-1], "id": "seen", "group": "seen", "source": "debian:endless-sky-data"})  # a default package
    with (tmp_path / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    general = unseen_pictures(tmp_path / "manifest.csv", "default")
    photos = unseen_pictures(tmp_path / "manifest.csv", "default", split=None, photos=True)
    assert [r["id"] for r in general] == names[:4]
    assert [r["id"] for r in photos] == names[4:]        # every split, not the default package's photograph
    split = build_split(general, tmp_path, tmp_path / "out", references=2, photo_rows=photos, photo_references=1)
    with (split / "references.csv").open(newline="") as handle:
        references = {r["reference_id"]: r["part"] for r in csv.DictReader(handle)}
    with (split / "queries.csv").open(newline="") as handle:
        queries = list(csv.DictReader(handle))
    assert sorted(references.values()) == ["general", "general", "photo"]
    assert [ref for ref, part in references.items() if part == "photo"][0] in names[4:]
    photo_queries = [q for q in queries if q["part"] == "photo"]
    assert len(queries) == 6 and len(photo_queries) == 2
    assert all(q["source_id"] in names[4:] for q in photo_queries)
    assert sum(bool(q["reference_id"]) for q in photo_queries) == 1   # one copy, one distractor
