"""Embedding-space scores behind the t-SNE / UMAP figures."""

import numpy as np
import pytest

from mtl.eval.space import project_tsne, score_space, view_to_anchor_accuracy


def clustered(n_anchors=6, views=4, spread=0.05, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_anchors, dim))
    rows, group, is_anchor = [], [], []
    for a, c in enumerate(centres):
        rows.append(c)
        group.append(a)
        is_anchor.append(True)
        for _ in range(views):
            rows.append(c + spread * rng.normal(size=dim))
            group.append(a)
            is_anchor.append(False)
    return np.array(rows), np.array(group), np.array(is_anchor)


def test_tight_clusters_score_high_and_shuffled_ones_low():
    x, group, is_anchor = clustered()
    good = score_space(x, group, is_anchor)
    assert good.knn_view_to_anchor == 1.0
    assert good.silhouette_by_anchor > 0.8
    shuffled = np.random.default_rng(1).permutation(group)
    bad = score_space(x, shuffled, is_anchor)
    assert bad.silhouette_by_anchor < 0.2
    assert bad.knn_view_to_anchor < 0.6


def test_view_to_anchor_accuracy_counts_each_view():
    anchors = np.array([[1.0, 0.0], [0.0, 1.0]])
    views = np.array([[0.9, 0.1], [0.8, 0.3], [0.9, 0.2]])  # last one belongs to anchor 1 but is near 0
    x = np.vstack([anchors, views])
    group = np.array([0, 1, 0, 0, 1])
    is_anchor = np.array([True, True, False, False, False])
    assert view_to_anchor_accuracy(x, group, is_anchor) == pytest.approx(2 / 3)


def test_tsne_keeps_each_view_beside_its_anchor_and_repeats_for_a_seed():
    x, group, is_anchor = clustered(n_anchors=4, views=3)
    xy = project_tsne(x, seed=0)
    assert xy.shape == (len(x), 2)
    anchors, views = xy[is_anchor], xy[~is_anchor]
    nearest = np.argmin(((views[:, None] - anchors[None]) ** 2).sum(axis=2), axis=1)
    assert np.array_equal(group[is_anchor][nearest], group[~is_anchor])  # the clusters survive in 2-D
    np.testing.assert_array_equal(project_tsne(x, seed=0), xy)
