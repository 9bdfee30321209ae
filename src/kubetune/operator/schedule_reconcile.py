"""Level-based reconcile of one FineTuneSchedule: pure logic over (the schedule, its runs, now).

``plan`` returns what to do (runs to start or delete, the endpoint to apply or remove, labels, events) and
the status to record; ``schedule_handlers`` does it. Each step can be repeated: what started a run is
written on the run itself (a cron tick, a request), and a judged run carries its result label, so a crash
between two calls neither starts a run twice nor promotes one twice.

    tick / request ─► run NAME-rN (continues from the served revision; gate: beat it)
                         ├─ Succeeded, gate passed ─► revision R: the endpoint rolls over to it
                         ├─ Succeeded, gate failed ─► GateFailed (the endpoint stays)
                         └─ Failed ─────────────────► Failed (the endpoint stays)
    spec.pinnedRevision (kubetune rollback) ─► the endpoint serves that revision
    trigger.newData: minExamples new examples under the prefix ─► a run on them (+ a replay of earlier data)

With trigger.newData every run's data is a manifest written before the run is created (``kubetune.newdata``):
``plan`` takes the latest poll of the prefix (``data``), and asks for one (``needs_data``) when it would start
a run without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from kubetune import newdata
from kubetune.cron import parse as parse_cron, zone
from kubetune.operator import schedule_children as sc
from kubetune.operator.schedule_newdata import seconds_to_poll, watermark
from kubetune.operator.conditions import FINISHED, Phase
from kubetune.operator.settings import Settings
from kubetune.schedule_spec import RETRAIN_ANNOTATION, FineTuneSchedule, ScheduleStatus, parse_schedule
from kubetune.spec import SpecError

REVISIONS_KEPT = 200  # status.revisions keeps the newest; an object has at most 1.5 MB


@dataclass
class Plan:
    status: dict  # the schedule's whole status as it should be (camelCase); absent keys are removed
    apply: list[dict] = field(default_factory=list)  # objects to create or bring up to date: new runs, the endpoint
    delete_runs: list[str] = field(default_factory=list)
    unserve: bool = False  # remove the endpoint (spec.serve.enabled is false)
    results: dict[str, str] = field(default_factory=dict)  # run → its result label
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (Normal | Warning, reason, message)
    started: list[tuple[str, str]] = field(default_factory=list)  # (run, trigger), for metrics
    wake_in: float | None = None  # seconds to the next cron tick or poll of trigger.newData
    manifests: list[tuple[str, dict]] = field(default_factory=list)  # data manifests to write before the runs
    needs_data: bool = False  # a run would start, but its data (a poll of trigger.newData) is not in hand


def stamp(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_stamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def finished(run: dict) -> bool:
    return (run.get("status") or {}).get("phase") in FINISHED


def _annotation(run: dict, key: str) -> str | None:
    return ((run.get("metadata") or {}).get("annotations") or {}).get(key)


def plan(body: dict, runs: list[dict], now: datetime, settings: Settings,
         data: newdata.Observation | None = None) -> Plan:
    meta, previous = body["metadata"], body.get("status") or {}
    status = {**previous, "observedGeneration": meta.get("generation")}
    try:
        schedule = parse_schedule({**body, "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                                                        "labels": meta.get("labels") or {}}})
    except SpecError as e:
        message = "; ".join(e.problems)
        events = [] if previous.get("message") == message else [("Warning", "InvalidSpec", message)]
        return Plan({**status, "reason": "InvalidSpec", "message": message}, events=events)
    return Planner(schedule, body, sorted(runs, key=sc.run_number), now, settings, status, data).run()


@dataclass
class Planner:
    schedule: FineTuneSchedule
    body: dict
    runs: list[dict]  # oldest first
    now: datetime
    settings: Settings
    status: dict
    data: newdata.Observation | None = None

    def __post_init__(self):
        self.out = Plan(self.status)
        self.spec, self.name = self.schedule.spec, self.schedule.metadata.name
        self.revisions = [dict(r) for r in self.status.get("revisions") or []]
        self.notes: list[str] = []  # for status.message

    def run(self) -> Plan:
        for r in self.runs:
            if finished(r) and not (r["metadata"].get("labels") or {}).get(sc.RESULT_LABEL):
                self.judge(r)
        served = self.serve()
        self.watch()
        self.trigger(served)
        self.prune(served)
        poll_in = seconds_to_poll({**self.body, "status": self.status}, self.now)
        if poll_in is not None:
            self.out.wake_in = max(1.0, min(poll_in, self.out.wake_in or poll_in))
        self.out.results = {k: v for k, v in self.out.results.items() if k not in self.out.delete_runs}
        active = [r["metadata"]["name"] for r in self.runs if not finished(r)
                  and r["metadata"]["name"] not in self.out.delete_runs] + [n for n, _ in self.out.started]
        self.status.update(revisions=self.revisions[-REVISIONS_KEPT:] or None, active=active or None,
                           runs=max([self.status.get("runs") or 0] + [sc.run_number(r) for r in self.runs]
                                    + [sc.number_of(n) for n, _ in self.out.started]))
        reason = "Running" if active else ("Serving" if served else "Waiting")
        self.status.update(reason=reason, message="; ".join(self.notes))
        self.out.status = {k: v for k, v in self.status.items() if v is not None}
        ScheduleStatus.model_validate(self.out.status)  # what the CRD's status schema keeps (it drops unknown fields)
        return self.out

    # Finished runs

    def judge(self, run: dict) -> None:
        name, st = run["metadata"]["name"], run.get("status") or {}
        if any(r["job"] == name for r in self.revisions):  # promoted before a crash; only its label is missing
            self.out.results[name] = "Promoted"
            return
        evaluation = st.get("evaluation") or {}
        latest = max((r for r in self.revisions), key=lambda r: r["revision"], default=None)
        if st.get("phase") == Phase.FAILED:
            self.result(run, "Failed", f"{name} failed ({st.get('reason', '')}): {st.get('message', '')}; not promoted",
                        "Warning", "RunFailed")
        elif not evaluation:
            self.result(run, "GateFailed", f"{name} succeeded without an evaluation verdict in its status; not promoted",
                        "Warning", "NotPromoted")
        elif not evaluation.get("passed"):
            self.result(run, "GateFailed", f"{name} did not beat the served model: {evaluation.get('message', '')}",
                        "Warning", "NotPromoted")
        elif latest and sc.number_of(latest["job"]) > sc.run_number(run):
            self.result(run, "Superseded", f"{name} passed its gate, but a later run, {latest['job']}, is already "
                        f"revision {latest['revision']}; not promoted", "Normal", "Superseded")
        else:
            self.promote(run, evaluation)

    def promote(self, run: dict, evaluation: dict) -> None:
        name, st = run["metadata"]["name"], run.get("status") or {}
        number = max((r["revision"] for r in self.revisions), default=0) + 1
        figures = sc.revision_metrics((st.get("progress") or {}).get("metrics") or {}, evaluation)
        self.revisions.append({"revision": number, "job": name, "model": st["outputModel"], "metrics": figures,
                               "verdict": evaluation.get("message"), "promotedAt": stamp(self.now),
                               "promotedBy": by if (by := _annotation(run, sc.TRIGGER_ANNOTATION)) in ("manual", "newData")
                               else "schedule"})
        self.result(run, "Promoted", f"{name} promoted as revision {number}: {evaluation.get('message', '')}",
                    "Normal", "Promoted")

    def result(self, run: dict, result: str, message: str, kind: str, reason: str) -> None:
        name = run["metadata"]["name"]
        self.out.results[name] = result
        self.status["lastResult"] = {"run": name, "result": result, "message": message,
                                     "finishedAt": (run.get("status") or {}).get("completionTime") or stamp(self.now)}
        self.out.events.append((kind, reason, message))

    # The endpoint

    def serve(self) -> dict | None:
        """The revision to serve (pinned or the latest), its endpoint applied; None before the first promotion."""
        by_number = {r["revision"]: r for r in self.revisions}
        latest = max(by_number, default=None)
        pinned, before = self.spec.pinned_revision, self.status.get("servedRevision")
        if pinned and pinned in by_number:
            number, why = pinned, f"pinned by spec.pinnedRevision (the latest is revision {latest})"
        elif pinned:
            number = before if before in by_number else latest
            why = (f"spec.pinnedRevision {pinned} is not a revision (status.revisions has "
                   f"{', '.join(map(str, sorted(by_number))) or 'none'}), so the endpoint stays")
            if self.status.get("servedReason") != why:
                self.out.events.append(("Warning", "PinnedRevisionMissing", why))
        else:
            number, why = latest, "the latest revision"
        served = by_number.get(number)
        self.status.update(servedRevision=number, servedModel=served and served["model"], servedReason=served and why)
        if served and number != before:
            reason = "RolledBack" if before and number < before else "Serving"
            self.out.events.append(("Normal", reason, f"serving revision {number} ({served['model']}): {why}"))
        if not self.spec.serve.enabled:
            self.out.unserve = True
            self.status["endpoint"] = None
        elif served:
            self.out.apply += [sc.serving_deployment(self.schedule, number, served["model"], self.settings),
                               sc.serving_service(self.schedule)]
            self.status["endpoint"] = sc.serving_endpoint(self.schedule)
        self.notes.append(f"serving revision {number} ({why})" if served else "no revision yet")
        return served

    # Starting runs

    def trigger(self, served: dict | None) -> None:
        tick = self.due_tick()
        request = (self.body["metadata"].get("annotations") or {}).get(RETRAIN_ANNOTATION)
        if request and any(_annotation(r, RETRAIN_ANNOTATION) == request for r in self.runs):
            self.status["lastRetrainRequest"] = request  # its run was started before a crash
        manual = request if request and request != self.status.get("lastRetrainRequest") else None
        fresh = self.fresh()
        if not (tick or manual or fresh):
            return
        active = [r["metadata"]["name"] for r in self.runs if not finished(r)]
        if active and self.spec.concurrency_policy == "Forbid":
            if fresh and not (tick or manual):
                self.notes.append(f"new data waits for {', '.join(active)} (concurrencyPolicy: Forbid)")
            if tick:
                self.status["lastScheduleTime"] = stamp(tick)
                self.out.events.append(("Normal", "Skipped", f"the run due at {stamp(tick)} is skipped: "
                                        f"{', '.join(active)} still running (concurrencyPolicy: Forbid)"))
            if manual:
                self.notes.append(f"retrain requested: it starts when {', '.join(active)} finish (concurrencyPolicy: Forbid)")
            return
        if self.spec.trigger.new_data and (self.data is None or self.data.error):
            # a run's data is the new objects: without a good poll in hand, ask for one (a tick or request waits)
            self.out.needs_data = self.data is None
            return
        if active and self.spec.concurrency_policy == "Replace":
            self.out.delete_runs += active
            self.status["lastResult"] = {"run": active[-1], "result": "Replaced", "finishedAt": stamp(self.now),
                                         "message": f"{', '.join(active)} replaced by a new run (concurrencyPolicy: Replace)"}
            self.out.events.append(("Normal", "Replaced", self.status["lastResult"]["message"]))
        self.start(served, "manual" if manual else "schedule" if tick else "newData", tick, manual)

    def due_tick(self) -> datetime | None:
        """The latest cron tick not yet acted on (ticks missed while the operator was away count once)."""
        if not self.spec.schedule:
            self.status["nextRun"] = None
            return None
        cron, tz = parse_cron(self.spec.schedule), zone(self.spec.time_zone)
        carried = [_annotation(r, sc.TICK_ANNOTATION) for r in self.runs]
        done = max([t for t in carried + [self.status.get("lastScheduleTime")] if t], default=None)
        if done:
            self.status["lastScheduleTime"] = done
        since = parse_stamp(done or self.body["metadata"]["creationTimestamp"])
        upcoming = cron.next_after(self.now, tz)
        self.status["nextRun"] = stamp(upcoming) if upcoming and not self.spec.suspend else None
        if upcoming and not self.spec.suspend:
            self.out.wake_in = (upcoming - self.now).total_seconds()
        tick = cron.latest_at_or_before(self.now, tz)
        if not tick or tick <= since:
            return None
        if self.spec.suspend:  # not caught up on when resumed: a suspended schedule misses its ticks
            self.status["lastScheduleTime"] = stamp(tick)
            return None
        return tick

    def start(self, served: dict | None, trigger: str, tick: datetime | None, request: str | None) -> None:
        n = max([self.status.get("runs") or 0] + [sc.run_number(r) for r in self.runs]) + 1
        name = sc.run_name(self.name, n)
        template = self.body["spec"]["jobTemplate"]
        if self.spec.retrain_from == "base" or served is None:
            model, since = template["model"], "the template's model"
        elif any(r["metadata"]["name"] == served["job"] for r in self.runs):
            model, since = {"fromJob": served["job"]}, f"revision {self.status['servedRevision']} ({served['job']})"
        else:  # its run was deleted (its model stays in storage)
            model, since = {"source": served["model"]}, f"revision {self.status['servedRevision']} ({served['model']})"
        tick_text = stamp(tick) if tick else None
        data = self.consume(name) if self.spec.trigger.new_data else None
        self.out.apply.insert(0, sc.run_job(self.schedule, template, n, model,
                                            sc.run_annotations(trigger, tick_text, request, data),
                                            served_model=served["model"] if served else None, data=data))
        self.out.started.append((name, trigger))
        self.status["lastRun"] = {"name": name, "startedAt": stamp(self.now), "trigger": trigger}
        if tick_text:
            self.status["lastScheduleTime"] = tick_text
        if request:
            self.status["lastRetrainRequest"] = request
        why = {"schedule": f"the schedule's tick at {tick_text}", "manual": f"a retrain request ({request})",
               "newData": "new data"}[trigger]
        if trigger == "newData":
            self.out.events.append(("Normal", "NewData", f"{self.data.examples} new examples in "
                                    f"{len(self.data.pending)} objects; starting {name}"))
        self.out.events.append(("Normal", "RunStarted", f"started {name} for {why}, from {since}"))

    # New data

    def watch(self) -> None:
        """status.newData: the watermark, and this sync's poll of the prefix when there was one."""
        trigger = self.spec.trigger.new_data
        if not trigger:
            self.status["newData"] = None
            return
        st = dict(self.status.get("newData") or {})
        mark = watermark(st, self.runs)
        if mark and mark.get("watermark") != st.get("watermark") and not self.data:
            st.update(pending=None, pendingObjects=None)  # counted against an older watermark: poll again
        st.update(mark)
        if self.data:
            st["lastPollAt"] = stamp(self.data.polled_at)
            if self.data.error and st.get("error") != self.data.error:
                self.out.events.append(("Warning", "NewDataPollFailed", f"{trigger.uri}: {self.data.error}"))
            if self.data.error:
                st["error"] = self.data.error
            else:
                st.update(pending=self.data.examples, pendingObjects=len(self.data.pending), error=None)
        if st.get("error"):
            self.notes.append(f"new data not read: {st['error']}")
        elif st.get("pending") is not None and st["pending"] < trigger.min_examples:
            self.notes.append(f"{st['pending']} new examples (a run starts at {trigger.min_examples})")
        self.status["newData"] = {k: v for k, v in st.items() if v is not None}

    def fresh(self) -> bool:
        """Enough new examples for a run, by this sync's poll, or else the status's latest one."""
        trigger = self.spec.trigger.new_data
        if not trigger:
            return False
        if self.data:
            return not self.data.error and self.data.examples >= trigger.min_examples
        st = self.status.get("newData") or {}
        return not st.get("error") and (st.get("pending") or 0) >= trigger.min_examples

    def consume(self, run: str) -> str:
        """Run ``run``'s data manifest (its new objects, a replay of the earlier ones), written before the run."""
        uri = newdata.manifest_uri(self.body["spec"]["jobTemplate"]["output"]["uri"], run)
        seed = newdata.replay_seed(self.schedule.metadata.namespace or "", run)
        self.out.manifests.append((uri, newdata.run_manifest(self.data.pending, self.data.earlier,
                                                             self.spec.replay_fraction, seed)))
        self.status["newData"] = {**self.status["newData"], "pending": 0, "pendingObjects": 0, "watermark": uri,
                                  "consumedRun": run}
        return uri

    # History

    def prune(self, served: dict | None) -> None:
        """Delete the finished runs beyond spec.historyLimit, oldest first; never the served (or pinned) revision's
        nor the latest revision's (unpinning goes back to it)."""
        latest = max(self.revisions, key=lambda r: r["revision"], default=None)
        keep = {r["job"] for r in (served, latest) if r}
        done = [r["metadata"]["name"] for r in reversed(self.runs)
                if finished(r) and r["metadata"]["name"] not in self.out.delete_runs]
        self.out.delete_runs += [name for name in done[self.spec.history_limit:] if name not in keep]
