"""``reconcile`` step by step, table-driven, against an in-memory stand-in for the API.

The real API server runs in tests/test_k8s_*.py; here every phase transition is one row, fast enough
to cover the corners (a kill between two steps is just a starting state).
"""

from __future__ import annotations

import copy
import time

import pytest

from k8s_helpers import ftj_doc
from kubetune.operator.kube import Rejected
from kubetune.operator.rechecks import Rechecks
from kubetune.operator.reconcile import reconcile, seconds_to_stall, status_patch
from kubetune.operator.settings import Settings

NS = "team"


class FakeApi:
    """Children by (kind, name); ``refuse`` names a kind whose create fails as the API server's 422 would."""

    def __init__(self, jobs: dict | None = None, ftjs: dict | None = None, refuse: str | None = None):
        self.objects = {("Job", n): {"metadata": {"name": n}, **j} for n, j in (jobs or {}).items()}
        self.ftjs, self.refuse = ftjs or {}, refuse
        self.created: list[str] = []
        self.deleted: list[str] = []

    def get_ftj(self, ns, name):
        return copy.deepcopy(self.ftjs.get(name))

    def create(self, obj):
        if obj["kind"] == self.refuse:
            raise Rejected(f"{obj['kind']} {obj['metadata']['name']}: refused")
        key = (obj["kind"], obj["metadata"]["name"])
        if key in self.objects:
            return False
        self.objects[key] = obj
        self.created.append(f"{obj['kind']}/{obj['metadata']['name']}")
        return True

    def apply(self, obj):
        if not self.create(obj):
            self.objects[(obj["kind"], obj["metadata"]["name"])] = obj

    def get_job(self, ns, name):
        return self.objects.get(("Job", name))

    def _delete(self, kind, name):
        if self.objects.pop((kind, name), None) is not None:
            self.deleted.append(f"{kind}/{name}")

    def delete_job(self, ns, name):
        self._delete("Job", name)

    def delete_service(self, ns, name):
        self._delete("Service", name)

    def delete_deployment(self, ns, name):
        self._delete("Deployment", name)

    def job_pods(self, ns, name):
        return (self.objects.get(("Job", name)) or {}).get("pods", [])

    def workload(self, ns, job):
        return job.get("workload")


def done(kind="Complete", suspend=False, pods=()):
    return {"spec": {"suspend": suspend}, "status": {"conditions": [{"type": kind, "status": "True", "message": "m"}]},
            "pods": list(pods)}


def pod(exit_code: int, message: str = "", disrupted: bool = False) -> dict:
    """A failed pod as the kubelet leaves it: the exit code, the termination message, DisruptionTarget if evicted."""
    return {"status": {"conditions": [{"type": "DisruptionTarget", "status": "True"}] if disrupted else [],
                       "containerStatuses": [{"state": {"terminated": {"exitCode": exit_code, "message": message}}}]}}


RUNNING = {"spec": {}, "status": {}}
QUEUED = {"spec": {"suspend": True}, "status": {}}


def body(name="bot", status=None, generation=1, **spec):
    doc = ftj_doc(name, **spec)
    doc["metadata"].update(namespace=NS, generation=generation)
    doc["status"] = status or {}
    return doc


def ago(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds))


def gang(created_ago: float) -> dict:
    return {"metadata": {"creationTimestamp": ago(created_ago)}, "spec": {}, "status": {}}


def progress(attempt: int, idle: float, phase: str = "training") -> dict:
    return {"progress": {"phase": phase, "attempt": attempt, "step": 7, "updatedAt": ago(idle)}}


