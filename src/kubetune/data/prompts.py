"""Prompts for reinforcement fine-tuning (``training.objective: rft``), in OpenAI's format: each line has
``messages`` (the prompt: system/developer/user turns, no final assistant turn) and any other fields, the
*item* a grader reads as ``{{item.FIELD}}`` (``reference_answer``, ``label``, ...)::

    {"messages": [{"role": "user", "content": "Order 4417 is late"}], "label": "shipping"}

The messages are validated like a conversation (``kubetune.data.formats``), then cleaned and scrubbed; the
item is kept as it is (a grader compares against it exactly). A line without a field the grader references
fails preparation (``MissingItemField``), naming the line and the field: every sample of it would score 0.
"""

from __future__ import annotations

from kubetune.data.formats import FormatError, standardize, tools_of
from kubetune.errors import KubetuneError

PROMPT_FIELDS = ("messages", "tools", "functions", "parallel_tool_calls")  # the rest is the item


class MissingItemField(KubetuneError):
    """A data line lacks an item field the grader reads (exit 3: the data must be fixed)."""


def standardize_prompt(data: dict, where: str, fields: set[str]) -> tuple[list[dict], list[dict] | None, dict]:
    """(prompt messages, tools, item) of one line; ``where`` (file:line) and the grader's ``fields`` for the error."""
    if "messages" not in data:
        raise FormatError("missing field 'messages' (the prompt)", "messages")
    messages, tools = standardize(data, "chat"), tools_of(data, "chat")
    if messages[-1]["role"] == "assistant":
        raise FormatError("messages ends with an assistant message; the prompt is what the model answers",
                          f"messages[{len(messages) - 1}]")
    item = {k: v for k, v in data.items() if k not in PROMPT_FIELDS}
    for name in sorted(fields):
        if not has_field(item, name):
            raise MissingItemField(f"{where}: the item field '{name}' that training.rft.grader reads is missing")
    return [{**m, "weight": 0} for m in messages], tools, item


def has_field(item: dict, dotted: str) -> bool:
    value = item
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def prompt_problem(messages: list[dict]) -> str | None:
    """The reason to drop a prompt (an empty turn), or None. The length and repetition filters are about
    trained answers, which a prompt has none of."""
    if any(not m["content"] and not m.get("tool_calls") for m in messages):
        return "empty_message"
    return None
