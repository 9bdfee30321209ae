"""Kopf handlers of FineTuneSchedules: thin triggers around ``schedule_reconcile.plan``.

A schedule is reconciled when it changes (a retrain request is an annotation, a rollback a spec edit), when
one of its runs finishes or is deleted, and at its next cron tick: one recheck thread (``rechecks``) wakes
every schedule, as it does the stall watchdog's jobs, instead of a Kopf timer per object; it also wakes a
schedule with trigger.newData when its prefix is due to be polled. What ``plan`` decides is done here in an
order that a crash at any point leaves repeatable: new runs' data manifests, the endpoint and new runs first,
then deletions, the status, the runs' result labels, and the Events last.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict
from datetime import datetime, timezone

import kopf

from kubetune.operator import metrics
from kubetune.operator.children import names
from kubetune.operator.handlers import _retry_later
from kubetune.operator.rechecks import Rechecks
from kubetune.operator.schedule_children import RESULT_LABEL, SCHEDULE_LABEL
from kubetune.operator.schedule_newdata import poll_for, seconds_to_poll
from kubetune.operator.schedule_reconcile import finished, plan
from kubetune.storage import store_for
from kubetune.schedule_spec import SCHEDULE_PLURAL
from kubetune.spec import API_GROUP, API_VERSION, PLURAL, Storage

FTS = (API_GROUP, API_VERSION, SCHEDULE_PLURAL)
FTJ = (API_GROUP, API_VERSION, PLURAL)
_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
log = logging.getLogger(__name__)


@kopf.on.startup()
def configure_schedules(memo: kopf.Memo, **_) -> None:
    # one thread for every schedule's next tick (memo.api and memo.settings come from handlers.configure)
    memo.schedule_rechecks = Rechecks(lambda namespace, name: sync_schedule_or_retry(memo, namespace, name, log))


def sync_schedule(memo: kopf.Memo, namespace: str, name: str, logger) -> None:
    with _locks[f"{namespace}/{name}"]:
        body = memo.api.get_fts(namespace, name)
        if body is None:
            return
        runs = memo.api.list_ftjs(namespace, f"{SCHEDULE_LABEL}={name}")
        now = datetime.now(timezone.utc)
        todo = plan(body, runs, now, memo.settings)
        poll_in = seconds_to_poll(body, now)
        if todo.status.get("reason") != "InvalidSpec" and (todo.needs_data or poll_in is not None and poll_in <= 0):
            todo = plan(body, runs, now, memo.settings, poll_for(body, runs, now))
        for uri, manifest in todo.manifests:  # before the run that names it
            store_for(uri, spec_storage(body)).write_bytes(uri, json.dumps(manifest).encode())
        for obj in todo.apply:  # new runs and the endpoint, owned by the schedule: deleting it deletes them
            kopf.adopt(obj, owner=body)
            memo.api.apply(obj)
        if todo.unserve:
            memo.api.delete_deployment(namespace, names(name)["serve"])
            memo.api.delete_service(namespace, names(name)["serve"])
        for run in todo.delete_runs:
            memo.api.delete_ftj(namespace, run)
        previous = body.get("status") or {}
        changed = {k: todo.status.get(k) for k in previous.keys() | todo.status.keys() if previous.get(k) != todo.status.get(k)}
        if changed:
            memo.api.patch_fts_status(namespace, name, changed)
        for run, result in todo.results.items():
            memo.api.label_ftj(namespace, run, {RESULT_LABEL: result})
        for kind, reason, message in todo.events:
            kopf.event(body, type=kind, reason=reason, message=message)
            logger.info(f"{namespace}/{name}: {reason}: {message}")
        _count(todo)
        if todo.wake_in is not None:
            memo.schedule_rechecks.after(namespace, name, todo.wake_in + 1)


def spec_storage(body: dict) -> Storage:
    return Storage.model_validate(body["spec"]["jobTemplate"].get("storage") or {})


def _count(todo) -> None:
    for _, trigger in todo.started:
        metrics.SCHEDULE_RUNS.labels(trigger).inc()
    for result in todo.results.values():
        metrics.SCHEDULE_RESULTS.labels(result).inc()
    for _, reason, _ in todo.events:
        if reason == "Replaced":
            metrics.SCHEDULE_RESULTS.labels("Replaced").inc()
        if reason in ("Serving", "RolledBack"):
            metrics.SCHEDULE_ROLLOUTS.labels(reason).inc()


def sync_schedule_or_retry(memo: kopf.Memo, namespace: str, name: str, logger, delay: float = 5.0) -> None:
    try:
        sync_schedule(memo, namespace, name, logger)
    except Exception as e:  # a retry reads the schedule again
        metrics.RECONCILE_ERRORS.inc()
        _retry_later(f"reconcile of schedule {namespace}/{name}", e, logger, delay, sync_schedule_or_retry,
                     memo, namespace, name, logger)


@kopf.on.event(*FTS)
def on_schedule(memo: kopf.Memo, type: str, namespace: str, name: str, logger, **_) -> None:
    if type == "DELETED":  # its runs and endpoint go with it (owner references)
        _locks.pop(f"{namespace}/{name}", None)
        memo.schedule_rechecks.forget(namespace, name)
    else:
        sync_schedule_or_retry(memo, namespace, name, logger)


def _run_matters(type: str, body, **_) -> bool:
    # A finished run not judged yet (or one deleted): the schedule may promote it, or start a waiting request.
    return type == "DELETED" or (finished(body) and RESULT_LABEL not in (body["metadata"].get("labels") or {}))


@kopf.on.event(*FTJ, labels={SCHEDULE_LABEL: kopf.PRESENT}, when=_run_matters)
def on_run(memo: kopf.Memo, body, namespace: str, logger, **_) -> None:
    sync_schedule_or_retry(memo, namespace, body["metadata"]["labels"][SCHEDULE_LABEL], logger)
