"""Exact and near-duplicate detection.

Near duplicates: MinHash over word n-gram shingles, LSH banding for candidates, and an exact
Jaccard check of each candidate so the threshold means what it says. Built for speed:
- words become integer ids through one dict, and shingles are hashed with numpy, not per shingle
  in Python;
- MinHash uses multiply-shift hashing on uint64 (no modulo), for a whole batch of documents at
  once, with ``np.minimum.reduceat`` taking each document's minimum;
- band keys are folded to one uint64 per band with numpy, so the Python loop only does dict look-ups.
An example is a duplicate when it is at least ``threshold`` similar to an earlier *kept* example.
"""

from __future__ import annotations

import re
from hashlib import blake2b

import numpy as np

_WORD = re.compile(r"\w+")
_MASK32 = np.uint64(0xFFFFFFFF)
_BATCH_SHINGLES = 1 << 16


def exact_key(text: str) -> bytes:
    """Hash of the text with each run of whitespace read as one space and none at either end, so
    copies that differ only in spacing (tabs, double spaces, line breaks) are exact duplicates."""
    return blake2b(" ".join(text.split()).encode("utf-8"), digest_size=16).digest()  # split(): 3x faster than re


def lsh_params(threshold: float, num_perm: int, recall: float = 0.98) -> tuple[int, int]:
    """(bands, rows) that make a pair at the threshold a candidate with probability >= ``recall``,
    with the fewest candidates below the threshold (each candidate costs an exact Jaccard check)."""
    xs = np.linspace(0, threshold, 101)
    best, best_cost = (num_perm, 1), float("inf")
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands < recall:
            continue
        cost = np.trapezoid(1 - (1 - xs**rows) ** bands, xs)
        if cost < best_cost:
            best, best_cost = (bands, rows), cost
    return best


def _fmix64(x: np.ndarray) -> np.ndarray:
    # murmur3's finalizer: spreads small sequential word ids over all 64 bits.
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


class NearDedup:
    def __init__(self, threshold: float = 0.8, ngram: int = 3, num_perm: int = 128, seed: int = 1):
        self.threshold, self.ngram = threshold, ngram
        self.bands, self.rows = lsh_params(threshold, num_perm)
        rng = np.random.default_rng(seed)
        self.a = (rng.integers(1, 2**63, num_perm, dtype=np.uint64) | np.uint64(1))[:, None]
        self.b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)[:, None]
        # A different multiplier per band, so equal rows in different bands give different keys.
        self.band_mix = rng.integers(1, 2**63, (self.bands, self.rows), dtype=np.uint64) | np.uint64(1)
        self.vocab: dict[str, int] = {}

    def shingles(self, text: str) -> np.ndarray:
        """Sorted unique 32-bit shingle hashes of a text's word n-grams."""
        vocab = self.vocab
        ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in _WORD.findall(text.lower())), dtype=np.uint64)
        if len(ids) == 0:
            return np.zeros(1, dtype=np.uint64)
        n = min(self.ngram, len(ids))
        h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):
                h = _fmix64(h + ids[k : len(ids) - n + 1 + k])
        return np.unique(h & _MASK32)

    def signatures(self, shingle_sets: list[np.ndarray]) -> np.ndarray:
        """MinHash signatures, shape (documents, num_perm)."""
        out = np.empty((len(shingle_sets), self.a.shape[0]), dtype=np.uint64)
        start = 0
        while start < len(shingle_sets):
            end, size = start, 0
            while end < len(shingle_sets) and (size == 0 or size + len(shingle_sets[end]) <= _BATCH_SHINGLES):
                size += len(shingle_sets[end])
                end += 1
            flat = np.concatenate(shingle_sets[start:end])
            offsets = np.cumsum([0] + [len(s) for s in shingle_sets[start : end - 1]])
            with np.errstate(over="ignore"):
                hashed = (self.a * flat + self.b) >> np.uint64(32)
            out[start:end] = np.minimum.reduceat(hashed, offsets, axis=1).T
            start = end
        return out

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """One uint64 per band, shape (documents, bands)."""
        banded = sigs[:, : self.bands * self.rows].reshape(len(sigs), self.bands, self.rows)
        with np.errstate(over="ignore"):
            return (banded * self.band_mix).sum(axis=2, dtype=np.uint64)

    def find(self, texts: list[str]) -> list[int | None]:
        """For each text, the index of the earlier kept text it duplicates, or None to keep it."""
        sets = [self.shingles(t) for t in texts]
        keys = self.band_keys(self.signatures(sets)).tolist()
        buckets: dict[int, list[int]] = {}
        result: list[int | None] = []
        for i, doc_keys in enumerate(keys):
            dup_of = None
            seen: set[int] = set()
            for key in doc_keys:
                for j in buckets.get(key, ()):
                    if j not in seen:
                        seen.add(j)
                        if jaccard(sets[i], sets[j]) >= self.threshold:
                            dup_of = j
                            break
                if dup_of is not None:
                    break
            result.append(dup_of)
            if dup_of is None:
                for key in doc_keys:
                    buckets.setdefault(key, []).append(i)
        return result


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)
