"""Text normalization and quality filters.

Normalization keeps indentation inside lines (code blocks in replies stay intact): it applies
Unicode NFC, turns exotic spaces into plain ones, removes control characters, strips trailing
whitespace per line and collapses runs of blank lines.
"""

from __future__ import annotations

import re
import unicodedata

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
    """The reason to drop a conversation, or None to keep it."""
    if any(not m["content"] for m in messages):
        return "empty_message"
    trained = [m["content"] for m in messages if m["role"] == "assistant" and m["weight"]]
    if not trained:
        return "no_assistant_turn"
    reply = "\n".join(trained)
    if len(reply) < min_chars:
        return "too_short"
    if repetition(reply) > max_repetition:
        return "repetitive"
    return None


def conversation_text(messages: list[dict]) -> str:
    """Canonical text of a conversation, the key for exact dedup and the input to MinHash."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
