"""A split of the evaluation set as one folder: what `mtl dedup` faces, scored.

`mtl dedup` compares every image of a folder with every other, so its decisions are
chosen and measured the same way: a split's references and queries as one folder, every
pair scored, a pair *correct* when both images are copies of one picture (a reference and
its copies, or two copies of one reference), *unknown* when both are distractors cut from
one picture (neither the eval set nor a person can say; left out), *wrong* otherwise.

A pair's score is the raw cosine, or the normalized score with the folder itself as the
background (mtl.eval.normalize, background ``folder``).  Decisions:

    threshold   accept s >= t (with the class gate: only pairs of one predicted class)
    combined    accept a pair when its pHash distance is at most r bits, or when its
                embedding score passes the threshold (gate included): the hash catches
                the near-exact copies a small descriptor may miss, the descriptor the
                heavy edits a hash cannot survive

Small folders (val) are scored over every pair (`folder_pairs`); a large folder is
measured at one threshold with a range search (`pairs_at`), so memory grows with the pairs
found, not with the square of the folder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mtl.eval.baselines import HASH_BITS
from mtl.eval.embeddings import EmbeddingResult
from mtl.eval.metrics import micro_average_precision, threshold_for_precision
from mtl.eval.normalize import Normalization, folder_densities, normalized_pairs_above
from mtl.eval.search import pairs_above


def folder_keys(split) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """The ground truth of the split (an EvalSplit) as one folder, per image id: the
    reference it is a copy of (a reference is its own; None for a distractor), and its
    source picture (None for a reference, or when the eval set does not record it).  Two
    images are a true pair when they share a reference, unknown when both are distractors
    of one picture."""
    copy_of = {r: r for r in split.references["reference_id"]}
    group_of: dict[str, str | None] = dict.fromkeys(copy_of)
    groups = split.queries["source_group"] if "source_group" in split.queries else [None] * len(split.queries)
    for query, reference, source in zip(split.queries["query_id"], split.queries["reference_id"], groups):
        copy_of[query] = None if pd.isna(reference) else reference
        group_of[query] = source or None
    return copy_of, group_of


@dataclass(frozen=True)
class FolderTruth:
    """Who is a copy of whom in a folder of eval-set images (see folder_keys)."""

    copy_of: dict[str, str | None]
    group_of: dict[str, str | None]

    @classmethod
    def of_split(cls, split) -> "FolderTruth":
        return cls(*folder_keys(split))

    def check(self, ids, what: str = "the split") -> None:
        missing = [i for i in ids if i not in self.copy_of]
        if missing:
            raise ValueError(f"{len(missing)} embedded ids are not in {what}, e.g. {missing[0]!r}")

    def codes(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """Integer codes of each id's reference and picture (-1: none), for vectorized labels."""
        copies = pd.Series([self.copy_of.get(i) for i in ids], dtype=object)
        groups = pd.Series([self.group_of.get(i) for i in ids], dtype=object)
        return pd.factorize(copies)[0], pd.factorize(groups)[0]  # None -> -1

    def label(self, a_ids, b_ids) -> tuple[np.ndarray, np.ndarray]:
        """(correct, unknown) for pairs of ids; an id outside the truth is a distractor of
        no known picture (every pair with it is wrong)."""
        a_ids, b_ids = list(a_ids), list(b_ids)
        copy, group = self.codes(a_ids + b_ids)
        return self.label_codes(copy[:len(a_ids)], copy[len(a_ids):], group[:len(a_ids)], group[len(a_ids):])

    @staticmethod
    def label_codes(copy_a, copy_b, group_a, group_b) -> tuple[np.ndarray, np.ndarray]:
        correct = (copy_a >= 0) & (copy_a == copy_b)
        # An eval set without source groups has no unknown pairs (no picture is no picture).
        unknown = (copy_a < 0) & (copy_b < 0) & (group_a >= 0) & (group_a == group_b)
        return correct, unknown

    def pair_labels(self, ids, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(correct, unknown) of the pairs (a[k], b[k]) of rows of `ids`."""
        copy, group = self.codes(ids)
        return self.label_codes(copy[a], copy[b], group[a], group[b])

    def n_true_pairs(self, ids) -> int:
        """Correct pairs among `ids`: each reference with its copies, and copies among themselves."""
        sizes = pd.Series([self.copy_of.get(i) for i in ids], dtype=object).dropna().value_counts()
        return int((sizes * (sizes - 1) // 2).sum())


def pair_scores(result: EmbeddingResult, normalization: Normalization | None = None,
                densities: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, score) of every pair of rows a < b: the cosine, or s' with the folder's densities
    (computed here when not given)."""
    a, b = np.triu_indices(len(result.ids), k=1)
    scores = np.einsum("ij,ij->i", result.embeddings[a], result.embeddings[b]).astype(np.float64)
    if normalization is not None and normalization.beta > 0:
        rho = folder_densities(result.embeddings, normalization) if densities is None else densities
        scores = normalization.apply(scores, rho[a], rho[b])
    return a, b, scores


def folder_pairs(result: EmbeddingResult, split, gate: bool = False,
                 normalization: Normalization | None = None) -> tuple[pd.DataFrame, int]:
    """Every pair of the split's images as one folder: (a, b, score, correct), without the
    unknown pairs, and the number of correct pairs.  With `gate`, pairs whose predicted
    classes differ are left out, as `mtl dedup` leaves them out; with `normalization`,
    scores are on its scale, the folder as background."""
    truth = FolderTruth.of_split(split)
    truth.check(result.ids, f"the {split.name} split")
    a, b, scores = pair_scores(result, normalization)
    correct, unknown = truth.pair_labels(result.ids, a, b)
    keep = ~unknown
    if gate:
        keep &= _same_class_pairs(result, a, b)
    pairs = pd.DataFrame({"a": result.ids[a][keep], "b": result.ids[b][keep], "score": scores[keep],
                          "correct": correct[keep]})
    return pairs, int(correct.sum())


def _same_class_pairs(result: EmbeddingResult, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if result.class_probs is None:
        raise ValueError(f"{result.method} has no class probabilities: the gate needs a checkpoint")
    predicted = result.class_probs.argmax(axis=1)
    return predicted[a] == predicted[b]


def folder_threshold(result: EmbeddingResult, split, target_precision: float, gate: bool = False,
                     normalization: Normalization | None = None) -> float:
    """The lowest score threshold at which `mtl dedup` on the split's images, as one folder,
    keeps pairs with precision >= target at the highest recall (+inf when none does)."""
    pairs, n_correct = folder_pairs(result, split, gate, normalization)
    return threshold_for_precision(pairs, n_correct, target_precision)


def folder_average_precision(result: EmbeddingResult, split, gate: bool = False,
                             normalization: Normalization | None = None) -> float:
    """Average precision over every pair of the folder (μAP of the folder task)."""
    pairs, n_correct = folder_pairs(result, split, gate, normalization)
    return micro_average_precision(pairs, n_correct) if n_correct else float("nan")


# --------------------------------------------------------------------------- one threshold, any size

@dataclass(frozen=True)
class FolderScore:
    """What accepting the pairs of a folder at one decision gives."""

    images: int
    accepted: int
    true_positives: int
    n_true_pairs: int

    @property
    def precision(self) -> float:
        return self.true_positives / self.accepted if self.accepted else 1.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.n_true_pairs if self.n_true_pairs else float("nan")

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    def as_dict(self) -> dict:
        return {"images": self.images, "accepted": self.accepted, "true_positives": self.true_positives,
                "n_true_pairs": self.n_true_pairs, "precision": self.precision, "recall": self.recall,
                "f1": self.f1}


def accepted_pairs(result: EmbeddingResult, threshold: float, gate: bool = False,
                   normalization: Normalization | None = None, densities: np.ndarray | None = None,
                   hashes: EmbeddingResult | None = None, hamming_radius: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) rows (a < b) of the pairs a decision accepts: embedding score >= threshold
    (normalized when `normalization`; with the gate, one predicted class), or, with
    `hashes` and `hamming_radius`, a hash distance within the radius (the combined decision)."""
    if normalization is not None and normalization.beta > 0:
        rho = folder_densities(result.embeddings, normalization) if densities is None else densities
        a, b, _ = normalized_pairs_above(result.embeddings, rho, normalization.beta, threshold)
    else:
        a, b, _ = pairs_above(result.embeddings, threshold)
    if gate:
        keep = _same_class_pairs(result, a, b)
        a, b = a[keep], b[keep]
    if hashes is not None and hamming_radius is not None:
        if not np.array_equal(hashes.ids, result.ids):
            raise ValueError("the hashes and the embeddings must list the same images in the same order")
        ha, hb, _ = pairs_above(hashes.embeddings, hash_score(hamming_radius))
        joined = np.unique(np.concatenate([a * len(result.ids) + b, ha * len(result.ids) + hb]))
        a, b = joined // len(result.ids), joined % len(result.ids)
    return a, b


def pairs_at(result: EmbeddingResult, truth: FolderTruth, threshold: float, **decision) -> FolderScore:
    """Precision and recall of one decision (see accepted_pairs) over a folder of any size;
    unknown pairs are left out."""
    a, b = accepted_pairs(result, threshold, **decision)
    correct, unknown = truth.pair_labels(result.ids, a, b)
    return FolderScore(len(result.ids), int((~unknown).sum()), int((correct & ~unknown).sum()),
                       truth.n_true_pairs(result.ids))


# --------------------------------------------------------------------------- the combined decision

def hash_score(radius: int) -> float:
    """The hash score of a Hamming distance (1 − 2·d/64): pairs within `radius` bits score at least this."""
    return 1.0 - 2.0 * radius / HASH_BITS


def hamming_of_scores(scores: np.ndarray) -> np.ndarray:
    return np.rint((1.0 - np.asarray(scores, np.float64)) * HASH_BITS / 2).astype(np.int64)


@dataclass(frozen=True)
class CombinedDecision:
    """pHash within `hamming_radius` bits, or the embedding's score >= `threshold`."""

    hamming_radius: int
    threshold: float
    val_recall: float
    val_precision: float


def choose_combined(result: EmbeddingResult, hashes: EmbeddingResult, split, target_precision: float,
                    gate: bool = False, normalization: Normalization | None = None,
                    radii=range(0, 11)) -> tuple[CombinedDecision | None, pd.DataFrame]:
    """The radius and embedding threshold of the combined decision with the highest recall
    at precision >= target on the split as one folder (val); among equals the smaller
    radius.  None when no radius reaches the target.  Also the whole grid."""
    if not np.array_equal(hashes.ids, result.ids):
        raise ValueError("the hashes and the embeddings must list the same images in the same order")
    truth = FolderTruth.of_split(split)
    truth.check(result.ids, f"the {split.name} split")
    a, b, scores = pair_scores(result, normalization)
    hamming = hamming_of_scores(np.einsum("ij,ij->i", hashes.embeddings[a], hashes.embeddings[b]))
    correct, unknown = truth.pair_labels(result.ids, a, b)
    passes_gate = _same_class_pairs(result, a, b) if gate else np.ones(len(a), bool)
    keep = ~unknown
    n_correct = int(correct.sum())
    rows, best = [], None
    for radius in radii:
        by_hash = hamming[keep] <= radius
        embedding_score = np.where(passes_gate[keep], scores[keep], -np.inf)
        # hash matches are accepted at any threshold: they rank first
        ranked = pd.DataFrame({"score": np.where(by_hash, np.inf, embedding_score), "correct": correct[keep]})
        hash_tp, hash_n = int((by_hash & correct[keep]).sum()), int(by_hash.sum())
        if hash_n and hash_tp / hash_n < target_precision:
            rows.append({"hamming_radius": radius, "threshold": np.nan, "recall": np.nan, "precision": np.nan})
            continue
        threshold = threshold_for_precision(ranked, n_correct, target_precision)
        accepted = ranked["score"] >= threshold
        tp, n = int((accepted & ranked["correct"]).sum()), int(accepted.sum())
        recall, precision = tp / n_correct if n_correct else 0.0, tp / n if n else 1.0
        rows.append({"hamming_radius": radius, "threshold": threshold, "recall": recall, "precision": precision})
        # an infinite threshold is the hash alone: the embedding adds no pair at the target
        if (np.isfinite(threshold) or hash_n) and (best is None or recall > best.val_recall):
            best = CombinedDecision(radius, float(threshold), recall, precision)
    return best, pd.DataFrame(rows)
