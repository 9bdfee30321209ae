"""Examples kept out of training: a golden set's, and those earlier jobs trained on (the dedup index).

Both are a ``Reference``: exact keys and MinHash sketches, LSH band keys to find candidates and b-bit
signatures (16 bits a permutation) to check them: a candidate is a near duplicate when the share of equal
signature values, an estimate of Jaccard similarity (a chance collision adds 1/65536), reaches the
threshold. Sketches use a fixed seed, not training.seed, so an index written by one job serves the next.
Per example: 8 bytes of exact key, 8 a band and 2 a permutation (about 0.4 KB at the defaults).

The index on storage (``preprocessing.dedup.index``, a folder) is generations ``gen-NNNNNN/index.npz`` and
``current.json`` naming the current one and its parent. A generation is written whole, then current.json
is replaced (one small object: a reader sees the old or the new one), then generations older than the
parent are deleted, so a crash at any point leaves a readable index. A job that finds itself the writer
of the current generation (its prepare is being retried) starts again from the parent, so a retry does
not drop its own examples as seen before.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from kubetune.data.dedup import KeyIndex, NearDedup, exact_key
from kubetune.errors import KubetuneError
from kubetune.storage import join, store_for

SKETCH_SEED = 42  # training.seed's default: a job that keeps it computes its MinHash signatures once
POINTER = "current.json"


class IndexUnusable(KubetuneError):
    """The dedup index cannot be used; the message names preprocessing.dedup.index."""


@dataclass
class Sketches:
    """The fingerprints of a list of examples, row i for example i."""

    exact: np.ndarray  # (n,) uint64
    bands: np.ndarray  # (n, bands) uint64
    sigs: np.ndarray  # (n, num_perm) uint16

    def __len__(self) -> int:
        return len(self.exact)

    def take(self, mask: np.ndarray) -> Sketches:
        return Sketches(self.exact[mask], self.bands[mask], self.sigs[mask])

    @staticmethod
    def join(parts: list[Sketches], bands: int, perms: int) -> Sketches:
        return Sketches(np.concatenate([np.zeros(0, np.uint64)] + [p.exact for p in parts]),
                        np.concatenate([np.zeros((0, bands), np.uint64)] + [p.bands for p in parts]),
                        np.concatenate([np.zeros((0, perms), np.uint16)] + [p.sigs for p in parts]))


class Sketcher:
    """Sketches of texts for the job's dedup settings (ngram, numPerm, nearThreshold); picklable."""

    def __init__(self, dedup):
        self.near = NearDedup(dedup.near_threshold, dedup.ngram, dedup.num_perm, SKETCH_SEED)
        self.params = {"ngram": dedup.ngram, "numPerm": dedup.num_perm, "nearThreshold": dedup.near_threshold}

    def empty(self) -> Sketches:
        return Sketches.join([], self.near.bands, len(self.near.a))

    def __call__(self, texts: list[str], sets: list[np.ndarray] | None = None, sigs: np.ndarray | None = None,
                 exact: np.ndarray | None = None) -> Sketches:
        """``sets``, ``sigs`` (with SKETCH_SEED) and ``exact``: the texts' shingle sets, signatures and exact keys,
        when already computed."""
        if not texts:
            return self.empty()
        if sigs is None:
            sigs = self.near.signatures(sets if sets is not None else [self.near.shingles(t) for t in texts])
        if exact is None:
            exact = np.frombuffer(b"".join(exact_key(t)[:8] for t in texts), np.uint64)
        return Sketches(exact,
                        self.near.band_keys(sigs), (sigs & np.uint64(0xFFFF)).astype(np.uint16))


