"""Copy-detection metrics with the isc2021 (DISC21) definitions.

A *prediction* is one (query_id, reference_id, score) triple; a search returns
the top-k references of every query, so most predictions are wrong and every
distractor query (no reference) contributes only wrong ones.  All metrics pool
the predictions of all queries into one ranked list, as the isc2021 benchmark
does: a method is rewarded for scores that are comparable *across* queries,
which is what a single operating threshold in production needs.

- micro-average precision (μAP): sort by score, descending; tied scores put
  wrong predictions first (pessimistic, so a constant score cannot look good);
  AP = Σ (r_i − r_{i−1})·p_i with recall r over ALL ground-truth pairs, so a
  copy that never appears among the predictions costs recall.
- recall at precision p: the highest recall on that curve where precision ≥ p
  (0 if precision p is never reached).
- accuracy@1: among queries that have a copy, the share whose best-scored
  prediction is their reference.
- an operating threshold is chosen on the *val* set for precision ≥ p and then
  applied unchanged to the test set, where its false positives are counted.

Predictions enter as a DataFrame with columns query_id, reference_id, score;
`label_predictions` adds the boolean column `correct` from the eval set's
queries.csv, which every metric below reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

PREDICTION_COLUMNS = ("query_id", "reference_id", "score")


def _require_columns(frame: pd.DataFrame, columns: tuple[str, ...] | list[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; it has {list(frame.columns)}")


def ground_truth_pairs(queries: pd.DataFrame) -> pd.DataFrame:
    """(query_id, reference_id) of every query that has a copy in the references.

    `queries` is an eval set's queries.csv; distractors have an empty reference_id.
    """
    _require_columns(queries, ["query_id", "reference_id"], "queries table")
    ref = queries["reference_id"]
    has_copy = ref.notna() & (ref.astype(str).str.strip() != "")
    pairs = queries.loc[has_copy, ["query_id", "reference_id"]].astype(str)
    return pairs.drop_duplicates().reset_index(drop=True)


def label_predictions(predictions: pd.DataFrame, queries: pd.DataFrame) -> pd.DataFrame:
    """Predictions with a boolean `correct` column: is (query, reference) a true copy pair?

    A (query, reference) pair predicted twice is kept once with its highest score,
    as isc2021 does, so repeating a correct pair cannot inflate recall.
    """
    _require_columns(predictions, PREDICTION_COLUMNS, "predictions")
    preds = predictions.copy()
    preds["query_id"] = preds["query_id"].astype(str)
    preds["reference_id"] = preds["reference_id"].astype(str)
    preds = (preds.sort_values("score", ascending=False, kind="stable")
             .drop_duplicates(["query_id", "reference_id"], keep="first"))
    truth = ground_truth_pairs(queries)
    truth_keys = set(zip(truth["query_id"], truth["reference_id"]))
    preds["correct"] = [(q, r) in truth_keys for q, r in zip(preds["query_id"], preds["reference_id"])]
    return preds.reset_index(drop=True)


def count_ground_truth(queries: pd.DataFrame) -> int:
    """Number of true (query, reference) pairs: the denominator of every recall."""
    return len(ground_truth_pairs(queries))


def _ranked(predictions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(scores, correct) in decreasing score; ties put wrong predictions first."""
    _require_columns(predictions, ["score", "correct"], "labelled predictions")
    scores = predictions["score"].to_numpy(dtype=np.float64)
    correct = predictions["correct"].to_numpy(dtype=bool)
    if np.isnan(scores).any():
        raise ValueError("predictions contain NaN scores")
    # lexsort sorts by the last key first: score descending, then correct ascending
    # (False before True) inside a tie.
    order = np.lexsort((correct, -scores))
    return scores[order], correct[order]


@dataclass(frozen=True)
class PrecisionRecallCurve:
    """One point per prediction in ranked order; `thresholds[i]` is the score of
    prediction i, so accepting score ≥ thresholds[i] gives at least that recall."""

    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"precision": self.precision, "recall": self.recall,
                             "threshold": self.thresholds})


def _check_n_ground_truth(correct: np.ndarray, n_ground_truth: int) -> None:
    if n_ground_truth <= 0:
        raise ValueError(f"n_ground_truth must be positive, got {n_ground_truth}")
    if correct.sum() > n_ground_truth:
        raise ValueError(f"{int(correct.sum())} correct predictions but only {n_ground_truth} "
                         "ground-truth pairs: duplicated pairs or a wrong n_ground_truth")


