"""Kopf handlers: thin triggers around ``reconcile``.

A FineTuneJob is reconciled when it is created, when its spec changes, when the operator starts
(resume), when one of its Jobs changes, and on a slow safety-net timer. All triggers run the same
idempotent ``sync``; a per-job lock keeps two of them from racing inside one operator, and peering
keeps a second operator replica idle.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict

import kopf

from kubetune.operator import metrics
from kubetune.operator.children import JOB_LABEL, MANAGED_BY
from kubetune.operator.conditions import FINISHED
from kubetune.operator.kube import Kube
from kubetune.operator.reconcile import reconcile, status_patch
from kubetune.operator.settings import Settings
from kubetune.spec import API_GROUP, API_VERSION

FTJ = (API_GROUP, API_VERSION, "finetunejobs")
_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
_RESYNC_SECONDS = Settings.from_env().resync_seconds  # decorators need it at import


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    config: Settings = memo.get("settings") or Settings.from_env()
    memo.settings = config
    memo.api = Kube()
    settings.posting.level = logging.INFO  # kopf.info() calls become Events
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
    settings.scanning.disabled = True  # the resources are known; no need to watch (and be allowed to list) CRDs
    settings.persistence.finalizer = f"{API_GROUP}/operator"
    if config.peering:
        settings.peering.name = config.peering
        settings.peering.mandatory = True
        settings.peering.clusterwide = not config.namespaces
    else:
        settings.peering.standalone = True
    if config.metrics_port:
        metrics.serve(config.metrics_port)


def sync(memo: kopf.Memo, namespace: str, name: str, logger) -> None:
    with _locks[f"{namespace}/{name}"], metrics.HANDLER_SECONDS.time():
        body = memo.api.get_ftj(namespace, name)
        if body is None:
            metrics.forget(namespace, name)
            return
        try:
            outcome = reconcile(memo.api, memo.settings, body, adopt=lambda obj: kopf.adopt(obj, owner=body))
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise
        if outcome is None:
            metrics.observe(namespace, name, body["status"]["phase"])
            return
        previous = body.get("status") or {}
        patch = status_patch(previous, outcome, body["metadata"].get("generation"))
        changed = {k: v for k, v in patch.items() if previous.get(k) != v}
        if changed.keys() - {"conditions", "observedGeneration"}:
            memo.api.patch_ftj_status(namespace, name, changed)
        metrics.observe(namespace, name, outcome.phase.value)
        if previous.get("phase") != outcome.phase.value or previous.get("reason") != outcome.reason:
            event = kopf.warn if outcome.phase.value == "Failed" else kopf.info
            event(body, reason=outcome.reason, message=outcome.message)
            logger.info(f"{namespace}/{name}: {outcome.phase.value} ({outcome.reason}) {outcome.message}")


@kopf.on.create(*FTJ)
@kopf.on.resume(*FTJ)
@kopf.on.update(*FTJ, field="spec")
def on_job(memo: kopf.Memo, namespace: str, name: str, logger, **_) -> None:
    sync(memo, namespace, name, logger)


@kopf.on.event("batch", "v1", "jobs", labels={"app.kubernetes.io/managed-by": MANAGED_BY["app.kubernetes.io/managed-by"]})
def on_child_job(memo: kopf.Memo, body, namespace: str, logger, **_) -> None:
    owner = (body.get("metadata", {}).get("labels") or {}).get(JOB_LABEL)
    if owner:
        sync(memo, namespace, owner, logger)


@kopf.timer(*FTJ, interval=_RESYNC_SECONDS, initial_delay=_RESYNC_SECONDS)
def resync(memo: kopf.Memo, status, namespace: str, name: str, logger, **_) -> None:
    if (status or {}).get("phase") not in FINISHED:
        sync(memo, namespace, name, logger)

