"""Preparation's first pass, per chunk of records (run in worker processes): parse, standardize, normalize,
scrub PII, apply the quality filters, and fingerprint what is left for dedup and the split.

A chunk comes back as ``Cleaned``: counts for the report, each surviving example as one JSON line (the
shape of ``prepared/*.jsonl``), and compact arrays (exact keys, split draws, shingles and MinHash band
keys), so the preparing process only decides and writes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from hashlib import blake2b

import numpy as np
import orjson

from kubetune.data.clean import clean_arguments, conversation_text, normalize_text, quality_problem
from kubetune.data.dedup import NearDedup, exact_key
from kubetune.data.formats import FormatError, standardize, tools_of
from kubetune.data.pii import Scrubber
from kubetune.data.preference import standardize_pair
from kubetune.data.prompts import prompt_problem, standardize_prompt
from kubetune.data.readers import BadLine, RawLine, Record, parse_line
from kubetune.data.reference import SKETCH_SEED, Sketcher, Sketches


@dataclass
class Cleaned:
    lines: int = 0  # input lines seen (records and bad lines)
    examples_in: int = 0  # records in a known format
    bad: list[BadLine] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    examples: list[bytes] = field(default_factory=list)  # each survivor: {"messages", "tools"?, "rejected"?}
    line_numbers: list[int] = field(default_factory=list)  # each survivor's line in its file
    exact: np.ndarray | None = None  # uint64 exact-dedup key per survivor
    draws: np.ndarray | None = None  # uint64 split draw per survivor (a function of content and seed)
    shingles: np.ndarray | None = None  # near dedup: every survivor's shingle set, concatenated (uint32)
    shingle_counts: np.ndarray | None = None
    band_keys: np.ndarray | None = None  # (survivors, bands) uint64
    sketches: Sketches | None = None  # with a golden set or a dedup index: to match against them

    def shingle_sets(self) -> list[np.ndarray]:
        return np.split(self.shingles, np.cumsum(self.shingle_counts)[:-1]) if len(self.shingle_counts) else []


class Cleaner:
    """The first pass for one job; picklable, called once per chunk."""

    def __init__(self, job):
        spec = job.spec
        self.pre, self.seed = spec.preprocessing, spec.training.seed
        self.fmt, self.pairs = spec.dataset.format, spec.training.objective == "dpo"
        self.prompts = spec.training.objective == "rft"  # prompts with their items (kubetune.data.prompts)
        self.fields = referenced_fields(spec.training)
        self.scrubber = Scrubber(self.pre.pii.redact, self.pre.pii.allow)
        d = self.pre.dedup
        self.near = NearDedup(d.near_threshold, d.ngram, d.num_perm, self.seed) if d.near else None
        self.sketcher = Sketcher(d) if d.index or spec.evaluation.golden_set else None

    def __call__(self, items: list[RawLine | Record | BadLine]) -> Cleaned:
        out, texts = Cleaned(lines=len(items)), []
        self.scrubber.counts = out.pii
        for item in items:
            if isinstance(item, RawLine):
                item = parse_line(item)
            if isinstance(item, BadLine):
                out.bad.append(item)
                continue
            extra = {}
            try:
                if self.prompts:
                    messages, tools, item_fields = standardize_prompt(item.data, f"{item.file}:{item.line}",
                                                                      self.fields)
                    rejected, extra = None, {"item": item_fields}
                elif self.pairs:  # a preference pair: messages end with the preferred answer
                    prompt, chosen, rejected, tools = standardize_pair(item.data)
                    messages = prompt + [chosen]
                else:
                    messages, rejected = standardize(item.data, self.fmt), None
                    tools = tools_of(item.data, self.fmt)
            except FormatError as e:
                out.bad.append(BadLine(item.file, item.line, str(e)))
                continue
            out.examples_in += 1
            messages = self._clean(messages, out.dropped)
            if messages is not None and rejected is not None:
                rejected = self._clean_rejected(messages, rejected, out.dropped)
                messages = messages if rejected is not None else None
            if messages is not None:
                out.examples.append(orjson.dumps({"messages": messages, **({"tools": tools} if tools else {}),
                                                  **({"rejected": rejected} if rejected is not None else {}),
                                                  **extra}))
                out.line_numbers.append(item.line)
                texts.append(text_of(messages, rejected))
        self._fingerprint(out, texts)
        return out

    def _fingerprint(self, out: Cleaned, texts: list[str]) -> None:
        out.draws = np.array([int.from_bytes(blake2b(f"{self.seed}\0{t}".encode("utf-8", "surrogatepass"),
                                                     digest_size=8).digest(), "big") for t in texts], np.uint64)
        if self.pre.dedup.exact:
            out.exact = np.frombuffer(b"".join(exact_key(t)[:8] for t in texts), np.uint64)
        sets, sigs = None, None
        if self.near is not None:
            sets = [self.near.shingles(t) for t in texts]
            out.shingle_counts = np.array([len(s) for s in sets], np.int64)
            out.shingles = np.concatenate(sets) if sets else np.zeros(0, np.uint32)
            sigs = self.near.signatures(sets) if sets else None
            out.band_keys = self.near.band_keys(sigs) if sets else np.zeros((0, self.near.bands), np.uint64)
        if self.sketcher is not None:  # the signatures serve both when made with the same seed
            out.sketches = self.sketcher(texts, sets, sigs if self.seed == SKETCH_SEED else None, out.exact)

    def _clean(self, messages: list[dict], dropped: Counter) -> list[dict] | None:
        for m in messages:
            if m["content"] is not None:  # None: an assistant turn that only calls tools
                m["content"] = self.scrubber.scrub(self._normalize(m["content"]))
            self._clean_calls(m)
        problem = prompt_problem(messages) if self.prompts else quality_problem(messages, self.pre.min_chars,
                                                                                 self.pre.max_repetition)
        if problem:
            dropped[problem] += 1
            return None
        return messages

    def _clean_rejected(self, messages: list[dict], rejected: dict, dropped: Counter) -> dict | None:
        """The non-preferred answer of a pair whose prompt and preferred answer passed ``_clean``: normalized and
        scrubbed the same way, but only dropped when empty or the same as the preferred one (no preference to
        learn). A short or repetitive non-preferred answer is often exactly what the pair teaches against."""
        if rejected["content"] is not None:
            rejected["content"] = self.scrubber.scrub(self._normalize(rejected["content"]))
        self._clean_calls(rejected)
        problem = quality_problem([rejected], 0, 1.0)
        if problem is None and conversation_text([rejected]) == conversation_text(messages[-1:]):
            problem = "identical_answers"
        if problem:
            dropped[problem] += 1
            return None
        return rejected

    def _normalize(self, text: str) -> str:
        return normalize_text(text) if self.pre.normalize else text

    def _clean_calls(self, m: dict) -> None:
        for call in m.get("tool_calls") or ():
            fn = call["function"]
            fn["arguments"] = clean_arguments(fn["arguments"], normalize_text if self.pre.normalize else None,
                                              self.scrubber.scrub)


def referenced_fields(training) -> set[str]:
    """The item fields objective rft's grader reads (none for other objectives)."""
    if training.objective != "rft":
        return set()
    from kubetune.graders import referenced_item_fields

    return referenced_item_fields(training.rft.grader)


def text_of(messages: list[dict], rejected: dict | None) -> str:
    """The text that dedup, the split and a trained tokenizer see: a pair's both answers."""
    return conversation_text(messages + ([rejected] if rejected is not None else []))
