"""Fuzzing `kubetune serve` with schemathesis from its OpenAPI description (serve/openapi.json, also
served at GET /openapi.json): valid and invalid requests for every operation. Properties: no 5xx,
every response within a timeout (no hang), responses match the description, invalid input gets a
4xx, and the server still answers a normal chat completion afterwards.

The server runs as users run it (`kubetune serve` on 127.0.0.1) on a tiny untrained from-config
model, so generation is fast. ``benchmarks/fuzz.py`` runs the same fuzzer with larger counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import requests
import schemathesis
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_schema_conformance, status_code_conformance)

from conftest import free_port
from kubetune.models import config_for, train_tokenizer
from kubetune.spec import FromConfig

OPENAPI = Path(__file__).resolve().parents[1] / "src/kubetune/serve/openapi.json"
TIMEOUT = 20  # seconds a response may take; longer counts as a hang (replies are at most 16 tokens)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


def save_tiny_model(folder: Path) -> Path:
    """An untrained tiny Llama with a ChatML tokenizer, saved like a job's OUTPUT/model."""
    from transformers import LlamaForCausalLM

    tok = train_tokenizer([f"hello world number {i}, how can I help you today?" for i in range(200)], vocab_size=300)
    torch.manual_seed(0)
    LlamaForCausalLM(config_for(FromConfig(size="tiny"), tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def start_server(model: Path, max_tokens: int = 16, port: int | None = None,
                 extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    port = port or free_port()
    # one torch thread: on a busy 2-core machine more threads make a 16-token reply 20x slower
    proc = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "serve", str(model), "--port", str(port),
                             "--max-tokens", str(max_tokens), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/readyz", timeout=5).close()
            return proc, url
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.3)


def chat(url: str, body: dict | bytes, headers: dict | None = None) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{url}/v1/chat/completions", data=data, timeout=TIMEOUT,
                         headers={"Content-Type": "application/json", **(headers or {})})


def fuzz_endpoint(url: str, max_examples: int, seconds: float, derandomize: bool = False,
                  rng_seed: int | None = None) -> dict:
    """Send schemathesis-generated requests (valid and invalid) to the server; count what happened.
    Returns {"cases", "5xx", "hangs", "failures"}; the last three are lists of short descriptions."""
    schema = schemathesis.openapi.from_path(OPENAPI)
    chat_op = schema["/v1/chat/completions"]["POST"]
    cases = st.one_of(schema.as_strategy(schemathesis.GenerationMode.POSITIVE),
                      chat_op.as_strategy(schemathesis.GenerationMode.POSITIVE),  # weight towards the endpoint
                      chat_op.as_strategy(schemathesis.GenerationMode.NEGATIVE))
    found = {"cases": 0, "5xx": [], "hangs": [], "failures": []}
    deadline = time.monotonic() + seconds
    session = requests.Session()

    @settings(max_examples=max_examples, deadline=None, derandomize=derandomize, database=None,
              suppress_health_check=list(HealthCheck), phases=["generate"])  # count, don't shrink
    @given(cases)
    def run(case):
        if time.monotonic() > deadline:
            return
        found["cases"] += 1
        began = time.monotonic()
        try:
            response = case.call(base_url=url, session=session, timeout=TIMEOUT)
        except requests.Timeout:
            found["hangs"].append(f"{case.method} {case.path} {str(case.body)[:300]}")
            return
        what = f"{case.method} {case.path} {str(case.body)[:300]} -> {response.status_code} {response.text[:300]}"
        if response.status_code >= 500:
            found["5xx"].append(what)
        if time.monotonic() - began > TIMEOUT:
            found["hangs"].append(what)
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as e:  # a check failed (a BaseExceptionGroup, not an Exception)
            found["failures"].append(f"{what}\n  {str(e).strip().splitlines()[0]}")

    (seed(rng_seed)(run) if rng_seed is not None else run)()
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, url = start_server(save_tiny_model(tmp_path_factory.mktemp("tiny-model")))
    yield url, proc
    stop_server(proc)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:  # a generation thread stuck for good keeps it from exiting
        proc.kill()
        proc.wait(10)


def _normal_chat_works(url: str) -> None:
    reply = chat(url, {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.slow
def test_schemathesis_finds_no_5xx_no_hang_and_the_server_still_answers(server):
    url, proc = server
    found = fuzz_endpoint(url, max_examples=300, seconds=45, derandomize=True)
    print(f"\nfuzzed the endpoint with {found['cases']} cases")
    assert found["cases"] >= 100
    assert not found["5xx"] and not found["hangs"], found
    assert not found["failures"], "\n".join(found["failures"][:5])
    assert proc.poll() is None
    _normal_chat_works(url)


def test_openapi_json_is_served(server):
    url, _ = server
    doc = requests.get(f"{url}/openapi.json", timeout=TIMEOUT).json()
    assert doc == json.loads(OPENAPI.read_text())
    assert {"/v1/chat/completions", "/v1/models", "/healthz", "/readyz"} <= set(doc["paths"])


# Regression tests: each request got a 500 (or was accepted) before the fix.
@pytest.mark.parametrize("body, headers, param", [
    (b'{"messages": "\xff"}', None, None),  # undecodable body: UnicodeDecodeError
    (b"[" * 100_000, None, None),  # nesting too deep: RecursionError
    (b'{"messages": []}', {"Content-Type": "application/json; charset=no-such-charset"}, "messages"),  # LookupError
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, None, "messages[0].content"),  # TypeError
    ({"messages": [{"role": "user", "content": "a\ud800b"}]}, None, "messages[0].content"),  # tokenizer TypeError
    ({"messages": [{"role": "user", "content": "hi"}], "stop": 0}, None, "stop"),  # was accepted
    ({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}, None, "messages[0].content"),  # no type: accepted
    ({"messages": [{"role": "user", "content": "hi", "name": 5}]}, None, "messages[0].name"),  # was accepted
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4, "max_tokens": "x"}, None,
     "max_tokens"),  # was accepted: only the first alias given was checked
    ({"messages": [{"role": "user", "content": "hi"}], "n": True}, None, "n"),  # was accepted
    ({"messages": [{"role": "user", "content": "hi"}], "model": 5}, None, "model"),  # was 404 "model '5'"
])
def test_bad_input_is_a_400_naming_the_param(server, body, headers, param):
    url, _ = server
    reply = chat(url, body, headers)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    _normal_chat_works(url)


def test_a_tiny_temperature_does_not_hang_the_request(server):
    # was: no response ever (generate() failed on inf/NaN probabilities in its thread, the stream waited
    # forever), and the server then ignored SIGTERM
    url, _ = server
    reply = chat(url, {"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-40, "max_tokens": 4})
    assert reply.status_code == 200, reply.text


def test_null_means_the_default(server):
    # OpenAI clients send null for unset fields; "stream": null and "n": null were rejected
    url, _ = server
    reply = chat(url, {"messages": [{"role": "user", "content": "hi"}], "stream": None, "n": None, "stop": None,
                       "max_tokens": 4})
    assert reply.status_code == 200, reply.text
