"""The on-disk index (mtl.eval.index): flat equals exact search, IVF-PQ finds planted
copies, files are written atomically with their ids and provenance, updates only add."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mtl.eval.embeddings import EmbeddingResult, save_npz
from mtl.eval.index import ReferenceIndex, build_index, default_nlist, default_pq_m, main
from mtl.eval.search import search
from mtl.io import UserError
from tests.test_search import unit_rows

DIM = 32


@pytest.fixture(scope="module")
def gallery():
    """4,000 random unit references and 50 queries, each with a planted copy (cosine 0.8)."""
    rng = np.random.default_rng(0)
    references, queries = unit_rows(rng, 4000, DIM), unit_rows(rng, 50, DIM)
    noise = unit_rows(rng, 50, DIM)
    noise -= (noise * queries).sum(axis=1, keepdims=True) * queries
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    references[:50] = 0.8 * queries + 0.6 * noise
    return references, np.array([f"r{i}" for i in range(4000)]), queries


def test_defaults_follow_the_gallery_size_and_dimension():
    assert default_nlist(1_000_000) == 1024 and default_nlist(10_000_000) == 4096
    assert default_pq_m(320) == 64 and default_pq_m(1280) == 64 and default_pq_m(30) == 30 and default_pq_m(20) == 20


def test_flat_index_equals_exact_search_after_a_round_trip(gallery, tmp_path):
    references, ids, queries = gallery
    index = build_index(references, ids, "flat", method="m")
    index.save(tmp_path / "refs.index")
    loaded = ReferenceIndex.load(tmp_path / "refs.index")
    scores, rows = loaded.search(queries, 10)
    exact = search(queries, [f"q{i}" for i in range(50)], references, ids, k=10, use_gpu=False).predictions
    assert list(loaded.ids[rows.ravel()]) == list(exact["reference_id"])
    np.testing.assert_allclose(scores.ravel(), exact["score"], rtol=1e-6)
    provenance = json.loads((tmp_path / "refs.index" / "provenance.json").read_text())
    assert provenance | {"created": None, "updates": None, "faiss_version": None} == {
        "format": 1, "kind": "flat", "factory": "Flat", "dim": DIM, "metric": "inner_product", "ntotal": 4000,
        "training_sample_size": 0, "nlist": None, "nprobe": None, "method": "m", "class_names": None,
        "faiss_version": None, "created": None, "updates": None, "training_seed": None,
        "normalization": {"k": 10, "background": "references"}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refs.index"]  # no staging folder left


def test_ivfpq_is_trained_on_a_sample_and_finds_the_planted_copies(gallery, tmp_path):
    references, ids, queries = gallery
    index = build_index(references, ids, "ivfpq", nlist=16, train_size=1000, nprobe=8)
    assert index.provenance["factory"] == "IVF16,PQ32x4fs" and index.provenance["training_sample_size"] == 1000
    index.save(tmp_path / "ivf")
    loaded = ReferenceIndex.load(tmp_path / "ivf")
    _, rows = loaded.search(queries, 10)
    copy_recall = np.mean([i in row for i, row in enumerate(rows)])
    assert copy_recall >= 0.9
    _, every_list = loaded.search(queries, 10, nprobe=16)  # visiting every list finds every copy
    assert np.mean([i in row for i, row in enumerate(every_list)]) == 1.0
    assert (tmp_path / "ivf" / "index.faiss").stat().st_size < 4000 * DIM  # 16 bytes per reference + lists


def test_updates_only_add_new_references(gallery, tmp_path):
    references, ids, queries = gallery
    index = build_index(references[:3000], ids[:3000], "ivfpq", nlist=16, train_size=1000)
    index.save(tmp_path / "ivf")
    index = ReferenceIndex.load(tmp_path / "ivf")
    index.add(references[3000:], ids[3000:], source="new.npz")
    index.save(tmp_path / "ivf")
    again = ReferenceIndex.load(tmp_path / "ivf")
    assert again.ntotal == 4000 and list(again.ids) == list(ids)
    assert [u["added"] for u in again.provenance["updates"]] == [3000, 1000]
    with pytest.raises(ValueError, match="already holds"):
        again.add(references[:2], ids[:2])
    with pytest.raises(ValueError, match="-d"):
        again.add(unit_rows(np.random.default_rng(3), 2, 8), ["x", "y"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ivf"]


def test_command_line_builds_adds_and_searches_with_the_class_gate(gallery, tmp_path, capsys):
    from mtl.eval.search import main as search_main

    references, ids, queries = gallery
    probs = np.tile(np.array([[0.9, 0.1]], np.float32), (4000, 1))
    probs[1::2] = [0.1, 0.9]  # odd references are the other class
    for name, rows in (("old", slice(0, 3000)), ("new", slice(3000, 4000))):
        save_npz(EmbeddingResult(ids[rows], references[rows], "m", class_probs=probs[rows],
                                 class_names=np.array(["a", "b"])), tmp_path / f"{name}.npz")
    save_npz(EmbeddingResult(np.array([f"q{i}" for i in range(50)]), queries, "m",
                             class_probs=np.tile(np.array([[0.9, 0.1]], np.float32), (50, 1)),
                             class_names=np.array(["a", "b"])), tmp_path / "q.npz")
    index_dir = str(tmp_path / "refs.index")
    assert main(["build", "--references", str(tmp_path / "old.npz"), "--out", index_dir]) == 0
    assert main(["add", "--index", index_dir, "--references", str(tmp_path / "new.npz")]) == 0
    assert "4,000 references" in capsys.readouterr().out
    out = tmp_path / "matches.csv"
    assert search_main(["--queries", str(tmp_path / "q.npz"), "--index", index_dir, "--k", "5", "--out", str(out),
                        "--gate", "--cpu", "--raw"]) == 0
    assert "for 50 queries" in capsys.readouterr().out
    matches = pd.read_csv(out)
    assert set(matches["reference_id"].str[1:].astype(int) % 2) == {0}  # the gate dropped the other class
    exact = search(queries, [f"q{i}" for i in range(50)], references, ids, k=5, use_gpu=False).predictions
    kept = exact[exact["reference_id"].str[1:].astype(int) % 2 == 0]
    assert list(matches["reference_id"]) == list(kept["reference_id"])
    assert main(["info", "--index", index_dir]) == 0
    assert json.loads(capsys.readouterr().out)["ntotal"] == 4000
    save_npz(EmbeddingResult(np.array(["z"]), references[:1], "other"), tmp_path / "other.npz")
    with pytest.raises(UserError, match="made otherwise"):
        main(["add", "--index", index_dir, "--references", str(tmp_path / "other.npz")])


def brute_neighbours(x: np.ndarray, k: int) -> np.ndarray:
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return np.sort(sims, axis=1)[:, ::-1][:, :k]


def test_a_flat_index_stores_each_references_exact_density_and_keeps_it_exact_after_adds(gallery, tmp_path):
    references, ids, _ = gallery
    index = build_index(references[:3000], ids[:3000], "flat", density_k=5)
    np.testing.assert_allclose(index.neighbours, brute_neighbours(references[:3000], 5), atol=1e-5)
    index.save(tmp_path / "flat")
    index = ReferenceIndex.load(tmp_path / "flat")
    index.add(references[3000:], ids[3000:])
    np.testing.assert_allclose(index.neighbours, brute_neighbours(references, 5), atol=1e-5)
    changed = index.provenance["updates"][-1]["densities_changed"]
    expected = (brute_neighbours(references, 5)[:3000] != brute_neighbours(references[:3000], 5)).any(axis=1).sum()
    assert changed == expected > 0
    np.testing.assert_allclose(index.densities(3), brute_neighbours(references, 3).mean(axis=1), atol=1e-5)
    with pytest.raises(ValueError, match="density-k"):
        index.densities(6)


def test_ivfpq_densities_are_close_to_the_exact_ones(gallery):
    references, ids, _ = gallery
    index = build_index(references[:3000], ids[:3000], "ivfpq", nlist=16, train_size=1000, nprobe=16, density_k=10)
    index.add(references[3000:], ids[3000:])
    exact = brute_neighbours(references, 10).mean(axis=1)
    error = np.abs(index.densities() - exact)
    assert np.median(error) < 0.05 and np.corrcoef(index.densities(), exact)[0, 1] > 0.5


def test_an_index_without_densities_says_how_to_get_them(gallery):
    references, ids, _ = gallery
    index = build_index(references[:100], ids[:100], "flat", density_k=None)
    assert index.neighbours is None and "normalization" not in index.provenance
    with pytest.raises(ValueError, match="--raw"):
        index.densities()


def test_normalized_search_through_an_index_equals_the_exact_search_of_the_npz(gallery, tmp_path, capsys):
    from mtl.eval.search import main as search_main

    references, ids, queries = gallery
    save_npz(EmbeddingResult(ids, references, "m"), tmp_path / "refs.npz")
    save_npz(EmbeddingResult(np.array([f"q{i}" for i in range(50)]), queries, "m"), tmp_path / "q.npz")
    assert main(["build", "--references", str(tmp_path / "refs.npz"), "--out", str(tmp_path / "refs.index")]) == 0
    common = ["--queries", str(tmp_path / "q.npz"), "--k", "5", "--norm-k", "5", "--norm-beta", "1.0",
              "--operating-points", str(tmp_path / "none.json")]
    assert search_main([*common, "--references", str(tmp_path / "refs.npz"), "--out", str(tmp_path / "a.csv")]) == 0
    assert "normalized (β=1, k=5, background: references), from --norm-k/--norm-beta" in capsys.readouterr().out
    assert search_main([*common, "--index", str(tmp_path / "refs.index"), "--shortlist", "4000",
                        "--out", str(tmp_path / "b.csv")]) == 0
    exact, through_index = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    assert list(exact["reference_id"]) == list(through_index["reference_id"])
    np.testing.assert_allclose(exact["score"], through_index["score"], atol=1e-5)
    np.testing.assert_allclose(exact["cosine"], through_index["cosine"], atol=1e-5)
    assert set(exact["scale"]) == {"normalized"}
    raw = pd.read_csv(tmp_path / "a.csv") if search_main([*common, "--references", str(tmp_path / "refs.npz"),
                                                          "--out", str(tmp_path / "a.csv"), "--raw"]) == 0 else None
    assert set(raw["scale"]) == {"cosine"} and "raw cosine" in capsys.readouterr().out
