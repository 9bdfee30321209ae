"""Kueue on the one-node cluster (scripts/kueue.sh up): plain batch/v1 Jobs through the team-a queue.

One low-priority Job is admitted and its pod runs; a second does not fit the quota and waits with
Kueue's message naming the shortage; a high-priority one preempts the first (Kueue suspends it
again). The messages Kueue wrote are printed (run with -s), as kubetune would surface them.

The Jobs run the pause image the node already has (no registry here). Each asks for 60% of the CPU
the team-a/team-b cohort has, so one fits (borrowing from team-b) and two do not, whatever quotas
scripts/kueue.sh was given; skipped when that much CPU is not free on the node.

    KUBETUNE_E2E_KUBECONFIG=~/.cache/kubetune/cluster/kubeconfig \\
    KUBETUNE_E2E_BIN=$(bash scripts/controlplane.sh) .venv/bin/python -m pytest tests/e2e/test_kueue.py -m e2e -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

KUBECONFIG = os.environ.get("KUBETUNE_E2E_KUBECONFIG")
BIN = os.environ.get("KUBETUNE_E2E_BIN", "")  # folder with kubectl
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not KUBECONFIG, reason="set KUBETUNE_E2E_KUBECONFIG (scripts/e2e.sh)")]

PAUSE = "registry.k8s.io/pause:kubetune"  # imported into the node by scripts/cluster.sh
QUEUE = "team-a"


def kubectl(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": KUBECONFIG or "", "PATH": f"{BIN}:{os.environ['PATH']}" if BIN else os.environ["PATH"]}
    run = subprocess.run(["kubectl", *args], env=env, capture_output=True, text=True, input=input, timeout=60)
    if check and run.returncode:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({run.returncode}): {run.stderr[-2000:]}")
    return run


def get(*args: str) -> dict:
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


def log(message: str) -> None:
    print(f"[kueue {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def millicpu(quantity: str) -> int:
    return int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)


def nominal_cpu(cluster_queue: dict) -> int:
    return sum(millicpu(str(r["nominalQuota"])) for group in cluster_queue["spec"]["resourceGroups"]
               for flavor in group["flavors"] for r in flavor["resources"] if r["name"] == "cpu")


def free_cpu_on_node() -> int:
    node = get("nodes")["items"][0]
    used = sum(millicpu(c.get("resources", {}).get("requests", {}).get("cpu", "0"))
               for pod in get("pods", "-A", "--field-selector", "status.phase!=Succeeded,status.phase!=Failed")["items"]
               for c in pod["spec"]["containers"])
    return millicpu(node["status"]["allocatable"]["cpu"]) - used


@pytest.fixture(scope="module")
def namespace() -> str:
    """The namespace of LocalQueue team-a (scripts/kueue.sh up puts it where it is told)."""
    if kubectl("get", "crd", "clusterqueues.kueue.x-k8s.io", check=False).returncode:
        pytest.skip("Kueue is not installed: scripts/kueue.sh up")
    queues = [q for q in get("localqueues.kueue.x-k8s.io", "-A")["items"] if q["metadata"]["name"] == QUEUE]
    assert queues, "no LocalQueue team-a: scripts/kueue.sh up"
    return queues[0]["metadata"]["namespace"]


@pytest.fixture(scope="module")
def size() -> int:
    """60% of the cohort's CPU, in millicores: one such Job fits, two do not."""
    cohort = sum(nominal_cpu(get("clusterqueues.kueue.x-k8s.io", name)) for name in ("team-a", "team-b"))
    size = cohort * 6 // 10
    if size > free_cpu_on_node():
        pytest.skip(f"{size}m CPU is not free on the node for a Job at 60% of the cohort's {cohort}m")
    return size


