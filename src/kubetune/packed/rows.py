"""Prepared shards in, model-ready tensors out.

Packed rows carry ``doc_lens``. Collation gives per-document position ids and passes the layout
on as ``doc_lens``, which ``kubetune.packed.attention`` uses to attend within each document only.
(Position ids alone do not isolate documents under sdpa or eager attention.) Isolation is checked
against the documents run alone in tests/test_train_data.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from kubetune.packed import IGNORE


class Rows:
    """Packed rows as arrays, with per-row counts precomputed so each step does no Python loops over tokens."""

    def __init__(self, input_ids: list[list[int]], labels: list[list[int]], doc_lens: list[list[int]]):
        self.input_ids = [np.asarray(r, dtype=np.int64) for r in input_ids]
        self.labels = [np.asarray(r, dtype=np.int64) for r in labels]
        self.positions = [np.concatenate([np.arange(n) for n in lens]) for lens in doc_lens]
        self.doc_lens = [list(lens) for lens in doc_lens]
        self.lengths = np.array([len(r) for r in self.input_ids])
        # A label predicts the token after it, so a row's first label never counts.
        self.trained = np.array([int((r[1:] != IGNORE).sum()) for r in self.labels])

    def __len__(self) -> int:
        return len(self.input_ids)

    def label_tokens(self, idx) -> int:
        return int(self.trained[np.asarray(idx, dtype=np.int64)].sum())

    def tokens(self, idx) -> int:
        return int(self.lengths[np.asarray(idx, dtype=np.int64)].sum())


def load_rows(prepared: Path, split: str) -> Rows:
    meta = json.loads((prepared / "prepared" / "meta.json").read_text())
    tables = [pq.read_table(prepared / f).to_pydict() for f in meta[split]["files"]]
    return Rows(**{k: [v for t in tables for v in t[k]] for k in ("input_ids", "labels", "doc_lens")})


def collate(rows: Rows, idx, pad_id: int) -> dict:
    idx = [int(i) for i in idx]
    length = int(rows.lengths[idx].max())
    n = len(idx)
    input_ids = np.full((n, length), pad_id, dtype=np.int64)
    labels = np.full((n, length), IGNORE, dtype=np.int64)
    position_ids = np.zeros((n, length), dtype=np.int64)
    for b, i in enumerate(idx):
        size = rows.lengths[i]
        input_ids[b, :size] = rows.input_ids[i]
        labels[b, :size] = rows.labels[i]
        position_ids[b, :size] = rows.positions[i]
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids), "doc_lens": [rows.doc_lens[i] for i in idx]}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def token_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Summed next-token loss, correct predictions and count over labeled positions."""
    # ignore_index instead of boolean selection: selecting rows makes backward an index_put.
    logits, target = logits[:, :-1].float(), labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum")
    keep = target != IGNORE
    correct = int(((logits.detach().argmax(-1) == target) & keep).sum())
    return loss, correct, int(keep.sum())


@torch.no_grad()
def validation_totals(model, rows: Rows, idx: list[int], micro: int, pad_id: int, device) -> torch.Tensor:
    """(summed loss, correct, count) over the given validation rows, as float64 on ``device``."""
    totals = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(idx), micro):
        batch = to_device(collate(rows, idx[i : i + micro], pad_id), device)
        labels = batch.pop("labels")
        loss, correct, count = token_stats(model(**batch).logits, labels)
        totals += torch.tensor([loss.item(), correct, count], dtype=torch.float64)
    return totals.to(device)


def validation_metrics(totals: torch.Tensor) -> dict:
    """Validation loss, perplexity and mean token accuracy, as OpenAI's fine-tuning reports them."""
    loss_sum, correct, count = totals.tolist()
    loss = loss_sum / max(count, 1)
    return {"valid_loss": loss, "valid_perplexity": math.exp(min(loss, 50)),
            "valid_mean_token_accuracy": correct / max(count, 1)}

