"""Preparation's second pass: tokenize kept examples (per chunk, in worker processes), then pack them into
rows and write parquet shards as the rows fill (in the preparing process).

Packing is best-fit decreasing within a window of about ``WINDOW_TOKENS`` tokens, in input order: memory is
bounded by the window, not the dataset, and a dataset smaller than one window is packed exactly as one
best-fit pass over all of it would pack it. A unit is one conversation, or a preference pair (chosen then
rejected, two documents packed whole into a row of twice ``max_seq_length``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from kubetune.data.tokenize import IGNORE, Encoder, pack

ROWS_PER_SHARD = 10_000
WINDOW_TOKENS = 1_000_000  # about 8 MB of ids and labels


@dataclass
class TokenizedChunk:
    """A chunk's kept units: their documents' tokens end to end (the first label of each document is IGNORE,
    so no loss crosses a document boundary)."""

    dropped: Counter = field(default_factory=Counter)
    examples: list[bytes] = field(default_factory=list)  # the kept examples' JSON lines, in order
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    doc_lens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    docs_per_unit: int = 1


class Tokenizing:
    """The second pass for one job; picklable, called once per chunk of example lines."""

    def __init__(self, tokenizer, max_len: int, pairs: bool):
        self.encoder, self.max_len, self.pairs = Encoder(tokenizer), max_len, pairs

    def __call__(self, lines: list[bytes]) -> TokenizedChunk:
        records = [orjson.loads(line) for line in lines]
        if self.pairs:  # both sides: the prompt and each answer
            conversations = [r["messages"][:-1] + [a] for r in records for a in (r["messages"][-1], r["rejected"])]
            tools = [r.get("tools") for r in records for _ in (0, 1)]
        else:
            conversations, tools = [r["messages"] for r in records], [r.get("tools") for r in records]
        encoded = self.encoder.encode(conversations, tools)
        per = 2 if self.pairs else 1
        out, ids, labels, lens = TokenizedChunk(docs_per_unit=per), [], [], []
        for k, line in enumerate(lines):
            sides = encoded[per * k: per * k + per]
            problem = next(filter(None, (self._problem(t) for t in sides)), None)
            if problem:  # one count per unit
                out.dropped[problem] += 1
                continue
            out.examples.append(line)
            for side_ids, side_labels in sides:
                side_labels[0] = IGNORE
                ids.append(side_ids)
                labels.append(side_labels)
                lens.append(len(side_ids))
        if lens:
            out.ids, out.labels = np.concatenate(ids), np.concatenate(labels)
            out.doc_lens = np.array(lens, np.int64)
        return out

    def _problem(self, t: tuple[np.ndarray, np.ndarray] | None) -> str | None:
        if t is None:
            return "template_mismatch"
        if len(t[0]) > self.max_len:
            return "too_long"
        if not (t[1][1:] != IGNORE).any():
            return "no_trained_tokens"
        return None


class ShardWriter:
    """Rows of one split, packed per window and written to ``{name}-NNNNN.parquet`` files, with the split's
    ``{name}.jsonl`` of the kept examples beside them."""

    def __init__(self, folder: Path, name: str, max_len: int, packing: bool, pairs: bool):
        self.folder, self.name, self.packing = folder, name, packing
        self.capacity = (2 if pairs else 1) * max_len
        self.files: list[str] = []
        self.rows = self.examples = self.tokens = self.trained = self.docs = self.max_length = 0
        self.window: list[TokenizedChunk] = []
        self.window_tokens = 0
        self.writer, self.in_file = None, 0
        self.jsonl = open(folder / f"{name}.jsonl", "wb")

    def add(self, chunk: TokenizedChunk) -> None:
        self.jsonl.write(b"".join(line + b"\n" for line in chunk.examples))
        self.examples += len(chunk.examples)
        self.window.append(chunk)
        self.window_tokens += len(chunk.ids)
        if self.window_tokens >= WINDOW_TOKENS:
            self._flush()

    def close(self) -> dict:
        """Write what is left; the split's statistics."""
        self._flush()
        if not self.files:  # an empty split still has its (empty) shard, as the trainer expects
            self._write(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int64),
                        np.zeros(1, np.int64))
        if self.writer:
            self.writer.close()
        self.jsonl.close()
        return {
            "examples": self.examples,
            "tokens": self.tokens,
            "trained_tokens": self.trained,
            "mean_length": round(self.tokens / self.docs, 1) if self.docs else 0,
            "max_length": self.max_length,
            "rows": self.rows,
            "packing_efficiency": round(self.tokens / (self.rows * self.capacity), 3) if self.rows and self.packing else None,
        }

    def _flush(self) -> None:
        chunks, self.window, self.window_tokens = self.window, [], 0
        if not chunks or not any(len(c.doc_lens) for c in chunks):
            return
        ids = np.concatenate([c.ids for c in chunks])
        labels = np.concatenate([c.labels for c in chunks])
        doc_lens = np.concatenate([c.doc_lens for c in chunks])
        per = chunks[0].docs_per_unit
        unit_lens = doc_lens.reshape(-1, per).sum(axis=1)
        groups = pack(unit_lens.tolist(), self.capacity) if self.packing else [[u] for u in range(len(unit_lens))]
        # the documents of each row in order, then each document's tokens: gathers, no per-token Python
        docs = np.array([per * u + d for g in groups for u in g for d in range(per)], np.int64)
        row_docs = np.cumsum([0] + [per * len(g) for g in groups])
        starts = np.cumsum(doc_lens) - doc_lens
        lens = doc_lens[docs]
        token_index = np.repeat(starts[docs] - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
        row_tokens = np.concatenate([[0], np.cumsum(lens)[row_docs[1:] - 1]])
        self._write(ids[token_index], labels[token_index], row_tokens, lens, row_docs)
        self.tokens += int(lens.sum())
        self.trained += int((labels != IGNORE).sum())
        self.docs += len(lens)
        self.max_length = max(self.max_length, int(lens.max()))

    def _write(self, ids, labels, row_tokens, lens, row_docs) -> None:
        """Rows ``row_tokens[k]:row_tokens[k+1]`` of ``ids``/``labels``, their documents' lengths ``lens[row_docs[k]:
        row_docs[k+1]]``, into the current shard file, starting a new one every ROWS_PER_SHARD rows."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        n, done = len(row_tokens) - 1, 0
        while done < n or (n == 0 and self.writer is None):
            if self.writer is None or self.in_file == ROWS_PER_SHARD:
                if self.writer:
                    self.writer.close()
                fname = f"{self.name}-{len(self.files):05d}.parquet"
                self.files.append(f"prepared/{fname}")
                self.writer, self.in_file = pq.ParquetWriter(self.folder / fname, _schema()), 0
            take = min(n - done, ROWS_PER_SHARD - self.in_file)
            t0, t1 = row_tokens[done], row_tokens[done + take]
            d0, d1 = row_docs[done], row_docs[done + take]
            tok_offsets = (row_tokens[done: done + take + 1] - t0).astype(np.int32)
            doc_offsets = (row_docs[done: done + take + 1] - d0).astype(np.int32)
            self.writer.write_table(pa.table({
                "input_ids": pa.ListArray.from_arrays(tok_offsets, pa.array(ids[t0:t1], pa.int32())),
                "labels": pa.ListArray.from_arrays(tok_offsets, pa.array(labels[t0:t1], pa.int32())),
                "doc_lens": pa.ListArray.from_arrays(doc_offsets, pa.array(lens[d0:d1].astype(np.int32), pa.int32())),
            }, schema=_schema()))
            self.in_file += take
            self.rows += take
            done += take
            if n == 0:
                break


def _schema():
    import pyarrow as pa

    ints = pa.list_(pa.int32())
    return pa.schema([("input_ids", ints), ("labels", ints), ("doc_lens", ints)])