def job(name: str, namespace: str, priority: str, cpu: int) -> str:
    return json.dumps({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"kueue.x-k8s.io/queue-name": QUEUE, "kueue.x-k8s.io/priority-class": priority}},
        "spec": {"suspend": True, "parallelism": 1, "completions": 1, "backoffLimit": 0,
                 "activeDeadlineSeconds": 600,  # pause never exits; the test deletes the Jobs anyway
                 "template": {"spec": {
                     "restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [{"name": "main", "image": PAUSE, "imagePullPolicy": "Never",
                                     "resources": {"requests": {"cpu": f"{cpu}m", "memory": "16Mi"}},
                                     "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}]}}}})


def workload(namespace: str, job_name: str) -> dict | None:
    """The Workload Kueue made for the Job (it owns it)."""
    for w in get("workloads.kueue.x-k8s.io", "-n", namespace)["items"]:
        if any(o["kind"] == "Job" and o["name"] == job_name for o in w["metadata"].get("ownerReferences", [])):
            return w
    return None


def condition(namespace: str, job_name: str, type_: str, status: str = "True") -> dict | None:
    w = workload(namespace, job_name)
    for c in (w or {}).get("status", {}).get("conditions", []):
        if c["type"] == type_ and c["status"] == status:
            return c
    return None


def suspended(namespace: str, job_name: str) -> bool:
    return get("job", job_name, "-n", namespace)["spec"].get("suspend", False)


def running_pod(namespace: str, job_name: str) -> str | None:
    for pod in get("pods", "-n", namespace, "-l", f"job-name={job_name}")["items"]:
        if pod["status"].get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp"):
            return pod["metadata"]["name"]
    return None


def test_admit_queue_preempt(namespace, size):
    suffix = uuid.uuid4().hex[:5]
    low, waiting, high = f"low-{suffix}", f"waiting-{suffix}", f"high-{suffix}"
    try:
        log(f"Jobs of {size}m CPU each in LocalQueue {namespace}/{QUEUE}")
        start = time.monotonic()
        kubectl("create", "-f", "-", input=job(low, namespace, "low", size))
        admitted = wait_for(lambda: condition(namespace, low, "Admitted"), 60, f"Job {low} admitted")
        wait_for(lambda: not suspended(namespace, low), 30, f"Job {low} unsuspended")
        pod = wait_for(lambda: running_pod(namespace, low), 60, f"a running pod of {low}")
        # blockAdmission: nothing else is admitted before this one's pods are all Ready.
        wait_for(lambda: condition(namespace, low, "PodsReady"), 60, f"Job {low} PodsReady")
        log(f"admitted in {time.monotonic() - start:.1f}s, pod {pod} running; "
            f"Admitted: {admitted['reason']}: {admitted['message']}")

        kubectl("create", "-f", "-", input=job(waiting, namespace, "low", size))
        pending = wait_for(lambda: condition(namespace, waiting, "QuotaReserved", "False"), 60,
                           f"Job {waiting} pending on quota")
        assert "insufficient" in pending["message"] and "cpu" in pending["message"], pending
        assert suspended(namespace, waiting)
        log(f"second Job waits; QuotaReserved=False {pending['reason']}: {pending['message']}")

        start = time.monotonic()
        kubectl("create", "-f", "-", input=job(high, namespace, "high", size))
        wait_for(lambda: suspended(namespace, low), 60, f"Kueue suspending the preempted Job {low}")
        evicted = wait_for(lambda: condition(namespace, low, "Evicted"), 30, f"Job {low} Evicted")
        preempted = condition(namespace, low, "Preempted")
        assert evicted["reason"] == "Preempted", evicted
        log(f"low Job suspended again in {time.monotonic() - start:.1f}s; "
            f"Evicted: {evicted['reason']}: {evicted['message']}")
        if preempted:
            log(f"Preempted: {preempted['reason']}: {preempted['message']}")
        wait_for(lambda: condition(namespace, high, "Admitted"), 60, f"Job {high} admitted")
        pod = wait_for(lambda: running_pod(namespace, high), 90, f"a running pod of {high}")
        log(f"high Job admitted in {time.monotonic() - start:.1f}s, pod {pod} running")
        assert suspended(namespace, waiting)
        still = condition(namespace, low, "QuotaReserved", "False")
        if still:
            log(f"preempted Job waits again; QuotaReserved=False {still['reason']}: {still['message']}")
    finally:
        for name in (low, waiting, high):
            kubectl("delete", "job", name, "-n", namespace, "--cascade=background",
                    "--ignore-not-found", "--wait=false", check=False)
        # Their Workloads go with them (garbage collection), releasing the quota for whoever is next;
        # right after scripts/kueue.sh up that takes up to 30s (the collector discovers the new CRDs).
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and any(workload(namespace, name) for name in (low, waiting, high)):
            time.sleep(1)
