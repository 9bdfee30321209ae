"""Preparation's second pass for objective rft: each kept prompt rendered with the chat template and the
generation prompt (``<|im_start|>assistant\\n`` for ChatML), tokenized, and written with its item to
``prepared/{split}.jsonl`` (one line a prompt: messages, tools, item, prompt_ids). Nothing is packed: the
trainer samples answers for each prompt and builds its rows itself (``kubetune.train.rft``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from kubetune.data.tokenize import Renderer


@dataclass
class TokenizedPrompts:
    dropped: Counter = field(default_factory=Counter)
    examples: list[bytes] = field(default_factory=list)  # each kept prompt's line, prompt_ids added
    lengths: list[int] = field(default_factory=list)


class TokenizingPrompts:
    """Picklable, called once per chunk of example lines (like ``shards.Tokenizing``)."""

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, lines: list[bytes]) -> TokenizedPrompts:
        renderer, out = Renderer(self.tokenizer), TokenizedPrompts()
        for line in lines:
            record = orjson.loads(line)
            text = renderer.render(record["messages"], generation_prompt=True, tools=record.get("tools"))
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > self.max_len:
                out.dropped["too_long"] += 1
                continue
            out.examples.append(orjson.dumps({**record, "prompt_ids": ids}))
            out.lengths.append(len(ids))
        return out


class PromptWriter:
    """One split's ``{name}.jsonl`` of tokenized prompts; ``close`` gives the statistics the data report keeps
    for every split (``rows`` is the number of prompts)."""

    def __init__(self, folder: Path, name: str):
        self.name, self.files = name, [f"prepared/{name}.jsonl"]
        self.jsonl = open(folder / f"{name}.jsonl", "wb")
        self.examples = self.tokens = self.max_length = 0

    def add(self, chunk: TokenizedPrompts) -> None:
        self.jsonl.write(b"".join(line + b"\n" for line in chunk.examples))
        self.examples += len(chunk.examples)
        self.tokens += sum(chunk.lengths)
        self.max_length = max([self.max_length, *chunk.lengths])

    def close(self) -> dict:
        self.jsonl.close()
        return {"examples": self.examples, "tokens": self.tokens, "trained_tokens": 0,
                "mean_length": round(self.tokens / self.examples, 1) if self.examples else 0,
                "max_length": self.max_length, "rows": self.examples, "packing_efficiency": None}


def load_prompts(path: Path) -> list[dict]:
    """A split's prompts as written: each a dict with messages, item and prompt_ids."""
    with open(path, "rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]
