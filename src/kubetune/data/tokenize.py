"""Chat template, assistant-only labels, and packing.

Labels: the conversation is rendered once with the tokenizer's chat template and tokenized with
character offsets; tokens that start inside a trained assistant turn's character span keep their id as
label, all others get -100. The turn's end-of-turn token is inside the span, so the model learns to stop.
The spans come one of two ways, which give the same labels (``tests/test_tokenize.py``):

- a template that marks assistant output with ``{% generation %}`` (Hugging Face's convention for
  ``return_assistant_tokens_mask``; the fromConfig ChatML template does) gives them in the same, single
  rendering;
- for any other template, each trained turn's span is found by rendering the conversation up to that turn
  (with and without the generation prompt), which works for any template that renders prefixes as
  prefixes (ChatML, Llama 3, Qwen, Mistral...), at two more renderings per turn.

Rendering goes through ``Renderer`` and encoding through the tokenizer's Rust backend, both picklable, so
preparation's worker processes need neither the tokenizer object nor torch.

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
import re
from dataclasses import dataclass

import numpy as np

from kubetune.data.formats import template_messages
from kubetune.packed import IGNORE

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateError(ValueError):
    """The chat template does not render prefixes of a conversation as prefixes of it."""


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


class Renderer:
    """A tokenizer's chat template, rendered as ``apply_chat_template(..., tokenize=False)`` renders it."""

    def __init__(self, tokenizer, one_pass: bool = True):
        # get_chat_template picks the "tool_use" template of a template dict when there are tools
        self.templates = {False: tokenizer.get_chat_template(None, None), True: tokenizer.get_chat_template(None, [])}
        self.kwargs = dict(tokenizer.special_tokens_map)
        self.one_pass = one_pass  # False: always the per-prefix method (for comparing both)

    def render(self, messages: list[dict], generation_prompt: bool = False, tools: list[dict] | None = None,
               spans: bool = False):
        """The text; with ``spans``, also the ``{% generation %}`` blocks' character spans (None if the template
        has none)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        template = self.templates[bool(tools)]
        marked = spans and self.one_pass and bool(_GENERATION.search(template))
        chats = [[{k: v for k, v in m.items() if v is not None} for m in template_messages(messages)]]
        texts, indices = render_jinja_template(chats, tools=tools or None, chat_template=template,
                                               return_assistant_tokens_mask=marked,
                                               add_generation_prompt=generation_prompt, **self.kwargs)
        return (texts[0], indices[0] if marked else None) if spans else texts[0]


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
    return Renderer(tokenizer).render(messages, generation_prompt, tools)


def render_with_spans(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its trained assistant turns.
    ``tokenizer``: a tokenizer or its ``Renderer``."""
    renderer = tokenizer if isinstance(tokenizer, Renderer) else Renderer(tokenizer)
    calls = [c["function"]["name"] for m in messages for c in m.get("tool_calls") or ()]
    if not tools and not calls:
        return _spans(renderer, messages, None)
    try:  # a template without tool support may fail on a tool message or a null content
        full, spans = _spans(renderer, messages, tools)
    except TemplateError:
        raise
    except Exception as e:
        raise TemplateError(f"chat template cannot render tool calling ({type(e).__name__})") from None
    if not all(name in full for name in calls):
        raise TemplateError("chat template leaves out tool calls")
    return full, spans


def _spans(renderer: Renderer, messages: list[dict], tools: list[dict] | None) -> tuple[str, list[tuple[int, int]]]:
    full, marked = renderer.render(messages, tools=tools, spans=True)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if marked is not None and len(marked) == len(assistant):  # one block per assistant turn, in order
        return full, [tuple(span) for i, span in zip(assistant, marked) if messages[i]["weight"]]
    spans = []
    for i in assistant:
        if not messages[i]["weight"]:
            continue
        before = (renderer.render(messages[:i], generation_prompt=True, tools=tools) if i
                  else _generation_prefix(renderer, tools))
        through = renderer.render(messages[: i + 1], tools=tools)
        if not full.startswith(before) or not full.startswith(through):
            raise TemplateError("chat template does not render conversation prefixes as prefixes")
        spans.append((len(before), len(through)))
    return full, spans


