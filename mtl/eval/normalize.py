"""Similarity normalization: a score that means the same for every image.

The definition (cross-domain similarity local scaling, CSLS, Conneau et al. 2018; the
score normalization of the ISC2021 descriptor track):

    s'(a, b) = s(a, b) − β · (ρ(a) + ρ(b)) / 2
    ρ(x)     = mean of the k largest similarities of x to a *background* set B,
               x itself excluded

with s the cosine of two unit descriptors.  ρ is an image's *local density*: how close
it sits to its usual neighbours.  A raw cosine is not comparable from one image to the
next: star fields, bokeh, textures and simple clip art sit close to many pictures (hubs),
so their best *wrong* match outscores the true copy of a distinctive picture, and one
threshold cannot serve both.  After normalization a pair scores above 0 (β = 1) when its
two images are closer to each other than each is to its usual neighbours.

Backgrounds (`BACKGROUNDS`):
    references  a query's top-k among the references; a reference's among the *other*
                references.  No query sees another query, so a search service can use it;
                an index stores the reference densities (`mtl index build`).
    fixed       a stored set of training pictures' descriptors, the same for every
                collection (ISC style); kept beside the model (`save_background`).
    folder      for a folder (`mtl dedup`), every image against the other images.

k and β are chosen on the val split only (`choose_parameters`) and written with the
operating points (mtl.eval.operating_points).

Exact search on the normalized scale.  ρ(a)/2 and ρ(b)/2 enter as one inner product
of vectors with two extra coordinates:

    ã = [a, −β ρ(a)/2, 1],   b̃ = [b, 1, −β ρ(b)/2],   ã · b̃ = s'(a, b)

so an exact flat index over b̃ answers the normalized top-k and the normalized range
search (`augmented_queries`, `augmented_references`).  A compressed index (IVF-PQ) cannot
take the extra coordinates: it lists a raw shortlist, which is rescored
(`rescore_predictions`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from mtl.eval.index import as_float32_matrix, build_flat_index

BACKGROUNDS = ("references", "fixed", "folder")
# Grids searched on val.  CSLS's own choice is k = 10, β = 1; SSCD takes one neighbour.
K_GRID = (1, 3, 5, 10, 20, 50)
BETA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
SEARCH_BLOCK = 4096
# The augmented float32 inner product differs from the float64 s' by rounding: a pair
# scored exactly at a threshold (chosen in float64) is accepted within this much.
SCORE_ROUNDING = 1e-6


@dataclass(frozen=True)
class Normalization:
    """How scores are normalized: the background, its k nearest neighbours, the weight β.
    β = 0 is the raw cosine."""

    k: int
    beta: float
    background: str = "references"

    def __post_init__(self) -> None:
        if int(self.k) != self.k or self.k < 1:
            raise ValueError(f"normalization k must be a positive integer, got {self.k!r}")
        if not np.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"normalization beta must be >= 0, got {self.beta!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"normalization background must be one of {BACKGROUNDS}, got {self.background!r}")

    def as_dict(self) -> dict:
        return {"k": int(self.k), "beta": float(self.beta), "background": self.background}

    @classmethod
    def from_dict(cls, entry: Mapping, where: str = "normalization") -> "Normalization":
        if not isinstance(entry, Mapping) or not {"k", "beta"} <= set(entry):
            raise ValueError(f"{where} must be an object with k and beta, got {entry!r}")
        return cls(int(entry["k"]), float(entry["beta"]), str(entry.get("background", "references")))

    def describe(self) -> str:
        return f"normalized (β={self.beta:g}, k={self.k}, background: {self.background})"

    def apply(self, scores: np.ndarray, density_a: np.ndarray, density_b: np.ndarray) -> np.ndarray:
        """s' = s − β (ρ(a) + ρ(b)) / 2, elementwise."""
        return np.asarray(scores, np.float64) - self.beta * (np.asarray(density_a, np.float64)
                                                             + np.asarray(density_b, np.float64)) / 2


# --------------------------------------------------------------------------- densities

