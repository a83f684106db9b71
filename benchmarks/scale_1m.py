"""The memory claim at one million references: 320-d vs 1280-d, flat vs compressed.

The paper's argument for a 320-d embedding is memory: a quarter of MobileNetV2's
1280-d descriptor.  This measures what that buys in a faiss index of N = 1M
vectors: bytes held, search latency, and for one compressed index (IVF-PQ on
the 320-d vectors) how much recall@10 it gives up against exact search.

Database: random unit vectors (the cost of an index does not depend on where its
vectors come from), plus one planted copy of every query: the query moved to
cosine similarity `--copy-similarity` (0.75, about what a transformed copy
keeps), so each query has a true match among the N.  Queries: real embeddings
from .npz files (`mtl embed` output, query rows) when given, random otherwise.

Two recalls of the compressed index:
- copy recall@10: share of queries whose planted copy is in the top 10, for flat
  and for IVF-PQ; the number that matters for copy detection;
- top-10 overlap with flat: a pessimistic bound, since among random vectors the
  exact top 10 beyond the copy are near-ties with no structure to preserve.

    python benchmarks/scale_1m.py                       # N = 1M, random queries
    python benchmarks/scale_1m.py --n 200000            # scaled down
    python benchmarks/scale_1m.py --queries320 data/embeddings/test/mtl_finetune.npz \\
                                  --queries1280 data/embeddings/test/backbone_gap1280.npz

The on-disk index (mtl.eval.index, `mtl index build`) at several gallery sizes:

    nice -n 19 python benchmarks/scale_1m.py --index-sizes 1000000 10000000 \\
        --csv results/scale/index.csv

builds each index through the module, chunk by chunk (never all N x 320 floats at
once), saves it, loads it back and searches it: build seconds (training included),
index size, peak process memory, ms per query (a batch, and one at a time) and copy
recall@10, at two nprobe values.  Times are CPU seconds of one thread (faiss and BLAS
set to one thread), so that other jobs on a shared machine slow the wall clock, not the
numbers.  A flat index larger than --flat-limit-gb is not built: the exact top 10 that
"recall@10 vs flat" needs then comes from streaming the same vectors past the queries.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

CHUNK = 100_000


def random_unit_chunks(n: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    for start in range(0, n, CHUNK):
        x = rng.standard_normal((min(CHUNK, n - start), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield x


def load_queries(npz: str | None, dim: int, n_queries: int, seed: int) -> tuple[np.ndarray, str]:
    """(queries, source): real ones from `mtl embed` output when given, else random."""
    if npz is None:
        return next(random_unit_chunks(n_queries, dim, seed + 1)), "random"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mtl.eval.embeddings import load_npz

    result = load_npz(npz)
    if result.dim != dim:
        raise SystemExit(f"{npz} holds {result.dim}-d vectors, expected {dim}-d")
    rows = result.role("query") if result.roles is not None else result
    return np.ascontiguousarray(rows.embeddings[:n_queries]), f"real ({npz})"


def planted_copies(queries: np.ndarray, similarity: float, seed: int) -> np.ndarray:
    """Unit vectors at exactly cosine `similarity` to each query (random direction)."""
    noise = np.random.default_rng(seed + 2).standard_normal(queries.shape).astype(np.float32)
    noise -= (noise * queries).sum(axis=1, keepdims=True) * queries  # orthogonal to the query
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return (similarity * queries + np.sqrt(1 - similarity**2) * noise).astype(np.float32)


def copy_recall(neighbours: np.ndarray) -> float:
    """Share of queries whose planted copy (database row = query row) is returned."""
    return float(np.mean([i in row for i, row in enumerate(neighbours)]))


def fill_index(index, n: int, dim: int, planted: np.ndarray, seed: int) -> float:
    """Add N vectors (planted copies first, random after); seconds taken."""
    start = time.perf_counter()
    if len(planted):
        index.add(np.ascontiguousarray(planted, dtype=np.float32))
    for chunk in random_unit_chunks(n - len(planted), dim, seed):
        index.add(chunk)
    return time.perf_counter() - start


def timed_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """(neighbours, ms/query in one batch, ms for a single query)."""
    start = time.perf_counter()
    _, neighbours = index.search(queries, k)
    batch_ms = 1000 * (time.perf_counter() - start) / len(queries)
    singles = []
    for q in queries[:5]:
        start = time.perf_counter()
        index.search(q[None], k)
        singles.append(1000 * (time.perf_counter() - start))
    return neighbours, batch_ms, float(np.median(singles))


def recall_at_k(approximate: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact top-k that the approximate top-k also returns."""
    hits = [len(set(a) & set(e)) for a, e in zip(approximate, exact)]
    return float(np.sum(hits) / exact.size)


