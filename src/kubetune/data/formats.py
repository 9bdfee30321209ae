"""Detect a record's format and standardize it to chat messages.

Every format becomes ``[{"role": ..., "content": ..., "weight": 0|1}, ...]``:
- chat: OpenAI chat JSONL ``{"messages": [...]}`` (per-message ``weight`` 0/1 on assistant turns),
  with OpenAI's tool calling: the record's ``tools`` (or legacy ``functions``, see ``tools_of``),
  assistant messages with ``tool_calls`` (content may then be null: it stays None) and ``role: "tool"``
  messages whose ``tool_call_id`` answers an earlier call; legacy ``function_call`` / ``role: "function"``
  become the same. A tool call's ``arguments`` is a JSON string, as in OpenAI's format;
  ``template_messages`` hands it to a chat template parsed, as Hugging Face templates expect;
- instruction: alpaca ``instruction`` / ``input`` / ``output`` (optional ``system``);
- prompt_completion: ``prompt`` / ``completion``;
- text: ``{"text": ...}`` becomes a single assistant turn, so every token of it is trained on.
"""

from __future__ import annotations

import json
import re

import orjson

ROLES = ("system", "user", "assistant", "tool")  # the roles a conversation's messages may have
FORMATS = ("chat", "instruction", "prompt_completion", "text")
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


