"""The thresholds `mtl dedup` decides with are chosen on the val split as one folder:
every pair scored, correct when both are copies of one picture, unknown when both are
distractors of one picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtl.eval.embeddings import EmbeddingResult
from mtl.eval.evaluation import EvalSplit
from mtl.eval.folder import folder_pairs, folder_threshold

#            id   copy of  distractor of
IMAGES = [("r1", "r1", None), ("r2", "r2", None),
          ("q1", "r1", None), ("q2", "r1", None), ("q3", "r2", None),
          ("d1", None, "g"), ("d2", None, "g"), ("d3", None, "h")]


def tiny_split() -> EvalSplit:
    references = pd.DataFrame({"reference_id": ["r1", "r2"], "path": ["r1.jpg", "r2.jpg"], "class": ["a", "a"]})
    queries = pd.DataFrame([{"query_id": i, "path": f"{i}.jpg", "class": "a", "reference_id": c or np.nan,
                             "transformation": "blur", "held_out": "False", "source_id": g or c,
                             "source_group": g or c} for i, c, g in IMAGES[2:]])
    return EvalSplit("val", Path("."), references, queries)


def embedded(scores_with_r1: dict[str, float], class_of: dict[str, int] | None = None) -> EmbeddingResult:
    """Unit vectors whose cosine with e0 is the given score; everything else near-orthogonal."""
    ids = [i for i, _, _ in IMAGES]
    vectors = []
    for k, name in enumerate(ids):
        s = scores_with_r1.get(name, 0.0)
        v = np.zeros(64)
        v[0] = s
        v[1 + k] = np.sqrt(1 - s * s)  # each its own direction beyond e0
        vectors.append(v)
    vectors = np.array(vectors, dtype=np.float32)
    vectors[0] = 0
    vectors[0, 0] = 1  # r1 is e0
    probs = None
    if class_of is not None:
        probs = np.eye(2, dtype=np.float32)[[class_of.get(i, 0) for i in ids]]
    return EmbeddingResult(np.array(ids), vectors, "mtl", class_probs=probs)


def test_pairs_are_labelled_as_one_folder():
    pairs, n_correct = folder_pairs(embedded({}), tiny_split())
    labelled = {frozenset((a, b)): c for a, b, c in zip(pairs["a"], pairs["b"], pairs["correct"])}
    assert n_correct == 4  # r1-q1, r1-q2, q1-q2, r2-q3
    assert {p for p, c in labelled.items() if c} == {frozenset(p) for p in
                                                    [("r1", "q1"), ("r1", "q2"), ("q1", "q2"), ("r2", "q3")]}
    assert frozenset(("d1", "d2")) not in labelled  # two cuts of one picture: unknown
    assert not labelled[frozenset(("d1", "d3"))]  # distractors of two pictures
    assert not labelled[frozenset(("r2", "d1"))]
    assert len(pairs) == 8 * 7 // 2 - 1


def test_the_threshold_admits_wrong_pairs_only_up_to_the_target_precision():
    # With r1: q1 .95, d3 .9 (wrong), q2 .85, d1 .8 (wrong); pairs of two others score
    # s_i * s_j.  Ranked: r1-q1 .95 ok, r1-d3 .9, q1-d3 .855, r1-q2 .85 ok, q1-q2 .8075 ok,
    # r1-d1 .8, ...
    result = embedded({"q1": 0.95, "d3": 0.9, "q2": 0.85, "d1": 0.8})
    pairs, n_correct = folder_pairs(result, tiny_split())
    ranked = pairs.sort_values("score", ascending=False)
    assert list(ranked["correct"][:2]) == [True, False]  # r1-q1, then r1-d3
    assert folder_threshold(result, tiny_split(), 0.9) == pytest.approx(0.95, abs=1e-6)
    assert folder_threshold(result, tiny_split(), 0.5) == pytest.approx(0.8075, abs=1e-6)  # 3 of 5


def test_the_gate_leaves_out_pairs_of_different_predicted_classes():
    result = embedded({"q1": 0.95, "d3": 0.9, "q2": 0.85}, class_of={"d3": 1})
    gated, n_correct = folder_pairs(result, tiny_split(), gate=True)
    assert n_correct == 4
    assert not ((gated["a"] == "d3") | (gated["b"] == "d3")).any()
    # Without d3 (another class) the three copies of r1 lead the ranking: all correct.
    assert folder_threshold(result, tiny_split(), 0.9, gate=True) == pytest.approx(0.8075, abs=1e-6)
    assert folder_threshold(result, tiny_split(), 0.9, gate=False) == pytest.approx(0.95, abs=1e-6)


def test_ids_outside_the_split_are_refused():
    result = embedded({})
    result = EmbeddingResult(np.array(["r1", "zz"]), result.embeddings[:2], "mtl")
    with pytest.raises(ValueError, match="not in the val split"):
        folder_pairs(result, tiny_split())


def test_an_eval_set_without_source_groups_has_no_unknown_pairs():
    split = tiny_split()
    queries = split.queries.drop(columns=["source_id", "source_group"])
    split = EvalSplit("val", split.directory, split.references, queries)
    pairs, _ = folder_pairs(embedded({}), split)
    assert len(pairs) == 8 * 7 // 2  # d1-d2 is now an ordinary wrong pair
    assert not pairs[(pairs["a"] == "d1") & (pairs["b"] == "d2")]["correct"].any()
