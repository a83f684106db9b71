"""`mtl dedup` against imagededup on the same folders: pair precision, recall, F1, time and
memory, and how far each operating point's threshold transfers from the val folder it was
chosen on to larger folders.

Folders (each copied flat into a temporary folder; the eval set is never touched):
  test    the test split's references, their copies and the distractors (2,400 images)
  large   `test` plus distractor pictures the default study never trains on, up to
          --large-size images (default 10,000): full-corpus images from packages outside
          the default set (--full-corpus, built by `mtl corpus --profile profiles/full.yaml`)
Ground truth: a reference and its copies are all copies of each other; every other pair
is distinct, except pairs of two images from one picture that is no reference (two
distractors made from one source, two tiles of one wallpaper): neither the eval set nor a
person can say, so they are left out of the scores.

The large folder's extra pictures are labelled against the test images (none is a copy of
one) but not among themselves: the corpus drops only pHash near-duplicates, and icon themes
hold one design in many variants (with an emblem, in another colour, in a sister theme).
So each row has two precisions: `precision` counts every accepted pair of two extra
pictures as wrong (a lower bound), `precision_labelled` leaves those pairs out (the pairs
whose truth is known: 5x more negatives than the test folder holds).  The trained model's
accepted pairs of two extra pictures are listed in results/dedup/unlabelled_pairs.csv, and a
seeded sample of them drawn in unlabelled_pairs.png (`--sheet-only` draws it again from the
list), to see what they are.

Rows, each at its settings:
  imagededup_phash         imagededup 0.3.3, PHash().find_duplicates(max_distance_threshold=10)
  mtl_<method>_raw         mtl dedup --method <method> --raw: the raw score, its val threshold
  mtl_<method>             mtl dedup --method <method>: its default (normalized by the folder)
  mtl_trained_combined     the trained model's combined decision (pHash within r bits, or the
                           normalized score), when the operating points hold one
for <method> phash, imagenet and trained (the operating points' `best`, or --checkpoint).

Time: wall seconds per 1,000 images of one cold run (empty cache: decoding, hashing or
embedding, densities, all-pairs search), then the same folder again (nothing new to
embed); images/s of the cold run; peak memory: the maximum resident set of the process
that ran it (each row runs in a process of its own).

    python benchmarks/dedup_vs_imagededup.py [--eval-dir data/eval] [--full-corpus data/corpus_full]
        [--large-size 10000] [--operating-points models/operating_points.json] [--checkpoint CKPT]
        [--out results/dedup/benchmark.csv] [--unlabelled results/dedup/unlabelled_pairs.csv]
    python benchmarks/dedup_vs_imagededup.py --sheet-only      # the sheet again, from the list
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
import types
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from mtl.data.manifest import rank_key
from mtl.eval.evaluation import EvalSplit
from mtl.eval.folder import folder_keys
from mtl.eval.generalization import unseen_pictures as unseen_pictures_of


def build_folder(split_dir: Path, folder: Path, extra: list[tuple[Path, str]] = ()
                 ) -> tuple[set[frozenset[str]], set[frozenset[str]]]:
    """Copy an eval split's references and queries, and `extra` (path, picture) distractor
    images, into `folder` (flat); return (the true copy pairs, the unknown pairs), by file
    name, from the ground truth the operating points are chosen with (mtl.eval.folder)."""
    split = EvalSplit.load(split_dir.parent, split_dir.name)
    copy_of, source_of = folder_keys(split)
    paths = {**dict(zip(split.references["reference_id"], split.references["path"])),
             **dict(zip(split.queries["query_id"], split.queries["path"]))}
    folder.mkdir(parents=True)
    copies, pictures = defaultdict(set), defaultdict(set)
    for image_id, path in paths.items():
        shutil.copy2(path, folder / Path(path).name)
        if copy_of[image_id] is not None:
            copies[copy_of[image_id]].add(Path(path).name)
        elif source_of[image_id] is not None:
            pictures[source_of[image_id]].add(Path(path).name)
    for path, picture in extra:
        name = extra_name(path)
        shutil.copy2(path, folder / name)
        pictures[f"extra:{picture}"].add(name)
    return _pairs_within(copies.values()), _pairs_within(pictures.values())


def extra_name(path: Path) -> str:
    """An extra picture's file name in the folder."""
    return f"extra-{path.name}"


