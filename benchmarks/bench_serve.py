"""Serving latency and throughput of `kubetune serve`, measured with the official openai client.

    .venv/bin/python benchmarks/bench_serve.py MODEL_DIR [--requests 20] [--concurrency 4] [--max-tokens 64]

Time to first token and to the full reply for sequential streamed requests, then throughput
(requests/s and generated tokens/s) with several clients at once. Greedy decoding, fixed prompts.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai

PROMPTS = ["How do I export all my notes?", "I was charged twice this month.", "Does Nimbus work offline?",
           "How do I turn on two-factor authentication?", "How can I share a notebook with my team?"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "serve", args.model, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    try:
        while True:
            try:
                model = client.models.list().data[0].id
                break
            except openai.APIConnectionError:
                time.sleep(0.5)

        def ask(i: int, stream: bool):
            start = time.perf_counter()
            kwargs = dict(model=model, max_tokens=args.max_tokens, temperature=0,
                          messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
            if not stream:
                reply = client.chat.completions.create(**kwargs)
                return time.perf_counter() - start, None, reply.usage.completion_tokens
            first, tokens = None, 0
            for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter() - start
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            return time.perf_counter() - start, first, tokens

        ask(0, True)  # warm-up
        runs = [ask(i, True) for i in range(args.requests)]
        firsts = sorted(r[1] for r in runs if r[1] is not None)
        totals = sorted(r[0] for r in runs)
        tokens = sum(r[2] for r in runs)
        print(f"sequential, streamed, {args.requests} requests, <= {args.max_tokens} tokens each:")
        print(f"  first token  p50 {statistics.median(firsts) * 1000:6.0f} ms   p90 {firsts[int(0.9 * len(firsts))] * 1000:6.0f} ms")
        print(f"  full reply   p50 {statistics.median(totals) * 1000:6.0f} ms   p90 {totals[int(0.9 * len(totals))] * 1000:6.0f} ms"
              f"   ({tokens / sum(totals):.0f} generated tokens/s)")
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(lambda i: ask(i, False), range(args.requests)))
        elapsed = time.perf_counter() - start
        print(f"{args.concurrency} concurrent clients: {args.requests / elapsed:.2f} requests/s, "
              f"{sum(r[2] for r in results) / elapsed:.0f} generated tokens/s, mean latency "
              f"{statistics.mean(r[0] for r in results) * 1000:.0f} ms")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
