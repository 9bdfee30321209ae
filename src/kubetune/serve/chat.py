"""``kubetune chat ENDPOINT_OR_MODEL``: a terminal chat with a served endpoint or a local model folder."""

from __future__ import annotations

import os
import sys
from typing import Iterator


def _endpoint_replies(url: str):
    from openai import OpenAI

    base = url.rstrip("/")
    client = OpenAI(base_url=base if base.endswith("/v1") else f"{base}/v1",
                    api_key=os.environ.get("OPENAI_API_KEY", "not-needed"))
    model = client.models.list().data[0].id

    def reply(messages: list[dict]) -> Iterator[str]:
        for chunk in client.chat.completions.create(model=model, messages=messages, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    return model, reply


def _local_replies(path: str):
    from kubetune.serve.engine import ChatModel, Params

    model = ChatModel(path)

    def reply(messages: list[dict]) -> Iterator[str]:
        for piece in model.stream(model.encode(messages), Params(temperature=0.7, top_p=0.95, max_tokens=256)):
            if isinstance(piece, str):
                yield piece

    return model.name, reply


def chat(target: str, system: str | None = None) -> int:
    remote = target.startswith(("http://", "https://"))
    try:
        name, reply = _endpoint_replies(target) if remote else _local_replies(target)
    except Exception as e:
        print(f"error: cannot reach {target}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"chatting with {name} — /reset starts over, /exit or Ctrl-D quits")
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if system else []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        print("bot> ", end="", flush=True)
        answer = ""
        try:
            for piece in reply(history):
                answer += piece
                print(piece, end="", flush=True)
        except Exception as e:
            print(f"\nerror: {type(e).__name__}: {e}", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": answer})
