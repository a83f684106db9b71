"""The embedding space, looked at and measured (the paper's Fig. 5, plus numbers).

The paper shows t-SNE before and after training and says views of an anchor
cluster with it.  We show t-SNE and UMAP of seeded test anchors and their transformed
views (:func:`anchor_views`) and measure the same thing:
  - view→anchor 1-NN accuracy: a view's nearest anchor is its own anchor;
  - silhouette by anchor: how tight each anchor's group (anchor + its views) is
    relative to the nearest other group (cosine distance; 1 is perfect).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score

from mtl.data.batches import load_original
from mtl.data.manifest import split_originals
from mtl.data.transforms import EVAL_FAMILY, apply
from mtl.eval.embeddings import unit_rows
from mtl.params import section_config


@dataclass(frozen=True)
class EmbeddingsConfig:
    """The `embeddings` section of params.yaml: the anchors and views that are projected."""

    anchors: int            # test images shown
    views_per_anchor: int   # eval-family transformations of each
    image_size: int         # the models' input size
    seed: int

    @classmethod
    def from_params(cls, section: Mapping[str, Any]) -> "EmbeddingsConfig":
        return section_config(cls, section, "embeddings")


@dataclass(frozen=True)
class SpaceScores:
    knn_view_to_anchor: float
    silhouette_by_anchor: float

    def as_dict(self) -> dict:
        return {"knn_view_to_anchor": self.knn_view_to_anchor,
                "silhouette_by_anchor": self.silhouette_by_anchor}


def anchor_views(params: dict) -> tuple[list[Image.Image], np.ndarray, np.ndarray, list[str]]:
    """Test-split anchors and their eval-family transformed views, seeded.

    Returns (images, group, is_anchor, transformation names)."""
    cfg = EmbeddingsConfig.from_params(params["embeddings"])
    corpus_dir = Path(params["data"]["corpus_dir"])
    originals = split_originals(corpus_dir / "manifest.csv", corpus_dir, "test")
    rng = np.random.default_rng(cfg.seed)
    chosen = rng.choice(len(originals), size=min(cfg.anchors, len(originals)), replace=False)
    images, group, is_anchor, names = [], [], [], []
    for a, index in enumerate(sorted(chosen)):
        original = load_original(originals[index].path)
        images.append(original), group.append(a), is_anchor.append(True), names.append("anchor")
        for v in range(cfg.views_per_anchor):
            name = EVAL_FAMILY[(a + v) % len(EVAL_FAMILY)]
            images.append(apply(name, original, (cfg.seed, a, v)))
            group.append(a), is_anchor.append(False), names.append(name)
    return images, np.array(group), np.array(is_anchor), names


def view_to_anchor_accuracy(embeddings: np.ndarray, group: np.ndarray, is_anchor: np.ndarray) -> float:
    """Share of views whose most similar anchor (cosine) is their own anchor."""
    z = unit_rows(embeddings)
    group, is_anchor = np.asarray(group), np.asarray(is_anchor, dtype=bool)
    if is_anchor.sum() == 0 or (~is_anchor).sum() == 0:
        raise ValueError("need at least one anchor and one view")
    anchors, views = z[is_anchor], z[~is_anchor]
    nearest = np.argmax(views @ anchors.T, axis=1)
    return float(np.mean(group[is_anchor][nearest] == group[~is_anchor]))


def silhouette_by_anchor(embeddings: np.ndarray, group: np.ndarray) -> float:
    if len(np.unique(group)) < 2:
        raise ValueError("silhouette needs at least two anchors")
    return float(silhouette_score(unit_rows(embeddings), group, metric="cosine"))


def score_space(embeddings: np.ndarray, group: np.ndarray, is_anchor: np.ndarray) -> SpaceScores:
    return SpaceScores(view_to_anchor_accuracy(embeddings, group, is_anchor),
                       silhouette_by_anchor(embeddings, group))


def project_tsne(embeddings: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (cosine), perplexity scaled down for small sets."""
    n = len(embeddings)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed)
    return tsne.fit_transform(unit_rows(embeddings))


def project_umap(embeddings: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D UMAP (cosine); neighbours scaled down for small sets (umap-learn, a heavy import,
    loaded here)."""
    import umap

    n = len(embeddings)
    reducer = umap.UMAP(n_components=2, n_neighbors=int(min(15, max(2, n - 1))), metric="cosine",
                        random_state=seed, n_jobs=1)
    return reducer.fit_transform(unit_rows(embeddings))
