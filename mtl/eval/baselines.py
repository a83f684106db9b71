"""The hash baselines: `phash` and `dhash`, 64-bit perceptual hashes (imagehash).

Stored as ±1/8 vectors, so the inner product of two of them is 1 − 2·hamming/64:
exact inner-product search then ranks by Hamming distance, and a score threshold is a
Hamming radius.  Their real storage cost is 8 bytes.  (The other baselines, the
backbone's own 1280-d output and its PCA to 320-d, are methods of mtl.eval.methods.)
"""

from __future__ import annotations

import imagehash
import numpy as np

HASH_METHODS = ("phash", "dhash")
HASH_BITS = 64


def hash_vector(img, method: str) -> np.ndarray:
    """A 64-bit perceptual hash of a PIL image as a ±1/√64 float32 vector."""
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
