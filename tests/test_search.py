"""faiss search equals brute-force numpy inner-product search."""

from __future__ import annotations

import numpy as np
import pytest

from mtl.eval.search import search
from mtl.io import UserError


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_top_k_equals_brute_force_numpy():
    rng = np.random.default_rng(0)
    refs, queries = unit_rows(rng, 200, 32), unit_rows(rng, 40, 32)
    ref_ids = np.array([f"r{i}" for i in range(200)])
    query_ids = np.array([f"q{i}" for i in range(40)])
    result = search(queries, query_ids, refs, ref_ids, k=10, use_gpu=False)
    sims = queries @ refs.T
    expected = np.argsort(-sims, axis=1)[:, :10]
    got = result.predictions
    assert len(got) == 40 * 10
    for qi in range(40):
        rows = got[got["query_id"] == query_ids[qi]].sort_values("rank")
        assert list(rows["rank"]) == list(range(1, 11))
        assert list(rows["reference_id"]) == list(ref_ids[expected[qi]])
        np.testing.assert_allclose(rows["score"], sims[qi, expected[qi]], rtol=1e-5, atol=1e-6)
    assert result.ms_per_query >= 0


def test_k_larger_than_reference_count_returns_all_references():
    rng = np.random.default_rng(1)
    result = search(unit_rows(rng, 3, 8), ["a", "b", "c"], unit_rows(rng, 4, 8), list("wxyz"), k=10)
    assert len(result.predictions) == 12


def test_dimension_mismatch_is_a_clear_error():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="dim"):
        search(unit_rows(rng, 3, 8), list("abc"), unit_rows(rng, 3, 16), list("xyz"))


def test_command_line_searches_an_eval_set_file_by_roles(tmp_path):
    import pandas as pd

    from mtl.eval.embeddings import EmbeddingResult, save_npz
    from mtl.eval.search import main

    rng = np.random.default_rng(3)
    refs = unit_rows(rng, 6, 8)
    queries = refs[:3] + 0.01 * unit_rows(rng, 3, 8)
    vectors = np.concatenate([refs, queries / np.linalg.norm(queries, axis=1, keepdims=True)])
    npz = save_npz(EmbeddingResult(ids=np.array([f"r{i}" for i in range(6)] + ["q0", "q1", "q2"]),
                                   embeddings=vectors, method="test",
                                   roles=np.array(["reference"] * 6 + ["query"] * 3)), tmp_path / "e.npz")
    out = tmp_path / "preds.csv"
    assert main(["--queries", str(npz), "--references", str(npz), "--k", "2", "--out", str(out)]) == 0
    preds = pd.read_csv(out)
    assert len(preds) == 6 and set(preds["query_id"]) == {"q0", "q1", "q2"}
    top1 = preds[preds["rank"] == 1].set_index("query_id")["reference_id"]
    assert top1.to_dict() == {"q0": "r0", "q1": "r1", "q2": "r2"}


def test_command_line_decides_with_threshold_and_class_gate(tmp_path):
    import pandas as pd

    from mtl.eval.embeddings import EmbeddingResult, save_npz
    from mtl.eval.search import main

    # Two references; query q0 copies r0 (same class), q1 copies r1 but is classified
    # differently, q2 is unrelated (low score).
    refs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32)
    queries = np.array([[0.99, 0.14, 0.0], [0.14, 0.99, 0.0], [0.0, 0.3, 0.95]], dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ref_npz = save_npz(EmbeddingResult(ids=np.array(["r0", "r1"]), embeddings=refs, method="t",
                                       class_probs=np.array([[0.9, 0.1], [0.9, 0.1]], dtype=np.float32)),
                       tmp_path / "r.npz")
    query_npz = save_npz(EmbeddingResult(ids=np.array(["q0", "q1", "q2"]), embeddings=queries, method="t",
                                         class_probs=np.array([[0.8, 0.2], [0.1, 0.9], [0.7, 0.3]],
                                                              dtype=np.float32)), tmp_path / "q.npz")
    out = tmp_path / "m.csv"
    args = ["--queries", str(query_npz), "--references", str(ref_npz), "--k", "2", "--out", str(out), "--raw"]
    main([*args, "--threshold", "0.9"])
    kept = pd.read_csv(out)
    assert sorted(zip(kept.query_id, kept.reference_id)) == [("q0", "r0"), ("q1", "r1")]
    main([*args, "--threshold", "0.9", "--gate"])
    kept = pd.read_csv(out)
    assert list(zip(kept.query_id, kept.reference_id)) == [("q0", "r0")]
    without_probs = save_npz(EmbeddingResult(ids=np.array(["r0", "r1"]), embeddings=refs, method="t"),
                             tmp_path / "r_plain.npz")
    with pytest.raises(UserError, match="class probabilities"):
        main(["--queries", str(query_npz), "--references", str(without_probs), "--out", str(out), "--gate", "--raw"])


def test_pairs_above_equals_brute_force_all_against_all():
    from mtl.eval.search import pairs_above

    rng = np.random.default_rng(1)
    x = unit_rows(rng, 300, 16)
    x[7] = x[3]  # an exact copy scores 1
    i, j, scores = pairs_above(x, 0.6, block=64)  # several blocks
    sims = x @ x.T
    want = {(a, b) for a in range(300) for b in range(a + 1, 300) if sims[a, b] >= 0.6}
    assert set(zip(i.tolist(), j.tolist())) == want and (3, 7) in want
    assert (i < j).all()
    np.testing.assert_allclose(scores, sims[i, j], atol=1e-5)
    assert all(len(a) == 0 for a in pairs_above(x[:1], 0.0))
