"""Helpers for tests against the real API server: the operator as a subprocess, waiting, and
writing Job status the way the job controller would (no controller runs here)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time

from conftest import job_doc


def ftj_doc(name: str, **spec) -> dict:
    defaults = {"storage": {"credentialsSecret": "s3-creds"}, "resources": {"nodes": 2, "gpusPerNode": 0, "cpu": "1"}}
    doc = job_doc("s3://data/raw/", f"s3://models/{name}/", **{**defaults, **spec})
    doc["metadata"] = {"name": name}
    return doc


def schedule_doc(name: str, **spec) -> dict:
    template = ftj_doc(name)["spec"]
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneSchedule", "metadata": {"name": name},
            "spec": {"jobTemplate": template, **spec}}


def apply(cp, namespace: str, doc: dict, kubeconfig=None) -> None:
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc), kubeconfig=kubeconfig)


def get(cp, namespace: str, kind: str, name: str) -> dict | None:
    run = cp.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(run.stdout) if run.returncode == 0 else None


def items(cp, namespace: str, kind: str, selector: str | None = None) -> list[dict]:
    args = ["get", kind, "-n", namespace, "-o", "json"] + (["-l", selector] if selector else [])
    return json.loads(cp.kubectl(*args).stdout)["items"]


def wait_for(check, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def phase(cp, namespace: str, name: str) -> str | None:
    body = get(cp, namespace, "ftj", name)
    return ((body or {}).get("status") or {}).get("phase")


def wait_phase(cp, namespace: str, name: str, expected: str, timeout: float = 60) -> dict:
    wait_for(lambda: phase(cp, namespace, name) == expected, timeout, f"{name} to reach {expected} "
             f"(now {phase(cp, namespace, name)})")
    return get(cp, namespace, "ftj", name)


def finish_job(cp, namespace: str, name: str, succeeded: bool = True) -> None:
    """Mark a Job finished as the job controller does (status subresource, valid transitions)."""
    job = get(cp, namespace, "job", name)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    n = job["spec"].get("completions") or 1
    if succeeded:
        reason, kinds = "CompletionsReached", ("SuccessCriteriaMet", "Complete")
        counts = {"succeeded": n, "completionTime": now}
        if job["spec"].get("completionMode") == "Indexed":
            counts["completedIndexes"] = "0" if n == 1 else f"0-{n - 1}"
    else:
        reason, kinds = "BackoffLimitExceeded", ("FailureTarget", "Failed")
        counts = {"failed": 1}
    conditions = [{"type": k, "status": "True", "reason": reason, "message": f"{reason} (test)",
                   "lastTransitionTime": now, "lastProbeTime": now} for k in kinds]
    status = {"status": {"startTime": now, "conditions": conditions, **counts}}
    cp.kubectl("patch", "job", name, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(status))


def fail_pod(cp, namespace: str, job: str, exit_code: int, message: str) -> None:
    """A pod of ``job`` whose container ended with ``exit_code`` and termination ``message``, as the kubelet
    records it (no kubelet runs here: the pod is created, then its status written)."""
    name = f"{job}-0-x"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {
        "batch.kubernetes.io/job-name": job}}, "spec": {"containers": [{"name": "trainer", "image": "trainer"}]}}
    apply(cp, namespace, {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}})  # no SA controller
    apply(cp, namespace, pod)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    state = {"terminated": {"exitCode": exit_code, "reason": "Error", "message": message, "startedAt": now,
                            "finishedAt": now}}
    status = {"status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "image": "trainer", "imageID": "",
                                                                   "ready": False, "restartCount": 0, "state": state}]}}
    cp.kubectl("patch", "pod", name, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(status))


def start_training(cp, namespace: str, doc: dict) -> dict:
    """Apply a job, let its prepare Job succeed and wait for its first training gang (returned)."""
    name = doc["metadata"]["name"]
    apply(cp, namespace, doc)
    wait_for(lambda: get(cp, namespace, "job", f"{name}-prepare"), what=f"{name}-prepare")
    finish_job(cp, namespace, f"{name}-prepare")
    return wait_for(lambda: get(cp, namespace, "job", f"{name}-train-0"), what=f"{name}-train-0")


def finish_run(cp, namespace: str, run: str, passed: bool, value: float = 1.2) -> None:
    """Prepare and train a run: its pods' verdict in its status, then its Jobs complete."""
    wait_for(lambda: get(cp, namespace, "job", f"{run}-prepare"), what=f"{run}-prepare")
    finish_job(cp, namespace, f"{run}-prepare")
    wait_for(lambda: get(cp, namespace, "job", f"{run}-train-0"), what=f"{run}-train-0")
    relation = "<" if passed else ">"
    verdict = {"passed": passed, "metric": "valid_loss", "value": value, "threshold": 1.5,
               "message": f"valid_loss {value:.4f} (fine-tuned) {relation} 1.5000 (base): "
                          + ("better than the base model" if passed else "not better than the base model")}
    cp.kubectl("patch", "ftj", run, "-n", namespace, "--subresource=status", "--type=merge",
               "-p", json.dumps({"status": {"evaluation": verdict}}))
    finish_job(cp, namespace, f"{run}-train-0")


@contextlib.contextmanager
def operator(cp, namespace: str | None, kubeconfig=None, peering: str = "", metrics_port: int = 0):
    """The operator as its own process, as in a pod: `kubetune-operator`."""
    args = [sys.executable, "-m", "kubetune.operator.main", "--metrics-port", str(metrics_port), "--liveness", "",
            "--peering", peering]
    if namespace:
        args += ["--namespace", namespace]
    env = {**cp.env(kubeconfig), "KUBETUNE_TRAINER_IMAGE": "kubetune-trainer:test"}
    log = open(cp.dir / f"operator-{namespace or 'all'}-{time.monotonic_ns()}.log", "w+")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log.name
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def operator_log(proc) -> str:
    with open(proc.log_path) as f:
        return f.read()
