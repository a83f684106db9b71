"""Nearest references of each query: exact inner product with faiss.

Every descriptor in this study is a unit vector (hashes as ±1/√bits), so inner
product is cosine similarity and, for hashes, 1 − 2·hamming/bits.  Search is
exact (`IndexFlatIP`) so that methods differ only by their descriptors; large
galleries keep an on-disk index instead (flat or IVF-PQ, mtl.eval.index).
A GPU index is used when CUDA and faiss-gpu are both present.

    mtl search --queries q.npz --references r.npz --k 10 --out preds.csv
    mtl search --queries q.npz --index refs.index --k 10 --out preds.csv

Scores are normalized by default (mtl.eval.normalize, the references as background):
s' = s − β (ρ(q) + ρ(r)) / 2, with k and β those chosen on the val split for the
descriptor (models/operating_points.json, or the released model's card), else CSLS's
k = 10, β = 1; `--raw` searches plain cosine.  Each CSV row says its `scale` and keeps
the `cosine`.  With --references the normalized top k is exact; an index lists a raw
shortlist (`--shortlist`, default 10 x k) that is rescored with its stored densities.

(one eval-set file, `mtl embed --evalset`, may be given as both: its roles say which is which)

Queries and references must have been embedded the same way (their provenance:
method, checkpoint, input size, normalization); `--force` searches anyway.
Files written before provenance was recorded are searched with a warning.
Ids that are not UTF-8 (file names in another encoding) are written to the CSV
as the file system's bytes, so every row names its file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from mtl.eval.decision import apply_gate, attach_class_agreement
from mtl.eval.embeddings import EmbeddingResult, Provenance, load_npz
from mtl.eval.index import ReferenceIndex, as_float32_matrix, build_flat_index
from mtl.eval.normalize import (Normalization, collection_densities, densities_from_top, normalized_top_k,
                                rescore_predictions)
from mtl.io import UserError, overlaps, write_csv

# CSLS's own setting (Conneau et al. 2018), for descriptors the operating points do not know.
DEFAULT_NORMALIZATION = Normalization(10, 1.0, "references")
SHORTLIST_FACTOR = 10


@dataclass(frozen=True)
class SearchResult:
    predictions: pd.DataFrame  # query_id, reference_id, score, rank (1 = nearest)
    seconds: float             # wall time of index build + search
    n_queries: int

    @property
    def ms_per_query(self) -> float:
        return 1000.0 * self.seconds / max(self.n_queries, 1)


def search(query_embeddings: np.ndarray, query_ids, reference_embeddings: np.ndarray,
           reference_ids, k: int = 10, use_gpu: bool | None = None) -> SearchResult:
    """Top-k references of each query by inner product, as a predictions table."""
    queries = as_float32_matrix(query_embeddings, "query embeddings")
    references = as_float32_matrix(reference_embeddings, "reference embeddings")
    if queries.shape[1] != references.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != reference dim {references.shape[1]}")
    query_ids, reference_ids = np.asarray(query_ids).astype(str), np.asarray(reference_ids).astype(str)
    if len(query_ids) != len(queries) or len(reference_ids) != len(references):
        raise ValueError("ids and embeddings differ in length")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, len(references))
    start = time.perf_counter()
    if k == 0 or len(queries) == 0:
        scores = np.zeros((len(queries), 0), np.float32)
        neighbours = np.zeros((len(queries), 0), np.int64)
    else:
        scores, neighbours = build_flat_index(references, use_gpu).search(queries, k)
    seconds = time.perf_counter() - start
    return SearchResult(predictions_table(query_ids, reference_ids, scores, neighbours), seconds, len(queries))


def normalized_search(query_embeddings: np.ndarray, query_ids, reference_embeddings: np.ndarray, reference_ids,
                      normalization: Normalization, k: int = 10) -> SearchResult:
    """Top-k references of each query on the normalized scale, exactly (the references as
    background); `score` is s', `cosine` the raw similarity."""
    queries = as_float32_matrix(query_embeddings, "query embeddings")
    references = as_float32_matrix(reference_embeddings, "reference embeddings")
    if queries.shape[1] != references.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != reference dim {references.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    start = time.perf_counter()
    rho_q, rho_r = collection_densities(queries, references, normalization)
    scores, rows = normalized_top_k(queries, rho_q, references, rho_r, normalization.beta, k)
    seconds = time.perf_counter() - start
    predictions = predictions_table(np.asarray(query_ids).astype(str), np.asarray(reference_ids).astype(str),
                                    scores, rows)
    query_row = np.repeat(np.arange(len(queries)), [int((r >= 0).sum()) for r in rows])
    predictions["cosine"] = np.einsum("ij,ij->i", queries[query_row], references[rows[rows >= 0]]).astype(np.float64)
    return SearchResult(predictions, seconds, len(queries))


def normalized_search_index(query_embeddings: np.ndarray, query_ids, index: ReferenceIndex,
                            normalization: Normalization, k: int = 10, shortlist: int | None = None,
                            nprobe: int | None = None) -> SearchResult:
    """Top-k of each query in an on-disk index on the normalized scale: a raw shortlist
    from the index, rescored with the stored reference densities and the query's own
    (the mean of its k_norm best raw scores in the index)."""
    reference_density = index.densities(normalization.k)
    query_ids = np.asarray(query_ids).astype(str)
    depth = min(max(shortlist or SHORTLIST_FACTOR * k, normalization.k, k), max(index.ntotal, 1))
    start = time.perf_counter()
    scores, rows = index.search(query_embeddings, depth, nprobe)
    query_density = densities_from_top(np.where(rows >= 0, scores, np.nan)[:, :normalization.k], normalization.k)
    found = predictions_table(query_ids, index.ids, scores, rows)
    by_id = dict(zip(index.ids, reference_density))
    rescored = rescore_predictions(found, dict(zip(query_ids, query_density)), by_id, normalization)
    rescored = rescored[rescored["rank"] <= k].rename(columns={"raw_score": "cosine"}).reset_index(drop=True)
    return SearchResult(rescored, time.perf_counter() - start, len(query_ids))


def search_normalization(queries: EmbeddingResult, operating_points: Path | None) -> tuple[Normalization, str]:
    """The normalization `mtl search` applies to these queries' descriptor, and where it
    comes from: the operating point made for it (same descriptor; for a checkpoint, the
    same file), else CSLS's default."""
    from mtl.eval.operating_points import load_operating_points

    from mtl.release import load_release

    provenance = queries.provenance
    release = load_release()
    sources = [operating_points] + ([release.operating_points_path] if release is not None else [])
    for source in sources:
        if source is None or provenance is None:
            continue
        try:
            points = load_operating_points(source)
        except FileNotFoundError:
            continue
        for name, point in points.items():
            same_kind = point.descriptor == provenance.kind
            same_model = point.descriptor != "mtl" or point.checkpoint_digest == provenance.checkpoint
            if same_kind and same_model and point.search_normalization is not None:
                return point.search_normalization, f"{source} ({name}, chosen on val)"
    return DEFAULT_NORMALIZATION, "CSLS's default (no operating point for these descriptors)"


def predictions_table(query_ids: np.ndarray, reference_ids: np.ndarray, scores: np.ndarray,
                      neighbours: np.ndarray) -> pd.DataFrame:
    """faiss's (scores, rows) as query_id, reference_id, score, rank (1 = nearest)."""
    rows, cols = np.nonzero(neighbours >= 0)  # faiss pads with -1 when fewer than k exist
    return pd.DataFrame({
        "query_id": np.asarray(query_ids)[rows],
        "reference_id": np.asarray(reference_ids)[neighbours[rows, cols]],
        "score": scores[rows, cols].astype(np.float64),
        "rank": cols + 1,
    })


def search_index(query_embeddings: np.ndarray, query_ids, index, k: int = 10, nprobe: int | None = None,
                 use_gpu: bool | None = None) -> SearchResult:
    """Top-k of each query in an on-disk index (mtl.eval.index.ReferenceIndex)."""
    query_ids = np.asarray(query_ids).astype(str)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    start = time.perf_counter()
    scores, neighbours = index.search(query_embeddings, min(k, max(index.ntotal, 1)), nprobe,
                                      use_gpu=use_gpu is not False)
    seconds = time.perf_counter() - start
    return SearchResult(predictions_table(query_ids, index.ids, scores, neighbours), seconds, len(query_ids))


def pairs_above(embeddings: np.ndarray, min_score: float,
                block: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of rows (i < j) whose inner product is at least `min_score`:
    all against all, exact (faiss range search, on the CPU: faiss has no GPU range
    search).  Returns (i, j, score) arrays.  Queries go in blocks so that memory
    grows with the number of pairs found, not with n^2."""
    x = as_float32_matrix(embeddings, "embeddings")
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if len(x) < 2:
        return empty
    index = build_flat_index(x, use_gpu=False)
    # faiss keeps scores strictly above the radius; ask a hair lower, then apply >=.
    radius = float(min_score) - 1e-6
    found = []
    for start in range(0, len(x), block):
        lims, scores, labels = index.range_search(x[start:start + block], radius)
        rows = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = (labels > rows) & (scores >= min_score)  # each pair once, never an image with itself
        found.append((rows[keep], labels[keep].astype(np.int64), scores[keep]))
    return tuple(np.concatenate(parts) for parts in zip(*found)) if found else empty


def decide(predictions: pd.DataFrame, queries: EmbeddingResult, references: EmbeddingResult | ReferenceIndex,
           threshold: float | None = None, gate: bool = False) -> pd.DataFrame:
    """The duplicate decision on top of the neighbours: the class gate (matches whose
    predicted content classes differ are dropped), then the score threshold."""
    if gate:
        if queries.class_probs is None or references.class_probs is None:
            raise UserError("--gate needs class probabilities in both .npz files "
                            "(embed them with an MTL checkpoint, not a hash or backbone_gap1280)")
        predictions = apply_gate(attach_class_agreement(predictions, queries.ids, queries.class_probs,
                                                        references.ids, references.class_probs))
    if threshold is not None:
        predictions = predictions[predictions["score"] >= threshold].reset_index(drop=True)
    return predictions


def check_compatible(queries, references, names: tuple[Path, Path], force: bool = False) -> None:
    """Refuse to compare vectors made differently (one line naming the difference),
    unless `force`; vectors of different lengths cannot be compared at all."""
    if queries.dim != references.dim:
        raise UserError(f"queries {names[0]} are {queries.dim}-d but references {names[1]} are "
                        f"{references.dim}-d: embed both with the same method")
    if force:
        return
    if queries.provenance is None or references.provenance is None:
        unknown = names[0] if queries.provenance is None else names[1]
        print(f"mtl search: warning: {unknown} records no provenance (written by an older mtl embed), so only "
              "the dimension was checked; embed it again to have the method checked too", file=sys.stderr)
        return
    differences = queries.provenance.differences(references.provenance)
    if differences:
        raise UserError(f"queries {names[0]} and references {names[1]} were embedded differently "
                        f"({'; '.join(differences)}): embed both the same way, or pass --force to search anyway")


def main(argv: list[str] | None = None) -> int:
    from mtl.eval.operating_points import DEFAULT_OPERATING_POINTS

    parser = argparse.ArgumentParser(prog="mtl search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", required=True, type=Path, help="query embeddings (.npz)")
    gallery = parser.add_mutually_exclusive_group(required=True)
    gallery.add_argument("--references", type=Path, help="reference embeddings (.npz), searched exactly")
    gallery.add_argument("--index", type=Path, help="an index folder (`mtl index build`) instead of --references")
    parser.add_argument("--nprobe", type=int, help="with an IVF-PQ --index: lists to visit (default: its own)")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    parser.add_argument("--out", required=True, type=Path, help="predictions CSV")
    parser.add_argument("--cpu", action="store_true", help="never use a GPU index")
    parser.add_argument("--raw", action="store_true", help="plain cosine scores, no normalization")
    parser.add_argument("--norm-k", type=int, help="normalization: neighbours of the density (default: chosen on val)")
    parser.add_argument("--norm-beta", type=float, help="normalization: its weight beta (default: chosen on val)")
    parser.add_argument("--operating-points", type=Path, default=DEFAULT_OPERATING_POINTS,
                        help=f"where the val-chosen normalization is read (default {DEFAULT_OPERATING_POINTS})")
    parser.add_argument("--shortlist", type=int, help="with --index: raw candidates rescored per query "
                        f"(default {SHORTLIST_FACTOR} x k)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="keep only matches scoring at least this, on the scale searched (normalized unless "
                             "--raw; operating_points.json's `search` entry holds the val thresholds)")
    parser.add_argument("--gate", action="store_true",
                        help="drop matches whose predicted content classes differ (needs class "
                             "probabilities in both files, i.e. embeddings from an MTL checkpoint)")
    parser.add_argument("--force", action="store_true",
                        help="search even when queries and references were embedded differently")
    args = parser.parse_args(argv)
    for given in (args.queries, args.references or args.index):
        if overlaps(args.out, given):
            raise UserError(f"--out {args.out} would overwrite the input {given}: give another file")
    # An eval-set embedding (`mtl embed --evalset`) holds both roles in one file.
    queries = load_npz(args.queries)
    queries = queries.role("query") if queries.roles is not None else queries
    normalization, source = None, "raw cosine"
    if not args.raw:
        normalization, source = search_normalization(queries, args.operating_points)
        if args.norm_k is not None or args.norm_beta is not None:
            normalization = Normalization(args.norm_k or normalization.k,
                                          normalization.beta if args.norm_beta is None else args.norm_beta)
            source = "--norm-k/--norm-beta"
    if args.index is not None:
        references = ReferenceIndex.load(args.index)  # ids and class probabilities, for --gate
        embedded = references.provenance.get("embedding")
        check_compatible(queries, SimpleNamespace(dim=references.dim, provenance=None if embedded is None else
                                                  Provenance.from_json(json.dumps(embedded))),
                         (args.queries, args.index), args.force)
        if normalization is None:
            result = search_index(queries.embeddings, queries.ids, references, args.k, args.nprobe,
                                  use_gpu=False if args.cpu else None)
        else:
            try:
                result = normalized_search_index(queries.embeddings, queries.ids, references, normalization, args.k,
                                                 args.shortlist, args.nprobe)
            except ValueError as error:
                raise UserError(str(error)) from None
    else:
        references = load_npz(args.references)
        references = references.role("reference") if references.roles is not None else references
        check_compatible(queries, references, (args.queries, args.references), args.force)
        if normalization is None:
            result = search(queries.embeddings, queries.ids, references.embeddings, references.ids,
                            k=args.k, use_gpu=False if args.cpu else None)
        else:
            result = normalized_search(queries.embeddings, queries.ids, references.embeddings, references.ids,
                                       normalization, args.k)
    predictions = decide(result.predictions, queries, references, args.threshold, args.gate)
    predictions.insert(3, "scale", "cosine" if normalization is None else "normalized")
    write_csv(predictions, args.out, encoding="utf-8", errors="surrogateescape")
    scale = "raw cosine" if normalization is None else f"{normalization.describe()}, from {source}"
    print(f"{len(predictions)} predictions for {result.n_queries} queries "
          f"({result.ms_per_query:.3f} ms/query) -> {args.out}\nscore column: {scale}")
    return 0
