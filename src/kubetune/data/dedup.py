"""Exact and near-duplicate detection.

Near duplicates: MinHash over word n-gram shingles, LSH banding for candidates, and an exact
Jaccard check of each candidate so the threshold means what it says. Built for speed:
- words become integer ids by a hash of their text (CRC-32, the same in every process, so worker
  processes agree), and shingles are hashed with numpy, not per shingle in Python;
- MinHash uses multiply-shift hashing on uint64 (no modulo), for a whole batch of documents at
  once, with ``np.minimum.reduceat`` taking each document's minimum;
- band keys are folded to one uint64 per band with numpy, so the Python loop only does dict look-ups.
An example is a duplicate when it is at least ``threshold`` similar to an earlier *kept* example.

Streaming (``Dedup``): documents come in chunks, in input order. What is kept of earlier documents is
compact and does not grow with their text: exact keys and band keys as uint64 in sorted arrays
(``KeyIndex``), and the shingles of kept documents in a scratch file (``ShingleFile``), read back only
for a candidate's Jaccard check. About 19 x 16 bytes of memory per kept document at the defaults (the
exact key and 18 band keys, each with an id), and up to twice that while the largest run is merged.
"""

from __future__ import annotations

import os
import re
import zlib
from hashlib import blake2b

import numpy as np

_WORD = re.compile(r"\w+")
_MASK32 = np.uint64(0xFFFFFFFF)
_BATCH_SHINGLES = 1 << 16


class _WordIds(dict):
    """word → CRC-32 of its UTF-8, computed once per word (bounded: cleared when large)."""

    def __missing__(self, word: str) -> int:
        if len(self) > 1 << 20:
            self.clear()
        value = self[word] = zlib.crc32(word.encode("utf-8", "surrogatepass"))
        return value


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
        self.words = _WordIds()

    def shingles(self, text: str) -> np.ndarray:
        """Sorted unique 32-bit shingle hashes of a text's word n-grams (uint32)."""
        words = _WORD.findall(text.lower())
        ids = np.fromiter(map(self.words.__getitem__, words), dtype=np.uint64, count=len(words))
        if len(ids) == 0:
            return np.zeros(1, dtype=np.uint32)
        n = min(self.ngram, len(ids))
        h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):
                h = _fmix64(h + ids[k : len(ids) - n + 1 + k])
        return np.unique(h & _MASK32).astype(np.uint32)

    def signatures(self, shingle_sets: list[np.ndarray]) -> np.ndarray:
        """MinHash signatures, shape (documents, num_perm)."""
        out = np.empty((len(shingle_sets), self.a.shape[0]), dtype=np.uint64)
        start = 0
        while start < len(shingle_sets):
            end, size = start, 0
            while end < len(shingle_sets) and (size == 0 or size + len(shingle_sets[end]) <= _BATCH_SHINGLES):
                size += len(shingle_sets[end])
                end += 1
            flat = np.concatenate(shingle_sets[start:end]).astype(np.uint64)
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
        """For each text, whether it duplicates an earlier kept one: that one's index, or None to keep it."""
        sets = [self.shingles(t) for t in texts]
        keys = self.band_keys(self.signatures(sets)) if sets else np.zeros((0, self.bands), np.uint64)
        return [None if j < 0 else j for j in _near_in_chunk(sets, keys, self.threshold, lambda _: ())]


def _near_in_chunk(sets: list[np.ndarray], keys: np.ndarray, threshold: float, earlier) -> list[int]:
    """For each document of a chunk, in order: the chunk index of an earlier kept document of the chunk it
    duplicates, ``len(sets)`` for a kept document of an earlier chunk (``earlier(i)`` yields their shingle
    sets), or -1 to keep it."""
    buckets: dict[int, list[int]] = {}
    result: list[int] = []
    for i, doc_keys in enumerate(keys.tolist()):
        dup_of, seen = -1, set()
        for key in doc_keys:
            for j in buckets.get(key, ()):
                if j not in seen:
                    seen.add(j)
                    if jaccard(sets[i], sets[j]) >= threshold:
                        dup_of = j
                        break
            if dup_of >= 0:
                break
        if dup_of < 0 and any(jaccard(sets[i], other) >= threshold for other in earlier(i)):
            dup_of = len(sets)
        result.append(dup_of)
        if dup_of < 0:
            for key in doc_keys:
                buckets.setdefault(key, []).append(i)
    return result


