"""Synthetic chat data for the preparation benchmarks: support conversations of one to three turns with
a Zipf-like vocabulary, 10 % of them with personal data, 5 % exact and 5 % near copies of earlier ones.

    python benchmarks/scale_data.py OUT.jsonl --conversations 100000

Deterministic for a seed; written in one pass, so a million conversations need no memory.
"""

from __future__ import annotations

import argparse
import random

import orjson

SYSTEM = "You are the support assistant for Nimbus Notes. Answer briefly and precisely."
PII = ["Write to {name}{n}@mail.example please.", "Call me on +1 415 555 {n:04d}.",
       "The server at 203.0.113.{ip} is down.", "My card 4111 1111 1111 1111 was charged twice."]


def _vocab(rng: random.Random) -> tuple[list[str], list[float]]:
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ve", "zo", "ri", "pa", "do", "fe", "gu", "hi", "ju"]
    words = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(30000)})
    rng.shuffle(words)  # the frequent words are not all alike
    cumulative, total = [], 0.0
    for i in range(len(words)):
        total += 1 / (i + 1) ** 1.1
        cumulative.append(total)
    return words, cumulative


def conversations(n: int, seed: int = 0):
    """Yield ``n`` records ({"messages": [...]}), with planted duplicates and PII."""
    rng = random.Random(seed)
    words, cumulative = _vocab(rng)
    recent: list[dict] = []  # a window of earlier records to copy from

    def sentence(k: int) -> str:
        return " ".join(rng.choices(words, cum_weights=cumulative, k=k)).capitalize() + "."

    for i in range(n):
        if recent and rng.random() < 0.10:
            base = rng.choice(recent)
            record = orjson.loads(orjson.dumps(base))
            if rng.random() < 0.5:  # near copy: a few words of the last reply changed
                last = record["messages"][-1]
                tokens = last["content"].split()
                for _ in range(rng.randint(1, 2)):
                    tokens[rng.randrange(len(tokens))] = rng.choice(words)
                last["content"] = " ".join(tokens)
            yield record
            continue
        messages = [{"role": "system", "content": SYSTEM}]
        for _ in range(rng.randint(1, 3)):
            question = " ".join(sentence(rng.randint(5, 14)) for _ in range(rng.randint(1, 2)))
            if rng.random() < 0.1:
                question += " " + rng.choice(PII).format(name=rng.choice(words), n=rng.randrange(10000),
                                                        ip=rng.randint(1, 254))
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant",
                             "content": " ".join(sentence(rng.randint(6, 16)) for _ in range(rng.randint(1, 3)))})
        record = {"messages": messages}
        recent.append(record)
        if len(recent) > 2000:
            recent.pop(rng.randrange(len(recent)))
        yield record


def write(path: str, n: int, seed: int = 0) -> int:
    """Write ``n`` conversations as JSONL; the number of bytes written."""
    size = 0
    with open(path, "wb") as f:
        for record in conversations(n, seed):
            line = orjson.dumps(record) + b"\n"
            f.write(line)
            size += len(line)
    return size


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--conversations", type=int, default=30000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{args.out}: {write(args.out, args.conversations, args.seed) / 1e6:.1f} MB")
