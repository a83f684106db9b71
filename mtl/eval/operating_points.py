"""models/operating_points.json: the decisions chosen on the val split for a target
precision, written by the evaluate stage and read by `mtl dedup` and `mtl search`.

`mtl dedup` compares every image of a folder with every other, so its decisions are
chosen the same way: the val split's references and queries as one folder (mtl.eval.folder).
Scores are normalized by default, the folder as background (mtl.eval.normalize): k and β
with the highest folder average precision on val, then the lowest threshold keeping pair
precision >= target at the highest recall.  The raw-cosine threshold is kept beside it
(`--raw`), and the combined decision (pHash within r bits, or the embedding's score) is
chosen on val too; `decision` names it the default only when its val recall is higher by
COMBINED_MIN_GAIN.  The query ->
reference thresholds of `mtl search` (the references as background) are lower: among all
pairs of a folder there are many more wrong ones to pass.

    {name: {descriptor: mtl|gap1280|phash|dhash,
            threshold            the folder decision's score threshold, on the normalized scale
                                 when `normalization` is set (a cosine; hashes 1 - 2 hamming/64),
            raw_threshold        the same precision on the raw scale,
            normalization        {k, beta, background: folder} or null,
            combined             {hamming_radius, threshold} or null (trained model only),
            decision             threshold | combined: what `mtl dedup` uses by default,
            search               {normalization {k, beta, background: references}, threshold,
                                  raw_threshold}: query -> reference, for `mtl search`,
            target_precision, split, checkpoint, checkpoint_digest (mtl.io.file_digest of the
            file), image_size, gate}}

with names `best` (the trained model), `imagenet`, `phash` and `dhash`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from mtl.eval.embeddings import EmbeddingResult
from mtl.eval.evaluation import EvalConfig, EvalSplit
from mtl.eval.folder import (FolderTruth, choose_combined, folder_average_precision, folder_pairs, folder_threshold,
                             pairs_at)
from mtl.eval.normalize import Normalization, choose_parameters
from mtl.io import file_digest, write_json

DEFAULT_OPERATING_POINTS = Path("models/operating_points.json")
# The combined decision becomes the default only when it finds this much more of the val
# folder's true pairs than the embedding alone (both at the target precision): a pair or
# two of 160 is noise, and the hash's part does not normalize with the folder's size.
COMBINED_MIN_GAIN = 0.02
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
    raw_threshold: float | None = None     # the raw-cosine threshold (None: `threshold` is raw)
    normalization: dict | None = None      # {k, beta, background}: the scale of `threshold`
    combined: dict | None = None           # {hamming_radius, threshold}
    decision: str = "threshold"            # threshold | combined
    search: dict | None = None             # query -> reference: {normalization, threshold, raw_threshold}

    @property
    def folder_normalization(self) -> Normalization | None:
        return None if self.normalization is None else Normalization.from_dict(self.normalization)

    @property
    def search_normalization(self) -> Normalization | None:
        entry = (self.search or {}).get("normalization")
        return None if entry is None else Normalization.from_dict(entry)

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
        if entry.get("decision", "threshold") not in ("threshold", "combined"):
            raise ValueError(f"{where}: decision must be 'threshold' or 'combined', got {entry['decision']!r}")
        if entry.get("decision") == "combined" and not entry.get("combined"):
            raise ValueError(f"{where}: decision 'combined' needs a 'combined' entry")
        for key in ("normalization",):
            if entry.get(key) is not None:
                Normalization.from_dict(entry[key], f"{where}: {key}")
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


def choose_folder_normalization(result: EmbeddingResult, split: EvalSplit, cfg: EvalConfig,
                                gate: bool = False) -> tuple[Normalization, pd.DataFrame]:
    """k and β with the highest average precision over every pair of the val folder, the
    folder as background (the grids of params.yaml `eval`)."""
    return choose_parameters(lambda n: folder_average_precision(result, split, gate, n),
                             cfg.norm_k_grid, cfg.norm_beta_grid, background="folder")


def search_entry(table: pd.DataFrame | None, method: str) -> dict | None:
    """The query -> reference decision of `method` from the evaluation table: the val
    thresholds of its raw and normalized rows, and the normalization chosen on val."""
    if table is None:
        return None
    rows = table.set_index("method")
    if method not in rows.index:
        return None
    entry = {"threshold": _number(rows.at[method, "threshold"]), "raw_threshold": _number(rows.at[method, "threshold"]),
             "normalization": None}
    normalized = f"{method}_norm"
    if normalized in rows.index:
        entry["threshold"] = _number(rows.at[normalized, "threshold"])
        entry["normalization"] = Normalization(int(rows.at[normalized, "norm_k"]),
                                               float(rows.at[normalized, "norm_beta"]), "references").as_dict()
    return entry


def _number(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def write_operating_points(val_embeddings: Mapping[str, EmbeddingResult], val_split: EvalSplit, cfg: EvalConfig,
                           best: Path, path: Path, evaluation_table: pd.DataFrame | None = None) -> Path:
    """The decisions `mtl dedup` makes, chosen on the val split as one folder (see the
    module docstring): the trained model (checkpoint `best`, class gate on), the ImageNet
    backbone's 1280-d output, and the two hashes.  `val_embeddings` maps the evaluation's
    method names to their val embeddings; absent methods are skipped.  The evaluation's
    table gives each method's query -> reference thresholds (`search`)."""
    points = {}
    for name, (method, descriptor, gate) in OPERATING_POINTS.items():
        checkpoint = best if descriptor == "mtl" else None
        if method not in val_embeddings:
            continue
        result = val_embeddings[method]
        raw = folder_threshold(result, val_split, cfg.target_precision, gate)
        normalization, _ = choose_folder_normalization(result, val_split, cfg, gate)
        normalization = normalization if normalization.beta > 0 else None
        threshold = raw if normalization is None else \
            folder_threshold(result, val_split, cfg.target_precision, gate, normalization)
        combined, decision = None, "threshold"
        if descriptor == "mtl" and "phash" in val_embeddings:
            chosen, _ = choose_combined(result, val_embeddings["phash"], val_split, cfg.target_precision, gate,
                                        normalization)
            if chosen is not None:
                combined = {"hamming_radius": chosen.hamming_radius, "threshold": chosen.threshold,
                            "val_recall": chosen.val_recall}
                alone = folder_recall(result, val_split, threshold, gate, normalization)
                decision = "combined" if chosen.val_recall >= alone + COMBINED_MIN_GAIN else "threshold"
        points[name] = {"descriptor": descriptor, "threshold": threshold, "raw_threshold": raw,
                        "normalization": None if normalization is None else normalization.as_dict(),
                        "combined": combined, "decision": decision, "search": search_entry(evaluation_table, method),
                        "target_precision": float(cfg.target_precision), "split": "val", "calibration": "folder",
                        "checkpoint": str(checkpoint) if checkpoint else None,
                        "checkpoint_digest": file_digest(checkpoint) if checkpoint else None,
                        "image_size": cfg.image_size if descriptor in ("mtl", "gap1280") else None, "gate": gate}
    return write_json(path, points)


