"""Tool-calling conversations as OpenAI's fine-tuning format has them (``tools``, assistant
``tool_calls``, ``role: "tool"`` results): strict validation with a reason per bad line, labels on the
assistant's calls only, tools carried through ``prepare``, and the chat endpoint taking ``tools`` and
answering with ``tool_calls`` through the official openai client."""

from __future__ import annotations

import asyncio
import copy
import json
import threading

import openai
import orjson
import pyarrow.parquet as pq
import pytest
import torch
from aiohttp import web

from conftest import EXAMPLES, free_port, job_doc
from kubetune.data.clean import clean_arguments, conversation_text, quality_problem
from kubetune.data.formats import FormatError, standardize, tools_of
from kubetune.data.pii import Scrubber
from kubetune.data.prepare import prepare
from kubetune.data.tokenize import IGNORE, render_with_spans, tokenize_batch
from kubetune.models import CHATML_TEMPLATE, config_for, train_tokenizer
from kubetune.serve.engine import Result
from kubetune.serve.server import RequestError, make_app, parse_request
from kubetune.serve.tool_calls import ToolCallSplitter, parse_tool_calls, parse_tools
from kubetune.spec import FromConfig, parse_job

TOOL_DATA = EXAMPLES / "tool-calls.jsonl"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
PLAIN_CHATML = (  # the fromConfig template before tool calling: conversations without tools render exactly so
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_LIKE = (  # a template that knows nothing of tools
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def record() -> dict:
    return {"tools": [copy.deepcopy(WEATHER)], "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and rain"},
        {"role": "assistant", "content": "It is 18C and raining in Paris."}]}


def changed(edit) -> dict:
    r = record()
    edit(r)
    return r


def _set(path: str, value):
    """An edit setting ``record[path]`` ("messages.2.content"); value ``...`` deletes the key."""
    def edit(r):
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = r
        for k in parents:
            node = node[k]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    return edit


# --- formats ----------------------------------------------------------------------------------

def test_a_tool_calling_record_keeps_calls_results_and_tools():
    r = record()
    messages = standardize(r)
    assert [(m["role"], m["weight"]) for m in messages] == [
        ("system", 0), ("user", 0), ("assistant", 1), ("tool", 0), ("assistant", 1)]
    assert messages[2]["content"] is None
    assert messages[2]["tool_calls"] == r["messages"][2]["tool_calls"]
    assert messages[3]["tool_call_id"] == "call_1" and "tool_calls" not in messages[3]
    assert "tool_call_id" not in messages[1] and "tool_calls" not in messages[4]
    assert tools_of(r) == [WEATHER]
    assert tools_of({"prompt": "p", "completion": "c", "tools": "anything"}) is None  # not a chat record
    assert tools_of({"messages": [], "tools": []}) is None


def test_legacy_functions_become_tools():
    legacy = {"functions": [WEATHER["function"]], "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"role": "function", "name": "get_weather", "content": "3C"},
        {"role": "assistant", "content": "3C in Oslo."}]}
    messages = standardize(legacy)
    assert tools_of(legacy) == [WEATHER]
    assert messages[1]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    assert messages[2] == {"role": "tool", "content": "3C", "weight": 0, "tool_call_id": "call_1"}


def test_json_text_columns_and_parquet_nulls():
    r = record()
    r["tools"] = json.dumps(r["tools"])  # CSV and parquet hold nested fields as JSON text
    for m in r["messages"]:  # a parquet struct column gives every message every field
        m.setdefault("tool_calls", None)
        m.setdefault("tool_call_id", None)
        m.setdefault("weight", None)
    assert standardize(r) == standardize(record()) and tools_of(r) == [WEATHER]