TRAINING = {"phase": "Training", "prepared": True, "trainingJob": "bot-train-0"}
GATE_FAILED = {"evaluation": {"passed": False, "metric": "valid_loss", "message": "valid_loss 2.31 did not beat base 2.20"}}
PODS_NEED = ["ServiceAccount/bot-trainer", "Role/bot-progress", "RoleBinding/bot-progress", "ConfigMap/bot-job"]
CASES = [
    # (what, body, jobs, other FineTuneJobs, phase, reason, created, deleted, status fields)
    ("new job: the prepare Job and what its pods need", body(), {}, {}, "Preparing", "Preparing",
     [*PODS_NEED, "Job/bot-prepare"],
     [], {}),
    ("preparing", body(status={"phase": "Preparing"}), {"bot-prepare": RUNNING}, {}, "Preparing", "Preparing", [], [], {}),
    ("prepare Job waits for Kueue", body(), {"bot-prepare": QUEUED}, {}, "Preparing", "Queued", [], [], {}),
    ("prepare failed", body(), {"bot-prepare": done("Failed")}, {}, "Failed", "PreparationFailed", [], [], {}),
    ("prepared: the gang starts", body(), {"bot-prepare": done()}, {}, "Training", "Training",
     ["Service/bot-train", *PODS_NEED, "Job/bot-train-0"], [], {"prepared": True, "trainingJob": "bot-train-0"}),
    ("gang failed: the retry is recorded first, nothing started yet", body(status=TRAINING),
     {"bot-prepare": done(), "bot-train-0": done("Failed")}, {}, "Training", "Retrying", [], [],
     {"retries": 1, "trainingJob": "bot-train-1"}),
    ("retry recorded: the failed gang goes, the next starts", body(status={**TRAINING, "retries": 1}),
     {"bot-prepare": done(), "bot-train-0": done("Failed")}, {}, "Training", "Training",
     ["Service/bot-train", *PODS_NEED, "Job/bot-train-1"], ["Job/bot-train-0"], {"trainingJob": "bot-train-1"}),
    ("last retry failed", body(status={**TRAINING, "retries": 3}), {"bot-train-3": done("Failed")}, {},
     "Failed", "TrainingFailed", [], [], {}),
    # failure classes (kubetune.errors): permanent ones fail at once, a disrupted gang is not counted
    ("permanent exit code: failed at once, whatever retries are left", body(status=TRAINING),
     {"bot-train-0": done("Failed", pods=[pod(3, "error: the data has 4 packed training rows, fewer than x")])}, {},
     "Failed", "InvalidInput", [], [], {}),
    ("a gang: its peer failed after the permanent one, which names the class", body(status=TRAINING),
     {"bot-train-0": done("Failed", pods=[pod(1, "rendezvous closed"), pod(5, "error: model.source: cannot load")])},
     {}, "Failed", "ModelError", [], [], {}),
    ("storage refused in preparation", body(), {"bot-prepare": done("Failed", pods=[pod(4, "error: bucket b does not "
                                                                                    "exist")])}, {},
     "Failed", "StorageError", [], [], {}),
    ("a transient exit code is retried", body(status=TRAINING), {"bot-train-0": done("Failed", pods=[pod(75, "x")])}, {},
     "Training", "Retrying", [], [], {"retries": 1, "trainingJob": "bot-train-1"}),
    ("an unexpected exception (exit 1) is retried", body(status=TRAINING),
     {"bot-train-0": done("Failed", pods=[pod(1, "error: unexpected KeyError: 'x'")])}, {},
     "Training", "Retrying", [], [], {"retries": 1, "trainingJob": "bot-train-1"}),
    ("a diverged loss fails at once", body(status=TRAINING),
     {"bot-train-0": done("Failed", pods=[pod(6, "error: the training loss became nan at step 6")])}, {},
     "Failed", "TrainingDiverged", [], [], {}),
    ("a preempted gang with its retries used up: a new attempt, not counted", body(status={**TRAINING, "retries": 3}),
     {"bot-train-3": done("Failed", pods=[pod(75, "preempted", disrupted=True), pod(1, "rendezvous closed")])}, {},
     "Training", "Preempted", [], [], {"preemptions": 1, "trainingJob": "bot-train-4", "retries": None}),
    ("a gang whose peer stopped on SIGTERM with its step saved (a deleted pod): a new attempt, not counted",
     body(status=TRAINING), {"bot-train-0": done("Failed", pods=[pod(143, "stopped by SIGTERM after step 9"),
                                                                 pod(1, "rendezvous closed")])}, {},
     "Training", "Preempted", [], [], {"preemptions": 1, "trainingJob": "bot-train-1", "retries": None}),
    ("preemption recorded: the next gang starts", body(status={**TRAINING, "retries": 3, "preemptions": 1}),
     {"bot-prepare": done(), "bot-train-3": done("Failed")}, {}, "Training", "Training",
     ["Service/bot-train", *PODS_NEED, "Job/bot-train-4"], ["Job/bot-train-3"], {"trainingJob": "bot-train-4"}),
    ("gang done", body(status=TRAINING), {"bot-train-0": done()}, {}, "Succeeded", "Succeeded", [], [],
     {"outputModel": "s3://models/bot/model"}),
    ("gang done, serving", body(status=TRAINING, serve={"enabled": True}), {"bot-train-0": done()}, {},
     "Succeeded", "Serving", ["Deployment/bot-serve", "Service/bot-serve"], [],
     {"endpoint": f"http://bot-serve.{NS}.svc:8000/v1"}),
    ("serving turned off after success", body(status={"phase": "Succeeded", "outputModel": "s3://m", "endpoint": "http://x"}),
     {}, {}, "Succeeded", "Succeeded", [], [], {"endpoint": None}),
    ("suspended while training", body(status=TRAINING, suspend=True), {"bot-train-0": RUNNING}, {},
     "Suspended", "Suspended", [], ["Job/bot-train-0"], {}),
    ("suspended with the gang started but not recorded", body(suspend=True),
     {"bot-prepare": done(), "bot-train-0": RUNNING}, {}, "Suspended", "Suspended", [], ["Job/bot-train-0"], {}),
    ("base job missing", body(model={"fromJob": "base"}), {}, {}, "Pending", "WaitingForBaseJob", [], [], {}),
    ("base job failed", body(model={"fromJob": "base"}), {}, {"base": {"status": {"phase": "Failed", "message": "x"}}},
     "Failed", "BaseJobFailed", [], [], {}),
    ("base job succeeded", body(model={"fromJob": "base"}), {},
     {"base": {"status": {"phase": "Succeeded", "outputModel": "s3://models/base/model"}}}, "Preparing", "Preparing",
     [*PODS_NEED, "Job/bot-prepare"],
     [], {"baseModel": "s3://models/base/model"}),
    ("fromJob cycle", body(model={"fromJob": "a"}), {},
     {"a": {"spec": {"model": {"fromJob": "b"}}}, "b": {"spec": {"model": {"fromJob": "bot"}}}},
     "Failed", "InvalidSpec", [], [], {}),
    # the stall watchdog: the clock runs from this gang's last progress record
    ("stalled: the retry is recorded", body(status={**TRAINING, **progress(0, 3600)}), {"bot-train-0": gang(7200)}, {},
     "Training", "Stalled", [], [], {"retries": 1, "trainingJob": "bot-train-1"}),
    ("stalled in start-up", body(status={**TRAINING, **progress(0, 3600, "starting")}), {"bot-train-0": gang(7200)}, {},
     "Training", "Stalled", [], [], {"retries": 1}),
    ("stalled on the last attempt: the gang goes", body(status={**TRAINING, "retries": 3, **progress(3, 3600)}),
     {"bot-train-3": gang(7200)}, {}, "Failed", "Stalled", [], ["Job/bot-train-3"], {}),
    ("recent progress is no stall", body(status={**TRAINING, **progress(0, 10)}), {"bot-train-0": gang(7200)}, {},
     "Training", "Training", [], [], {}),
    ("stallTimeout is the spec's", body(status={**TRAINING, **progress(0, 3600)}, training={"stallTimeout": "2h"}),
     {"bot-train-0": gang(7200)}, {}, "Training", "Training", [], [], {}),
    ("an earlier attempt's record is no stall", body(status={**TRAINING, "retries": 1, **progress(0, 3600)}),
     {"bot-train-1": gang(60)}, {}, "Training", "Training", [], [], {}),
    ("a record from before the gang (suspend, resume) is no stall", body(status={**TRAINING, **progress(0, 3600)}),
     {"bot-train-0": gang(60)}, {}, "Training", "Training", [], [], {}),
    ("exporting is no stall", body(status={**TRAINING, **progress(0, 3600, "exporting")}), {"bot-train-0": gang(7200)},
     {}, "Training", "Training", [], [], {}),
    # the evaluation gate and serve.checkpoint
    ("gang done, gate failed: not served", body(status={**TRAINING, **GATE_FAILED}, serve={"enabled": True}),
     {"bot-train-0": done()}, {}, "Succeeded", "EvaluationFailed", [], [], {"endpoint": None}),
    ("serve.checkpoint that is not there", body(status={**TRAINING, "checkpoints": [{"name": "step-8", "step": 8}]},
                                                serve={"enabled": True, "checkpoint": "step-9"}),
     {"bot-train-0": done()}, {}, "Succeeded", "ServingFailed", [], [], {"endpoint": None}),
    ("a child the API server refuses", body(status=TRAINING), {}, {}, "Failed", "InvalidSpec",
     ["Service/bot-train", *PODS_NEED], [], {}),
    ("a spec the operator cannot read", {**body(), "spec": {"model": {}}}, {}, {}, "Failed", "InvalidSpec", [], [], {}),
]


