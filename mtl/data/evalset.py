"""The fixed evaluation set: references, queries and their ground truth, per split.

For each split (test: the reported numbers; val: choosing thresholds), built once and
deterministically from that split's originals (never seen in training):

  references   one original from each of a seeded subset of the split's pictures
               (manifest `group`: all tiles of one wallpaper are one picture), copied
               unchanged;
  positives    `eval`-family transformations of a subset of the references (one per
               reference), each recording its transformation and whether it is held out
               from training; the names cycle over the family so each gets its share;
  distractors  transformations of images of the split's OTHER pictures: queries whose
               right answer is "no match", at least as many as the positives, as in
               DISC21.  No distractor is a piece of a reference's picture.  When those
               pictures hold fewer images than distractors, sources repeat (with
               different transformations and seeds).

Each split has two parts, planned apart and searched together (one gallery): the
*photo* part (`evalset.photos`) takes the split's real photographs (manifest `photo`):
one reference per photograph, copies, and distractors made from other photographs; the
*general* part takes every other image.  A photo query thus faces a mixed gallery, as
an upload faces a real collection.

Written to `<out_dir>/<split>/` (format in docs/architecture.md):
  references.csv  reference_id, path, class, part
  queries.csv     query_id, path, class, reference_id (empty for distractors),
                  transformation, held_out, source_id, source_group (the corpus image
                  a query was made from and its picture: the split can be audited), part
                  (photo | general)
  references/*.jpg, queries/*.jpg
`<out_dir>` must be new, empty, or made by an earlier build, and apart from the
corpus: a folder holding anything else is refused, untouched.
Query ids are assigned in a seeded shuffled order, so neither an id nor a file name
tells a positive from a distractor.  Every image comes from a generator seeded by
(seed, split, query number): the same inputs give byte-identical files, whatever the
number of worker processes.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from mtl.data.batches import load_original
from mtl.data.gallery import render_gallery
from mtl.data.manifest import Original, split_originals
from mtl.data.transforms import EVAL_FAMILY, apply, is_held_out
from mtl.io import UserError, atomic_path, atomic_write_text, claim_folder, overlaps
from mtl.params import load_params, section_config
from mtl.runtime import progress

EVAL_SPLITS = ("test", "val")
QUERY_JPEG_QUALITY = 90  # queries are shared as JPEGs, as DISC21's are
REFERENCE_COLUMNS = ("reference_id", "path", "class", "part")
QUERY_COLUMNS = ("query_id", "path", "class", "reference_id", "transformation", "held_out",
                 "source_id", "source_group", "part")
PARTS = ("general", "photo")


@dataclass(frozen=True)
class SplitCounts:
    references: int
    positive_queries: int
    distractor_queries: int

    def __post_init__(self) -> None:
        if min(self.references, self.positive_queries, self.distractor_queries) < 0:
            raise ValueError(f"counts must be >= 0, got {self}")
        if self.positive_queries > self.references:
            raise ValueError(f"positive_queries ({self.positive_queries}) cannot exceed references "
                             f"({self.references}): each positive comes from a different reference")
        if self.distractor_queries < self.positive_queries:
            raise ValueError(f"distractor_queries ({self.distractor_queries}) must be at least positive_queries "
                             f"({self.positive_queries}): most real queries have no match")


@dataclass(frozen=True)
class EvalsetConfig:
    """The `evalset` section of params.yaml."""

    dir: str
    seed: int
    splits: Mapping[str, SplitCounts]  # the section's `test` and `val` entries: the general part
    photos: Mapping[str, SplitCounts]  # the section's `photos`: each split's photo part
    workers: int                       # render processes (the files do not depend on it)

    @classmethod
    def from_params(cls, section: Mapping[str, Any]) -> "EvalsetConfig":
        section = dict(section)
        splits = {s: SplitCounts(**section.pop(s)) for s in EVAL_SPLITS if s in section}
        if not splits:
            raise ValueError(f"evalset parameters name none of the splits {EVAL_SPLITS}")
        photos = section.pop("photos", None)
        if not isinstance(photos, Mapping):
            raise ValueError("the evalset section lacks `photos` (each split's photo part: "
                             "{test: {references, positive_queries, distractor_queries}, val: ...}, zeros for none)")
        unknown = sorted(set(photos) - set(splits))
        if unknown:
            raise ValueError(f"evalset.photos names splits {unknown} the evalset section does not build")
        photo_counts = {s: SplitCounts(**photos[s]) if s in photos else SplitCounts(0, 0, 0) for s in splits}
        return section_config(cls, section, "evalset", splits=splits, photos=photo_counts)


@dataclass(frozen=True)
class QueryJob:
    """One query to render: source original, transformation, seed, destination."""

    query_id: str
    source: Original
    reference_id: str  # '' for a distractor
    transformation: str
    seed: tuple[int, ...]
    out_path: Path
    part: str = "general"


# --------------------------------------------------------------------------- planning (pure)

def pictures_of(originals: list[Original]) -> dict[str, list[Original]]:
    """The split's originals by picture (group), each list sorted by id."""
    pictures: dict[str, list[Original]] = {}
    for original in sorted(originals, key=lambda o: o.id):
        pictures.setdefault(original.picture, []).append(original)
    return pictures


