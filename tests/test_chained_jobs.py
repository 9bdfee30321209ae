"""model.fromJob against the real API server: a job waiting on another starts (or fails) as soon as
that one finishes, without an edit or an operator restart."""

import pytest
import yaml

from k8s_helpers import apply, finish_job, ftj_doc, get, operator, operator_log, wait_for, wait_phase

pytestmark = pytest.mark.k8s


def status(cp, namespace: str, name: str) -> dict:
    return (get(cp, namespace, "ftj", name) or {}).get("status") or {}


def succeed(cp, namespace: str, name: str) -> None:
    """Drive a job through Preparing and Training to Succeeded, writing its Jobs' status."""
    wait_for(lambda: get(cp, namespace, "job", f"{name}-prepare"), what=f"{name}-prepare")
    finish_job(cp, namespace, f"{name}-prepare")
    wait_for(lambda: get(cp, namespace, "job", f"{name}-train-0"), what=f"{name}-train-0")
    finish_job(cp, namespace, f"{name}-train-0")
    wait_phase(cp, namespace, name, "Succeeded")


def test_waiting_job_starts_when_its_base_succeeds(control_plane, namespace):
    cp = control_plane
    with operator(cp, namespace) as op:
        apply(cp, namespace, ftj_doc("base"))
        wait_for(lambda: get(cp, namespace, "job", "base-prepare"), what="base-prepare")
        apply(cp, namespace, ftj_doc("chained", model={"fromJob": "base"}))
        wait_phase(cp, namespace, "chained", "Pending")
        assert "model.fromJob 'base' has not succeeded yet" in status(cp, namespace, "chained")["message"]

        succeed(cp, namespace, "base")
        # Nothing about 'chained' itself changes: only base finishing can start it.
        wait_for(lambda: get(cp, namespace, "job", "chained-prepare"), timeout=20, what="chained-prepare after base succeeded")
        assert wait_phase(cp, namespace, "chained", "Preparing")["status"]["baseModel"] == "s3://models/base/model"
        job_file = yaml.safe_load(get(cp, namespace, "configmap", "chained-job")["data"]["job.yaml"])
        assert job_file["spec"]["model"] == {"source": "s3://models/base/model"}

        # Once started, the job no longer depends on the base object existing.
        cp.kubectl("delete", "ftj", "base", "-n", namespace)
        finish_job(cp, namespace, "chained-prepare")
        wait_for(lambda: get(cp, namespace, "job", "chained-train-0"), what="chained training")
        assert wait_phase(cp, namespace, "chained", "Training")
        assert "Traceback" not in operator_log(op)


def test_base_that_fails_or_does_not_exist(control_plane, namespace):
    cp = control_plane
    with operator(cp, namespace):
        apply(cp, namespace, ftj_doc("later", model={"fromJob": "missing"}))
        wait_for(lambda: "does not exist" in status(cp, namespace, "later").get("message", ""), what="'does not exist'")
        assert status(cp, namespace, "later")["phase"] == "Pending"
        assert f"model.fromJob 'missing' does not exist in namespace '{namespace}'" in status(cp, namespace, "later")["message"]

        apply(cp, namespace, ftj_doc("doomed"))
        apply(cp, namespace, ftj_doc("heir", model={"fromJob": "doomed"}))
        wait_phase(cp, namespace, "heir", "Pending")
        wait_for(lambda: get(cp, namespace, "job", "doomed-prepare"), what="doomed-prepare")
        finish_job(cp, namespace, "doomed-prepare", succeeded=False)
        wait_phase(cp, namespace, "doomed", "Failed")
        # A failed job stays failed: the waiting one fails too, with the base's reason, instead of waiting forever.
        body = wait_phase(cp, namespace, "heir", "Failed", timeout=20)
        assert body["status"]["reason"] == "BaseJobFailed"
        assert "model.fromJob 'doomed' failed: BackoffLimitExceeded" in body["status"]["message"]
        assert get(cp, namespace, "job", "heir-prepare") is None

        # The missing base appears later and succeeds: the job that waited for it starts.
        apply(cp, namespace, ftj_doc("missing"))
        succeed(cp, namespace, "missing")
        wait_for(lambda: get(cp, namespace, "job", "later-prepare"), timeout=20, what="later-prepare")


def test_jobs_naming_each_other_fail_instead_of_waiting_forever(control_plane, namespace):
    cp = control_plane
    with operator(cp, namespace) as op:
        apply(cp, namespace, ftj_doc("hen", model={"fromJob": "egg"}))
        wait_phase(cp, namespace, "hen", "Pending")  # egg does not exist yet: hen waits for it
        apply(cp, namespace, ftj_doc("egg", model={"fromJob": "hen"}))
        for name in ("hen", "egg"):
            s = wait_phase(cp, namespace, name, "Failed")["status"]
            assert s["reason"] in ("InvalidSpec", "BaseJobFailed"), s
        assert "model.fromJob forms a cycle: " in status(cp, namespace, "egg")["message"] + status(cp, namespace, "hen")["message"]
        assert get(cp, namespace, "job", "hen-prepare") is None and get(cp, namespace, "job", "egg-prepare") is None
        assert "Failed (InvalidSpec) model.fromJob forms a cycle" in operator_log(op)  # the operator logs what it does
