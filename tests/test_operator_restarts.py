"""Operator restarts under load, against the real API server: jobs of every kind are driven to their end
while the operator is SIGKILLed at random moments, half of them right after it created a child Job
(and the API server + etcd restarted). Every job must end as designed, with no child created twice
and none left without its FineTuneJob.

``run_chaos`` is the scenario; benchmarks/bench_operator_restarts.py runs it at 50 jobs / 10 kills,
the first test below at a size that fits the default suite. Random kills hit the few-millisecond
windows between acting and recording only now and then; the last two tests hit them every time.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from k8s_helpers import apply, finish_job, ftj_doc, get, items, operator, wait_for, wait_phase

pytestmark = pytest.mark.k8s

GROUP, VERSION, PLURAL = "kubetune.dev", "v1alpha1", "finetunejobs"
MANAGED = "app.kubernetes.io/managed-by=kubetune-operator"


@dataclass
class Plan:
    """What the driver does with one job, and how it must end."""
    name: str
    kind: str  # succeed | serve | fail | prepfail | suspend | chained | delete
    max_retries: int = 3
    base: str | None = None
    suspended: bool = False
    resumed: bool = False
    deleted: bool = False

    def doc(self) -> dict:
        spec = {"maxRetries": self.max_retries}
        if self.kind == "serve":
            spec["serve"] = {"enabled": True}
        if self.base:
            spec["model"] = {"fromJob": self.base}
        return ftj_doc(self.name, **spec)

    def expected(self) -> tuple[str, str] | None:
        """(phase, reason) it must end in; None: it must be gone, with its children."""
        return {"fail": ("Failed", "TrainingFailed"), "prepfail": ("Failed", "PreparationFailed"),
                "serve": ("Succeeded", "Serving"), "delete": None}.get(self.kind, ("Succeeded", "Succeeded"))

    def expected_jobs(self) -> dict[str, int]:
        """How many times each child Job may be created."""
        if self.kind == "prepfail":
            return {f"{self.name}-prepare": 1}
        attempts = self.max_retries + 1 if self.kind == "fail" else 1
        out = {f"{self.name}-prepare": 1, **{f"{self.name}-train-{a}": 1 for a in range(attempts)}}
        if self.kind == "suspend":
            out[f"{self.name}-train-0"] = 2  # deleted by the suspension, created again on resume
        return out


def plans(n: int, rng: random.Random) -> list[Plan]:
    """A mix: most succeed; some fail training until maxRetries; some fail preparing; some are
    suspended and resumed; a few start from another job (fromJob), serve, or are deleted midway."""
    kinds = (["fail"] * max(1, n * 3 // 20) + ["suspend"] * max(1, n // 8) + ["chained"] * max(1, n // 20)
             + ["prepfail", "serve", "delete"] * max(1, n // 25))
    kinds = (kinds + ["succeed"] * n)[:n]
    rng.shuffle(kinds)
    out = [Plan(f"job-{i:03d}", kind, max_retries=rng.choice([1, 2]) if kind == "fail" else 3)
           for i, kind in enumerate(kinds)]
    bases = [p.name for p in out if p.kind == "succeed"]
    for p in out:
        if p.kind == "chained":
            p.base = rng.choice(bases)
    return out


class JobRecorder:
    """Watches the namespace's Jobs (list, then watch from that resourceVersion, resumed after API
    outages) and records every creation: a name created twice, or two training Jobs of one
    FineTuneJob at once, is a duplicate. When ``armed``, the next Job created kills the operator
    (``proc``) at once: between creating a child and writing down that it did, where an operator
    that does not record before it acts loses track."""

    def __init__(self, api_client, namespace: str):
        from kubernetes import client

        self.batch, self.namespace = client.BatchV1Api(api_client), namespace
        self.created: dict[str, set[str]] = defaultdict(set)  # name -> uids
        self.alive: dict[str, tuple[str, str]] = {}  # uid -> (owner, name)
        self.overlaps: list[str] = []
        self.armed, self.proc = 0, None  # SIGKILL proc on the next (armed) creations
        self.kills, self.killed = 0, None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _added(self, job, fresh: bool = False) -> None:
        uid, name = job.metadata.uid, job.metadata.name
        if uid in self.alive or uid in self.created[name]:
            return
        if fresh and self.armed and self.proc is not self.killed:  # (once per process: events come in bursts)
            self.armed -= 1
            self.killed = self.proc
            self.proc.send_signal(signal.SIGKILL)
            self.kills += 1
        owner = (job.metadata.labels or {}).get("kubetune.dev/job", "")
        if "-train-" in name and any(o == owner and "-train-" in n for o, n in self.alive.values()):
            self.overlaps.append(f"{name} created while another training Job of {owner} exists")
        self.created[name].add(uid)
        self.alive[uid] = (owner, name)

    def _run(self) -> None:
        from kubernetes import watch

        version = None
        while not self.stop.is_set():
            try:
                if version is None:  # (re)list: what exists now is all that is alive
                    listed = self.batch.list_namespaced_job(self.namespace, label_selector=MANAGED, _request_timeout=10)
                    uids = {j.metadata.uid for j in listed.items}
                    self.alive = {u: v for u, v in self.alive.items() if u in uids}
                    for job in listed.items:
                        self._added(job)
                    version = listed.metadata.resource_version
                for event in watch.Watch().stream(self.batch.list_namespaced_job, self.namespace,
                                                  label_selector=MANAGED, resource_version=version,
                                                  timeout_seconds=5, _request_timeout=10):
                    job = event["object"]
                    version = job.metadata.resource_version
                    if event["type"] == "ADDED":
                        self._added(job, fresh=True)
                    elif event["type"] == "DELETED":
                        self.alive.pop(job.metadata.uid, None)
            except Exception as e:  # the API server is away, or the version expired (410): list again
                if "410" in str(e) or "Expired" in str(e):
                    version = None
                time.sleep(0.5)


@dataclass
class Result:
    jobs: int
    kills: int = 0
    targeted_kills: int = 0  # of which right after the operator created a child Job
    api_restarts: int = 0
    correct: int = 0
    duplicates: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    tracebacks: int = 0
    seconds: float = 0.0


def patch_job_status(batch, namespace: str, job, succeeded: bool) -> None:
    """What tests/k8s_helpers.finish_job writes, through the client (kubectl per Job is too slow here)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    n = job.spec.completions or 1
    if succeeded:
        reason, kinds, counts = "CompletionsReached", ("SuccessCriteriaMet", "Complete"), {"succeeded": n, "completionTime": now}
        if job.spec.completion_mode == "Indexed":
            counts["completedIndexes"] = "0" if n == 1 else f"0-{n - 1}"
    else:
        reason, kinds, counts = "BackoffLimitExceeded", ("FailureTarget", "Failed"), {"failed": 1}
    conditions = [{"type": k, "status": "True", "reason": reason, "message": f"{reason} (test)",
                   "lastTransitionTime": now, "lastProbeTime": now} for k in kinds]
    batch.patch_namespaced_job_status(job.metadata.name, namespace,
                                      {"status": {"startTime": now, "conditions": conditions, **counts}},
                                      _request_timeout=10)


