"""``kubetune retrain`` and ``kubetune rollback``: requests to a FineTuneSchedule, made with kubectl (its
kubeconfig, context and credentials, as the user's other kubectl commands). The operator acts on them."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone

from kubetune.errors import KubetuneError
from kubetune.schedule_spec import RETRAIN_ANNOTATION


def _kubectl(*args: str, namespace: str | None) -> str:
    command = ["kubectl", *args] + (["--namespace", namespace] if namespace else [])
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise KubetuneError("kubectl is not on PATH: kubetune retrain and rollback use it (and its kubeconfig)") from None
    if run.returncode:
        raise KubetuneError((run.stderr.strip().splitlines() or [f"kubectl exited with {run.returncode}"])[-1])
    return run.stdout


def retrain(name: str, namespace: str | None) -> str:
    """Ask for a run now: a new value of the annotation (to the microsecond, so two requests are two values)."""
    value = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    _kubectl("annotate", "--overwrite", f"finetuneschedule/{name}", f"{RETRAIN_ANNOTATION}={value}", namespace=namespace)
    return f"retrain of {name} requested ({RETRAIN_ANNOTATION}={value}); `kubectl get fts {name}` shows its run"


def rollback_target(name: str, status: dict, to: int | None) -> int:
    """The revision to serve: ``to``, else the one before the served one."""
    have = sorted(r["revision"] for r in status.get("revisions") or [])
    if not have:
        raise KubetuneError(f"{name} has no revisions yet: nothing to roll back to")
    if to is not None:
        if to not in have:
            raise KubetuneError(f"revision {to} is not among {name}'s revisions ({', '.join(map(str, have))})")
        return to
    served = status.get("servedRevision") or have[-1]
    earlier = [r for r in have if r < served]
    if not earlier:
        raise KubetuneError(f"{name} serves revision {served}, its first: there is no earlier one to roll back to")
    return earlier[-1]


def rollback(name: str, namespace: str | None, to: int | None, unpin: bool) -> str:
    """Set (or with ``unpin`` remove) spec.pinnedRevision; the endpoint rolls over to it."""
    if unpin:
        patch, done = {"spec": {"pinnedRevision": None}}, f"{name} unpinned: it serves its latest revision"
    else:
        body = json.loads(_kubectl("get", f"finetuneschedule/{name}", "--output=json", namespace=namespace))
        target = rollback_target(name, body.get("status") or {}, to)
        patch, done = {"spec": {"pinnedRevision": target}}, (
            f"{name} pinned to revision {target} (spec.pinnedRevision); `kubetune rollback {name} --unpin` "
            "goes back to the latest")
    _kubectl("patch", f"finetuneschedule/{name}", "--type=merge", f"--patch={json.dumps(patch)}", namespace=namespace)
    return done
