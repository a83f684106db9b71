"""`mtl dedup` against imagededup on the same folder: pair precision, recall, F1, wall time.

The folder is an eval split's references, their copies and the distractors, copied
flat into a temporary folder (the eval set itself is never touched).  Ground truth: a
reference and its copies are all copies of each other; every other pair is distinct,
except that two distractors made from the same picture (queries.csv `source_group`:
a repeated source, or another original of that picture) may or may not look alike, so
such pairs are left out of the scores, neither right nor wrong.

Rows, each at its default settings:
  imagededup_phash   imagededup 0.3.3, PHash().find_duplicates(max_distance_threshold=10)
  mtl_phash          mtl dedup --method phash (the operating point's radius, else 10 bits)
  mtl_imagenet       mtl dedup --method imagenet: the untrained ImageNet backbone (1280-d)
  mtl_trained        mtl dedup with the trained model, class gate on: --checkpoint, or the
                     operating points' `best` (skipped when there is neither)
A threshold comes from the operating points; where they have none (imagenet, or a
checkpoint they do not know) from --imagenet-threshold, else it is chosen here on the
val split: the lowest whose all-pairs precision on the val folder is >= 0.9.

Pairs are the direct pairs each method accepts.  Time: wall seconds per 1,000 images
of one cold run (empty cache: decoding, hashing or embedding, all-pairs search); then
each mtl row runs again on the same folder and must embed nothing new.

    python benchmarks/dedup_vs_imagededup.py [--eval-dir data/eval] [--split test]
        [--operating-points models/operating_points.json] [--checkpoint CKPT]
        [--out results/dedup/benchmark.csv]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time
import types
from collections import defaultdict
from pathlib import Path

import pandas as pd

from mtl.dedup import find_duplicates
from mtl.eval.evaluation import EvalSplit
from mtl.eval.metrics import threshold_for_precision
from mtl.eval.folder import folder_keys

TARGET_PRECISION = 0.9


def build_folder(split_dir: Path, folder: Path) -> tuple[set[frozenset[str]], set[frozenset[str]]]:
    """Copy references and queries into `folder` (flat); return (the true copy pairs,
    the unknown pairs: distractors of one picture), by file name, from the ground truth the
    operating points are chosen with (mtl.eval.folder.folder_keys)."""
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
    return _pairs_within(copies.values()), _pairs_within(pictures.values())


def _pairs_within(sets) -> set[frozenset[str]]:
    return {frozenset(pair) for members in sets for pair in itertools.combinations(sorted(members), 2)}


def scores(predicted: set[frozenset[str]], truth: set[frozenset[str]],
           unknown: set[frozenset[str]]) -> dict[str, float]:
    predicted = predicted - unknown
    tp = len(predicted & truth)
    precision = tp / len(predicted) if predicted else 0.0
    recall = tp / len(truth)
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {"true_pairs": len(truth), "predicted_pairs": len(predicted), "true_positives": tp,
            "precision": precision, "recall": recall, "f1": f1}


def imagededup_phash(folder: Path) -> tuple[set[frozenset[str]], float]:
    # imagededup.methods imports its CNN, which downloads ImageNet weights at import time;
    # only the hash methods are used here, so that module is stood in for.
    stub = types.ModuleType("imagededup.methods.cnn")
    stub.CNN = None
    sys.modules.setdefault("imagededup.methods.cnn", stub)
    from imagededup.methods import PHash

    start = time.perf_counter()
    found = PHash(verbose=False).find_duplicates(image_dir=folder, max_distance_threshold=10)
    seconds = time.perf_counter() - start
    return {frozenset((a, b)) for a, dups in found.items() for b in dups}, seconds


def mtl_dedup(folder: Path, cache: Path, **options) -> tuple[object, float]:
    start = time.perf_counter()
    result = find_duplicates(folder, cache_dir=cache, **options)
    return result, time.perf_counter() - start


def kept_pairs(result) -> set[frozenset[str]]:
    kept = result.pairs[result.pairs["kept"]]
    return {frozenset(pair) for pair in zip(kept["a"], kept["b"])}


def calibrate_on_val(eval_dir: Path, work: Path, method: str, floor: float = 0.3, **options) -> float:
    """The lowest threshold whose all-pairs precision on the val folder is >= 0.9."""
    truth, unknown = build_folder(eval_dir / "val", work / "val")
    result, _ = mtl_dedup(work / "val", work / "cache", method=method, threshold=floor, **options)
    pairs = [frozenset(p) for p in zip(result.pairs["a"], result.pairs["b"])]
    known = result.pairs.assign(correct=[p in truth for p in pairs])[[p not in unknown for p in pairs]]
    return threshold_for_precision(known, len(truth), TARGET_PRECISION)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-dir", type=Path, default=Path("data/eval"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--operating-points", type=Path, default=Path("models/operating_points.json"))
    parser.add_argument("--checkpoint", type=Path, help="the trained model (default: the operating points' best)")
    parser.add_argument("--imagenet-threshold", type=float, help="instead of the operating point or val calibration")
    parser.add_argument("--out", type=Path, default=Path("results/dedup/benchmark.csv"))
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="dedup-bench-") as tmp:
        work = Path(tmp)
        truth, unknown = build_folder(args.eval_dir / args.split, work / "folder")
        n_images = sum(1 for _ in (work / "folder").iterdir())
        print(f"{n_images} images, {len(truth)} true copy pairs, {len(unknown)} unknown ({args.split} split); "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

        predicted, seconds = imagededup_phash(work / "folder")
        rows.append({"method": "imagededup_phash", "threshold": "10 bits", "threshold_source": "imagededup default",
                     **scores(predicted, truth, unknown), "s_per_1000_images": 1000 * seconds / n_images,
                     "load_average": os.getloadavg()[0]})

        mtl_runs = {"mtl_phash": {"method": "phash"},
                    "mtl_imagenet": {"method": "imagenet", "threshold": args.imagenet_threshold}}
        if args.checkpoint or _has_entry(args.operating_points, "best"):
            mtl_runs["mtl_trained"] = {"method": str(args.checkpoint) if args.checkpoint else "best"}
        else:
            print(f"mtl_trained skipped: no --checkpoint and no 'best' in {args.operating_points} (make repro)")
        calibrated = set()
        for name, options in mtl_runs.items():
            if options.get("threshold") is None and _needs_threshold(options["method"], args.operating_points):
                calibrated.add(name)
                options["threshold"] = calibrate_on_val(args.eval_dir, work / name, options["method"],
                                                        operating_points=args.operating_points)
                print(f"{name}: threshold chosen on val for pair precision {TARGET_PRECISION}: "
                      f"{options['threshold']:.4f}", flush=True)
        for name, options in mtl_runs.items():
            cache = work / f"cache-{name}"
            result, seconds = mtl_dedup(work / "folder", cache, operating_points=args.operating_points, **options)
            rerun, warm = mtl_dedup(work / "folder", cache, operating_points=args.operating_points, **options)
            source = "val folder, pair precision 0.9" if name in calibrated else result.method.threshold_source
            rows.append({"method": name, "threshold": f"{result.method.threshold:.4f}",
                         "threshold_source": source + (", class gate on" if result.method.gate else ""),
                         **scores(kept_pairs(result), truth, unknown), "s_per_1000_images": 1000 * seconds / n_images,
                         "warm_s_per_1000_images": 1000 * warm / n_images, "new_on_rerun": rerun.embedded.n_new,
                         "unreadable": len(result.embedded.failed), "load_average": os.getloadavg()[0]})
            print(f"{name}: done in {seconds:.1f} s (rerun {warm:.1f} s, {rerun.embedded.n_new} new)", flush=True)

    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.to_markdown(index=False, floatfmt=".3f") if _has_tabulate() else table.to_string(index=False))
    print(f"-> {args.out}")
    return 0


def _needs_threshold(method: str, operating_points: Path) -> bool:
    """True when the operating points hold no threshold for this method."""
    from mtl.dedup.thresholds import DedupSetupError, resolve_method

    try:
        resolve_method(method, operating_points)
        return False
    except DedupSetupError:
        return True


def _has_entry(path: Path, name: str) -> bool:
    from mtl.eval.operating_points import load_operating_points

    try:
        return name in load_operating_points(path)
    except FileNotFoundError:
        return False


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401 - pandas' to_markdown needs it
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
