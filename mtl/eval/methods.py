"""The methods of the comparison, and their embeddings of the evaluation set.

Each `CheckpointPass` names the methods one pass of a checkpoint over the eval set
yields: its MTL embedding, the backbone's own pooled 1280-d output (the paper's
baseline), and that output's PCA to 320-d, fit on train-split images (`backbone_pca320`:
is learning needed at all to reach 320 dimensions, or does a linear projection keep the
retrieval quality?).  phash and dhash (mtl.eval.baselines) are always embedded.

    paths = embed_methods("data/eval", "data/embeddings", passes, image_size=112, corpus_dir="data/corpus")

gives {method: {"val": npz, "test": npz}}, the input of mtl.eval.evaluation.evaluate_methods.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from mtl.eval.baselines import HASH_METHODS
from mtl.eval.embed import embed, embed_hashes, embed_many
from mtl.eval.embeddings import EmbeddingResult, save_npz, unit_rows
from mtl.eval.images import ImageList, images_in_evalset
from mtl.io import atomic_path

SPLITS = ("val", "test")


def embedding_path(embeddings_dir: str | Path, split: str, method: str) -> Path:
    return Path(embeddings_dir) / split / f"{method}.npz"


@dataclass(frozen=True)
class CheckpointPass:
    """One embedding pass of a checkpoint over the eval set, and the methods it yields
    (None = not wanted).  One backbone pass gives all three."""

    checkpoint: str | Path
    mtl: str | None = None          # the MTL embedding (and class probabilities)
    gap1280: str | None = None      # the backbone's own pooled 1280-d output
    pca320: str | None = None       # that output's PCA to 320-d, fit on train-split images
    image_size: int | None = None   # None: the evaluation's image size

    def methods(self) -> dict[str, str]:
        """{output kind: method name} of the wanted outputs."""
        return {kind: name for kind, name in (("mtl", self.mtl), ("gap1280", self.gap1280), ("pca", self.pca320))
                if name is not None}


def embed_methods(eval_dir: str | Path, embeddings_dir: str | Path, passes: Sequence[CheckpointPass],
                  image_size: int, corpus_dir: str | Path | None = None, pca_images: int = 2000,
                  pca_dim: int = 320, batch_size: int = 128, device: str = "auto", num_workers: int = 1,
                  seed: int = 0, overwrite: bool = False) -> dict[str, dict[str, Path]]:
    """Embed both eval splits with the hashes and every pass, each pass at its own input
    size or else `image_size`; {method: {split: npz path}}.

    A PCA method is fit on `pca_images` train-split images of `corpus_dir`.  Existing
    files are reused unless `overwrite`.
    """
    paths: dict[str, dict[str, Path]] = {}

    def wanted(method: str, split: str) -> Path | None:
        path = embedding_path(embeddings_dir, split, method)
        paths.setdefault(method, {})[split] = path
        return None if path.is_file() and not overwrite else path

    projections = {}
    for job in passes:
        if job.pca320 is None:
            continue
        if corpus_dir is None:
            raise ValueError(f"{job.pca320} is fit on train-split images: pass corpus_dir")
        pca_file = Path(embeddings_dir) / f"{job.pca320}_projection.npz"
        if pca_file.is_file() and not overwrite:
            projections[job.pca320] = PCAProjection.load(pca_file)
        else:
            projections[job.pca320] = fit_backbone_pca(job.checkpoint, corpus_dir, pca_images, pca_dim, seed,
                                                       image_size=job.image_size or image_size,
                                                       batch_size=batch_size, device=device, num_workers=num_workers)
            projections[job.pca320].save(pca_file)
    for split in SPLITS:
        images = images_in_evalset(Path(eval_dir) / split)
        for kind in HASH_METHODS:
            if (out := wanted(kind, split)) is not None:
                save_npz(embed_hashes(kind, images, num_workers=num_workers), out)
        for job in passes:
            outs = {kind: wanted(name, split) for kind, name in job.methods().items()}
            if all(out is None for out in outs.values()):
                continue
            many = embed_many(job.checkpoint, images, job.image_size or image_size, batch_size, device, num_workers)
            if job.pca320 is not None:
                many["pca"] = apply_pca_to_embeddings(many["gap1280"], projections[job.pca320], job.pca320)
            for kind, out in outs.items():
                if out is not None:
                    save_npz(many[kind], out)
    return paths


def background_path(embeddings_dir: str | Path, method: str) -> Path:
    return Path(embeddings_dir) / "background" / f"{method}.npz"


def embed_backgrounds(embeddings_dir: str | Path, passes: Sequence[CheckpointPass], methods: Sequence[str],
                      corpus_dir: str | Path, n_images: int, image_size: int, batch_size: int = 128,
                      device: str = "auto", num_workers: int = 1, seed: int = 0) -> dict[str, Path]:
    """The fixed background of the similarity normalization (mtl.eval.normalize, background
    ``fixed``): `n_images` train-split pictures (the PCA's seeded sample) described by each
    of `methods` (MTL and 1280-d outputs of the passes), {method: npz}."""
    paths, ids = train_split_sample(corpus_dir, n_images, seed)
    images = ImageList(paths, ids)
    written = {}
    for job in passes:
        wanted = {kind: name for kind, name in job.methods().items() if name in methods and kind != "pca"}
        if not wanted:
            continue
        many = embed_many(job.checkpoint, images, job.image_size or image_size, batch_size, device, num_workers)
        for kind, name in wanted.items():
            written[name] = save_npz(many[kind], background_path(embeddings_dir, name))
    return written


# --------------------------------------------------------------------------- the PCA baseline

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
    paths, ids = train_split_sample(corpus_dir, n_images, seed)
    gap = embed(f"backbone_gap1280:{checkpoint}", paths, ids, **embed_options)
    return fit_pca(gap.embeddings, out_dim)


def apply_pca_to_embeddings(gap_result: EmbeddingResult, pca: PCAProjection,
                            method: str = "backbone_pca320") -> EmbeddingResult:
    """An EmbeddingResult of 1280-d descriptors, projected: same ids, new method name."""
    provenance = gap_result.provenance
    if provenance is not None:
        provenance = replace(provenance, kind="pca", dim=pca.out_dim, projection=pca.digest)
    return replace(gap_result, embeddings=pca.apply(gap_result.embeddings), method=method, provenance=provenance)
