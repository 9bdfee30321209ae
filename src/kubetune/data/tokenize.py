"""Chat template, assistant-only labels, and packing.

Labels: the conversation is rendered once with the tokenizer's chat template and tokenized with
character offsets. Each trained assistant turn's character span is found by rendering the
conversation up to that turn (with and without the generation prompt), which works for any
template that renders prefixes as prefixes (ChatML, Llama 3, Qwen, Mistral...). Tokens that start
inside a span keep their id as label; all others get -100. The turn's end-of-turn token is inside
the span, so the model learns to stop.

Packing: best-fit decreasing into rows of ``max_seq_length``. Each row records its documents'
lengths (``doc_lens``); the trainer turns them into per-document position ids and runs causal
attention on each document's slice alone (``kubetune.packed.attention``), so a packed example never
attends to its neighbours. The first token of every document is unlabeled, so no loss crosses a
document boundary either.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from kubetune.packed import IGNORE


class TemplateError(ValueError):
    """The chat template does not render prefixes of a conversation as prefixes of it."""


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation_prompt)


def render_with_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its trained assistant turns."""
    full = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not m["weight"]:
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else _generation_prefix(tokenizer)
        through = _render(tokenizer, messages[: i + 1])
        if not full.startswith(before) or not full.startswith(through):
            raise TemplateError("chat template does not render conversation prefixes as prefixes")
        spans.append((len(before), len(through)))
    return full, spans


def _generation_prefix(tokenizer) -> str:
    # A conversation that opens with the assistant (plain text): everything before its content.
    probe = "\u2063"
    text = _render(tokenizer, [{"role": "assistant", "content": probe}])
    return text[: text.index(probe)]


def tokenize_batch(tokenizer, conversations: list[list[dict]]) -> list[Tokenized | None]:
    """Tokenize conversations with assistant-only labels; None where the template misbehaves."""
    rendered: list[tuple[str, list[tuple[int, int]]] | None] = []
    for messages in conversations:
        try:
            rendered.append(render_with_spans(tokenizer, messages))
        except TemplateError:
            rendered.append(None)
    texts = [r[0] if r else "" for r in rendered]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out: list[Tokenized | None] = []
    for r, ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        if r is None:
            out.append(None)
            continue
        labels = [IGNORE] * len(ids)
        spans = r[1]
        for t, (start, _end) in enumerate(offsets):
            if any(s <= start < e for s, e in spans):
                labels[t] = ids[t]
        out.append(Tokenized(list(ids), labels))
    return out


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: groups of indices whose lengths sum to at most ``capacity``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    bins: list[list[int]] = []
    for i in order:
        pos = bisect.bisect_left(free, (lengths[i], -1))
        if pos == len(free):
            bins.append([i])
            left, b = capacity - lengths[i], len(bins) - 1
        else:
            left, b = free.pop(pos)
            bins[b].append(i)
            left -= lengths[i]
        if left > 0:
            bisect.insort(free, (left, b))
    return bins


def packed_rows(examples: list[Tokenized], capacity: int, packing: bool) -> list[dict]:
    """Rows of input_ids, labels and doc_lens; one document per row when packing is off."""
    groups = pack([len(e.input_ids) for e in examples], capacity) if packing else [[i] for i in range(len(examples))]
    rows = []
    for group in groups:
        ids, labels, lens = [], [], []
        for i in group:
            e = examples[i]
            ids += e.input_ids
            labels += [IGNORE] + e.labels[1:]
            lens.append(len(e.input_ids))
        rows.append({"input_ids": ids, "labels": labels, "doc_lens": lens})
    return rows
