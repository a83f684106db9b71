"""The class gate and score fusion: the paper's future work."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mtl.eval.decision import apply_fusion, apply_gate, attach_class_agreement, tune_fusion_beta
from mtl.eval.metrics import micro_average_precision

QUERY_PROBS = np.array([[0.9, 0.1], [0.2, 0.8]])      # q0: class 0, q1: class 1
REF_PROBS = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.4]])  # r0: 0, r1: 1, r2: 0 (unsure)


def predictions():
    return pd.DataFrame({
        "query_id": ["q0", "q0", "q1", "q1"],
        "reference_id": ["r0", "r1", "r1", "r2"],
        "score": [0.7, 0.8, 0.6, 0.65],
        "correct": [True, False, True, False],
    })


def with_agreement():
    return attach_class_agreement(predictions(), ["q0", "q1"], QUERY_PROBS, ["r0", "r1", "r2"], REF_PROBS)


def test_agreement_columns():
    p = with_agreement()
    assert list(p["same_class"]) == [True, False, True, False]
    # P(differ) = 1 - Σ p_q p_r
    np.testing.assert_allclose(p["p_differ"], [0.1, 0.9, 0.2, 1 - (0.2 * 0.6 + 0.8 * 0.4)])


def test_gate_drops_matches_whose_classes_differ():
    gated = apply_gate(with_agreement())
    assert list(zip(gated["query_id"], gated["reference_id"])) == [("q0", "r0"), ("q1", "r1")]
    # Here every wrong match crossed classes: the gate makes the ranking perfect.
    assert micro_average_precision(with_agreement(), 2) < 1.0
    assert micro_average_precision(gated, 2) == pytest.approx(1.0)


def test_fusion_penalizes_by_class_disagreement_and_keeps_similarity():
    fused = apply_fusion(with_agreement(), beta=0.5)
    np.testing.assert_allclose(fused["score"], predictions()["score"] - 0.5 * with_agreement()["p_differ"])
    np.testing.assert_allclose(fused["similarity"], predictions()["score"])
    # Applying twice rescores from the similarity, it does not stack penalties.
    np.testing.assert_allclose(apply_fusion(fused, 0.5)["score"], fused["score"])
    np.testing.assert_allclose(apply_fusion(fused, 0.0)["score"], predictions()["score"])


def test_beta_tuning_picks_the_best_val_muap():
    tuning = tune_fusion_beta(with_agreement(), n_ground_truth=2, betas=[0.0, 0.05, 0.5, 1.0])
    assert tuning.muap == pytest.approx(1.0)
    assert tuning.beta == 0.5  # 0.05 is too small to reorder 0.8 vs 0.7; 0.5 is the smallest that does
    assert tuning.grid["muap"].iloc[0] < 1.0


def test_unknown_ids_and_negative_beta_are_rejected():
    with pytest.raises(ValueError, match="class probabilities"):
        attach_class_agreement(predictions(), ["q0"], QUERY_PROBS[:1], ["r0", "r1", "r2"], REF_PROBS)
    with pytest.raises(ValueError, match="beta"):
        apply_fusion(with_agreement(), -1.0)
