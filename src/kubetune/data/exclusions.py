"""What preparation keeps out of training besides duplicates within the data: examples like the golden
set's (``evaluation.goldenSet``, which must stay unseen for its scores to mean anything) and examples an
earlier job trained on (``preprocessing.dedup.index``, so a schedule's runs learn from new data only).
"""

from __future__ import annotations

import numpy as np

from kubetune.data import reference
from kubetune.data.reference import Reference, Sketcher, Sketches


class Exclusions:
    """The golden set's examples and the index's, matched chunk by chunk; this job's kept sketches, to
    extend the index with its training examples once preparation has succeeded."""

    def __init__(self, job):
        spec = job.spec
        d = spec.preprocessing.dedup
        self.sketcher = Sketcher(d)
        self.golden = Reference(self.sketcher) if spec.evaluation.golden_set else None
        self.index, self.seen, self.stored = None, None, None
        self.counts = {**({"golden": 0} if spec.evaluation.golden_set else {}), **({"index": 0} if d.index else {})}
        self.kept: list[Sketches] = []
        if d.index:
            self.stored = reference.load(d.index, spec.storage, self.sketcher, spec.output.uri)
            self.seen = Reference(self.sketcher)
            self.seen.add(self.stored.sketches)

    @property
    def active(self) -> bool:
        return self.golden is not None or self.seen is not None

    def add_golden(self, sketches: Sketches) -> None:
        self.golden.add(sketches)

    def filter(self, sketches: Sketches, index: bool = True) -> np.ndarray:
        """The keep mask of a chunk of training/validation examples: not like a golden or (``index``) an indexed one."""
        keep = np.ones(len(sketches), bool)
        for name, ref in (("golden", self.golden), ("index", self.seen if index else None)):
            if ref is not None:
                hit = ref.matches(sketches) & keep
                self.counts[name] += int(hit.sum())
                keep &= ~hit
        return keep

    def keep(self, sketches: Sketches) -> None:
        """The sketches of the examples a chunk kept (after dedup), in the order they are written."""
        if self.stored is not None:
            self.kept.append(sketches)

    def describe(self, trained: np.ndarray) -> dict:
        """The index's part of the data report: where it is, its examples before and those this job adds."""
        return {"uri": self.stored.uri, "examples_before": len(self.stored.sketches), "added": int(trained.sum())}

    def save(self, trained: np.ndarray, job) -> dict | None:
        """Add the training examples (``trained``: a mask over the kept examples) to the index."""
        if self.stored is None:
            return None
        spec = job.spec
        s = self.sketcher
        added = Sketches.join(self.kept, s.near.bands, len(s.near.a)).take(trained)
        size = reference.save(self.stored, added, spec.storage, s, spec.output.uri,
                              spec.preprocessing.dedup.index_max_examples)
        return {**self.describe(trained), "examples_after": size}