def _finished(job) -> bool:
    return any(c.status == "True" and c.type in ("Complete", "Failed") for c in (job.status.conditions or []))


def _ended(plan: Plan, body: dict | None) -> bool:
    if plan.expected() is None:
        return plan.deleted and body is None
    status = (body or {}).get("status") or {}
    return status.get("phase") in ("Succeeded", "Failed") and (plan.kind != "serve" or bool(status.get("endpoint"))
                                                               or status.get("phase") == "Failed")


def _drive(plan: Plan, job, body: dict, api, namespace: str, rng: random.Random) -> None:
    """One step for one unfinished child Job of ``plan``, at a random moment."""
    custom, batch = api
    if rng.random() < 0.5:  # not now: spreads the steps over the operator's kills
        return
    if plan.kind == "delete" and "-train-" in job.metadata.name:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, plan.name, _request_timeout=10)
        plan.deleted = True
    elif plan.kind == "suspend" and "-train-" in job.metadata.name and not plan.resumed:
        if not plan.suspended:
            custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, plan.name,
                                                  {"spec": {"suspend": True}}, _request_timeout=10)
            plan.suspended = True
    else:
        succeeded = not (plan.kind == "fail" and "-train-" in job.metadata.name
                         or plan.kind == "prepfail" and job.metadata.name.endswith("-prepare"))
        patch_job_status(batch, namespace, job, succeeded)