def folder_recall(result: EmbeddingResult, split: EvalSplit, threshold: float, gate: bool,
                  normalization: Normalization | None) -> float:
    """Recall of the threshold decision on the split as one folder."""
    pairs, n_correct = folder_pairs(result, split, gate, normalization)
    return float((pairs["correct"] & (pairs["score"] >= threshold)).sum() / n_correct) if n_correct else 0.0


def folder_decisions(points: Mapping[str, OperatingPoint], embeddings: Mapping[str, Mapping[str, EmbeddingResult]],
                     splits: Mapping[str, EvalSplit]) -> pd.DataFrame:
    """Each operating point's decisions (raw, normalized, combined) applied unchanged to
    every split as one folder ({split: {method: embeddings}}): the folder's images, the
    pairs accepted, precision, recall and F1.  The val rows are the calibration; the
    others say how the decisions transfer to another, larger folder."""
    rows = []
    for name, point in points.items():
        method = OPERATING_POINTS[name][0]
        for split_name, split in splits.items():
            result = embeddings[split_name][method]
            truth = FolderTruth.of_split(split)
            decisions = [("raw", point.raw_threshold if point.raw_threshold is not None else point.threshold, {})]
            if point.folder_normalization is not None:
                decisions.append(("normalized", point.threshold, {"normalization": point.folder_normalization}))
            if point.combined is not None:
                decisions.append(("combined", point.combined["threshold"],
                                  {"normalization": point.folder_normalization, "hashes": embeddings[split_name]["phash"],
                                   "hamming_radius": point.combined["hamming_radius"]}))
            for decision, threshold, options in decisions:
                score = pairs_at(result, truth, threshold, gate=point.gate, **options)
                rows.append({"name": name, "decision": decision, "default": _is_default(point, decision),
                             "split": split_name, "threshold": threshold,
                             "hamming_radius": options.get("hamming_radius"), **score.as_dict()})
    return pd.DataFrame(rows)


def _is_default(point: OperatingPoint, decision: str) -> bool:
    if point.decision == "combined":
        return decision == "combined"
    return decision == ("normalized" if point.folder_normalization is not None else "raw")
