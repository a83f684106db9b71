"""Which images in a folder are copies of each other (`mtl dedup`, mtl.dedup.cli), with
the study's trained model, its calibrated threshold and the class gate.

    thresholds.py  the method, its threshold (operating point or --threshold), gate and input size
    cache.py       the folder's descriptors, embedded once per file content and model
    groups.py      pairs above the threshold, groups and their keepers; what a run writes
    report.py      report.html, to review the groups in a browser
    moves.py       non-keepers moved aside (dry run, --apply) and back (--undo)

In Python: ``find_duplicates(folder)`` (below) returns a DedupResult.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from mtl.dedup.cache import DEFAULT_CACHE, embed_folder
from mtl.dedup.groups import DedupResult, file_facts, group_pairs, score_pairs
from mtl.dedup.thresholds import resolve_method
from mtl.eval.operating_points import DEFAULT_OPERATING_POINTS


def find_duplicates(folder: str | Path, method: str = "best", threshold: float | None = None,
                    gate: bool = True, min_score_report: float | None = None,
                    operating_points: str | Path = DEFAULT_OPERATING_POINTS,
                    cache_dir: str | Path = DEFAULT_CACHE, image_size: int | None = None,
                    batch_size: int = 128, device: str = "auto", num_workers: int = 1, raw: bool = False,
                    decision: str = "auto") -> DedupResult:
    """Duplicates among the images under `folder` (see `mtl dedup --help`).

    `gate=False` is `--no-gate`; `threshold` overrides the operating point's (on the scale
    in use: normalized unless `raw`); `decision` is auto (the operating point's), threshold
    or combined."""
    folder = Path(folder)
    chosen = resolve_method(method, operating_points, threshold, gate, image_size, raw, decision)
    embedded = embed_folder(folder, chosen, cache_dir, batch_size, device, num_workers)
    hashes = None
    if chosen.hamming_radius is not None:
        hashes = embed_folder(folder, chosen.hashes(), cache_dir, batch_size, device, num_workers)
        hashes = _same_files(hashes, embedded.ids)
    pairs = score_pairs(embedded, chosen, min_score_report, hashes)
    listed = np.unique(np.concatenate([pairs["a"], pairs["b"]])) if len(pairs) else []
    facts = file_facts(folder, listed)
    if embedded.class_probs is not None:
        names = np.array(embedded.class_names or range(embedded.class_probs.shape[1]), dtype=str)
        predicted = pd.Series(names[embedded.class_probs.argmax(axis=1)], index=embedded.ids)
        facts["class"] = predicted.reindex(facts.index)
    return DedupResult(folder, chosen, pairs, group_pairs(pairs, facts), facts, embedded)


def _same_files(hashes, ids):
    """The hash side restricted to (and ordered as) the files the embedding could read."""
    position = {i: k for k, i in enumerate(hashes.ids)}
    missing = [i for i in ids if i not in position]
    if missing:
        raise ValueError(f"{len(missing)} files were embedded but not hashed, e.g. {missing[0]}")
    rows = np.array([position[i] for i in ids], dtype=np.int64)
    return replace(hashes, ids=hashes.ids[rows], embeddings=hashes.embeddings[rows])