def run_chaos(cp, namespace: str, n_jobs: int, kills: int, api_restarts: int, seed: int = 0,
              window: float | None = None, timeout: float = 600, targeted: int | None = None) -> Result:
    """Create ``n_jobs`` FineTuneJobs over the first part of ``window`` seconds, drive their Jobs to the
    end, SIGKILL (and restart) the operator ``kills`` times and restart the API server + etcd
    ``api_restarts`` times at random moments in the window, then check how every job ended.
    ``targeted`` of the kills (default half) come at the first child Job created after a random moment."""
    from kubernetes import client, config

    rng = random.Random(seed)
    window = window or 4.0 * max(kills, 1)
    targeted = kills // 2 if targeted is None else targeted
    api_client = config.new_client_from_config(str(cp.kubeconfig))
    custom, batch = client.CustomObjectsApi(api_client), client.BatchV1Api(api_client)
    todo = plans(n_jobs, rng)
    by_name = {p.name: p for p in todo}
    result = Result(jobs=n_jobs)
    # The moments, on one timeline: creations over the first 60 %, kills and API restarts anywhere.
    events = sorted([(rng.uniform(0, 0.6 * window), "create", p) for p in todo]
                    + [(rng.uniform(1, window), "kill", None) for _ in range(kills - targeted)]
                    + [(rng.uniform(1, window), "arm", None) for _ in range(targeted)]
                    + [(rng.uniform(0.3 * window, 0.7 * window), "api", None) for _ in range(api_restarts)],
                    key=lambda e: e[0])
    logs: list[str] = []
    armed_at = 0.0
    start = time.monotonic()
    recorder = JobRecorder(api_client, namespace)

    def restarted(old: contextlib.ExitStack | None):
        """A new operator process after the last one was killed, as its Deployment would start one."""
        if old is not None:
            old.close()
            result.kills += 1
        stack = contextlib.ExitStack()
        recorder.proc = stack.enter_context(operator(cp, namespace))
        logs.append(recorder.proc.log_path)
        return stack, recorder.proc

    stack, op = restarted(None)
    try:
        while time.monotonic() - start < timeout:
            now = time.monotonic() - start
            while events and events[0][0] <= now:
                _, what, plan = events.pop(0)
                if what == "create":
                    try:
                        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, plan.doc(),
                                                               _request_timeout=10)
                    except Exception:  # the API server is restarting: try again on the next round
                        events.insert(0, (now + 0.5, what, plan))
                        break
                elif what == "kill":
                    op.send_signal(signal.SIGKILL)
                    op.wait()
                    stack, op = restarted(stack)
                elif what == "arm":
                    recorder.armed, armed_at = recorder.armed + 1, now
                else:
                    cp.restart()
                    result.api_restarts += 1
            if recorder.armed and now - armed_at > 5:  # no Job created meanwhile: kill anyway
                recorder.armed, armed_at = recorder.armed - 1, now
                op.send_signal(signal.SIGKILL)
                op.wait()
            if op.poll() is not None:  # killed by the recorder
                stack, op = restarted(stack)
            try:
                bodies = {b["metadata"]["name"]: b for b in
                          custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                               _request_timeout=10)["items"]}
                if not events and not recorder.armed and all(_ended(p, bodies.get(p.name)) for p in todo):
                    if result.kills >= kills:
                        break
                    events.append((now, "kill", None))  # two kills that hit one process count once: one more
                for plan in todo:  # a suspended job is resumed once the operator has seen the suspension
                    if plan.suspended and not plan.resumed and (bodies.get(plan.name, {}).get("status") or {}).get("phase") == "Suspended":
                        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, plan.name,
                                                              {"spec": {"suspend": False}}, _request_timeout=10)
                        plan.resumed = True
                for job in batch.list_namespaced_job(namespace, label_selector=MANAGED, _request_timeout=10).items:
                    plan = by_name.get((job.metadata.labels or {}).get("kubetune.dev/job"))
                    if plan and plan.name in bodies and not _finished(job) and not job.metadata.deletion_timestamp:
                        _drive(plan, job, bodies[plan.name], (custom, batch), namespace, rng)
            except Exception:  # the API server is away (restart): next round
                pass
            time.sleep(0.3)
        recorder.stop.set()
        result.targeted_kills = recorder.kills
        result.tracebacks = sum(Path(p).read_text().count("Traceback") for p in logs)
    finally:
        stack.close()
    result.seconds = time.monotonic() - start

    bodies = {b["metadata"]["name"]: b for b in
              custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]}
    for plan in todo:
        body, want = bodies.get(plan.name), plan.expected()
        status = (body or {}).get("status") or {}
        got = (status.get("phase"), status.get("reason")) if body else None
        if want is not None and plan.kind == "fail" and status.get("retries") != plan.max_retries:
            result.wrong.append(f"{plan.name} ({plan.kind}): retries {status.get('retries')}, maxRetries {plan.max_retries}")
        elif got == want:
            result.correct += 1
        else:
            result.wrong.append(f"{plan.name} ({plan.kind}): {got}, expected {want}: {status.get('message')}")
    recorder.thread.join(15)
    for name, uids in recorder.created.items():
        plan = by_name.get(name.rsplit("-prepare", 1)[0].split("-train-")[0])
        allowed = plan.expected_jobs().get(name, 0) if plan else 0
        if plan and plan.kind == "delete":
            allowed = 1  # deleted at some point of its life: no attempt is certain
        if len(uids) > allowed:
            result.duplicates.append(f"job/{name} created {len(uids)} time(s), expected {allowed}")
    result.duplicates += recorder.overlaps
    result.orphans = _orphans(api_client, namespace)
    return result


