"""A generation that fails inside the model: the client gets an OpenAI-shaped error at once (500, or an
error event in a stream), never a hang, and the server goes on answering.

The fault is faked: the model's forward pass is wrapped so that the first one (the prompt, which gives
the first token) works and the next raises, as a GPU out-of-memory or a broken kernel would; a tiny
model on CPU cannot be made to fail mid-generation for real. Everything else (server, continuous
batching, HTTP, the official openai client) is real.
"""

from __future__ import annotations

import asyncio
import threading

import openai
import pytest
from aiohttp import web

from conftest import free_port
from kubetune.serve.engine import ChatModel
from kubetune.serve.server import make_app
from test_fuzz_serve import save_tiny_model

ASK = {"model": "model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = ChatModel(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model"), name="model")
    port, started = free_port(), threading.Event()
    loop = asyncio.new_event_loop()

    async def run():
        runner = web.AppRunner(make_app(model, max_tokens=16))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        started.set()

    threading.Thread(target=lambda: (loop.run_until_complete(run()), loop.run_forever()), daemon=True).start()
    assert started.wait(30)
    yield model, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=30, max_retries=0)
    loop.call_soon_threadsafe(loop.stop)


@pytest.fixture
def failing(served):
    model, client = served
    real, calls = model.model.forward, {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:  # one token out, then the fault
            raise RuntimeError("CUDA out of memory while generating for 'secret prompt'")
        return real(*args, **kwargs)

    model.model.forward = forward
    yield client
    model.model.forward = real


def test_failed_generation_is_a_500_then_the_server_answers_again(served, failing):
    with pytest.raises(openai.InternalServerError) as caught:
        failing.chat.completions.create(**ASK)
    assert caught.value.status_code == 500 and "generation failed (RuntimeError)" in str(caught.value)
    assert "secret prompt" not in str(caught.value)  # the exception's text may quote user data


def test_failed_generation_mid_stream_is_an_error_event_not_a_hang(served, failing):
    stream = failing.chat.completions.create(**ASK, stream=True)
    with pytest.raises(openai.APIError, match=r"generation failed \(RuntimeError\)"):
        for _ in stream:
            pass


def test_server_answers_after_failures(served):
    _, client = served
    reply = client.chat.completions.create(**ASK)
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens >= 1