def is_unlabelled(pair: frozenset[str]) -> bool:
    """A pair of two extra pictures (build_folder names them extra-*): no label says whether
    they are two variants of one design."""
    return all(name.startswith("extra-") for name in pair)


def unseen_pictures(full_corpus: Path, n: int, seed: int = 0) -> list[tuple[Path, str]]:
    """`n` images (seeded) of the full corpus from packages outside the default set: the
    default study never trains on them, and none is a copy of an eval-set picture."""
    rows = unseen_pictures_of(full_corpus / "manifest.csv", "default", split=None)
    if len(rows) < n:
        raise ValueError(f"{full_corpus} holds {len(rows)} images outside the default packages; need {n}")
    chosen = sorted(rows, key=lambda r: rank_key(seed, r["id"]))[:n]
    return [(full_corpus / r["path"], r.get("group") or r["id"]) for r in chosen]


def _pairs_within(sets) -> set[frozenset[str]]:
    return {frozenset(pair) for members in sets for pair in itertools.combinations(sorted(members), 2)}


def scores(predicted: set[frozenset[str]], truth: set[frozenset[str]],
           unknown: set[frozenset[str]]) -> dict[str, float]:
    """Pair precision, recall and F1, every accepted pair of two extra pictures counted as
    wrong; and `precision_labelled` / `f1_labelled`, those pairs left out."""
    predicted = predicted - unknown
    labelled = {pair for pair in predicted if not is_unlabelled(pair)}
    tp = len(predicted & truth)
    recall = tp / len(truth)
    precision = tp / len(predicted) if predicted else 1.0
    precision_labelled = tp / len(labelled) if labelled else 1.0
    return {"true_pairs": len(truth), "predicted_pairs": len(predicted), "true_positives": tp,
            "precision": precision, "recall": recall, "f1": _f1(precision, recall),
            "unlabelled_pairs": len(predicted) - len(labelled), "precision_labelled": precision_labelled,
            "f1_labelled": _f1(precision_labelled, recall)}


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision * recall else 0.0


def write_unlabelled(predicted: set[frozenset[str]], scores_of: dict, sources: dict[str, Path], out: Path) -> Path:
    """The accepted pairs of two extra pictures, with their scores and the corpus files they
    were copied from (so the sheet can be drawn again without the folder)."""
    pairs = sorted((tuple(sorted(pair)) for pair in predicted if is_unlabelled(pair)),
                   key=lambda pair: -scores_of[frozenset(pair)])
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"a": [a for a, _ in pairs], "b": [b for _, b in pairs],
                  "score": [scores_of[frozenset(pair)] for pair in pairs],
                  "source_a": [str(sources[a]) for a, _ in pairs],
                  "source_b": [str(sources[b]) for _, b in pairs]}).to_csv(out, index=False)
    return out


