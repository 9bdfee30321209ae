"""Preference pairs for DPO (``training.objective: dpo``): a record becomes a prompt, a preferred and a
non-preferred assistant answer.

Two record shapes are accepted:

- OpenAI's preference fine-tuning format::

    {"input": {"messages": [...], "tools": [...]},          # tools optional
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

- the common ``prompt`` / ``chosen`` / ``rejected`` one (TRL's datasets): each either text (the prompt a
  user turn, an answer an assistant turn) or, conversationally, a list of messages (the answers a list of
  one assistant message). Without ``prompt``, ``chosen`` and ``rejected`` are whole conversations that
  differ only in their last (assistant) message, which is the answer; the rest is the prompt.

Messages are validated by ``kubetune.data.formats`` (roles, content, tool calls against the record's
tools), so a prompt may hold a whole conversation, tool calls included. Prompt turns are never trained
(weight 0); each answer is one trained assistant turn. A bad shape raises ``FormatError`` naming the field.

In the shards (``kubetune.data.shards``) each pair is two documents of a packed row, chosen then rejected
(``doc_lens`` ``[c, r]``; packing puts several whole pairs in a row, never splitting one), tokenized with
the chat template like any conversation, labels on the answer only.
"""

from __future__ import annotations

import re

from kubetune.data.formats import FormatError, standardize, tools_of

OPENAI_FIELDS = ("input", "preferred_output", "non_preferred_output")
PAIR_FIELDS = ("prompt", "chosen", "rejected")


def is_preference(data: dict) -> bool:
    return any(k in data for k in OPENAI_FIELDS + PAIR_FIELDS[1:])


def standardize_pair(data: dict) -> tuple[list[dict], dict, dict, list[dict] | None]:
    """(prompt messages, preferred assistant message, non-preferred assistant message, tools)."""
    if not isinstance(data, dict) or not is_preference(data):
        raise FormatError("not a preference pair: expected input/preferred_output/non_preferred_output "
                          "(OpenAI) or prompt/chosen/rejected")
    if any(k in data for k in OPENAI_FIELDS):
        return _openai(data)
    return _prompt_chosen_rejected(data)


def _openai(data: dict) -> tuple[list[dict], dict, dict, list[dict] | None]:
    _require(data, OPENAI_FIELDS)
    source = data["input"]
    if not isinstance(source, dict):
        raise FormatError("input must be an object with messages (and optional tools)", "input")
    if "messages" not in source:
        raise FormatError("input has no messages", "input.messages")
    record = {"messages": source["messages"], **{k: source[k] for k in ("tools", "functions") if k in source}}
    prompt, tools = _prompt(record, "input.messages")
    chosen = _answer(record, prompt, _one_message(data["preferred_output"], "preferred_output"), "preferred_output[0]")
    rejected = _answer(record, prompt, _one_message(data["non_preferred_output"], "non_preferred_output"),
                       "non_preferred_output[0]")
    return prompt, chosen, rejected, tools


def _prompt_chosen_rejected(data: dict) -> tuple[list[dict], dict, dict, list[dict] | None]:
    _require(data, PAIR_FIELDS[1:])
    chosen, rejected = data["chosen"], data["rejected"]
    if "prompt" not in data:  # implicit prompt: two conversations that differ in their last message
        if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected):
            raise FormatError("missing field 'prompt' (needed unless chosen and rejected are whole "
                              "conversations that share their prompt)", "prompt")
        if chosen[:-1] != rejected[:-1]:
            raise FormatError("chosen and rejected conversations differ before their last message, so they "
                              "share no prompt", "rejected")
        raw_prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    else:
        raw_prompt = data["prompt"]
    if isinstance(raw_prompt, str):
        raw_prompt = [{"role": "user", "content": raw_prompt}]
    elif not isinstance(raw_prompt, list):
        raise FormatError("prompt must be text or a list of messages", "prompt")
    record = {"messages": raw_prompt, **{k: data[k] for k in ("tools", "functions") if k in data}}
    prompt, tools = _prompt(record, "prompt")
    return prompt, _answer(record, prompt, _pair_answer(chosen, "chosen"), "chosen"), \
        _answer(record, prompt, _pair_answer(rejected, "rejected"), "rejected"), tools


def _require(data: dict, fields: tuple[str, ...]) -> None:
    for k in fields:
        if data.get(k) is None:
            raise FormatError(f"missing field '{k}'", k)


def _prompt(record: dict, field: str) -> tuple[list[dict], list[dict] | None]:
    """The validated prompt messages (none trained) and the record's tools."""
    if not record["messages"]:
        raise FormatError(f"{field} is empty: a preference pair needs a prompt", field)
    try:
        messages = standardize(record, "chat")
        tools = tools_of(record, "chat")
    except FormatError as e:
        raise _renamed(e, "messages", field) from None
    if messages[-1]["role"] == "assistant":
        raise FormatError(f"{field} ends with an assistant message; the answers are what follows the prompt",
                          f"{field}[{len(messages) - 1}]")
    return [{**m, "weight": 0} for m in messages], tools


def _one_message(value: object, field: str) -> object:
    if not isinstance(value, list) or len(value) != 1:
        raise FormatError(f"{field} must be a list of exactly one assistant message", field)
    return value[0]


def _pair_answer(value: object, field: str) -> object:
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, dict):
        return value
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    raise FormatError(f"{field} must be text or a list of exactly one assistant message", field)


def _answer(record: dict, prompt: list[dict], message: object, field: str) -> dict:
    """The answer validated as the turn after the prompt (tool calls checked against the record's tools)."""
    if not isinstance(message, dict):
        raise FormatError(f"{field} is not an object", field)
    if message.get("role") != "assistant":
        raise FormatError(f"{field}: role must be 'assistant' (not {str(message.get('role'))[:20]!r})", f"{field}.role")
    message = {k: v for k, v in message.items() if k != "weight"}  # an answer is always trained
    try:
        messages = standardize({**record, "messages": list(record["messages"]) + [message]}, "chat")
    except FormatError as e:
        raise _renamed(e, f"messages[{len(prompt)}]", field) from None
    return {**messages[-1], "weight": 1}


def _renamed(e: FormatError, old: str, new: str) -> FormatError:
    """formats.py's message about ``messages[...]`` reworded for the field it came from."""
    pattern = re.compile(r"\b" + re.escape(old) + ("" if old.endswith("]") else r"\b"))
    return FormatError(pattern.sub(new, str(e)), pattern.sub(new, e.field) if e.field else new)
