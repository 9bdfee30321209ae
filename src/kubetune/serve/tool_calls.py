"""Tool calling in chat requests and replies, as OpenAI's API has it: the request's ``tools`` and
``tool_choice``, messages' ``tool_calls``, and a reply written in the template's tool-call format
(``<tool_call>{"name", "arguments"}</tool_call>``, as Qwen and Hermes templates and kubetune's
fromConfig template write it) turned into OpenAI ``tool_calls``, whole or streamed."""

from __future__ import annotations

import json
import re
import uuid

from kubetune.data.formats import FormatError, is_valid_unicode, request_tools, tool_calls_of
from kubetune.openai_errors import RequestError


def parse_tools(body: dict) -> list[dict] | None:
    """The request's tools for the chat template, validated; None when there are none or tool_choice
    is "none". Forcing a call ("required", a named function) is not supported."""
    try:
        tools = request_tools(body.get("tools"))
    except FormatError as e:
        raise RequestError(400, str(e), e.field or "tools") from None
    if tools is not None and not is_valid_unicode(json.dumps(tools, ensure_ascii=False)):
        raise RequestError(400, "tools is not valid Unicode (lone surrogate)", "tools")
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise RequestError(400, "tool_choice must be 'auto' or 'none' (forcing a tool call is not supported)", "tool_choice")
    if body.get("parallel_tool_calls") is not None and not isinstance(body["parallel_tool_calls"], bool):
        raise RequestError(400, "parallel_tool_calls must be a boolean", "parallel_tool_calls")
    return None if choice == "none" else tools


def tool_calls_in(m: dict, i: int) -> list[dict] | None:
    """messages[i]'s tool calls (OpenAI's shape, arguments a JSON string), validated; None for none."""
    try:
        calls = tool_calls_of(m, i)
    except FormatError as e:
        raise RequestError(400, str(e), e.field) from None
    if calls and m["role"] != "assistant":
        raise RequestError(400, f"messages[{i}]: only assistant messages have tool_calls", f"messages[{i}].tool_calls")
    if calls and not is_valid_unicode(json.dumps(calls, ensure_ascii=False)):
        raise RequestError(400, f"messages[{i}].tool_calls is not valid Unicode (lone surrogate)", f"messages[{i}].tool_calls")
    return calls


TOOL_CALL_OPEN = "<tool_call>"
_TOOL_CALL = re.compile(r"\s*<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str, names: set[str] | None = None) -> tuple[str | None, list[dict]] | None:
    """A reply in the template's tool-call format as (the text before the calls or None, OpenAI
    tool_calls); None when it is not one: no call, text after the calls, a call that is not JSON with a
    name and arguments, or (given ``names``) one to a function the request did not offer."""
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return None
    pos, calls = start, []
    while (m := _TOOL_CALL.match(text, pos)) is not None:
        try:
            call = json.loads(m.group(1))
        except ValueError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
            return None
        if names is not None and call["name"] not in names:
            return None
        arguments = call["arguments"]
        if isinstance(arguments, str):  # arguments written as JSON text
            try:
                json.loads(arguments)
            except ValueError:
                return None
        else:
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": arguments}})
        pos = m.end()
    if not calls or text[pos:].strip():
        return None
    return text[:start].strip() or None, calls


class ToolCallSplitter:
    """Streamed text up to the first <tool_call> (holding back what could be its start); the rest,
    the calls, is kept for the end."""

    def __init__(self):
        self.buffer, self.calling = "", False

    def feed(self, piece: str) -> str:
        self.buffer += piece
        if self.calling:
            return ""
        at = self.buffer.find(TOOL_CALL_OPEN)
        if at >= 0:
            self.calling = True
            out, self.buffer = self.buffer[:at], self.buffer[at:]
            return out
        hold = next((k for k in range(min(len(TOOL_CALL_OPEN) - 1, len(self.buffer)), 0, -1)
                     if TOOL_CALL_OPEN.startswith(self.buffer[-k:])), 0)
        out, self.buffer = self.buffer[: len(self.buffer) - hold], self.buffer[len(self.buffer) - hold :]
        return out

    def rest(self) -> str:
        out, self.buffer = self.buffer, ""
        return out
