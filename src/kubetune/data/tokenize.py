"""Chat template, assistant-only labels, and packing.

Labels: the conversation is rendered once with the tokenizer's chat template and tokenized with
character offsets. Each trained assistant turn's character span is found by rendering the
conversation up to that turn (with and without the generation prompt), which works for any
template that renders prefixes as prefixes (ChatML, Llama 3, Qwen, Mistral...). Tokens that start
inside a span keep their id as label; all others get -100. The turn's end-of-turn token is inside
the span, so the model learns to stop.

Tool calling: the record's tools go to the template (``tools=``) in every rendering, and messages keep
their ``tool_calls`` (arguments parsed, as Hugging Face templates expect) and ``tool_call_id``. An
assistant turn's tool calls are rendered inside its span, so they are trained; tool results, like
prompts, are not. A template that cannot render a tool conversation (it fails, or leaves out a
call's function name) makes it a template mismatch, not a failed preparation.

Packing: best-fit decreasing into rows of ``max_seq_length``. Each row records its documents'
lengths (``doc_lens``); the trainer turns them into per-document position ids and runs causal
attention on each document's slice alone (``kubetune.packed.attention``), so a packed example never
attends to its neighbours. The first token of every document is unlabeled, so no loss crosses a
document boundary either.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from kubetune.data.formats import template_messages
from kubetune.packed import IGNORE


class TemplateError(ValueError):
    """The chat template does not render prefixes of a conversation as prefixes of it."""


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
    return tokenizer.apply_chat_template(template_messages(messages), tools=tools or None, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def render_with_spans(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its trained assistant turns."""
    calls = [c["function"]["name"] for m in messages for c in m.get("tool_calls") or ()]
    if not tools and not calls:
        return _spans(tokenizer, messages, None)
    try:  # a template without tool support may fail on a tool message or a null content
        full, spans = _spans(tokenizer, messages, tools)
    except TemplateError:
        raise
    except Exception as e:
        raise TemplateError(f"chat template cannot render tool calling ({type(e).__name__})") from None
    if not all(name in full for name in calls):
        raise TemplateError("chat template leaves out tool calls")
    return full, spans


def _spans(tokenizer, messages: list[dict], tools: list[dict] | None) -> tuple[str, list[tuple[int, int]]]:
    full = _render(tokenizer, messages, tools=tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not m["weight"]:
            continue
        before = (_render(tokenizer, messages[:i], generation_prompt=True, tools=tools) if i
                  else _generation_prefix(tokenizer, tools))
        through = _render(tokenizer, messages[: i + 1], tools=tools)
        if not full.startswith(before) or not full.startswith(through):
            raise TemplateError("chat template does not render conversation prefixes as prefixes")
        spans.append((len(before), len(through)))
    return full, spans


def _generation_prefix(tokenizer, tools: list[dict] | None = None) -> str:
    # A conversation that opens with the assistant (plain text): everything before its content.
    probe = "\u2063"
    text = _render(tokenizer, [{"role": "assistant", "content": probe}], tools=tools)
    return text[: text.index(probe)]


def tokenize_batch(tokenizer, conversations: list[list[dict]],
                   tools: list[list[dict] | None] | None = None) -> list[Tokenized | None]:
    """Tokenize conversations with assistant-only labels; None where the template misbehaves.
    ``tools``: each conversation's tools (None for none), in the same order."""
    tools = tools or [None] * len(conversations)
    rendered: list[tuple[str, list[tuple[int, int]]] | None] = []
    for messages, conversation_tools in zip(conversations, tools):
        try:
            rendered.append(render_with_spans(tokenizer, messages, conversation_tools))
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
