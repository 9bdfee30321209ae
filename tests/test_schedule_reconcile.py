"""``plan`` of a FineTuneSchedule, table-driven: (the schedule, its runs, now) in, what to do and the status out.

The real API server and operator run in tests/test_k8s_schedule.py; here each decision is a row.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from kubetune.operator.schedule_children import RESULT_LABEL, REVISION_ANNOTATION, RUN_LABEL, SCHEDULE_LABEL
from kubetune.operator.schedule_reconcile import plan
from kubetune.operator.settings import Settings
from kubetune.spec import parse_job
from test_schedule_spec import schedule_doc

NOW = datetime(2026, 3, 2, 3, 0, 30, tzinfo=timezone.utc)  # 30 s after the daily 03:00 tick
TICK = "2026-03-02T03:00:00Z"
REQUEST = "2026-03-02T03:00:20Z"
PASSED = {"passed": True, "metric": "valid_loss", "value": 1.2, "threshold": 1.5,
          "message": "valid_loss 1.2000 (fine-tuned) < 1.5000 (base): better than the base model"}
NOT_BETTER = {"passed": False, "metric": "valid_loss", "value": 1.6, "threshold": 1.5,
              "message": "valid_loss 1.6000 (fine-tuned) > 1.5000 (base): not better than the base model"}


def schedule(status=None, request=None, created="2026-03-01T00:00:00Z", **spec) -> dict:
    doc = schedule_doc(**{"schedule": "0 3 * * *", **spec})
    doc["metadata"] = {"name": "bot", "namespace": "team", "generation": 1, "creationTimestamp": created,
                       "annotations": {"kubetune.dev/retrain-requested-at": request} if request else {}}
    doc["status"] = status or {}
    return doc


def run(n, phase="Training", evaluation=None, result=None, trigger="schedule", tick=None, request=None) -> dict:
    labels = {SCHEDULE_LABEL: "bot", RUN_LABEL: str(n), **({RESULT_LABEL: result} if result else {})}
    annotations = {"kubetune.dev/trigger": trigger, **({"kubetune.dev/scheduled-at": tick} if tick else {}),
                   **({"kubetune.dev/retrain-requested-at": request} if request else {})}
    status = {"phase": phase, "reason": phase, "message": "m"}
    if phase == "Succeeded":
        status.update(outputModel=f"s3://models/bot/bot-r{n}/model", progress={"metrics": {"valid_loss": 1.25, "train_loss": 1.1}})
    if evaluation:
        status["evaluation"] = evaluation
    return {"metadata": {"name": f"bot-r{n}", "labels": labels, "annotations": annotations}, "status": status}


def revision(n, job=None, by="schedule") -> dict:
    job = job or f"bot-r{n}"
    return {"revision": n, "job": job, "model": f"s3://models/bot/{job}/model", "metrics": {"valid_loss": 1.0},
            "promotedAt": "2026-03-01T03:00:00Z", "promotedBy": by}


def serving(*revisions, served=None) -> dict:
    return {"revisions": list(revisions), "servedRevision": served or revisions[-1]["revision"], "lastScheduleTime": TICK}


def go(body, runs=(), now=NOW):
    return plan(body, list(runs), now, Settings())


def started(p) -> list[dict]:
    return [o for o in p.apply if o["kind"] == "FineTuneJob"]


def deployment(p) -> dict:
    return next(o for o in p.apply if o["kind"] == "Deployment")


def reasons(p) -> list[str]:
    return [r for _, r, _ in p.events]


# Cron ticks

@pytest.mark.parametrize("status, created, runs, starts", [
    ({}, "2026-03-01T00:00:00Z", [], True),  # the tick came: a run
    ({"lastScheduleTime": TICK}, "2026-03-01T00:00:00Z", [], False),  # acted on already
    ({}, "2026-03-02T03:00:10Z", [], False),  # created after the tick: the next one
    ({"lastScheduleTime": "2026-02-20T03:00:00Z"}, "2026-02-01T00:00:00Z", [], True),  # missed ticks: one run
    ({}, "2026-03-01T00:00:00Z", [run(1, "Pending", tick=TICK)], False),  # started before a crash
])
def test_cron_tick_due_or_not(status, created, runs, starts):
    p = go(schedule(status, created=created), runs)
    assert bool(started(p)) is starts
    assert p.status["nextRun"] == "2026-03-03T03:00:00Z" and p.wake_in == pytest.approx(24 * 3600 - 30)
    assert p.status.get("lastScheduleTime") == (TICK if starts or runs else status.get("lastScheduleTime"))
    if starts:
        new = started(p)[0]
        assert new["metadata"]["name"] == f"bot-r{len(runs) + 1}" and new["metadata"]["annotations"] == {
            "kubetune.dev/trigger": "schedule", "kubetune.dev/scheduled-at": TICK}
        assert p.status["lastRun"] == {"name": new["metadata"]["name"], "startedAt": "2026-03-02T03:00:30Z",
                                       "trigger": "schedule"}


def test_a_schedule_in_a_time_zone_ticks_on_its_wall_clock():
    # 03:00 in Berlin (CET, UTC+1) is 02:00 UTC: at NOW (03:00:30 UTC) today's tick is an hour past, not due
    # (acted on), and the next is tomorrow's.
    p = go(schedule({"lastScheduleTime": "2026-03-02T02:00:00Z"}, timeZone="Europe/Berlin"))
    assert not started(p) and p.status["nextRun"] == "2026-03-03T02:00:00Z"
    p = go(schedule({"lastScheduleTime": "2026-03-01T02:00:00Z"}, timeZone="Europe/Berlin"))
    assert started(p)[0]["metadata"]["annotations"]["kubetune.dev/scheduled-at"] == "2026-03-02T02:00:00Z"


def test_a_run_is_a_valid_finetunejob_of_its_own():
    new = started(go(schedule()))[0]
    job = parse_job(new)
    assert job.metadata.name == "bot-r1" and new["metadata"]["labels"] == {SCHEDULE_LABEL: "bot", RUN_LABEL: "1"}
    assert job.spec.output.uri == "s3://models/bot/bot-r1/" and job.spec.serve.enabled is False
    assert job.spec.model.from_config is not None  # nothing promoted yet: the template's model
    assert job.spec.evaluation.gate.model_dump(exclude_none=True) == {"metric": "valid_loss", "must_beat": "base"}


@pytest.mark.parametrize("policy, runs_after, deleted, event", [
    ("Forbid", [], [], "Skipped"),
    ("Allow", ["bot-r2"], [], "RunStarted"),
    ("Replace", ["bot-r2"], ["bot-r1"], "Replaced"),
])
def test_concurrency_policy_on_a_tick_while_a_run_is_active(policy, runs_after, deleted, event):
    p = go(schedule({"lastScheduleTime": "2026-03-01T03:00:00Z"}, concurrencyPolicy=policy),
           [run(1, "Training", tick="2026-03-01T03:00:00Z")])
    assert [o["metadata"]["name"] for o in started(p)] == runs_after
    assert p.delete_runs == deleted and event in reasons(p)
    assert p.status["lastScheduleTime"] == TICK  # Forbid: the tick is skipped, not kept for later
    if policy == "Replace":
        assert p.status["lastResult"]["result"] == "Replaced" and p.status["active"] == ["bot-r2"]


def test_suspended_schedules_skip_ticks_but_take_requests():
    p = go(schedule(suspend=True))
    assert not started(p) and "nextRun" not in p.status and p.wake_in is None
    assert p.status["lastScheduleTime"] == TICK
    p = go(schedule(suspend=True, request=REQUEST))
    assert [o["metadata"]["annotations"]["kubetune.dev/trigger"] for o in started(p)] == ["manual"]


# Requests (kubetune retrain)

@pytest.mark.parametrize("status, runs, starts", [
    ({"lastScheduleTime": TICK}, [], True),  # a new value: a run
    ({"lastScheduleTime": TICK, "lastRetrainRequest": REQUEST}, [], False),  # acted on
    ({"lastScheduleTime": TICK}, [run(1, "Pending", trigger="manual", request=REQUEST)], False),  # before a crash
])
def test_manual_trigger(status, runs, starts):
    p = go(schedule(status, request=REQUEST, schedule=None), runs)
    assert bool(started(p)) is starts and p.status["lastRetrainRequest"] == REQUEST
    assert "nextRun" not in p.status and p.wake_in is None  # no cron schedule: requests only
    if starts:
        assert started(p)[0]["metadata"]["annotations"] == {"kubetune.dev/trigger": "manual",
                                                            "kubetune.dev/retrain-requested-at": REQUEST}
        assert p.status["lastRun"]["trigger"] == "manual"


def test_a_request_waits_for_the_active_run_under_forbid():
    body = schedule({"lastScheduleTime": TICK}, request=REQUEST)
    p = go(body, [run(1, "Training")])
    assert not started(p) and "lastRetrainRequest" not in p.status
    assert "retrain requested: it starts when bot-r1 finish" in p.status["message"]
    p = go(body, [run(1, "Failed", result="Failed")])  # its end is an event of the run: the schedule syncs
    assert [o["metadata"]["name"] for o in started(p)] == ["bot-r2"]


def test_runs_queue_where_their_schedule_says():
    body = schedule({"lastScheduleTime": TICK}, request=REQUEST)
    body["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a", "kueue.x-k8s.io/priority-class": "low",
                                  "app": "support"}
    labels = started(go(body))[0]["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a" and labels["kueue.x-k8s.io/priority-class"] == "low"
    assert "app" not in labels and labels["kubetune.dev/schedule"] == "bot"


# Where a run starts from, and its gate

@pytest.mark.parametrize("spec, status, runs, model", [
    ({}, {}, [], {"fromConfig": {"size": "tiny", "vocabSize": 512}}),  # nothing promoted: the template's
    ({}, serving(revision(1)), [run(1, "Succeeded", PASSED, "Promoted")], {"fromJob": "bot-r1"}),
    ({"retrainFrom": "base"}, serving(revision(1)), [run(1, "Succeeded", PASSED, "Promoted")],
     {"fromConfig": {"size": "tiny", "vocabSize": 512}}),
    ({}, serving(revision(1)), [], {"source": "s3://models/bot/bot-r1/model"}),  # its run deleted: the stored model
    ({"pinnedRevision": 1}, serving(revision(1), revision(2), served=1),
     [run(1, "Succeeded", PASSED, "Promoted"), run(2, "Succeeded", PASSED, "Promoted")], {"fromJob": "bot-r1"}),
])
def test_a_run_continues_from_the_served_revision(spec, status, runs, model):
    p = go(schedule({**status, "lastScheduleTime": TICK}, request=REQUEST, **spec), runs)
    assert started(p)[0]["spec"]["model"] == model


def test_min_delta_goes_into_the_runs_gate():
    p = go(schedule(promotion={"metric": "valid_perplexity", "minDelta": 0.5}))
    assert started(p)[0]["spec"]["evaluation"]["gate"] == {"metric": "valid_perplexity", "mustBeat": "base", "minDelta": 0.5}


@pytest.mark.parametrize("spec, status, runs, gate, served", [
    ({}, {}, [], "base", None),  # nothing served yet: the run must beat its own base
    ({}, serving(revision(1)), [run(1, "Succeeded", PASSED, "Promoted")], "serving", "s3://models/bot/bot-r1/model"),
    ({"retrainFrom": "base"}, serving(revision(1)), [run(1, "Succeeded", PASSED, "Promoted")], "serving",
     "s3://models/bot/bot-r1/model"),  # base is not what is served: the gate names the served model
    ({"pinnedRevision": 1}, serving(revision(1), revision(2), served=1), [], "serving", "s3://models/bot/bot-r1/model"),
])
def test_a_run_must_beat_the_served_model_on_the_golden_set(spec, status, runs, gate, served):
    promotion = {"metric": "valid_loss", "minDelta": 0.1, "goldenSet": "s3://data/golden.jsonl"}
    p = go(schedule({**status, "lastScheduleTime": TICK}, request=REQUEST, promotion=promotion, **spec), runs)
    evaluation = started(p)[0]["spec"]["evaluation"]
    assert evaluation["gate"] == {"metric": "valid_loss", "mustBeat": gate, "minDelta": 0.1}
    assert evaluation.get("servedModel") == served and evaluation["goldenSet"] == "s3://data/golden.jsonl"
    parse_job(started(p)[0])  # a valid FineTuneJob: mustBeat serving comes with its servedModel


def test_every_run_shares_the_schedules_dedup_index():
    first = started(go(schedule(request=REQUEST)))[0]["spec"]
    later = started(go(schedule({**serving(revision(1)), "lastScheduleTime": TICK}, request=REQUEST),
                       [run(1, "Succeeded", PASSED, "Promoted")]))[0]["spec"]
    assert first["preprocessing"]["dedup"]["index"] == later["preprocessing"]["dedup"]["index"] == \
        "s3://models/bot/bot/dedup-index/"
    assert first["output"]["uri"] != later["output"]["uri"]
    assert first["preprocessing"]["maxSeqLength"] == 256  # the rest of the template's preprocessing is kept


def test_a_revision_shows_the_run_and_the_served_model_side_by_side():
    finished = run(2, "Succeeded", {**PASSED, "value": 0.9, "threshold": 1.1})
    finished["status"]["progress"]["metrics"]["evaluation"] = {
        "valid_loss": {"base": 1.4, "served": 1.4, "fineTuned": 1.25},
        "golden": {"valid_loss": {"base": 1.1, "served": 1.1, "fineTuned": 0.9}, "rouge_l": {"served": 0.2, "fineTuned": 0.3}}}
    p = go(schedule({**serving(revision(1)), "lastScheduleTime": TICK}), [run(1, "Succeeded", PASSED, "Promoted"), finished])
    assert p.status["revisions"][-1]["metrics"] == {
        "valid_loss": 1.25, "served_valid_loss": 1.4, "golden_valid_loss": 0.9, "served_golden_valid_loss": 1.1,
        "golden_rouge_l": 0.3, "served_golden_rouge_l": 0.2}


# Finished runs: promotion or not

def test_a_run_that_beats_the_served_model_is_promoted_and_served():
    p = go(schedule({"lastScheduleTime": TICK}), [run(1, "Succeeded", PASSED, trigger="manual")])
    (rev,) = p.status["revisions"]
    assert rev == {"revision": 1, "job": "bot-r1", "model": "s3://models/bot/bot-r1/model",
                   "metrics": {"valid_loss": 1.2}, "verdict": PASSED["message"], "promotedAt": "2026-03-02T03:00:30Z",
                   "promotedBy": "manual"}
    assert p.results == {"bot-r1": "Promoted"} and p.status["lastResult"]["result"] == "Promoted"
    assert (p.status["servedRevision"], p.status["servedModel"]) == (1, "s3://models/bot/bot-r1/model")
    assert p.status["endpoint"] == "http://bot-serve.team.svc:8000/v1" and reasons(p) == ["Promoted", "Serving"]
    d = deployment(p)
    assert d["metadata"]["name"] == "bot-serve" and d["metadata"]["annotations"] == {REVISION_ANNOTATION: "1"}
    pod = d["spec"]["template"]["spec"]
    assert "s3://models/bot/bot-r1/model" in pod["initContainers"][0]["command"]
    server = pod["containers"][0]
    assert server["command"][server["command"].index("--name") + 1] == "bot"  # the model name stays the schedule's
    assert server["readinessProbe"] == {"httpGet": {"path": "/readyz", "port": 8000}}
    assert d["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    assert d["spec"]["selector"]["matchLabels"] == {SCHEDULE_LABEL: "bot", "app.kubernetes.io/component": "serve"}
    assert "kubetune.dev/job" not in d["spec"]["template"]["metadata"]["labels"]
    service = next(o for o in p.apply if o["kind"] == "Service")
    assert service["metadata"]["name"] == "bot-serve" and service["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("finished_run, result, event, says", [
    (run(2, "Succeeded", NOT_BETTER), "GateFailed", "NotPromoted", NOT_BETTER["message"]),
    (run(2, "Succeeded"), "GateFailed", "NotPromoted", "without an evaluation verdict"),
    (run(2, "Failed"), "Failed", "RunFailed", "bot-r2 failed (Failed): m"),
])
def test_a_run_that_does_not_beat_it_is_not_promoted(finished_run, result, event, says):
    p = go(schedule(serving(revision(1))), [run(1, "Succeeded", PASSED, "Promoted"), finished_run])
    assert [r["revision"] for r in p.status["revisions"]] == [1] and p.status["servedRevision"] == 1
    assert p.results == {"bot-r2": result} and p.status["lastResult"]["result"] == result
    assert says in p.status["lastResult"]["message"] and reasons(p) == [event]
    assert ("Warning", event) == p.events[0][:2]
    assert "s3://models/bot/bot-r1/model" in deployment(p)["spec"]["template"]["spec"]["initContainers"][0]["command"]


def test_judged_runs_are_not_judged_again():
    p = go(schedule(serving(revision(1))), [run(1, "Succeeded", PASSED, "Promoted"), run(2, "Failed", result="Failed")])
    assert p.events == [] and p.results == {}


def test_a_promotion_whose_label_was_not_written_is_not_repeated():
    p = go(schedule(serving(revision(1))), [run(1, "Succeeded", PASSED)])
    assert [r["revision"] for r in p.status["revisions"]] == [1] and p.results == {"bot-r1": "Promoted"}
    assert p.events == []


def test_an_older_run_finishing_after_a_newer_promotion_is_superseded():
    p = go(schedule(serving(revision(1, job="bot-r3"))),
           [run(2, "Succeeded", PASSED), run(3, "Succeeded", PASSED, "Promoted")])
    assert p.results == {"bot-r2": "Superseded"} and len(p.status["revisions"]) == 1


# Rollback

def test_pinned_revision_serves_it_and_says_why():
    body = schedule(serving(revision(1), revision(2)), pinnedRevision=1)
    p = go(body, [run(1, "Succeeded", PASSED, "Promoted"), run(2, "Succeeded", PASSED, "Promoted")])
    assert p.status["servedRevision"] == 1 and "pinned by spec.pinnedRevision" in p.status["servedReason"]
    assert "s3://models/bot/bot-r1/model" in deployment(p)["spec"]["template"]["spec"]["initContainers"][0]["command"]
    assert deployment(p)["spec"]["template"]["metadata"]["annotations"] == {REVISION_ANNOTATION: "1"}
    assert reasons(p) == ["RolledBack"]
    # unpinned: back to the latest
    body = schedule({**serving(revision(1), revision(2)), "servedRevision": 1})
    p = go(body)
    assert p.status["servedRevision"] == 2 and p.status["servedReason"] == "the latest revision"
    assert reasons(p) == ["Serving"]


def test_a_pinned_revision_that_does_not_exist_keeps_the_endpoint():
    p = go(schedule(serving(revision(1), revision(2)), pinnedRevision=7))
    assert p.status["servedRevision"] == 2 and "spec.pinnedRevision 7 is not a revision" in p.status["servedReason"]
    assert ("Warning", "PinnedRevisionMissing") == p.events[0][:2]


# History

def test_history_limit_deletes_the_oldest_finished_runs_but_not_the_served_one():
    runs = [run(n, "Failed", result="Failed") for n in range(1, 9)] + [run(9, "Training")]
    runs[1], runs[3] = run(2, "Succeeded", PASSED, "Promoted"), run(4, "Succeeded", PASSED, "Promoted")
    status = {**serving(revision(1, job="bot-r2"), revision(2, job="bot-r4"), served=1), "runs": 9}
    p = go(schedule(status, historyLimit=3, pinnedRevision=1), runs)
    # kept: r8, r7, r6 (the newest 3), r2 (served: pinned), r4 (the latest revision), r9 (active)
    assert sorted(p.delete_runs) == ["bot-r1", "bot-r3", "bot-r5"]
    assert p.status["active"] == ["bot-r9"] and p.status["runs"] == 9


def test_serve_disabled_removes_the_endpoint():
    p = go(schedule(serving(revision(1)), serve={"enabled": False}))
    assert p.unserve and not [o for o in p.apply if o["kind"] == "Deployment"] and "endpoint" not in p.status


def test_an_invalid_schedule_is_reported_once():
    body = schedule(schedule="0 3 * *")
    p = go(body)
    assert p.status["reason"] == "InvalidSpec" and "spec.schedule" in p.status["message"] and not p.apply
    assert reasons(p) == ["InvalidSpec"]
    body["status"] = p.status
    assert go(body).events == []