def plan_part(originals: list[Original], counts: SplitCounts, rng: np.random.Generator, split: str, part: str
              ) -> tuple[list[Original], list[tuple[Original, str]]]:
    """One part's references and query sources: (references, [(source, reference_id or '')]).

    Ground truth is about pictures, not files: two tiles of one wallpaper are the same
    picture to a person.  So references come from distinct pictures (one seeded
    original per chosen group), and distractors only from pictures that hold no
    reference: no distractor is a piece of a reference's picture, and every positive
    has exactly one right answer.
    """
    if counts.references == 0 and counts.distractor_queries == 0:
        return [], []
    pictures = pictures_of(originals)
    needed = counts.references + (1 if counts.distractor_queries else 0)
    if len(pictures) < needed:
        what = "photographs" if part == "photo" else "pictures"
        key = f"evalset.photos.{split}" if part == "photo" else f"evalset.{split}"
        raise ValueError(
            f"split {split!r} has {len(originals)} {'photo ' if part == 'photo' else ''}images of {len(pictures)} "
            f"distinct {what}, too few for {counts.references} references (one per picture)"
            f"{' plus at least one picture for distractors' if counts.distractor_queries else ''}: lower "
            f"{key}.references or build a larger corpus")
    names = sorted(pictures)
    order = [names[i] for i in rng.permutation(len(names))]
    reference_pictures, other_pictures = order[:counts.references], order[counts.references:]
    references = sorted((pictures[g][int(rng.integers(len(pictures[g])))] for g in reference_pictures),
                        key=lambda o: o.id)
    others = [o for g in other_pictures for o in pictures[g]]
    others = [others[i] for i in rng.permutation(len(others))]
    positive_sources = [references[i] for i in rng.permutation(len(references))[:counts.positive_queries]]
    # Each distractor its own image while they last; sources repeat (other edits, other
    # seeds) only when the split has fewer non-reference images than distractors.
    distractor_sources = [others[i % len(others)] for i in range(counts.distractor_queries)] if others else []
    return references, [(src, src.id) for src in positive_sources] + [(src, "") for src in distractor_sources]


