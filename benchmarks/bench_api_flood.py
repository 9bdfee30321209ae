"""A flood of random API keys at `kubetune api` while a few real clients keep working.

    .venv/bin/python benchmarks/bench_api_flood.py [--requests 10000] [--concurrency 100] [--good 3]
                                                   [--review-rate 20 --review-burst 40 | --uncapped]

Starts the tests' control plane (etcd + kube-apiserver) and `kubetune api` as its own process. ``--good``
clients (ServiceAccounts with tokens for audience kubetune, allowed to list finetunejobs) call
``GET /v1/fine_tuning/jobs`` one request after another: first alone for ``--baseline`` seconds, then while
``--requests`` requests with random bearer tokens arrive, ``--concurrency`` at a time (aiohttp, this
process). Measured: the flood's answers by status, the TokenReviews and SubjectAccessReviews the API server
received during the flood (its own apiserver_request_total), the good clients' latency p50/p99 before and
during the flood and their errors, and the API process's peak RSS (sampled every 50 ms). ``--uncapped``
runs the same flood with the review cap lifted, to see what the cap buys.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_operator import pct, request_counts  # noqa: E402  (the API server's counters, percentiles)
from api_process import Watch, start_api  # noqa: E402
from controlplane import ROOT, ControlPlane  # noqa: E402

NS = "bench"
MIB = 1024 * 1024
REVIEWS = [("POST", "tokenreviews"), ("POST", "subjectaccessreviews")]  # reviews are POSTs, not stored objects


def good_tokens(cp: ControlPlane, n: int) -> list[str]:
    cp.kubectl("apply", "-f", str(ROOT / "crds"))  # the Role names finetunejobs
    cp.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.dev")
    cp.kubectl("create", "namespace", NS)
    cp.kubectl("-n", NS, "create", "role", "ft", "--verb=list", "--resource=finetunejobs")
    tokens = []
    for i in range(n):
        cp.kubectl("-n", NS, "create", "serviceaccount", f"client-{i}")
        cp.kubectl("-n", NS, "create", "rolebinding", f"ft-{i}", "--role=ft", f"--serviceaccount={NS}:client-{i}")
        tokens.append(cp.kubectl("-n", NS, "create", "token", f"client-{i}", "--audience", "kubetune",
                                 "--duration=2h").stdout.strip())
    return tokens


async def good_client(session: aiohttp.ClientSession, url: str, token: str, stop: asyncio.Event,
                      latencies: list[float], errors: Counter) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
            await r.read()
        if r.status == 200:
            latencies.append(time.perf_counter() - start)
        else:
            errors[r.status] += 1


async def flood(session: aiohttp.ClientSession, url: str, requests: int, concurrency: int, statuses: Counter,
                retry_after: Counter) -> None:
    left = iter(range(requests))

    async def worker():
        for _ in left:
            async with session.get(url, headers={"Authorization": f"Bearer {secrets.token_urlsafe(32)}"}) as r:
                await r.read()
            statuses[r.status] += 1
            if r.status == 429:
                retry_after[r.headers.get("Retry-After")] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def measure(url: str, tokens: list[str], args, reviews_now) -> dict:
    jobs = f"{url}/v1/fine_tuning/jobs"
    connector = aiohttp.TCPConnector(limit=args.concurrency + len(tokens))
    async with aiohttp.ClientSession(connector=connector) as session:
        before, during, errors = [], [], Counter()
        stop = asyncio.Event()
        clients = [asyncio.create_task(good_client(session, jobs, t, stop, before, errors)) for t in tokens]
        await asyncio.sleep(args.baseline)
        stop.set()
        await asyncio.gather(*clients)
        reviews_before = await asyncio.to_thread(reviews_now)
        stop = asyncio.Event()
        clients = [asyncio.create_task(good_client(session, jobs, t, stop, during, errors)) for t in tokens]
        statuses, retry_after = Counter(), Counter()
        start = time.perf_counter()
        await flood(session, jobs, args.requests, args.concurrency, statuses, retry_after)
        wall = time.perf_counter() - start
        stop.set()
        await asyncio.gather(*clients)
        reviews_after = await asyncio.to_thread(reviews_now)
    return {"before": sorted(before), "during": sorted(during), "errors": errors, "statuses": statuses,
            "retry_after": retry_after, "wall": wall,
            "reviews": [reviews_after[k] - reviews_before[k] for k in REVIEWS]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000, help="flood requests, each with a random token")
    parser.add_argument("--concurrency", type=int, default=100, help="flood requests in flight")
    parser.add_argument("--good", type=int, default=3, help="real clients calling all along")
    parser.add_argument("--baseline", type=float, default=5.0, help="seconds the good clients call alone first")
    parser.add_argument("--review-rate", default="20")
    parser.add_argument("--review-burst", default="40")
    parser.add_argument("--uncapped", action="store_true", help="lift the review cap (as before it existed)")
    args = parser.parse_args()
    if args.uncapped:
        args.review_rate, args.review_burst = "1e9", "1000000000"

    cp = ControlPlane().start()
    api = None
    try:
        import urllib3
        from kubernetes import config

        urllib3.disable_warnings()  # the test control plane's own certificate, on loopback
        tokens = good_tokens(cp, args.good)
        admin = config.new_client_from_config(str(cp.kubeconfig))
        with tempfile.TemporaryDirectory(prefix="bench-api-flood-") as tmp:
            api, url = start_api(["--files", "s3://bench/files/", "--outputs", "s3://bench/jobs/", "--review-rate",
                                  args.review_rate, "--review-burst", args.review_burst], cp.env(), Path(tmp) / "api.log")
            if url is None:
                return 1
            with Watch(api.pid) as watch:
                result = asyncio.run(measure(url, tokens, args, lambda: request_counts(admin)))

        s, before, during = result["statuses"], result["before"], result["during"]
        cap = "uncapped" if args.uncapped else f"cap {args.review_rate}/s, burst {args.review_burst}"
        print(f"flood: {args.requests:,} requests with random tokens, {args.concurrency} in flight ({cap}): "
              f"{result['wall']:.1f} s, {args.requests / result['wall']:,.0f} requests/s")
        print(f"flood answers: 401 {s[401]:,}, 429 {s[429]:,}, other {sum(s.values()) - s[401] - s[429]:,}"
              + (f" ({dict(s)})" if set(s) - {401, 429} else "")
              + (f"; Retry-After {dict(result['retry_after'])}" if result["retry_after"] else ""))
        tr, sar = result["reviews"]
        print(f"kube-apiserver during the flood: {tr:,.0f} TokenReviews, {sar:,.0f} SubjectAccessReviews")
        for name, lat in (("before", before), ("during", during)):
            print(f"good clients ({args.good}) {name} the flood: {len(lat):,} requests, "
                  f"p50 {pct(lat, 0.5) * 1000:.1f} ms, p99 {pct(lat, 0.99) * 1000:.1f} ms" if lat
                  else f"good clients {name} the flood: no successful request")
        print(f"good clients' errors: {dict(result['errors']) or 'none'}")
        print(f"API process: RSS idle {watch.idle / MIB:.0f} MiB, peak {watch.peak / MIB:.0f} MiB; "
              f"CPU {watch.cpu_seconds:.1f} s")
        return 0
    finally:
        if api is not None:
            api.terminate()
            api.wait(10)
        cp.stop()


if __name__ == "__main__":
    sys.exit(main())
