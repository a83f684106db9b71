"""models/operating_points.json: the thresholds chosen on the val split for a target
precision, written by the evaluate stage and read by `mtl dedup`.

    {name: {descriptor: mtl|gap1280|phash|dhash, threshold (a score: cosine, for hashes
    1 - 2 hamming/64), target_precision, split, checkpoint, checkpoint_digest (mtl.io.file_digest
    of the file), image_size, gate}}

with names `best` (the trained model), `imagenet`, `phash` and `dhash`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mtl.eval.evaluation import EvalConfig
from mtl.io import file_digest, write_json

DEFAULT_OPERATING_POINTS = Path("models/operating_points.json")
DESCRIPTORS = ("mtl", "gap1280", "phash", "dhash")


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


def write_operating_points(table: pd.DataFrame, cfg: EvalConfig, best: Path, path: Path) -> Path:
    """The val-chosen thresholds `mtl dedup` decides with, from the evaluation's table: the
    trained model (checkpoint `best`, class gate on), the ImageNet backbone's 1280-d output,
    and the two hashes."""
    rows = table.set_index("method")
    entries = {
        "best": ("best_finetune_gate", "mtl", best, True),
        "imagenet": ("backbone_gap1280", "gap1280", None, False),
        "phash": ("phash", "phash", None, False),
        "dhash": ("dhash", "dhash", None, False),
    }
    points = {}
    for name, (method, descriptor, checkpoint, gate) in entries.items():
        if method not in rows.index:
            continue
        points[name] = {"descriptor": descriptor, "threshold": float(rows.loc[method, "threshold"]),
                        "target_precision": float(cfg.target_precision), "split": "val",
                        "checkpoint": str(checkpoint) if checkpoint else None,
                        "checkpoint_digest": file_digest(checkpoint) if checkpoint else None,
                        "image_size": cfg.image_size if descriptor in ("mtl", "gap1280") else None, "gate": gate}
    return write_json(path, points)
