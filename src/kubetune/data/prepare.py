"""The Preparing phase: raw files in, packed training shards and ``data_report.json`` out.

read → standardize → normalize → scrub PII → quality filters → exact dedup → near dedup →
split → tokenize with the chat template → drop too long → pack → write.

It streams, in two passes over chunks of records, so memory is bounded by the chunk and the packing
window, not by the dataset, and the per-record work runs on every core (``kubetune.data.parallel``):

1. ``records.Cleaner`` (workers) parses, cleans, scrubs and fingerprints each chunk; this process decides
   exact and near duplicates (``dedup.Dedup``: compact arrays and a scratch file of shingles) and appends
   the survivors to a scratch file of examples. The split is a pure function of content and seed.
2. A fromConfig tokenizer is trained on the training examples; ``shards.Tokenizing`` (workers) renders and
   tokenizes each chunk of kept examples; this process packs and writes the shards as rows fill.

Chunks come back in input order, so one process or many give the same shards, report and split.

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
import os
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import orjson

from kubetune.data.dedup import Dedup, NearDedup
from kubetune.data.exclusions import Exclusions
from kubetune.data.parallel import cpus, ordered_map
from kubetune.data.readers import BadLine, is_data_file, iter_file
from kubetune.data.records import Cleaned, Cleaner, text_of
from kubetune.data.prompt_shards import PromptWriter, TokenizingPrompts
from kubetune.data.shards import ShardWriter, Tokenizing
from kubetune import newdata
from kubetune.errors import KubetuneError
from kubetune.models import load_tokenizer
from kubetune.spec import FineTuneJob
from kubetune.storage import Mirror, NotFound, Store, is_s3, join, store_for

MAX_LISTED_BAD_LINES = 100
REPLAY = "replay"  # the split of replayed records: trained on, like train, but not checked against the dedup index
TOKENIZER_CHARS_PER_TOKEN = 8  # generous: byte-level BPE tokens average 2-4 characters
TOKENIZER_TRAINING_CHARS = 10_000_000
CHUNK = 2000  # records per task of the first pass
TOKENIZE_CHUNK = 500  # examples per task of the second pass
PARALLEL_BYTES = 8 << 20  # smaller inputs are prepared in this process: starting workers costs more
PROGRESS_SECONDS = 10


class PrepareError(KubetuneError):
    """Preparation cannot produce usable data; the message says why in one line."""


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
    duplicates: dict = field(default_factory=lambda: {"exact": 0, "near": 0})
    replayed: int = 0  # records taken from a data manifest's replay files
    manifest: dict | None = None  # a data manifest's summary (dataset.train names one)

    def bad(self, line: BadLine) -> None:
        reason = line.reason.split(":")[0].split(" (")[0]
        self.bad_by_reason[reason] += 1
        if len(self.bad_lines) < MAX_LISTED_BAD_LINES:
            self.bad_lines.append({"file": line.file, "line": line.line, "reason": line.reason})

    def add(self, chunk: Cleaned) -> None:
        self.input_lines += chunk.lines
        self.examples_in += chunk.examples_in
        for line in chunk.bad:
            self.bad(line)
        self.dropped.update(chunk.dropped)
        self.pii.update(chunk.pii)


@dataclass
class Input:
    uri: str
    path: Path  # the local file (downloaded first when remote)
    split: str | None  # "validation" for the validation file's records, "golden" for evaluation.goldenSet's,
    # REPLAY for a data manifest's replay files (training data the dedup index holds already)
    size: int
    keep: frozenset[int] | None = None  # a replay file's records to take (their ordinals); None: all


@dataclass
class Kept:
    """The first pass's result: the surviving examples, one JSON line each, in a scratch file."""

    path: Path
    validation: np.ndarray  # bool per example
    count: int
    line_numbers: np.ndarray  # each example's line in its input file (for benchmarks and debugging)
    golden: np.ndarray | None = None  # bool per example: evaluation.goldenSet's (a split of its own)

    def lines(self) -> Iterator[tuple[str, bytes]]:
        """Each example's split (train, validation or golden) and line."""
        golden = self.golden if self.golden is not None else np.zeros(len(self.validation), bool)
        with open(self.path, "rb") as f:
            for is_validation, is_golden, line in zip(self.validation.tolist(), golden.tolist(), f):
                yield "golden" if is_golden else ("validation" if is_validation else "train"), line.rstrip(b"\n")