@pytest.mark.parametrize("what, job, jobs, ftjs, phase, reason, created, deleted, fields", CASES,
                         ids=[c[0] for c in CASES])
def test_reconcile_step(what, job, jobs, ftjs, phase, reason, created, deleted, fields):
    api = FakeApi(jobs, ftjs, refuse="Job" if what == "a child the API server refuses" else None)
    outcome = reconcile(api, Settings(), copy.deepcopy(job), adopt=lambda obj: None)
    assert (outcome.phase, outcome.reason) == (phase, reason), outcome.message
    assert api.created == created and api.deleted == deleted
    assert {k: outcome.status.get(k) for k in fields} == fields


def test_cycle_message_names_the_chain():
    api = FakeApi(ftjs={"a": {"spec": {"model": {"fromJob": "bot"}}}})
    outcome = reconcile(api, Settings(), body(model={"fromJob": "a"}), adopt=lambda obj: None)
    assert outcome.message == "model.fromJob forms a cycle: bot → a → bot"


@pytest.mark.parametrize("status, serve, generation", [
    ({"phase": "Failed"}, {"enabled": True}, 1),
    ({"phase": "Succeeded", "outputModel": "s3://m"}, {}, 1),
    ({"phase": "Succeeded", "outputModel": "s3://m", "endpoint": "http://x", "observedGeneration": 2}, {"enabled": True}, 2),
])
def test_finished_jobs_need_nothing(status, serve, generation):
    assert reconcile(FakeApi(), Settings(), body(status=status, serve=serve, generation=generation), lambda o: None) is None


