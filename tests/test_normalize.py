"""Similarity normalization (mtl.eval.normalize): the definition, exact search on the
normalized scale, and what it is for: hubs stop outscoring true copies."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mtl.eval.metrics import label_predictions, micro_average_precision
from mtl.eval.normalize import (Normalization, choose_parameters, collection_densities, densities_from_top,
                                folder_densities, local_density, normalized_pairs_above, normalized_top_k,
                                parameter_grid, rescore_predictions, top_similarities)
from mtl.eval.search import predictions_table, search


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_density(x: np.ndarray, background: np.ndarray, k: int, exclude_self: bool) -> np.ndarray:
    sims = x @ background.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    return np.sort(sims, axis=1)[:, ::-1][:, :k].mean(axis=1)


@pytest.fixture
def vectors() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return unit(rng.normal(size=(40, 8))), unit(rng.normal(size=(60, 8)))


def test_density_is_the_mean_of_the_k_largest_similarities(vectors) -> None:
    queries, references = vectors
    for k in (1, 3, 10):
        np.testing.assert_allclose(local_density(queries, references, k),
                                   brute_density(queries, references, k, False), atol=1e-6)
        np.testing.assert_allclose(local_density(references, references, k, exclude_self=True),
                                   brute_density(references, references, k, True), atol=1e-6)


def test_an_image_is_never_its_own_neighbour_even_beside_an_exact_duplicate() -> None:
    x = unit(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    top = top_similarities(x, x, 1, exclude_self=True)
    # rows 0 and 1 are identical: each one's nearest *other* image is the other (cosine 1)
    np.testing.assert_allclose(top[:, 0], [1.0, 1.0, 0.8, 0.8], atol=1e-6)
    assert local_density(x, x, 10, exclude_self=True).shape == (4,)  # k above the set: all the others


def test_densities_from_one_search_serve_every_k(vectors) -> None:
    queries, references = vectors
    top = top_similarities(queries, references, 20)
    for k in (1, 5, 20):
        np.testing.assert_allclose(densities_from_top(top, k), local_density(queries, references, k), atol=1e-6)


def test_normalized_top_k_is_exact(vectors) -> None:
    queries, references = vectors
    normalization = Normalization(5, 0.75)
    rho_q, rho_r = collection_densities(queries, references, normalization)
    scores, rows = normalized_top_k(queries, rho_q, references, rho_r, normalization.beta, 7)
    expected = normalization.apply(queries @ references.T, rho_q[:, None], rho_r[None, :])
    best = np.argsort(-expected, axis=1, kind="stable")[:, :7]
    np.testing.assert_allclose(scores, np.take_along_axis(expected, best, axis=1), atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(expected, rows, axis=1), scores, atol=1e-5)


def test_beta_zero_is_the_raw_search(vectors) -> None:
    queries, references = vectors
    rho_q, rho_r = collection_densities(queries, references, Normalization(3, 0.0))
    scores, rows = normalized_top_k(queries, rho_q, references, rho_r, 0.0, 5)
    raw = search(queries, np.arange(len(queries)), references, np.arange(len(references)), k=5).predictions
    np.testing.assert_allclose(scores.ravel(), raw["score"].to_numpy(), atol=1e-6)


def test_normalized_pairs_above_finds_exactly_the_pairs_over_the_threshold(vectors) -> None:
    x = vectors[1]
    rho = folder_densities(x, Normalization(4, 1.0, "folder"))
    i, j, s = normalized_pairs_above(x, rho, 1.0, min_score=0.05)
    expected = Normalization(4, 1.0).apply(x @ x.T, rho[:, None], rho[None, :])
    a, b = np.triu_indices(len(x), k=1)
    want = {(p, q) for p, q in zip(a, b) if expected[p, q] >= 0.05}
    assert set(zip(i.tolist(), j.tolist())) == want and want
    np.testing.assert_allclose(s, expected[i, j], atol=1e-5)


def test_rescoring_a_shortlist_matches_the_exact_search(vectors) -> None:
    queries, references = vectors
    normalization = Normalization(3, 1.0)
    rho_q, rho_r = collection_densities(queries, references, normalization)
    q_ids, r_ids = np.array([f"q{i}" for i in range(len(queries))]), np.array([f"r{i}" for i in range(len(references))])
    shortlist = search(queries, q_ids, references, r_ids, k=len(references)).predictions
    rescored = rescore_predictions(shortlist, dict(zip(q_ids, rho_q)), dict(zip(r_ids, rho_r)), normalization)
    top = rescored[rescored["rank"] <= 4]
    scores, rows = normalized_top_k(queries, rho_q, references, rho_r, 1.0, 4)
    exact = predictions_table(q_ids, r_ids, scores, rows)
    assert list(zip(top["query_id"], top["reference_id"])) == list(zip(exact["query_id"], exact["reference_id"]))
    assert "raw_score" in rescored and (rescored["raw_score"] >= rescored["score"] - 1e-9).all()


def hub_collection(seed: int = 0):
    """References: distinctive pictures spread out, plus a tight bunch of look-alikes
    (textures); queries: noisy copies of the distinctive ones, and distractors that are
    new look-alikes.  A distractor's best (wrong) match is closer than a true copy."""
    rng = np.random.default_rng(seed)
    dim = 32
    distinct = unit(rng.normal(size=(30, dim)))
    centre = unit(rng.normal(size=(1, dim)))
    bunch = unit(centre + 0.15 * rng.normal(size=(30, dim)))
    references = np.vstack([distinct, bunch])
    copies = unit(distinct + 0.35 * rng.normal(size=distinct.shape))
    distractors = unit(centre + 0.15 * rng.normal(size=(30, dim)))
    queries = np.vstack([copies, distractors])
    ref_ids = np.array([f"r{i}" for i in range(len(references))])
    query_ids = np.array([f"q{i}" for i in range(len(queries))])
    truth = pd.DataFrame({"query_id": query_ids,
                          "reference_id": [f"r{i}" for i in range(30)] + [np.nan] * 30})
    return queries, query_ids, references, ref_ids, truth