BAD = [
    (_set("messages.2.tool_calls.0.function.arguments", "{city: Paris}"),
     "messages[2].tool_calls[0].function.arguments must be a JSON string"),
    (_set("messages.2.tool_calls.0.function.arguments", {"city": "Paris"}),
     "messages[2].tool_calls[0].function.arguments must be a JSON string"),
    (_set("messages.2.tool_calls.0.function.arguments", '{"t": NaN}'),
     "messages[2].tool_calls[0].function.arguments must be a JSON string"),
    (_set("messages.3.tool_call_id", ...), "messages[3]: tool message without tool_call_id"),
    (_set("messages.3.tool_call_id", "call_9"), "messages[3]: tool_call_id 'call_9' matches no earlier tool call"),
    (_set("messages.3.tool_call_id", 7), "messages[3]: tool_call_id must be a string"),
    (_set("messages.3.content", None), "messages[3]: missing content"),
    (_set("messages.3.weight", 1), "messages[3]: weight is only allowed on assistant messages"),
    (_set("tools.0.type", "x"), "tools[0]: unknown type 'x'"),
    (_set("tools.0.function.name", "get weather"), "tools[0].function.name must be 1-64 letters"),
    (_set("tools.0.function.parameters", [1]), "tools[0].function.parameters must be a JSON schema object"),
    (_set("tools.0.function.description", 5), "tools[0].function.description must be a string"),
    (_set("tools", {"get_weather": {}}), "tools must be a list"),
    (_set("functions", [WEATHER["function"]]), "either tools or (legacy) functions"),
    (lambda r: r["tools"].append(copy.deepcopy(WEATHER)), "tools[1].function.name 'get_weather' is defined twice"),
    (_set("messages.2.tool_calls.0.function.name", "get_time"),
     "messages[2].tool_calls[0].function.name 'get_time' is not one of the record's tools"),
    (_set("messages.2.tool_calls.0.id", ...), "messages[2].tool_calls[0].id must be a non-empty string"),
    (_set("messages.2.tool_calls.0.type", "code"), "messages[2].tool_calls[0]: unknown type 'code'"),
    (_set("messages.2.tool_calls.0.function", "get_weather"), "messages[2].tool_calls[0].function must be an object"),
    (_set("messages.2.tool_calls", {"id": "call_1"}), "messages[2].tool_calls must be a list"),
    (_set("messages.2.tool_calls", []), "messages[2]: missing content"),  # no calls: a reply needs content
    (_set("messages.1.tool_calls", [{"id": "c0", "function": {"name": "get_weather", "arguments": "{}"}}]),
     "messages[1]: tool_calls are only allowed on assistant messages"),
    (lambda r: r["messages"][2]["tool_calls"].append(copy.deepcopy(r["messages"][2]["tool_calls"][0])),
     "messages[2].tool_calls[1].id 'call_1' is used twice"),
    (_set("messages.1.tool_call_id", "call_1"), "messages[1]: tool_call_id is only allowed on tool messages"),
    (lambda r: r["messages"].insert(1, {"role": "function", "name": "get_weather", "content": "x"}),
     "messages[1]: function message 'get_weather' answers no earlier function_call"),
]


@pytest.mark.parametrize("edit, reason", BAD)
def test_bad_tool_shapes_say_which_field(edit, reason):
    bad = changed(edit)
    with pytest.raises(FormatError, match=reason.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        standardize(bad)
        tools_of(bad)


# --- template and labels ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"user: weather in city {i}? assistant: get_weather city {i} is 18C and raining" for i in range(200)]
    return train_tokenizer(texts, vocab_size=400)


def _trained_text(tok, t) -> str:
    return tok.decode([i for i, label in zip(t.input_ids, t.labels) if label != IGNORE])


def test_the_calls_are_trained_the_results_and_the_tools_are_not(tokenizer):
    r = record()
    [t] = tokenize_batch(tokenizer, [standardize(r)], [tools_of(r)])
    trained = _trained_text(tokenizer, t)
    assert trained == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
                       "It is 18C and raining in Paris.<|im_end|>\n")
    whole = tokenizer.decode(t.input_ids)
    for untrained in ("18C and rain", "<tool_response>", "# Tools", '"description": "Current weather of a city"', "Be brief."):
        assert untrained in whole and untrained not in trained.replace("18C and raining in Paris", "")


