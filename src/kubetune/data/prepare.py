"""The Preparing phase: raw files in, packed training shards and ``data_report.json`` out.

read → standardize → normalize → scrub PII → quality filters → exact dedup → near dedup →
split → tokenize with the chat template → drop too long → pack → write.

With ``training.objective: dpo`` the records are preference pairs (``kubetune.data.preference``): the
prompt and both answers are cleaned and scrubbed, the preferred answer goes through every quality filter
(the non-preferred one only must not be empty), dedup and the split see the prompt and both answers, and
each pair becomes two documents of a packed row, chosen then rejected.

Output layout under ``spec.output.uri``::

    data_report.json
    prepared/meta.json                      what the trainer needs to read the shards
    prepared/{train,validation}-NNNNN.parquet   input_ids, labels, doc_lens per row
    prepared/{train,validation}.jsonl       the cleaned conversations (for evaluation and review)
    tokenizer/                              the tokenizer, with its chat template
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from hashlib import blake2b, sha256
from pathlib import Path
from typing import Callable

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from kubetune.errors import KubetuneError
from kubetune.data.clean import clean_arguments, conversation_text, normalize_text, quality_problem
from kubetune.data.dedup import NearDedup, exact_key
from kubetune.data.formats import FormatError, standardize, tools_of
from kubetune.data.pii import Scrubber
from kubetune.data.preference import pair_rows, standardize_pair, tokenize_pairs
from kubetune.data.readers import BadLine, is_data_file, read_file
from kubetune.data.tokenize import IGNORE, packed_rows, tokenize_batch
from kubetune.models import load_tokenizer
from kubetune.spec import FineTuneJob
from kubetune.storage import Mirror, join, store_for

ROWS_PER_SHARD = 10_000
MAX_LISTED_BAD_LINES = 100
TOKENIZER_CHARS_PER_TOKEN = 8  # generous: byte-level BPE tokens average 2-4 characters


class PrepareError(KubetuneError):
    """Preparation cannot produce usable data; the message says why in one line."""


@dataclass
class Example:
    messages: list[dict]
    where: str  # "file:line", for the report only
    split: str | None  # "validation" when it came from the validation file
    text: str = ""
    tools: list | None = None  # the record's tools (OpenAI's shape), for tool-calling conversations
    rejected: dict | None = None  # objective dpo: the non-preferred answer; ``messages`` ends with the preferred one


@dataclass
class Report:
    examples_in: int = 0
    bad_lines: list[dict] = field(default_factory=list)
    bad_by_reason: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    skipped_files: list[str] = field(default_factory=list)
    input_lines: int = 0
    inputs: list[dict] = field(default_factory=list)  # each input file: uri, sha256, bytes (lineage)

    def bad(self, line: BadLine) -> None:
        reason = line.reason.split(":")[0].split(" (")[0]
        self.bad_by_reason[reason] += 1
        if len(self.bad_lines) < MAX_LISTED_BAD_LINES:
            self.bad_lines.append({"file": line.file, "line": line.line, "reason": line.reason})


def prepare(job: FineTuneJob, log: Callable[[str], None] = print) -> dict:
    """Run the whole preparation and return the data report (also written to the output)."""
    spec, pre = job.spec, job.spec.preprocessing
    started = time.monotonic()
    report = Report()
    scrubber = Scrubber(pre.pii.redact, pre.pii.allow)

    examples: list[Example] = []
    # Validation first, so a training example that repeats a validation one is the one dropped.
    sources = ([(spec.dataset.validation, "validation")] if spec.dataset.validation else []) + [(spec.dataset.train, None)]
    for uri, split in sources:
        examples += read_examples(job, uri, split, report, scrubber, log)
    bad = sum(report.bad_by_reason.values())
    report.pii = scrubber.counts
    _check_bad_fraction(report, bad, spec.dataset.max_bad_fraction)
    log(f"[prepare] {len(examples)} examples after cleaning, {bad} bad lines ({_elapsed(started)})")

    examples, dup = dedup(examples, pre, spec.training.seed, report)
    log(f"[prepare] duplicates: {dup['exact']} exact, {dup['near']} near; {len(examples)} left ({_elapsed(started)})")
    if not examples:
        raise PrepareError(f"no examples left after cleaning and dedup (dropped: {_reasons(report.dropped)})")

    train, valid = _split(examples, spec.dataset.validation_split, spec.training.seed, has_file=spec.dataset.validation is not None)
    # A fromConfig tokenizer is trained on these texts. BPE training time grows with the square of a
    # word's length (a 1 MB string without spaces took minutes), and text far beyond maxSeqLength
    # tokens is dropped as too long anyway, so each text is cut to a prefix that still covers it.
    cap = TOKENIZER_CHARS_PER_TOKEN * pre.max_seq_length
    tokenizer = load_tokenizer(job, texts=(_text(e)[:cap] for e in train))
    shards, tokens = {}, {}
    tokenize_and_pack = _tokenize_and_pack_pairs if spec.training.objective == "dpo" else _tokenize_and_pack
    for name, part in (("train", train), ("validation", valid)):
        shards[name], tokens[name] = tokenize_and_pack(tokenizer, part, pre.max_seq_length, pre.packing, report)
    if not shards["train"]:
        raise PrepareError(f"no training examples left after tokenization (dropped: {_reasons(report.dropped)})")
    log(f"[prepare] tokenized and packed ({_elapsed(started)})")

    data_report = {
        "examples_in": report.examples_in,
        "examples_out": {"train": tokens["train"]["examples"], "validation": tokens["validation"]["examples"]},
        "bad_lines": {"total": bad, "by_reason": dict(report.bad_by_reason), "input_lines": report.input_lines,
                      "first": report.bad_lines},
        "dropped": dict(report.dropped),
        "duplicates": dup,
        "pii_redacted": {t: report.pii.get(t, 0) for t in pre.pii.redact},
        "tokens": tokens,
        "skipped_files": report.skipped_files,
        "inputs": report.inputs,
        "max_seq_length": pre.max_seq_length,
        "packing": pre.packing,
        "objective": spec.training.objective,
        "seconds": round(time.monotonic() - started, 2),
    }
    _write_outputs(job, tokenizer, shards, {"train": train, "validation": valid}, data_report)
    log(f"[prepare] wrote {join(spec.output.uri, 'prepared/')} and data_report.json ({_elapsed(started)})")
    return data_report


def read_examples(job, uri, split, report, scrubber, log) -> list[Example]:
    spec = job.spec
    store = store_for(uri, spec.storage)
    files = store.list(uri)
    data_files = [f for f in files if is_data_file(f)]
    report.skipped_files += [f for f in files if not is_data_file(f)]
    if not data_files:
        raise PrepareError(f"{uri}: no data files (.jsonl, .jsonl.gz, .parquet, .csv) among {len(files)} file(s)")
    out = []
    for n, file_uri in enumerate(data_files, start=1):
        raw = store.read_bytes(file_uri)
        report.inputs.append({"uri": file_uri, "sha256": sha256(raw).hexdigest(), "bytes": len(raw)})
        for item in read_file(file_uri, raw):
            report.input_lines += 1
            if isinstance(item, BadLine):
                report.bad(item)
                continue
            try:
                if spec.training.objective == "dpo":  # a preference pair: messages end with the preferred answer
                    prompt, chosen, rejected, tools = standardize_pair(item.data)
                    messages = prompt + [chosen]
                else:
                    messages, rejected = standardize(item.data, spec.dataset.format), None
                    tools = tools_of(item.data, spec.dataset.format)
            except FormatError as e:
                report.bad(BadLine(item.file, item.line, str(e)))
                continue
            report.examples_in += 1
            example = _clean(messages, spec.preprocessing, scrubber, report)
            if example is not None and rejected is not None:
                rejected = _clean_rejected(example, rejected, spec.preprocessing, scrubber, report)
                example = example if rejected is not None else None
            if example is not None:
                out.append(Example(example, f"{item.file}:{item.line}", split, tools=tools, rejected=rejected))
        log(f"[prepare] read {n}/{len(data_files)} files of {uri} ({len(out)} examples so far)")
    return out


def _clean(messages: list[dict], pre, scrubber: Scrubber, report: Report) -> list[dict] | None:
    for m in messages:
        if m["content"] is not None:  # None: an assistant turn that only calls tools
            content = normalize_text(m["content"]) if pre.normalize else m["content"]
            m["content"] = scrubber.scrub(content)
        for call in m.get("tool_calls") or ():
            fn = call["function"]
            fn["arguments"] = clean_arguments(fn["arguments"], normalize_text if pre.normalize else None, scrubber.scrub)
    problem = quality_problem(messages, pre.min_chars, pre.max_repetition)
    if problem:
        report.dropped[problem] += 1
        return None
    return messages


def _clean_rejected(messages: list[dict], rejected: dict, pre, scrubber: Scrubber, report: Report) -> dict | None:
    """The non-preferred answer of a pair whose prompt and preferred answer passed ``_clean``: normalized and
    scrubbed the same way, but only dropped when empty or the same as the preferred one (no preference to
    learn). A short or repetitive non-preferred answer is often exactly what the pair teaches against."""
    if rejected["content"] is not None:
        content = normalize_text(rejected["content"]) if pre.normalize else rejected["content"]
        rejected["content"] = scrubber.scrub(content)
    for call in rejected.get("tool_calls") or ():
        fn = call["function"]
        fn["arguments"] = clean_arguments(fn["arguments"], normalize_text if pre.normalize else None, scrubber.scrub)
    problem = quality_problem([rejected], 0, 1.0)
    if problem is None and conversation_text([rejected]) == conversation_text(messages[-1:]):
        problem = "identical_answers"
    if problem:
        report.dropped[problem] += 1
        return None
    return rejected


def _text(e: Example) -> str:
    """The text of an example that dedup, the split and a trained tokenizer see: a pair's both answers."""
    return conversation_text(e.messages + ([e.rejected] if e.rejected is not None else []))


