"""Detect a record's format and standardize it to chat messages.

Every format becomes ``[{"role": ..., "content": ..., "weight": 0|1}, ...]``:
- chat: OpenAI chat JSONL ``{"messages": [...]}`` (per-message ``weight`` 0/1 on assistant turns);
- instruction: alpaca ``instruction`` / ``input`` / ``output`` (optional ``system``);
- prompt_completion: ``prompt`` / ``completion``;
- text: ``{"text": ...}`` becomes a single assistant turn, so every token of it is trained on.
"""

from __future__ import annotations

import orjson

ROLES = ("system", "user", "assistant")
FORMATS = ("chat", "instruction", "prompt_completion", "text")


class FormatError(ValueError):
    """The record cannot be turned into a conversation; the message says why."""


def detect(data: dict) -> str:
    if "messages" in data:
        return "chat"
    if "instruction" in data and ("output" in data or "response" in data):
        return "instruction"
    if "prompt" in data and "completion" in data:
        return "prompt_completion"
    if "text" in data:
        return "text"
    raise FormatError("no known fields (expected messages, instruction/output, prompt/completion or text)")


def standardize(data: dict, fmt: str = "auto") -> list[dict]:
    fmt = detect(data) if fmt == "auto" else fmt
    if fmt == "chat":
        return _chat(data)
    if fmt == "instruction":
        user = _text(data, "instruction")
        extra = data.get("input")
        if extra:
            user = f"{user}\n\n{_as_str(extra, 'input')}"
        out = data.get("output", data.get("response"))
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _as_str(out, "output")}]
        if data.get("system"):
            messages.insert(0, {"role": "system", "content": _as_str(data["system"], "system")})
        return _with_weights(messages)
    if fmt == "prompt_completion":
        return _with_weights([{"role": "user", "content": _text(data, "prompt")},
                              {"role": "assistant", "content": _text(data, "completion")}])
    if fmt == "text":
        return _with_weights([{"role": "assistant", "content": _text(data, "text")}])
    raise FormatError(f"unknown format '{fmt}'")


def _chat(data: dict) -> list[dict]:
    raw = data.get("messages")  # absent when format: chat is forced on another kind of record
    if raw is None:
        raise FormatError("missing field 'messages'")
    if isinstance(raw, str):  # a messages column in CSV or parquet holds JSON text
        try:
            raw = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise FormatError("messages is not valid JSON") from None
    if not isinstance(raw, list):
        raise FormatError("messages must be a list")
    if not raw:
        raise FormatError("empty conversation")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise FormatError(f"messages[{i}] is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise FormatError(f"messages[{i}]: unknown role {str(role)[:20]!r}")
        content = _content(m.get("content"), i)
        weight = m.get("weight")
        if weight is None:  # absent, or null where a parquet struct column has it for other messages
            weight = 1 if role == "assistant" else 0
        if weight not in (0, 1) or isinstance(weight, bool):
            raise FormatError(f"messages[{i}]: weight must be 0 or 1")
        if role != "assistant" and weight == 1:
            raise FormatError(f"messages[{i}]: weight is only allowed on assistant messages")
        messages.append({"role": role, "content": content, "weight": weight})
    return messages


def _content(content: object, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        texts = [t for t in texts if isinstance(t, str)]  # a part whose text is not a string is not text
        if len(texts) == len(content):
            return "\n".join(texts)
    if content is None:
        raise FormatError(f"messages[{i}]: missing content")
    raise FormatError(f"messages[{i}]: content must be text")


def _text(data: dict, key: str) -> str:
    if key not in data:
        raise FormatError(f"missing field '{key}'")
    return _as_str(data[key], key)


def _as_str(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise FormatError(f"field '{key}' must be text")
    return value


def _with_weights(messages: list[dict]) -> list[dict]:
    return [{**m, "weight": 1 if m["role"] == "assistant" else 0} for m in messages]


def is_valid_unicode(text: str) -> bool:
    """False for text with lone surrogates (undecodable bytes kept by surrogateescape, or a JSON
    "\\ud800" escape), which UTF-8 cannot encode and tokenizers reject."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
