"""Graders as a library: each type's scores, templates, validation errors naming the field, formula safety,
the python grader's sandbox (limits, no network, no parent secrets) and score_model against a real HTTP
endpoint.

score_model's endpoint is a tiny stdlib HTTP server in this file answering chat completions with the reply a
test asks for (a real server and a real socket: only the model is missing, whose scores could not be
asserted); test_score_model_against_a_real_kubetune_serve checks the same code against `kubetune serve` of a
tiny untrained model, whose reply is noise, for the protocol only.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kubetune.graders import (GraderError, GraderUnavailable, ModelEndpoint, PythonLimits, Runner, grade,
                              grade_batch, isolation, parse_grader, referenced_item_fields)
from kubetune.graders.similarity import gleu, score


def check(input: str, reference: str, operation: str = "eq") -> dict:
    return {"type": "string_check", "name": "check", "input": input, "reference": reference, "operation": operation}


def python(source: str) -> dict:
    return {"type": "python", "name": "py", "source": source}


def multi(formula: str, **graders) -> dict:
    return {"type": "multi", "name": "multi", "graders": graders, "calculate_output": formula}


def reward(grader: dict, sample: str, item: dict | None = None, **kw) -> float:
    return grade(parse_grader(grader), sample, item or {}, **kw).reward


def refused(grader: dict) -> GraderError:
    with pytest.raises(GraderError) as e:
        parse_grader(grader)
    return e.value


# --- string_check and text_similarity ---------------------------------------------------------


@pytest.mark.parametrize("operation, sample, expected", [
    ("eq", "Paris", 1.0), ("eq", "paris", 0.0), ("ne", "Lyon", 1.0), ("ne", "Paris", 0.0),
    ("like", "It is Paris.", 1.0), ("like", "It is paris.", 0.0), ("ilike", "IT IS PARIS", 1.0), ("ilike", "Lyon", 0.0),
])
def test_string_check_operations(operation, sample, expected):
    g = check("{{sample.output_text}}", "{{item.answer}}", operation)
    assert reward(g, sample, {"answer": "Paris"}) == expected


def similarity(metric: str) -> dict:
    return {"type": "text_similarity", "name": "sim", "input": "{{sample.output_text}}",
            "reference": "{{item.reference}}", "evaluation_metric": metric}


def test_text_similarity_metrics():
    ref = {"reference": "the cat sat on the mat"}
    for metric in ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"):
        assert reward(similarity(metric), "the cat sat on the mat", ref) == pytest.approx(1.0), metric
        assert reward(similarity(metric), "", ref) == 0.0, metric
    assert reward(similarity("rouge_1"), "the cat ran", {"reference": "the cat sat"}) == pytest.approx(2 / 3)
    assert reward(similarity("rouge_2"), "the cat ran", {"reference": "the cat sat"}) == pytest.approx(1 / 2)
    assert reward(similarity("rouge_l"), "cat the sat", {"reference": "the cat sat"}) == pytest.approx(2 / 3)
    assert reward(similarity("fuzzy_match"), "abcd", {"reference": "abce"}) == pytest.approx(0.75)
    import sacrebleu

    text, reference = "the quick brown fox jumps over a dog", "the quick brown fox jumped over the lazy dog"
    assert score("bleu", text, reference) == pytest.approx(sacrebleu.sentence_bleu(text, [reference]).score / 100)


def test_gleu_equals_nltks_sentence_gleu():
    from nltk.translate.gleu_score import sentence_gleu

    pairs = [("the cat sat on the mat", "the cat is on the mat"), ("a b c d e", "e d c b a"),
             ("one", "one two three four five"), ("it is a guide to action", "it is a guide to action that ensures")]
    for hyp, ref in pairs:
        assert gleu(hyp.split(), ref.split()) == pytest.approx(sentence_gleu([ref.split()], hyp.split())), hyp


def test_unsupported_and_unknown_metrics_are_refused_naming_the_field():
    e = refused(similarity("meteor"))
    assert e.param == "grader.evaluation_metric" and "not supported here" in str(e) and "WordNet" in str(e)
    assert "not supported here" in str(refused(similarity("cosine")))
    e = refused(similarity("rouge_6"))
    assert e.param == "grader.evaluation_metric" and "unknown evaluation_metric 'rouge_6'" in str(e)
    e = refused(check("a", "b", "contains"))
    assert e.param == "grader.operation" and "unknown operation 'contains'" in str(e)
    e = refused({"type": "label_model", "name": "x"})
    assert e.param == "grader.type" and "unknown grader type 'label_model'" in str(e)
    e = refused({**check("a", "b"), "pass_threshold": 0.5})
    assert e.param == "grader.pass_threshold"


# --- templates ---------------------------------------------------------------------------------


def test_templates_read_nested_item_fields_list_indexes_and_the_samples_json():
    item = {"a": {"b": "deep"}, "answers": ["first", "second"], "n": 42, "flag": True}
    g = check("{{ item.a.b }}|{{item.answers.1}}|{{item.n}}|{{item.flag}}|{{sample.output_json.x.y}}",
              "deep|second|42|true|7")
    assert reward(g, json.dumps({"x": {"y": 7}}), item) == 1.0
    assert reward(check("{{sample.output_text}}", '{"k": 1}'), '{"k": 1}') == 1.0


def test_a_missing_item_field_is_an_error_naming_it():
    g = parse_grader(check("{{sample.output_text}}", "{{item.meta.answer}}"))
    with pytest.raises(GraderError, match="'meta.answer'") as e:
        grade(g, "x", {"meta": {"question": "q"}})
    assert e.value.param == "item"
    assert referenced_item_fields(g) == {"meta.answer"}
    m = parse_grader(multi("a + b", a=check("{{item.x}}", "{{item.y.z}}"), b=python("def grade(s, i): return 1")))
    assert referenced_item_fields(m) == {"x", "y.z"}


def test_a_sample_missing_what_the_grader_reads_scores_zero_with_the_flag():
    g = parse_grader(check("{{sample.output_json.answer}}", "{{item.answer}}"))
    not_json = grade(g, "the answer is 4", {"answer": "4"})
    assert not_json.reward == 0.0 and not_json.errors.flags == {"sample_parse_error"}
    no_field = grade(g, '{"result": 4}', {"answer": "4"})
    assert no_field.reward == 0.0 and no_field.errors.flags == {"invalid_variable_error"}
    assert grade(g, '{"answer": 4}', {"answer": "4"}).reward == 1.0


@pytest.mark.parametrize("text, why", [
    ("{{item}}", "is not a reference"), ("{{ foo.bar }}", "is not a reference"), ("{{item.a..b}}", "invalid key ''"),
    ("{{item.a b}}", "invalid key 'a b'"), ("{{sample.output}}", "sample has output_text, output_json"),
    ("{{sample.output_text.x}}", "has no fields"), ("x {{item.a", "without a closing"),
])
def test_bad_template_references_are_refused_naming_the_field(text, why):
    e = refused(check("{{sample.output_text}}", text))
    assert e.param == "grader.reference" and why in str(e), str(e)
    e = refused(multi("a", a=check(text, "x")))
    assert e.param == "grader.graders.a.input", e.param
    e = refused({"type": "score_model", "name": "s", "model": "m",
                 "input": [{"role": "user", "content": [{"type": "input_text", "text": text}]}]})
    assert e.param == "grader.input.0.content", e.param


# --- multi and its formula ---------------------------------------------------------------------


def test_multi_combines_sub_rewards_with_the_formula():
    g = multi("0.5 * exact + 0.5 * sim ^ 2", exact=check("{{sample.output_text}}", "{{item.answer}}"),
              sim=similarity("fuzzy_match") | {"reference": "{{item.answer}}"})
    result = grade(parse_grader(g), "abcd", {"answer": "abce"})
    assert result.sub_rewards == {"exact": 0.0, "sim": pytest.approx(0.75)}
    assert result.reward == pytest.approx(0.5 * 0.75 ** 2)  # ^ is power, binding tighter than *
    fns = multi("min(a, 1) + max(a, 0.5, 0.25) + abs(-a) + sqrt(4) + log(exp(2)) + floor(1.7) + ceil(0.2) - -1 / 2",
                a=check("x", "x"))
    assert reward(fns, "") == pytest.approx(1 + 1 + 1 + 2 + 2 + 1 + 1 + 0.5)


@pytest.mark.parametrize("formula, why", [
    ("__import__('os')", "'__import__' is not a function"), ("__import__('os').system('id')", "is not a function"),
    ("a.__class__", "is not allowed"),
    ("(lambda: 1)()", "is not a function"), ("[a for a in (1,)]", "is not allowed"), ("'a' * 3", "is not a number"),
    ("min(a, key=abs)", "is not a function"), ("9 ** 9 ** 9", "exponent 9 ** 9 is too large"),
    ("a ** 1000", "exponent 1000 is too large"), ("2 ^ 99", "exponent 99 is too large"), ("b + 1", "refers to 'b'"),
    ("a if a else 1", "is not allowed"), ("a < 1", "is not allowed"), ("sqrt(a, a)", "sqrt() takes 1"),
    ("True + a", "is not a number"), ("a +", "not a formula"), ("(" * 300 + "a" + ")" * 300, "not a formula"),
])
def test_formulas_outside_the_whitelist_are_refused(formula, why):
    e = refused(multi(formula, a=check("x", "x")))
    assert e.param == "grader.calculate_output" and why in str(e), str(e)


def test_formula_arithmetic_errors_score_zero_with_a_flag():
    for formula in ("a / (a - 1)", "log(a - 1)", "exp(a * 1000)", "(a - 2) ^ 0.5", "(a + 1) ** (a * 100000)"):
        result = grade(parse_grader(multi(formula, a=check("x", "x"))), "", {})
        assert result.reward == 0.0 and result.errors.flags == {"other_error"}, formula


# --- python graders ----------------------------------------------------------------------------

FAST = PythonLimits(cpu_seconds=2, wall_seconds=20, memory_bytes=512 * 2**20)


def test_python_grader_reads_sample_and_item_and_one_process_serves_a_batch():
    source = ("calls = 0\n"
              "def grade(sample, item):\n"
              "    global calls\n"
              "    calls += 1\n"
              "    return calls * 10 + (sample['output_json']['n'] == item['n'])\n")
    results = grade_batch(parse_grader(python(source)), [('{"n": 1}', {"n": 1}), ('{"n": 2}', {"n": 3}),
                                                         ('{"n": 3}', {"n": 3})], limits=FAST)
    assert [r.reward for r in results] == [11, 20, 31]  # one process: its counter went on


def test_python_grader_errors_are_reported_and_the_batch_goes_on():
    source = ("import os\n"
              "def grade(sample, item):\n"
              "    t = sample['output_text']\n"
              "    if t == 'raise': raise ValueError('no good')\n"
              "    if t == 'exit': os._exit(3)\n"
              "    if t == 'text': return 'high'\n"
              "    print('noise on stdout')\n"
              "    return 0.5\n")
    results = grade_batch(parse_grader(python(source)), [(s, {}) for s in ("raise", "ok", "exit", "text", "ok")],
                          limits=FAST)
    assert [r.reward for r in results] == [0.0, 0.5, 0.0, 0.0, 0.5]
    assert results[0].errors.flags == {"python_grader_runtime_error"}
    assert "ValueError: no good" in results[0].errors.details["python_grader_runtime_error_details"]
    assert "python_grader_server_error" in results[2].errors.flags
    assert "not a finite number" in results[3].errors.details["python_grader_runtime_error_details"]
    assert not results[4].errors


def test_python_grader_source_must_define_grade():
    for source, why in [("def grad(sample, item): return 1", "must define a top-level function grade"),
                        ("def grade(sample): return 1", "two arguments"),
                        ("def grade(s, i) return", "not valid Python"),
                        ("x" * (256 * 1024 + 1), "at most 262144")]:
        e = refused(python(source))
        assert e.param == "grader.source" and why in str(e), str(e)
    assert "image_tag is not supported" in str(refused(python("def grade(s, i): return 1") | {"image_tag": "2025"}))
    failing = grade(parse_grader(python("import no_such_module\ndef grade(s, i): return 1")), "x", {}, limits=FAST)
    details = failing.errors.details["python_grader_runtime_error_details"]
    assert failing.reward == 0.0 and "No module named 'no_such_module'" in details and "_worker.py" not in details


def test_cpu_time_limit_ends_an_infinite_loop_and_the_next_sample_gets_a_fresh_process():
    source = "def grade(sample, item):\n    while sample['output_text'] == 'loop': pass\n    return 1.0\n"
    start = time.monotonic()
    looped, fine = grade_batch(parse_grader(python(source)), [("loop", {}), ("ok", {})],
                               limits=PythonLimits(cpu_seconds=1, wall_seconds=60))
    assert time.monotonic() - start < 30  # the CPU limit, not the 60 s wall timeout
    assert looped.reward == 0.0 and looped.errors.details["python_grader_server_error_type"] == "process_ended"
    assert "CPU time limit (1 s)" in looped.errors.details["python_grader_runtime_error_details"]
    assert fine.reward == 1.0


def test_wall_timeout_ends_a_grader_that_sleeps():
    source = "import time\ndef grade(sample, item):\n    time.sleep(60)\n    return 1.0\n"
    start = time.monotonic()
    result = grade(parse_grader(python(source)), "x", {}, limits=PythonLimits(cpu_seconds=5, wall_seconds=2))
    assert time.monotonic() - start < 15
    assert result.errors.flags >= {"python_grader_server_error", "unresponsive_reward_error"}
    assert result.errors.details["python_grader_server_error_type"] == "timeout"


def test_memory_limit_refuses_a_large_allocation():
    source = ("def grade(sample, item):\n"
              "    if sample['output_text'] == 'big': b = bytearray(1024 * 2**20)\n"
              "    return 1.0\n")
    big, small = grade_batch(parse_grader(python(source)), [("big", {}), ("small", {})], limits=FAST)
    assert big.reward == 0.0 and "MemoryError" in big.errors.details["python_grader_runtime_error_details"]
    assert small.reward == 1.0


NETWORK = ("import socket, subprocess\n"
           "def grade(sample, item):\n"
           "    if sample['output_text'] == 'socket':\n"
           "        socket.create_connection(('127.0.0.1', int(item['port'])), timeout=2)\n"
           "    return 1.0\n")


@pytest.fixture
def listener():
    """A port on loopback that accepts connections: a grader reaching it would succeed."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_grader_cannot_open_a_socket(listener):
    result = grade(parse_grader(python(NETWORK)), "socket", {"port": listener}, limits=FAST)
    assert result.reward == 0.0
    assert "network access is not allowed" in result.errors.details["python_grader_runtime_error_details"]