def test_prefix_spans_match_the_template(tokenizer):
    r = record()
    messages, tools = standardize(r), tools_of(r)
    full, spans = render_with_spans(tokenizer, messages, tools)
    from kubetune.data.formats import template_messages

    assert full == tokenizer.apply_chat_template(template_messages(messages), tools=tools, tokenize=False)
    assert [full[s:e] for s, e in spans] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
        "It is 18C and raining in Paris.<|im_end|>\n"]
    assert full.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")  # the system message and the tools: one turn
    # a turn with text and two calls; a conversation that opens with the assistant
    both = [{"role": "assistant", "content": "Checking.", "weight": 1, "tool_calls": [
        {"id": f"c{k}", "type": "function", "function": {"name": "get_weather", "arguments": f'{{"city": "{c}"}}'}}
        for k, c in enumerate(["Oslo", "Rome"])]}]
    full, [(s, e)] = render_with_spans(tokenizer, both, tools)
    assert full[s:e] == ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
                         '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n')


def test_without_tools_the_template_renders_as_before(tokenizer):
    conversations = [[{"role": "system", "content": "S"}, {"role": "user", "content": "u'\"{{ x }}"},
                      {"role": "assistant", "content": "a\n"}], [{"role": "assistant", "content": ""}],
                     [{"role": "user", "content": "x"}]]
    for conversation in conversations:
        for prompt in (False, True):
            tokenizer.chat_template = PLAIN_CHATML
            before = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
            tokenizer.chat_template = CHATML_TEMPLATE
            for tools in ({}, {"tools": None}, {"tools": []}):
                assert tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt,
                                                     **tools) == before


def test_a_template_without_tool_support_is_a_template_mismatch(tokenizer):
    r = record()
    plain = [{"role": "user", "content": "Hi?", "weight": 0}, {"role": "assistant", "content": "Hello.", "weight": 1}]
    tokenizer.chat_template = LLAMA3_LIKE
    try:  # it fails on a null content, and with content it leaves the calls out
        with_text = standardize(changed(_set("messages.2.content", "Let me look.")))
        assert tokenize_batch(tokenizer, [standardize(r), with_text, plain], [tools_of(r), tools_of(r), None])[:2] == [None, None]
        assert tokenize_batch(tokenizer, [plain])[0] is not None
    finally:
        tokenizer.chat_template = CHATML_TEMPLATE


# --- cleaning ----------------------------------------------------------------------------------

def test_a_call_only_reply_is_not_too_short_and_its_call_is_in_the_dedup_text():
    messages = standardize(record())[:4]  # ends with the call and its result: no text reply at all
    assert quality_problem(messages, min_chars=200, max_repetition=0.5) is None
    assert 'assistant: get_weather({"city": "Paris"})' in conversation_text(messages)
    assert quality_problem(standardize(record())[:2] + [{"role": "assistant", "content": "", "weight": 1}], 1, 0.5) == "empty_message"


def test_arguments_are_scrubbed_and_normalized_value_by_value():
    scrubber = Scrubber(["email", "card", "phone"])
    arguments = '{"to": "jane@corp.example", "card": 4111111111111111, "n": 3, "note": "a\\u00a0b  ", "ok": true}'
    cleaned = json.loads(clean_arguments(arguments, lambda s: s.replace("\u00a0", " ").strip(), scrubber.scrub))
    assert cleaned == {"to": "<EMAIL>", "card": "<CREDIT_CARD>", "n": 3, "note": "a b", "ok": True}
    assert scrubber.counts["email"] == 1 and scrubber.counts["card"] == 1


# --- prepare -------------------------------------------------------------------------------------

