"""score_model: the grader's messages, templates filled, sent to an OpenAI-compatible chat completions
endpoint; the reply's score, clamped to the grader's range.

The score is the reply's JSON ``result`` (OpenAI's score model graders answer ``{"steps": ..., "result":
x}``) or ``score``, else the first number in its text. The request goes through urllib: the openai
package is not a runtime dependency, and the trainer's image has no aiohttp.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from kubetune.graders.models import Message, ScoreModelGrader
from kubetune.graders.template import Sample, fill

NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
MAX_REPLY = 4 * 1024 * 1024


@dataclass(frozen=True)
class ModelEndpoint:
    """Where a score model answers: the base URL its /chat/completions is under (``http://host/v1``)."""

    base_url: str
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 120.0
    # The name to send: None sends the grader's model; "" sends none, which a job's serving endpoint (one
    # model, named after its folder) takes as its own model, as the API's chat forwarding does.
    model: str | None = None


@dataclass
class ModelReply:
    score: float | None = None
    parse_error: bool = False
    refusal: bool = False
    server_error: str | None = None
    usage: dict | None = None


def chat_messages(grader: ScoreModelGrader, sample: Sample, item: dict) -> list[dict]:
    return [{"role": m.role, "content": _content(m, sample, item)} for m in grader.input]


def _content(message: Message, sample: Sample, item: dict) -> str | list[dict]:
    if isinstance(message.content, str):
        return fill(message.content, sample, item)
    parts = message.content if isinstance(message.content, list) else [message.content]
    out = []
    for p in parts:
        if isinstance(p, str) or p.type != "input_image":
            out.append({"type": "text", "text": fill(p if isinstance(p, str) else p.text, sample, item)})
        else:
            out.append({"type": "image_url", "image_url": {"url": fill(p.image_url, sample, item),
                                                           **({"detail": p.detail} if p.detail else {})}})
    return out


def request_body(grader: ScoreModelGrader, messages: list[dict], model: str) -> dict:
    body: dict = {"model": model, "messages": messages} if model else {"messages": messages}
    p = grader.sampling_params
    if p:
        extra = {"temperature": p.temperature, "top_p": p.top_p, "seed": p.seed, "reasoning_effort": p.reasoning_effort,
                 "max_completion_tokens": p.max_completions_tokens}
        body.update({k: v for k, v in extra.items() if v is not None})
    return body


def ask(endpoint: ModelEndpoint, body: dict) -> ModelReply:
    headers = {"Content-Type": "application/json"}
    if endpoint.api_key:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    request = urllib.request.Request(f"{endpoint.base_url.rstrip('/')}/chat/completions",
                                     data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=endpoint.timeout) as response:
            raw = response.read(MAX_REPLY)
    except urllib.error.HTTPError as e:
        return ModelReply(server_error=f"the score model's endpoint answered {e.code} {e.reason}{_message(e)}")
    except (OSError, ValueError) as e:  # refused, timed out, a bad URL
        return ModelReply(server_error=f"the score model's endpoint failed: {type(e).__name__}: {e}"[:300])
    try:
        reply = json.loads(raw)
        message = reply["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ModelReply(server_error="the score model's endpoint sent no chat completion")
    usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else None
    if message.get("refusal"):
        return ModelReply(refusal=True, usage=usage)
    score = parse_score(message.get("content") or "")
    return ModelReply(score=score, parse_error=score is None, usage=usage)


def _message(e: urllib.error.HTTPError) -> str:
    """The error's own message where it sends OpenAI's error shape (not its whole body)."""
    try:
        text = json.loads(e.read(65536))["error"]["message"]
        return f": {str(text)[:200]}"
    except Exception:
        return ""


def parse_score(text: str) -> float | None:
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        for key in ("result", "score"):
            if isinstance(parsed.get(key), (int, float)) and not isinstance(parsed[key], bool):
                return float(parsed[key])
    elif isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
        return float(parsed)
    match = NUMBER.search(text)
    return float(match.group()) if match else None


def clamp(score: float, low: float, high: float) -> float:
    return min(max(score, low), high)