def test_a_serve_edit_after_success_is_applied():
    job = body(status={"phase": "Succeeded", "outputModel": "s3://m", "endpoint": "http://x", "observedGeneration": 1},
               serve={"enabled": True, "replicas": 3}, generation=2)
    api = FakeApi()
    outcome = reconcile(api, Settings(), job, lambda o: None)
    assert outcome.reason == "Serving" and api.objects[("Deployment", "bot-serve")]["spec"]["replicas"] == 3


def test_a_failing_sync_logs_its_traceback_once_then_one_line(caplog):
    import logging

    from kubetune.operator.handlers import _retry_later

    logger = logging.getLogger("test-operator")
    for _ in range(3):
        try:
            raise ConnectionError("API server away")
        except ConnectionError as e:  # a Timer far in the future: nothing is retried during the test
            _retry_later("reconcile of team/bot", e, logger, 3600, lambda *args: None)
    records = [r for r in caplog.records if r.name == "test-operator"]
    assert [r.exc_info is not None for r in records] == [True, False, False]
    assert "failed again (ConnectionError: API server away)" in records[-1].getMessage()


def test_serve_checkpoint_chooses_the_model_the_deployment_fetches():
    checkpoints = [{"name": "step-4", "step": 4, "model": "s3://models/bot/checkpoints/step-00000004/model", "best": True},
                   {"name": "step-8", "step": 8, "model": "s3://models/bot/checkpoints/step-00000008/model"}]
    for ref, model in (("best", checkpoints[0]["model"]), ("step-8", checkpoints[1]["model"]), ("last", "s3://models/bot/model")):
        api = FakeApi({"bot-train-0": done()})
        job = body(status={**TRAINING, "checkpoints": checkpoints}, serve={"enabled": True, "checkpoint": ref})
        assert reconcile(api, Settings(), job, lambda o: None).reason == "Serving"
        fetch = api.objects[("Deployment", "bot-serve")]["spec"]["template"]["spec"]["initContainers"][0]["command"]
        assert fetch[2] == model


