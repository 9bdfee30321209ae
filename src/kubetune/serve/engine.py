"""The model behind the endpoint: chat template in, text out, whole or streamed.

One generation runs at a time (the server queues requests in arrival order); a small model on CPU
or one GPU is not made faster by running several generate() calls side by side.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch


@dataclass
class Params:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


class StopFilter:
    """Cuts streamed text at the first stop sequence, holding back what could be the start of one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.buffer, self.stopped = stops, "", False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.buffer += piece
        cuts = [self.buffer.find(s) for s in self.stops if s in self.buffer]
        if cuts:
            self.stopped = True
            out, self.buffer = self.buffer[: min(cuts)], ""
            return out
        keep = len(self.buffer) - self.hold
        out, self.buffer = (self.buffer[:keep], self.buffer[keep:]) if keep > 0 else ("", self.buffer)
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


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

    def encode(self, messages: list[dict]) -> torch.Tensor:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]

    def _kwargs(self, ids: torch.Tensor, p: Params) -> dict:
        sample = p.temperature > 0
        return {"input_ids": ids.to(self.model.device), "attention_mask": torch.ones_like(ids).to(self.model.device),
                "max_new_tokens": p.max_tokens, "do_sample": sample, "eos_token_id": self.tokenizer.eos_token_id,
                "pad_token_id": self.tokenizer.pad_token_id,
                **({"temperature": p.temperature, "top_p": p.top_p} if sample else {})}

    def stream(self, ids: torch.Tensor, p: Params) -> Iterator[str | Result]:
        """Text pieces as they are generated, then a Result (whose text is the whole reply)."""
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