class Reference:
    """Examples to match new ones against: exact keys, band keys → example, signatures."""

    def __init__(self, sketcher: Sketcher):
        self.threshold = sketcher.near.threshold
        self.exact = np.zeros(0, np.uint64)  # sorted
        self.bands = KeyIndex()
        self.sigs = sketcher.empty().sigs
        self.count = 0

    def add(self, s: Sketches) -> None:
        ids = self.count + np.arange(len(s), dtype=np.int64)
        self.exact = np.unique(np.concatenate([self.exact, s.exact]))
        if len(s):
            self.bands.add(s.bands.ravel(), np.repeat(ids, s.bands.shape[1]))
        self.sigs = np.concatenate([self.sigs, s.sigs])
        self.count += len(s)

    def matches(self, s: Sketches) -> np.ndarray:
        """Per example: an exact or near duplicate of a reference example."""
        hit = np.isin(s.exact, self.exact)
        if not self.count or not len(s):
            return hit
        where, ids = self.bands.lookup(s.bands.ravel())
        doc = where // s.bands.shape[1]
        similar = (self.sigs[ids] == s.sigs[doc]).mean(axis=1) >= self.threshold
        hit[doc[similar]] = True
        return hit


@dataclass
class StoredIndex:
    """The index as loaded: its examples' sketches (oldest first) and where it came from."""

    uri: str
    sketches: Sketches
    generation: int  # the generation this job builds on (0: none yet)
    file: str | None
    head: int = 0  # the current generation (a new one is numbered after it, never reusing a name)


def _pointer(store, uri: str) -> dict | None:
    if not store.exists(join(uri, POINTER)):
        return None
    return json.loads(store.read_bytes(join(uri, POINTER)))


def load(uri: str, storage, sketcher: Sketcher, writer: str) -> StoredIndex:
    """The index at ``uri`` (empty when there is none yet); ``writer`` is this job's output location."""
    store = store_for(uri, storage)
    pointer = _pointer(store, uri)
    if pointer is None:
        return StoredIndex(uri, sketcher.empty(), 0, None)
    if pointer.get("params") != sketcher.params:
        raise IndexUnusable(f"preprocessing.dedup.index: {uri} was made with {pointer.get('params')}, this job's "
                          f"preprocessing.dedup is {sketcher.params}; keep those settings or use a new index")
    head = generation = pointer["generation"]
    file = pointer["file"]
    if pointer.get("writer") == writer:  # this job wrote it: a retried prepare starts from the parent
        generation, file = pointer.get("parentGeneration", 0), pointer.get("parent")
    if file is None:
        return StoredIndex(uri, sketcher.empty(), generation, None, head)
    with np.load(io.BytesIO(store.read_bytes(join(uri, file)))) as z:
        return StoredIndex(uri, Sketches(z["exact"], z["bands"], z["sigs"]), generation, file, head)


def save(index: StoredIndex, added: Sketches, storage, sketcher: Sketcher, writer: str, max_examples: int) -> int:
    """A new generation: the index's examples and ``added``, the newest ``max_examples``. Returns its size."""
    store = store_for(index.uri, storage)
    merged = Sketches.join([index.sketches, added], sketcher.near.bands, len(sketcher.near.a))
    keep = np.arange(len(merged)) >= len(merged) - max_examples
    merged = merged.take(keep)
    generation = index.head + 1
    file = f"gen-{generation:06d}/index.npz"  # a folder per generation: what storage deletes is a prefix
    buf = io.BytesIO()
    np.savez(buf, exact=merged.exact, bands=merged.bands, sigs=merged.sigs)
    store.write_bytes(join(index.uri, file), buf.getvalue())
    old = _pointer(store, index.uri)
    store.write_bytes(join(index.uri, POINTER), json.dumps({
        "generation": generation, "file": file, "parentGeneration": index.generation, "parent": index.file,
        "examples": len(merged), "params": sketcher.params, "writer": writer}).encode())
    for stale in {(old or {}).get("parent"), (old or {}).get("file")} - {file, index.file, None}:
        store.delete_prefix(join(index.uri, stale.split("/")[0]))
    return len(merged)