def plan_split(originals: list[Original], counts: SplitCounts, seed: int, split_index: int,
               out_dir: Path, split: str = "", photo_counts: SplitCounts = SplitCounts(0, 0, 0)
               ) -> tuple[list[Original], list[QueryJob]]:
    """Choose references, positive and distractor sources and each query's transformation,
    for the general part (every image but the photographs) and the photo part (see
    plan_part); one gallery, one shuffled list of queries.  `references` carry their part
    as `QueryJob.part` does (the photo flag of the original)."""
    rng = np.random.default_rng((seed, split_index))
    general = [o for o in originals if not o.photo]
    references, sources = plan_part(general, counts, rng, split, "general")
    photo_references, photo_sources = plan_part([o for o in originals if o.photo], photo_counts, rng, split, "photo")
    family = list(EVAL_FAMILY)
    offset = int(rng.integers(len(family)))  # distractors start elsewhere in the cycle
    plans = []
    for part, part_sources in (("general", sources), ("photo", photo_sources)):
        positives = [(src, ref) for src, ref in part_sources if ref]
        distractors = [(src, ref) for src, ref in part_sources if not ref]
        plans += [(src, ref, family[i % len(family)], part) for i, (src, ref) in enumerate(positives)]
        plans += [(src, ref, family[(offset + i) % len(family)], part) for i, (src, ref) in enumerate(distractors)]
    shuffled = rng.permutation(len(plans))
    jobs = []
    for number, p in enumerate(shuffled):
        source, reference_id, name, part = plans[p]
        query_id = f"{split or 'q'}_q{number:05d}"
        jobs.append(QueryJob(query_id, source, reference_id, name, (seed, split_index, number),
                             out_dir / "queries" / f"{query_id}.jpg", part))
    return sorted(references + photo_references, key=lambda o: o.id), jobs


# --------------------------------------------------------------------------- rendering

def render_query(job: QueryJob) -> str:
    img = apply(job.transformation, load_original(job.source.path), job.seed)
    with atomic_path(job.out_path) as tmp:
        img.save(tmp, quality=QUERY_JPEG_QUALITY)
    return job.query_id


def copy_reference(original: Original, dest: Path) -> None:
    """Copy the original's bytes (JPEG corpus files), or re-encode other formats as JPEG."""
    with atomic_path(dest) as tmp:
        if original.path.suffix.lower() in {".jpg", ".jpeg"}:
            shutil.copyfile(original.path, tmp)
        else:
            load_original(original.path).save(tmp, quality=95)


def render_queries(jobs: list[QueryJob], workers: int, desc: str) -> None:
    if workers > 1 and len(jobs) > 50:
        with Pool(workers) as pool:
            for _ in progress(pool.imap_unordered(render_query, jobs, chunksize=16), len(jobs), desc, unit="query"):
                pass
    else:
        for job in progress(jobs, len(jobs), desc, unit="query"):
            render_query(job)


# --------------------------------------------------------------------------- writing