def test_the_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("KUBETUNE_TEST_SECRET", "hunter2-secret")
    source = ("import os\n"
              "def grade(sample, item):\n"
              "    seen = [v for v in os.environ.values() if 'hunter2' in v]\n"
              "    for pid in (p for p in os.listdir('/proc') if p.isdigit()):\n"
              "        try:\n"
              "            seen += ['proc'] if b'hunter2' in open(f'/proc/{pid}/environ', 'rb').read() else []\n"
              "        except OSError:\n"
              "            pass\n"
              "    return 1.0 if 'proc' in seen else 2.0 if seen else 0.0\n")
    found = reward(python(source), "x", limits=FAST)
    # os.environ never has it; other processes' /proc/PID/environ are out of sight in the PID namespace only
    assert found == (0.0 if isolation() == "namespaces" else 1.0)


def test_without_namespaces_the_audit_hook_blocks_sockets_and_subprocesses(monkeypatch, listener):
    """The pod case (no CAP_SYS_ADMIN): run for real without unshare, which PATH no longer finds."""
    from kubetune.graders import sandbox

    monkeypatch.setenv("PATH", "/nonexistent")
    sandbox.isolation.cache_clear()
    try:
        assert isolation() == "audit-hook"
        source = NETWORK + ("    if sample['output_text'] == 'spawn':\n"
                            "        subprocess.run(['true'])\n")
        source = source.replace("    return 1.0\n", "") + "    return 1.0\n"
        results = grade_batch(parse_grader(python(source)), [("socket", {"port": listener}), ("spawn", {}), ("ok", {})],
                              limits=FAST)
        details = [r.errors.details.get("python_grader_runtime_error_details", "") for r in results]
        assert "network access is not allowed" in details[0]
        assert "subprocess.Popen is not allowed" in details[1]
        assert results[2].reward == 1.0
    finally:
        sandbox.isolation.cache_clear()


