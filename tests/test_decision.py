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


# --------------------------------------------------------------------------- methods side by side

def _write_split(root, split, rng, n_refs=20, n_pos=14, n_distractors=10, dim=16):
    """A synthetic eval split on disk: CSV tables and two methods' embeddings (no pixels needed)."""
    from mtl.eval.embeddings import EmbeddingResult, save_npz

    directory = root / "eval" / split
    directory.mkdir(parents=True)
    ref_ids = [f"{split}_r{i}" for i in range(n_refs)]
    ref_class = np.arange(n_refs) % 2
    pd.DataFrame({"reference_id": ref_ids, "path": [f"references/{r}.jpg" for r in ref_ids],
                  "class": ref_class}).to_csv(directory / "references.csv", index=False)
    q_ids = [f"{split}_q{i}" for i in range(n_pos + n_distractors)]
    truth = ref_ids[:n_pos] + [""] * n_distractors
    pd.DataFrame({"query_id": q_ids, "path": [f"queries/{q}.jpg" for q in q_ids], "class": 0,
                  "reference_id": truth, "transformation": (["blur", "crop"] * n_pos)[:n_pos] + ["none"] * n_distractors,
                  "held_out": ([False, True] * n_pos)[:n_pos] + [False] * n_distractors}
                 ).to_csv(directory / "queries.csv", index=False)
    refs = rng.standard_normal((n_refs, dim))
    # Each distractor is close to a reference of the *other* class: only the class branch can tell.
    queries = np.concatenate([refs[:n_pos] + 0.6 * rng.standard_normal((n_pos, dim)),
                              refs[:n_distractors] + 0.5 * rng.standard_normal((n_distractors, dim))])
    q_class = np.concatenate([ref_class[:n_pos], 1 - ref_class[:n_distractors]])
    one_hot = lambda c: np.eye(2)[c] * 0.9 + 0.05  # noqa: E731
    vectors = np.concatenate([refs, queries])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.array(ref_ids + q_ids)
    roles = np.array(["reference"] * n_refs + ["query"] * len(q_ids))
    paths = {}
    for method in ("backbone_gap1280", "mtl_finetune"):
        result = EmbeddingResult(ids=ids, embeddings=vectors.astype(np.float32), method=method,
                                 images_per_second=100.0, roles=roles,
                                 class_probs=np.concatenate([one_hot(ref_class), one_hot(q_class)]).astype(np.float32))
        paths[method] = save_npz(result, root / "emb" / split / f"{method}.npz")
    return paths


def test_evaluate_methods_gives_one_table_and_the_decisions_cut_false_positives(tmp_path):
    from mtl.eval.evaluation import evaluate_methods

    rng = np.random.default_rng(0)
    per_split = {split: _write_split(tmp_path, split, rng) for split in ("val", "test")}
    embeddings = {m: {s: per_split[s][m] for s in per_split} for m in ("backbone_gap1280", "mtl_finetune")}
    evaluation = evaluate_methods(tmp_path / "eval", embeddings, k=5, betas=[0.0, 0.5, 1.0],
                                  decisions_from=["mtl_finetune"], normalize=False)
    table = evaluation.table.set_index("method")
    assert list(table.index) == ["backbone_gap1280", "mtl_finetune", "mtl_finetune_gate", "mtl_finetune_fusion"]
    assert table.loc["backbone_gap1280", "bytes_per_vector"] == 64
    # Distractors sit next to a reference of the other class: the gate removes them.
    assert table.loc["mtl_finetune_gate", "muap"] > table.loc["mtl_finetune", "muap"]
    assert table.loc["mtl_finetune_fusion", "muap"] >= table.loc["mtl_finetune", "muap"]
    assert table.loc["mtl_finetune_fusion", "beta"] > 0
    assert set(evaluation.metrics_dict()["mtl_finetune"]) == {
        "muap", "recall_at_p90", "acc_at_1", "muap_held_out", "acc_at_1_held_out", "fp_at_threshold", "threshold",
        "bytes_per_vector", "muap_photo", "recall_at_p90_photo", "acc_at_1_photo", "fp_photo", "muap_clipart",
        "recall_at_p90_clipart"}
    # no `part` column: no photo part; no clip-art class in this split either
    assert np.isnan(table.loc["mtl_finetune", "muap_photo"]) and np.isnan(table.loc["mtl_finetune", "muap_clipart"])
    fps = evaluation.worst_false_positives(3, "mtl_finetune")
    assert len(fps) == 3 and fps["score"].is_monotonic_decreasing and not fps["correct"].any()
    assert all(str(p).endswith(".jpg") for p in fps["query_path"])
    missed = evaluation.missed_copies(50, "mtl_finetune")
    assert set(missed["transformation"]) <= {"blur", "crop"}
    written = evaluation.save(tmp_path / "out")
    assert pd.read_csv(written["methods"]).shape[0] == 4
    assert set(pd.read_csv(written["per_transformation"])["transformation"]) == {"blur", "crop"}


