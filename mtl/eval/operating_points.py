"""models/operating_points.json: the thresholds chosen on the val split for a target
precision, written by the evaluate stage and read by `mtl dedup`.

`mtl dedup` compares every image of a folder with every other, so its thresholds are
chosen the same way: the val split's references and queries as one folder, every pair
scored, a pair correct when both are copies of one picture (a reference and its copies,
or two copies of one reference), unknown when both are distractors cut from one picture
(neither the eval set nor a person can say), wrong otherwise.  The query -> reference
thresholds of the evaluation table are lower: among all pairs of a folder there are
many more wrong ones to pass.

    {name: {descriptor: mtl|gap1280|phash|dhash, threshold (a score: cosine, for hashes
    1 - 2 hamming/64), target_precision, split, checkpoint, checkpoint_digest (mtl.io.file_digest
    of the file), image_size, gate}}

with names `best` (the trained model), `imagenet`, `phash` and `dhash`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mtl.eval.embeddings import EmbeddingResult
from mtl.eval.evaluation import EvalConfig, EvalSplit
from mtl.eval.metrics import threshold_for_precision
from mtl.io import file_digest, write_json

DEFAULT_OPERATING_POINTS = Path("models/operating_points.json")
DESCRIPTORS = ("mtl", "gap1280", "phash", "dhash")
# name in operating_points.json: (the evaluation's method, its descriptor, the class gate)
OPERATING_POINTS = {
    "best": ("best_finetune", "mtl", True),
    "imagenet": ("backbone_gap1280", "gap1280", False),
    "phash": ("phash", "phash", False),
    "dhash": ("dhash", "dhash", False),
}
OPERATING_POINT_METHODS = {method for method, _, _ in OPERATING_POINTS.values()}


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
    calibration: str = "folder"  # every pair of the val split as one folder (the module docstring)

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


def folder_pairs(result: EmbeddingResult, split: EvalSplit, gate: bool = False) -> tuple[pd.DataFrame, int]:
    """Every pair of the split's images as one folder: (a, b, score, correct), without the
    unknown pairs, and the number of correct pairs.  With `gate`, pairs whose predicted
    classes differ are left out, as `mtl dedup` leaves them out."""
    copy_of, group_of = folder_keys(split)
    missing = [i for i in result.ids if i not in copy_of]
    if missing:
        raise ValueError(f"{len(missing)} embedded ids are not in the {split.name} split, e.g. {missing[0]!r}")
    copy = np.array([copy_of[i] for i in result.ids], dtype=object)
    group = np.array([group_of[i] for i in result.ids], dtype=object)
    a, b = np.triu_indices(len(result.ids), k=1)
    scores = np.einsum("ij,ij->i", result.embeddings[a], result.embeddings[b])
    correct = (copy[a] != None) & (copy[a] == copy[b])  # noqa: E711 (elementwise)
    # An eval set without source groups has no unknown pairs (None == None is no picture).
    unknown = (copy[a] == None) & (copy[b] == None) & (group[a] != None) & (group[a] == group[b])  # noqa: E711
    n_correct = int(correct.sum())
    keep = ~unknown
    if gate:
        if result.class_probs is None:
            raise ValueError(f"{result.method} has no class probabilities: the gate needs a checkpoint")
        predicted = result.class_probs.argmax(axis=1)
        keep &= predicted[a] == predicted[b]
    pairs = pd.DataFrame({"a": result.ids[a][keep], "b": result.ids[b][keep], "score": scores[keep],
                          "correct": correct[keep]})
    return pairs, n_correct


def folder_keys(split: EvalSplit) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """The ground truth of the split as one folder, per image id: the reference it is a copy
    of (a reference is its own; None for a distractor), and its source picture (None for a
    reference, or when the eval set does not record it).  Two images are a true pair when
    they share a reference, unknown when both are distractors of one picture."""
    copy_of = {r: r for r in split.references["reference_id"]}
    group_of: dict[str, str | None] = dict.fromkeys(copy_of)
    groups = split.queries["source_group"] if "source_group" in split.queries else [None] * len(split.queries)
    for query, reference, source in zip(split.queries["query_id"], split.queries["reference_id"], groups):
        copy_of[query] = None if pd.isna(reference) else reference
        group_of[query] = source or None
    return copy_of, group_of


def folder_threshold(result: EmbeddingResult, split: EvalSplit, target_precision: float,
                     gate: bool = False) -> float:
    """The lowest score threshold at which `mtl dedup` on the split's images, as one folder,
    keeps pairs with precision >= target at the highest recall (+inf when none does)."""
    pairs, n_correct = folder_pairs(result, split, gate)
    return threshold_for_precision(pairs, n_correct, target_precision)


def write_operating_points(val_embeddings: dict[str, EmbeddingResult], val_split: EvalSplit, cfg: EvalConfig,
                           best: Path, path: Path) -> Path:
    """The thresholds `mtl dedup` decides with, chosen on the val split as one folder
    (see the module docstring): the trained model (checkpoint `best`, class gate on),
    the ImageNet backbone's 1280-d output, and the two hashes.  `val_embeddings` maps
    the evaluation's method names to their val embeddings; absent methods are skipped."""
    points = {}
    for name, (method, descriptor, gate) in OPERATING_POINTS.items():
        checkpoint = best if descriptor == "mtl" else None
        if method not in val_embeddings:
            continue
        threshold = folder_threshold(val_embeddings[method], val_split, cfg.target_precision, gate)
        points[name] = {"descriptor": descriptor, "threshold": threshold,
                        "target_precision": float(cfg.target_precision), "split": "val", "calibration": "folder",
                        "checkpoint": str(checkpoint) if checkpoint else None,
                        "checkpoint_digest": file_digest(checkpoint) if checkpoint else None,
                        "image_size": cfg.image_size if descriptor in ("mtl", "gap1280") else None, "gate": gate}
    return write_json(path, points)
