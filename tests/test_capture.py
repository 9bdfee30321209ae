"""Capturing served conversations and feedback (serve.capture, POST /v1/feedback) into a real S3 protocol
server (moto), through the official openai client against the real server on a tiny from-config model.

What users rely on: every sampled conversation lands as chat JSONL that preparation reads, with personal
data scrubbed before anything is written; feedback rated up or corrected becomes training data under the
feedback prefix, rated down does not; storage being down never fails or slows a chat; bad feedback is a
400 naming the field, an unknown id a 404; a SIGTERM writes what is queued.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from contextlib import contextmanager

import openai
import pytest
import requests
from aiohttp import web

from conftest import free_port
from kubetune.data.formats import standardize, tools_of
from kubetune.serve.capture import Recorder
from kubetune.serve.engine import ChatModel
from kubetune.serve.server import make_app
from kubetune.spec import Pii
from test_fuzz_serve import save_tiny_model, start_server, stop_server

EMAIL, PHONE, CARD, KEY = "jane.doe@example.com", "+49 30 901820", "4111 1111 1111 1111", "sk-" + "a1B2" * 8
PLANTED = (EMAIL, PHONE, CARD, KEY)
ASK = {"model": "model", "max_tokens": 4, "temperature": 0}
LOOKUP = {"type": "function", "function": {"name": "lookup_customer", "parameters": {
    "type": "object", "properties": {"email": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def model(tiny):
    return ChatModel(tiny, name="model")


@contextmanager
def serving(model: ChatModel, recorder: Recorder | None):
    """The app on a loopback port in a thread; leaving runs its cleanup (the recorder's final flush), as a
    SIGTERM does in `kubetune serve`."""
    port, started, loop = free_port(), threading.Event(), asyncio.new_event_loop()
    runner = web.AppRunner(make_app(model, max_tokens=16, recorder=recorder))

    async def run():
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(run()), loop.run_forever()), daemon=True)
    thread.start()
    assert started.wait(30)
    try:
        yield f"http://127.0.0.1:{port}", openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                                                          timeout=30, max_retries=0)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)


def objects(s3, bucket: str, prefix: str) -> dict[str, list[dict]]:
    """Each object's lines under the prefix, parsed (a line that is not JSON fails the test)."""
    found = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    out = {}
    for o in found:
        body = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read().decode()
        assert not any(value in body for value in PLANTED), f"personal data written to {o['Key']}"
        out[o["Key"]] = [json.loads(line) for line in body.splitlines()]
    return out


def lines(s3, bucket: str, prefix: str) -> list[dict]:
    return [line for found in objects(s3, bucket, prefix).values() for line in found]


def conversations() -> list[list[dict]]:
    return [
        [{"role": "system", "content": f"The customer's card is {CARD}."},
         {"role": "user", "content": f"Hi, I am Jane ({EMAIL}, {PHONE}). Where is my order?"}],
        [{"role": "user", "content": f"My API key {KEY} stopped working"}],
        [{"role": "user", "content": "Find my account"},
         {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
             "name": "lookup_customer", "arguments": json.dumps({"email": EMAIL})}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": f"found: {EMAIL}, phone {PHONE}"}],
    ]


def test_every_conversation_lands_as_scrubbed_chat_jsonl(model, s3, s3_server, monkeypatch):
    client_s3, bucket = s3
    monkeypatch.setenv("HOSTNAME", "bot-serve-7d9f-x2k")
    recorder = Recorder(f"s3://{bucket}/captured/", 1.0, pii=Pii(), endpoint=s3_server, flush_seconds=3600, batch=2)
    sent = {}
    with serving(model, recorder) as (_, client):
        for i, messages in enumerate(conversations()):
            tools = {"tools": [LOOKUP]} if i == 2 else {}
            if i == 1:  # streamed: the reply is put together as the client sees it
                chunks = list(client.chat.completions.create(**ASK, messages=messages, stream=True))
                sent[chunks[0].id] = (messages, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
            else:
                reply = client.chat.completions.create(**ASK, messages=messages, **tools)
                sent[reply.id] = (messages, reply.choices[0].message.content)
        # two conversations make a batch: it is written at once, not at the next interval
        deadline = time.monotonic() + 30
        while not objects(client_s3, bucket, "captured/") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(lines(client_s3, bucket, "captured/")) == 2
    found = objects(client_s3, bucket, "captured/")  # the third, written on shutdown
    assert len(found) == 2 and all("bot-serve-7d9f-x2k" in key and key.endswith(".jsonl") for key in found)
    records = {r["id"]: r for batch in found.values() for r in batch}
    assert set(records) == set(sent) and all(i.startswith("chatcmpl-") for i in records)
    for completion_id, (messages, reply) in sent.items():
        r = records[completion_id]
        assert standardize(r) and r["model"] == "model"  # the format preparation reads
        assert [m["role"] for m in r["messages"]] == [m["role"] for m in messages] + ["assistant"]
        assert r["messages"][-1]["content"] == reply
    text = json.dumps(list(records.values()))
    assert "<EMAIL>" in text and "<PHONE>" in text and "<CREDIT_CARD>" in text and "<SECRET>" in text
    with_tools = next(r for r in records.values() if "tools" in r)
    assert tools_of(with_tools) == [LOOKUP]
    assert json.loads(with_tools["messages"][1]["tool_calls"][0]["function"]["arguments"]) == {"email": "<EMAIL>"}


def test_feedback_up_or_corrected_becomes_training_data_down_does_not(model, s3, s3_server):
    client_s3, bucket = s3
    recorder = Recorder(f"s3://{bucket}/captured/", 0.0, f"s3://{bucket}/data/feedback/", Pii(), s3_server, 3600)
    with serving(model, recorder) as (url, client):
        ids = [client.chat.completions.create(**ASK, messages=[{"role": "user", "content": f"question {i}"}]).id
               for i in range(4)]
        for completion_id, body in zip(ids, [{"rating": "up"}, {"rating": "down", "correction": f"Write to {EMAIL}."},
                                             {"rating": "down"}]):
            answer = requests.post(f"{url}/v1/feedback", json={"completion_id": completion_id, **body}, timeout=10)
            assert answer.status_code == 200, answer.text
            assert answer.json()["training_data"] == (body != {"rating": "down"})
    training = lines(client_s3, bucket, "data/feedback/")
    assert sorted(m["messages"][0]["content"] for m in training) == ["question 0", "question 1"]
    assert all(set(r) == {"messages"} and standardize(r) for r in training)  # plain training examples
    corrected = next(r for r in training if r["messages"][0]["content"] == "question 1")
    assert corrected["messages"][-1] == {"role": "assistant", "content": "Write to <EMAIL>."}
    # sampleRate 0: only conversations given feedback are captured, each with its rating
    captured = {r["id"]: r for r in lines(client_s3, bucket, "captured/")}
    assert set(captured) == set(ids[:3])
    assert [captured[i]["rating"] for i in ids[:3]] == ["up", "down", "down"]
    assert captured[ids[1]]["correction"] == "Write to <EMAIL>."


def test_sample_rate_zero_writes_nothing(model, s3, s3_server):
    client_s3, bucket = s3
    recorder = Recorder(f"s3://{bucket}/captured/", 0.0, f"s3://{bucket}/feedback/", Pii(), s3_server, 0.1)
    with serving(model, recorder) as (_, client):
        for i in range(3):
            client.chat.completions.create(**ASK, messages=[{"role": "user", "content": f"hello {i}"}])
        time.sleep(0.5)  # several flush intervals
    assert client_s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_storage_down_never_fails_or_slows_a_chat(model, capfd):
    # nothing listens there: every write is refused, and botocore retries it with backoff
    recorder = Recorder("s3://bucket/captured/", 1.0, pii=Pii(), endpoint=f"http://127.0.0.1:{free_port()}",
                        flush_seconds=0.05, batch=1, max_pending=3)
    recorder.close_timeout = 1
    with serving(model, recorder) as (url, client):
        for i in range(8):
            began = time.monotonic()
            reply = client.chat.completions.create(**ASK, messages=[{"role": "user", "content": f"hello {i}"}])
            assert reply.choices[0].message.role == "assistant"
            assert time.monotonic() - began < 10  # a tiny model's 4 tokens (on a busy machine); one write retries for longer
        answer = requests.post(f"{url}/v1/feedback", json={"id": reply.id, "rating": "up"}, timeout=10)
        assert answer.status_code == 200
        assert recorder.capture.dropped >= 5  # the queue holds 3: the rest are counted, not kept
    err = capfd.readouterr().err
    assert "full: dropping conversations until storage answers" in err
    assert "conversations dropped so far" in err and "3 conversations not written" in err
    assert "hello" not in err  # no conversation text in the log


@pytest.mark.parametrize("body, param", [
    ({"rating": "up"}, "completion_id"),
    ({"completion_id": 7, "rating": "up"}, "completion_id"),
    ({"completion_id": "chatcmpl-1", "id": "chatcmpl-2", "rating": "up"}, "id"),
    ({"completion_id": "chatcmpl-1"}, "rating"),
    ({"completion_id": "chatcmpl-1", "rating": "meh"}, "rating"),
    ({"completion_id": "chatcmpl-1", "rating": "down", "correction": "  "}, "correction"),
    ({"completion_id": "chatcmpl-1", "rating": "down", "correction": ["a"]}, "correction"),
    ([1, 2], None),
])
def test_bad_feedback_is_a_400_naming_the_field(model, tmp_path, body, param):
    with serving(model, Recorder(str(tmp_path / "captured"), 1.0, flush_seconds=3600)) as (url, _):
        answer = requests.post(f"{url}/v1/feedback", json=body, timeout=10)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param


def test_feedback_on_an_unknown_completion_is_a_404(model, tmp_path):
    with serving(model, Recorder(str(tmp_path / "captured"), 1.0, flush_seconds=3600)) as (url, _):
        answer = requests.post(f"{url}/v1/feedback", json={"id": "chatcmpl-nope", "rating": "up"}, timeout=10)
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "completion_not_found"
    with serving(model, None) as (url, client):  # a server that does not capture keeps nothing to rate
        completion = client.chat.completions.create(**ASK, messages=[{"role": "user", "content": "hello"}])
        answer = requests.post(f"{url}/v1/feedback", json={"id": completion.id, "rating": "up"}, timeout=10)
    assert answer.status_code == 404 and answer.json()["error"]["param"] == "completion_id"


def test_sigterm_writes_what_is_queued(tiny, s3, s3_server):
    client_s3, bucket = s3
    port = free_port()
    proc, url = start_server(tiny, port=port, extra=["--capture-uri", f"s3://{bucket}/captured/", "--endpoint", s3_server,
                                                     "--capture-flush-seconds", "3600", "--name", "model"])
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=30, max_retries=0)
        completion = client.chat.completions.create(**ASK, messages=[{"role": "user", "content": f"mail {EMAIL}"}])
        assert client_s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0  # queued, not yet written
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop_server(proc)
    [record] = lines(client_s3, bucket, "captured/")
    assert record["id"] == completion.id and record["messages"][0]["content"] == "mail <EMAIL>"


@pytest.mark.slow
def test_web_chat_page_thumbs_and_correction(tiny, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    feedback = tmp_path / "feedback"
    proc, url = start_server(tiny, extra=["--capture-uri", str(tmp_path / "captured"), "--feedback-uri", str(feedback),
                                          "--capture-flush-seconds", "0.2"])
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=900,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(f"{url}/")

        def ask(text: str):
            """The feedback bar under the reply, once it has streamed."""
            bars = len(driver.find_elements(By.CSS_SELECTOR, ".feedback"))
            driver.find_element(By.ID, "input").send_keys(text)
            driver.find_element(By.ID, "send").click()
            return wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".feedback")[bars:])[0]

        def training_lines() -> list[dict]:
            return [json.loads(line) for f in sorted(feedback.glob("*.jsonl")) for line in f.read_text().splitlines()]

        ask("hello there").find_element(By.CSS_SELECTOR, "button[title='Good reply']").click()
        wait.until(lambda d: len(training_lines()) == 1)
        assert training_lines()[0]["messages"][0] == {"role": "user", "content": "hello there"}
        bar = ask(f"my mail is {EMAIL}")
        bar.find_element(By.XPATH, ".//button[text()='Correct it']").click()
        bar.find_element(By.TAG_NAME, "textarea").send_keys("A better reply.")
        bar.find_element(By.XPATH, ".//button[text()='Send correction']").click()
        wait.until(lambda d: "Thanks" in bar.text)
        wait.until(lambda d: len(training_lines()) == 2)
        corrected = training_lines()[1]["messages"]
        assert corrected[-1] == {"role": "assistant", "content": "A better reply."}
        assert corrected[-2] == {"role": "user", "content": "my mail is <EMAIL>"}
    finally:
        driver.quit()
        stop_server(proc)


def test_bad_capture_options_name_the_option(tmp_path, capsys):
    from kubetune.cli import main

    assert main(["serve", str(tmp_path), "--capture-uri", "s3://b/c/", "--capture-sample-rate", "2",
                 "--pii", '{"redact": ["emails"]}']) != 0
    err = capsys.readouterr().err
    assert "--capture-sample-rate: Input should be less than or equal to 1" in err and "--pii redact[0]" in err
    assert main(["serve", str(tmp_path), "--feedback-uri", "s3://b/f/"]) != 0
    assert "--feedback-uri: needs --capture-uri" in capsys.readouterr().err
