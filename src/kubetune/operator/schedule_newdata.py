"""trigger.newData of a FineTuneSchedule, the operator's side: when to poll, the watermark, the poll itself.

Pure functions over the schedule's body and runs, but ``poll_for``, which lists the prefix (``kubetune.newdata``).
The last poll time is in status.newData, so an operator restart, or a schedule woken by any event, lists the
prefix at most once per pollSeconds; the watermark (the latest consumed manifest) is in the status and on
the run that consumed it, whichever is newer, so a crash between creating the run and writing the status
does not consume the same data twice.
"""

from __future__ import annotations

from datetime import datetime, timezone

from kubetune import newdata
from kubetune.operator import schedule_children as sc
from kubetune.spec import Storage

DEFAULT_POLL_SECONDS = 300


def _stamp_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def _trigger(body: dict) -> dict | None:
    return ((body.get("spec") or {}).get("trigger") or {}).get("newData")


def seconds_to_poll(body: dict, now: datetime) -> float | None:
    """Seconds until the prefix is due to be listed again (0 or less: now); None without trigger.newData."""
    spec = _trigger(body)
    if not spec:
        return None
    last = ((body.get("status") or {}).get("newData") or {}).get("lastPollAt")
    if not last:
        return 0.0
    return spec.get("pollSeconds", DEFAULT_POLL_SECONDS) - (now - _stamp_time(last)).total_seconds()


def watermark(status: dict, runs: list[dict]) -> dict:
    """The latest consumed data manifest ({watermark, consumedRun}), from the status or a run newer than it."""
    marks = [(sc.number_of(status["consumedRun"]), status["consumedRun"], status["watermark"])] \
        if status.get("consumedRun") and status.get("watermark") else []
    marks += [(sc.run_number(r), r["metadata"]["name"], a) for r in runs
              if (a := ((r["metadata"].get("annotations") or {}).get(sc.DATA_ANNOTATION)))]
    if not marks:
        return {}
    _, run, uri = max(marks)
    return {"watermark": uri, "consumedRun": run}


def poll_for(body: dict, runs: list[dict], now: datetime) -> newdata.Observation:
    """List the schedule's prefix (the spec is valid: ``plan`` has parsed it)."""
    spec, template = _trigger(body), body["spec"]["jobTemplate"]
    mark = watermark((body.get("status") or {}).get("newData") or {}, runs).get("watermark")
    storage = Storage.model_validate(template.get("storage") or {})
    return newdata.poll(spec["uri"], template["output"]["uri"], body["metadata"]["name"], storage, mark, now)