def test_prepare_keeps_tools_scrubs_calls_and_counts_bad_lines(tmp_path):
    pii = record()
    pii["messages"][2]["tool_calls"][0]["function"]["arguments"] = '{"city": "Paris", "notify": "jane@corp.example"}'
    bad = [changed(edit) for edit, _ in (BAD[0], BAD[3], BAD[8])]
    data = tmp_path / "tools.jsonl"
    data.write_bytes(TOOL_DATA.read_bytes() + b"".join(orjson.dumps(r) + b"\n" for r in [pii, *bad]))
    job = parse_job(job_doc(str(data), str(tmp_path / "o"), dataset={"train": str(data), "maxBadFraction": 0.5},
                            preprocessing={"maxSeqLength": 1024, "dedup": {"near": False}}))
    report = prepare(job, log=lambda _: None)

    good = len(TOOL_DATA.read_text().splitlines()) + 1
    assert report["examples_in"] == good and report["bad_lines"]["total"] == 3
    reasons = [b["reason"] for b in report["bad_lines"]["first"]]
    assert len(reasons) == 3 and all(got.startswith(want) for got, (_, want) in zip(reasons, (BAD[0], BAD[3], BAD[8])))
    assert sum(report["examples_out"].values()) == good, report["dropped"]
    assert report["pii_redacted"]["email"] == 1

    out = [orjson.loads(line) for name in ("train", "validation")
           for line in (tmp_path / f"o/prepared/{name}.jsonl").read_bytes().splitlines()]
    assert sum("tools" in r for r in out) == good  # every example of the file has tools
    calls = [c for r in out for m in r["messages"] for c in m.get("tool_calls") or ()]
    assert len(calls) == 13 and all(json.loads(c["function"]["arguments"]) for c in calls)
    assert any(json.loads(c["function"]["arguments"]).get("notify") == "<EMAIL>" for c in calls)
    assert b"jane@corp.example" not in b"".join(p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file())
    assert all(r["tools"][0]["type"] == "function" for r in out)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "o/tokenizer")
    rows = pq.read_table(tmp_path / "o/prepared/train-00000.parquet").to_pylist()
    trained = "".join(tok.decode([i for i, label in zip(r["input_ids"], r["labels"]) if label != IGNORE]) for r in rows)
    whole = "".join(tok.decode(r["input_ids"]) for r in rows)
    assert "<tool_call>" in trained and '"name": "get_weather"' in trained
    assert "<tool_response>" in whole and "<tool_response>" not in trained and "# Tools" not in trained


def test_evaluation_prompts_keep_tools_and_calls(tokenizer):
    from transformers import LlamaForCausalLM

    from kubetune.evaluate.run import generate, held_out

    call_only = {"tools": [WEATHER], "messages": record()["messages"][:3]}  # no written reply: nothing to score
    [(prompt, reference)] = held_out([record(), call_only], samples=5, seed=0)
    assert reference == "It is 18C and raining in Paris."
    text = prompt.render(tokenizer)
    assert "# Tools" in text and '"name": "get_weather"' in text and "<tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config_for(FromConfig(size="tiny"), tokenizer)).eval()
    [(reply, cut)] = generate(model, tokenizer, [prompt], max_new_tokens=3)
    assert isinstance(reply, str) and isinstance(cut, bool)


# --- serving -------------------------------------------------------------------------------------

def test_tool_call_replies_are_parsed():
    calls = parse_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert calls[0] is None and len(calls[1]) == 1
    call = calls[1][0]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    two = parse_tool_calls('Let me check.\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
                           '<tool_call>\n{"name": "b", "arguments": "{\\"x\\": 1}"}\n</tool_call>\n', {"a", "b"})
    assert two[0] == "Let me check." and [c["function"] for c in two[1]] == [
        {"name": "a", "arguments": "{}"}, {"name": "b", "arguments": '{"x": 1}'}]
    assert len({c["id"] for c in two[1]}) == 2
    for text in ["It is sunny.", '<tool_call>{"name": "a", "arguments": {}}</tool_call> and more text',
                 '<tool_call>{"name": "a", "arguments": {}', '<tool_call>{"name": "a"}</tool_call>',
                 "<tool_call>not json</tool_call>", '<tool_call>{"name": "a", "arguments": "{bad"}</tool_call>',
                 '<tool_call>["a"]</tool_call>']:
        assert parse_tool_calls(text) is None, text
    assert parse_tool_calls('<tool_call>{"name": "z", "arguments": {}}</tool_call>', {"a"}) is None  # not offered


