"""Editing a job's spec once it exists: real `kubectl patch` against the real API server. The CRD's
transition rules reject fields the running job cannot honour and name them; suspend, maxRetries and
serve stay editable."""

import json

import pytest
import yaml

from k8s_helpers import ftj_doc, get, operator, start_training, wait_phase

pytestmark = pytest.mark.k8s

FROZEN = [
    ({"training": {"learningRate": 0.5}}, "spec.training"),
    ({"resources": {"nodes": 4}}, "spec.resources"),
    ({"dataset": {"train": "s3://data/other/"}}, "spec.dataset"),
    ({"model": {"fromConfig": None, "source": "hf://org/other"}}, "spec.model"),
    ({"output": {"uri": "s3://models/elsewhere/"}}, "spec.output"),
    ({"evaluation": {"samples": 3}}, "spec.evaluation"),  # absent before: adding it is a change too
    ({"storage": None}, "spec.storage"),  # and so is removing it
]


def patch(cp, namespace: str, name: str, spec: dict):
    return cp.kubectl("patch", "ftj", name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": spec}),
                      check=False)


def test_running_job_rejects_spec_edits_naming_the_field(control_plane, namespace):
    cp = control_plane
    with operator(cp, namespace):
        start_training(cp, namespace, ftj_doc("frozen"))
        wait_phase(cp, namespace, "frozen", "Training")
        before = get(cp, namespace, "ftj", "frozen")["spec"]

        for change, field in FROZEN:
            run = patch(cp, namespace, "frozen", change)
            assert run.returncode != 0, f"{change} was accepted"
            assert f"{field}: Forbidden: {field.split('.')[1]} cannot change once the job exists" in run.stderr, run.stderr
        assert get(cp, namespace, "ftj", "frozen")["spec"] == before
        job_file = yaml.safe_load(get(cp, namespace, "configmap", "frozen-job")["data"]["job.yaml"])
        assert job_file["spec"]["training"]["learningRate"] != 0.5

        # What the operator reads at every reconcile may change.
        assert patch(cp, namespace, "frozen", {"suspend": True}).returncode == 0
        wait_phase(cp, namespace, "frozen", "Suspended")
        assert patch(cp, namespace, "frozen", {"suspend": False}).returncode == 0
        wait_phase(cp, namespace, "frozen", "Training")
        assert patch(cp, namespace, "frozen", {"maxRetries": 5}).returncode == 0
        assert patch(cp, namespace, "frozen", {"serve": {"enabled": True, "replicas": 2}}).returncode == 0
        assert get(cp, namespace, "ftj", "frozen")["spec"]["serve"] == {"enabled": True, "replicas": 2}
        # serve stays editable once on: the endpoint follows it (tests/test_k8s_operator.py serves one).
        assert patch(cp, namespace, "frozen", {"serve": {"replicas": 3}}).returncode == 0

        # A whole edited file gets the same answer from `kubectl apply`.
        doc = ftj_doc("frozen")
        doc["spec"]["training"] = {"epochs": 9}
        run = cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False)
        assert run.returncode != 0 and "spec.training: Forbidden" in run.stderr, run.stderr
