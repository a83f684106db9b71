"""A generalization check: pictures the default study never trains on, edited in ways it
never trains or evaluates on.

The evaluation set measures copies of the corpus's own kind of pictures (clip art and
wallpaper tiles) under the study's edit families, some held out.  A copy detector meets
other pictures and other edits.  This check builds a second evaluation split from the
test split of another corpus (for example the full profile's, whose icon themes and game
art the default profile never sees), keeping only images from packages outside a given
package set, and edits each query with transformations that are in no family of
mtl.data.transforms: pasted small onto another picture (collage), skewed, striped,
flipped upside down, pixelated with noise, blurred inside a border.  Ground truth as in
the evaluation set: one reference per picture, distractors from the other pictures.  The
real photographs of those packages (every split: the default study trains on none of
them) make a photo part of their own, searched in the same gallery (the `part` column).

    python -m mtl.eval.generalization --manifest data/corpus_full/manifest.csv \\
        --checkpoint models/paper/finetune/final.pt --checkpoint models/best/finetune/final.pt

writes the split to `--split-dir` and `results/generalization/table.csv`: μAP, acc@1 and
R@P90 of each checkpoint's embedding and of the ImageNet backbone's 1280-d output, and μAP
of the photo part's queries and of the clip-art queries apart.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter, ImageOps

from mtl.data.manifest import is_photo_row
from mtl.data.packages import package_names
from mtl.eval.evaluation import EvalConfig, checkpoint_scores
from mtl.eval.normalize import Normalization
from mtl.eval.operating_points import load_operating_points
from mtl.io import atomic_path, write_csv

Edit = Callable[[Image.Image, np.random.Generator, Sequence[Image.Image]], Image.Image]


def collage(img: Image.Image, rng: np.random.Generator, backgrounds: Sequence[Image.Image]) -> Image.Image:
    """The picture at 45-70 % of its size, pasted anywhere onto another picture."""
    canvas = backgrounds[int(rng.integers(len(backgrounds)))].resize(img.size)
    factor = rng.uniform(0.45, 0.7)
    small = img.resize((max(1, int(img.width * factor)), max(1, int(img.height * factor))))
    canvas.paste(small, (int(rng.integers(0, img.width - small.width + 1)),
                         int(rng.integers(0, img.height - small.height + 1))))
    return canvas


def skew(img: Image.Image, rng: np.random.Generator, _: Sequence[Image.Image]) -> Image.Image:
    import augly.image as imaugs

    return imaugs.skew(img, skew_factor=float(rng.uniform(-0.6, 0.6))).convert("RGB")


def stripes(img: Image.Image, rng: np.random.Generator, _: Sequence[Image.Image]) -> Image.Image:
    import augly.image as imaugs

    return imaugs.overlay_stripes(img, line_width=float(rng.uniform(0.2, 0.5)),
                                  line_opacity=float(rng.uniform(0.4, 0.8)),
                                  line_angle=float(rng.uniform(0, 180))).convert("RGB")


def upside_down(img: Image.Image, rng: np.random.Generator, _: Sequence[Image.Image]) -> Image.Image:
    return ImageOps.flip(img)


def pixelated_noise(img: Image.Image, rng: np.random.Generator, _: Sequence[Image.Image]) -> Image.Image:
    import augly.image as imaugs

    img = imaugs.pixelization(img, ratio=float(rng.uniform(0.15, 0.3))).convert("RGB")
    noisy = np.asarray(img, np.float32) + rng.normal(0.0, 18.0, (img.height, img.width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def blurred_border(img: Image.Image, rng: np.random.Generator, _: Sequence[Image.Image]) -> Image.Image:
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.5, 3.5))))
    border = int(min(img.size) * rng.uniform(0.1, 0.25))
    return ImageOps.expand(img, border=border, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))


UNSEEN_EDITS: dict[str, Edit] = {"collage": collage, "skew": skew, "stripes": stripes, "upside_down": upside_down,
                                 "pixelated_noise": pixelated_noise, "blurred_border": blurred_border}


def unseen_pictures(manifest_csv: Path, exclude_set: str, split: str | None = "test",
                    photos: bool = False) -> list[dict[str, str]]:
    """Rows of the manifest from packages outside `exclude_set` (mtl.data.packages), of one
    split (every split with None): the real photographs with `photos`, the rest without."""
    excluded = set(package_names(exclude_set))
    with manifest_csv.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if split is None or r["split"] == split]
    return [r for r in rows if r["source"].removeprefix("debian:") not in excluded and is_photo_row(r) == photos]


def _references_and_others(rows: list[dict[str, str]], references: int,
                           rng: np.random.Generator) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """One image of each of `references` seeded pictures, and every image of the other pictures."""
    by_picture: dict[str, list[dict[str, str]]] = {}
    for row in sorted(rows, key=lambda r: r["id"]):
        by_picture.setdefault(row["group"], []).append(row)
    pictures = sorted(by_picture)
    pictures = [pictures[i] for i in rng.permutation(len(pictures))]
    if len(pictures) < 2 * references:
        raise ValueError(f"{len(pictures)} pictures, too few for {references} references and as many distractors")
    chosen = [by_picture[p][int(rng.integers(len(by_picture[p])))] for p in pictures[:references]]
    others = [row for p in pictures[references:] for row in by_picture[p]]
    return chosen, [others[i] for i in rng.permutation(len(others))]


def build_split(rows: list[dict[str, str]], corpus_dir: Path, out_dir: Path, references: int,
                seed: int = 7, photo_rows: Sequence[dict[str, str]] = (), photo_references: int = 0) -> Path:
    """Write references.csv, queries.csv and the images (evaluation-set format) to out_dir/test:
    a general part from `rows` and, with `photo_references`, a photo part from `photo_rows`
    (one reference per photograph, a copy of each, distractors from the other photographs),
    both searched in one gallery as in the evaluation set (the `part` column)."""
    rng = np.random.default_rng(seed)
    chosen, others = _references_and_others(rows, references, rng)
    parts = [("general", chosen, others[:references])]
    if photo_references:
        photo_chosen, photo_others = _references_and_others(list(photo_rows), photo_references, rng)
        parts.append(("photo", photo_chosen, photo_others[:photo_references]))
    # Collage backgrounds: other pictures, never a reference's.
    backgrounds = [Image.open(corpus_dir / r["path"]).convert("RGB") for r in others[:40]]
    split = out_dir / "test"
    (split / "references").mkdir(parents=True, exist_ok=True)
    (split / "queries").mkdir(exist_ok=True)
    gallery = [(part, row) for part, refs, _ in parts for row in refs]
    for _, row in gallery:
        Image.open(corpus_dir / row["path"]).convert("RGB").save(split / "references" / f"{row['id']}.jpg", quality=95)
    write_csv(pd.DataFrame({"reference_id": [r["id"] for _, r in gallery],
                            "path": [f"references/{r['id']}.jpg" for _, r in gallery],
                            "class": [r["class"] for _, r in gallery], "part": [part for part, _ in gallery]}),
              split / "references.csv")
    plans = [(part, r, r["id"]) for part, refs, _ in parts for r in refs] + \
            [(part, r, "") for part, _, distractors in parts for r in distractors]
    names, queries = list(UNSEEN_EDITS), []
    for number, index in enumerate(rng.permutation(len(plans))):
        part, row, reference = plans[index]
        name = names[number % len(names)]
        edited = UNSEEN_EDITS[name](Image.open(corpus_dir / row["path"]).convert("RGB"),
                                    np.random.default_rng((seed, number)), backgrounds)
        with atomic_path(split / "queries" / f"q{number:05d}.jpg") as tmp:
            edited.save(tmp, quality=90)
        queries.append({"query_id": f"q{number:05d}", "path": f"queries/q{number:05d}.jpg", "class": row["class"],
                        "reference_id": reference, "transformation": name, "held_out": True,
                        "source_id": row["id"], "source_group": row["group"], "part": part})
    write_csv(pd.DataFrame(queries), split / "queries.csv")
    return split


# Raw cosine and normalized scores (mtl.eval.normalize, k and β as the evaluation chose on val).
SCORE_KEYS = ("muap", "acc_at_1", "recall_at_p90", "muap_photo", "muap_clipart", "muap_norm", "acc_at_1_norm",
              "recall_at_p90_norm", "muap_photo_norm", "muap_clipart_norm")


def val_normalizations(operating_points: Path, checkpoint: Path) -> dict[str, Normalization]:
    """The search normalizations chosen on val (models/operating_points.json, written by the
    evaluation): the ImageNet backbone's for the 1280-d output, and the checkpoint's own for
    its embedding when the file names it. Empty where the file holds none."""
    if not operating_points.is_file():
        return {}
    chosen = {}
    for point in load_operating_points(operating_points).values():
        if point.search_normalization is None:
            continue
        if point.descriptor == "gap1280":
            chosen["gap1280"] = point.search_normalization
        elif point.checkpoint and Path(point.checkpoint).resolve() == checkpoint.resolve():
            chosen["mtl"] = point.search_normalization
    return chosen


def score_checkpoints(split_dir: Path, checkpoints: Sequence[Path], sizes: Sequence[int], cfg: EvalConfig,
                      operating_points: Path | None = None) -> pd.DataFrame:
    """One row per (method, input size): each checkpoint's embedding, and the ImageNet
    backbone's 1280-d output (from the first checkpoint, whose backbone must be
    untouched: a stage-1 checkpoint, or pass the ImageNet one first); normalized too where
    `operating_points` holds the val-chosen normalization."""
    rows = []
    for size in sizes:
        for number, checkpoint in enumerate(checkpoints):
            normalizations = val_normalizations(operating_points, checkpoint) if operating_points else {}
            scores = checkpoint_scores(checkpoint, split_dir, "test", cfg, size, normalizations=normalizations)
            kinds = ("gap1280", "mtl") if number == 0 else ("mtl",)
            for kind in kinds:
                name = "imagenet_gap1280" if kind == "gap1280" else str(checkpoint)
                rows.append({"method": name, "image_size": size,
                             **{k: scores[kind][k] for k in SCORE_KEYS if k in scores[kind]}})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtl.eval.generalization", description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, type=Path, help="a corpus manifest (its test split is used)")
    parser.add_argument("--exclude-package-set", default="default", help="leave out this set's packages")
    parser.add_argument("--checkpoint", action="append", required=True, type=Path,
                        help="repeatable; the first one's backbone gives the ImageNet row (a stage-1 checkpoint)")
    parser.add_argument("--references", type=int, default=300)
    parser.add_argument("--photo-references", type=int, default=95,
                        help="the photo part: real photographs of those packages, every split (0: none)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 160])
    parser.add_argument("--split-dir", type=Path, default=Path("data/generalization"))
    parser.add_argument("--out", type=Path, default=Path("results/generalization/table.csv"))
    parser.add_argument("--params", default="params.yaml", help="its `eval` section: batch size, k, precision")
    parser.add_argument("--operating-points", type=Path, default=Path("models/operating_points.json"),
                        help="the val-chosen normalizations (normalized columns where it has them)")
    args = parser.parse_args(argv)
    from mtl.params import load_params

    cfg = EvalConfig.from_params(load_params(args.params)["eval"])
    rows = unseen_pictures(args.manifest, args.exclude_package_set)
    photos = unseen_pictures(args.manifest, args.exclude_package_set, split=None, photos=True)
    build_split(rows, args.manifest.parent, args.split_dir, args.references, photo_rows=photos,
                photo_references=args.photo_references)
    table = score_checkpoints(args.split_dir, args.checkpoint, args.sizes, cfg, args.operating_points)
    write_csv(table, args.out)
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
