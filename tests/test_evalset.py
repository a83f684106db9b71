"""The fixed evaluation set: right counts, ground truth that points at real references,
distractors that are truly unmatched, byte-identical rebuilds, clear errors."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from mtl.data.evalset import EvalsetConfig, SplitCounts, build_evalset, main
from mtl.data.transforms import EVAL_FAMILY, is_held_out
from tests.configs import evalset_config

COUNTS = {"test": SplitCounts(references=8, positive_queries=6, distractor_queries=8),
          "val": SplitCounts(references=4, positive_queries=3, distractor_queries=3)}


def write_photo_corpus(root: Path, per_split: dict[str, int], photos_per_split: int = 0) -> Path:
    """Distinct 64 px crops of scikit-image photos, two classes, as a corpus manifest; the
    first `photos_per_split` scene images of each split are flagged as photographs."""
    photos = {"scene": data.astronaut(), "clipart": np.stack([data.camera()] * 3, -1)}
    rows, n = [], 0
    for split, count in per_split.items():
        flagged = 0
        for _ in range(count):
            cls = ("scene", "clipart")[n % 2]
            y, x = divmod(n * 64, 448)
            Image.fromarray(photos[cls][y % 448:y % 448 + 64, x:x + 64]).save(root / f"{cls}{n:03d}.jpg")
            photo = cls == "scene" and flagged < photos_per_split
            flagged += photo
            rows.append({"id": f"{cls}{n:03d}", "path": f"{cls}{n:03d}.jpg", "class": cls, "source": "test",
                         "group": str(n), "split": split, "hash": str(n), "width": 64, "height": 64,
                         "photo": photo})
            n += 1
    with (root / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    return write_photo_corpus(root, {"train": 4, "val": 6, "test": 14})


@pytest.fixture(scope="module")
def evalset(corpus: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    build_evalset(corpus, corpus.parent, out, evalset_config(seed=3, splits=COUNTS, workers=1))
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _split_ids(corpus: Path, split: str) -> set[str]:
    return {r["id"] for r in _rows(corpus) if r["split"] == split}


@pytest.mark.parametrize("split", ["test", "val"])
def test_counts_are_as_requested_and_columns_as_documented(evalset: Path, split: str) -> None:
    refs, queries = _rows(evalset / split / "references.csv"), _rows(evalset / split / "queries.csv")
    assert list(refs[0]) == ["reference_id", "path", "class", "part"]
    assert list(queries[0]) == ["query_id", "path", "class", "reference_id", "transformation", "held_out",
                               "source_id", "source_group", "part"]
    assert len(refs) == COUNTS[split].references
    assert sum(bool(q["reference_id"]) for q in queries) == COUNTS[split].positive_queries
    assert sum(not q["reference_id"] for q in queries) == COUNTS[split].distractor_queries
    assert len({q["query_id"] for q in queries}) == len(queries)


@pytest.mark.parametrize("split", ["test", "val"])
def test_every_ground_truth_reference_and_image_exists(evalset: Path, corpus: Path, split: str) -> None:
    root = evalset / split
    refs = {r["reference_id"]: r for r in _rows(root / "references.csv")}
    assert set(refs) <= _split_ids(corpus, split)  # references come from this split only
    for r in refs.values():
        assert (root / r["path"]).is_file()
    for q in _rows(root / "queries.csv"):
        assert Image.open(root / q["path"]).mode == "RGB"
        if q["reference_id"]:
            assert q["reference_id"] in refs and q["class"] == refs[q["reference_id"]]["class"]
        assert q["transformation"] in EVAL_FAMILY
        assert q["held_out"] == str(is_held_out(q["transformation"]))


def test_references_are_unchanged_copies_of_the_originals(evalset: Path, corpus: Path) -> None:
    for r in _rows(evalset / "test" / "references.csv"):
        assert (evalset / "test" / r["path"]).read_bytes() == (corpus.parent / f"{r['reference_id']}.jpg").read_bytes()


def test_distractor_sources_are_not_references(corpus: Path, tmp_path: Path) -> None:
    """Distractors are rendered from non-references: rebuild with a recorder to see the sources."""
    from mtl.data import evalset as E
    from mtl.data.manifest import split_originals

    originals = split_originals(corpus, corpus.parent, "test")
    references, jobs = E.plan_split(originals, COUNTS["test"], 3, 0, tmp_path, "test")
    ref_ids = {r.id for r in references}
    distractors = [j for j in jobs if not j.reference_id]
    assert distractors and not {j.source.id for j in distractors} & ref_ids
    assert all(j.source.id == j.reference_id for j in jobs if j.reference_id)
    # 14 test images - 8 references = 6 distinct sources for the 8 distractors
    assert len({j.source.id for j in distractors}) == 6


def write_tiled_corpus(root: Path, photos: dict[str, Image.Image], tile: int = 48) -> Path:
    """A test-split corpus where every photo is a 'wallpaper' cut into several tiles that
    share its group, plus as many single-image pictures (one group each)."""
    rows = []

    def add(image: Image.Image, image_id: str, group: str) -> None:
        image.save(root / f"{image_id}.jpg", quality=95)
        rows.append({"id": image_id, "path": f"{image_id}.jpg", "class": "scene" if "-r" in image_id else "clipart",
                     "source": "test", "group": group, "split": "test", "hash": image_id, "width": tile,
                     "height": tile})

    for name, photo in photos.items():
        for r in range(2):
            for c in range(3):
                add(photo.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)), f"{name}-r{r}c{c}", name)
        add(photo.resize((tile, tile)), f"whole-{name}", f"whole-{name}")
    with (root / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_no_distractor_is_a_piece_of_a_reference_picture(tmp_path, small_real_photos, seed):
    """Seven 'wallpapers' of six tiles each and seven single pictures: references come
    from distinct pictures, and no distractor shares a picture (group) with a reference,
    as queries.csv itself shows (source_id, source_group)."""
    (tmp_path / "corpus").mkdir()
    manifest = write_tiled_corpus(tmp_path / "corpus", small_real_photos)
    counts = {"test": SplitCounts(references=6, positive_queries=5, distractor_queries=6)}
    build_evalset(manifest, manifest.parent, tmp_path / "eval", evalset_config(seed=seed, splits=counts, workers=1))
    group_of = {r["id"]: r["group"] for r in _rows(manifest)}
    references = _rows(tmp_path / "eval" / "test" / "references.csv")
    reference_groups = [group_of[r["reference_id"]] for r in references]
    assert len(set(reference_groups)) == len(references) == 6  # one reference per picture
    queries = _rows(tmp_path / "eval" / "test" / "queries.csv")
    for q in queries:
        assert q["source_group"] == group_of[q["source_id"]]
        if q["reference_id"]:
            assert q["source_id"] == q["reference_id"]
        else:
            assert q["source_group"] not in reference_groups, q
    distractors = [q for q in queries if not q["reference_id"]]
    assert len(distractors) == 6 and len({q["source_id"] for q in distractors}) == 6


def test_transformations_cycle_evenly_over_the_eval_family(corpus: Path, tmp_path: Path) -> None:
    from mtl.data import evalset as E
    from mtl.data.manifest import split_originals

    originals = split_originals(corpus, corpus.parent, "test")
    many = [replace(o, id=f"{o.id}-{k}", group=f"{o.group}-{k}") for k in range(5) for o in originals]  # 70 pictures
    per_name = 2 * len(EVAL_FAMILY)
    _, jobs = E.plan_split(many, SplitCounts(50, per_name, per_name), 0, 0, tmp_path, "test")
    for is_positive in (True, False):
        counts = Counter(j.transformation for j in jobs if bool(j.reference_id) == is_positive)
        assert set(counts) == set(EVAL_FAMILY) and set(counts.values()) == {2}


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_rebuilding_gives_identical_files_with_any_worker_count(evalset: Path, corpus: Path, tmp_path: Path) -> None:
    build_evalset(corpus, corpus.parent, tmp_path, evalset_config(seed=3, splits=COUNTS, workers=2))
    assert _digest(tmp_path) == _digest(evalset)


def test_another_seed_gives_another_set(evalset: Path, corpus: Path, tmp_path: Path) -> None:
    build_evalset(corpus, corpus.parent, tmp_path, evalset_config(seed=4, splits=COUNTS, workers=1))
    assert _digest(tmp_path) != _digest(evalset)


def test_gallery_shows_the_first_test_reference_transformed_with_the_sets_seed(evalset: Path, tmp_path: Path) -> None:
    from mtl.data.batches import load_original
    from mtl.data.gallery import render_gallery

    first_reference = sorted((evalset / "test" / "references").glob("*.jpg"))[0]
    expected = render_gallery(load_original(first_reference), tmp_path / "expected.png", seed=3)
    assert np.array_equal(np.asarray(Image.open(evalset / "gallery.png")), np.asarray(Image.open(expected)))
    other_seed = render_gallery(load_original(first_reference), tmp_path / "other.png", seed=4)
    assert not np.array_equal(np.asarray(Image.open(other_seed)), np.asarray(Image.open(expected)))


def test_too_small_split_fails_clearly(corpus: Path, tmp_path: Path) -> None:
    too_many = {"val": SplitCounts(references=6, positive_queries=3, distractor_queries=3)}
    with pytest.raises(ValueError, match=r"split 'val' has 6 images of 6 distinct pictures, too few for 6 references"):
        build_evalset(corpus, corpus.parent, tmp_path, evalset_config(splits=too_many, workers=1))


def test_inconsistent_counts_fail_clearly() -> None:
    with pytest.raises(ValueError, match="cannot exceed references"):
        SplitCounts(references=2, positive_queries=3, distractor_queries=3)
    with pytest.raises(ValueError, match="at least positive_queries"):
        SplitCounts(references=5, positive_queries=3, distractor_queries=2)
    with pytest.raises(ValueError, match="unknown key.*evalset section: tset"):
        EvalsetConfig.from_params({"seed": 1, "test": {"references": 2, "positive_queries": 1,
                                                         "distractor_queries": 1}, "tset": {}, "photos": {}})


def test_command_line_reads_the_evalset_section(corpus: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(f"data: {{corpus_dir: {corpus.parent}}}\n"
                      f"evalset:\n  dir: {tmp_path / 'eval'}\n  seed: 1\n  workers: 1\n"
                      "  test: {references: 5, positive_queries: 2, distractor_queries: 2}\n"
                      "  val: {references: 2, positive_queries: 1, distractor_queries: 1}\n"
                      "  photos: {}\n")
    assert main(["--params", str(params), "--summary", str(tmp_path / "summary.json")]) == 0
    assert len(_rows(tmp_path / "eval" / "test" / "queries.csv")) == 4
    assert (tmp_path / "summary.json").is_file()


def test_photographs_get_a_part_of_their_own_searched_in_one_gallery(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    manifest = write_photo_corpus(root, {"train": 2, "val": 8, "test": 24}, photos_per_split=7)
    photos = {r["id"] for r in _rows(manifest) if r["photo"] == "True"}
    counts = {"test": SplitCounts(6, 5, 6), "val": SplitCounts(2, 2, 2)}
    photo_counts = {"test": SplitCounts(4, 3, 4), "val": SplitCounts(0, 0, 0)}
    build_evalset(manifest, root, tmp_path / "eval", evalset_config(seed=1, splits=counts, photos=photo_counts,
                                                                    workers=1))
    references = _rows(tmp_path / "eval" / "test" / "references.csv")
    queries = _rows(tmp_path / "eval" / "test" / "queries.csv")
    assert Counter(r["part"] for r in references) == {"general": 6, "photo": 4}
    assert all((r["reference_id"] in photos) == (r["part"] == "photo") for r in references)
    photo_queries = [q for q in queries if q["part"] == "photo"]
    assert sum(bool(q["reference_id"]) for q in photo_queries) == 3 and len(photo_queries) == 7
    # photo copies point at photo references; photo distractors are other photographs
    assert all(q["source_id"] in photos for q in photo_queries)
    photo_references = {r["reference_id"] for r in references if r["part"] == "photo"}
    assert {q["reference_id"] for q in photo_queries if q["reference_id"]} <= photo_references
    assert not {q["source_id"] for q in photo_queries if not q["reference_id"]} & photo_references
    assert not {q["source_id"] for q in queries if q["part"] == "general"} & photos
    assert {r["part"] for r in _rows(tmp_path / "eval" / "val" / "references.csv")} == {"general"}


def test_too_few_photographs_fail_clearly(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    manifest = write_photo_corpus(root, {"train": 2, "val": 8, "test": 24}, photos_per_split=2)
    with pytest.raises(ValueError, match="2 distinct photographs.*evalset.photos.test.references"):
        build_evalset(manifest, root, tmp_path / "eval", evalset_config(
            seed=1, splits={"test": SplitCounts(6, 5, 6)}, photos={"test": SplitCounts(4, 3, 4)}, workers=1))


def test_the_photo_part_is_named_in_the_parameters() -> None:
    section = {"dir": "d", "seed": 0, "workers": 1, "test": {"references": 2, "positive_queries": 1,
                                                             "distractor_queries": 1}}
    with pytest.raises(ValueError, match="lacks `photos`"):
        EvalsetConfig.from_params(section)
    with pytest.raises(ValueError, match="names splits \\['val'\\]"):
        EvalsetConfig.from_params({**section, "photos": {"val": {"references": 1, "positive_queries": 1,
                                                                 "distractor_queries": 1}}})
    cfg = EvalsetConfig.from_params({**section, "photos": {}})
    assert cfg.photos == {"test": SplitCounts(0, 0, 0)}
