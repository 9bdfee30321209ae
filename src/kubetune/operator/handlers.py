"""Kopf handlers: thin triggers around ``reconcile``.

A FineTuneJob is reconciled when it changes, when the operator starts, when one of its Jobs
finishes (or is admitted by Kueue), and when the job its ``model.fromJob`` names finishes. All
triggers run the same idempotent ``sync``; a per-job lock keeps two of them from racing inside one
operator, and peering keeps a second replica idle. A sync that fails (say, the API server is briefly
away) is retried with backoff. There is no per-job timer: with 1 000 jobs, Kopf's per-object timers
alone took the operator past 250 MB; the stall watchdog's rechecks share one thread (``rechecks``).

At thousands of new jobs at once (benchmarks/bench_operator.py), what the API server and the operator
spend per job counts: a new job is reconciled from the body its event brought, the echo of the
operator's own Preparing write needs no handler, and Kopf holds only a few workers' worth of objects.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections import defaultdict

import kopf

from kubetune.operator import metrics
from kubetune.operator.children import JOB_LABEL, KUEUE_QUEUE_LABEL, MANAGED_BY
from kubetune.operator.conditions import FINISHED, JobState, Phase
from kubetune.operator.kube import Kube
from kubetune.operator.rechecks import Rechecks
from kubetune.operator.reconcile import job_state, needs_work, reconcile, seconds_to_stall, status_patch
from kubetune.operator.settings import Settings
from kubetune.spec import API_GROUP, API_VERSION

FTJ = (API_GROUP, API_VERSION, "finetunejobs")
KUEUE_WAITING = ("Queued", "Preempting", "Preempted")
KUEUE_RECHECK_SECONDS = 15  # how stale a waiting job's Kueue message may get (one Workload list per job)
_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
_seen_errors: set[str] = set()
_written: dict[str, str] = {}  # job → the resourceVersion of this operator's last status write
HANDLER_THREADS = 32  # Kube.POOL_SIZE keeps a connection for each, and for the threads beside them


class NoDiffBase(kopf.DiffBaseStorage):
    """Kopf's record of "the last handled state" of an object, for on.create/update/resume handlers to
    tell what changed: this operator has none (only event handlers, which see each change as it is), yet
    Kopf built that record, a deep copy of the body, for every event of every object. Nothing is built
    or stored here. An on.create/update/resume handler, a daemon or a timer would need Kopf's default back."""

    def build(self, *, body, extra_fields=None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body) -> None:
        return None

    def store(self, *, body, patch, essence) -> None:
        pass


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    config: Settings = memo.get("settings") or Settings.from_env()
    memo.settings = config
    memo.api = Kube()
    # Scheduled only by syncs, which peering lets run on the active operator alone.
    memo.rechecks = Rechecks(lambda namespace, name: sync_or_retry(memo, namespace, name, logging.getLogger(__name__)))
    settings.posting.level = logging.INFO  # kopf.info() calls become Events
    # Handler threads: each mostly waits for the API server, so more than the 16 there were keep it busy
    # when jobs come in thousands (48 measured no faster than 32, and took 30-40 MiB more at 5 000 jobs).
    settings.execution.max_workers = HANDLER_THREADS
    settings.persistence.diffbase_storage = NoDiffBase()
    # Kopf starts a worker per object with events, holding them in its memory while its handler waits
    # for a thread; a few more workers than threads keep those busy, the other objects' events wait
    # in order as they came. A worker idles 5 s after its last event by default, and a limited one
    # then holds a place that another object waits for: half a second is enough to catch the event
    # that the operator's own status write sends soon after.
    settings.queueing.worker_limit = 2 * HANDLER_THREADS
    settings.queueing.idle_timeout = 0.5
    settings.watching.server_timeout = 300
    settings.scanning.disabled = True  # the resources are known; no need to watch (and be allowed to list) CRDs
    if config.peering:
        settings.peering.name = config.peering
        settings.peering.mandatory = True
        settings.peering.clusterwide = not config.namespaces
    else:
        settings.peering.standalone = True
    if config.metrics_port:
        metrics.serve(config.metrics_port)