class KeyIndex:
    """uint64 keys → int64 ids (a key may have many), as sorted runs merged when one grows to the size of the
    one before it (a log-structured merge): 16 bytes a key, and look-ups for a whole chunk at once."""

    def __init__(self):
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, keys: np.ndarray, ids: np.ndarray) -> None:
        run = _sorted(keys, ids)
        while self.runs and len(self.runs[-1][0]) <= 2 * len(run[0]):
            k, v = self.runs.pop()
            run = _sorted(np.concatenate([k, run[0]]), np.concatenate([v, run[1]]))
        self.runs.append(run)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in ``keys``, id) of every match."""
        where, ids = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for k, v in self.runs:
            lo, hi = np.searchsorted(k, keys, "left"), np.searchsorted(k, keys, "right")
            counts = hi - lo
            total = int(counts.sum())
            if total:
                first = np.repeat(np.cumsum(counts) - counts, counts)
                where.append(np.repeat(np.arange(len(keys)), counts))
                ids.append(v[np.repeat(lo, counts) + np.arange(total) - first])
        return np.concatenate(where), np.concatenate(ids)


def _sorted(keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(keys, kind="stable")
    return keys[order], ids[order]


class ShingleFile:
    """The shingle sets of kept documents, appended to a scratch file and read back by document number."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.offsets = np.zeros(1, np.int64)  # document k: values offsets[k]:offsets[k + 1]

    def append(self, sets: list[np.ndarray]) -> None:
        if sets:
            os.write(self.fd, np.concatenate(sets).astype(np.uint32).tobytes())
            ends = self.offsets[-1] + np.cumsum([len(x) for x in sets])
            self.offsets = np.concatenate([self.offsets, ends])

    def read(self, k: int) -> np.ndarray:
        start, end = int(self.offsets[k]), int(self.offsets[k + 1])
        return np.frombuffer(os.pread(self.fd, 4 * (end - start), 4 * start), dtype=np.uint32)

    def close(self) -> None:
        os.close(self.fd)


class Dedup:
    """Exact and near dedup over chunks of documents in input order, with the same decisions as one pass
    over all of them: a document is an exact duplicate of any earlier one that was not itself an exact
    duplicate, and a near duplicate of an earlier kept one."""

    def __init__(self, near: NearDedup | None, scratch: str | None):
        self.near = near
        self.exact = KeyIndex()
        self.bands = KeyIndex()
        self.shingles = ShingleFile(os.path.join(scratch, "shingles")) if near else None
        self.kept = 0  # kept documents so far (near dedup's document numbers)

    def chunk(self, n: int, exact: np.ndarray | None, sets: list[np.ndarray] | None,
              keys: np.ndarray | None) -> tuple[np.ndarray, int, int]:
        """The keep mask of a chunk of ``n`` documents and its exact and near duplicate counts. ``exact``: exact
        keys (uint64; None: no exact dedup); ``sets``/``keys``: shingle sets and band keys (None: no near dedup)."""
        keep = np.ones(n, bool)
        if exact is not None and n:
            _, first = np.unique(exact, return_index=True)
            earlier_in_chunk = np.ones(n, bool)
            earlier_in_chunk[first] = False
            seen = np.zeros(n, bool)
            seen[self.exact.lookup(exact)[0]] = True
            keep = ~(seen | earlier_in_chunk)
            self.exact.add(exact[keep], np.zeros(int(keep.sum()), np.int64))
        exact_dups = n - int(keep.sum())
        if self.near is None or not keep.any():
            return keep, exact_dups, 0
        idx = np.flatnonzero(keep)
        chunk_sets, chunk_keys = [sets[i] for i in idx], keys[idx]
        where, ids = self.bands.lookup(chunk_keys.ravel())
        candidates: dict[int, list[int]] = {}
        for doc, j in zip((where // chunk_keys.shape[1]).tolist(), ids.tolist()):
            candidates.setdefault(doc, []).append(j)
        found = _near_in_chunk(chunk_sets, chunk_keys, self.near.threshold, lambda i: (
            self.shingles.read(j) for j in dict.fromkeys(candidates.get(i, ()))))
        near_kept = np.array([f < 0 for f in found], bool)
        keep[idx[~near_kept]] = False
        numbers = self.kept + np.arange(int(near_kept.sum()))
        self.bands.add(chunk_keys[near_kept].ravel(), np.repeat(numbers, chunk_keys.shape[1]))
        self.shingles.append([s for s, k in zip(chunk_sets, near_kept) if k])
        self.kept += len(numbers)
        return keep, exact_dups, int((~near_kept).sum())

    def close(self) -> None:
        if self.shingles:
            self.shingles.close()


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)