def _check_bad_fraction(report: Report, bad: int, limit: float) -> None:
    if not report.input_lines or bad / report.input_lines <= limit:
        return
    first = report.bad_lines[0]
    raise PrepareError(
        f"{bad} of {report.input_lines} input lines are malformed ({bad / report.input_lines:.1%}, "
        f"limit dataset.maxBadFraction={limit:.1%}); first: {first['file']}:{first['line']}: {first['reason']}"
    )


def dedup(examples: list[Example], pre, seed: int, report: Report) -> tuple[list[Example], dict]:
    dup = {"exact": 0, "near": 0}
    for e in examples:
        e.text = _text(e)
    if pre.dedup.exact:
        seen: set[bytes] = set()
        kept = []
        for e in examples:
            key = exact_key(e.text)
            if key in seen:
                dup["exact"] += 1
            else:
                seen.add(key)
                kept.append(e)
        examples = kept
    if pre.dedup.near and examples:
        d = pre.dedup
        found = NearDedup(d.near_threshold, d.ngram, d.num_perm, seed).find([e.text for e in examples])
        dup["near"] = sum(j is not None for j in found)
        examples = [e for e, j in zip(examples, found) if j is None]
    report.dropped.update({"exact_duplicate": dup["exact"], "near_duplicate": dup["near"]})
    return examples, dup


