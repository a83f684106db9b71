"""What normalized search costs at scale: the reference densities of `mtl index build`
(each reference's k nearest similarities among the other references, mtl.eval.index),
exact in a flat index and approximate in IVF-PQ.

Part 1, cost (random unit vectors: the cost of a search does not depend on where its
vectors come from): for each gallery size, the seconds and peak memory of computing every
reference's densities through a flat index and through IVF-PQ.  A flat self-search is
quadratic; where it would take more than --flat-budget-s it is timed on a sample of rows of
the full-size index and the whole is extrapolated (rows x seconds per row), which the
table says.

Part 2, exactness (real descriptors, where neighbourhoods have structure): a gallery of
the test split's references plus full-corpus pictures from packages outside the default set,
the test queries searched in it with normalized scores (the val-chosen k and β), once with
exact (flat) densities and once with IVF-PQ's (the index's own neighbours, and a rescored
shortlist): how far the densities differ and what it does to
μAP and R@P90.

    python benchmarks/density_cost.py --sizes 100000 1000000 --csv results/scale/densities.csv
    python benchmarks/density_cost.py --exactness --checkpoint models/best/finetune/final.pt \\
        --full-corpus data/corpus_full --csv results/scale/densities_exactness.csv
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

DIM = 320
K = 10


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_gallery(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def densities_cost(n: int, kind: str, flat_budget_s: float, sample_rows: int = 2000) -> dict:
    """Build an index of n random vectors and compute every reference's densities; one
    thread, CPU seconds.  A flat self-search over budget is timed on `sample_rows` rows."""
    import faiss

    from mtl.eval.index import build_index

    faiss.omp_set_num_threads(1)
    x = random_gallery(n)
    started = time.process_time()
    index = build_index(x, np.arange(n).astype(str), kind, density_k=None)
    build_s = time.process_time() - started
    rows = n
    estimate = kind == "flat" and n * n * DIM / 2e10 > flat_budget_s  # ~20 GFLOP/s of one core
    if estimate:
        rows = sample_rows
    started = time.process_time()
    neighbours = index._self_search(x[:rows], 0, K)
    seconds = time.process_time() - started
    return {"references": n, "index": index.provenance["factory"], "k": K, "build_s": round(build_s, 1),
            "densities_s": round(seconds * n / rows, 1), "measured_rows": rows, "extrapolated": estimate,
            "densities_mb": round(neighbours.itemsize * K * n / 2**20, 1), "peak_mb": round(peak_mb())}


def in_own_process(function, *args) -> dict:
    with get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def exactness(checkpoint: Path, eval_dir: Path, full_corpus: Path, extra: int, image_size: int,
              operating_points: Path) -> list[dict]:
    """Part 2 of the module docstring."""
    from mtl.data.manifest import rank_key
    from mtl.eval.embed import embed
    from mtl.eval.embeddings import load_npz
    from mtl.eval.evaluation import EvalSplit
    from mtl.eval.generalization import unseen_pictures, val_normalizations
    from mtl.eval.images import images_in_evalset
    from mtl.eval.index import build_index
    from mtl.eval.metrics import label_predictions, retrieval_metrics
    from mtl.eval.search import normalized_search, normalized_search_index

    normalization = val_normalizations(operating_points, checkpoint).get("mtl")
    if normalization is None:
        raise SystemExit(f"{operating_points} holds no val-chosen search normalization for {checkpoint}")
    split = EvalSplit.load(eval_dir, "test")
    test = embed(str(checkpoint), **_evalset_args(images_in_evalset(eval_dir / "test")), image_size=image_size)
    refs, queries = test.role("reference"), test.role("query")
    # Only pictures from packages outside the default set: none of them is an eval-set picture
    # (or one of its copies), so every match to them is wrong, as in a real gallery.
    rows = unseen_pictures(full_corpus / "manifest.csv", "default", split=None)
    chosen = sorted(rows, key=lambda r: rank_key(0, r["id"]))[:extra]
    gallery = embed(str(checkpoint), [full_corpus / r["path"] for r in chosen], [f"extra-{r['id']}" for r in chosen],
                    image_size=image_size)
    vectors = np.concatenate([refs.embeddings, gallery.embeddings])
    ids = np.concatenate([refs.ids, gallery.ids])
    exact = normalized_search(queries.embeddings, queries.ids, vectors, ids, normalization, k=10).predictions
    out = []
    flat = build_index(vectors, ids, "flat", density_k=K)
    for nlist in (64, 256):
        index = build_index(vectors, ids, "ivfpq", nlist=nlist, nprobe=max(8, nlist // 8), density_k=K)
        error = np.abs(index.densities() - flat.densities())
        approx = normalized_search_index(queries.embeddings, queries.ids, index, normalization, k=10).predictions
        for name, predictions in (("exact densities, exact search", exact), (f"IVF{nlist}-PQ", approx)):
            scores = retrieval_metrics(label_predictions(predictions, split.queries), split.queries)
            out.append({"gallery": len(ids), "search": name, "nprobe": index.provenance["nprobe"],
                        "median_density_error": float(np.median(error)) if "IVF" in name else 0.0,
                        "p95_density_error": float(np.quantile(error, 0.95)) if "IVF" in name else 0.0,
                        "density_rank_correlation": float(pd.Series(index.densities()).corr(
                            pd.Series(flat.densities()), method="spearman")) if "IVF" in name else 1.0,
                        "muap": scores.muap, "recall_at_p90": scores.recall_at_p90})
    return out


def _evalset_args(images) -> dict:
    return {"image_paths": images.paths, "ids": images.ids, "roles": images.roles}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--flat-budget-s", type=float, default=600.0,
                        help="a flat self-search expected to take longer is timed on a sample and extrapolated")
    parser.add_argument("--exactness", action="store_true", help="part 2: real descriptors (needs a checkpoint)")
    parser.add_argument("--checkpoint", type=Path, default=Path("models/best/finetune/final.pt"))
    parser.add_argument("--eval-dir", type=Path, default=Path("data/eval"))
    parser.add_argument("--full-corpus", type=Path, default=Path("data/corpus_full"))
    parser.add_argument("--extra", type=int, default=20_000, help="part 2: full-corpus pictures added to the gallery")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--operating-points", type=Path, default=Path("models/operating_points.json"),
                        help="part 2: the val-chosen search normalization of the trained model")
    parser.add_argument("--csv", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.exactness:
        rows = exactness(args.checkpoint, args.eval_dir, args.full_corpus, args.extra, args.image_size,
                         args.operating_points)
    else:
        rows = []
        for n in args.sizes:
            for kind in ("flat", "ivfpq"):
                rows.append(in_own_process(densities_cost, n, kind, args.flat_budget_s))
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.csv, index=False)
    print(table.to_string(index=False))
    print(f"-> {args.csv} (load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
