"""What a request asks of the model and what it gets back, shared by the engine and the batcher."""

from __future__ import annotations

from dataclasses import dataclass


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
