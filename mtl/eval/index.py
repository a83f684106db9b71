"""An on-disk index of reference embeddings, for galleries too large to re-index per search.

    mtl index build --references refs.npz --out refs.index [--kind flat|ivfpq] [--nlist 1024]
    mtl index add   --index refs.index --references new.npz     (add-only: new references)
    mtl index info  --index refs.index
    mtl search --index refs.index --queries q.npz --k 10 --out matches.csv

Kinds (the exact in-memory search of mtl.eval.search builds a flat index too)
    flat    exact inner product (faiss IndexFlatIP): 4 bytes x dim per reference, nothing
            to train; what `mtl search --references` computes
    ivfpq   inverted lists + 4-bit product quantization (faiss "IVF{nlist},PQ{m}x4fs"):
            m / 2 bytes per reference (32 for m = 64), trained once on a random sample of
            the references; a search visits `nprobe` of the `nlist` lists

Layout of an index folder (written to a staging folder, then renamed into place, so a
reader never sees a half-written index; an update replaces the whole folder the same way):
    index.faiss       the faiss index (faiss.write_index)
    ids.txt           one reference id per line, in the index's row order
    class_probs.npy   float32 [N, C], when the references have a class head (for --gate)
    neighbours.npy    float32 [N, k], each reference's k largest similarities to the *other*
                      references, best first: their mean is its local density, which
                      normalizes search scores (mtl.eval.normalize, background ``references``)
    provenance.json   kind, faiss factory, dim, metric, size, training sample size, nprobe,
                      the descriptor method, class names, faiss version, and every build
                      or add (source file, count, time)

Updates are add-only: the trained quantizer stays as built, so new references are encoded
with it (retrain with `build` once the gallery has drifted far from its sample).  An
addition also updates the densities it changes: the new references get theirs, and an old
reference whose k nearest now include a new one gets its list merged.  In a flat index
this is exact; in IVF-PQ every density is approximate (neighbours found through the
compressed codes), and an old reference is updated when it is among a new reference's
`UPDATE_CANDIDATES` x k nearest (scripts/benchmarks measure how close this stays).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from mtl.eval.embeddings import EmbeddingResult, load_npz
from mtl.io import UserError

KINDS = ("flat", "ivfpq")
FORMAT = 1
DEFAULT_NPROBE = 32
DEFAULT_PQ_M = 64          # 4-bit codes: 32 bytes per reference
TRAINING_POINTS_PER_LIST = 64
DENSITY_K = 10             # neighbours of each reference kept for the density (normalization's k <= it)
UPDATE_CANDIDATES = 4      # IVF-PQ add: an old reference within a new one's 4 x k nearest is updated


def faiss_gpu_available() -> bool:
    """True when this faiss build was compiled with GPU support and sees a GPU."""
    import faiss

    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return bool(get_num_gpus and get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources"))


def as_float32_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """A C-contiguous float32 [n, dim] array, or a clear error."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array [n, dim], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def build_flat_index(references: np.ndarray, use_gpu: bool | None = None):
    """An exact inner-product index holding `references` (GPU when available)."""
    import faiss

    references = as_float32_matrix(references, "references")
    index = faiss.IndexFlatIP(references.shape[1])
    if use_gpu is None:
        use_gpu = faiss_gpu_available()
    if use_gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(references)
    return index


def default_nlist(n: int) -> int:
    """About sqrt(n) lists, a power of two: 1,024 for a million references, 4,096 for ten."""
    return int(2 ** round(math.log2(max(math.sqrt(max(n, 1)), 1))))


def default_pq_m(dim: int) -> int:
    """The largest even divisor of dim up to 64 (fast-scan PQ needs an even m)."""
    return max((m for m in range(2, min(DEFAULT_PQ_M, dim) + 1, 2) if dim % m == 0), default=0)


def factory_string(kind: str, dim: int, nlist: int | None = None, pq_m: int | None = None) -> str:
    if kind == "flat":
        return "Flat"
    if kind != "ivfpq":
        raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
    m = pq_m or default_pq_m(dim)
    if not m or dim % m or m % 2:
        raise ValueError(f"ivfpq needs an even number of sub-quantizers dividing dim={dim}, got {m}")
    return f"IVF{nlist},PQ{m}x4fs"