def prepare(job: FineTuneJob, log: Callable[[str], None] = print) -> dict:
    """Run the whole preparation and return the data report (also written to the output)."""
    spec, pre = job.spec, job.spec.preprocessing
    started = time.monotonic()
    report = Report()
    with tempfile.TemporaryDirectory(prefix="kubetune-prepare-") as tmp:
        scratch = Path(tmp)
        inputs = locate_inputs(job, scratch, report)
        workers = _workers(sum(i.size for i in inputs))
        exclusions = Exclusions(job)
        kept = clean_and_dedup(job, inputs, scratch, report, workers, log, exclusions)
        _check_bad_fraction(report, sum(report.bad_by_reason.values()), spec.dataset.max_bad_fraction)
        if spec.evaluation.golden_set and not kept.golden.any():
            raise PrepareError(f"evaluation.goldenSet: no examples left after cleaning (dropped: {_reasons(report.dropped)})")
        if not kept.count:
            raise PrepareError(f"no examples left after cleaning and dedup (dropped: {_reasons(report.dropped)})")
        tokenizer = load_tokenizer(job, texts=_tokenizer_texts(kept, TOKENIZER_CHARS_PER_TOKEN * pre.max_seq_length))
        log(f"[prepare] tokenizer ready ({_elapsed(started)})")
        out = Mirror(spec.output.uri, scratch / "out", spec.storage)
        prepared = out.path / "prepared"
        prepared.mkdir(parents=True, exist_ok=True)
        tokens = tokenize_and_write(job, tokenizer, kept, prepared, report, workers, log)
        if not tokens["train"]["rows"]:
            raise PrepareError(f"no training examples left after tokenization (dropped: {_reasons(report.dropped)})")
        log(f"[prepare] tokenized and packed ({_elapsed(started)})")
        trained = ~kept.validation & ~kept.golden
        data_report = {
            "examples_in": report.examples_in,
            "examples_out": {name: t["examples"] for name, t in tokens.items()},
            "bad_lines": {"total": sum(report.bad_by_reason.values()), "by_reason": dict(report.bad_by_reason),
                          "input_lines": report.input_lines, "first": report.bad_lines},
            "dropped": dict(report.dropped),
            "duplicates": report.duplicates,
            "pii_redacted": {t: report.pii.get(t, 0) for t in pre.pii.redact},
            "tokens": {name: {k: v for k, v in t.items() if k != "files"} for name, t in tokens.items()},
            "skipped_files": report.skipped_files,
            "inputs": report.inputs,
            "replayed": report.replayed,
            **({"manifest": report.manifest} if report.manifest else {}),
            "max_seq_length": pre.max_seq_length,
            "packing": pre.packing,
            "objective": spec.training.objective,
            "seconds": round(time.monotonic() - started, 2),
            **({"dedup_index": exclusions.describe(trained)} if exclusions.stored else {}),
            **({"rft": rft_summary(job, prepared)} if spec.training.objective == "rft" else {}),
        }
        meta = {"max_seq_length": pre.max_seq_length, "packing": pre.packing, "tokenizer": "tokenizer",
                "vocab_size": len(tokenizer), "objective": spec.training.objective,
                **{name: {"rows": t["rows"], "files": t["files"]} for name, t in tokens.items()}}
        (prepared / "meta.json").write_text(json.dumps(meta, indent=2))
        tokenizer.save_pretrained(out.path / "tokenizer")
        (out.path / "data_report.json").write_text(json.dumps(data_report, indent=2))
        out.publish()
        # Only once the prepared data is out: a failed preparation must not mark its examples as trained on.
        index = exclusions.save(trained, job)
    if index:
        log(f"[prepare] dedup index {index['uri']}: {index['added']} examples added, {index['examples_after']} in all")
    log(f"[prepare] wrote {join(spec.output.uri, 'prepared/')} and data_report.json ({_elapsed(started)})")
    return data_report