def _current(key: str, seen: dict | None) -> bool:
    """Whether ``seen`` (a body from the watch) is the job as it is now, as far as this operator can know, so
    that reading it again would tell nothing new: the echo of this operator's own last status write (same
    resourceVersion), or a job never reconciled (no status, and no write of ours), as just created. Only for
    the phases right after creation, which thousands of new jobs go through at once; for later ones (a
    training job's stall clock reads progress the pods write) the job is read again, as always."""
    if seen is None:
        return False
    status = seen.get("status") or {}
    if status.get("phase") not in (None, Phase.PENDING, Phase.PREPARING):
        return False
    written = _written.get(key)
    if written is None:
        return not status
    return written == (seen.get("metadata") or {}).get("resourceVersion")


def sync(memo: kopf.Memo, namespace: str, name: str, logger, seen: dict | None = None) -> bool:
    """Reconcile one job; True when this call moved it to Succeeded or Failed. ``seen``: the body an event
    brought, used instead of reading the job again when it is known to be current (``_current``)."""
    key = f"{namespace}/{name}"
    with _locks[key], metrics.HANDLER_SECONDS.time():
        body = seen if _current(key, seen) else memo.api.get_ftj(namespace, name)
        if body is None:
            metrics.forget(namespace, name)
            return False
        try:
            outcome = reconcile(memo.api, memo.settings, body, adopt=lambda obj: kopf.adopt(obj, owner=body))
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise
        if outcome is None:
            metrics.observe(namespace, name, (body.get("status") or {}).get("phase", "Pending"))
            return False
        previous = body.get("status") or {}
        patch = status_patch(previous, outcome, body["metadata"].get("generation"))
        changed = {k: v for k, v in patch.items() if previous.get(k) != v}
        if changed.keys() - {"conditions"}:  # observedGeneration too: it tells a served job's edit was applied
            _written[key] = memo.api.patch_ftj_status(namespace, name, changed)
        metrics.observe(namespace, name, outcome.phase)
        stall_in = seconds_to_stall(body) if outcome.phase == Phase.TRAINING else None
        if outcome.reason in KUEUE_WAITING:  # Kueue updates its Workload, not the Job: read its words again later
            memo.rechecks.after(namespace, name, KUEUE_RECHECK_SECONDS)
        elif stall_in is not None:
            memo.rechecks.after(namespace, name, stall_in + 1)
        if previous.get("phase") != outcome.phase or previous.get("reason") != outcome.reason:
            event = kopf.warn if outcome.phase == Phase.FAILED else kopf.info
            event(body, reason=outcome.reason, message=outcome.message)
            logger.info(f"{namespace}/{name}: {outcome.phase} ({outcome.reason}) {outcome.message}")
        return previous.get("phase") not in FINISHED and outcome.phase in FINISHED


def _job_needs_work(type: str, body, namespace: str, name: str, **_) -> bool:
    return type == "DELETED" or (needs_work(body) and not _echo_while_preparing(f"{namespace}/{name}", body))


def _echo_while_preparing(key: str, seen) -> bool:
    """Whether ``seen`` is this operator's own write of a Preparing status coming back, with nothing else
    changed since (same resourceVersion): the job waits for its prepare Job then, and every change of that
    Job that matters (it finished, failed, or Kueue decided about it) is an event of its own, which
    reconciles the job. Reconciling the echo too read the Job to change nothing: with thousands of new
    jobs, one request and one handler call each."""
    return ((seen.get("status") or {}).get("phase") == Phase.PREPARING
            and _written.get(key) == (seen.get("metadata") or {}).get("resourceVersion"))