def _generation_prefix(renderer: Renderer, tools: list[dict] | None = None) -> str:
    # A conversation that opens with the assistant (plain text): everything before its content.
    probe = "\u2063"
    text = renderer.render([{"role": "assistant", "content": probe}], tools=tools)
    return text[: text.index(probe)]


class Encoder:
    """Rendering plus tokenization with labels, for preparation's workers: picklable (the template and the
    tokenizer's Rust backend), no torch."""

    def __init__(self, tokenizer, one_pass: bool = True):
        self.renderer = Renderer(tokenizer, one_pass)
        self.backend = tokenizer.backend_tokenizer

    def encode(self, conversations: list[list[dict]],
               tools: list[list[dict] | None]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """(input_ids, labels) as int32 arrays per conversation; None where the template misbehaves."""
        rendered: list[tuple[str, list[tuple[int, int]]] | None] = []
        for messages, conversation_tools in zip(conversations, tools):
            try:
                rendered.append(render_with_spans(self.renderer, messages, conversation_tools))
            except TemplateError:
                rendered.append(None)
        encodings = self.backend.encode_batch([r[0] if r else "" for r in rendered], add_special_tokens=False)
        out: list[tuple[np.ndarray, np.ndarray] | None] = []
        for r, enc in zip(rendered, encodings):
            if r is None:
                out.append(None)
                continue
            ids = np.array(enc.ids, dtype=np.int32)
            out.append((ids, _labels(ids, enc, r[1], len(r[0]))))
        return out


def _labels(ids: np.ndarray, enc, spans: list[tuple[int, int]], length: int) -> np.ndarray:
    """Each token's id where it starts inside a span, else IGNORE. Token starts never decrease, so a span's
    tokens are one run, found from its two bounds (a few look-ups, not every token's offsets)."""
    runs = [(_first_token_from(enc, start, len(ids), length), _first_token_from(enc, end, len(ids), length))
            for start, end in spans]
    if any(None in run for run in runs):  # a bound in no token (a normalizer dropped it): read every offset
        starts = np.array([s for s, _ in enc.offsets], dtype=np.int64)
        bounds = np.array(spans, dtype=np.int64).ravel()  # sorted and apart: inside after an odd count
        return np.where(np.searchsorted(bounds, starts, side="right") % 2 == 1, ids, np.int32(IGNORE)).astype(np.int32)
    labels = np.full(len(ids), IGNORE, dtype=np.int32)
    for a, b in runs:
        labels[a:b] = ids[a:b]
    return labels


def _first_token_from(enc, char: int, n: int, length: int) -> int | None:
    """The first token starting at or after ``char``; None when no token covers it."""
    if char >= length:
        return n
    k = enc.char_to_token(char)
    if k is None:
        return None
    while k > 0 and enc.token_to_chars(k - 1)[0] >= char:  # bytes of one character split over tokens
        k -= 1
    while k < n and enc.token_to_chars(k)[0] < char:
        k += 1
    return k


def tokenize_batch(tokenizer, conversations: list[list[dict]],
                   tools: list[list[dict] | None] | None = None, one_pass: bool = True) -> list[Tokenized | None]:
    """Tokenize conversations with assistant-only labels; None where the template misbehaves.
    ``tools``: each conversation's tools (None for none), in the same order. ``one_pass=False`` finds the
    spans per prefix even where the template marks them."""
    found = Encoder(tokenizer, one_pass).encode(conversations, tools or [None] * len(conversations))
    return [Tokenized(t[0].tolist(), t[1].tolist()) if t is not None else None for t in found]


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