class FormatError(ValueError):
    """The record cannot be turned into a conversation; the message says why (``field``: where, if known)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


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
    raw = _json_column(raw, "messages")
    if not isinstance(raw, list):
        raise FormatError("messages must be a list")
    if not raw:
        raise FormatError("empty conversation")
    tools = _tools(data)
    declared = {t["function"]["name"] for t in tools} if tools is not None else None
    messages: list[dict] = []
    calls: dict[str, str] = {}  # tool call id -> function name, for the tool messages that answer them
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise FormatError(f"messages[{i}] is not an object")
        m = _legacy_function_message(m, i, messages, calls)
        role = m.get("role")
        if role not in ROLES:
            raise FormatError(f"messages[{i}]: unknown role {str(role)[:20]!r}")
        tool_calls = tool_calls_of(m, i, declared)  # null is absent: parquet gives every message every field
        if tool_calls is not None and role != "assistant":
            raise FormatError(f"messages[{i}]: tool_calls are only allowed on assistant messages", f"messages[{i}].tool_calls")
        if tool_calls is not None and m.get("content") is None:  # a tool-call-only turn: content null or absent
            content = None
        else:
            content = _content(m.get("content"), i)
        weight = m.get("weight")
        if weight is None:  # absent, or null where a parquet struct column has it for other messages
            weight = 1 if role == "assistant" else 0
        if weight not in (0, 1) or isinstance(weight, bool):
            raise FormatError(f"messages[{i}]: weight must be 0 or 1")
        if role != "assistant" and weight == 1:
            raise FormatError(f"messages[{i}]: weight is only allowed on assistant messages")
        message = {"role": role, "content": content, "weight": weight}
        if tool_calls is not None:
            for j, call in enumerate(tool_calls):
                if call["id"] in calls:
                    raise FormatError(f"messages[{i}].tool_calls[{j}].id {call['id'][:40]!r} is used twice",
                                      f"messages[{i}].tool_calls[{j}].id")
                calls[call["id"]] = call["function"]["name"]
            message["tool_calls"] = tool_calls
        call_id = m.get("tool_call_id")
        if role == "tool":
            if call_id is None:
                raise FormatError(f"messages[{i}]: tool message without tool_call_id", f"messages[{i}].tool_call_id")
            if not isinstance(call_id, str):
                raise FormatError(f"messages[{i}]: tool_call_id must be a string", f"messages[{i}].tool_call_id")
            if call_id not in calls:
                raise FormatError(f"messages[{i}]: tool_call_id {call_id[:40]!r} matches no earlier tool call",
                                  f"messages[{i}].tool_call_id")
            message["tool_call_id"] = call_id
        elif call_id is not None:
            raise FormatError(f"messages[{i}]: tool_call_id is only allowed on tool messages", f"messages[{i}].tool_call_id")
        messages.append(message)
    return messages


def tools_of(data: dict, fmt: str = "auto") -> list[dict] | None:
    """A chat record's tools, validated, in OpenAI's shape (legacy ``functions`` converted); None if it
    has none or is not a chat record. ``standardize`` hands back the messages, this their tools."""
    if (detect(data) if fmt == "auto" else fmt) != "chat":
        return None
    return _tools(data)


def request_tools(tools: object) -> list[dict] | None:
    """The ``tools`` of a chat completion request, validated as a record's are (JSON values only: no
    JSON text, which only CSV and parquet columns hold); None for none."""
    return _tools({"tools": tools}, columns=False)


def _tools(data: dict, columns: bool = True) -> list[dict] | None:
    tools, functions = data.get("tools"), data.get("functions")
    if tools is not None and functions is not None:
        raise FormatError("a record has either tools or (legacy) functions, not both", "tools")
    if functions is not None:
        functions = _json_column(functions, "functions") if columns else functions
        if not isinstance(functions, list):
            raise FormatError("functions must be a list", "functions")
        tools = [{"type": "function", "function": f} for f in functions]
        where = "functions[{k}]"
    elif tools is not None:
        tools = _json_column(tools, "tools") if columns else tools
        if not isinstance(tools, list):
            raise FormatError("tools must be a list", "tools")
        where = "tools[{k}]"
    if not tools:  # absent, null or []
        return None
    out, names = [], set()
    for k, tool in enumerate(tools):
        at = where.format(k=k)
        if not isinstance(tool, dict):
            raise FormatError(f"{at} is not an object", at)
        if tool.get("type") != "function":
            raise FormatError(f"{at}: unknown type {str(tool.get('type'))[:20]!r} (expected 'function')", f"{at}.type")
        at = f"{at}.function" if functions is None else at  # a legacy function is its own definition
        out.append({"type": "function", "function": _function_definition(tool.get("function"), at, columns)})
        name = out[-1]["function"]["name"]
        if name in names:
            raise FormatError(f"{at}.name {name!r} is defined twice", f"{at}.name")
        names.add(name)
    return out


def _function_definition(fn: object, at: str, columns: bool) -> dict:
    if not isinstance(fn, dict):
        raise FormatError(f"{at} must be an object", at)
    name = fn.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise FormatError(f"{at}.name must be 1-64 letters, digits, '_' or '-'", f"{at}.name")
    out: dict = {"name": name}
    if fn.get("description") is not None:
        if not isinstance(fn["description"], str):
            raise FormatError(f"{at}.description must be a string", f"{at}.description")
        out["description"] = fn["description"]
    if fn.get("parameters") is not None:
        parameters = _json_column(fn["parameters"], f"{at}.parameters") if columns else fn["parameters"]
        if not isinstance(parameters, dict):
            raise FormatError(f"{at}.parameters must be a JSON schema object", f"{at}.parameters")
        out["parameters"] = parameters
    if fn.get("strict") is not None:
        if not isinstance(fn["strict"], bool):
            raise FormatError(f"{at}.strict must be a boolean", f"{at}.strict")
        out["strict"] = fn["strict"]
    return out


def tool_calls_of(m: dict, i: int, declared: set[str] | None = None) -> list[dict] | None:
    """messages[i]'s tool calls, validated (arguments a JSON string), or None when it has none.
    ``declared``: the names of the record's tools; a call to another function is an error."""
    raw = m.get("tool_calls")
    if raw is None or raw == []:
        return None
    at = f"messages[{i}].tool_calls"
    if not isinstance(raw, list):
        raise FormatError(f"{at} must be a list", at)
    out = []
    for j, call in enumerate(raw):
        cat = f"{at}[{j}]"
        if not isinstance(call, dict):
            raise FormatError(f"{cat} is not an object", cat)
        if call.get("type", "function") != "function":
            raise FormatError(f"{cat}: unknown type {str(call.get('type'))[:20]!r} (expected 'function')", f"{cat}.type")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise FormatError(f"{cat}.id must be a non-empty string", f"{cat}.id")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise FormatError(f"{cat}.function must be an object", f"{cat}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise FormatError(f"{cat}.function.name must be a non-empty string", f"{cat}.function.name")
        if declared is not None and name not in declared:
            raise FormatError(f"{cat}.function.name {name[:64]!r} is not one of the record's tools", f"{cat}.function.name")
        arguments = fn.get("arguments")
        if not isinstance(arguments, str) or not _is_json(arguments):
            raise FormatError(f"{cat}.function.arguments must be a JSON string", f"{cat}.function.arguments")
        out.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    return out


def _legacy_function_message(m: dict, i: int, earlier: list[dict], calls: dict[str, str]) -> dict:
    """OpenAI's legacy function calling as tool calling: an assistant ``function_call`` becomes one tool
    call (id ``call_{i}``), a ``role: "function"`` message the tool message answering the latest
    unanswered call of that name."""
    if m.get("function_call") is not None:
        if m.get("tool_calls") is not None:
            raise FormatError(f"messages[{i}]: function_call and tool_calls together", f"messages[{i}].function_call")
        return {**m, "tool_calls": [{"id": f"call_{i}", "type": "function", "function": m["function_call"]}],
                "function_call": None}
    if m.get("role") != "function":
        return m
    name = m.get("name")
    answered = {e.get("tool_call_id") for e in earlier}
    for call_id, called in reversed(list(calls.items())):
        if called == name and call_id not in answered:
            return {**m, "role": "tool", "tool_call_id": call_id}
    raise FormatError(f"messages[{i}]: function message {str(name)[:64]!r} answers no earlier function_call",
                      f"messages[{i}].name")


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates take them: role, content, tool calls with their arguments parsed
    (Hugging Face templates expect a dict and write it as JSON), tool_call_id; no weights."""
    out = []
    for m in messages:
        message = {"role": m["role"], "content": m["content"]}
        if m.get("tool_calls"):
            message["tool_calls"] = [
                {"id": c["id"], "type": "function",
                 "function": {"name": c["function"]["name"], "arguments": _loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]]
        if m.get("tool_call_id") is not None:
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    return out


def _json_column(value: object, key: str) -> object:
    """A field that a CSV or parquet column holds as JSON text, parsed; other values as they are."""
    if not isinstance(value, str):
        return value
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        raise FormatError(f"{key} is not valid JSON", key) from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str) -> object:
    """Strict JSON (no NaN or Infinity), with integers of any size (orjson stops at 64 bits)."""
    return json.loads(text, parse_constant=_reject_constant)


def _is_json(text: str) -> bool:
    """Strict JSON whose strings are valid Unicode (a "\\ud800" escape is not: tokenizers reject it)."""
    try:
        return is_valid_unicode(json.dumps(_loads(text), ensure_ascii=False))
    except (ValueError, RecursionError):
        return False


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
