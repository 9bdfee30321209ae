"""What Kueue says about a child Job it holds, in kubetune's status words. Pure functions of its Workload.

Kueue (https://kueue.sigs.k8s.io) admits a suspended Job by unsuspending it, and preempts an admitted one
by suspending it again: the Job's pods get SIGTERM (the trainer saves a checkpoint) and the same Job is
admitted again later, resuming from it; no attempt is used up. The Workload, one per Job (a training
gang's pods all in one: admitted all or nothing), says why it waits (its QuotaReserved condition: which
quota is short) and why it was stopped (Evicted: Preempted, PodsReadyTimeout, ...).
"""

from __future__ import annotations

import re

GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
QUEUE_LABEL = f"{GROUP}/queue-name"
PRIORITY_LABEL = f"{GROUP}/priority-class"
JOB_UID_LABEL = f"{GROUP}/job-uid"  # on the Workload: the Job it stands for
NO_WORKLOAD = "no Workload for it yet: is Kueue running, and is there a LocalQueue of that name in the namespace?"


def condition(workload: dict | None, kind: str) -> dict | None:
    """The Workload's condition of type ``kind`` when it is True."""
    conditions = ((workload or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == kind and c.get("status") == "True"), None)


def _pending(workload: dict) -> str:
    """Why the Workload has no quota yet: Kueue's own words (which quota is short, by how much)."""
    for c in (workload.get("status") or {}).get("conditions") or []:
        if c.get("type") == "QuotaReserved" and c.get("status") == "False" and c.get("message"):
            return c["message"]
    return "not admitted yet"


def waiting(workload: dict | None, queue: str, pods_left: int, progress: dict | None) -> tuple[str, str]:
    """(reason, message) for a suspended child Job in LocalQueue ``queue``: Queued, or Preempted (Preempting
    while its ``pods_left`` pods still write their checkpoint)."""
    if workload is None:
        return "Queued", f"waiting in Kueue's LocalQueue {queue}: {NO_WORKLOAD}"
    evicted = condition(workload, "Evicted")
    if not evicted:
        return "Queued", f"waiting in Kueue's LocalQueue {queue}: {_pending(workload)}"
    why = f"preempted by Kueue ({evicted.get('reason', 'Evicted')}: {evicted.get('message', '')})"
    if pods_left:
        return "Preempting", f"{why}; {pods_left} pod(s) saving a checkpoint"
    return "Preempted", (f"{why}, {steps_kept(progress)} steps kept; waiting in LocalQueue {queue} to be admitted "
                         f"again: {_pending(workload)}")


def steps_kept(progress: dict | None) -> int:
    """The step of the latest complete checkpoint (…/step-00000040): what a resumed gang starts from."""
    found = re.search(r"step-(\d+)/?$", (progress or {}).get("checkpoint") or "")
    return int(found.group(1)) if found else 0


def admitted_at(workload: dict | None) -> str | None:
    """When Kueue (last) admitted the Workload."""
    admitted = condition(workload, "Admitted")
    return admitted.get("lastTransitionTime") if admitted else None
