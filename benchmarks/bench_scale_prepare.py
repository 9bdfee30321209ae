"""Preparation at scale: wall time, conversations/s and peak memory of a full `kubetune prepare` (tokenizer
training included) at growing dataset sizes, against the code of another revision on the same data.

    .venv/bin/python benchmarks/bench_scale_prepare.py                     # 30k, 100k, 300k, 1M
    .venv/bin/python benchmarks/bench_scale_prepare.py --sizes 30000 --baseline-max 30000

The data is `benchmarks/scale_data.py`'s synthetic support chat (1-3 turns, 10 % with PII, 10 % exact or
near copies), generated once per size into --work. Each run is `python -m kubetune.cli prepare` in a
subprocess; its memory is sampled every 0.5 s over the whole process tree (workers and the fork server
included): "peak RSS" is the largest sum of resident sets seen, which counts the pages forked workers share
with their parent once per process; "peak PSS" shares those pages out, so it is what the pod's memory
cgroup is charged; "largest process" is the largest single resident set. The
baseline is the `src/` of --baseline-rev (by default the last commit before streaming preparation),
taken with `git archive` and run the same way, at the sizes up to --baseline-max (its memory grows with
the data: 4.3 GiB at 100k, so 1M conversations would need about 40 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from scale_data import write  # noqa: E402

BASELINE_REV = "e063cef"  # main before streaming preparation (issue 13)
JOB = """apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata: {{name: scale-{n}}}
spec:
  model: {{fromConfig: {{architecture: llama, size: tiny, vocabSize: 4096}}}}
  dataset: {{train: {data}, validationSplit: 0.01}}
  preprocessing: {{maxSeqLength: 1024, packing: true}}
  training: {{method: full, epochs: 1}}
  resources: {{nodes: 1, gpusPerNode: 0}}
  output: {{uri: {out}}}
"""


def sample_tree(proc: psutil.Process, stop: threading.Event, peak: dict) -> None:
    while not stop.is_set():
        try:
            procs = [proc] + proc.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        rss, pss = [], []
        for p in procs:
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss.append(info.rss)
            pss.append(info.pss)
        peak["tree"] = max(peak["tree"], sum(rss))
        peak["pss"] = max(peak["pss"], sum(pss))
        peak["largest"] = max(peak["largest"], max(rss, default=0))
        peak["processes"] = max(peak["processes"], len(rss))
        stop.wait(0.5)  # reading smaps for PSS costs CPU: sampling more often slows what it measures


def settle(quiet_percent: float = 10, longest: float = 120) -> None:
    """Wait until the machine is idle: right after a run that freed gigabytes, the kernel's reclaim work (or a
    virtual machine handing memory back) slowed the next run by up to half."""
    deadline = time.monotonic() + longest
    while psutil.cpu_percent(interval=2) > quiet_percent and time.monotonic() < deadline:
        pass


def run(src: Path, job: Path, log: Path, env: dict) -> dict:
    settle()
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "prepare", str(job)], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **env, "PYTHONPATH": str(src)})
        peak, stop = {"tree": 0, "pss": 0, "largest": 0, "processes": 0}, threading.Event()
        sampler = threading.Thread(target=sample_tree, args=(psutil.Process(proc.pid), stop, peak), daemon=True)
        sampler.start()
        rc = proc.wait()
        stop.set()
        sampler.join()
    wall = time.monotonic() - started
    if rc != 0:
        raise SystemExit(f"prepare failed (rc {rc}); see {log}:\n{log.read_text()[-2000:]}")
    report = json.loads((job.parent / f"out-{job.stem}" / "data_report.json").read_text())
    return {"wall": wall, **peak, "train_examples": report["examples_out"]["train"],
            "duplicates": report["duplicates"], "tokens": report["tokens"]["train"]["tokens"]}


def baseline_src(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="30000,100000,300000,1000000")
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    parser.add_argument("--baseline-max", type=int, default=100000)
    parser.add_argument("--work", default=str(ROOT / "out" / "bench-scale"))
    parser.add_argument("--workers", help="KUBETUNE_WORKERS for the new code (default: every core)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {"KUBETUNE_WORKERS": args.workers} if args.workers else {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old_src = baseline_src(args.baseline_rev, Path(tmp)) if args.baseline_max else None
        for n in [int(x) for x in args.sizes.split(",")]:
            data = work / f"chat-{n}.jsonl"
            if not data.exists():
                print(f"generating {n} conversations ...", flush=True)
                write(str(data), n)
            size = data.stat().st_size
            for name, src in (("before", old_src), ("now", ROOT / "src")):
                if name == "before" and (src is None or n > args.baseline_max):
                    continue
                job = work / f"{name}-{n}.yaml"
                out = work / f"out-{job.stem}"
                subprocess.run(["rm", "-rf", str(out)], check=True)
                job.write_text(JOB.format(n=n, data=data, out=out))
                print(f"{name}: {n} conversations ({size / 1e6:.0f} MB) ...", flush=True)
                result = run(src, job, work / f"{job.stem}.log", env if name == "now" else {})
                row = {"code": name, "conversations": n, "mb": size / 1e6, **result, "per_s": n / result["wall"]}
                rows.append(row)
                print(f"  {result['wall']:.0f} s, {row['per_s']:.0f} conversations/s, peak RSS "
                      f"{result['tree'] / 2**30:.2f} GiB, PSS {result['pss'] / 2**30:.2f} GiB (largest process {result['largest'] / 2**30:.2f} GiB), "
                      f"{result['train_examples']} train examples, duplicates {result['duplicates']}", flush=True)
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          f"baseline {args.baseline_rev}\n")
    print("| code | conversations | input | wall | conversations/s | peak RSS (tree) | peak PSS (tree) | largest process |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['code']} | {r['conversations']:,} | {r['mb']:.0f} MB | {r['wall']:.0f} s | {r['per_s']:,.0f} | "
              f"{r['tree'] / 2**30:.2f} GiB | {r['pss'] / 2**30:.2f} GiB | {r['largest'] / 2**30:.2f} GiB |")
    for n in sorted({r["conversations"] for r in rows}):
        pair = {r["code"]: r for r in rows if r["conversations"] == n}
        if len(pair) == 2:
            print(f"{n:,}: {pair['now']['per_s'] / pair['before']['per_s']:.2f}x the conversations/s of "
                  f"{args.baseline_rev}, {pair['before']['pss'] / pair['now']['pss']:.1f}x less memory (PSS)")


if __name__ == "__main__":
    main()