# --- score_model --------------------------------------------------------------------------------


class ChatServer:
    """An OpenAI-compatible chat endpoint on loopback: it answers what the last message's ``REPLY:`` asks
    (``REPLY:STATUS 500`` for an error, ``REPLY:REFUSE`` for a refusal) and keeps the requests."""

    def __init__(self):
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                content = body["messages"][-1]["content"]
                text = content if isinstance(content, str) else content[0]["text"]
                wanted = text.split("REPLY:", 1)[-1]
                if wanted.startswith("STATUS "):
                    return self._send(int(wanted[7:]), {"error": {"message": "model overloaded"}})
                message = {"role": "assistant", "content": None if wanted == "REFUSE" else wanted,
                           "refusal": "I can't" if wanted == "REFUSE" else None}
                self._send(200, {"id": "c1", "object": "chat.completion", "choices": [
                    {"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}})

            def _send(self, status: int, doc: dict):
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def chat_server():
    server = ChatServer()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def judge(prompt: str = "Score {{sample.output_text}} against {{item.answer}}. REPLY:{{item.reply}}", **extra) -> dict:
    return {"type": "score_model", "name": "judge", "model": "judge-1", "range": [0, 10],
            "input": [{"role": "system", "content": "You grade answers."}, {"role": "user", "content": prompt}],
            **extra}


def test_score_model_sends_filled_messages_and_reads_the_score(chat_server):
    endpoints = {"judge-1": ModelEndpoint(chat_server.url, api_key="k-123")}
    g = parse_grader(judge(sampling_params={"temperature": 0, "seed": 3, "max_completions_tokens": 50}))
    replies = {'{"steps": [], "result": 7.5}': 7.5, "I'd give it 6/10": 6.0, "42": 10.0, "-3": 0.0,
               '{"score": 2}': 2.0}
    with Runner(endpoints) as runner:
        for reply, expected in replies.items():
            result = runner.grade(g, "Paris", {"answer": "Paris", "reply": reply})
            assert result.reward == expected and not result.errors, reply
    sent = chat_server.requests[0]
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer k-123"
    assert sent["body"]["messages"] == [{"role": "system", "content": "You grade answers."}, {
        "role": "user", "content": 'Score Paris against Paris. REPLY:{"steps": [], "result": 7.5}'}]
    assert {k: sent["body"][k] for k in ("model", "temperature", "seed", "max_completion_tokens")} == {
        "model": "judge-1", "temperature": 0, "seed": 3, "max_completion_tokens": 50}
    assert result.as_openai()["model_grader_token_usage_per_model"] == {"judge-1": {
        "prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12, "cached_tokens": 0}}
    assert result.as_openai()["metadata"]["token_usage"] == 12


def test_score_model_failures_score_zero_with_their_flags(chat_server):
    endpoints = {"judge-1": ModelEndpoint(chat_server.url)}
    g = parse_grader(judge())
    cases = {"no number here": "model_grader_parse_error", "REFUSE": "model_grader_refusal_error",
             "STATUS 503": "model_grader_server_error"}
    for reply, flag in cases.items():
        result = grade(g, "x", {"answer": "y", "reply": reply}, endpoints)
        assert result.reward == 0.0 and result.errors.flags == {flag}, reply
    assert "503" in result.errors.details["model_grader_server_error_details"] \
        and "model overloaded" in result.errors.details["model_grader_server_error_details"]
    down = grade(g, "x", {"answer": "y", "reply": "1"}, {"judge-1": ModelEndpoint("http://127.0.0.1:9/v1")})
    assert down.errors.flags == {"model_grader_server_error"}
    with pytest.raises(GraderUnavailable, match="no endpoint is configured for the score model 'judge-1'"):
        grade(g, "x", {"answer": "y", "reply": "1"})


def test_score_model_messages_with_content_parts(chat_server):
    g = parse_grader(judge() | {"input": [{"role": "user", "type": "message", "content": [
        {"type": "input_text", "text": "Grade {{sample.output_text}}. REPLY:{{item.reply}}"},
        {"type": "input_image", "image_url": "https://example.com/{{item.image}}.png", "detail": "low"}]}]})
    result = grade(g, "a cat", {"reply": "0.9", "image": "cat"}, {"judge-1": ModelEndpoint(chat_server.url)})
    assert result.reward == 0.9
    assert chat_server.requests[-1]["body"]["messages"][0]["content"] == [
        {"type": "text", "text": "Grade a cat. REPLY:0.9"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}}]


def test_multi_with_a_score_model_and_a_python_grader(chat_server):
    g = parse_grader(multi("0.5 * judge / 10 + 0.5 * length", judge=judge(),
                           length=python("def grade(sample, item):\n"
                                         "    return min(len(sample['output_text']) / 10, 1)")))
    result = grade(g, "Paris", {"answer": "Paris", "reply": "8"}, {"judge-1": ModelEndpoint(chat_server.url)},
                   limits=FAST)
    assert result.sub_rewards == {"judge": 8.0, "length": 0.5} and result.reward == pytest.approx(0.65)


@pytest.mark.slow
def test_score_model_against_a_real_kubetune_serve(tmp_path):
    """The request and reply formats against kubetune's own server; an untrained model's reply is noise, so
    only the protocol is asserted: a reply was parsed or flagged unparsable, usage counted, never a
    server error."""
    from test_fuzz_serve import save_tiny_model, start_server

    proc, url = start_server(save_tiny_model(tmp_path / "model"), max_tokens=8)
    try:
        g = parse_grader(judge("Rate {{sample.output_text}} from 0 to 10.",
                               sampling_params={"temperature": 0, "max_completions_tokens": 8}))
        # model="": no model name sent, as the API sends to a job's endpoint (serve checks a name it is sent)
        result = grade(g, "hello world", {}, {"judge-1": ModelEndpoint(f"{url}/v1", model="")})
    finally:
        proc.terminate()
        proc.wait(10)
    assert not result.errors.flags - {"model_grader_parse_error"}, result.errors.as_dict()
    assert 0 <= result.reward <= 10
    usage = result.token_usage["judge-1"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert 1 <= usage["completion_tokens"] <= 8


def test_the_result_has_openais_run_response_shape():
    from openai.types.fine_tuning.alpha import GraderRunResponse

    result = grade(parse_grader(multi("a", a=check("x", "x"))), "", {})
    parsed = GraderRunResponse.model_validate(result.as_openai())
    assert parsed.reward == 1.0 and parsed.sub_rewards == {"a": 1.0} and parsed.metadata.type == "multi"
    assert parsed.metadata.errors.formula_parse_error is False


@pytest.mark.skipif(isolation() != "namespaces", reason="unshare cannot make namespaces here")
def test_in_its_network_namespace_a_grader_has_only_a_loopback():
    source = "import socket\ndef grade(sample, item):\n    return len(socket.if_nameindex())\n"
    assert reward(python(source), "x", limits=FAST) == 1.0  # lo alone: no interface leads anywhere