def _orphans(api_client, namespace: str, timeout: float = 90) -> list[str]:
    """Children without a live owning FineTuneJob, once the garbage collector has had its time."""
    from kubernetes import client

    core, rbac, apps = client.CoreV1Api(api_client), client.RbacAuthorizationV1Api(api_client), client.AppsV1Api(api_client)
    custom, batch = client.CustomObjectsApi(api_client), client.BatchV1Api(api_client)
    lists = {"job": batch.list_namespaced_job, "configmap": core.list_namespaced_config_map,
             "serviceaccount": core.list_namespaced_service_account, "service": core.list_namespaced_service,
             "role": rbac.list_namespaced_role, "rolebinding": rbac.list_namespaced_role_binding,
             "deployment": apps.list_namespaced_deployment}
    deadline = time.monotonic() + timeout
    while True:
        owners = {b["metadata"]["uid"] for b in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]}
        found = []
        for kind, lister in lists.items():
            for obj in lister(namespace, label_selector=MANAGED).items:
                refs = [r for r in obj.metadata.owner_references or [] if r.controller and r.kind == "FineTuneJob"]
                if not refs or refs[0].uid not in owners:
                    found.append(f"{kind}/{obj.metadata.name}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(2)


def table(r: Result) -> str:
    rows = [("jobs", r.jobs), ("operator SIGKILLs", f"{r.kills} ({r.targeted_kills} right after it created a child Job)"), ("API server + etcd restarts", r.api_restarts),
            ("correct terminal states", f"{r.correct}/{r.jobs}"), ("duplicate children", len(r.duplicates)),
            ("orphaned children (after GC)", len(r.orphans)), ("operator tracebacks", r.tracebacks),
            ("wall time", f"{r.seconds:.1f} s")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def test_operator_killed_and_api_server_restarted_jobs_end_without_duplicates_or_orphans(control_plane, namespace):
    result = run_chaos(control_plane, namespace, n_jobs=8, kills=3, api_restarts=1, seed=7, timeout=50)
    print(table(result))
    assert result.kills == 3 and result.api_restarts == 1
    assert not result.wrong and result.correct == 8, result.wrong
    assert not result.duplicates, result.duplicates
    assert not result.orphans, result.orphans


# --- The narrow windows, made deterministic ----------------------------------------------------------
# An operator that dies between acting and recording what it did is an operator whose status write
# fails: a ValidatingAdmissionPolicy refuses that write while it is in place.

@contextlib.contextmanager
def status_writes_refused(cp, namespace: str, ftj: str, expression: str, probe: dict):
    """Refuse status writes to FineTuneJobs in ``namespace`` where CEL ``expression`` is false (until
    the block ends). ``probe``, a status patch of ``ftj`` it must refuse, tells when it is in force."""
    import json

    name = f"refuse-{namespace}"
    policy = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
              "metadata": {"name": name},
              "spec": {"failurePolicy": "Fail",
                       "matchConstraints": {"resourceRules": [{"apiGroups": [GROUP], "apiVersions": [VERSION],
                                                               "operations": ["UPDATE"], "resources": [f"{PLURAL}/status"]}]},
                       "validations": [{"expression": expression, "message": "refused (test: the operator died here)"}]}}
    binding = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
               "metadata": {"name": name},
               "spec": {"policyName": name, "validationActions": ["Deny"],
                        "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}}}

    def refused() -> bool:
        run = cp.kubectl("patch", "ftj", ftj, "-n", namespace, "--subresource=status", "--type=merge", "--dry-run=server",
                         "-p", json.dumps({"status": probe}), check=False)
        return run.returncode != 0

    cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [policy, binding]}))
    wait_for(refused, what="the admission policy in force")
    try:
        yield
    finally:
        cp.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", name)
        wait_for(lambda: not refused(), what="the admission policy gone")


