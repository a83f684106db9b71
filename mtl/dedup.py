"""Which images in a folder are copies of each other?  `mtl dedup FOLDER` answers it
with the study's trained model, its calibrated threshold and the class gate.

    mtl dedup FOLDER [--out DIR] [--method best|imagenet|phash|dhash|CKPT] [--threshold T]
                     [--no-gate] [--min-score-report S] [--cache DIR]
                     [--move-duplicates-to DIR [--apply]]
    mtl dedup --undo DIR/moves.csv

In order:
  1. every image file under FOLDER (recursively, by extension) is digested (sha256);
  2. files whose digest the cache does not know yet are embedded; the cache is keyed by
     file content and model, so a rerun on a grown folder embeds only the new files.
     Unreadable files are counted and skipped (mtl.data.imageio says why);
  3. all against all, exact inner-product search (faiss) finds the pairs scoring at
     least the threshold;
  4. with an MTL checkpoint a pair is kept only if both images' predicted content
     classes agree: the class gate, the paper's proposal against false positives
     (`--no-gate` turns it off);
  5. kept pairs are grouped (connected components); each group's keeper is the file
     with the most pixels, then the oldest (modification time), then the first path;
  6. `--out` receives pairs.csv (a, b, score, same_class, kept), groups.json and
     report.html (mtl.dedup_report).

Methods and thresholds.  The pipeline's evaluate stage writes models/operating_points.json:
per method, the score threshold chosen on the val split for precision 0.9.
  best       the study's trained model (the default); without it, run `make repro`
  imagenet   the untrained ImageNet backbone's pooled 1280-d output (needs --threshold
             when the file has no entry for it)
  phash      64-bit perceptual hash; score = 1 - 2*hamming/64.  Without an entry the
  dhash      Hamming radius is 10 bits, imagededup's default (score 0.6875)
  CKPT       any MTLNet checkpoint: its entry is found by the file's digest, else --threshold

Nothing is ever deleted.  `--move-duplicates-to DIR` plans moving every non-keeper
into DIR (mirroring sub-folders); only `--apply` moves, and `--undo moves.csv` moves
everything back (mtl.dedup_moves).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mtl.io import atomic_path, atomic_write_text, file_digest, write_csv
from mtl.runtime import progress

DEFAULT_OPERATING_POINTS = Path("models/operating_points.json")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtl" / "dedup"
DEFAULT_OUT = Path("dedup")
DEFAULT_IMAGE_SIZE = 112  # the untrained ImageNet backbone's input, when no operating point names one
# imagededup's default max_distance_threshold: the radius its users already trust.
DEFAULT_HAMMING_RADIUS = 10
DESCRIPTORS = ("mtl", "gap1280", "phash", "dhash")
NAMED_METHODS = ("best", "imagenet", "phash", "dhash")
NO_TRAINED_MODEL = ("no trained model: {reason}. Train one with `make repro`, or pass "
                    "--method imagenet|phash|dhash|CKPT (with --threshold for imagenet or a checkpoint)")


class DedupSetupError(Exception):
    """What the user must change before a run can start; the message is one line."""


# --------------------------------------------------------------------------- operating points

@dataclass(frozen=True)
class OperatingPoint:
    """One entry of models/operating_points.json."""

    descriptor: str            # mtl | gap1280 | phash | dhash
    threshold: float           # accept score >= threshold
    target_precision: float = 0.9
    split: str = "val"
    checkpoint: str | None = None
    checkpoint_digest: str | None = None  # mtl.io.file_digest of the checkpoint
    image_size: int | None = None
    gate: bool = False

    @classmethod
    def from_dict(cls, name: str, entry: object, source: Path) -> "OperatingPoint":
        where = f"{source}: entry {name!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object, got {type(entry).__name__}")
        missing = {"descriptor", "threshold"} - set(entry)
        if missing:
            raise ValueError(f"{where} lacks {sorted(missing)}")
        if entry["descriptor"] not in DESCRIPTORS:
            raise ValueError(f"{where}: descriptor {entry['descriptor']!r} is not one of {DESCRIPTORS}")
        if not isinstance(entry["threshold"], (int, float)) or isinstance(entry["threshold"], bool):
            raise ValueError(f"{where}: threshold must be a number, got {entry['threshold']!r}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in entry.items() if k in known})


def load_operating_points(path: str | Path = DEFAULT_OPERATING_POINTS) -> dict[str, OperatingPoint]:
    """{name: OperatingPoint}; FileNotFoundError if absent, ValueError naming the fault if malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no operating points at {path} (the pipeline's evaluate stage writes them: "
                                "`make repro`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold an object {{name: entry}}, got {type(data).__name__}")
    return {name: OperatingPoint.from_dict(name, entry, path) for name, entry in data.items()}


