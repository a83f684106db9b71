"""isc2021 metrics: hand-built cases with known answers, a brute-force reference, sklearn."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from mtl.eval.metrics import (accuracy_at_1, count_ground_truth, false_positives_at, label_predictions,
                              micro_average_precision, precision_recall_curve, recall_at_precision,
                              recall_by_transformation, threshold_for_precision)


def preds(rows):
    """rows: (query, reference, score, correct)."""
    return pd.DataFrame(rows, columns=["query_id", "reference_id", "score", "correct"])


def brute_force_muap(scores, correct, n_gt):
    """Literal definition: walk the list sorted by score (ties: wrong first), sum Δrecall·precision."""
    items = sorted(zip(scores, correct), key=lambda sc: (-sc[0], sc[1]))
    tp, ap, prev_recall = 0, 0.0, 0.0
    for i, (_, is_correct) in enumerate(items, start=1):
        tp += is_correct
        recall = tp / n_gt
        ap += (recall - prev_recall) * (tp / i)
        prev_recall = recall
    return ap


def test_perfect_ranking_has_ap_one():
    p = preds([("q1", "r1", 0.9, True), ("q2", "r2", 0.8, True), ("q1", "r2", 0.1, False)])
    assert micro_average_precision(p, 2) == pytest.approx(1.0)
    assert recall_at_precision(p, 2, 0.9) == pytest.approx(1.0)


def test_known_answer_with_missing_ground_truth():
    # ranked: T, F, T ; 4 ground-truth pairs, two never predicted.
    p = preds([("a", "x", 0.9, True), ("b", "x", 0.8, False), ("c", "y", 0.7, True)])
    # AP = 1/4·1 + 1/4·(2/3)
    assert micro_average_precision(p, 4) == pytest.approx(0.25 + 0.25 * 2 / 3)
    assert recall_at_precision(p, 4, 0.9) == pytest.approx(0.25)
    assert recall_at_precision(p, 4, 0.6) == pytest.approx(0.5)


def test_ties_are_resolved_pessimistically():
    # One correct and one wrong prediction with the same score: wrong counts first.
    p = preds([("a", "x", 0.5, True), ("b", "x", 0.5, False)])
    assert micro_average_precision(p, 1) == pytest.approx(0.5)
    assert recall_at_precision(p, 1, 0.9) == 0.0
    # Row order must not matter.
    assert micro_average_precision(p.iloc[::-1], 1) == pytest.approx(0.5)


def test_constant_scores_cannot_look_good():
    rng = np.random.default_rng(0)
    correct = rng.random(200) < 0.3
    p = preds([("q", str(i), 1.0, c) for i, c in enumerate(correct)])
    n_pos, n_neg = int(correct.sum()), int((~correct).sum())
    # All wrong ones rank first: the j-th correct one sits at position n_neg + j.
    expected = np.mean([j / (n_neg + j) for j in range(1, n_pos + 1)])
    assert micro_average_precision(p, n_pos) == pytest.approx(expected)
    assert micro_average_precision(p, n_pos) < correct.mean()


def test_precision_never_reached_gives_zero_recall_and_infinite_threshold():
    p = preds([("a", "x", 0.9, False), ("b", "y", 0.8, True)])
    assert recall_at_precision(p, 1, 0.9) == 0.0
    assert threshold_for_precision(p, 1, 0.9) == float("inf")
    assert false_positives_at(p, float("inf")).accepted == 0


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    n = 300
    scores = np.round(rng.random(n), 1)  # coarse scores: many ties
    correct = rng.random(n) < 0.4
    n_gt = int(correct.sum()) + 7  # some copies were never retrieved
    p = preds([("q%d" % i, "r", s, c) for i, (s, c) in enumerate(zip(scores, correct))])
    assert micro_average_precision(p, n_gt) == pytest.approx(brute_force_muap(scores, correct, n_gt))


@pytest.mark.parametrize("seed", range(3))
def test_matches_sklearn_without_ties_when_all_pairs_predicted(seed):
    rng = np.random.default_rng(seed)
    scores = rng.random(500)  # continuous: no ties, where sklearn and isc2021 agree
    correct = rng.random(500) < 0.2
    p = preds([("q%d" % i, "r", s, c) for i, (s, c) in enumerate(zip(scores, correct))])
    expected = average_precision_score(correct, scores)
    assert micro_average_precision(p, int(correct.sum())) == pytest.approx(expected)


def test_threshold_from_val_counts_false_positives_on_test():
    val = preds([("a", "x", 0.95, True), ("b", "y", 0.9, True), ("c", "x", 0.85, False),
                 ("d", "z", 0.8, True), ("e", "z", 0.5, False), ("f", "w", 0.4, True)])
    # precision after each: 1, 1, 2/3, 3/4, 3/5, 4/6 -> highest recall with p>=0.9 is 2/4 at 0.9.
    t = threshold_for_precision(val, 4, 0.9)
    assert t == pytest.approx(0.9)
    test = preds([("a", "x", 0.99, True), ("b", "y", 0.92, False), ("c", "y", 0.9, False),
                  ("d", "z", 0.7, True)])
    op = false_positives_at(test, t, n_ground_truth=3)
    assert (op.accepted, op.true_positives, op.false_positives) == (3, 1, 2)
    assert op.recall == pytest.approx(1 / 3)


def test_threshold_never_splits_a_tie():
    # The tie at 0.8 holds a wrong and a correct prediction; accepting it gives precision 2/3.
    val = preds([("a", "x", 0.9, True), ("b", "y", 0.8, False), ("c", "z", 0.8, True)])
    t = threshold_for_precision(val, 2, 0.9)
    assert t == pytest.approx(0.9)
    assert false_positives_at(val, t).false_positives == 0


def queries_table():
    return pd.DataFrame({
        "query_id": ["q1", "q2", "q3", "q4"],
        "reference_id": ["r1", "r2", "r3", None],  # q4 is a distractor
        "transformation": ["blur", "blur", "crop", "none"],
        "held_out": [False, False, True, False],
    })


def test_labelling_accuracy_at_1_and_per_transformation_recall():
    raw = pd.DataFrame({
        "query_id": ["q1", "q1", "q2", "q2", "q3", "q4", "q1"],
        "reference_id": ["r1", "r2", "r9", "r2", "r3", "r1", "r1"],
        "score": [0.9, 0.5, 0.8, 0.7, 0.3, 0.95, 0.2],  # q1-r1 duplicated with a lower score
    })
    q = queries_table()
    labelled = label_predictions(raw, q)
    assert len(labelled) == 6
    assert labelled.set_index(["query_id", "reference_id"]).loc[("q1", "r1"), "score"] == 0.9
    assert count_ground_truth(q) == 3
    # top-1: q1 r1 (hit), q2 r9 (miss), q3 r3 (hit)
    assert accuracy_at_1(labelled, q) == pytest.approx(2 / 3)
    per = recall_by_transformation(labelled, q, threshold=0.6).set_index("transformation")
    assert per.loc["blur", "n_queries"] == 2
    assert per.loc["blur", "recall_at_1"] == pytest.approx(0.5)
    assert per.loc["blur", "recall_at_threshold"] == pytest.approx(1.0)  # q2-r2 at 0.7
    assert per.loc["crop", "recall_at_threshold"] == 0.0
    assert bool(per.loc["crop", "held_out"]) is True
    assert "none" not in per.index  # distractors have no recall


def test_curve_arrays_are_monotone_in_recall():
    rng = np.random.default_rng(1)
    p = preds([("q%d" % i, "r", s, c) for i, (s, c) in enumerate(zip(rng.random(50), rng.random(50) < .5))])
    curve = precision_recall_curve(p, int(p["correct"].sum()))
    assert np.all(np.diff(curve.recall) >= 0) and curve.recall[-1] == pytest.approx(1.0)
    assert np.all(np.diff(curve.thresholds) <= 0)


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match="correct"):
        micro_average_precision(pd.DataFrame({"score": [1.0]}), 1)
    with pytest.raises(ValueError, match="ground-truth"):
        micro_average_precision(preds([("a", "x", 1.0, True), ("b", "x", 1.0, True)]), 1)


def test_held_out_metrics_score_held_out_copies_with_every_distractor():
    from mtl.eval.metrics import held_out_metrics, label_predictions

    queries = pd.DataFrame({"query_id": ["a", "b", "d"], "reference_id": ["r1", "r2", None],
                            "transformation": ["blur", "perspective", "blur"], "held_out": [False, True, False]})
    predictions = label_predictions(pd.DataFrame({"query_id": ["a", "b", "d"], "reference_id": ["r1", "r2", "r1"],
                                                  "score": [0.9, 0.5, 0.7]}), queries)
    held = held_out_metrics(predictions, queries)
    # Only b's copy counts; the distractor d scores above it: precision 1/2 at full recall.
    assert held.n_ground_truth == 1 and held.muap == pytest.approx(0.5) and held.acc_at_1 == 1.0
    none_held = held_out_metrics(predictions, queries.assign(held_out=False))
    assert none_held.n_ground_truth == 0 and math.isnan(none_held.muap)
