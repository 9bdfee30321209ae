"""Kill the trainer at chosen points, rerun it, and check the rerun ends where an uninterrupted run does.

    .venv/bin/python benchmarks/bench_trainer_kills.py [--only NAME ...] [--workdir DIR]

A small job (tiny from-config Llama, the bundled data, 2 CPU ranks) started the way a user starts
it: ``kubetune run job.json`` (prepare + torchrun + evaluate). First one uninterrupted run: its final
step and final validation loss are the reference. Then, for each kill point, a fresh output: start
the run, SIGKILL the whole process tree (the CLI, torchrun, both ranks, compilers) when the point is
reached, and run the same command again on the same output, to completion. Each rerun must end at
the reference's final step and validation loss (rel 1e-4), with every step logged exactly once, must
not hang (each run is bounded by --timeout) and must resume only from a checkpoint that had its
COMPLETE marker when the run was killed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune")
REL = 1e-4


def job_doc(steps_hint: str = "") -> dict:
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "kills"},
            "spec": {"model": {"fromConfig": {"size": "tiny", "vocabSize": 512}},
                     "dataset": {"train": str(ROOT / "examples" / "data")},
                     "preprocessing": {"maxSeqLength": 256, "pii": {"allow": ["no-reply@nimbusnotes.example"]}},
                     "training": {"method": "full", "learningRate": 3e-3, "globalBatchSize": 8, "microBatchSize": 2,
                                  "epochs": 1, "zeroStage": 2, "evalEvery": 6, "checkpointEvery": 6,
                                  "keepCheckpoints": 2},
                     "resources": {"nodes": 1, "gpusPerNode": 0},
                     "evaluation": {"samples": 4, "maxNewTokens": 16},
                     "output": {"uri": "unused"}}}


# --- process handling ------------------------------------------------------------------------------

def kill_tree(pid: int) -> int:
    """SIGKILL a process and all its descendants at once. Everything is stopped first (repeatedly,
    so nothing forked after a snapshot escapes, e.g. a compiler under ninja), then killed."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return 0
    stopped: dict[int, psutil.Process] = {}
    for _ in range(10):
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        new = [p for p in procs if p.pid not in stopped]
        if not new:
            break
        for p in new:
            try:
                p.suspend()
                stopped[p.pid] = p
            except psutil.NoSuchProcess:
                pass
    for p in stopped.values():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return len(stopped)


@dataclass
class Run:
    rc: int | None  # None: killed by us
    seconds: float
    log: str
    hung: bool = False


def start(job_file: Path, out: Path, env: dict, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kubetune.cli", "run", str(job_file), "--output", str(out), "--nproc", "2"]
    return subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT)


def run_until(job_file: Path, out: Path, env: dict, log_path: Path, timeout: float,
              trigger: Callable[[Path, str], bool] | None = None) -> Run:
    """Run to completion, or until ``trigger(out, log)`` is true, then kill the tree."""
    t0 = time.monotonic()
    proc = start(job_file, out, env, log_path)
    while True:
        rc = proc.poll()
        log = log_path.read_text(errors="replace")
        if rc is not None:
            return Run(rc, time.monotonic() - t0, log)
        if time.monotonic() - t0 > timeout:
            kill_tree(proc.pid)
            proc.wait()
            return Run(None, time.monotonic() - t0, log_path.read_text(errors="replace"), hung=True)
        if trigger is not None and trigger(out, log):
            kill_tree(proc.pid)
            proc.wait()
            return Run(None, time.monotonic() - t0, log_path.read_text(errors="replace"))
        time.sleep(0.005)


# --- what a run left behind ----------------------------------------------------------------------

def metrics(out: Path) -> list[dict]:
    try:
        with open(out / "metrics.csv", newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error):
        return []


def steps_done(out: Path) -> int:
    rows = metrics(out)
    return int(rows[-1]["step"]) if rows else 0


def checkpoints(out: Path) -> tuple[list[int], list[int]]:
    """(steps with a COMPLETE marker, steps without)."""
    complete, torn = [], []
    for d in sorted((out / "checkpoints").glob("step-*")):
        (complete if (d / "COMPLETE").exists() else torn).append(int(d.name.split("-")[1]))
    return complete, torn