# --------------------------------------------------------------------------- methods

@dataclass(frozen=True)
class DedupMethod:
    """A descriptor with its threshold: everything that decides which pairs are duplicates."""

    name: str               # as asked: best, imagenet, phash, dhash or a checkpoint path
    descriptor: str         # mtl | gap1280 | phash | dhash
    threshold: float
    threshold_source: str   # where the threshold came from, said in every output
    gate: bool              # the class gate (MTL descriptors only)
    checkpoint: Path | None = None  # None: a hash, or the untrained ImageNet backbone
    checkpoint_digest: str | None = None
    image_size: int = DEFAULT_IMAGE_SIZE

    @property
    def cache_key(self) -> str:
        """Names the cache folder: descriptors of different models never mix."""
        if self.descriptor in ("phash", "dhash"):
            return self.descriptor
        model = self.checkpoint_digest or "imagenet"
        return f"{self.descriptor}-{model}-{self.image_size}px"

    def describe(self) -> str:
        gate = ", class gate on" if self.gate else ""
        name = self.checkpoint.name if self.checkpoint is not None else self.name
        return f"{name} ({self.descriptor}, threshold {self.threshold:.4g} from {self.threshold_source}{gate})"


def resolve_method(method: str = "best", operating_points: str | Path = DEFAULT_OPERATING_POINTS,
                   threshold: float | None = None, gate: bool = True,
                   image_size: int | None = None) -> DedupMethod:
    """The method, threshold and gate a run uses; DedupSetupError says what is missing."""
    points = _operating_points_or_none(operating_points)
    if method in NAMED_METHODS:
        entry = (points or {}).get(method)
        if entry is None:
            return _without_entry(method, operating_points, points, threshold, image_size)
        name = method
    else:
        checkpoint = Path(method)
        if not checkpoint.is_file():
            raise DedupSetupError(f"unknown method {method!r}: give {', '.join(NAMED_METHODS)} or a checkpoint file")
        digest = file_digest(checkpoint)
        entry = next((e for e in (points or {}).values()
                      if e.checkpoint_digest == digest and e.descriptor == "mtl"), None)
        if entry is None:
            if threshold is None:
                raise DedupSetupError(f"no operating point in {operating_points} for {checkpoint} "
                                      f"(digest {digest}): pass --threshold")
            return DedupMethod(method, "mtl", threshold, "--threshold", gate, checkpoint, digest,
                               image_size or _trained_image_size(checkpoint))
        entry, name = OperatingPoint(**{**asdict(entry), "checkpoint": str(checkpoint)}), method
    return _from_entry(name, entry, operating_points, threshold, gate, image_size)


def _operating_points_or_none(path: str | Path) -> dict[str, OperatingPoint] | None:
    """Absent file: None (each method has its fallback).  A malformed one is an error."""
    try:
        return load_operating_points(path)
    except FileNotFoundError:
        return None
    except ValueError as error:
        raise DedupSetupError(str(error)) from None