def _child_matters(body, **_) -> bool:
    labels = body.get("metadata", {}).get("labels") or {}
    # A running Job changes nothing for its FineTuneJob, unless Kueue is deciding about it.
    return bool(labels.get(JOB_LABEL)) and (job_state(body) not in (JobState.ACTIVE, JobState.MISSING)
                                            or KUEUE_QUEUE_LABEL in labels)


# Event handlers, not create/update handlers: they see every change (and, at start, every existing
# job, which covers an operator restart) without Kopf writing its own bookkeeping into each object.
# The filters (``when``) run in Kopf's event loop: an event that needs nothing (a finished job, a
# running child Job) never waits for a handler thread, behind thousands of new jobs.
@kopf.on.event(*FTJ, when=_job_needs_work)
def on_job(memo: kopf.Memo, type: str, body, namespace: str, name: str, logger, **_) -> None:
    if type == "DELETED":  # its children go with it (owner references); forget what is kept per job
        _locks.pop(f"{namespace}/{name}", None)
        _written.pop(f"{namespace}/{name}", None)
        metrics.forget(namespace, name)
        memo.rechecks.forget(namespace, name)
    else:
        sync_or_retry(memo, namespace, name, logger, seen=dict(body))


@kopf.on.event("batch", "v1", "jobs", labels={"app.kubernetes.io/managed-by": MANAGED_BY["app.kubernetes.io/managed-by"]},
               when=_child_matters)
def on_child_job(memo: kopf.Memo, body, namespace: str, logger, **_) -> None:
    sync_or_retry(memo, namespace, body["metadata"]["labels"][JOB_LABEL], logger)


def sync_or_retry(memo: kopf.Memo, namespace: str, name: str, logger, delay: float = 5.0, seen: dict | None = None) -> None:
    # Kopf does not retry event handlers; a failed sync would otherwise wait for the next change.
    try:
        finished = sync(memo, namespace, name, logger, seen)
    except Exception as e:  # a retry reads the job again
        _retry_later(f"reconcile of {namespace}/{name}", e, logger, delay, sync_or_retry, memo, namespace, name, logger)
        return
    if finished:
        wake_waiting_jobs(memo, namespace, name, logger)


def wake_waiting_jobs(memo: kopf.Memo, namespace: str, base: str, logger, delay: float = 5.0) -> None:
    """Reconcile the jobs whose model.fromJob is ``base``, which just finished: nothing else changes
    for them, so without this they would wait until they are edited or the operator restarts. (After a
    crash in between, the restart reconciles every unfinished job anyway.)"""
    try:
        waiting = [body["metadata"]["name"] for body in memo.api.list_ftjs(namespace)
                   if ((body.get("spec") or {}).get("model") or {}).get("fromJob") == base and needs_work(body)]
    except Exception as e:
        _retry_later(f"listing the jobs waiting for {namespace}/{base}", e, logger, delay,
                     wake_waiting_jobs, memo, namespace, base, logger)
        return
    for name in waiting:
        sync_or_retry(memo, namespace, name, logger)


def _retry_later(what: str, error: Exception, logger, delay: float, func, *args) -> None:
    """Call ``func`` again after ``delay`` (doubling up to 5 min). The traceback is logged once per
    distinct error; a repeat (the API server away for minutes) is one line each time."""
    key = f"{type(error).__name__}: {error}"
    if key in _seen_errors:
        logger.warning(f"{what} failed again ({key}); retrying in {delay:.0f} s")
    else:
        if len(_seen_errors) >= 1000:  # messages may name objects: keep the set from growing for good
            _seen_errors.clear()
        _seen_errors.add(key)
        logger.exception(f"{what} failed; retrying in {delay:.0f} s", exc_info=error)
    # in this handler's context: Kopf keeps its settings (needed to post Events) in context variables
    retry = threading.Timer(delay, contextvars.copy_context().run, (func, *args, min(delay * 2, 300.0)))
    retry.daemon = True
    retry.start()