def top_similarities(x: np.ndarray, background: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """[n, k'] the k largest inner products of each row of x with the background rows, best
    first (k' = min(k, rows available)).  With `exclude_self` x *is* the background and each
    row's own entry is left out (also when a duplicate row ties with it)."""
    x = as_float32_matrix(x, "descriptors")
    background = as_float32_matrix(background, "background")
    if x.shape[1] != background.shape[1]:
        raise ValueError(f"descriptors are {x.shape[1]}-d but the background is {background.shape[1]}-d")
    available = len(background) - (1 if exclude_self else 0)
    k = min(int(k), available)
    if k < 1 or len(x) == 0:
        return np.zeros((len(x), 0), np.float32)
    index = build_flat_index(background, use_gpu=False)
    out = np.empty((len(x), k), np.float32)
    for start in range(0, len(x), SEARCH_BLOCK):
        block = x[start:start + SEARCH_BLOCK]
        scores, rows = index.search(block, k + 1 if exclude_self else k)
        if exclude_self:
            own = rows == np.arange(start, start + len(block))[:, None]
            # drop the own entry; a row whose own entry fell outside (ties) drops its last
            own[~own.any(axis=1), -1] = True
            scores = scores[~own].reshape(len(block), k)
        out[start:start + len(block)] = scores
    return out


def local_density(x: np.ndarray, background: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """ρ(x): the mean of each row's k largest similarities to the background ([n] float64).
    With fewer than k background rows, the mean of those there are; with none, 0."""
    top = top_similarities(x, background, k, exclude_self)
    if top.shape[1] == 0:
        return np.zeros(len(top), np.float64)
    return top.astype(np.float64).mean(axis=1)


def densities_from_top(top: np.ndarray, k: int) -> np.ndarray:
    """ρ from precomputed best-first similarities (a grid over k reuses one search)."""
    top = np.asarray(top, np.float64)
    if top.shape[1] == 0:
        return np.zeros(len(top))
    return top[:, :min(k, top.shape[1])].mean(axis=1)


def collection_densities(queries: np.ndarray, references: np.ndarray, normalization: Normalization,
                         background: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ρ of each query, ρ of each reference) for query -> reference search, by the
    normalization's background: `references` (each query among the references, each
    reference among the others) or `fixed` (both against `background`)."""
    k = normalization.k
    if normalization.background == "references":
        return local_density(queries, references, k), local_density(references, references, k, exclude_self=True)
    if normalization.background == "fixed":
        if background is None:
            raise ValueError("a fixed-background normalization needs the background descriptors")
        return local_density(queries, background, k), local_density(references, background, k)
    raise ValueError("query -> reference search takes the 'references' or 'fixed' background, "
                     f"not {normalization.background!r}")


def folder_densities(embeddings: np.ndarray, normalization: Normalization,
                     background: np.ndarray | None = None) -> np.ndarray:
    """ρ of every image of a folder: among the folder's other images (`folder`), or
    against a stored set (`fixed`)."""
    if normalization.background == "folder":
        return local_density(embeddings, embeddings, normalization.k, exclude_self=True)
    if normalization.background == "fixed":
        if background is None:
            raise ValueError("a fixed-background normalization needs the background descriptors")
        return local_density(embeddings, background, normalization.k)
    raise ValueError(f"a folder takes the 'folder' or 'fixed' background, not {normalization.background!r}")


# --------------------------------------------------------------------------- search

def augmented_queries(queries: np.ndarray, densities: np.ndarray, beta: float) -> np.ndarray:
    """ã = [a, −β ρ(a)/2, 1]: see the module docstring."""
    queries = as_float32_matrix(queries, "queries")
    extra = np.stack([-beta * np.asarray(densities, np.float64) / 2, np.ones(len(queries))], axis=1)
    return np.ascontiguousarray(np.hstack([queries, extra.astype(np.float32)]))


def augmented_references(references: np.ndarray, densities: np.ndarray, beta: float) -> np.ndarray:
    """b̃ = [b, 1, −β ρ(b)/2]: see the module docstring."""
    references = as_float32_matrix(references, "references")
    extra = np.stack([np.ones(len(references)), -beta * np.asarray(densities, np.float64) / 2], axis=1)
    return np.ascontiguousarray(np.hstack([references, extra.astype(np.float32)]))


def normalized_top_k(queries: np.ndarray, query_density: np.ndarray, references: np.ndarray,
                     reference_density: np.ndarray, beta: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], rows [Q, k]) of each query's k best references on the normalized
    scale, exactly (a flat index over the augmented vectors)."""
    k = min(int(k), len(references))
    if k < 1 or len(queries) == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    index = build_flat_index(augmented_references(references, reference_density, beta), use_gpu=False)
    return index.search(augmented_queries(queries, query_density, beta), k)


def rescore_predictions(predictions: pd.DataFrame, query_density: Mapping[str, float],
                        reference_density: Mapping[str, float], normalization: Normalization) -> pd.DataFrame:
    """Predictions (query_id, reference_id, score) on the normalized scale: `score`
    becomes s', the cosine is kept as `raw_score`, and each query's rows are ranked again.
    For a shortlist from an index that cannot search the normalized scale itself."""
    out = predictions.copy()
    raw = out["raw_score"] if "raw_score" in out else out["score"]
    rho_q = out["query_id"].astype(str).map(query_density)
    rho_r = out["reference_id"].astype(str).map(reference_density)
    if rho_q.isna().any() or rho_r.isna().any():
        raise ValueError("every query and reference of the predictions needs a density")
    out["raw_score"] = raw.to_numpy(np.float64)
    out["score"] = normalization.apply(raw, rho_q, rho_r)
    order = pd.factorize(out["query_id"])[0]  # queries stay in the order they came
    out = out.iloc[np.lexsort((-out["score"].to_numpy(), order))]
    if "rank" in out:
        out["rank"] = out.groupby("query_id", sort=False).cumcount() + 1
    return out.reset_index(drop=True)


def normalized_pairs_above(embeddings: np.ndarray, densities: np.ndarray, beta: float, min_score: float,
                           block: int = SEARCH_BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of rows (i < j) with s'(i, j) >= min_score, exactly: a range search over
    the augmented vectors (mtl.eval.search.pairs_above on the normalized scale).
    Returns (i, j, s') arrays."""
    x = as_float32_matrix(embeddings, "embeddings")
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if len(x) < 2:
        return empty
    index = build_flat_index(augmented_references(x, densities, beta), use_gpu=False)
    queries = augmented_queries(x, densities, beta)
    radius = float(min_score) - 2 * SCORE_ROUNDING  # faiss keeps scores strictly above the radius
    found = []
    for start in range(0, len(x), block):
        lims, scores, labels = index.range_search(queries[start:start + block], radius)
        rows = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = (labels > rows) & (scores >= min_score - SCORE_ROUNDING)
        found.append((rows[keep], labels[keep].astype(np.int64), scores[keep]))
    return tuple(np.concatenate(parts) for parts in zip(*found)) if found else empty


# --------------------------------------------------------------------------- choosing k and β

def parameter_grid(ks: Iterable[int] = K_GRID, betas: Iterable[float] = BETA_GRID) -> list[tuple[int, float]]:
    """Every (k, β) of the grids; β = 0 (the raw score) once, with the smallest k."""
    ks, betas = sorted(set(int(k) for k in ks)), sorted(set(float(b) for b in betas))
    if not ks or not betas:
        raise ValueError("empty normalization grid")
    return [(k, b) for b in betas for k in ks if b > 0 or k == ks[0]]


def choose_parameters(score: "callable", ks: Iterable[int] = K_GRID, betas: Iterable[float] = BETA_GRID,
                      background: str = "references") -> tuple[Normalization, pd.DataFrame]:
    """The (k, β) of the grid whose `score(Normalization)` (a val-split number, higher is
    better) is largest; among equals the smallest β, then the smallest k (the least change).
    Returns it and the whole grid (k, beta, score), for the record."""
    rows = []
    for k, beta in parameter_grid(ks, betas):
        normalization = Normalization(k, beta, background)
        rows.append({"k": k, "beta": beta, "score": float(score(normalization))})
    grid = pd.DataFrame(rows)
    best = grid.sort_values(["score", "beta", "k"], ascending=[False, True, True], kind="stable").iloc[0]
    return Normalization(int(best["k"]), float(best["beta"]), background), grid


def as_record(normalization: Normalization | None) -> dict | None:
    return None if normalization is None else asdict(normalization)