def locate_inputs(job: FineTuneJob, scratch: Path, report: Report) -> list[Input]:
    """The data files, the golden set's first, then validation (so a training example that repeats a validation
    one is the one dropped), each local (s3:// objects downloaded into ``scratch``) and hashed for lineage."""
    spec = job.spec
    sources = ([(spec.evaluation.golden_set, "golden")] if spec.evaluation.golden_set else []) + (
        [(spec.dataset.validation, "validation")] if spec.dataset.validation else []) + [(spec.dataset.train, None)]
    inputs = []
    for uri, split in sources:
        store = store_for(uri, spec.storage)
        if newdata.is_manifest(uri):
            data_files = _manifest_files(store, uri, report)
        else:
            files = store.list(uri)
            data_files = [(f, None) for f in files if is_data_file(f)]
            report.skipped_files += [f for f in files if not is_data_file(f)]
            if not data_files:
                field = {"golden": "evaluation.goldenSet", "validation": "dataset.validation"}.get(split, "dataset.train")
                raise PrepareError(f"{field}: {uri}: no data files (.jsonl, .jsonl.gz, .parquet, .csv) among "
                                   f"{len(files)} file(s)")
        for file_uri, keep in data_files:
            path = Path(file_uri)
            if is_s3(file_uri):
                path = scratch / "inputs" / f"{len(inputs)}-{Path(file_uri).name}"
                try:
                    store.download(file_uri, path)
                except NotFound:
                    if keep is None:
                        raise
                    report.skipped_files.append(file_uri)  # an earlier object deleted since: not replayed
                    continue
            digest, size = sha256(), 0
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    size += len(block)
            report.inputs.append({"uri": file_uri, "sha256": digest.hexdigest(), "bytes": size,
                                  **({"replay": len(keep)} if keep is not None else {})})
            inputs.append(Input(file_uri, path, REPLAY if keep is not None else split, size, keep))
    return inputs


def _manifest_files(store: Store, uri: str, report: Report) -> list[tuple[str, frozenset[int] | None]]:
    """A data manifest's files (a schedule's run with trigger.newData): its new objects whole, then the records
    of its replay files that the run's seed picks."""
    try:
        manifest = newdata.parse_manifest(store.read_bytes(uri), f"dataset.train {uri}")
    except ValueError as e:
        raise PrepareError(str(e)) from None
    picks = newdata.replay_picks(manifest)
    replay = manifest["replay"]
    report.manifest = {"uri": uri, "new_files": len(manifest["files"]), "replay_files": len(replay["files"]),
                       "replay_fraction": replay["fraction"]}
    files = [(e["uri"], None) for e in manifest["files"]] + [(e["uri"], picks[e["uri"]]) for e in replay["files"]]
    if not files:
        raise PrepareError(f"dataset.train {uri}: the data manifest lists no files")
    return files


def clean_and_dedup(job: FineTuneJob, inputs: list[Input], scratch: Path, report: Report, workers: int,
                    log: Callable[[str], None], exclusions: Exclusions) -> Kept:
    """The first pass: every record read, cleaned and fingerprinted (by ``workers`` processes), duplicates
    decided here, the survivors written to a scratch file."""
    d = job.spec.preprocessing.dedup
    near = NearDedup(d.near_threshold, d.ngram, d.num_perm, job.spec.training.seed) if d.near else None
    dedup = Dedup(near, str(scratch))
    progress = _Progress("read", sum(i.size for i in inputs), log)
    splits: deque = deque()  # the source of each chunk in flight
    sources, draws, line_numbers = [], [], []
    path = scratch / "examples.jsonl"
    try:
        with open(path, "wb") as spill:
            for chunk in ordered_map(Cleaner(job), _chunks(inputs, splits, progress, report), workers):
                split = splits.popleft()
                report.add(chunk)
                keep = _decide(chunk, split, dedup, exclusions, report)
                spill.write(b"".join(line + b"\n" for line, k in zip(chunk.examples, keep.tolist()) if k))
                sources.append(np.full(int(keep.sum()), split or ""))
                draws.append(chunk.draws[keep])
                line_numbers.append(np.array(chunk.line_numbers, np.int64)[keep])
                if exclusions.active:
                    exclusions.keep(chunk.sketches.take(keep))
                progress.records(chunk.lines, int(keep.sum()))
    finally:
        dedup.close()
    report.duplicates.update(exclusions.counts)
    report.dropped.update({f"{k}_duplicate": v for k, v in report.duplicates.items() if k in ("exact", "near") or v})
    log(f"[prepare] {report.input_lines} lines read, {sum(report.bad_by_reason.values())} bad; duplicates: "
        + ", ".join(f"{v} {k}" for k, v in report.duplicates.items()) + f"; {progress.kept} examples left "
        f"({workers} worker{'s' if workers > 1 else ''}, {progress.elapsed()})")
    source = np.concatenate([np.zeros(0, "<U10")] + sources)
    golden, validation = source == "golden", np.zeros(len(source), bool)
    validation[~golden] = _split(np.concatenate([np.zeros(0, np.uint64)] + draws)[~golden], source[~golden] == "validation",
                                 job.spec.dataset.validation_split, has_file=job.spec.dataset.validation is not None)
    return Kept(path, validation, progress.kept, np.concatenate([np.zeros(0, np.int64)] + line_numbers), golden)


