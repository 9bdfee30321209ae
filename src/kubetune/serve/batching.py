"""Continuous batching: every running request advances by one token in the same forward pass.

A request is prefilled alone when it arrives (its first token comes at once, whatever else runs),
then joins the running batch: the batch's key/value cache is left-padded to a common length, the
attention mask hides the padding and each row gets its own position ids, so a row computes what it
would compute alone. Each row samples with its own temperature and top_p and ends on its own (end of
sequence, max_tokens or a stop string); finished rows leave the cache at once. One thread owns the
model; callers get the same stream of text pieces and a final Result as before.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch

from kubetune.serve.params import Params, Result, StopFilter

DONE = object()


@dataclass
class Sequence:
    ids: torch.Tensor  # (1, prompt length)
    params: Params
    out: queue.Queue = field(default_factory=queue.Queue)
    tokens: list[int] = field(default_factory=list)
    generated: int = 0
    decoded: str = ""  # the text of ``tokens`` already fed to the stop filter
    text: str = ""  # what was sent: the reply so far
    stops: StopFilter | None = None
    finish: str | None = None

    def __post_init__(self):
        self.stops = StopFilter(self.params.stop)


def sample(logits: torch.Tensor, p: Params, generator: torch.Generator | None = None) -> int:
    """Greedy at temperature 0, else nucleus sampling, as generate() does (logits: (vocab,))."""
    if p.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class Batcher:
    def __init__(self, chat_model, max_batch: int = 8):
        self.chat, self.model, self.tokenizer = chat_model, chat_model.model, chat_model.tokenizer
        self.max_batch = max_batch
        self.incoming: queue.Queue[Sequence] = queue.Queue()
        self.running: list[Sequence] = []
        self.cache = None  # DynamicCache of the running rows
        self.mask: torch.Tensor | None = None  # (rows, columns): 1 for real tokens, 0 for left padding
        self.eos = self.tokenizer.eos_token_id
        threading.Thread(target=self._loop, daemon=True, name="batcher").start()

    def stream(self, ids: torch.Tensor, p: Params) -> Iterator[str | Result]:
        seq = Sequence(ids, p)
        self.incoming.put(seq)
        while True:
            item = seq.out.get()
            if item is DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    # --- the model's thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                self._admit(block=not self.running)
                if self.running:
                    self._decode()
            except BaseException as e:  # a failed step ends the requests in it, not the server
                for seq in self.running:
                    seq.out.put(e)
                self.running, self.cache, self.mask = [], None, None

    def _admit(self, block: bool) -> None:
        while len(self.running) < self.max_batch:
            try:
                seq = self.incoming.get(block=block)
            except queue.Empty:
                return
            block = False
            try:
                self._prefill(seq)
            except BaseException as e:
                seq.out.put(e)

    @torch.no_grad()
    def _prefill(self, seq: Sequence) -> None:
        ids = seq.ids.to(self.model.device)
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True)
        if not self._advance(seq, out.logits[0, -1]):
            return  # done after one token: it never joins the batch
        self._join(seq, cache, ids.shape[1])

    def _join(self, seq: Sequence, cache, length: int) -> None:
        from transformers import DynamicCache

        new_mask = torch.ones(1, length, dtype=torch.long, device=self.model.device)
        if not self.running:
            self.running, self.cache, self.mask = [seq], cache, new_mask
            return
        width = max(self.mask.shape[1], length)
        layers = []
        for old, new in zip(self.cache.layers, cache.layers):
            layers.append((torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)]),
                           torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])))
        self.cache = DynamicCache(layers, config=self.model.config)
        self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(new_mask, width, dim=1)])
        self.running.append(seq)

    @torch.no_grad()
    def _decode(self) -> None:
        device = self.model.device
        last = torch.tensor([[s.tokens[-1]] for s in self.running], device=device)
        positions = self.mask.sum(dim=1, keepdim=True)  # each row's own next position
        self.mask = torch.cat([self.mask, torch.ones_like(last)], dim=1)
        out = self.model(input_ids=last, attention_mask=self.mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True)
        keep = [i for i, seq in enumerate(self.running) if self._advance(seq, out.logits[i, -1])]
        if len(keep) < len(self.running):
            self.running = [self.running[i] for i in keep]
            if not keep:
                self.cache, self.mask = None, None
                return
            index = torch.tensor(keep, device=device)
            self.cache.batch_select_indices(index)
            self.mask = self.mask[index]
            drop = int((self.mask.sum(dim=0) == 0).long().cumprod(0).sum())  # padding columns no row needs now
            if drop:
                self.mask = self.mask[:, drop:]
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, drop:], layer.values[:, :, drop:]

    def _advance(self, seq: Sequence, logits: torch.Tensor) -> bool:
        """Take the next token; send the new text; False once the sequence is finished."""
        token = sample(logits, seq.params)
        seq.generated += 1  # the end-of-sequence token counts, as generate() counts it
        if token == self.eos:
            seq.finish = "stop"
        else:
            seq.tokens.append(token)
            self._send(seq, final=False)
            if seq.stops.stopped:
                seq.finish = "stop"
            elif seq.generated >= seq.params.max_tokens:
                seq.finish = "length"
        if seq.finish is None:
            return True
        self._send(seq, final=True)
        seq.out.put(Result(seq.text, seq.finish, int(seq.ids.shape[1]), seq.generated))
        seq.out.put(DONE)
        return False

    def _send(self, seq: Sequence, final: bool) -> None:
        text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:  # a multi-byte character still incomplete: wait for it
            return
        piece = seq.stops.feed(text[len(seq.decoded):])
        seq.decoded = text
        if final:
            piece += seq.stops.flush()
        if piece:
            seq.text += piece
            seq.out.put(piece)


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