def unlabelled_sheet(pairs_csv: Path, out: Path, n: int = 16, columns: int = 4, seed: int = 0, box: int = 112) -> Path:
    """A seeded random sample of the listed pairs, each pair side by side with its score:
    what the lower-bound precision counts as wrong."""
    from mtl.data.sheets import thumbnail_grid

    pairs = pd.read_csv(pairs_csv)
    sample = pairs.sample(n=min(n, len(pairs)), random_state=seed).sort_values("score", ascending=False)
    pair_w, pair_h, gap = 2 * box + 6, box + 18, 18
    rows = -(-len(sample) // columns)
    sheet = Image.new("RGB", (columns * (pair_w + gap) + gap, rows * (pair_h + gap) + 40), "white")
    ImageDraw.Draw(sheet).text((gap, 10), f"{len(sample)} of {len(pairs):,} accepted pairs of two extra pictures "
                               f"(seeded sample; normalized score under each pair)", fill="black")
    for i, row in enumerate(sample.itertuples()):
        pair = thumbnail_grid([[Path(row.source_a), Path(row.source_b)]], box, (box + 6, 0), (0, 0),
                              (pair_w, pair_h), labels=[((0, box + 4), f"{row.score:+.3f}", "black")])
        sheet.paste(pair, (gap + (i % columns) * (pair_w + gap), 40 + (i // columns) * (pair_h + gap)))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def imagededup_phash(folder: str) -> dict:
    # imagededup.methods imports its CNN, which downloads ImageNet weights at import time;
    # only the hash methods are used here, so that module is stood in for.
    stub = types.ModuleType("imagededup.methods.cnn")
    stub.CNN = None
    sys.modules.setdefault("imagededup.methods.cnn", stub)
    # imagededup hashes in a multiprocessing Pool: forked workers keep the stand-in (spawned
    # ones would import the real CNN module and hang on its download).
    multiprocessing.set_start_method("fork", force=True)
    from imagededup.methods import PHash

    start = time.perf_counter()
    found = PHash(verbose=False).find_duplicates(image_dir=Path(folder), max_distance_threshold=10)
    seconds = time.perf_counter() - start
    return {"pairs": {frozenset((a, b)) for a, dups in found.items() for b in dups}, "seconds": seconds,
            "peak_mb": _peak_mb()}


def mtl_dedup(folder: str, cache: str, options: dict) -> dict:
    """One cold run and one warm run of `mtl dedup`, in this (fresh) process."""
    from mtl.dedup import find_duplicates

    start = time.perf_counter()
    result = find_duplicates(Path(folder), cache_dir=Path(cache), **options)
    seconds = time.perf_counter() - start
    peak = _peak_mb()
    start = time.perf_counter()
    rerun = find_duplicates(Path(folder), cache_dir=Path(cache), **options)
    warm = time.perf_counter() - start
    kept = result.pairs[result.pairs["kept"]]
    m = result.method
    return {"pairs": {frozenset(p) for p in zip(kept["a"], kept["b"])}, "seconds": seconds, "warm_seconds": warm,
            "scores": {frozenset((a, b)): float(s) for a, b, s in zip(kept["a"], kept["b"], kept["score"])},
            "new_on_rerun": rerun.embedded.n_new, "unreadable": len(result.embedded.failed), "peak_mb": peak,
            "embedded": result.embedded.n_new, "embed_seconds": result.embedded.embed_seconds,
            "threshold": m.threshold, "scale": "raw" if m.normalization is None else "normalized",
            "hamming_radius": m.hamming_radius, "source": m.threshold_source + (", class gate on" if m.gate else ""),
            "model": m.model_note}


def in_own_process(function, *args) -> dict:
    """Run `function(*args)` in a fresh process (its peak memory is its own).  Not a Pool
    worker: those are daemonic and may not start processes, which imagededup's hashing does."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def mtl_rows(checkpoint: Path | None, points: Path) -> dict[str, dict]:
    """Each mtl row's dedup options (see the module docstring)."""
    from mtl.dedup.thresholds import DedupSetupError, resolve_method

    trained = str(checkpoint) if checkpoint else "best"
    rows = {}
    for name, method in (("phash", "phash"), ("imagenet", "imagenet"), ("trained", trained)):
        try:
            default = resolve_method(method, points, decision="threshold")
        except DedupSetupError as error:
            print(f"mtl_{name} skipped: {error}", flush=True)
            continue
        rows[f"mtl_{name}_raw"] = {"method": method, "raw": True, "decision": "threshold"}
        if default.normalization is not None:
            rows[f"mtl_{name}"] = {"method": method, "decision": "threshold"}
        if name == "trained":
            try:
                resolve_method(method, points, decision="combined")
                rows["mtl_trained_combined"] = {"method": method, "decision": "combined"}
            except DedupSetupError:
                pass
    return rows


def run_folder(name: str, folder: Path, truth, unknown, work: Path, rows_options: dict, points: Path,
               record, unlabelled: tuple[dict[str, Path], Path] | None = None) -> list[dict]:
    """Every row on one folder; `record(row)` keeps each as it comes (nothing lost on a stop),
    and a row that fails is recorded with its error while the others go on.  `unlabelled`:
    (the extra pictures' sources by name, the CSV) where the trained model's accepted pairs
    of two extra pictures are listed, and drawn beside it (unlabelled_sheet)."""
    n_images = sum(1 for _ in folder.iterdir())
    print(f"{name} folder: {n_images:,} images, {len(truth):,} true copy pairs, {len(unknown):,} unknown; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    found = in_own_process(imagededup_phash, str(folder))
    rows = [{"folder": name, "images": n_images, "method": "imagededup_phash", "scale": "hash",
             "threshold": "10 bits", "threshold_source": "imagededup default",
             **scores(found["pairs"], truth, unknown), "s_per_1000_images": 1000 * found["seconds"] / n_images,
             "images_per_second": n_images / found["seconds"], "peak_mb": found["peak_mb"],
             "load_average": os.getloadavg()[0]}]
    record(rows[-1])
    for row_name, options in rows_options.items():
        cache = work / f"cache-{name}-{row_name}"
        try:
            run = in_own_process(mtl_dedup, str(folder), str(cache), {**options, "operating_points": points})
        except Exception as error:  # noqa: BLE001 - a failed row is reported, the benchmark goes on
            print(f"{name} {row_name}: failed: {type(error).__name__}: {error}", flush=True)
            rows.append({"folder": name, "images": n_images, "method": row_name,
                         "error": f"{type(error).__name__}: {error}"})
            record(rows[-1])
            continue
        rows.append({"folder": name, "images": n_images, "method": row_name, "scale": run["scale"],
                     "threshold": f"{run['threshold']:.4f}" + (f" or pHash ≤ {run['hamming_radius']} bits"
                                                               if run["hamming_radius"] is not None else ""),
                     "threshold_source": run["source"], **scores(run["pairs"], truth, unknown),
                     "s_per_1000_images": 1000 * run["seconds"] / n_images,
                     "warm_s_per_1000_images": 1000 * run["warm_seconds"] / n_images,
                     "images_per_second": n_images / run["seconds"], "new_on_rerun": run["new_on_rerun"],
                     "unreadable": run["unreadable"], "peak_mb": run["peak_mb"], "model": run["model"],
                     "load_average": os.getloadavg()[0]})
        record(rows[-1])
        if unlabelled is not None and row_name == "mtl_trained":
            sources, pairs_csv = unlabelled
            write_unlabelled(run["pairs"] - unknown, run["scores"], sources, pairs_csv)
            unlabelled_sheet(pairs_csv, pairs_csv.with_suffix(".png"))
        print(f"{name} {row_name}: F1 {rows[-1]['f1']:.3f} (precision {rows[-1]['precision']:.3f}, recall "
              f"{rows[-1]['recall']:.3f}) in {run['seconds']:.1f} s, peak {run['peak_mb']:.0f} MB", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-dir", type=Path, default=Path("data/eval"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--full-corpus", type=Path, default=Path("data/corpus_full"),
                        help="the large folder's extra pictures come from it (skipped when it is not built)")
    parser.add_argument("--large-size", type=int, default=10_000)
    parser.add_argument("--operating-points", type=Path, default=Path("models/operating_points.json"))
    parser.add_argument("--checkpoint", type=Path, help="the trained model (default: the operating points' best)")
    parser.add_argument("--out", type=Path, default=Path("results/dedup/benchmark.csv"))
    parser.add_argument("--unlabelled", type=Path, default=Path("results/dedup/unlabelled_pairs.csv"),
                        help="the trained model's accepted pairs of two extra pictures (and a sheet beside it)")
    parser.add_argument("--sheet-only", action="store_true", help="only draw the sheet again, from --unlabelled")
    args = parser.parse_args(argv)
    if args.sheet_only:
        print(f"-> {unlabelled_sheet(args.unlabelled, args.unlabelled.with_suffix('.png'))}")
        return 0

    rows_options = mtl_rows(args.checkpoint, args.operating_points)
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".partial.csv")

    def record(row: dict) -> None:
        rows.append(row)
        pd.DataFrame(rows).to_csv(partial, index=False)

    with tempfile.TemporaryDirectory(prefix="dedup-bench-") as tmp:
        work = Path(tmp)
        truth, unknown = build_folder(args.eval_dir / args.split, work / "test")
        run_folder("test", work / "test", truth, unknown, work, rows_options, args.operating_points, record)
        if (args.full_corpus / "manifest.csv").is_file():
            base = sum(1 for _ in (work / "test").iterdir())
            extra = unseen_pictures(args.full_corpus, args.large_size - base)
            truth, unknown = build_folder(args.eval_dir / args.split, work / "large", extra)
            run_folder("large", work / "large", truth, unknown, work, rows_options, args.operating_points, record,
                       ({extra_name(path): path for path, _ in extra}, args.unlabelled))
        else:
            print(f"large folder skipped: {args.full_corpus} is not built (mtl corpus --profile profiles/full.yaml)")
    table = pd.DataFrame(rows)
    table.to_csv(args.out, index=False)
    partial.unlink(missing_ok=True)
    print(table.drop(columns=["threshold_source", "model"], errors="ignore").to_string(index=False))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
