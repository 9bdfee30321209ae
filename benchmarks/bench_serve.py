"""Serving latency and throughput of `kubetune serve`, measured with the official openai client.

    .venv/bin/python benchmarks/bench_serve.py MODEL_DIR [--requests 24] [--clients 1 4 8] [--max-tokens 64]
    .venv/bin/python benchmarks/bench_serve.py MODEL_DIR --size base   # an untrained model of that size

The quickstart's model (0.2 M parameters) costs about a millisecond per decode step whatever the
batch, so its figures measure HTTP and streaming more than generation; ``--size small|base`` serves
an untrained model built from that preset with MODEL_DIR's tokenizer instead (it rarely ends early,
so replies run to ``--max-tokens``).

For each server setting (``--max-batch 1``: one generation at a time, as before continuous batching;
``--max-batch 8``: continuous batching), time to first token for sequential streamed requests, then
throughput (requests/s, generated tokens/s) and first-token p50 with 1, 4 and 8 clients at once.
Greedy decoding, fixed prompts; one table at the end.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import openai

PROMPTS = ["How do I export all my notes?", "I was charged twice this month.", "Does Nimbus work offline?",
           "How do I turn on two-factor authentication?", "How can I share a notebook with my team?"]


def measure(model_dir: str, max_batch: int, clients: list[int], requests: int, max_tokens: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "serve", model_dir, "--port", str(port),
                               "--max-batch", str(max_batch), "--max-queue", "64"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    try:
        while True:
            try:
                model = client.models.list().data[0].id
                break
            except openai.APIConnectionError:
                assert server.poll() is None, "the server did not start"
                time.sleep(0.5)

        def ask(i: int):
            start = time.perf_counter()
            first, tokens = None, 0
            for chunk in client.chat.completions.create(
                    model=model, max_tokens=max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True},
                    messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]):
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter() - start
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            return time.perf_counter() - start, first if first is not None else time.perf_counter() - start, tokens

        ask(0)  # warm-up
        rows = []
        for n in clients:
            start = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                results = list(pool.map(ask, range(requests)))
            elapsed = time.perf_counter() - start
            rows.append({"max_batch": max_batch, "clients": n, "requests_per_s": requests / elapsed,
                         "tokens_per_s": sum(r[2] for r in results) / elapsed,
                         "first_token_p50_ms": statistics.median(r[1] for r in results) * 1000,
                         "latency_p50_ms": statistics.median(r[0] for r in results) * 1000})
            print(f"max-batch {max_batch}, {n} client(s): {rows[-1]['tokens_per_s']:.0f} tokens/s, "
                  f"first token p50 {rows[-1]['first_token_p50_ms']:.0f} ms", flush=True)
        return rows
    finally:
        server.terminate()
        server.wait(10)


def untrained(model_dir: str, size: str, into: str) -> str:
    """MODEL_DIR's tokenizer with an untrained model of preset ``size``, saved under ``into``."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from kubetune.models import config_for
    from kubetune.spec import FromConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config_for(FromConfig(size=size), tokenizer))
    print(f"serving an untrained {size} model: {model.num_parameters() / 1e6:.1f} M parameters", flush=True)
    folder = f"{into}/model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--size", choices=["tiny", "small", "base"], help="serve an untrained model of this preset")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = untrained(args.model, args.size, tmp) if args.size else args.model
        rows = [r for batch in (1, 8) for r in measure(model, batch, args.clients, args.requests, args.max_tokens)]
    base = {r["clients"]: r for r in rows if r["max_batch"] == 1}
    print(f"\n{args.requests} streamed requests per row, <= {args.max_tokens} tokens each, greedy")
    print("| server | clients | requests/s | generated tokens/s | vs one at a time | first token p50 | vs one at a time |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b = base[r["clients"]]
        print(f"| max-batch {r['max_batch']} | {r['clients']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x | {r['first_token_p50_ms']:.0f} ms | "
              f"{r['first_token_p50_ms'] / b['first_token_p50_ms']:.2f}x |")


if __name__ == "__main__":
    main()
