"""Prepared shards in, model-ready tensors out.

Packed rows carry ``doc_lens``. Collation gives per-document position ids and passes the layout
on as ``doc_lens`` (or, for the fused kernel, as one BlockMask), which ``kubetune.packed.attention``
uses to attend within each document only. (Position ids alone do not isolate documents under sdpa or
eager attention.) Isolation is checked against the documents run alone in tests/test_train_data.py.
Collation also lists the labeled positions, so the loss (``kubetune.packed.head``) computes logits
there only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from kubetune.packed import IGNORE


class Rows:
    """Packed rows as arrays, with per-row counts and label positions precomputed so each step does no Python
    loops over tokens."""

    def __init__(self, input_ids: list[list[int]], labels: list[list[int]], doc_lens: list[list[int]]):
        self.input_ids = [np.asarray(r, dtype=np.int64) for r in input_ids]
        self.labels = [np.asarray(r, dtype=np.int64) for r in labels]
        self.doc_lens = [list(lens) for lens in doc_lens]
        self.positions = [np.concatenate([np.arange(n) for n in lens]) if lens else np.zeros(0, np.int64)
                          for lens in self.doc_lens]
        self.docs = [np.repeat(np.arange(len(lens), dtype=np.int32), lens) for lens in self.doc_lens]
        # A label predicts the token after it, so a row's first label never counts: position t is trained
        # when the label at t + 1 is.
        self.label_at = [np.flatnonzero(r[1:] != IGNORE) for r in self.labels]
        self.lengths = np.array([len(r) for r in self.input_ids])
        self.trained = np.array([len(at) for at in self.label_at])
        self.squared = np.array([sum(n * n for n in lens) for lens in self.doc_lens])  # attention's work

    def __len__(self) -> int:
        return len(self.input_ids)

    def label_tokens(self, idx) -> int:
        return int(self.trained[np.asarray(idx, dtype=np.int64)].sum())

    def tokens(self, idx) -> int:
        return int(self.lengths[np.asarray(idx, dtype=np.int64)].sum())

    def fixed_length(self, multiple: int = 128) -> int:
        """The longest row rounded up to ``multiple``: one length for every batch, so shapes never vary."""
        return int(-(-max(self.lengths.max(initial=1), 1) // multiple) * multiple)


def load_rows(prepared: Path, split: str) -> Rows:
    meta = json.loads((prepared / "prepared" / "meta.json").read_text())
    tables = [pq.read_table(prepared / f).to_pydict() for f in meta[split]["files"]]
    return Rows(**{k: [v for t in tables for v in t[k]] for k in ("input_ids", "labels", "doc_lens")})


@dataclass
class Batch:
    """A micro batch: the model's inputs, and where its labels are (so the output layer runs only there)."""

    inputs: dict  # input_ids, position_ids, doc_ids (B, L) tensors; doc_lens (a list per row)
    index: torch.Tensor  # (N,) flat positions b * L + t whose next token is labeled
    target: torch.Tensor  # (N,) that label
    doc: torch.Tensor  # (N,) the document of each label, numbered through the batch row by row
    rows: list[int]  # the prepared rows it holds (padding rows excluded)
    doc_mask: bool = False  # give the model one BlockMask instead of doc_lens (fused kernel, fixed shapes)

    def to(self, device) -> Batch:
        """On ``device``; from pinned memory the copies do not block the host."""
        return self._map(lambda v: v.to(device, non_blocking=True))

    def pin(self) -> Batch:
        return self._map(lambda v: v.pin_memory())

    def _map(self, f) -> Batch:
        """A copy with ``f`` applied to every tensor."""
        def each(v):
            return f(v) if isinstance(v, torch.Tensor) else v

        return Batch({k: each(v) for k, v in self.inputs.items()}, each(self.index), each(self.target),
                     each(self.doc), self.rows, self.doc_mask)

    def model_inputs(self) -> dict:
        """The keyword arguments of the model's forward pass."""
        if self.doc_mask:
            from kubetune.packed.attention import with_doc_mask

            return with_doc_mask(self.inputs)
        return {k: v for k, v in self.inputs.items() if k != "doc_ids"}

    @property
    def labels(self) -> torch.Tensor:
        """(B, L) labels as the model sees them (IGNORE elsewhere), rebuilt from the label positions."""
        ids = self.inputs["input_ids"]
        out = torch.full((ids.numel(),), IGNORE, dtype=torch.int64, device=ids.device)
        out[self.index + 1] = self.target
        return out.view(ids.shape)


@dataclass(frozen=True)
class Collator:
    """How micro batches are shaped. ``length`` and ``size`` fix them (compiled kernels see one shape)."""

    pad_id: int
    length: int | None = None  # pad rows to this; None: to the longest row of the batch
    size: int | None = None  # pad a batch to this many rows with empty ones; None: as many as given
    doc_mask: bool = False

    def __call__(self, rows: Rows, idx) -> Batch:
        return collate(rows, idx, self.pad_id, self.length, self.size, self.doc_mask)


def collate(rows: Rows, idx, pad_id: int, length: int | None = None, size: int | None = None,
            doc_mask: bool = False) -> Batch:
    idx = [int(i) for i in idx]
    length = length or int(rows.lengths[idx].max(initial=1))
    n = max(len(idx), size or 0)
    input_ids = np.full((n, length), pad_id, dtype=np.int64)
    position_ids = np.zeros((n, length), dtype=np.int64)
    doc_ids = np.full((n, length), -1, dtype=np.int32)
    index, target, doc, docs_before = [], [], [], 0
    for b, i in enumerate(idx):
        size_i, at = rows.lengths[i], rows.label_at[i]
        input_ids[b, :size_i] = rows.input_ids[i]
        position_ids[b, :size_i] = rows.positions[i]
        doc_ids[b, :size_i] = rows.docs[i]
        index.append(b * length + at)
        target.append(rows.labels[i][at + 1])
        doc.append(rows.docs[i][at + 1].astype(np.int64) + docs_before)
        docs_before += len(rows.doc_lens[i])
    cat = lambda parts: torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int64))  # noqa: E731
    inputs = {"input_ids": torch.from_numpy(input_ids), "position_ids": torch.from_numpy(position_ids),
              "doc_ids": torch.from_numpy(doc_ids), "doc_lens": [rows.doc_lens[i] for i in idx] + [[]] * (n - len(idx))}
    return Batch(inputs, cat(index), cat(target), cat(doc), idx, doc_mask)


def validation_metrics(totals: torch.Tensor) -> dict:
    """Validation loss, perplexity and mean token accuracy, as OpenAI's fine-tuning reports them."""
    loss_sum, correct, count = totals.tolist()
    loss = loss_sum / max(count, 1)
    return {"valid_loss": loss, "valid_perplexity": math.exp(min(loss, 50)),
            "valid_mean_token_accuracy": correct / max(count, 1)}