def _without_entry(method: str, path, points, threshold: float | None, image_size: int | None) -> DedupMethod:
    from mtl.eval.baselines import score_from_hamming

    size = image_size or DEFAULT_IMAGE_SIZE
    if method == "best":
        reason = f"{path} is missing" if points is None else f"{path} has no 'best' entry"
        raise DedupSetupError(NO_TRAINED_MODEL.format(reason=reason))
    if method in ("phash", "dhash"):
        if threshold is not None:
            return DedupMethod(method, method, threshold, "--threshold", False)
        radius = DEFAULT_HAMMING_RADIUS
        return DedupMethod(method, method, float(score_from_hamming(radius)),
                           f"the default Hamming radius of {radius} bits", False)
    if threshold is None:  # imagenet: cosine scores have no threshold that fits every folder
        raise DedupSetupError(f"--method imagenet needs --threshold ({path} has no 'imagenet' entry)")
    return DedupMethod(method, "gap1280", threshold, "--threshold", False, image_size=size)


def _from_entry(name: str, entry: OperatingPoint, path, threshold: float | None, gate: bool,
                image_size: int | None) -> DedupMethod:
    checkpoint, digest = None, None
    if entry.descriptor in ("mtl", "gap1280") and name != "imagenet":
        checkpoint = _find_checkpoint(entry, Path(path))
        digest = _checked_digest(checkpoint, entry, threshold)
    source = "--threshold" if threshold is not None else \
        f"{Path(path).name} ({entry.split} split, precision {entry.target_precision:g})"
    if image_size is None:  # the size the threshold was chosen at, else the checkpoint's own
        image_size = entry.image_size or (_trained_image_size(checkpoint) if checkpoint else DEFAULT_IMAGE_SIZE)
    return DedupMethod(name, entry.descriptor, entry.threshold if threshold is None else threshold, source,
                       gate and entry.descriptor == "mtl", checkpoint, digest, image_size)


def _trained_image_size(checkpoint: Path) -> int:
    from mtl.model import load_checkpoint, trained_image_size

    size = trained_image_size(load_checkpoint(checkpoint))
    if size is None:
        raise DedupSetupError(f"{checkpoint} records no training image size: pass --image-size")
    return size


def _find_checkpoint(entry: OperatingPoint, points_path: Path) -> Path:
    """The entry's checkpoint, as written or relative to the project (models/..)."""
    if not entry.checkpoint:
        raise DedupSetupError(f"{points_path}: the {entry.descriptor} entry names no checkpoint")
    written = Path(entry.checkpoint)
    for candidate in (written, points_path.parent / written, points_path.parent.parent / written):
        if candidate.is_file():
            return candidate
    raise DedupSetupError(NO_TRAINED_MODEL.format(reason=f"checkpoint {written} (named in {points_path}) "
                                                         "is missing"))


def _checked_digest(checkpoint: Path, entry: OperatingPoint, threshold: float | None) -> str:
    """A threshold belongs to the weights it was chosen for: refuse a changed checkpoint."""
    digest = file_digest(checkpoint)
    if entry.checkpoint_digest and digest != entry.checkpoint_digest and threshold is None:
        raise DedupSetupError(f"{checkpoint} changed since its threshold was chosen (digest {digest}, "
                              f"expected {entry.checkpoint_digest}): rerun `make repro` or pass --threshold")
    return digest


# --------------------------------------------------------------------------- embedding, with a cache

@dataclass(frozen=True)
class FolderEmbeddings:
    """Descriptors of the readable files of a folder, in listing order."""

    ids: np.ndarray                 # [N] paths relative to the folder
    embeddings: np.ndarray          # [N, D] unit rows
    class_probs: np.ndarray | None  # [N, C] (MTL descriptor only)
    class_names: tuple[str, ...]
    failed: dict[str, str]          # id -> why it could not be read
    n_files: int
    n_new: int                      # files whose content this run read (the others: from the cache)
    embed_seconds: float


