"""An eval split as one folder (mtl.eval.folder): pairs on the normalized scale, one
decision measured at any size, and the combined pHash-or-embedding decision."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mtl.eval.embeddings import EmbeddingResult
from mtl.eval.folder import (FolderTruth, choose_combined, folder_average_precision, folder_pairs, folder_threshold,
                             hash_score, pairs_at)
from mtl.eval.normalize import Normalization, folder_densities
from tests.test_operating_points import embedded, tiny_split


def test_truth_counts_every_pair_of_copies_of_one_picture():
    truth = FolderTruth.of_split(tiny_split())
    assert truth.n_true_pairs(["r1", "r2", "q1", "q2", "q3", "d1", "d2", "d3"]) == 4
    assert truth.n_true_pairs(["r1", "q1", "d1"]) == 1
    correct, unknown = truth.label(["r1", "d1", "d1", "zz"], ["q2", "d2", "d3", "r1"])
    assert correct.tolist() == [True, False, False, False]
    assert unknown.tolist() == [False, True, False, False]


def test_normalized_folder_pairs_subtract_each_images_density():
    result = embedded({"q1": 0.95, "d3": 0.9, "q2": 0.85, "d1": 0.8})
    normalization = Normalization(2, 1.0, "folder")
    raw, n_raw = folder_pairs(result, tiny_split())
    normalized, n_norm = folder_pairs(result, tiny_split(), normalization=normalization)
    assert n_raw == n_norm == 4
    rho = dict(zip(result.ids, folder_densities(result.embeddings, normalization)))
    expected = raw["score"] - (raw["a"].map(rho) + raw["b"].map(rho)) / 2
    np.testing.assert_allclose(normalized["score"], expected, atol=1e-6)
    assert folder_threshold(result, tiny_split(), 0.9, normalization=Normalization(2, 0.0, "folder")) == \
        folder_threshold(result, tiny_split(), 0.9)


def clustered_folder(seed: int = 0) -> tuple[EmbeddingResult, pd.DataFrame]:
    """Twenty pictures with two copies each, spread out, and forty look-alike distractors
    in one tight bunch: raw, a pair of look-alikes outscores many pairs of copies."""
    rng = np.random.default_rng(seed)
    dim = 32
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    pictures = unit(rng.normal(size=(20, dim)))
    copies = np.concatenate([unit(pictures + 0.45 * rng.normal(size=pictures.shape)) for _ in range(2)])
    centre = unit(rng.normal(size=(1, dim)))
    bunch = unit(centre + 0.25 * rng.normal(size=(40, dim)))
    vectors = np.vstack([pictures, copies, bunch]).astype(np.float32)
    ids = np.array([f"r{i}" for i in range(20)] + [f"q{i}" for i in range(40)] + [f"d{i}" for i in range(40)])
    truth = {**{f"r{i}": f"r{i}" for i in range(20)}, **{f"q{i}": f"r{i % 20}" for i in range(40)},
             **{f"d{i}": None for i in range(40)}}
    return EmbeddingResult(ids, vectors, "mtl"), truth


def test_on_a_folder_with_hubs_normalization_raises_folder_average_precision():
    result, copy_of = clustered_folder()
    truth = FolderTruth(copy_of, dict.fromkeys(copy_of))
    split = _FakeSplit(truth)
    raw = folder_average_precision(result, split)
    normalized = folder_average_precision(result, split, normalization=Normalization(5, 1.0, "folder"))
    assert normalized > raw + 0.1


class _FakeSplit:
    """Just what mtl.eval.folder reads of an EvalSplit: its truth tables and name."""

    name = "val"

    def __init__(self, truth: FolderTruth):
        ids = list(truth.copy_of)
        self.references = pd.DataFrame({"reference_id": [i for i in ids if truth.copy_of[i] == i]})
        queries = [i for i in ids if truth.copy_of[i] != i]
        self.queries = pd.DataFrame({"query_id": queries,
                                     "reference_id": [truth.copy_of[i] or np.nan for i in queries]})


@pytest.mark.parametrize("normalization", [None, Normalization(5, 1.0, "folder")])
def test_one_threshold_measured_by_range_search_equals_the_all_pairs_count(normalization):
    result, copy_of = clustered_folder(1)
    truth = FolderTruth(copy_of, dict.fromkeys(copy_of))
    pairs, n_correct = folder_pairs(result, _FakeSplit(truth), normalization=normalization)
    threshold = float(pairs["score"].nlargest(80).iloc[-1])
    accepted = pairs[pairs["score"] >= threshold]
    score = pairs_at(result, truth, threshold, normalization=normalization)
    assert (score.accepted, score.true_positives, score.n_true_pairs) == \
        (len(accepted), int(accepted["correct"].sum()), n_correct) and score.accepted >= 80
    assert 0 < score.precision < 1 and 0 < score.recall <= 1 and 0 < score.f1 <= 1


def test_the_combined_decision_adds_hash_matches_the_embedding_misses():
    result, copy_of = clustered_folder(2)
    truth = FolderTruth(copy_of, dict.fromkeys(copy_of))
    split = _FakeSplit(truth)
    # Hashes: the first ten pictures and their copies share a hash up to 2 bits (pHash
    # survives these copies); every other image (heavier edits too) is its own random hash.
    rng = np.random.default_rng(3)
    base = {f"r{i}": rng.integers(0, 2, 64) for i in range(10)}
    bits = []
    for i in result.ids:
        code = base[copy_of[i]].copy() if copy_of[i] in base else rng.integers(0, 2, 64)
        code[rng.choice(64, 2, replace=False)] ^= 1 if copy_of[i] and i.startswith("q") else 0
        bits.append(code)
    hashes = EmbeddingResult(result.ids, ((np.array(bits) * 2.0 - 1) / 8).astype(np.float32), "phash")
    normalization = Normalization(5, 1.0, "folder")
    chosen, grid = choose_combined(result, hashes, split, 0.9, normalization=normalization, radii=range(0, 6))
    # copies are 2 bits from their reference and up to 4 from each other
    assert chosen is not None and chosen.hamming_radius >= 2 and chosen.val_precision >= 0.9
    assert np.isfinite(chosen.threshold)  # the embedding still adds pairs
    alone, n_correct = folder_pairs(result, split, normalization=normalization)
    alone_recall = (alone["score"] >= folder_threshold(result, split, 0.9, normalization=normalization)).sum() / n_correct
    assert chosen.val_recall > alone_recall
    assert set(grid["hamming_radius"]) == set(range(0, 6))
    combined = pairs_at(result, truth, chosen.threshold, normalization=normalization, hashes=hashes,
                        hamming_radius=chosen.hamming_radius)
    assert combined.recall == pytest.approx(chosen.val_recall) and combined.precision >= 0.9
    assert hash_score(10) == pytest.approx(0.6875)


def test_hashes_must_list_the_same_images():
    result, _ = clustered_folder()
    other = EmbeddingResult(result.ids[::-1].copy(), result.embeddings, "phash")
    with pytest.raises(ValueError, match="same order"):
        choose_combined(result, other, _FakeSplit(FolderTruth({}, {})), 0.9)


def test_where_the_embedding_cannot_reach_the_precision_the_combined_decision_is_the_hash_alone():
    result, copy_of = clustered_folder(2)  # raw scores: no threshold reaches precision 0.9
    truth = FolderTruth(copy_of, dict.fromkeys(copy_of))
    rng = np.random.default_rng(5)
    base = {f"r{i}": rng.integers(0, 2, 64) for i in range(10)}  # ten pictures keep their hash exactly
    bits = [base[copy_of[i]] if copy_of[i] in base else rng.integers(0, 2, 64) for i in result.ids]
    hashes = EmbeddingResult(result.ids, ((np.array(bits) * 2.0 - 1) / 8).astype(np.float32), "phash")
    assert not np.isfinite(folder_threshold(result, _FakeSplit(truth), 0.9))
    chosen, _ = choose_combined(result, hashes, _FakeSplit(truth), 0.9, radii=[0, 1])
    assert chosen.hamming_radius == 0 and not np.isfinite(chosen.threshold)
    assert chosen.val_recall == pytest.approx(30 / 60) and chosen.val_precision == 1.0