def phase(out: Path) -> str:
    try:
        return json.loads((out / "progress.json").read_text()).get("phase", "")
    except (OSError, ValueError):
        return ""


# --- kill points ---------------------------------------------------------------------------------

def after_seconds(s: float):
    t0 = [None]

    def trigger(out, log):
        t0[0] = t0[0] or time.monotonic()
        return time.monotonic() - t0[0] >= s
    return trigger


def log_then(pattern: str, delay: float = 0.0):
    seen = [None]

    def trigger(out, log):
        if seen[0] is None and pattern in log:
            seen[0] = time.monotonic()
        return seen[0] is not None and time.monotonic() - seen[0] >= delay
    return trigger


def mid_step(n: int):
    """While step n runs: step n-1's metrics row was written."""
    return lambda out, log: steps_done(out) >= n - 1


def checkpoint_dir(step: int | str):
    """As soon as a checkpoint folder appears (DeepSpeed is writing it; no COMPLETE yet)."""
    def trigger(out, log):
        s = total_steps(log) if step == "final" else step
        return s is not None and (out / "checkpoints" / f"step-{s:08d}").exists()
    return trigger


def marker(step: int):
    return lambda out, log: (out / "checkpoints" / f"step-{step:08d}" / "COMPLETE").exists()


def total_steps(log: str) -> int | None:
    m = re.search(r"; (\d+) steps \(", log)
    return int(m.group(1)) if m else None


KILLS: list[tuple[str, Callable[[], Callable]]] = [
    ("prepare (1.5 s in)", lambda: after_seconds(1.5)),
    ("op build, cold (3 s in)", lambda: log_then("building DeepSpeed's", 3.0)),
    ("start-up: ranks importing", lambda: log_then("[prepare] wrote", 4.0)),
    ("mid-step 3", lambda: mid_step(3)),
    ("checkpoint 6 write", lambda: checkpoint_dir(6)),
    ("mid-step 9", lambda: mid_step(9)),
    ("after COMPLETE 12 (prune)", lambda: marker(12)),
    ("final checkpoint write", lambda: checkpoint_dir("final")),
    ("export (model/ appears)", lambda: lambda out, log: (out / "model").exists()),
    ("evaluation", lambda: lambda out, log: phase(out) == "evaluating"),
]


# --- the measurement -----------------------------------------------------------------------------

def own_extensions(work: Path, cold: bool) -> Path:
    """A TORCH_EXTENSIONS_DIR of the benchmark's own, so kills never touch the shared cache; a copy
    of the cached build (warm) or empty (cold: the run builds DeepSpeed's op, about a minute)."""
    ext = work / ("ext-cold" if cold else "ext-warm")
    built = CACHE / "torch_extensions" / "deepspeed_shm_comm"
    if not cold and not ext.exists() and list(built.glob("*.so")):
        shutil.copytree(built, ext / built.name, ignore=shutil.ignore_patterns("lock"))
    ext.mkdir(parents=True, exist_ok=True)
    return ext


def env_for(work: Path, name: str, cold: bool = False) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "KUBETUNE_SCRATCH": str(work / "scratch" / name),
            "TORCH_EXTENSIONS_DIR": str(own_extensions(work, cold))}


