"""The embeddings file (`.npz`) every method writes and every consumer reads: the
vectors of the images that could be read, in input order, with how they were made.

Arrays (docs/architecture.md): `ids` (str), `embeddings` float32 [N, D] unit rows,
`class_probs` float32 [N, C] (checkpoints only), `failed` (str ids), `failed_reasons`,
`method`, `images_per_second`, `provenance` (how the vectors were made: see Provenance;
`mtl search` compares it); from an eval set also `roles` ('reference' or 'query' per id,
so both live in one file) and, for checkpoints, `class_names`.  A path without the .npz
suffix gets it.  Files written before provenance was recorded load with provenance None.

A sharded run (`mtl embed --shard i/n`) writes `x.part-i-of-n.npz`; `merge_parts` joins
them, in order, into `x.npz`.
"""

from __future__ import annotations

import json
import re
import zipfile
import zlib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from mtl.eval.baselines import HASH_BITS, HASH_METHODS
from mtl.io import UserError, atomic_path

ROLES = ("reference", "query")


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32 (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class Provenance:
    """How a file's vectors were made: two files are comparable only when all of
    it matches (pHash against dHash, two checkpoints, MTL against PCA or two input
    sizes all give scores, and all of them are meaningless)."""

    kind: str                             # mtl | gap1280 | pca | phash | dhash
    dim: int
    checkpoint: str | None = None         # file_digest of the checkpoint (models only)
    image_size: int | None = None         # model input size (hashes see the whole image)
    mean: tuple[float, ...] | None = None  # input normalization (models only)
    std: tuple[float, ...] | None = None
    projection: str | None = None         # digest of the PCA projection (pca only)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Provenance":
        record = json.loads(text)
        for name in ("mean", "std"):
            if record.get(name) is not None:
                record[name] = tuple(record[name])
        return cls(**{f.name: record.get(f.name) for f in fields(cls)})

    def differences(self, other: "Provenance") -> list[str]:
        """'name this vs that' for every field that differs."""
        return [f"{f.name} {getattr(self, f.name)} vs {getattr(other, f.name)}" for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]


@dataclass(frozen=True)
class EmbeddingResult:
    """Descriptors of the images that could be read, in input order."""

    ids: np.ndarray                       # [N] str
    embeddings: np.ndarray                # [N, D] float32, unit rows
    method: str
    images_per_second: float = float("nan")
    class_probs: np.ndarray | None = None  # [N, C] float32
    failed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))
    failed_reasons: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))
    roles: np.ndarray | None = None       # [N] 'reference' | 'query' (eval sets)
    class_names: np.ndarray | None = None  # [C]
    provenance: Provenance | None = None  # None in files written before it was recorded

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.ids):
            raise ValueError(f"embeddings {self.embeddings.shape} do not match {len(self.ids)} ids")
        for name in ("class_probs", "roles"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.ids):
                raise ValueError(f"{name} has {len(value)} rows for {len(self.ids)} ids")

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def bytes_per_vector(self) -> int:
        """Storage of one descriptor: hashes are bits, everything else float32."""
        if self.method in HASH_METHODS:
            return HASH_BITS // 8
        return 4 * self.dim

    def subset(self, mask: np.ndarray) -> "EmbeddingResult":
        mask = np.asarray(mask, dtype=bool)
        return replace(self, ids=self.ids[mask], embeddings=self.embeddings[mask],
                       class_probs=None if self.class_probs is None else self.class_probs[mask],
                       roles=None if self.roles is None else self.roles[mask])

    def role(self, role: str) -> "EmbeddingResult":
        """Only the references or only the queries of an eval-set embedding."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if self.roles is None:
            raise ValueError(f"these {self.method} embeddings have no roles: embed an eval set "
                             "(--evalset) to get references and queries in one file")
        return self.subset(self.roles == role)


def npz_path(path: str | Path) -> Path:
    """The file an --out names: with the .npz suffix, added when missing."""
    path = Path(path)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def save_npz(result: EmbeddingResult, path: str | Path) -> Path:
    """Write `result` (atomically) and return the path written, `.npz` included."""
    path = npz_path(path)
    arrays = {"ids": result.ids.astype(str), "embeddings": result.embeddings.astype(np.float32),
              "failed": result.failed.astype(str), "failed_reasons": result.failed_reasons.astype(str),
              "method": np.array(result.method), "images_per_second": np.array(result.images_per_second)}
    for name in ("class_probs", "roles", "class_names"):
        value = getattr(result, name)
        if value is not None:
            arrays[name] = value.astype(np.float32) if name == "class_probs" else value.astype(str)
    if result.provenance is not None:
        arrays["provenance"] = np.array(result.provenance.to_json())
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return path


# What a damaged or foreign .npz raises somewhere between opening and reading.
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile, zlib.error)


def load_npz(path: str | Path) -> EmbeddingResult:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no embeddings at {path} (write them with `mtl embed`)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return _result_from_arrays(data)
    except _UNREADABLE as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{path} is not a readable embeddings file ({reason}); write it again with `mtl embed`") \
            from error


def _result_from_arrays(data) -> EmbeddingResult:
    missing = {"ids", "embeddings", "method"} - set(data.files)
    if missing:
        raise ValueError(f"missing {sorted(missing)}")
    optional = {name: data[name] if name in data.files else None for name in ("class_probs", "roles", "class_names")}
    empty = np.zeros(0, dtype=str)
    return EmbeddingResult(
        ids=data["ids"].astype(str), embeddings=data["embeddings"].astype(np.float32),
        method=str(data["method"]),
        images_per_second=float(data["images_per_second"]) if "images_per_second" in data.files else float("nan"),
        failed=data["failed"].astype(str) if "failed" in data.files else empty,
        failed_reasons=data["failed_reasons"].astype(str) if "failed_reasons" in data.files else empty,
        provenance=Provenance.from_json(str(data["provenance"])) if "provenance" in data.files else None,
        **optional)


# --------------------------------------------------------------------------- the parts of a sharded run

def part_path(out: str | Path, index: int, count: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.part-{index}-of-{count}{out.suffix}")


def part_paths(out: str | Path) -> list[Path]:
    """The parts of `out` written with --shard, in order; all n of them or an error."""
    out = Path(out)
    pattern = re.compile(rf"{re.escape(out.stem)}\.part-(\d+)-of-(\d+){re.escape(out.suffix)}")
    found = {tuple(int(g) for g in m.groups()): path for path in out.parent.glob(f"{out.stem}.part-*")
             if (m := pattern.fullmatch(path.name))}
    counts = {n for _, n in found}
    if len(counts) != 1:
        raise FileNotFoundError(f"no complete set of parts of {out}: found {sorted(p.name for p in found.values())}")
    (count,) = counts
    missing = [i for i in range(count) if (i, count) not in found]
    if missing:
        raise FileNotFoundError(f"parts {missing} of {count} of {out} are missing")
    return [found[(i, count)] for i in range(count)]


def merge_results(parts: Sequence[EmbeddingResult]) -> EmbeddingResult:
    """The parts, in order, as one result; the speed is the images over the slowest part's time."""
    methods = {p.method for p in parts}
    if len(methods) != 1:
        raise ValueError(f"parts of different methods cannot be merged: {sorted(methods)}")
    with_rows = [p for p in parts if len(p.ids)] or list(parts[:1])

    def joined(name: str) -> np.ndarray | None:
        values = [getattr(p, name) for p in with_rows]
        return None if values[0] is None else np.concatenate(values)

    seconds = max((len(p.ids) / p.images_per_second for p in parts if len(p.ids) and p.images_per_second > 0),
                  default=float("nan"))
    return EmbeddingResult(
        ids=joined("ids"), embeddings=joined("embeddings"), method=methods.pop(),
        images_per_second=sum(len(p.ids) for p in parts) / seconds, class_probs=joined("class_probs"),
        failed=np.concatenate([p.failed for p in parts]), failed_reasons=np.concatenate([p.failed_reasons for p in parts]),
        roles=joined("roles"), class_names=with_rows[0].class_names)


def merge_parts(out: str | Path) -> EmbeddingResult:
    """Join the parts of `out` into `out` and delete them; returns the joined result."""
    parts = part_paths(out)
    merged = merge_results([load_npz(p) for p in parts])
    if not len(merged.ids):
        raise ValueError(f"none of the images of {out}'s {len(parts)} parts could be read")
    save_npz(merged, out)
    for path in parts:
        path.unlink()
    return merged