@dataclass
class IndexReport:
    name: str
    dim: int
    n: int
    index_bytes: int
    build_seconds: float
    search_ms_per_query_batch: float
    search_ms_single_query: float
    copy_recall_at_10: float
    recall_at_10_vs_flat: float = 1.0

    @property
    def bytes_per_vector(self) -> float:
        return self.index_bytes / self.n


def flat_index_report(n: int, dim: int, queries: np.ndarray, planted: np.ndarray, k: int, seed: int):
    import faiss

    index = faiss.IndexFlatIP(dim)
    build = fill_index(index, n, dim, planted, seed)
    neighbours, batch_ms, single_ms = timed_search(index, queries, k)
    report = IndexReport(f"Flat{dim}", dim, n, index.ntotal * index.code_size, build, batch_ms,
                         single_ms, copy_recall(neighbours))
    return report, index, neighbours


def compressed_report(flat_index, n: int, dim: int, queries: np.ndarray, exact: np.ndarray, k: int,
                      factory: str, nprobe: int, train_size: int) -> IndexReport:
    """A compressed index over the same vectors as `flat_index`, against its exact results."""
    import faiss

    start = time.perf_counter()
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).choice(n, size=min(train_size, n), replace=False)
    index.train(flat_index.reconstruct_batch(np.sort(sample)))
    for start_row in range(0, n, CHUNK):
        index.add(flat_index.reconstruct_n(start_row, min(CHUNK, n - start_row)))
    build = time.perf_counter() - start
    faiss.extract_index_ivf(index).nprobe = nprobe
    neighbours, batch_ms, single_ms = timed_search(index, queries, k)
    index_bytes = len(faiss.serialize_index(index))
    return IndexReport(f"{factory} (nprobe {nprobe})", dim, n, index_bytes, build,
                       batch_ms, single_ms, copy_recall(neighbours), recall_at_k(neighbours, exact))


# --------------------------------------------------------------------------- the on-disk index at scale

INDEX_COLUMNS = ("n", "index", "nprobe", "build_s", "index_mb", "peak_rss_mb", "load_s", "ms_per_query_batch",
                 "ms_single_query", "copy_recall_at_10", "recall_at_10_vs_flat", "note")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_timed_search(index, queries: np.ndarray, k: int, nprobe: int | None) -> tuple[np.ndarray, float, float]:
    """(rows, CPU ms/query in one batch, median CPU ms of single queries) through ReferenceIndex.search."""
    start = time.process_time()
    _, rows = index.search(queries, k, nprobe)
    batch_ms = 1000 * (time.process_time() - start) / len(queries)
    singles = []
    for q in queries[:20]:
        start = time.process_time()
        index.search(q[None], k, nprobe)
        singles.append(1000 * (time.process_time() - start))
    return rows, batch_ms, float(np.median(singles))


