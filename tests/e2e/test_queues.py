"""A shared cluster for real: FineTuneJobs queued by Kueue itself (built from its Go module and started by
scripts/e2e.sh with scripts/kueue.sh), as two teams meet it.

hack/kueue/queues.yaml: ClusterQueues team-a and team-b in one cohort, LocalQueues team-a in TEAM_A and team-b in
TEAM_B; team-a's quota holds one of these jobs' pods at a time and lends what it does not use, team-b's is smaller
than a training pod, so a team-b job runs only on quota borrowed from team-a. WorkloadPriorityClasses low and high.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import threading
import time

import pytest

from e2e_cluster import (KUBECONFIG, bucket, create_credentials, env, get_json, job_pods, kubectl, last_step, log,
                         log_from_step, small_job, wait_for)
from e2e_cluster import namespace, operator_release, s3  # noqa: F401  (the session's fixtures)
from conftest import EXAMPLES

TEAM_A, TEAM_B = "e2e-team-a", "e2e-team-b"  # scripts/e2e.sh: scripts/kueue.sh up e2e-team-a e2e-team-b
DATA = "s3://kubetune/queues/data/"  # outputs go elsewhere: a prefix is read whole
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not KUBECONFIG, reason="set KUBETUNE_E2E_KUBECONFIG (scripts/e2e.sh)")]


@pytest.fixture(scope="module")
def kueue(s3, operator_release):  # noqa: F811
    """Kueue is running and both teams' namespaces are ready; the cluster's CPU is left to the queued jobs."""
    if kubectl("get", "crd", "workloads.kueue.x-k8s.io", check=False).returncode:
        missing = "Kueue is not installed (scripts/kueue.sh up e2e-team-a e2e-team-b, or its release manifests)"
        pytest.fail(missing) if os.environ.get("KUBETUNE_E2E_KUEUE") else pytest.skip(missing)
    for ns in (TEAM_A, TEAM_B):
        kubectl("label", "--overwrite", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
        create_credentials(ns)
    kubectl("delete", "ftj", "--all", "--all-namespaces", "--timeout=180s")  # earlier tests' endpoints hold CPU
    client = bucket(s3)
    client.put_object(Bucket="kubetune", Key="queues/data/chats.jsonl",
                      Body=(EXAMPLES / "data" / "support-chat.jsonl").read_bytes())


def queued_job(s3_url: str, name: str, team: str, priority: str | None = None, **training) -> dict:
    """A one-pod CPU job in a team's LocalQueue: training pod 900m, prepare pod 600m (team-a's 1 CPU fits one)."""
    doc = small_job(s3_url, name, DATA, checkpointEvery=1000, evalEvery=1000, **training)
    doc["spec"]["queue"] = {"name": team, **({"priorityClass": priority} if priority else {})}
    doc["spec"]["resources"]["prepare"] = {"cpu": "600m", "memory": "1Gi"}
    doc["spec"]["output"]["uri"] = f"s3://kubetune/queues/out/{name}/"  # not under DATA
    return doc


def status_of(ns: str, name: str) -> dict:
    return get_json("ftj", name, "-n", ns).get("status") or {}


def finished(ns: str, name: str) -> dict | None:
    st = status_of(ns, name)
    return st if st.get("phase") in ("Succeeded", "Failed") else None


def borrowed_cpu(queue: str) -> float:
    """The CPU a ClusterQueue borrows from its cohort now (Kueue's own status)."""
    st = get_json("clusterqueue", queue).get("status") or {}
    return sum(_cpu(r.get("borrowed", "0")) for f in st.get("flavorsReservation") or [] for r in f.get("resources") or []
               if r.get("name") == "cpu")


def admissions(ns: str, names: list[str]) -> list[tuple[str, str, str]]:
    """(admitted, finished, Job) of the Workloads of jobs ``names`` in ns, in admission order (Kueue's conditions)."""
    out = []
    for w in get_json("workloads.kueue.x-k8s.io", "-n", ns)["items"]:
        at = {c["type"]: c["lastTransitionTime"] for c in w["status"].get("conditions", []) if c["status"] == "True"}
        job = next(o["name"] for o in w["metadata"]["ownerReferences"] if o["kind"] == "Job")
        if job.rsplit("-prepare", 1)[0].rsplit("-train-", 1)[0] in names:
            out.append((at.get("Admitted", ""), at.get("Finished", ""), job))
    return sorted(out)


class JobLogs:
    """The log of every pod a Job runs, followed from its start: Kueue suspending the Job deletes its pods."""

    def __init__(self, ns: str, job: str):
        self.ns, self.job, self.follows, self.texts, self.done = ns, job, {}, {}, threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        while not self.done.wait(0.5):
            for pod in job_pods(self.ns, self.job):
                name, state = pod["metadata"]["name"], (pod["status"].get("containerStatuses") or [{}])[0].get("state", {})
                if name not in self.follows and ("running" in state or "terminated" in state):
                    self.follows[name] = (pod["metadata"]["creationTimestamp"], subprocess.Popen(
                        ["kubectl", "logs", "-f", "-n", self.ns, name], env=env(), text=True, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT))  # ends when its container does

    def ended(self, pod: str) -> str:
        """The whole log of ``pod`` (followed), once its container has ended."""
        if pod not in self.texts:
            self.texts[pod] = self.follows[pod][1].communicate(timeout=300)[0]
        return self.texts[pod]

    def stop(self) -> list[str]:
        """Each pod's log, in the order the pods were made."""
        self.done.set()
        self.thread.join()
        return [self.ended(pod) for pod in sorted(self.follows, key=lambda pod: self.follows[pod][0])]


def steps_redone(logs: list[str]) -> list[int]:
    """For each resume in these logs (one per admission, in order): how many steps it trains again, i.e. how far
    its checkpoint is behind the step the admission before it stopped at."""
    at, redone = 0, []
    for text in logs:
        redone += [at - int(m) for m in re.findall(r"resuming from the complete checkpoint at step (\d+)", text)]
        at = next((int(m) for m in re.findall(r"stopped by SIGTERM after step (\d+)", text)[-1:]), at)
    return redone


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def final_losses(s3_url: str, name: str) -> dict:
    body = bucket(s3_url).get_object(Bucket="kubetune", Key=f"queues/out/{name}/metrics.csv")["Body"].read().decode()
    last = list(csv.DictReader(io.StringIO(body)))[-1]
    return {k: float(last[k]) for k in ("step", "train_loss", "valid_loss") if last.get(k)}


def watch(names: list[tuple[str, str]], seconds: float, done) -> dict:
    """Poll the jobs (ns, name) until done(); per job, every (reason, message) seen."""
    seen, deadline = {n: [] for _, n in names}, time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, f"timed out after {seconds:.0f}s: {seen}"
        for ns, name in names:
            st = status_of(ns, name)
            if st.get("reason") and (st["reason"], st.get("message")) not in seen[name]:
                seen[name].append((st["reason"], st.get("message")))
            assert st.get("phase") != "Failed", (name, st.get("message"))
        time.sleep(1)
    return seen


def test_three_jobs_queue_in_order_a_team_borrows_and_a_high_priority_job_preempts(s3, kueue):  # noqa: F811
    # 1. Three jobs at once into team-a, whose quota fits one pod: one after another, in the order submitted;
    # the waiting ones say what Kueue says.
    started = time.monotonic()
    names = ["first", "second", "third"]
    for i, name in enumerate(names):
        steps = 40 if name == "first" else 10  # "first" is also the uninterrupted run the preempted one must match
        kubectl("apply", "-n", TEAM_A, "-f", "-", input=json.dumps(queued_job(s3, name, "team-a", "low", maxSteps=steps)))
        time.sleep(1.5)  # Kueue orders equal priorities by creation time (1 s resolution)
    watched = watch([(TEAM_A, n) for n in names], 900, lambda: all(finished(TEAM_A, n) for n in names))
    statuses = {n: finished(TEAM_A, n) for n in names}
    assert all(s["phase"] == "Succeeded" for s in statuses.values()), statuses
    runs = admissions(TEAM_A, names)  # never two Jobs of team-a admitted at once: each after the one before finished
    assert all(later[0] >= earlier[1] for earlier, later in zip(runs, runs[1:])), runs
    gangs = [job for _, _, job in runs if "-train-" in job]
    assert gangs == [f"{n}-train-0" for n in names], runs  # the training gangs in the order submitted
    for name in names[1:]:
        queued = [m for r, m in watched[name] if r == "Queued"]
        assert any("insufficient unused quota for cpu" in m for m in queued), watched[name]
    log(f"three jobs in team-a, one Job at a time, gangs in order, {time.monotonic() - started:.0f}s; waiting said: "
        f"{next(m for r, m in watched['third'] if r == 'Queued' and 'insufficient' in m)}")

    # 2. A team-b job larger than team-b's quota runs on quota borrowed from idle team-a.
    kubectl("apply", "-n", TEAM_B, "-f", "-", input=json.dumps(queued_job(s3, "borrower", "team-b", maxSteps=10)))
    borrowed = wait_for(lambda: borrowed_cpu("team-b"), 600, "team-b to borrow CPU", interval=0.5)
    assert wait_for(lambda: finished(TEAM_B, "borrower"), 600, "borrower to finish")["phase"] == "Succeeded"
    log(f"borrower (team-b) ran on {borrowed:g} CPU borrowed from team-a")

    # 3. A high-priority job preempts a running low-priority gang: the victim checkpoints on SIGTERM, waits, is
    # admitted again, resumes where it stopped with no step redone and no retry used, and ends like "first".
    victim_logs = JobLogs(TEAM_A, "victim-train-0")
    kubectl("apply", "-n", TEAM_A, "-f", "-", input=json.dumps(queued_job(s3, "victim", "team-a", "low", maxSteps=40)))
    pod = wait_for(lambda: (lambda p: p[0]["metadata"]["name"] if p else None)(job_pods(TEAM_A, "victim-train-0")),
                   600, "the victim's training pod")
    wait_for(lambda: log_from_step(TEAM_A, pod, 10), 600, "victim at step 10", interval=0.5)
    preempted_at = time.monotonic()
    kubectl("apply", "-n", TEAM_A, "-f", "-", input=json.dumps(queued_job(s3, "urgent", "team-a", "high", maxSteps=10)))
    wait_for(lambda: pod in victim_logs.follows, 60, "the victim's log followed")
    stopped = re.search(r"stopped by SIGTERM after step (\d+)", victim_logs.ended(pod))
    assert stopped, victim_logs.ended(pod)[-3000:]
    stopped = int(stopped.group(1))
    preempted = wait_for(lambda: (lambda s: s if s.get("reason") == "Preempted" else None)(status_of(TEAM_A, "victim")),
                         300, "the victim to say it was preempted")
    assert "preempted by Kueue (Preempted:" in preempted["message"] and f"{stopped} steps kept" in preempted["message"]
    events = get_json("events", "-n", TEAM_A, "--field-selector", "involvedObject.name=victim")["items"]
    assert any(e["reason"] == "Preempted" and "steps kept" in e["message"] for e in events), events
    watch([(TEAM_A, "urgent"), (TEAM_A, "victim")], 900, lambda: finished(TEAM_A, "urgent"))
    assert finished(TEAM_A, "urgent")["phase"] == "Succeeded"
    victim = wait_for(lambda: finished(TEAM_A, "victim"), 900, "the victim to finish")
    waited = time.monotonic() - preempted_at
    assert victim["phase"] == "Succeeded" and not victim.get("retries") and victim["trainingJob"] == "victim-train-0"
    # Kueue may admit the victim again between urgent's two Jobs (prepare, then the training gang) and preempt it
    # once more: every admission must resume where the one before it stopped.
    logs = victim_logs.stop()
    redone = steps_redone(logs)
    assert redone and not any(redone), (redone, [[line[-160:] for line in text.splitlines() if re.search(
        r"resuming|stopped|\[train\]|error", line)] + [f"last step {last_step(text)}"] for text in logs])
    ours, reference = final_losses(s3, "victim"), final_losses(s3, "first")
    assert ours["step"] == reference["step"] == 40
    assert ours["train_loss"] == pytest.approx(reference["train_loss"], abs=1e-6), (ours, reference)
    assert ours["valid_loss"] == pytest.approx(reference["valid_loss"], abs=1e-6), (ours, reference)
    log(f"victim preempted at step {stopped} ({preempted['message']}); urgent ran; the victim was admitted "
        f"{len(redone)} more time(s), each resuming where it stopped ({sum(redone)} steps redone), 0 retries, "
        f"{waited:.0f}s from preemption to the end; final losses {ours} = uninterrupted {reference}")