class EmbeddingCache:
    """Descriptors by file-content digest, one folder per model (DedupMethod.cache_key).

    Each run adds one shard .npz holding only what it embedded (failures too: the same
    bytes fail the same way), written atomically, so an interrupted or concurrent run
    never spoils what earlier runs stored."""

    def __init__(self, root: str | Path, key: str):
        self.directory = Path(root) / key
        self.vectors: dict[str, np.ndarray] = {}
        self.probs: dict[str, np.ndarray] = {}
        self.failures: dict[str, str] = {}
        self.class_names: tuple[str, ...] = ()
        for shard in sorted(self.directory.glob("*.npz")):
            self._read(shard)

    def _read(self, shard: Path) -> None:
        try:
            with np.load(shard, allow_pickle=False) as data:
                self.vectors.update(zip(data["digests"], data["embeddings"]))
                if "class_probs" in data.files:
                    self.probs.update(zip(data["digests"], data["class_probs"]))
                    self.class_names = tuple(data["class_names"])
                self.failures.update(zip(data["failed_digests"], data["failed_reasons"]))
        except (OSError, ValueError, KeyError) as error:  # its files are simply embedded again
            print(f"mtl dedup: ignoring unreadable cache shard {shard} ({error})", file=sys.stderr)

    def knows(self, digest: str) -> bool:
        return digest in self.vectors or digest in self.failures

    def add(self, result) -> None:
        """Store an EmbeddingResult whose ids are file digests."""
        if not len(result.ids) and not len(result.failed):
            return
        self.vectors.update(zip(result.ids, result.embeddings))
        if result.class_probs is not None:
            self.probs.update(zip(result.ids, result.class_probs))
            self.class_names = tuple(result.class_names)
        self.failures.update(zip(result.failed, result.failed_reasons))
        shard = self.directory / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}.npz"
        arrays = {"digests": result.ids, "embeddings": result.embeddings,
                  "failed_digests": result.failed, "failed_reasons": result.failed_reasons}
        if result.class_probs is not None:
            arrays |= {"class_probs": result.class_probs, "class_names": result.class_names}
        with atomic_path(shard) as tmp:
            np.savez(tmp, **arrays)


def digest_files(paths: list[Path]) -> list[str | None]:
    """sha256 (16 hex) of each file's bytes; None when it cannot be read."""
    digests = []
    for path in progress(paths, len(paths), "digest", unit="file", lines=0):
        try:
            digests.append(file_digest(path))
        except OSError:
            digests.append(None)
    return digests


def embed_folder(folder: str | Path, method: DedupMethod, cache_dir: str | Path = DEFAULT_CACHE,
                 batch_size: int = 128, device: str = "auto", num_workers: int = 1) -> FolderEmbeddings:
    """Every image under `folder`, embedded once per distinct content and model."""
    from mtl.eval.images import ImageList, images_in_folder

    listing = images_in_folder(folder)
    digests = digest_files(listing.paths)
    cache = EmbeddingCache(cache_dir, method.cache_key)
    new = {d: p for d, p in zip(digests, listing.paths) if d is not None and not cache.knows(d)}
    start = time.perf_counter()
    if new:
        cache.add(_embed(method, ImageList(list(new.values()), list(new)), batch_size, device, num_workers))
    seconds = time.perf_counter() - start
    failed = {i: "missing" for i, d in zip(listing.ids, digests) if d is None}
    failed |= {i: cache.failures[d] for i, d in zip(listing.ids, digests) if d in cache.failures}
    rows = [(i, d) for i, d in zip(listing.ids, digests) if d in cache.vectors]
    ids = np.array([i for i, _ in rows], dtype=str)
    dim = next(iter(cache.vectors.values())).shape[0] if cache.vectors else 1
    vectors = np.stack([cache.vectors[d] for _, d in rows]) if rows else np.zeros((0, dim), np.float32)
    probs = np.stack([cache.probs[d] for _, d in rows]) if rows and method.descriptor == "mtl" else None
    n_new = sum(d in new for d in digests)
    return FolderEmbeddings(ids, vectors.astype(np.float32), probs, cache.class_names, failed,
                            len(listing.ids), n_new, seconds)