def test_false_positives_are_counted_by_content_type_and_the_gate_removes_those_across_types(tmp_path):
    from mtl.eval.evaluation import evaluate_methods

    rng = np.random.default_rng(0)
    per_split = {split: _write_split(tmp_path, split, rng) for split in ("val", "test")}
    embeddings = {m: {s: per_split[s][m] for s in per_split} for m in ("backbone_gap1280", "mtl_finetune")}
    # precision 0.5: a threshold low enough to accept wrong matches
    evaluation = evaluate_methods(tmp_path / "eval", embeddings, k=5, betas=[0.0], decisions_from=["mtl_finetune"],
                                  normalize=False, target_precision=0.5)
    table = evaluation.table.set_index("method")
    kinds = evaluation.false_positive_kinds(["mtl_finetune", "mtl_finetune_gate"])
    assert list(kinds.columns) == ["method", "query_type", "reference_type", "same_type", "false_positives"]
    for method in ("mtl_finetune", "mtl_finetune_gate"):    # they add up to the table's count
        assert kinds[kinds["method"] == method]["false_positives"].sum() == table.loc[method, "fp_at_threshold"]
    across = kinds[~kinds["same_type"]].groupby("method")["false_positives"].sum()
    # distractors sit next to a reference of the other class: wrong matches across types, which the gate drops
    assert across.get("mtl_finetune", 0) > 0 and across.get("mtl_finetune_gate", 0) == 0


def test_every_method_gets_a_normalized_row_with_val_chosen_parameters(tmp_path):
    from mtl.eval.evaluation import evaluate_methods

    rng = np.random.default_rng(0)
    per_split = {split: _write_split(tmp_path, split, rng) for split in ("val", "test")}
    embeddings = {m: {s: per_split[s][m] for s in per_split} for m in ("backbone_gap1280", "mtl_finetune")}
    evaluation = evaluate_methods(tmp_path / "eval", embeddings, k=5, betas=[0.0, 1.0],
                                  decisions_from=["mtl_finetune"], norm_ks=[1, 5], norm_betas=[0.0, 1.0])
    table = evaluation.table.set_index("method")
    assert list(table.index) == ["backbone_gap1280", "backbone_gap1280_norm", "mtl_finetune", "mtl_finetune_gate",
                                 "mtl_finetune_fusion", "mtl_finetune_norm", "mtl_finetune_norm_gate",
                                 "mtl_finetune_norm_fusion"]
    grid = evaluation.normalization_grid
    assert set(grid["method"]) == {"backbone_gap1280", "mtl_finetune"} and len(grid) == 2 * 3
    for method in ("backbone_gap1280", "mtl_finetune"):
        chosen = grid[grid["method"] == method].sort_values(["score", "beta", "k"], ascending=[False, True, True])
        assert table.loc[f"{method}_norm", "norm_k"] == chosen["k"].iloc[0]
        assert table.loc[f"{method}_norm", "norm_beta"] == chosen["beta"].iloc[0]
        assert np.isnan(table.loc[method, "norm_beta"])
    assert "norm_beta" in evaluation.metrics_dict()["mtl_finetune_norm"]
    assert (tmp_path / "out" / "normalization_grid.csv").exists() is False
    assert "normalization_grid" in evaluation.save(tmp_path / "out")


def test_each_part_is_scored_on_its_own_queries_in_the_whole_gallery(tmp_path):
    from mtl.eval.evaluation import EvalSplit, evaluate_methods
    from mtl.eval.metrics import label_predictions, micro_average_precision
    from mtl.eval.search import search
    from mtl.eval.embeddings import load_npz

    rng = np.random.default_rng(1)
    per_split = {split: _write_split(tmp_path, split, rng) for split in ("val", "test")}
    for split in per_split:  # the first 7 positives and the first 5 distractors form the photo part
        path = tmp_path / "eval" / split / "queries.csv"
        queries = pd.read_csv(path)
        photo = [i < 7 or 14 <= i < 19 for i in range(len(queries))]
        queries["part"] = np.where(photo, "photo", "general")
        queries["class"] = np.where(photo, "scene", "clipart")
        queries.to_csv(path, index=False)
    embeddings = {"mtl_finetune": {s: per_split[s]["mtl_finetune"] for s in per_split}}
    table = evaluate_methods(tmp_path / "eval", embeddings, k=5, normalize=False).table.set_index("method")
    split = EvalSplit.load(tmp_path / "eval", "test")
    result = load_npz(per_split["test"]["mtl_finetune"])
    refs, queries = result.role("reference"), result.role("query")
    found = label_predictions(search(queries.embeddings, queries.ids, refs.embeddings, refs.ids, k=5).predictions,
                              split.queries)
    for part, n_copies in (("photo", 7), ("clipart", 7)):
        ids = set(split.queries.loc[split.queries["part"] == ("photo" if part == "photo" else "general"), "query_id"])
        expected = micro_average_precision(found[found["query_id"].isin(ids)], n_copies)
        assert table.loc["mtl_finetune", f"muap_{part}"] == pytest.approx(expected)
    assert table.loc["mtl_finetune", "fp_photo"] <= table.loc["mtl_finetune", "fp_at_threshold"]
