"""An OpenAI-compatible chat endpoint (aiohttp): the fine-tuned model for existing OpenAI clients.

    POST /v1/chat/completions   non-streaming, or server-sent events with "stream": true
    POST /v1/feedback           a rating (and correction) of a recent reply, when capturing (serve/feedback.py)
    GET  /v1/models             the one served model
    GET  /healthz, /readyz      liveness; readiness once the model is loaded
    GET  /openapi.json          an OpenAPI 3 description of the above
    GET  /                      a small web chat page

Tool calling as OpenAI's API has it: ``tools`` (and ``tool_choice`` "auto" or "none") go to the chat
template, messages may carry ``tool_calls`` (assistant) and be tool results (``role: "tool"`` with
``tool_call_id``). A reply written in the template's tool-call format (``<tool_call>{"name",
"arguments"}</tool_call>``, as Qwen and Hermes templates write it, and kubetune's fromConfig template)
comes back as ``message.tool_calls`` with ``finish_reason: "tool_calls"``; streamed, the text before
the first call streams as content and the calls come in one delta at the end.

Requests are validated and rejected with OpenAI-style error bodies ({"error": {"message", "type",
"param", "code"}}) and status codes. Bounds: request bodies up to 1 MiB, max_tokens up to
``--max-tokens``, prompt plus reply within the model's context. Concurrency: continuous batching
(``serve/batching.py``): up to ``--max-batch`` requests advance together, one token per step, and a
new request joins at the next step; up to ``--max-queue`` requests wait, more get 503 (clients retry).
``--max-batch 1`` generates one request at a time with generate().

With a ``Recorder`` (``--capture-uri``, ``serve/capture.py``) every finished reply is handed to it, which
samples, scrubs and writes off the request path.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from kubetune.data.formats import ROLES, is_valid_unicode
from kubetune.openai_errors import RequestError, middleware
from kubetune.serve.capture import Conversation, Recorder
from kubetune.serve.engine import ChatModel, Params, Result
from kubetune.serve.feedback import feedback_route
from kubetune.serve.tool_calls import ToolCallSplitter, parse_tool_calls, parse_tools, tool_calls_in

STATIC = Path(__file__).parent / "static"
OPENAPI = Path(__file__).parent / "openapi.json"
MAX_BODY = 1024 * 1024
MIN_TEMPERATURE = 1e-5  # below this, greedy decoding
openai_errors = middleware("generation failed")


def parse_request(body: object, model: ChatModel, max_tokens_limit: int) -> tuple[list[dict], Params, bool]:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise RequestError(400, "model must be a string", "model")
    if body.get("model") not in (None, model.name):
        raise RequestError(404, f"The model '{body['model']}' does not exist; this server serves '{model.name}'",
                           "model", "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty array", "messages")
    clean = []
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        tool_calls = tool_calls_in(m, i)
        content = m.get("content")
        if isinstance(content, list) and all(map(_is_part, content)):  # text parts joined by "\n", as in preparation (data/formats.py) and vLLM
            content = "\n".join(part["text"] for part in content if part["type"] == "text")
        if not isinstance(content, str) and not (content is None and tool_calls):  # null beside tool calls
            raise RequestError(400, f"messages[{i}].content must be a string or an array of text parts",
                               f"messages[{i}].content")
        if content is not None and not is_valid_unicode(content):  # a lone surrogate escape ("\ud800") made the tokenizer raise: a 500
            raise RequestError(400, f"messages[{i}].content is not valid Unicode (lone surrogate)", f"messages[{i}].content")
        if not isinstance(m.get("name", ""), str):  # not used, but OpenAI's API has it as a string
            raise RequestError(400, f"messages[{i}].name must be a string", f"messages[{i}].name")
        message = {"role": m["role"], "content": content}
        if tool_calls:
            message["tool_calls"] = tool_calls
            call_ids.update(c["id"] for c in tool_calls)
        call_id = m.get("tool_call_id")
        if call_id is not None and not (isinstance(call_id, str) and is_valid_unicode(call_id)):
            raise RequestError(400, f"messages[{i}].tool_call_id must be a string (valid Unicode)", f"messages[{i}].tool_call_id")
        if m["role"] == "tool":  # as OpenAI's API: a tool result answers a call made earlier in the conversation
            if call_id not in call_ids:
                raise RequestError(400, f"messages[{i}]: a tool message needs the tool_call_id of an earlier assistant "
                                        "tool call", f"messages[{i}].tool_call_id")
            message["tool_call_id"] = call_id
        clean.append(message)
    p = Params()
    p.max_tokens = _number(body, ("max_completion_tokens", "max_tokens"), int, 1, max_tokens_limit, default=min(256, max_tokens_limit))
    p.temperature = _number(body, ("temperature",), float, 0.0, 2.0, default=1.0)
    if p.temperature < MIN_TEMPERATURE:  # sampling at 1e-40 divides logits into inf/NaN and generate() fails
        p.temperature = 0.0  # greedy, which such a temperature means anyway
    p.top_p = _number(body, ("top_p",), float, 0.0, 1.0, default=1.0)
    if p.top_p == 0:
        raise RequestError(400, "top_p must be greater than 0", "top_p")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):  # null means the default, as in OpenAI's API
        raise RequestError(400, "only n = 1 is supported", "n")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop  # not `stop or []`: 0, {} are errors
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(400, "stop must be a string or up to 4 strings", "stop")
    p.stop = tuple(stops)
    stream = body.get("stream")
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise RequestError(400, "stream must be a boolean", "stream")
    return clean, p, stream


def _is_part(part: object) -> bool:
    """An OpenAI content part: {"type": "text", "text": "..."}; other types (image_url...) are ignored."""
    return (isinstance(part, dict) and isinstance(part.get("type"), str) and isinstance(part.get("text", ""), str)
            and (part["type"] != "text" or "text" in part))


def _number(body: dict, names: tuple[str, ...], kind, low, high, default):
    """The first of ``names`` given, after checking every one given (a bad alias is an error too)."""
    values = []
    for name in names:
        if body.get(name) is not None:
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
                raise RequestError(400, f"{name} must be {'an integer' if kind is int else 'a number'}", name)
            if not low <= value <= high:
                raise RequestError(400, f"{name} must be between {low} and {high}", name)
            values.append(kind(value))
    return values[0] if values else default


def make_app(model: ChatModel, max_tokens: int = 1024, max_queue: int = 16, max_batch: int = 8,
             recorder: Recorder | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[openai_errors])
    if max_batch > 1:
        model.start_batching(max_batch)

    async def threads(app: web.Application):
        # a waiting non-streamed request holds a thread: enough for every request the queue admits
        with ThreadPoolExecutor(max_queue + 4, thread_name_prefix="request") as pool:
            asyncio.get_running_loop().set_default_executor(pool)
            yield

    app.cleanup_ctx.append(threads)
    if recorder is not None:  # after threads: cleanup runs in reverse, so its last flush still has a thread
        app.cleanup_ctx.append(_recording(recorder))
    waiting = {"n": 0}

    async def chat(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:  # bytes: json detects UTF-8/16/32 itself, and a bad charset header cannot make it fail
            body = json.loads(raw)
        except (ValueError, RecursionError):  # malformed JSON, undecodable bytes, nesting too deep
            raise RequestError(400, "the request body is not valid JSON") from None
        messages, params, stream = parse_request(body, model, max_tokens)
        tools = parse_tools(body)
        ids = _encode(model, messages, tools)
        if ids.shape[1] + params.max_tokens > model.context:
            raise RequestError(400, f"the prompt ({ids.shape[1]} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                                    f"the model's context of {model.context} tokens", "messages", "context_length_exceeded")
        if waiting["n"] >= max_queue:
            raise RequestError(503, "the server is busy; retry shortly", None, "server_busy", kind="server_error")
        waiting["n"] += 1
        try:
            meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model.name}
            done = (lambda reply: recorder.completed(Conversation(meta["id"], meta["created"], model.name,
                                                                  messages + [reply], tools or None))) if recorder else None
            if stream:
                return await _stream(request, model, ids, params, meta, tools, done)
            result = await asyncio.to_thread(model.complete, ids, params)
            message, finish = {"role": "assistant", "content": result.text}, result.finish_reason
            parsed = parse_tool_calls(result.text, {t["function"]["name"] for t in tools}) if tools else None
            if parsed:
                message, finish = {"role": "assistant", "content": parsed[0], "tool_calls": parsed[1]}, "tool_calls"
            if done:
                done(message)
            return web.json_response({**meta, "object": "chat.completion", "choices": [{
                "index": 0, "message": message, "finish_reason": finish}], "usage": _usage(result)})
        finally:
            waiting["n"] -= 1

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": model.name, "object": "model", "created": int(model.path.stat().st_mtime), "owned_by": "kubetune"}]})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def index(request: web.Request) -> web.Response:
        page = (STATIC / "index.html").read_text()
        if recorder is not None:  # the page shows its feedback buttons
            page = page.replace('<body data-feedback="off">', '<body data-feedback="on">')
        return web.Response(text=page, content_type="text/html")

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=OPENAPI.read_bytes(), content_type="application/json")

    app.add_routes([web.post("/v1/chat/completions", chat), web.get("/v1/models", models),
                    web.get("/healthz", healthz), web.get("/readyz", healthz), web.get("/", index),
                    web.get("/openapi.json", openapi), feedback_route(recorder)])
    return app


def _recording(recorder: Recorder):
    async def recording(app: web.Application):
        recorder.start()
        yield
        await asyncio.to_thread(recorder.close)  # on SIGTERM too: aiohttp runs cleanup on shutdown

    return recording


def _encode(model: ChatModel, messages: list[dict], tools: list[dict] | None):
    try:
        return model.encode(messages, tools)
    except Exception as e:  # a template without tool support may fail on tools, tool calls or tool messages
        if not tools and not any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            raise
        raise RequestError(400, f"the model's chat template cannot render tools, tool calls or tool messages "
                                f"({type(e).__name__})", "messages") from None


async def _stream(request: web.Request, model: ChatModel, ids, params: Params, meta: dict,
                  tools: list[dict] | None = None, done=None) -> web.StreamResponse:
    """Stream the reply; ``done`` gets the whole reply message once it has ended normally."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(delta: dict, finish: str | None = None, usage: dict | None = None) -> None:
        chunk = {**meta, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage:
            chunk["usage"] = usage
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

    await send({"role": "assistant", "content": ""})
    pieces = model.stream(ids, params)
    calls = ToolCallSplitter() if tools else None  # content streams until a tool call starts
    reply = {"role": "assistant", "content": ""}
    while True:
        try:
            item = await asyncio.to_thread(next, pieces, None)
        except Exception as e:  # the status line is sent already: an error event, as OpenAI's API streams one
            error = {"message": f"generation failed ({type(e).__name__})", "type": "server_error", "param": None,
                     "code": None}
            await response.write(f"data: {json.dumps({'error': error})}\n\n".encode())
            break
        if item is None:
            break
        if isinstance(item, Result):
            finish = item.finish_reason
            rest = calls.rest() if calls else ""
            parsed = parse_tool_calls(rest, {t["function"]["name"] for t in tools}) if rest else None
            if parsed:
                await send({"tool_calls": [{"index": k, **c} for k, c in enumerate(parsed[1])]})
                finish, reply["tool_calls"] = "tool_calls", parsed[1]
            elif rest:
                await send({"content": rest})
                reply["content"] += rest
            await send({}, finish, _usage(item))
            if done:
                done(reply)
        elif calls is None:
            await send({"content": item})
            reply["content"] += item
        elif piece := calls.feed(item):
            await send({"content": piece})
            reply["content"] += piece
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _usage(result: Result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def serve(model_path: str, host: str, port: int, name: str | None, max_tokens: int, max_queue: int,
          max_batch: int = 8, recorder: Recorder | None = None) -> None:
    model = ChatModel(model_path, name)
    print(f"serving '{model.name}' on http://{host}:{port}/v1 (chat page at http://{host}:{port}/)", flush=True)
    web.run_app(make_app(model, max_tokens, max_queue, max_batch, recorder), host=host, port=port, print=None)