def _embed(method: DedupMethod, images, batch_size: int, device: str, num_workers: int):
    """One EmbeddingResult (ids = digests) through mtl.eval.embed's loops."""
    from mtl.eval.embed import describe_images, embed_hashes

    if method.descriptor in ("phash", "dhash"):
        return embed_hashes(method.descriptor, images, num_workers=num_workers)
    from mtl.model import ModelConfig, MTLNet
    from mtl.runtime import resolve_device

    dev = resolve_device(device)
    if method.checkpoint is None:  # the untrained backbone, ImageNet weights (offline Lite0)
        model, name = MTLNet(ModelConfig()), "imagenet"
    else:
        model, name = MTLNet.from_checkpoint(method.checkpoint, map_location=dev), str(method.checkpoint)
    return describe_images(model, images, name, method.image_size, batch_size, dev, num_workers)[method.descriptor]


# --------------------------------------------------------------------------- pairs and groups

PAIR_COLUMNS = ("a", "b", "score", "same_class", "kept")


def score_pairs(embedded: FolderEmbeddings, method: DedupMethod, min_score_report: float | None = None) -> pd.DataFrame:
    """Pairs scoring at least min(threshold, min_score_report), best first; `kept` marks
    the duplicates (score >= threshold, and with the gate, the same predicted class)."""
    from mtl.eval.decision import same_predicted_class
    from mtl.eval.search import pairs_above

    lowest = method.threshold if min_score_report is None else min(method.threshold, min_score_report)
    i, j, scores = pairs_above(embedded.embeddings, lowest)
    kept = scores >= method.threshold
    same_class = None
    if embedded.class_probs is not None:
        same_class = same_predicted_class(embedded.class_probs[i], embedded.class_probs[j])
        kept &= same_class | (not method.gate)
    pairs = pd.DataFrame({"a": embedded.ids[i], "b": embedded.ids[j], "score": scores.astype(np.float64).round(6),
                          "same_class": pd.Series(same_class, dtype="boolean") if same_class is not None
                          else pd.Series([pd.NA] * len(i), dtype="boolean"),
                          "kept": kept})
    return pairs.sort_values(["score", "a", "b"], ascending=[False, True, True], ignore_index=True)


@dataclass(frozen=True)
class DuplicateGroup:
    """Images that are copies of each other (connected by kept pairs)."""

    keeper: str                   # stays where it is
    duplicates: tuple[str, ...]   # the others: what --move-duplicates-to moves
    max_score: float
    n_pairs: int

    @property
    def members(self) -> tuple[str, ...]:
        return (self.keeper, *self.duplicates)


def file_facts(folder: Path, ids) -> pd.DataFrame:
    """width, height, pixels (from the header: no decoding), bytes, mtime of each file."""
    from PIL import Image

    rows = []
    for id_ in ids:
        path = folder / id_
        try:
            with Image.open(path) as im:
                width, height = im.size
            stat = path.stat()
            rows.append((id_, width, height, width * height, stat.st_size, stat.st_mtime))
        except Exception:  # noqa: BLE001 - it was read a moment ago; a vanished file sorts last
            rows.append((id_, 0, 0, 0, 0, float("inf")))
    return pd.DataFrame(rows, columns=["id", "width", "height", "pixels", "bytes", "mtime"]).set_index("id")


