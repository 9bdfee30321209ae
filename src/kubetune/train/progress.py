"""Progress for whoever watches: one small record (``kubetune.status.Progress``), two sinks.

Rank 0 calls ``Reporter.update`` freely; records go out at most every ``interval`` seconds (and
always when forced). In a cluster (``KUBETUNE_JOB_NAME`` set and a service-account token mounted)
the record is merge-patched into ``status.progress`` of the job's own FineTuneJob (``StatusSink``).
Locally it prints a progress line and keeps ``progress.json`` in the output location. A failed
report is logged once and never stops training. Other status fields (``status.checkpoints``) go
through the same sinks with ``Reporter.patch`` (locally: ``checkpoints.json``).
"""

from __future__ import annotations

import json
import os
import sys
import time

from kubetune.spec import Storage
from kubetune.status import Progress, Status, StatusSink
from kubetune.storage import StorageError, join, store_for


class LocalSink:
    """A progress line on stderr and ``progress.json`` in the output location."""

    def __init__(self, output: str, storage: Storage):
        self.output, self.uri = output, join(output, "progress.json")
        self.store = store_for(output, storage)

    def send(self, p: Progress) -> None:
        width = 24
        done = int(width * p.percent / 100)
        parts = [f"[{'#' * done}{'.' * (width - done)}] {p.percent:5.1f}%", f"step {p.step}/{p.total_steps}",
                 f"epoch {p.epoch}"]
        for key in ("train_loss", "valid_loss", "valid_mean_token_accuracy", "valid_pref_accuracy", "reward_mean",
                    "valid_reward"):
            if p.metrics.get(key) is not None:
                parts.append(f"{key} {p.metrics[key]:.4f}")
        if p.tokens_per_second:
            parts.append(f"{p.tokens_per_second:.0f} tok/s")
        if p.eta_seconds is not None:
            parts.append(f"ETA {_duration(p.eta_seconds)}")
        print(f"[{p.phase}] " + "  ".join(parts), file=sys.stderr, flush=True)
        self.store.write_bytes(self.uri, json.dumps(p.patch(), indent=2).encode())

    def patch(self, status: Status) -> None:
        """Status fields other than progress: ``checkpoints.json`` for status.checkpoints."""
        if status.checkpoints is not None:
            body = [c.patch() for c in status.checkpoints]
            self.store.write_bytes(join(self.output, "checkpoints.json"), json.dumps(body, indent=2).encode())

    def last(self) -> dict | None:
        """The record written last (``progress.json``), or None when there is none to read."""
        try:
            return json.loads(self.store.read_bytes(self.uri))
        except (StorageError, ValueError):  # progress is never worth failing a job over
            return None


class Reporter:
    def __init__(self, sinks: list, interval: float = 5.0):
        self.sinks, self.interval = sinks, interval
        self.last = 0.0
        self.failed: set[str] = set()

    def update(self, record: dict, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        progress = Progress(**{**record, "attempt": attempt(), "updatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self._each(lambda sink: sink.send(progress))

    def patch(self, status: Status) -> None:
        """Other status fields (a merge patch: a list replaces the old one), at once through every sink."""
        self._each(lambda sink: sink.patch(status))

    def _each(self, call) -> None:
        for sink in self.sinks:
            try:
                call(sink)
            except Exception as e:  # reporting must never stop training
                name = type(sink).__name__
                if name not in self.failed:
                    self.failed.add(name)
                    print(f"warning: status report to {name} failed ({type(e).__name__}); the job goes on",
                          file=sys.stderr)


def attempt() -> int:
    """The training attempt this process belongs to (the operator sets it in training pods; 0 locally)."""
    return int(os.environ.get("KUBETUNE_ATTEMPT") or 0)


def report_start(output: str, storage: Storage) -> None:
    """Rank 0, first thing: "starting", with the numbers of the record before it. The stall watchdog
    measures this attempt from here until its first step."""
    last = LocalSink(output, storage).last() or {}
    record = {"step": 0, "totalSteps": 0, "epoch": 0, "percent": 0, "tokensPerSecond": 0, **last,
              "phase": "starting", "etaSeconds": None}
    record.pop("updatedAt", None)
    reporter_for(output, storage).update(record, force=True)


def reporter_for(output: str, storage: Storage, interval: float = 5.0) -> Reporter:
    sinks: list = [LocalSink(output, storage)]
    kube = StatusSink.from_environment()
    if kube is not None:
        sinks.append(kube)
    return Reporter(sinks, interval)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