def _decide(chunk: Cleaned, split: str | None, dedup: Dedup, exclusions: Exclusions, report: Report) -> np.ndarray:
    """A chunk's keep mask. The golden set is kept whole and remembered; other examples like a golden or an
    indexed one (replayed ones excepted: earlier runs' data on purpose) are dropped, then exact and near duplicates
    of earlier examples."""
    n = len(chunk.examples)
    if split == "golden":
        exclusions.add_golden(chunk.sketches)
        return np.ones(n, bool)
    idx = np.flatnonzero(exclusions.filter(chunk.sketches, index=split != REPLAY) if exclusions.active
                         else np.ones(n, bool))
    sets = chunk.shingle_sets() if dedup.near is not None else None
    keep_idx, exact, near_dups = dedup.chunk(len(idx), None if chunk.exact is None else chunk.exact[idx],
                                             None if sets is None else [sets[i] for i in idx],
                                             None if chunk.band_keys is None else chunk.band_keys[idx])
    report.duplicates["exact"] += exact
    report.duplicates["near"] += near_dups
    keep = np.zeros(n, bool)
    keep[idx[keep_idx]] = True
    return keep


def _chunks(inputs: list[Input], splits: deque, progress: "_Progress", report: Report) -> Iterator[list]:
    """Chunks of CHUNK records in input order, none across the train/validation boundary; of a replay file, only
    the records picked."""
    items: list = []
    for n, source in enumerate(inputs):
        if items and source.split != inputs[n - 1].split:
            splits.append(inputs[n - 1].split)
            yield items
            items = []
        with open(source.path, "rb") as f:
            progress.file(f)
            for ordinal, item in enumerate(iter_file(source.uri, f)):
                if source.keep is not None:
                    if ordinal not in source.keep:
                        continue
                    report.replayed += 1
                items.append(item)
                if len(items) == CHUNK:
                    splits.append(source.split)
                    yield items
                    items = []
        progress.file_done(source.size)
    if items:
        splits.append(inputs[-1].split)
        yield items


def _tokenizer_texts(kept: Kept, cap: int) -> Iterator[str]:
    """What a fromConfig tokenizer is trained on: the training texts, up to TOKENIZER_TRAINING_CHARS (a BPE
    vocabulary of a few thousand tokens is settled long before; training on more costs time, not quality).
    BPE training time grows with the square of a word's length (a 1 MB string without spaces took minutes),
    and text far beyond maxSeqLength tokens is dropped as too long anyway, so each text is cut to a prefix
    that still covers it."""
    total = 0
    for split, line in kept.lines():
        if split == "train":
            record = orjson.loads(line)
            # rft: the item's values too, so a from-config vocabulary has the answers a grader looks for
            text = (text_of(record["messages"], record.get("rejected")) + item_text(record.get("item")))[:cap]
            yield text
            total += len(text)
            if total >= TOKENIZER_TRAINING_CHARS:
                return


def item_text(item: dict | None) -> str:
    """An rft item's text values, one a line (nested ones flattened)."""
    if not item:
        return ""
    values = item.values() if isinstance(item, dict) else item
    return "".join("\n" + (v if isinstance(v, str) else item_text(v) if isinstance(v, (dict, list)) else str(v))
                   for v in values)


def rft_summary(job: FineTuneJob, prepared: Path) -> dict:
    """objective rft: prompts per split and the item fields the grader reads, with how many values each has."""
    from kubetune.data.prompts import has_field
    from kubetune.data.records import referenced_fields

    fields, prompts, values = sorted(referenced_fields(job.spec.training)), {}, {}
    for path in sorted(prepared.glob("*.jsonl")):
        records = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
        prompts[path.stem] = len(records)
        for name in fields:
            values.setdefault(name, Counter()).update(str(_field(r["item"], name))[:100] for r in records
                                                      if has_field(r["item"], name))
    return {"prompts": prompts, "grader": job.spec.training.rft.grader.name,
            "item_fields": {name: {"distinct_values": len(values.get(name, ())),
                                   "most_common": values.get(name, Counter()).most_common(5)} for name in fields}}