def precision_recall_curve(predictions: pd.DataFrame, n_ground_truth: int) -> PrecisionRecallCurve:
    """Precision and recall after each prediction of the pooled, ranked list."""
    scores, correct = _ranked(predictions)
    _check_n_ground_truth(correct, n_ground_truth)
    true_positives = np.cumsum(correct)
    n_accepted = np.arange(1, len(correct) + 1)
    return PrecisionRecallCurve(precision=true_positives / np.maximum(n_accepted, 1),
                                recall=true_positives / n_ground_truth, thresholds=scores)


def micro_average_precision(predictions: pd.DataFrame, n_ground_truth: int) -> float:
    """isc2021 μAP: Σ (r_i − r_{i−1})·p_i over the pooled ranked predictions."""
    curve = precision_recall_curve(predictions, n_ground_truth)
    if len(curve.recall) == 0:
        return 0.0
    recall_steps = np.diff(curve.recall, prepend=0.0)
    return float(np.sum(recall_steps * curve.precision))


def recall_at_precision(predictions: pd.DataFrame, n_ground_truth: int,
                        target_precision: float = 0.9) -> float:
    """Highest recall reached with precision ≥ target (0 if it is never reached)."""
    curve = precision_recall_curve(predictions, n_ground_truth)
    reached = curve.precision >= target_precision
    return float(curve.recall[reached].max()) if reached.any() else 0.0


def threshold_for_precision(predictions: pd.DataFrame, n_ground_truth: int,
                            target_precision: float = 0.9) -> float:
    """Score threshold (accept score ≥ t) of the highest-recall point with precision ≥ target.

    Choose it on the val set and apply it to the test set.  When the target is
    never reached the threshold is +inf: the honest operating point accepts nothing.
    """
    curve = precision_recall_curve(predictions, n_ground_truth)
    # A threshold cannot split predictions of equal score, so only the last point
    # of each run of tied scores is an operating point one can actually choose.
    scores = curve.thresholds
    run_end = np.append(scores[1:] < scores[:-1], True) if len(scores) else np.zeros(0, bool)
    feasible = run_end & (curve.precision >= target_precision)
    if not feasible.any():
        return float("inf")
    best_recall = curve.recall[feasible].max()
    # The first such point: beyond it only wrong predictions are added at equal recall.
    first = np.flatnonzero(feasible & (curve.recall == best_recall))[0]
    return float(scores[first])


@dataclass(frozen=True)
class OperatingPoint:
    """What accepting every prediction with score ≥ threshold gives."""

    threshold: float
    accepted: int
    true_positives: int
    false_positives: int
    precision: float
    recall: float


def false_positives_at(predictions: pd.DataFrame, threshold: float,
                       n_ground_truth: int | None = None) -> OperatingPoint:
    """Count accepted wrong predictions (score ≥ threshold), e.g. on test with a val threshold."""
    _require_columns(predictions, ["score", "correct"], "labelled predictions")
    accepted = predictions["score"].to_numpy(dtype=np.float64) >= threshold
    correct = predictions["correct"].to_numpy(dtype=bool)
    tp = int((accepted & correct).sum())
    fp = int((accepted & ~correct).sum())
    n_acc = int(accepted.sum())
    return OperatingPoint(threshold=float(threshold), accepted=n_acc, true_positives=tp,
                          false_positives=fp, precision=tp / n_acc if n_acc else 1.0,
                          recall=tp / n_ground_truth if n_ground_truth else float("nan"))


def top1_per_query(predictions: pd.DataFrame) -> pd.DataFrame:
    """The best-scored prediction of each query (ties: a wrong one, pessimistically)."""
    _require_columns(predictions, ["query_id", "score", "correct"], "labelled predictions")
    ranked = predictions.sort_values(["score", "correct"], ascending=[False, True], kind="stable")
    return ranked.drop_duplicates("query_id", keep="first").reset_index(drop=True)


def accuracy_at_1(predictions: pd.DataFrame, queries: pd.DataFrame) -> float:
    """Share of the queries that have a copy whose best-scored prediction is that copy.

    Scores, not a stored rank, decide the best: a decision rule that rescored or
    dropped predictions (gate, fusion) is measured as it would act.
    """
    truth = ground_truth_pairs(queries)
    if truth.empty:
        raise ValueError("no query has a copy: accuracy@1 is undefined")
    top1 = top1_per_query(predictions)
    hits = top1.loc[top1["correct"], "query_id"]
    return float(truth["query_id"].isin(hits).mean())


