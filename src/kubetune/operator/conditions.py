"""Phases and Kubernetes-style conditions of a FineTuneJob (pure functions).

``kubectl wait --for=condition=Succeeded`` (or Failed) reads ``status.conditions``; every phase
sets all four condition types so their state is never stale.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import StrEnum


class Phase(StrEnum):
    PENDING = "Pending"
    PREPARING = "Preparing"
    TRAINING = "Training"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


FINISHED = {Phase.SUCCEEDED, Phase.FAILED}


class JobState(StrEnum):
    """Where a child Job (prepare, or a training gang) stands."""

    MISSING = "Missing"
    ACTIVE = "Active"
    SUSPENDED = "Suspended"  # created suspended, waiting for Kueue to admit it
    COMPLETE = "Complete"
    FAILED = "Failed"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def conditions_for(phase: Phase, reason: str, message: str, previous: list[dict] | None, at: str,
                   evaluation: dict | None = None) -> list[dict]:
    """The four conditions for a phase, and EvaluationPassed once the evaluation gate has a verdict;
    lastTransitionTime moves only when a status flips."""
    wanted = {
        "Ready": (phase not in (Phase.PENDING, Phase.FAILED), reason, message),
        "Running": (phase in (Phase.PREPARING, Phase.TRAINING), reason, message),
        "Succeeded": (phase == Phase.SUCCEEDED, reason, message),
        "Failed": (phase == Phase.FAILED, reason, message),
    }
    if evaluation:
        passed = bool(evaluation.get("passed"))
        wanted["EvaluationPassed"] = (passed, "GatePassed" if passed else "GateFailed", evaluation.get("message", ""))
    old = {c["type"]: c for c in previous or []}
    out = []
    for kind, (true, why, text) in wanted.items():
        status = "True" if true else "False"
        since = old[kind]["lastTransitionTime"] if kind in old and old[kind]["status"] == status else at
        out.append({"type": kind, "status": status, "reason": why, "message": text, "lastTransitionTime": since})
    return out
