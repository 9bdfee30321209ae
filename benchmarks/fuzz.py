"""Both fuzzers of the test suite with larger counts, and a table of what they found.

    .venv/bin/python benchmarks/fuzz.py [--lines 10000] [--cases 2000] [--seed N]

Dataset lines: generated files (tests/test_fuzz_data.py) through ``prepare``; a crash is any
exception other than the documented too-many-bad-lines failure, or a report whose counts do not add
up; a hang is a prepare call over --hang-seconds. Endpoint: schemathesis cases
(tests/test_fuzz_serve.py) against `kubetune serve` on a tiny model; a hang is a response over 20 s;
a crash is the server process dying or no longer answering a normal chat completion. Unlike the
tests, nothing stops at the first failure: every input runs and failures are counted.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

import test_fuzz_data as data  # noqa: E402
import test_fuzz_serve as serve  # noqa: E402


def fuzz_data(lines: int, hang_seconds: float, rng_seed: int) -> dict:
    found = {"inputs": 0, "calls": 0, "crashes": [], "hangs": [], "seconds": 0.0}
    began = time.monotonic()

    @seed(rng_seed)
    # every batch has at least 30 lines, so this many reach --lines
    @settings(max_examples=lines // 30 + 1, deadline=None, database=None, phases=["generate"],
              suppress_health_check=list(HealthCheck))
    @given(data.batches())
    def run(batch):
        if found["inputs"] >= lines:
            return
        found["inputs"] += batch[2]
        found["calls"] += 1
        start = time.monotonic()
        try:
            with tempfile.TemporaryDirectory(prefix="kubetune-fuzz-") as tmp:
                data.check_batch(Path(tmp), *batch)
        except Exception:  # a crash or a miscount: keep going, count it
            found["crashes"].append(f"{batch[0]} format={batch[3]}: {traceback.format_exc(limit=-2)}")
        if time.monotonic() - start > hang_seconds:
            found["hangs"].append(f"{batch[0]}: {time.monotonic() - start:.0f}s")

    run()
    found["seconds"] = time.monotonic() - began
    return found


def fuzz_endpoint(cases: int, seconds: float, rng_seed: int) -> dict:
    folder = tempfile.TemporaryDirectory(prefix="kubetune-fuzz-model-")
    proc, url = serve.start_server(serve.save_tiny_model(Path(folder.name)))
    began = time.monotonic()
    try:
        found = serve.fuzz_endpoint(url, max_examples=cases, seconds=seconds, rng_seed=rng_seed)
        found["crashes"] = []
        try:
            serve._normal_chat_works(url)
        except Exception as e:
            found["crashes"].append(f"no normal reply afterwards: {e!r}")
        if proc.poll() is not None:
            found["crashes"].append(f"server exited with {proc.returncode}")
    finally:
        serve.stop_server(proc)
        folder.cleanup()
    found["seconds"] = time.monotonic() - began
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=10_000, help="dataset lines to generate")
    parser.add_argument("--cases", type=int, default=2_000, help="requests to send to the endpoint")
    parser.add_argument("--endpoint-seconds", type=float, default=600, help="time limit of the endpoint fuzzer")
    parser.add_argument("--hang-seconds", type=float, default=60, help="a prepare call this slow counts as a hang")
    parser.add_argument("--seed", type=int, default=random.randrange(2**32))
    args = parser.parse_args()
    print(f"seed {args.seed}", flush=True)

    d = fuzz_data(args.lines, args.hang_seconds, args.seed)
    print(f"dataset: {d['inputs']} lines in {d['calls']} prepare calls ({data.TRIED['failed_cleanly']} failed for too "
          f"many bad lines, as documented), {d['seconds']:.0f}s", flush=True)
    e = fuzz_endpoint(args.cases, args.endpoint_seconds, args.seed)
    print(f"endpoint: {e['cases']} cases, {e['seconds']:.0f}s; {len(e['failures'])} other check failures "
          "(schema conformance, invalid input accepted)", flush=True)

    rows = [("fuzzer", "inputs tried", "crashes", "5xx", "hangs"),
            ("dataset lines → prepare", d["inputs"], len(d["crashes"]), "-", len(d["hangs"])),
            ("POST/GET endpoint (schemathesis)", e["cases"], len(e["crashes"]), len(e["5xx"]), len(e["hangs"]))]
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    print()
    for r in rows:
        print("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    for title, items in (("data crashes", d["crashes"]), ("data hangs", d["hangs"]), ("endpoint crashes", e["crashes"]),
                         ("endpoint 5xx", e["5xx"]), ("endpoint hangs", e["hangs"]), ("endpoint check failures", e["failures"])):
        for item in items[:3]:
            print(f"\n{title}: {item[:1500]}")


if __name__ == "__main__":
    main()
