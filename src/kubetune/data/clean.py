"""Text normalization and quality filters.

Normalization keeps indentation inside lines (code blocks in replies stay intact): it applies
Unicode NFC, turns exotic spaces into plain ones, removes control characters, strips trailing
whitespace per line and collapses runs of blank lines.

Tool calls count as assistant text (``call_text``): a turn that only calls a tool is not empty, and
its calls are part of the dedup key. Their arguments are cleaned value by value (``clean_arguments``)
so that they stay valid JSON.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Callable

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")
_WORD = re.compile(r"\w+")


def normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def repetition(text: str, n: int = 3) -> float:
    """Fraction of word n-grams that repeat an earlier one (0 = none, near 1 = one phrase looped)."""
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 10:  # too short to judge
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def quality_problem(messages: list[dict], min_chars: int, max_repetition: float) -> str | None:
    """The reason to drop a conversation, or None to keep it. A trained turn that calls a tool is
    never too short (``get_time({})`` is a whole reply)."""
    if any(not m["content"] and not m.get("tool_calls") for m in messages):
        return "empty_message"
    trained = [_turn_text(m) for m in messages if m["role"] == "assistant" and m["weight"]]
    if not trained:
        return "no_assistant_turn"
    reply = "\n".join(trained)
    calls = any(m.get("tool_calls") for m in messages if m["role"] == "assistant" and m["weight"])
    if len(reply) < min_chars and not calls:
        return "too_short"
    if repetition(reply) > max_repetition:
        return "repetitive"
    return None


def conversation_text(messages: list[dict]) -> str:
    """Canonical text of a conversation, the key for exact dedup and the input to MinHash."""
    return "\n".join(f"{m['role']}: {_turn_text(m)}" for m in messages)


def call_text(call: dict) -> str:
    """A tool call as text: ``name(arguments)``."""
    return f"{call['function']['name']}({call['function']['arguments']})"


def _turn_text(m: dict) -> str:
    parts = [m["content"]] if m["content"] else []  # content is None in a turn that only calls tools
    return "\n".join(parts + [call_text(c) for c in m.get("tool_calls") or ()])


def clean_arguments(arguments: str, normalize: Callable[[str], str] | None, scrub: Callable[[str], str]) -> str:
    """A tool call's JSON arguments with every string normalized and scrubbed, and every number
    that scrubbing would change (a card or phone number) replaced by the scrubbed text; the result is
    written back as compact-spaced JSON, as chat templates write it."""

    def walk(value):
        if isinstance(value, str):
            return scrub(normalize(value) if normalize else value)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, int) and not isinstance(value, bool):
            text = str(value)
            scrubbed = scrub(text)
            return value if scrubbed == text else scrubbed
        return value

    return json.dumps(walk(json.loads(arguments)), ensure_ascii=False)
