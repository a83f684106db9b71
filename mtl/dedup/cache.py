"""Embedding a folder for `mtl dedup`, once per file content and model: descriptors are
cached by the file's digest in one folder per model (DedupMethod.cache_key), so a rerun
on a grown folder embeds only the new files."""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtl.dedup.thresholds import DedupMethod
from mtl.eval.embed import describe_images, embed_hashes
from mtl.eval.embeddings import EmbeddingResult
from mtl.eval.images import ImageList, images_in_folder
from mtl.io import atomic_path, file_digest
from mtl.model import ModelConfig, MTLNet
from mtl.runtime import progress, resolve_device

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtl" / "dedup"


@dataclass(frozen=True)
class FolderEmbeddings:
    """Descriptors of the readable files of a folder, in listing order."""

    ids: np.ndarray                 # [N] paths relative to the folder
    embeddings: np.ndarray          # [N, D] unit rows
    class_probs: np.ndarray | None  # [N, C] (MTL descriptor only)
    class_names: tuple[str, ...]
    failed: dict[str, str]          # id -> why it could not be read
    n_files: int
    n_new: int                      # files whose content this run read (the others: from the cache)
    embed_seconds: float


class EmbeddingCache:
    """Descriptors by file-content digest, one folder per model (DedupMethod.cache_key).

    Each run adds one shard .npz holding only what it embedded (failures too: the same
    bytes fail the same way), written atomically, so an interrupted or concurrent run
    never spoils what earlier runs stored."""

    def __init__(self, root: str | Path, key: str):
        self.directory = Path(root) / key
        self.vectors: dict[str, np.ndarray] = {}
        self.probs: dict[str, np.ndarray] = {}
        self.failures: dict[str, str] = {}
        self.class_names: tuple[str, ...] = ()
        for shard in sorted(self.directory.glob("*.npz")):
            self._read(shard)

    def _read(self, shard: Path) -> None:
        try:
            with np.load(shard, allow_pickle=False) as data:
                self.vectors.update(zip(data["digests"], data["embeddings"]))
                if "class_probs" in data.files:
                    self.probs.update(zip(data["digests"], data["class_probs"]))
                    self.class_names = tuple(data["class_names"])
                self.failures.update(zip(data["failed_digests"], data["failed_reasons"]))
        except (OSError, ValueError, KeyError) as error:  # its files are simply embedded again
            print(f"mtl dedup: ignoring unreadable cache shard {shard} ({error})", file=sys.stderr)

    def knows(self, digest: str) -> bool:
        return digest in self.vectors or digest in self.failures

    def add(self, result: EmbeddingResult) -> None:
        """Store an EmbeddingResult whose ids are file digests."""
        if not len(result.ids) and not len(result.failed):
            return
        self.vectors.update(zip(result.ids, result.embeddings))
        if result.class_probs is not None:
            self.probs.update(zip(result.ids, result.class_probs))
            self.class_names = tuple(result.class_names)
        self.failures.update(zip(result.failed, result.failed_reasons))
        shard = self.directory / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}.npz"
        arrays = {"digests": result.ids, "embeddings": result.embeddings,
                  "failed_digests": result.failed, "failed_reasons": result.failed_reasons}
        if result.class_probs is not None:
            arrays |= {"class_probs": result.class_probs, "class_names": result.class_names}
        with atomic_path(shard) as tmp:
            np.savez(tmp, **arrays)


def digest_files(paths: list[Path]) -> list[str | None]:
    """sha256 (16 hex) of each file's bytes; None when it cannot be read."""
    digests = []
    for path in progress(paths, len(paths), "digest", unit="file", lines=0):
        try:
            digests.append(file_digest(path))
        except OSError:
            digests.append(None)
    return digests


def embed_folder(folder: str | Path, method: DedupMethod, cache_dir: str | Path = DEFAULT_CACHE,
                 batch_size: int = 128, device: str = "auto", num_workers: int = 1) -> FolderEmbeddings:
    """Every image under `folder`, embedded once per distinct content and model."""
    listing = images_in_folder(folder)
    digests = digest_files(listing.paths)
    cache = EmbeddingCache(cache_dir, method.cache_key)
    new = {d: p for d, p in zip(digests, listing.paths) if d is not None and not cache.knows(d)}
    start = time.perf_counter()
    if new:
        cache.add(_embed(method, ImageList(list(new.values()), list(new)), batch_size, device, num_workers))
    seconds = time.perf_counter() - start
    failed = {i: "missing" for i, d in zip(listing.ids, digests) if d is None}
    failed |= {i: cache.failures[d] for i, d in zip(listing.ids, digests) if d in cache.failures}
    rows = [(i, d) for i, d in zip(listing.ids, digests) if d in cache.vectors]
    ids = np.array([i for i, _ in rows], dtype=str)
    dim = next(iter(cache.vectors.values())).shape[0] if cache.vectors else 1
    vectors = np.stack([cache.vectors[d] for _, d in rows]) if rows else np.zeros((0, dim), np.float32)
    probs = np.stack([cache.probs[d] for _, d in rows]) if rows and method.descriptor == "mtl" else None
    n_new = sum(d in new for d in digests)
    return FolderEmbeddings(ids, vectors.astype(np.float32), probs, cache.class_names, failed,
                            len(listing.ids), n_new, seconds)


def _embed(method: DedupMethod, images: ImageList, batch_size: int, device: str, num_workers: int
           ) -> EmbeddingResult:
    """One EmbeddingResult (ids = digests) through mtl.eval.embed's loops."""
    if method.descriptor in ("phash", "dhash"):
        return embed_hashes(method.descriptor, images, num_workers=num_workers)
    dev = resolve_device(device)
    if method.checkpoint is None:  # the untrained backbone, ImageNet weights (offline Lite0)
        model, name = MTLNet(ModelConfig()), "imagenet"
    else:
        model, name = MTLNet.from_checkpoint(method.checkpoint, map_location=dev), str(method.checkpoint)
    return describe_images(model, images, name, method.image_size, batch_size, dev, num_workers)[method.descriptor]