def test_streamed_text_stops_where_a_call_starts():
    splitter = ToolCallSplitter()
    pieces = ["Sure", ", one moment <", "tool", "_call>\n{", '"name": "a"', "}</tool_call>"]
    assert [splitter.feed(p) for p in pieces] == ["Sure", ", one moment ", "", "", "", ""]
    assert splitter.rest() == '<tool_call>\n{"name": "a"}</tool_call>'
    plain = ToolCallSplitter()
    assert plain.feed("a <b") == "a <b" and plain.feed(" <t") == " " and plain.feed("able>") == "<table>"
    assert plain.feed("<tool") == "" and plain.rest() == "<tool"  # what the end of a reply held back


class _Named:
    name = "m"


@pytest.mark.parametrize("change, param", [
    ({"tools": [{"type": "x", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools[0].function.parameters"),
    ({"tools": "[]"}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tools_in_a_request_are_400s(change, param):
    with pytest.raises(RequestError) as e:
        parse_tools({"messages": [], **change})
    assert e.value.status == 400 and e.value.param == param


@pytest.mark.parametrize("message, param", [
    ({"role": "tool", "content": "18C"}, "messages[2].tool_call_id"),
    ({"role": "tool", "content": "18C", "tool_call_id": "call_9"}, "messages[2].tool_call_id"),
    ({"role": "tool", "content": "18C", "tool_call_id": 1}, "messages[2].tool_call_id"),
    ({"role": "tool", "tool_call_id": "call_1"}, "messages[2].content"),
    ({"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": "{}"}}]}, "messages[2].tool_calls"),
    ({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": "{x"}}]}, "messages[2].tool_calls[0].function.arguments"),
])
def test_bad_tool_messages_in_a_request_are_400s(message, param):
    history = record()["messages"][1:3]
    with pytest.raises(RequestError) as e:
        parse_request({"messages": [*history, message]}, _Named(), 16)
    assert e.value.status == 400 and e.value.param == param


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    """`kubetune serve`'s app on a tiny untrained model, in this process; the official openai client on it."""
    from transformers import LlamaForCausalLM

    from kubetune.serve.engine import ChatModel

    folder = tmp_path_factory.mktemp("tool-model") / "model"
    tok = train_tokenizer([f"weather in city {i} is 18C, how can I help you today?" for i in range(200)], vocab_size=300)
    torch.manual_seed(0)
    LlamaForCausalLM(config_for(FromConfig(size="tiny"), tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    model = ChatModel(folder, name="tiny")
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(model, max_tokens=16))
    loop.run_until_complete(runner.setup())
    port = free_port()
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield model, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_a_request_with_tools_and_a_tool_result_is_answered(endpoint):
    _, client = endpoint
    messages = record()["messages"][:4]
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="auto",
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert reply.usage.prompt_tokens > 100  # the tools preamble is in the prompt
    without = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="none",
                                             max_tokens=8, temperature=0)
    assert without.usage.prompt_tokens < reply.usage.prompt_tokens  # "none": the tools are not offered
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=8,
                                                 temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.BadRequestError, match="tool_call_id"):
        client.chat.completions.create(model="tiny", messages=messages[:2] + [{"role": "tool", "content": "x", "tool_call_id": "nope"}])


def test_a_tool_call_reply_comes_back_as_tool_calls(endpoint, monkeypatch):
    model, client = endpoint
    text = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

    def stream(ids, p):
        yield from (text[k : k + 7] for k in range(0, len(text), 7))
        yield Result(text, "stop", int(ids.shape[1]), 20)

    monkeypatch.setattr(model, "stream", stream)
    monkeypatch.setattr(model, "complete", lambda ids, p: list(stream(ids, p))[-1])
    question = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.chat.completions.create(model="tiny", messages=question, tools=[WEATHER])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(client.chat.completions.create(model="tiny", messages=question, tools=[WEATHER], stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or ()]
    assert content == "Checking.\n" and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [(t.function.name, json.loads(t.function.arguments)) for t in streamed] == [("get_weather", {"city": "Paris"})]

    # the call goes back into the conversation with its result, and the model is asked again
    follow = question + [choice.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "18C and rain"}]
    assert client.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER]).choices[0].message

    # without tools offered, the same text is just text
    plain = client.chat.completions.create(model="tiny", messages=question)
    assert plain.choices[0].message.content == text and plain.choices[0].finish_reason == "stop"
