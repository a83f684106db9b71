"""Decisions that use both outputs of the network: the paper's future work.

The multi-task network predicts, besides the embedding, the content type of an
image (photo, clip art, sign, ...).  A copy keeps its content type, so a match
between images of different predicted types is suspicious:

- gate:   drop a match when query and reference predicted classes (argmax) differ;
- fusion: rescore each match as  score − β·P(classes differ),  with
          P(differ) = 1 − Σ_c p_q(c)·p_r(c)  (independent class posteriors),
          β chosen on the val set to maximize μAP.

The gate is the fusion's hard limit; the fusion keeps a match whose similarity
is high enough to outweigh the class disagreement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mtl.eval.metrics import micro_average_precision

DEFAULT_BETAS = tuple(np.round(np.linspace(0.0, 1.0, 21), 3))


def _probs_by_id(ids, class_probs: np.ndarray, what: str) -> tuple[dict[str, int], np.ndarray]:
    ids = np.asarray(ids).astype(str)
    probs = np.asarray(class_probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(ids):
        raise ValueError(f"{what} class_probs must be [n_ids, n_classes]; got {probs.shape} "
                         f"for {len(ids)} ids")
    return {id_: row for row, id_ in enumerate(ids)}, probs


def attach_class_agreement(predictions: pd.DataFrame, query_ids, query_probs: np.ndarray,
                           reference_ids, reference_probs: np.ndarray) -> pd.DataFrame:
    """Predictions plus `same_class` (argmax equal) and `p_differ` (1 − Σ p_q·p_r)."""
    q_index, q_probs = _probs_by_id(query_ids, query_probs, "query")
    r_index, r_probs = _probs_by_id(reference_ids, reference_probs, "reference")
    if q_probs.shape[1] != r_probs.shape[1]:
        raise ValueError(f"query and reference class_probs have {q_probs.shape[1]} and "
                         f"{r_probs.shape[1]} classes")
    q_rows = predictions["query_id"].astype(str).map(q_index)
    r_rows = predictions["reference_id"].astype(str).map(r_index)
    if q_rows.isna().any() or r_rows.isna().any():
        unknown = predictions.loc[q_rows.isna() | r_rows.isna(), ["query_id", "reference_id"]]
        raise ValueError(f"{len(unknown)} predictions name ids without class probabilities, "
                         f"e.g. {unknown.iloc[0].tolist()}")
    q_rows, r_rows = q_rows.to_numpy(dtype=np.int64), r_rows.to_numpy(dtype=np.int64)
    pq, pr = q_probs[q_rows], r_probs[r_rows]
    out = predictions.copy()
    out["same_class"] = same_predicted_class(pq, pr)
    out["p_differ"] = np.clip(1.0 - np.einsum("ij,ij->i", pq, pr), 0.0, 1.0)
    return out


def same_predicted_class(probs_a: np.ndarray, probs_b: np.ndarray) -> np.ndarray:
    """Row-wise: do the two images' most probable classes agree?  The gate's one rule."""
    return np.asarray(probs_a).argmax(axis=1) == np.asarray(probs_b).argmax(axis=1)


def apply_gate(predictions: pd.DataFrame) -> pd.DataFrame:
    """Keep only matches whose predicted classes agree."""
    if "same_class" not in predictions:
        raise ValueError("call attach_class_agreement() first: predictions lack `same_class`")
    return predictions[predictions["same_class"].to_numpy(dtype=bool)].reset_index(drop=True)


def apply_fusion(predictions: pd.DataFrame, beta: float) -> pd.DataFrame:
    """Rescore matches: score − β·P(classes differ); the original score is kept as `similarity`."""
    if "p_differ" not in predictions:
        raise ValueError("call attach_class_agreement() first: predictions lack `p_differ`")
    if beta < 0:
        raise ValueError(f"beta must be >= 0 (a penalty), got {beta}")
    out = predictions.copy()
    similarity = out["similarity"] if "similarity" in out else out["score"]
    out["similarity"] = similarity
    out["score"] = similarity - beta * out["p_differ"]
    return out


@dataclass(frozen=True)
class FusionTuning:
    beta: float
    muap: float
    grid: pd.DataFrame  # beta, muap: the whole validation curve, for a plot


def tune_fusion_beta(val_predictions: pd.DataFrame, n_ground_truth: int,
                     betas=DEFAULT_BETAS) -> FusionTuning:
    """β of the grid with the highest val μAP (the smallest β among equals: least change).

    `val_predictions` must carry `correct` (metrics.label_predictions) and
    `p_differ` (attach_class_agreement).
    """
    betas = sorted(float(b) for b in betas)
    if not betas:
        raise ValueError("empty beta grid")
    scores = [micro_average_precision(apply_fusion(val_predictions, b), n_ground_truth) for b in betas]
    grid = pd.DataFrame({"beta": betas, "muap": scores})
    best = int(np.argmax(scores))  # argmax returns the first maximum: the smallest β
    return FusionTuning(beta=betas[best], muap=scores[best], grid=grid)