def _training_jobs(cp, namespace: str, name: str) -> list[str]:
    return sorted(j["metadata"]["name"] for j in items(cp, namespace, "job", f"kubetune.dev/job={name},app.kubernetes.io/component=train"))


def test_retry_is_recorded_before_the_next_gang_starts(control_plane, namespace):
    """A failed gang used to be deleted and attempt n+1 created before status.retries was written
    (bench_operator_restarts.py --seed 2 --kills 20 caught it in 2 of 3 runs). An operator that died in between came back to
    retries 0 and a missing train-0, and created train-0 again: two gangs, and a retry not counted."""
    cp = control_plane
    with operator(cp, namespace):
        apply(cp, namespace, ftj_doc("flaky", maxRetries=1))
        wait_for(lambda: get(cp, namespace, "job", "flaky-prepare"), what="prepare job")
        finish_job(cp, namespace, "flaky-prepare")
        first = wait_for(lambda: get(cp, namespace, "job", "flaky-train-0"), what="attempt 1")
        with status_writes_refused(cp, namespace, "flaky", "!has(object.status.retries) || object.status.retries == 0",
                                   {"retries": 1}):
            finish_job(cp, namespace, "flaky-train-0", succeeded=False)
            time.sleep(8)  # the failed write and its retry 5 s later
            # Nothing was done that the job's status does not know of.
            assert _training_jobs(cp, namespace, "flaky") == ["flaky-train-0"]
            assert get(cp, namespace, "job", "flaky-train-0")["metadata"]["uid"] == first["metadata"]["uid"]
        cp.kubectl("annotate", "ftj", "flaky", "-n", namespace, "poke=1")  # an event, rather than the 10 s backoff
        wait_for(lambda: _training_jobs(cp, namespace, "flaky") == ["flaky-train-1"], what="attempt 2 alone")
        assert wait_phase(cp, namespace, "flaky", "Training")["status"]["retries"] == 1
        finish_job(cp, namespace, "flaky-train-1", succeeded=False)
        status = wait_phase(cp, namespace, "flaky", "Failed")["status"]
        assert "training failed 2 time(s), spec.maxRetries is 1" in status["message"]
        assert _training_jobs(cp, namespace, "flaky") == ["flaky-train-1"]


def test_suspend_stops_a_gang_whose_start_was_not_recorded(control_plane, namespace):
    """A gang started after preparation, by an operator that died before writing status.prepared:
    suspending used to delete the (finished) prepare Job, not the running gang, report Suspended
    while it ran on, and prepare the data again on resume."""
    cp = control_plane
    with operator(cp, namespace):
        apply(cp, namespace, ftj_doc("paused"))
        prepare = wait_for(lambda: get(cp, namespace, "job", "paused-prepare"), what="prepare job")
        wait_phase(cp, namespace, "paused", "Preparing")
        with status_writes_refused(cp, namespace, "paused", "!has(object.status.prepared)", {"prepared": True}):
            finish_job(cp, namespace, "paused-prepare")
            wait_for(lambda: get(cp, namespace, "job", "paused-train-0"), what="the gang")
            cp.kubectl("patch", "ftj", "paused", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": true}}')
            wait_phase(cp, namespace, "paused", "Suspended")
            assert _training_jobs(cp, namespace, "paused") == []
            assert get(cp, namespace, "job", "paused-prepare")["metadata"]["uid"] == prepare["metadata"]["uid"]
        cp.kubectl("patch", "ftj", "paused", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": false}}')
        wait_for(lambda: get(cp, namespace, "job", "paused-train-0"), what="the gang again")
        assert wait_phase(cp, namespace, "paused", "Training")["status"]["prepared"] is True
        assert get(cp, namespace, "job", "paused-prepare")["metadata"]["uid"] == prepare["metadata"]["uid"]