class ReferenceIndex:
    """A faiss index, its reference ids (row order), their class probabilities (or None)
    and where it came from (provenance)."""

    def __init__(self, index: Any, ids: np.ndarray, provenance: dict, class_probs: np.ndarray | None = None,
                 neighbours: np.ndarray | None = None):
        self.index, self.provenance, self.class_probs = index, provenance, class_probs
        self.neighbours = neighbours  # [N, k] similarities to the other references, best first
        self._id_parts = [np.asarray(ids).astype(str)]  # joined on first read: chunked adds stay linear

    @property
    def ids(self) -> np.ndarray:
        """[N] str, in the index's row order."""
        if len(self._id_parts) > 1:
            self._id_parts = [np.concatenate(self._id_parts)]
        return self._id_parts[0]

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def density_k(self) -> int | None:
        """How many neighbours each reference's density averages (None: no densities stored)."""
        return None if self.neighbours is None else int(self.neighbours.shape[1])

    def densities(self, k: int | None = None) -> np.ndarray:
        """ρ of every reference: the mean of its k largest similarities to the others
        (k up to the stored number)."""
        if self.neighbours is None:
            raise ValueError("this index stores no reference densities: build it again with `mtl index build` "
                             "(or search with --raw)")
        k = self.density_k if k is None else k
        if k > self.density_k:
            raise ValueError(f"the index keeps {self.density_k} neighbours per reference; normalization k={k} "
                             "needs more: build it with --density-k")
        return self.neighbours[:, :k].astype(np.float64).mean(axis=1)

    def compute_neighbours(self, embeddings: np.ndarray, k: int = DENSITY_K) -> None:
        """Each reference's k largest similarities to the others, found through this index
        (exact in a flat index); `embeddings` are the indexed vectors, in row order."""
        self.neighbours = self._self_search(as_float32_matrix(embeddings, "references"), 0, k)
        self.provenance["normalization"] = {"k": int(k), "background": "references"}

    def _self_search(self, vectors: np.ndarray, first_row: int, k: int, block: int = 4096) -> np.ndarray:
        """[n, k] best similarities of rows first_row.. (given as `vectors`) to every other row."""
        k = min(k, max(self.ntotal - 1, 0))
        out = np.zeros((len(vectors), k), np.float32)
        for start in range(0, len(vectors), block):
            chunk = vectors[start:start + block]
            scores, rows = self.search(chunk, k + 1)
            own = rows == np.arange(first_row + start, first_row + start + len(chunk))[:, None]
            own[~own.any(axis=1), -1] = True  # the own row fell outside (ties): drop the last
            out[start:start + len(chunk)] = scores[~own].reshape(len(chunk), k)
        return out

    def _update_neighbours(self, new_vectors: np.ndarray, n_old: int) -> int:
        """After adding `new_vectors` as rows n_old..: their neighbour lists, and the old
        lists a new reference enters.  Returns how many old densities changed."""
        k = self.density_k
        new_lists = self._self_search(new_vectors, n_old, k)
        import faiss

        if self.provenance["kind"] == "flat":   # exact: every old reference against the new ones
            new_index = faiss.IndexFlatIP(self.dim)
            new_index.add(new_vectors)
            old = self.neighbours
            changed = np.zeros(n_old, bool)
            for start in range(0, n_old, 4096):
                stop = min(start + 4096, n_old)
                scores, _ = new_index.search(self.index.reconstruct_n(start, stop - start), min(k, len(new_vectors)))
                merged = np.sort(np.concatenate([old[start:stop], scores], axis=1), axis=1)[:, ::-1][:, :k]
                changed[start:stop] = (merged != old[start:stop]).any(axis=1)
                old[start:stop] = merged
        else:   # approximate: the old references among each new one's nearest
            scores, rows = self.search(new_vectors, min(UPDATE_CANDIDATES * k, self.ntotal))
            changed = np.zeros(n_old, bool)
            for score, row in zip(scores.ravel(), rows.ravel()):
                if 0 <= row < n_old and score > self.neighbours[row, -1]:
                    self.neighbours[row] = np.sort(np.append(self.neighbours[row], score))[::-1][:k]
                    changed[row] = True
        self.neighbours = np.concatenate([self.neighbours, new_lists])
        return int(changed.sum())

    @classmethod
    def create(cls, kind: str, dim: int, training_sample: np.ndarray | None = None, nlist: int | None = None,
               pq_m: int | None = None, nprobe: int = DEFAULT_NPROBE, method: str = "",
               class_names: list[str] | None = None) -> "ReferenceIndex":
        """An empty index, trained on `training_sample` when its kind needs training."""
        import faiss

        factory = factory_string(kind, dim, nlist, pq_m)
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        trained_on = 0
        if not index.is_trained:
            if training_sample is None or len(training_sample) < nlist:
                raise ValueError(f"{factory} needs a training sample of at least nlist={nlist} references")
            index.train(as_float32_matrix(training_sample, "training sample"))
            trained_on = len(training_sample)
            faiss.extract_index_ivf(index).nprobe = nprobe
        provenance = {"format": FORMAT, "kind": kind, "factory": factory, "dim": dim, "metric": "inner_product",
                      "ntotal": 0, "training_sample_size": trained_on, "nlist": nlist if kind == "ivfpq" else None,
                      "nprobe": nprobe if kind == "ivfpq" else None, "method": method,
                      "class_names": list(class_names) if class_names is not None else None,
                      "faiss_version": faiss.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "updates": []}
        return cls(index, np.zeros(0, dtype=str), provenance)

    def add(self, embeddings: np.ndarray, ids, class_probs: np.ndarray | None = None, source: str = "",
            check_ids: bool = True) -> None:
        """Append references (add-only); ids must be new and hold no line break.
        `check_ids=False` skips the search for repeated ids (a sort of all ids), for callers
        whose ids are unique by construction and that add in many chunks."""
        embeddings = as_float32_matrix(embeddings, "references")
        ids = np.asarray(ids).astype(str)
        if embeddings.shape[1] != self.dim:
            raise ValueError(f"references are {embeddings.shape[1]}-d, the index holds {self.dim}-d vectors")
        if len(ids) != len(embeddings):
            raise ValueError(f"{len(ids)} ids for {len(embeddings)} references")
        if np.char.find(ids, "\n").max(initial=-1) >= 0:
            raise ValueError("reference ids may not contain line breaks")
        if check_ids:
            unique, counts = np.unique(ids, return_counts=True)
            repeated = sorted(set(unique[counts > 1]) | set(ids[np.isin(ids, self.ids)]))
            if repeated:
                raise ValueError(f"the index already holds (or the new references repeat) ids like "
                                 f"{repeated[:3]}: updates only add new references")
        has_probs = self.class_probs is not None or (self.ntotal == 0 and class_probs is not None)
        if has_probs != (class_probs is not None):
            raise ValueError("class probabilities must come with every addition or with none")
        n_old = self.ntotal
        self.index.add(embeddings)
        self._id_parts.append(ids)
        if class_probs is not None:
            probs = np.asarray(class_probs, dtype=np.float32)
            self.class_probs = probs if self.class_probs is None else np.concatenate([self.class_probs, probs])
        self.provenance["ntotal"] = self.ntotal
        update = {"source": str(source), "added": len(ids), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if self.neighbours is not None:
            update["densities_changed"] = self._update_neighbours(embeddings, n_old)
        self.provenance["updates"].append(update)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], rows [Q, k]), -1 where fewer than k references exist.  A flat
        index searches on the GPU when asked and faiss-gpu is there."""
        import faiss

        queries = as_float32_matrix(queries, "queries")
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries are {queries.shape[1]}-d, the index holds {self.dim}-d vectors")
        index = self.index
        if self.provenance["kind"] == "ivfpq":
            faiss.extract_index_ivf(index).nprobe = nprobe or self.provenance["nprobe"]
        elif use_gpu and faiss_gpu_available():
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        return index.search(queries, k)

    # -- files ------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the folder atomically (staging folder, then rename)."""
        import faiss

        path = Path(path)
        staging = path.with_name(f".{path.name}.writing-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            faiss.write_index(self.index, str(staging / "index.faiss"))
            (staging / "ids.txt").write_text("".join(f"{i}\n" for i in self.ids))
            if self.class_probs is not None:
                np.save(staging / "class_probs.npy", self.class_probs)
            if self.neighbours is not None:
                np.save(staging / "neighbours.npy", self.neighbours)
            (staging / "provenance.json").write_text(json.dumps(self.provenance, indent=1) + "\n")
            _replace_folder(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceIndex":
        import faiss

        path = Path(path)
        if not (path / "provenance.json").is_file():
            raise FileNotFoundError(f"no index at {path} (write one with `mtl index build`)")
        provenance = json.loads((path / "provenance.json").read_text())
        index = faiss.read_index(str(path / "index.faiss"))
        ids = np.array((path / "ids.txt").read_text().splitlines(), dtype=str)
        probs = np.load(path / "class_probs.npy") if (path / "class_probs.npy").is_file() else None
        neighbours = np.load(path / "neighbours.npy") if (path / "neighbours.npy").is_file() else None
        if not index.ntotal == len(ids) == provenance["ntotal"] or any(
                extra is not None and len(extra) != len(ids) for extra in (probs, neighbours)):
            raise ValueError(f"{path} is inconsistent: {index.ntotal} vectors, {len(ids)} ids, "
                             f"provenance says {provenance['ntotal']}")
        return cls(index, ids, provenance, probs, neighbours)


def _replace_folder(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing target is moved aside first and removed after,
    so at every moment one complete index exists (target, or its .replaced copy)."""
    if not target.exists():
        os.rename(new, target)
        return
    aside = target.with_name(f".{target.name}.replaced-{os.getpid()}")
    os.rename(target, aside)
    os.rename(new, target)
    shutil.rmtree(aside)


def training_sample(embeddings: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """A uniform random sample of rows, in row order."""
    if size >= len(embeddings):
        return embeddings
    rows = np.sort(np.random.default_rng(seed).choice(len(embeddings), size=size, replace=False))
    return embeddings[rows]


def build_index(embeddings: np.ndarray, ids, kind: str = "flat", class_probs: np.ndarray | None = None,
                nlist: int | None = None, pq_m: int | None = None, train_size: int | None = None,
                nprobe: int = DEFAULT_NPROBE, seed: int = 0, method: str = "", class_names=None,
                source: str = "", density_k: int | None = DENSITY_K) -> ReferenceIndex:
    """An index of `embeddings`: flat, or IVF-PQ trained on a random sample of them
    (`train_size`, default 64 per list), with each reference's `density_k` nearest
    similarities (None: no densities, raw search only)."""
    sample = None
    if kind == "ivfpq":
        nlist = nlist or default_nlist(len(embeddings))
        sample = training_sample(embeddings, train_size or TRAINING_POINTS_PER_LIST * nlist, seed)
    index = ReferenceIndex.create(kind, embeddings.shape[1], sample, nlist, pq_m, nprobe, method, class_names)
    index.provenance["training_seed"] = seed if sample is not None else None
    index.add(embeddings, ids, class_probs, source)
    if density_k:
        index.compute_neighbours(embeddings, density_k)
    return index


# --------------------------------------------------------------------------- command line

def _references(npz: Path) -> EmbeddingResult:
    result = load_npz(npz)
    return result.role("reference") if result.roles is not None else result


def _embedding_provenance(result: EmbeddingResult) -> dict | None:
    """How the indexed vectors were made (mtl.eval.embeddings.Provenance), as plain JSON."""
    return None if result.provenance is None else json.loads(result.provenance.to_json())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtl index", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="index reference embeddings (an `mtl embed` .npz)")
    build.add_argument("--references", required=True, type=Path)
    build.add_argument("--out", required=True, type=Path, help="index folder (replaced atomically if it exists)")
    build.add_argument("--kind", choices=KINDS, default="flat")
    build.add_argument("--nlist", type=int, help="ivfpq: inverted lists (default: a power of two near sqrt(N))")
    build.add_argument("--pq-m", type=int, help=f"ivfpq: sub-quantizers, m/2 bytes per reference "
                       f"(default {DEFAULT_PQ_M}, or the largest even divisor of the dimension below it)")
    build.add_argument("--train-size", type=int,
                       help=f"ivfpq: references to train on (default {TRAINING_POINTS_PER_LIST} per list)")
    build.add_argument("--nprobe", type=int, default=DEFAULT_NPROBE, help="ivfpq: lists a search visits")
    build.add_argument("--seed", type=int, default=0, help="of the training sample")
    build.add_argument("--density-k", type=int, default=DENSITY_K,
                       help=f"neighbours kept per reference for normalized search (default {DENSITY_K}; 0: none)")
    add = commands.add_parser("add", help="add new references to an index (add-only)")
    add.add_argument("--index", required=True, type=Path)
    add.add_argument("--references", required=True, type=Path)
    info = commands.add_parser("info", help="print an index's provenance")
    info.add_argument("--index", required=True, type=Path)
    args = parser.parse_args(argv)

    if args.command == "info":
        print(json.dumps(ReferenceIndex.load(args.index).provenance, indent=1))
        return 0
    references = _references(args.references)
    started = time.perf_counter()
    if args.command == "build":
        class_names = None if references.class_names is None else references.class_names.tolist()
        index = build_index(references.embeddings, references.ids, args.kind, references.class_probs, args.nlist,
                            args.pq_m, args.train_size, args.nprobe, args.seed, references.method, class_names,
                            source=str(args.references), density_k=args.density_k or None)
        index.provenance["embedding"] = _embedding_provenance(references)
        path = index.save(args.out)
    else:
        index = ReferenceIndex.load(args.index)
        if references.method != index.provenance["method"] or \
                _embedding_provenance(references) != index.provenance.get("embedding"):
            raise UserError(f"{args.references} holds {references.method!r} descriptors made otherwise than the "
                            f"index's {index.provenance['method']!r}; embed the new references the same way")
        index.add(references.embeddings, references.ids, references.class_probs, source=str(args.references))
        path = index.save(args.index)
    densities = "no densities (raw search only)" if index.neighbours is None else \
        f"densities of {index.density_k} neighbours"
    if args.command == "add" and index.neighbours is not None:
        densities += f", {index.provenance['updates'][-1]['densities_changed']:,} old ones changed"
    print(f"{index.provenance['factory']} index of {index.ntotal:,} references ({index.dim}-d, {densities}) "
          f"-> {path} ({time.perf_counter() - started:.1f} s)")
    return 0
