"""``reconcile`` step by step, table-driven, against an in-memory stand-in for the API.

The real API server runs in tests/test_k8s_*.py; here every phase transition is one row, fast enough
to cover the corners (a kill between two steps is just a starting state).
"""

from __future__ import annotations

import copy

import pytest

from k8s_helpers import ftj_doc
from kubetune.operator.kube import Rejected
from kubetune.operator.reconcile import reconcile
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
        return []


def done(kind="Complete", suspend=False):
    return {"spec": {"suspend": suspend}, "status": {"conditions": [{"type": kind, "status": "True", "message": "m"}]}}


RUNNING = {"spec": {}, "status": {}}
QUEUED = {"spec": {"suspend": True}, "status": {}}


def body(name="bot", status=None, generation=1, **spec):
    doc = ftj_doc(name, **spec)
    doc["metadata"].update(namespace=NS, generation=generation)
    doc["status"] = status or {}
    return doc


TRAINING = {"phase": "Training", "prepared": True, "trainingJob": "bot-train-0"}
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