def _split(examples: list[Example], fraction: float, seed: int, has_file: bool) -> tuple[list[Example], list[Example]]:
    """Deterministic: an example's side depends only on its content and the seed, not on order."""
    if has_file:
        return [e for e in examples if e.split is None], [e for e in examples if e.split == "validation"]

    def draw(e: Example) -> float:
        digest = blake2b(f"{seed}\0{e.text}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    draws = [draw(e) for e in examples]
    valid_idx = {i for i, u in enumerate(draws) if u < fraction}
    if not valid_idx and len(examples) > 1:
        valid_idx = {min(range(len(draws)), key=draws.__getitem__)}
    return ([e for i, e in enumerate(examples) if i not in valid_idx],
            [e for i, e in enumerate(examples) if i in valid_idx])


def _tokenize_and_pack(tokenizer, examples: list[Example], max_len: int, packing: bool, report: Report):
    kept = []
    # the tokenizer fails on an empty batch (IndexError), e.g. no validation example from one example
    tokenized = tokenize_batch(tokenizer, [e.messages for e in examples], [e.tools for e in examples]) if examples else []
    for e, t in zip(examples, tokenized):
        if t is None:
            report.dropped["template_mismatch"] += 1
        elif len(t.input_ids) > max_len:
            report.dropped["too_long"] += 1
        elif all(label == IGNORE for label in t.labels[1:]):
            report.dropped["no_trained_tokens"] += 1
        else:
            kept.append((e, t))
    examples[:] = [e for e, _ in kept]  # the jsonl written later matches the shards
    rows = packed_rows([t for _, t in kept], max_len, packing)
    lengths = [len(t.input_ids) for _, t in kept]
    total = sum(lengths)
    stats = {
        "examples": len(kept),
        "tokens": total,
        "trained_tokens": sum(sum(1 for x in t.labels[1:] if x != IGNORE) for _, t in kept),
        "mean_length": round(total / len(kept), 1) if kept else 0,
        "max_length": max(lengths, default=0),
        "rows": len(rows),
        "packing_efficiency": round(total / (len(rows) * max_len), 3) if rows and packing else None,
    }
    return rows, stats


def _tokenize_and_pack_pairs(tokenizer, examples: list[Example], max_len: int, packing: bool, report: Report):
    """Preference pairs: both sides tokenized, pairs packed whole (``kubetune.data.preference``)."""
    pairs = [(e.messages[:-1], e.messages[-1], e.rejected, e.tools) for e in examples]
    kept, sides = tokenize_pairs(tokenizer, pairs, max_len, report.dropped)
    examples[:] = [examples[i] for i in kept]  # the jsonl written later matches the shards
    rows = pair_rows(sides, max_len, packing)
    lengths = [len(t.input_ids) for pair in sides for t in pair]
    total = sum(lengths)
    stats = {
        "examples": len(kept),  # pairs
        "tokens": total,
        "trained_tokens": sum(sum(1 for x in t.labels[1:] if x != IGNORE) for pair in sides for t in pair),
        "mean_length": round(total / len(lengths), 1) if lengths else 0,
        "max_length": max(lengths, default=0),
        "rows": len(rows),
        "packing_efficiency": round(total / (len(rows) * 2 * max_len), 3) if rows and packing else None,
    }
    return rows, stats


def _write_outputs(job: FineTuneJob, tokenizer, shards: dict, splits: dict, data_report: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="kubetune-prepare-") as tmp:
        out = Mirror(job.spec.output.uri, Path(tmp), job.spec.storage)
        root = out.path
        prepared = root / "prepared"
        prepared.mkdir(parents=True, exist_ok=True)
        meta = {"max_seq_length": job.spec.preprocessing.max_seq_length, "packing": job.spec.preprocessing.packing,
                "tokenizer": "tokenizer", "vocab_size": len(tokenizer), "objective": job.spec.training.objective}
        for name, rows in shards.items():
            files = []
            for k in range(0, max(len(rows), 1), ROWS_PER_SHARD):
                fname = f"{name}-{k // ROWS_PER_SHARD:05d}.parquet"
                pq.write_table(_table(rows[k : k + ROWS_PER_SHARD]), prepared / fname)
                files.append(f"prepared/{fname}")
            meta[name] = {"rows": len(rows), "files": files}
            with open(prepared / f"{name}.jsonl", "wb") as f:
                for e in splits[name]:
                    f.write(orjson.dumps({"messages": e.messages, **({"tools": e.tools} if e.tools else {}),
                                          **({"rejected": e.rejected} if e.rejected is not None else {})}) + b"\n")
        (prepared / "meta.json").write_text(json.dumps(meta, indent=2))
        tokenizer.save_pretrained(root / "tokenizer")
        (root / "data_report.json").write_text(json.dumps(data_report, indent=2))
        out.publish()


def _table(rows: list[dict]) -> pa.Table:
    ints = pa.list_(pa.int32())
    return pa.table(
        {k: pa.array([r[k] for r in rows], type=ints) for k in ("input_ids", "labels", "doc_lens")}
    )


def _elapsed(started: float) -> str:
    return f"{time.monotonic() - started:.1f}s"


def _reasons(counts: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "nothing"


def summary(report: dict) -> str:
    """A short human-readable summary of a data report."""
    t, v = report["tokens"]["train"], report["tokens"]["validation"]
    lines = [
        f"examples in: {report['examples_in']}  →  train {report['examples_out']['train']}, "
        f"validation {report['examples_out']['validation']}",
        f"bad lines: {report['bad_lines']['total']} of {report['bad_lines']['input_lines']}"
        + (f" ({', '.join(f'{k} {n}' for k, n in report['bad_lines']['by_reason'].items())})" if report['bad_lines']['total'] else ""),
        f"dropped: {', '.join(f'{k} {n}' for k, n in report['dropped'].items() if n) or 'nothing'}",
        f"duplicates: {report['duplicates']['exact']} exact, {report['duplicates']['near']} near",
        f"PII redacted: {', '.join(f'{k} {n}' for k, n in report['pii_redacted'].items() if n) or 'none found'}",
        f"tokens: train {t['tokens']} ({t['trained_tokens']} trained) in {t['rows']} rows, "
        f"validation {v['tokens']} in {v['rows']} rows; mean length {t['mean_length']}, max {t['max_length']}"
        + (f"; packing efficiency {t['packing_efficiency']:.0%}" if t["packing_efficiency"] else ""),
    ]
    return "\n".join(lines)