def _write_csv(path: Path, columns: tuple[str, ...], rows: Iterable[Mapping[str, Any]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def build_split(originals: list[Original], counts: SplitCounts, seed: int, split: str, out_dir: Path,
                workers: int, photo_counts: SplitCounts = SplitCounts(0, 0, 0)) -> dict[str, Any]:
    """Write one split's references, queries and CSVs; return its counts."""
    split_dir = out_dir / split
    references, jobs = plan_split(originals, counts, seed, EVAL_SPLITS.index(split), split_dir, split, photo_counts)
    if split_dir.exists():
        shutil.rmtree(split_dir)  # stale queries of an earlier, larger build must not linger
    (split_dir / "references").mkdir(parents=True)
    (split_dir / "queries").mkdir()

    for ref in progress(references, len(references), f"{split} references", unit="image", lines=0):
        copy_reference(ref, split_dir / "references" / f"{ref.id}.jpg")
    _write_csv(split_dir / "references.csv", REFERENCE_COLUMNS,
               ({"reference_id": r.id, "path": f"references/{r.id}.jpg", "class": r.class_name,
                 "part": "photo" if r.photo else "general"} for r in references))

    render_queries(jobs, workers, f"{split} queries")
    _write_csv(split_dir / "queries.csv", QUERY_COLUMNS, (
        {"query_id": j.query_id, "path": f"queries/{j.query_id}.jpg", "class": j.source.class_name,
         "reference_id": j.reference_id, "transformation": j.transformation,
         "held_out": is_held_out(j.transformation), "source_id": j.source.id,
         "source_group": j.source.picture, "part": j.part} for j in jobs))

    positives = [j for j in jobs if j.reference_id]
    per_transformation = {name: sum(j.transformation == name for j in positives) for name in EVAL_FAMILY}
    return {"images_in_split": len(originals), "references": len(references), "positive_queries": len(positives),
            "distractor_queries": len(jobs) - len(positives),
            "distinct_distractor_sources": len({j.source.id for j in jobs if not j.reference_id}),
            "reference_pictures": len({r.picture for r in references}),
            "references_per_class": dict(Counter(r.class_name for r in references)),
            "photo_references": sum(r.photo for r in references),
            "photo_positive_queries": sum(j.part == "photo" for j in positives),
            "photo_distractor_queries": sum(j.part == "photo" and not j.reference_id for j in jobs),
            "held_out_positive_queries": sum(is_held_out(j.transformation) for j in positives),
            "positives_per_transformation": per_transformation}


def made_before_the_marker(out_dir: Path) -> bool:
    """An eval set built before folders were marked: a split with our queries.csv."""
    for split in EVAL_SPLITS:
        try:
            with (out_dir / split / "queries.csv").open(newline="") as f:
                if next(csv.reader(f), None) == list(QUERY_COLUMNS):
                    return True
        except (OSError, UnicodeDecodeError):
            continue
    return False


def build_evalset(manifest_csv: str | Path, corpus_dir: str | Path, out_dir: str | Path,
                  cfg: EvalsetConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Build every split of `cfg` under `out_dir`, plus `out_dir/gallery.png`; return a summary
    (counts per split and the build time)."""
    cfg = cfg if isinstance(cfg, EvalsetConfig) else EvalsetConfig.from_params(cfg)
    if overlaps(out_dir, corpus_dir):
        raise UserError(f"evalset.dir {str(out_dir)!r} and the corpus {str(corpus_dir)!r} overlap (one is or holds "
                        "the other): the build replaces its split folders; give two separate folders")
    out_dir = claim_folder(out_dir, "evalset.dir", made_before_the_marker)
    started = time.perf_counter()
    summary: dict[str, Any] = {"seed": cfg.seed, "transformations": list(EVAL_FAMILY),
                               "held_out": [n for n in EVAL_FAMILY if is_held_out(n)], "splits": {}}
    for split, counts in cfg.splits.items():
        originals = split_originals(manifest_csv, corpus_dir, split)
        summary["splits"][split] = built = build_split(originals, counts, cfg.seed, split, out_dir, cfg.workers,
                                                       cfg.photos[split])
        print(f"{split}: {built['references']} references ({built['photo_references']} photographs), "
              f"{built['positive_queries']} positive + {built['distractor_queries']} distractor queries")
    gallery_split = "test" if "test" in cfg.splits else next(iter(cfg.splits))
    first_reference = sorted((out_dir / gallery_split / "references").glob("*.jpg"))[0]
    render_gallery(load_original(first_reference), out_dir / "gallery.png", seed=cfg.seed)
    summary["build_seconds"] = round(time.perf_counter() - started, 2)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtl evalset", description="build the fixed evaluation set")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None, help="a profiles/*.yaml overlay")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter")
    parser.add_argument("--summary", default=None, help="also write the summary as JSON here")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.set, args.profile)
    cfg = EvalsetConfig.from_params(params["evalset"])
    corpus_dir = Path(params["data"]["corpus_dir"])
    summary = build_evalset(corpus_dir / "manifest.csv", corpus_dir, cfg.dir, cfg)
    text = json.dumps(summary, indent=1)
    if args.summary:
        atomic_write_text(args.summary, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