def final(out: Path) -> tuple[int, float | None, list[int]]:
    rows = metrics(out)
    valid = [float(r["valid_loss"]) for r in rows if r.get("valid_loss")]
    return (int(rows[-1]["step"]) if rows else 0), (valid[-1] if valid else None), [int(r["step"]) for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", help="keep runs here (default: a temporary folder, removed)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run before it counts as hung")
    ap.add_argument("--only", nargs="*", help="kill points whose name contains one of these")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kubetune-kills-"))
    work.mkdir(parents=True, exist_ok=True)
    job_file = work / "job.json"
    job_file.write_text(json.dumps(job_doc()))

    ref_out = work / "ref"
    shutil.rmtree(ref_out, ignore_errors=True)
    ref = run_until(job_file, ref_out, env_for(work, "ref"), work / "ref.log", args.timeout)
    if ref.rc != 0:
        print(ref.log[-3000:])
        return 1
    ref_step, ref_loss, ref_steps = final(ref_out)
    print(f"uninterrupted: final step {ref_step}, final valid_loss {ref_loss:.6f}, {ref.seconds:.1f} s "
          f"(torchrun + prepare + train + export + evaluate)", flush=True)

    results, failures = [], 0
    for name, make_trigger in KILLS:
        if args.only and not any(o in name for o in args.only):
            continue
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        out = work / slug
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work / "scratch" / slug, ignore_errors=True)
        cold = "cold" in name
        if cold:
            shutil.rmtree(work / "ext-cold", ignore_errors=True)
        env = env_for(work, slug, cold)
        killed = run_until(job_file, out, env, work / f"{slug}.killed.log", args.timeout, make_trigger())
        at_step, (complete, torn) = steps_done(out), checkpoints(out)
        where = f"phase {phase(out) or '-'}"
        leftovers = [p.name for p in (Path(env["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm").glob("lock")]
        rerun = run_until(job_file, out, env, work / f"{slug}.rerun.log", args.timeout)
        m = re.search(r"resuming from the complete checkpoint at step (\d+)", rerun.log)
        resumed = int(m.group(1)) if m else 0
        step, loss, steps = final(out)
        problems = []
        if killed.rc is not None:
            problems.append(f"run ended (rc {killed.rc}) before the kill point")
        if rerun.hung:
            problems.append(f"rerun hung (> {args.timeout:.0f} s)")
        elif rerun.rc != 0:
            problems.append(f"rerun failed rc {rerun.rc}: {rerun.log.strip().splitlines()[-1][:200] if rerun.log.strip() else ''}")
        if resumed and resumed not in complete:
            problems.append(f"resumed from step {resumed}, not a complete checkpoint at kill time {complete}")
        if step != ref_step or steps != ref_steps:
            problems.append(f"steps {steps[:3]}..{steps[-3:]} != reference 1..{ref_step}")
        if loss is None or ref_loss is None or abs(loss - ref_loss) > REL * abs(ref_loss):
            problems.append(f"final valid_loss {loss} != {ref_loss}")
        for art in ("model/model.safetensors", "eval_report.json", "loss_curve.png"):
            if not (out / art).exists():
                problems.append(f"missing {art}")
        failures += bool(problems)
        results.append({"kill": name, "where": where, "at_step": at_step, "complete": complete, "torn": torn,
                        "lock": bool(leftovers), "resumed": resumed, "redone": max(0, at_step - resumed),
                        "killed_s": killed.seconds, "rerun_s": rerun.seconds, "step": step, "loss": loss,
                        "ok": not problems, "problems": problems})
        r = results[-1]
        print(f"  {name}: killed at {killed.seconds:.1f} s, step {at_step}; rerun {rerun.seconds:.1f} s "
              f"-> {'ok' if r['ok'] else 'FAIL ' + '; '.join(problems)}", flush=True)

    print(f"\nreference: final step {ref_step}, final valid_loss {ref_loss:.6f}, uninterrupted run {ref.seconds:.1f} s\n")
    head = ["kill point", "killed at", "steps done", "ckpts (complete / torn)", "resumed", "redone", "rerun s",
            "final step", "final valid_loss", "ok"]
    table = [[r["kill"], f"{r['killed_s']:.1f} s", str(r["at_step"]),
              f"{r['complete'] or '-'} / {r['torn'] or '-'}" + (" +lock" if r["lock"] else ""), str(r["resumed"]),
              str(r["redone"]), f"{r['rerun_s']:.1f}", str(r["step"]),
              f"{r['loss']:.6f}" if r["loss"] is not None else "-", "yes" if r["ok"] else "NO"] for r in results]
    widths = [max(len(x) for x in col) for col in zip(head, *table)]
    for row in [head, ["-" * w for w in widths], *table]:
        print("| " + " | ".join(x.ljust(w) for x, w in zip(row, widths)) + " |")
    for r in results:
        for p in r["problems"]:
            print(f"FAIL {r['kill']}: {p}")
    (work / "results.json").write_text(json.dumps(results, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
