"""Descriptors the multi-task embedding is compared with.

- `phash`, `dhash`: 64-bit perceptual hashes (imagehash).  Stored as ±1/8 vectors,
  so the inner product of two of them is 1 − 2·hamming/64: exact inner-product
  search then ranks by Hamming distance, and a score threshold is a Hamming radius.
  Their real storage cost is 8 bytes.
- `backbone_gap1280`: the ImageNet backbone's own pooled 1280-d output, the
  paper's baseline (computed in mtl.eval.embed from the same backbone pass).
- `backbone_pca320`: that 1280-d descriptor projected by PCA, fit on a sample of
  the corpus's *train* split, to 320-d and re-normalized.  It asks whether
  learning is needed at all to reach 320 dimensions, or whether a linear
  projection already keeps the retrieval quality.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mtl.io import atomic_path

HASH_METHODS = ("phash", "dhash")
HASH_BITS = 64


def hash_vector(img, method: str) -> np.ndarray:
    """A 64-bit perceptual hash of a PIL image as a ±1/√64 float32 vector."""
    import imagehash

    if method == "phash":
        bits = imagehash.phash(img, hash_size=8).hash
    elif method == "dhash":
        bits = imagehash.dhash(img, hash_size=8).hash
    else:
        raise ValueError(f"unknown hash method {method!r}; known: {HASH_METHODS}")
    signs = np.where(bits.reshape(-1), 1.0, -1.0).astype(np.float32)
    return signs / np.float32(np.sqrt(HASH_BITS))


def score_from_hamming(hamming: np.ndarray | float, bits: int = HASH_BITS) -> np.ndarray | float:
    """The inner product of two ±1/√bits vectors `hamming` bits apart: 1 − 2h/bits."""
    return 1.0 - 2.0 * np.asarray(hamming, dtype=np.float64) / bits


def hamming_from_score(score: np.ndarray | float, bits: int = HASH_BITS) -> np.ndarray | float:
    """Invert the score mapping: inner product s of two ±1/√bits vectors is 1 − 2h/bits."""
    return np.round((1.0 - np.asarray(score)) * bits / 2.0)


@dataclass(frozen=True)
class PCAProjection:
    """x ↦ normalize((x − mean) @ components.T), fit on train-split descriptors."""

    mean: np.ndarray        # [D_in]
    components: np.ndarray  # [D_out, D_in], rows orthonormal
    explained_variance_ratio: np.ndarray  # [D_out]
    n_fit: int

    @property
    def out_dim(self) -> int:
        return self.components.shape[0]

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"PCA expects [n, {self.mean.shape[0]}] inputs, got {x.shape}")
        projected = (x - self.mean) @ self.components.T
        return unit_rows(projected)

    @property
    def digest(self) -> str:
        """Names this projection in an embedding's provenance."""
        return hashlib.sha256(self.mean.tobytes() + self.components.tobytes()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, mean=self.mean, components=self.components,
                     explained_variance_ratio=self.explained_variance_ratio, n_fit=self.n_fit)

    @classmethod
    def load(cls, path: str | Path) -> "PCAProjection":
        with np.load(path) as data:
            return cls(mean=data["mean"], components=data["components"],
                       explained_variance_ratio=data["explained_variance_ratio"], n_fit=int(data["n_fit"]))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32 (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def fit_pca(descriptors: np.ndarray, out_dim: int = 320) -> PCAProjection:
    """PCA of (unit) descriptors by SVD of the centred matrix."""
    x = np.asarray(descriptors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be [n, dim], got {x.shape}")
    if out_dim > min(x.shape):
        raise ValueError(f"PCA to {out_dim} dims needs at least {out_dim} samples and dims; "
                         f"got {x.shape[0]} samples of dim {x.shape[1]} (fit on more train images)")
    mean = x.mean(axis=0)
    _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
    variance = singular**2
    return PCAProjection(mean=mean.astype(np.float32), components=vt[:out_dim].astype(np.float32),
                         explained_variance_ratio=(variance[:out_dim] / variance.sum()).astype(np.float32),
                         n_fit=len(x))


def train_split_sample(corpus_dir: str | Path, n_images: int, seed: int = 0) -> tuple[list[Path], list[str]]:
    """(paths, ids) of a seeded sample of the corpus's train split (manifest.csv)."""
    import pandas as pd

    corpus_dir = Path(corpus_dir)
    manifest = corpus_dir / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"no corpus manifest at {manifest}: build the corpus first (mtl corpus)")
    rows = pd.read_csv(manifest, dtype=str)
    train = rows[rows["split"] == "train"]
    if train.empty:
        raise ValueError(f"{manifest} has no train-split images")
    sample = train.sample(n=min(n_images, len(train)), random_state=seed)
    return [corpus_dir / p for p in sample["path"]], list(sample["id"])


def fit_backbone_pca(checkpoint: str | Path, corpus_dir: str | Path, n_images: int = 2000,
                     out_dim: int = 320, seed: int = 0, **embed_options) -> PCAProjection:
    """Fit the 320-d PCA of a checkpoint's 1280-d backbone descriptor on train images.

    `embed_options` go to mtl.eval.embed.embed (image_size, batch_size, device).
    """
    from mtl.eval.embed import embed

    paths, ids = train_split_sample(corpus_dir, n_images, seed)
    gap = embed(f"backbone_gap1280:{checkpoint}", paths, ids, **embed_options)
    return fit_pca(gap.embeddings, out_dim)


def apply_pca_to_embeddings(gap_result, pca: PCAProjection, method: str = "backbone_pca320"):
    """An EmbeddingResult of 1280-d descriptors, projected: same ids, new method name."""
    provenance = gap_result.provenance
    if provenance is not None:
        provenance = replace(provenance, kind="pca", dim=pca.out_dim, projection=pca.digest)
    return replace(gap_result, embeddings=pca.apply(gap_result.embeddings), method=method, provenance=provenance)
