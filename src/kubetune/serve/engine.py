"""The model behind the endpoint: chat template in, text out, whole or streamed.

Without batching, one generate() runs at a time (several side by side would not be faster); with
``start_batching`` (the server's default), requests share decode steps (``serve/batching.py``) and
``stream`` hands them to the batcher.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import torch

from kubetune.data.formats import template_messages
from kubetune.serve.params import Params, Result, StopFilter


class ChatModel:
    def __init__(self, path: str | Path, name: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = Path(path)
        # OUTPUT/model is named after its job: "nimbus-support", not "model"
        self.name = name or (self.path.resolve().parent.name if self.path.name == "model" else self.path.name)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype="auto").to(device).eval()
        self.context = getattr(self.model.config, "max_position_embeddings", 4096)
        self.lock = threading.Lock()
        self.batcher = None

    def start_batching(self, max_batch: int) -> None:
        from kubetune.serve.batching import Batcher

        if self.batcher is None:
            self.batcher = Batcher(self, max_batch)

    def encode(self, messages: list[dict], tools: list[dict] | None = None) -> torch.Tensor:
        """The prompt's token ids, rendered as in training (``data/tokenize.py``): tools and tool calls too."""
        text = self.tokenizer.apply_chat_template(template_messages(messages), tools=tools or None, tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]

    def _kwargs(self, ids: torch.Tensor, p: Params) -> dict:
        sample = p.temperature > 0
        return {"input_ids": ids.to(self.model.device), "attention_mask": torch.ones_like(ids).to(self.model.device),
                "max_new_tokens": p.max_tokens, "do_sample": sample, "eos_token_id": self.tokenizer.eos_token_id,
                "pad_token_id": self.tokenizer.pad_token_id,
                **({"temperature": p.temperature, "top_p": p.top_p} if sample else {})}

    def stream(self, ids: torch.Tensor, p: Params) -> Iterator[str | Result]:
        """Text pieces as they are generated, then a Result (whose text is the whole reply)."""
        if self.batcher is not None:
            yield from self.batcher.stream(ids, p)
            return
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        counted: list[int] = []
        failed: list[BaseException] = []

        def run():
            with self.lock, torch.no_grad():
                try:
                    out = self.model.generate(**self._kwargs(ids, p), streamer=streamer)
                    counted.append(out.shape[1] - ids.shape[1])
                except BaseException as e:  # end the stream, or the reader below waits forever
                    failed.append(e)
                    streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        stops, text = StopFilter(p.stop), ""
        for piece in streamer:
            piece = stops.feed(piece)
            text += piece
            if piece:
                yield piece
        tail = stops.flush()
        if tail:
            text += tail
            yield tail
        worker.join()
        if failed:
            raise failed[0]
        n = counted[0] if counted else 0
        reason = "stop" if stops.stopped or n < p.max_tokens else "length"
        yield Result(text, reason, int(ids.shape[1]), n)

    def complete(self, ids: torch.Tensor, p: Params) -> Result:
        *_, result = self.stream(ids, p)
        return result