def test_normalization_stops_hubs_from_outscoring_true_copies() -> None:
    queries, query_ids, references, ref_ids, truth = hub_collection()
    raw = label_predictions(search(queries, query_ids, references, ref_ids, k=5).predictions, truth)
    normalization = Normalization(5, 1.0)
    rho_q, rho_r = collection_densities(queries, references, normalization)
    scores, rows = normalized_top_k(queries, rho_q, references, rho_r, 1.0, 5)
    normalized = label_predictions(predictions_table(query_ids, ref_ids, scores, rows), truth)
    # the premise: raw, some wrong match of a look-alike outscores some true copy
    assert raw.loc[~raw["correct"], "score"].max() > raw.loc[raw["correct"], "score"].min()
    assert micro_average_precision(normalized, 30) > micro_average_precision(raw, 30) + 0.1


def test_a_fixed_background_needs_its_descriptors(vectors) -> None:
    queries, references = vectors
    with pytest.raises(ValueError, match="background descriptors"):
        collection_densities(queries, references, Normalization(3, 1.0, "fixed"))
    rho_q, rho_r = collection_densities(queries, references, Normalization(3, 1.0, "fixed"), background=queries)
    np.testing.assert_allclose(rho_r, brute_density(references, queries, 3, False), atol=1e-6)
    with pytest.raises(ValueError, match="folder"):
        collection_densities(queries, references, Normalization(3, 1.0, "folder"))


def test_choose_parameters_takes_the_best_and_the_least_change_among_equals() -> None:
    grid = parameter_grid([1, 5], [0.0, 0.5, 1.0])
    assert grid == [(1, 0.0), (1, 0.5), (5, 0.5), (1, 1.0), (5, 1.0)]  # beta 0 once
    chosen, table = choose_parameters(lambda n: 1.0 if n.beta >= 0.5 else 0.0, [1, 5], [0.0, 0.5, 1.0])
    assert (chosen.k, chosen.beta) == (1, 0.5) and len(table) == 5
    chosen, _ = choose_parameters(lambda n: n.k * n.beta, [1, 5], [0.0, 0.5, 1.0], background="folder")
    assert (chosen.k, chosen.beta, chosen.background) == (5, 1.0, "folder")


@pytest.mark.parametrize("bad", [{"k": 0, "beta": 1.0}, {"k": 3, "beta": -1.0}, {"k": 3, "beta": float("nan")},
                                 {"k": 3, "beta": 1.0, "background": "elsewhere"}])
def test_bad_parameters_are_refused(bad) -> None:
    with pytest.raises(ValueError):
        Normalization(**bad)


def test_the_record_round_trips_and_names_itself() -> None:
    n = Normalization(10, 1.25, "folder")
    assert Normalization.from_dict(n.as_dict()) == n
    assert "β=1.25" in n.describe() and "folder" in n.describe()
    with pytest.raises(ValueError, match="k and beta"):
        Normalization.from_dict({"k": 3})
