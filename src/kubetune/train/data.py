"""Prepared shards in, model-ready tensors out.

Packed rows carry ``doc_lens``. Collation turns them into per-document position ids and a
block-diagonal causal attention mask (4-D, additive), so a token attends only to earlier tokens of
its own document. Position ids alone do not isolate documents under sdpa or eager attention; the
4-D mask does (checked against the documents run alone in tests/test_train_data.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch

IGNORE = -100


@dataclass
class Rows:
    input_ids: list[list[int]]
    labels: list[list[int]]
    doc_lens: list[list[int]]

    def __len__(self) -> int:
        return len(self.input_ids)

    def label_tokens(self, idx) -> int:
        """Trained tokens in the given rows (a label predicts the token after it, so the first never counts)."""
        return sum(sum(1 for x in self.labels[i][1:] if x != IGNORE) for i in idx)

    def tokens(self, idx) -> int:
        return sum(len(self.input_ids[i]) for i in idx)


def load_rows(prepared: Path, split: str) -> Rows:
    meta = json.loads((prepared / "prepared" / "meta.json").read_text())
    tables = [pq.read_table(prepared / f).to_pydict() for f in meta[split]["files"]]
    cols = {k: [v for t in tables for v in t[k]] for k in ("input_ids", "labels", "doc_lens")}
    return Rows(**cols)


def collate(rows: Rows, idx, pad_id: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    idx = list(idx)
    length = max(len(rows.input_ids[i]) for i in idx)
    n = len(idx)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    doc = torch.empty((n, length), dtype=torch.long)
    for b, i in enumerate(idx):
        ids = rows.input_ids[i]
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(ids)] = torch.tensor(rows.labels[i])
        pos, owner = [], []
        for d, size in enumerate(rows.doc_lens[i]):
            pos += range(size)
            owner += [d] * size
        position_ids[b, : len(ids)] = torch.tensor(pos)
        doc[b, : len(ids)] = torch.tensor(owner)
        doc[b, len(ids) :] = torch.arange(length - len(ids)) + 1_000_000  # each pad token is its own "document"
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    allowed = (doc[:, :, None] == doc[:, None, :]) & causal
    mask = torch.zeros((n, 1, length, length), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask}


def token_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Summed next-token loss, correct predictions and count over labeled positions."""
    logits, target = logits[:, :-1].float(), labels[:, 1:]
    keep = target != IGNORE
    loss = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
    correct = int((logits[keep].argmax(-1) == target[keep]).sum())
    return loss, correct, int(keep.sum())

