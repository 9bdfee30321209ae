"""Prometheus metrics on an HTTP port: jobs by phase, reconcile errors, handler latency, schedules' runs and results."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

JOBS = Gauge("kubetune_finetunejobs", "FineTuneJobs by phase", ["phase"])
RECONCILE_ERRORS = Counter("kubetune_reconcile_errors_total", "Reconciles that raised")
HANDLER_SECONDS = Histogram("kubetune_reconcile_seconds", "Time to reconcile one FineTuneJob")
SCHEDULE_RUNS = Counter("kubetune_schedule_runs_total", "Runs started by FineTuneSchedules", ["trigger"])
SCHEDULE_RESULTS = Counter("kubetune_schedule_run_results_total", "Finished runs of FineTuneSchedules by result "
                           "(Promoted: a new revision; GateFailed, Failed, Superseded, Replaced: not promoted)", ["result"])
SCHEDULE_ROLLOUTS = Counter("kubetune_schedule_rollouts_total", "Endpoint switches to another revision "
                            "(Serving: a promotion or unpinning; RolledBack: to an earlier one)", ["reason"])
_phase_of: dict[str, str] = {}


def observe(namespace: str, name: str, phase: str) -> None:
    key = f"{namespace}/{name}"
    old = _phase_of.get(key)
    if old == phase:
        return
    if old:
        JOBS.labels(old).dec()
    JOBS.labels(phase).inc()
    _phase_of[key] = phase


def forget(namespace: str, name: str) -> None:
    old = _phase_of.pop(f"{namespace}/{name}", None)
    if old:
        JOBS.labels(old).dec()


def serve(port: int) -> None:
    start_http_server(port)