def _field(item: dict, dotted: str):
    for part in dotted.split("."):
        item = item[part]
    return item


def _split(draws: np.ndarray, from_file: np.ndarray, fraction: float, has_file: bool) -> np.ndarray:
    """Which examples are validation. Deterministic: an example's side depends only on its content and the
    seed, not on order."""
    if has_file:
        return from_file
    valid = draws / 2**64 < fraction
    if not valid.any() and len(draws) > 1:
        valid[np.argmin(draws)] = True
    return valid


def tokenize_and_write(job: FineTuneJob, tokenizer, kept: Kept, prepared: Path, report: Report, workers: int,
                       log: Callable[[str], None]) -> dict:
    """The second pass: kept examples tokenized (by ``workers`` processes), packed and written per split; each
    split's statistics and files."""
    pre, pairs = job.spec.preprocessing, job.spec.training.objective == "dpo"
    names = ("train", "validation") + (("golden",) if kept.golden is not None and kept.golden.any() else ())
    if job.spec.training.objective == "rft":  # prompts, tokenized with the generation prompt, not packed
        writers = {name: PromptWriter(prepared, name) for name in names}
        tokenizing = TokenizingPrompts(tokenizer, pre.max_seq_length)
    else:
        writers = {name: ShardWriter(prepared, name, pre.max_seq_length, pre.packing, pairs) for name in names}
        tokenizing = Tokenizing(tokenizer, pre.max_seq_length, pairs)
    splits: deque = deque()
    progress = _Progress("tokenized", 0, log, total_records=kept.count)
    for chunk in ordered_map(tokenizing, _split_chunks(kept, splits), workers):
        report.dropped.update(chunk.dropped)
        writers[splits.popleft()].add(chunk)
        progress.records(len(chunk.examples) + sum(chunk.dropped.values()), len(chunk.examples))
    return {name: {**w.close(), "files": w.files} for name, w in writers.items()}


def _split_chunks(kept: Kept, splits: deque) -> Iterator[list[bytes]]:
    buffers: dict[str, list[bytes]] = {"train": [], "validation": [], "golden": []}
    for name, line in kept.lines():
        buffers[name].append(line)
        if len(buffers[name]) == TOKENIZE_CHUNK:
            splits.append(name)
            yield buffers[name]
            buffers[name] = []
    for name, lines in buffers.items():
        if lines:
            splits.append(name)
            yield lines


class _Progress:
    """A line every PROGRESS_SECONDS: records done, rate, and the ETA from the share of input read."""

    def __init__(self, what: str, total_bytes: int, log: Callable[[str], None], total_records: int = 0):
        self.what, self.total_bytes, self.total_records, self.log = what, total_bytes, total_records, log
        self.started = self.last = time.monotonic()
        self.done_bytes, self.current, self.count, self.kept = 0, None, 0, 0

    def file(self, f) -> None:
        self.current = f

    def file_done(self, size: int) -> None:
        self.done_bytes += size
        self.current = None

    def records(self, n: int, kept: int) -> None:
        self.count += n
        self.kept += kept
        now = time.monotonic()
        if now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        share = self._share()
        eta = f", ETA {(now - self.started) * (1 - share) / share:.0f}s" if share > 0 else ""
        self.log(f"[prepare] {self.what} {self.count} records ({share:.0%}), {self.count / (now - self.started):.0f}/s{eta}")

    def _share(self) -> float:
        if self.total_records:
            return min(1.0, self.count / self.total_records)
        if not self.total_bytes:
            return 0.0
        position = self.done_bytes
        if self.current is not None and not self.current.closed:
            position += self.current.tell()
        return min(1.0, position / self.total_bytes)

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.started:.1f}s"


def _workers(input_bytes: int) -> int:
    if os.environ.get("KUBETUNE_WORKERS"):
        return cpus()
    return cpus() if input_bytes >= PARALLEL_BYTES else 1


def _check_bad_fraction(report: Report, bad: int, limit: float) -> None:
    if not report.input_lines or bad / report.input_lines <= limit:
        return
    first = report.bad_lines[0]
    raise PrepareError(
        f"{bad} of {report.input_lines} input lines are malformed ({bad / report.input_lines:.1%}, "
        f"limit dataset.maxBadFraction={limit:.1%}); first: {first['file']}:{first['line']}: {first['reason']}"
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