def test_the_gate_verdict_is_a_condition():
    outcome = reconcile(FakeApi({"bot-train-0": done()}), Settings(), body(status={**TRAINING, **GATE_FAILED}), lambda o: None)
    conditions = {c["type"]: c for c in status_patch(GATE_FAILED, outcome, 1)["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"
    assert (conditions["EvaluationPassed"]["status"], conditions["EvaluationPassed"]["reason"]) == ("False", "GateFailed")
    assert "did not beat base" in conditions["EvaluationPassed"]["message"]


def test_the_watchdog_wakes_a_job_when_it_would_stall():
    assert seconds_to_stall(body(status=progress(0, 600), training={"stallTimeout": "15m"})) == pytest.approx(300, abs=5)
    assert seconds_to_stall(body(status=progress(0, 600, "done"))) is None
    woken = []
    rechecks = Rechecks(lambda ns, name: woken.append((name, time.monotonic())))
    start = time.monotonic()
    rechecks.after(NS, "a", 1.5)
    rechecks.after(NS, "b", 1.0)
    rechecks.after(NS, "b", 2.5)  # replaces the earlier one
    rechecks.after(NS, "c", 1.0)
    rechecks.forget(NS, "c")
    time.sleep(3.2)
    assert [name for name, _ in woken] == ["a", "b"]
    assert woken[0][1] - start == pytest.approx(1.5, abs=0.3) and woken[1][1] - start == pytest.approx(2.5, abs=0.3)


def test_a_permanent_failure_says_its_cause_once():
    jobs = {"bot-train-0": done("Failed", pods=[pod(3, "Traceback...\nerror: the data has 4 packed training rows")])}
    outcome = reconcile(FakeApi(jobs), Settings(), body(status=TRAINING), adopt=lambda obj: None)
    assert outcome.message == "the data has 4 packed training rows"  # the last line, no "error: ", no retry count


# Kueue: a suspended Job it holds, in its words (the real Kueue runs in the e2e: tests/e2e/test_kueue.py)

QUOTA_SHORT = ("couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor default, "
               "800m more needed")
PENDING = {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": QUOTA_SHORT}
EVICTED = {"type": "Evicted", "status": "True", "reason": "Preempted", "message": "Preempted to accommodate a "
           "workload (UID: 1, JobUID: 2) due to prioritization in the ClusterQueue"}
ADMITTED = {"type": "Admitted", "status": "True", "lastTransitionTime": "2026-12-04T10:00:00Z"}


def kueue_job(*conditions, suspend=True, terminating=0, workload=True, start=None) -> dict:
    return {"metadata": {"labels": {"kueue.x-k8s.io/queue-name": "team-a"}, "uid": "u1",
                         "creationTimestamp": ago(7200)},
            "spec": {"suspend": suspend}, "status": {"terminating": terminating, **({"startTime": start} if start else {})},
            "workload": {"status": {"conditions": list(conditions)}} if workload else None}


SAVED = {"progress": {"phase": "training", "attempt": 0, "step": 41, "updatedAt": ago(3600),
                      "checkpoint": "s3://out/bot/checkpoints/step-00000040"}}


@pytest.mark.parametrize("what, status, jobs, reason, says", [
    ("prepare waits for quota", {}, {"bot-prepare": kueue_job(PENDING)}, "Queued",
     f"waiting in Kueue's LocalQueue team-a: {QUOTA_SHORT}"),
    ("no Workload yet (no Kueue?)", {}, {"bot-prepare": kueue_job(workload=False)}, "Queued", "is Kueue running"),
    ("a gang waits for quota", TRAINING, {"bot-train-0": kueue_job(PENDING)}, "Queued", QUOTA_SHORT),
    ("preempted, pods still saving", {**TRAINING, **SAVED}, {"bot-train-0": kueue_job(EVICTED, PENDING, terminating=1)},
     "Preempting", "preempted by Kueue (Preempted: Preempted to accommodate a workload (UID: 1, JobUID: 2) due to "
     "prioritization in the ClusterQueue); 1 pod(s) saving a checkpoint"),
    ("preempted, checkpoint saved", {**TRAINING, **SAVED}, {"bot-train-0": kueue_job(EVICTED, PENDING)},
     "Preempted", f"due to prioritization in the ClusterQueue), 40 steps kept; waiting in LocalQueue team-a to be "
     f"admitted again: {QUOTA_SHORT}"),
])
def test_a_job_kueue_holds_says_why(what, status, jobs, reason, says):
    api = FakeApi(jobs)
    outcome = reconcile(api, Settings(), body(status=status), adopt=lambda obj: None)
    assert outcome.reason == reason and says in outcome.message, outcome.message
    assert api.created == [] and api.deleted == []  # the same Job waits: no new attempt, nothing counted
    assert not outcome.status.get("retries") and not outcome.status.get("preemptions")
    assert outcome.status["admittedAt"] is None


def test_admitted_again_the_same_gang_resumes_and_says_when():
    # Readmitted an hour after its last progress record: Kueue reset the Job's startTime, so no stall.
    gang = kueue_job(ADMITTED, suspend=False, start=ago(5))
    api = FakeApi({"bot-train-0": gang})
    outcome = reconcile(api, Settings(), body(status={**TRAINING, **SAVED, "reason": "Preempted"},
                                              training={"stallTimeout": "30m"}), adopt=lambda obj: None)
    assert (outcome.reason, outcome.status["admittedAt"]) == ("Training", "2026-12-04T10:00:00Z"), outcome.message
    assert api.created == [] and not outcome.status.get("retries")
    gang["workload"] = None  # admitted once: not read again while it runs
    again = reconcile(api, Settings(), body(status={**TRAINING, "reason": "Training", "admittedAt": "2026-12-04T10:00:00Z"}),
                      adopt=lambda obj: None)
    assert again.status["admittedAt"] == "2026-12-04T10:00:00Z"


def test_a_new_gang_does_not_show_the_prepare_jobs_admission():
    api = FakeApi({"bot-prepare": done()})
    outcome = reconcile(api, Settings(), body(status={"phase": "Preparing", "admittedAt": "2026-12-04T09:00:00Z"}),
                        adopt=lambda obj: None)
    assert outcome.reason == "Training" and outcome.status["admittedAt"] is None