def group_pairs(pairs: pd.DataFrame, facts: pd.DataFrame) -> list[DuplicateGroup]:
    """Connected components of the kept pairs, each with its keeper; highest score first."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    kept = pairs[pairs["kept"]]
    if kept.empty:
        return []
    nodes = np.unique(np.concatenate([kept["a"], kept["b"]]))
    index = {n: k for k, n in enumerate(nodes)}
    a, b = kept["a"].map(index).to_numpy(), kept["b"].map(index).to_numpy()
    _, labels = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(len(nodes),) * 2),
                                     directed=False)
    edge_label = labels[a]
    groups = []
    for label in np.unique(labels):
        members = sorted(nodes[labels == label],
                         key=lambda n: (-facts.at[n, "pixels"], facts.at[n, "mtime"], n))
        edges = kept[edge_label == label]
        groups.append(DuplicateGroup(members[0], tuple(members[1:]), float(edges["score"].max()), len(edges)))
    return sorted(groups, key=lambda g: (-g.max_score, g.keeper))


# --------------------------------------------------------------------------- the whole run

@dataclass
class DedupResult:
    folder: Path
    method: DedupMethod
    pairs: pd.DataFrame          # PAIR_COLUMNS, best first
    groups: list[DuplicateGroup]
    facts: pd.DataFrame          # file_facts of every file in a pair, plus `class` (MTL only)
    embedded: FolderEmbeddings

    def duplicates_to_remove(self) -> list[str]:
        """Every non-keeper (imagededup's find_duplicates_to_remove)."""
        return sorted(d for g in self.groups for d in g.duplicates)

    def duplicates(self) -> dict[str, list[tuple[str, float]]]:
        """{file: [(duplicate, score), ...]} over kept pairs (imagededup's find_duplicates)."""
        found: dict[str, list[tuple[str, float]]] = {}
        for a, b, score in self.pairs.loc[self.pairs["kept"], ["a", "b", "score"]].itertuples(index=False):
            found.setdefault(a, []).append((b, score))
            found.setdefault(b, []).append((a, score))
        return found

    def summary(self) -> str:
        e = self.embedded
        reasons = pd.Series(list(e.failed.values()), dtype=str).value_counts()
        unreadable = f"; {len(e.failed)} unreadable, skipped ({', '.join(f'{r}: {c}' for r, c in reasons.items())})" \
            if e.failed else ""
        speed = f" at {e.n_new / e.embed_seconds:.0f} img/s" if e.n_new and e.embed_seconds > 0 else ""
        return (f"{e.n_files} images: {e.n_new} new{speed}, {e.n_files - e.n_new} from the cache"
                f"{unreadable}\nmethod {self.method.describe()}\n"
                f"{int(self.pairs['kept'].sum())} duplicate pairs in {len(self.groups)} groups; "
                f"{len(self.duplicates_to_remove())} files are not their group's keeper")

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """pairs.csv, groups.json and report.html in `out_dir`."""
        from mtl.dedup_report import write_report

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = {"pairs": out_dir / "pairs.csv", "groups": out_dir / "groups.json",
                   "report": out_dir / "report.html"}
        write_csv(self.pairs, written["pairs"], columns=list(PAIR_COLUMNS))
        atomic_write_text(written["groups"], json.dumps(self.groups_json(), indent=2) + "\n")
        write_report(self, written["report"])
        return written

    def groups_json(self) -> dict:
        m, e = self.method, self.embedded
        return {"folder": str(self.folder), "method": m.name, "descriptor": m.descriptor,
                "checkpoint": None if m.checkpoint is None else str(m.checkpoint),
                "threshold": m.threshold, "threshold_source": m.threshold_source, "gate": m.gate,
                "images": e.n_files, "new": e.n_new, "unreadable": e.failed,
                "groups": [{"keeper": g.keeper, "duplicates": list(g.duplicates), "max_score": g.max_score,
                            "pairs": g.n_pairs} for g in self.groups]}


def find_duplicates(folder: str | Path, method: str = "best", threshold: float | None = None,
                    gate: bool = True, min_score_report: float | None = None,
                    operating_points: str | Path = DEFAULT_OPERATING_POINTS,
                    cache_dir: str | Path = DEFAULT_CACHE, image_size: int | None = None,
                    batch_size: int = 128, device: str = "auto", num_workers: int = 1) -> DedupResult:
    """Duplicates among the images under `folder` (see the module docstring).

    `gate=False` is `--no-gate`; `threshold` overrides the operating point's."""
    folder = Path(folder)
    chosen = resolve_method(method, operating_points, threshold, gate, image_size)
    embedded = embed_folder(folder, chosen, cache_dir, batch_size, device, num_workers)
    pairs = score_pairs(embedded, chosen, min_score_report)
    listed = np.unique(np.concatenate([pairs["a"], pairs["b"]])) if len(pairs) else []
    facts = file_facts(folder, listed)
    if embedded.class_probs is not None:
        names = np.array(embedded.class_names or range(embedded.class_probs.shape[1]), dtype=str)
        predicted = pd.Series(names[embedded.class_probs.argmax(axis=1)], index=embedded.ids)
        facts["class"] = predicted.reindex(facts.index)
    return DedupResult(folder, chosen, pairs, group_pairs(pairs, facts), facts, embedded)


# --------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    from mtl import dedup_moves

    parser = argparse.ArgumentParser(prog="mtl dedup", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[2:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path, help="the images (searched recursively)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where pairs.csv, groups.json, report.html (and moves.csv) go (default {DEFAULT_OUT}/)")
    parser.add_argument("--method", default="best", help="best (default) | imagenet | phash | dhash | CKPT")
    parser.add_argument("--operating-points", type=Path, default=DEFAULT_OPERATING_POINTS,
                        help=f"thresholds chosen on val (default {DEFAULT_OPERATING_POINTS})")
    parser.add_argument("--threshold", type=float, help="accept pairs scoring at least this (overrides the "
                        "operating point; for hashes 1 - 2*hamming/64)")
    parser.add_argument("--no-gate", action="store_true", help="keep pairs whose predicted classes differ")
    parser.add_argument("--min-score-report", type=float,
                        help="also list pairs down to this score (not grouped): near misses to review")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"embedding cache (default {DEFAULT_CACHE})")
    parser.add_argument("--image-size", type=int, help="network input size (default: the operating point's, else "
                        f"the size the checkpoint was trained at; {DEFAULT_IMAGE_SIZE} for imagenet)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, ...")
    parser.add_argument("--num-workers", type=int, default=1, help="decoding workers")
    parser.add_argument("--move-duplicates-to", type=Path, metavar="DIR",
                        help="plan moving every non-keeper into DIR, mirroring sub-folders (a dry run without --apply)")
    parser.add_argument("--apply", action="store_true", help="really move (writes moves.csv into --out first)")
    parser.add_argument("--undo", type=Path, metavar="MOVES_CSV", help="move the files of a moves.csv back")
    args = parser.parse_args(argv)

    if args.undo:
        if args.folder or args.move_duplicates_to:
            parser.error("--undo takes only the moves.csv")
        return dedup_moves.undo_command(args.undo)
    if args.folder is None:
        parser.error("give the FOLDER to search (or --undo MOVES_CSV)")
    if args.apply and not args.move_duplicates_to:
        parser.error("--apply needs --move-duplicates-to DIR")
    try:
        if args.move_duplicates_to:
            dedup_moves.check_destination(args.folder, args.move_duplicates_to)
        result = find_duplicates(args.folder, args.method, args.threshold, not args.no_gate, args.min_score_report,
                                 args.operating_points, args.cache, args.image_size, args.batch_size, args.device,
                                 args.num_workers)
    except (DedupSetupError, dedup_moves.MoveError, FileNotFoundError, ValueError) as error:
        print(f"mtl dedup: {error}", file=sys.stderr)
        return 2
    written = result.write(args.out)
    print(result.summary())
    print("wrote " + ", ".join(str(p) for p in written.values()))
    if args.move_duplicates_to:
        return dedup_moves.move_command(result, args.move_duplicates_to, args.out / "moves.csv", args.apply)
    return 0