class ExactTopK:
    """The exact top-k inner products of the queries over vectors streamed in chunks."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries, self.k = queries, k
        self.scores = np.full((len(queries), k), -np.inf, np.float32)
        self.rows = np.full((len(queries), k), -1, np.int64)
        self.seen = 0

    def add(self, chunk: np.ndarray) -> None:
        scores = self.queries @ chunk.T
        if len(chunk) > self.k:  # the chunk's own top k first (linear), then merge with the best so far
            top = np.argpartition(-scores, self.k - 1, axis=1)[:, :self.k]
        else:
            top = np.broadcast_to(np.arange(len(chunk)), scores.shape)
        scores = np.concatenate([self.scores, np.take_along_axis(scores, top, 1)], axis=1)
        rows = np.concatenate([self.rows, top + self.seen], axis=1)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :self.k]
        self.scores, self.rows = np.take_along_axis(scores, best, 1), np.take_along_axis(rows, best, 1)
        self.seen += len(chunk)


def index_scaling(n: int, kind: str, queries: np.ndarray, planted: np.ndarray, k: int, nprobes: list[int],
                  flat_limit_gb: float, seed: int, work_dir: Path) -> list[dict]:
    """One kind of index over the n vectors, built through mtl.eval.index chunk by chunk,
    saved, loaded back and searched: a row per nprobe, with the rows it found.  A flat
    index over the size limit is not built; its exact top k are streamed instead."""
    import faiss

    from mtl.eval.index import ReferenceIndex, TRAINING_POINTS_PER_LIST, default_nlist

    faiss.omp_set_num_threads(1)
    dim = queries.shape[1]

    def chunks():
        """The n database vectors, planted copies first, in chunks, with their ids."""
        yield planted, [f"r{i}" for i in range(len(planted))]
        start = len(planted)
        for chunk in random_unit_chunks(n - len(planted), dim, seed):
            yield chunk, [f"r{i}" for i in range(start, start + len(chunk))]
            start += len(chunk)

    if kind == "flat" and n * dim * 4 > flat_limit_gb * 1e9:
        exact = ExactTopK(queries, k)
        for chunk, _ in chunks():
            exact.add(chunk)
        return [{"n": n, "index": "Flat", "nprobe": "", "build_s": float("nan"), "index_mb": n * dim * 4 / 2**20,
                 "peak_rss_mb": float("nan"), "load_s": float("nan"), "ms_per_query_batch": float("nan"),
                 "ms_single_query": float("nan"), "copy_recall_at_10": copy_recall(exact.rows), "found": exact.rows,
                 "note": f"not built (over {flat_limit_gb:g} GB): size computed, exact top 10 streamed in chunks"}]
    sample, nlist = None, None
    if kind == "ivfpq":  # trained on a random sample: the vectors are i.i.d., so a random
        nlist = default_nlist(n)  # subset of the first chunks is a uniform sample of all of them
        train_size = min(TRAINING_POINTS_PER_LIST * nlist, n)
        first = np.concatenate(list(random_unit_chunks(max(train_size, min(CHUNK, n)), dim, seed)))
        sample = first[np.random.default_rng(seed + 3).choice(len(first), size=train_size, replace=False)]
        del first
    started = time.process_time()
    index = ReferenceIndex.create(kind, dim, sample, nlist=nlist, method="synthetic")
    seconds = time.process_time() - started
    del sample
    for chunk, ids in chunks():  # ids are unique by construction: no check (a sort of all ids per chunk)
        started = time.process_time()
        index.add(chunk, ids, check_ids=False)
        seconds += time.process_time() - started
    path = work_dir / f"{kind}-{n}"
    index.save(path)
    del index  # searched as loaded back from disk, with no second copy around
    size_mb = (path / "index.faiss").stat().st_size / 2**20
    started = time.process_time()
    loaded = ReferenceIndex.load(path)
    load_s = time.process_time() - started
    shutil.rmtree(path)
    rows = []
    for nprobe in ([None] if kind == "flat" else nprobes):
        found, batch_ms, single_ms = cpu_timed_search(loaded, queries, k, nprobe)
        rows.append({"n": n, "index": loaded.provenance["factory"], "nprobe": nprobe or "", "build_s": seconds,
                     "index_mb": size_mb, "peak_rss_mb": peak_rss_mb(), "load_s": load_s,
                     "ms_per_query_batch": batch_ms, "ms_single_query": single_ms,
                     "copy_recall_at_10": copy_recall(found), "found": found, "note": ""})
    return rows


def run_index_scaling(args) -> int:
    import faiss

    faiss.omp_set_num_threads(1)
    queries, source = load_queries(args.queries320, 320, args.queries, args.seed)
    planted = planted_copies(queries, args.copy_similarity, args.seed)
    load = os.getloadavg()[0]
    print(f"faiss {faiss.__version__}, 1 thread, CPU-time clock; queries {source}; load {load:.1f} on "
          f"{os.cpu_count()} cores")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work_dir:
        for n in args.index_sizes:
            size_rows = []
            for kind in ("flat", "ivfpq"):  # each in a fresh process: its own peak memory
                with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                    size_rows += pool.submit(index_scaling, n, kind, queries, planted, args.k, args.nprobes,
                                             args.flat_limit_gb, args.seed, Path(work_dir)).result()
            exact = size_rows[0]["found"]
            for row in size_rows:
                row["recall_at_10_vs_flat"] = recall_at_k(row.pop("found"), exact)
                print("  " + "  ".join(f"{key}={row[key]:.4g}" if isinstance(row[key], float) else
                                       f"{key}={row[key]}" for key in INDEX_COLUMNS), flush=True)
            rows += size_rows
    loads = (load, os.getloadavg()[0])
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*INDEX_COLUMNS, "queries", "load_start", "load_end"])
            writer.writeheader()
            for row in rows:
                writer.writerow({**{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()},
                                 "queries": len(queries), "load_start": f"{loads[0]:.1f}",
                                 "load_end": f"{loads[1]:.1f}"})
        print(f"-> {args.csv}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="database vectors (default 1M)")
    parser.add_argument("--queries", type=int, default=200, help="queries timed (default 200)")
    parser.add_argument("--queries320", help="real 320-d queries: an `mtl embed` .npz")
    parser.add_argument("--queries1280", help="real 1280-d queries: an `mtl embed` .npz")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--index", default="IVF1024,PQ64x4fs",
                        help="compressed 320-d index (faiss factory string); the default stores "
                             "32 bytes per vector like PQ32, with 4-bit codes that train in seconds "
                             "(8-bit PQ32 training took minutes on 2 cores) and scan with SIMD")
    parser.add_argument("--copy-similarity", type=float, default=0.75,
                        help="cosine of each planted copy to its query")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=50_000, help="vectors to train IVF-PQ on")
    parser.add_argument("--skip-1280", action="store_true", help="only the 320-d indexes")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index-sizes", type=int, nargs="+",
                        help="instead: the on-disk index (mtl.eval.index) at these gallery sizes")
    parser.add_argument("--nprobes", type=int, nargs="+", default=[32, 128], help="with --index-sizes")
    parser.add_argument("--flat-limit-gb", type=float, default=4.0,
                        help="with --index-sizes: build flat indexes up to this size (GB)")
    parser.add_argument("--work-dir", type=Path, default=None, help="with --index-sizes: where indexes are saved")
    parser.add_argument("--csv", type=Path, help="with --index-sizes: write the table here")
    args = parser.parse_args(argv)
    if args.index_sizes:
        return run_index_scaling(args)

    import faiss

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, N = {args.n:,}, "
          f"{args.queries} queries, k = {args.k}")
    reports, sources = [], {}
    q320, sources["320"] = load_queries(args.queries320, 320, args.queries, args.seed)
    planted320 = planted_copies(q320, args.copy_similarity, args.seed)
    flat320, index320, exact320 = flat_index_report(args.n, 320, q320, planted320, args.k, args.seed)
    reports.append(flat320)
    print(f"  built {flat320.name}: {flat320.build_seconds:.1f} s")
    reports.append(compressed_report(index320, args.n, 320, q320, exact320, args.k,
                                     args.index, args.nprobe, args.train_size))
    print(f"  built {reports[-1].name}: {reports[-1].build_seconds:.1f} s")
    del index320
    if not args.skip_1280:
        q1280, sources["1280"] = load_queries(args.queries1280, 1280, args.queries, args.seed)
        planted1280 = planted_copies(q1280, args.copy_similarity, args.seed)
        flat1280, index1280, _ = flat_index_report(args.n, 1280, q1280, planted1280, args.k, args.seed + 7)
        reports.append(flat1280)
        print(f"  built {flat1280.name}: {flat1280.build_seconds:.1f} s")
        del index1280

    print(f"\nqueries: {sources}")
    header = f"{'index':<32}{'dim':>5}{'MB':>10}{'B/vector':>10}{'build s':>9}" \
             f"{'ms/q batch':>12}{'ms 1 query':>12}{'copy R@10':>11}{'top10 vs flat':>15}"
    print(header)
    for r in reports:
        print(f"{r.name:<32}{r.dim:>5}{r.index_bytes / 2**20:>10.1f}{r.bytes_per_vector:>10.1f}"
              f"{r.build_seconds:>9.1f}{r.search_ms_per_query_batch:>12.3f}"
              f"{r.search_ms_single_query:>12.2f}{r.copy_recall_at_10:>11.3f}{r.recall_at_10_vs_flat:>15.3f}")
    by_name = {r.name.split(" ")[0]: r for r in reports}
    flat320, pq = reports[0], reports[1]  # pq: the compressed 320-d index
    print("\nratios")
    if "Flat1280" in by_name:
        flat1280 = by_name["Flat1280"]
        print(f"  memory   Flat1280 / Flat320 = {flat1280.index_bytes / flat320.index_bytes:.2f}x")
        print(f"  latency  Flat1280 / Flat320 = {flat1280.search_ms_per_query_batch / flat320.search_ms_per_query_batch:.2f}x (batch), "
              f"{flat1280.search_ms_single_query / flat320.search_ms_single_query:.2f}x (single query)")
        print(f"  memory   Flat1280 / IVF-PQ320 = {flat1280.index_bytes / pq.index_bytes:.1f}x")
    print(f"  memory   Flat320 / IVF-PQ320 = {flat320.index_bytes / pq.index_bytes:.1f}x")
    print(f"  latency  Flat320 / IVF-PQ320 = {flat320.search_ms_per_query_batch / pq.search_ms_per_query_batch:.1f}x (batch)")
    print(f"  copy recall@10: Flat320 {flat320.copy_recall_at_10:.3f}, IVF-PQ320 {pq.copy_recall_at_10:.3f} "
          f"(loss {flat320.copy_recall_at_10 - pq.copy_recall_at_10:.3f})")
    print(f"  top-10 overlap of IVF-PQ320 with exact Flat320: {pq.recall_at_10_vs_flat:.3f} (pessimistic)")
    print(f"  load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"n": args.n, "queries": sources,
                                         "indexes": [{**asdict(r), "bytes_per_vector": r.bytes_per_vector}
                                                     for r in reports]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