def recall_by_transformation(predictions: pd.DataFrame, queries: pd.DataFrame,
                             threshold: float = float("-inf")) -> pd.DataFrame:
    """Recall of each copy transformation: found at rank 1, and found at the threshold.

    Returns one row per transformation with columns transformation, held_out,
    n_queries, recall_at_1 (best-scored prediction is the copy) and
    recall_at_threshold (the copy is predicted with score ≥ threshold).
    Held-out transformations are those never seen in training: the gap between
    the two groups measures how far the learnt invariance generalizes.
    """
    _require_columns(queries, ["query_id", "reference_id", "transformation"], "queries table")
    queries = queries.assign(query_id=queries["query_id"].astype(str))
    positives = queries[queries["query_id"].isin(ground_truth_pairs(queries)["query_id"])]
    top1 = top1_per_query(predictions)
    found_at_1 = set(top1.loc[top1["correct"], "query_id"])
    accepted = predictions[(predictions["score"] >= threshold) & predictions["correct"]]
    found_at_t = set(accepted["query_id"])
    held_out = positives["held_out"] if "held_out" in positives else False
    table = pd.DataFrame({
        "transformation": positives["transformation"].astype(str),
        "held_out": pd.Series(held_out, index=positives.index).map(_as_bool),
        "found_at_1": positives["query_id"].isin(found_at_1),
        "found_at_threshold": positives["query_id"].isin(found_at_t),
    })
    grouped = table.groupby(["transformation", "held_out"], as_index=False).agg(
        n_queries=("found_at_1", "size"), recall_at_1=("found_at_1", "mean"),
        recall_at_threshold=("found_at_threshold", "mean"))
    return grouped.sort_values(["held_out", "transformation"]).reset_index(drop=True)


def _as_bool(value: object) -> bool:
    """held_out read back from CSV may be a bool, 0/1 or the strings True/False."""
    if isinstance(value, str):
        return value.strip().lower() in {"true", "1", "yes"}
    return bool(value)


@dataclass(frozen=True)
class RetrievalMetrics:
    muap: float
    recall_at_p90: float
    acc_at_1: float
    n_ground_truth: int
    n_predictions: int


def retrieval_metrics(labelled: pd.DataFrame, queries: pd.DataFrame,
                      target_precision: float = 0.9) -> RetrievalMetrics:
    """μAP, recall at the target precision and accuracy@1 of labelled predictions."""
    n_gt = count_ground_truth(queries)
    return RetrievalMetrics(
        muap=micro_average_precision(labelled, n_gt),
        recall_at_p90=recall_at_precision(labelled, n_gt, target_precision),
        acc_at_1=accuracy_at_1(labelled, queries),
        n_ground_truth=n_gt, n_predictions=len(labelled))


def held_out_queries(queries: pd.DataFrame) -> pd.DataFrame:
    """The queries of the held-out test: copies made by transformations never used in
    training, plus every distractor (so false matches still cost precision)."""
    _require_columns(queries, ["reference_id", "held_out"], "queries table")
    held = queries["held_out"].map(_as_bool)
    ref = queries["reference_id"]
    distractor = ref.isna() | (ref.astype(str).str.strip() == "")
    return queries[held | distractor]


def held_out_metrics(labelled: pd.DataFrame, queries: pd.DataFrame,
                     target_precision: float = 0.9) -> RetrievalMetrics:
    """retrieval_metrics over the held-out queries only (see held_out_queries); NaN when
    no copy was made by a held-out transformation (a tiny evaluation set)."""
    subset = held_out_queries(queries)
    ids = set(subset["query_id"].astype(str))
    kept = labelled[labelled["query_id"].astype(str).isin(ids)]
    if count_ground_truth(subset) == 0:
        return RetrievalMetrics(float("nan"), float("nan"), float("nan"), 0, len(kept))
    return retrieval_metrics(kept, subset, target_precision)


def subset_metrics(labelled: pd.DataFrame, queries: pd.DataFrame, mask,
                   target_precision: float = 0.9) -> RetrievalMetrics:
    """retrieval_metrics over the queries `mask` selects (a boolean Series over `queries`),
    searched in the whole gallery; NaN when none of them has a copy."""
    subset = queries[np.asarray(mask, dtype=bool)]
    ids = set(subset["query_id"].astype(str))
    kept = labelled[labelled["query_id"].astype(str).isin(ids)]
    if count_ground_truth(subset) == 0:
        return RetrievalMetrics(float("nan"), float("nan"), float("nan"), 0, len(kept))
    return retrieval_metrics(kept, subset, target_precision)
