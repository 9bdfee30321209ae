"""Level-based reconcile of one FineTuneJob: look at the job and its children, take the next step.

Every step is idempotent (children have fixed names; "already exists" is success), so a re-run after
a crash, a restart of the operator, or two triggers at once converge on the same objects.

    Pending ─► Preparing ─► Training ─► Succeeded
                  │            │ ▲ failed gang: new attempt, resumes from the last checkpoint
                  ▼            ▼ │ (up to spec.maxRetries)
                Failed ◄───────┘
    spec.suspend: the running Job is deleted (progress kept) ─► Suspended ─► back where it was
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from kubetune.operator import children
from kubetune.operator.conditions import FINISHED, Phase, conditions_for, now
from kubetune.operator.kube import Rejected
from kubetune.operator.settings import Settings
from kubetune.spec import SpecError, parse_job
from kubetune.status import Status
from kubetune.storage import join


@dataclass
class Outcome:
    phase: Phase
    reason: str
    message: str
    status: dict = field(default_factory=dict)  # other status fields to set


def job_state(job: dict | None) -> str:
    """Missing, Active, Suspended, Complete or Failed, from a Job's spec and conditions."""
    if job is None:
        return "Missing"
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Complete", "Failed"):
            return c["type"]
    return "Suspended" if (job.get("spec") or {}).get("suspend") else "Active"


def failure_message(api, namespace: str, job: dict) -> str:
    """The Job's failure reason plus the last line its failed container printed."""
    reason = next((c.get("message") or c.get("reason", "") for c in job["status"]["conditions"]
                   if c.get("type") == "Failed"), "")
    for pod in api.job_pods(namespace, job["metadata"]["name"]):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = ((cs.get("state") or {}).get("terminated") or {})
            if term.get("exitCode"):
                last = (term.get("message") or "").strip().splitlines()[-1:] or [f"exit code {term['exitCode']}"]
                return f"{reason}: {last[0][:300]}" if reason else last[0][:300]
    return reason or "the Job failed"


def needs_work(body: dict) -> bool:
    """False once a job is finished and its endpoint matches spec.serve (which may change after success)."""
    status = body.get("status") or {}
    if status.get("phase") == Phase.SUCCEEDED.value:
        if ((body.get("spec") or {}).get("serve") or {}).get("enabled"):
            return not status.get("endpoint") or status.get("observedGeneration") != body["metadata"].get("generation")
        return bool(status.get("endpoint"))
    return status.get("phase") not in FINISHED


def reconcile(api, settings: Settings, body: dict, adopt: Callable[[dict], None]) -> Outcome | None:
    """Drive one FineTuneJob a step further; None when it is finished and there is nothing to do."""
    status = body.get("status") or {}
    if not needs_work(body):
        return None
    meta = body["metadata"]
    try:
        job = parse_job({**body, "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                                              "labels": meta.get("labels") or {}}})
    except SpecError as e:
        return Outcome(Phase.FAILED, "InvalidSpec", "; ".join(e.problems))
    try:
        return _step(api, settings, job, status, adopt)
    except Rejected as e:  # a value the CRD lets through but a child may not have: say so, do not retry forever
        return Outcome(Phase.FAILED, "InvalidSpec", f"the API server rejected {e}")


def _step(api, settings: Settings, job, status: dict, adopt: Callable[[dict], None]) -> Outcome:
    ns, name = job.metadata.namespace, job.metadata.name
    if status.get("phase") == Phase.SUCCEEDED.value:  # spec.serve was turned on, changed or turned off
        return _serve(job, status["outputModel"], {}, settings, adopt, api)

    # fromJob is resolved once, before the job starts, and kept in status.baseModel: deleting the base
    # job later must not send a running job back to Pending. The handlers re-run this when a base finishes.
    model_source = status.get("baseModel")
    if job.spec.model.from_job and not model_source:
        waiting = _base_model(api, ns, name, job.spec.model.from_job)
        if isinstance(waiting, Outcome):
            return waiting
        model_source = waiting
    base = {"baseModel": model_source} if job.spec.model.from_job else {}

    def ensure(obj: dict) -> None:
        adopt(obj)  # owner reference: deleting the FineTuneJob deletes the child
        api.create(obj)

    def start(workload: dict) -> None:
        """Create a Job, after what its pods need: identity, permission to report, the job file."""
        for obj in (children.service_account(job), children.progress_role(job), children.progress_role_binding(job),
                    children.config_map(job, model_source)):
            ensure(obj)
        ensure(workload)

    def start_gang(attempt: int) -> None:
        ensure(children.headless_service(job))
        start(children.training_job(job, attempt, settings))

    n = children.names(name)
    attempt = int(status.get("retries") or 0)
    train_name = children.training_job_name(name, attempt)
    if job.spec.suspend:
        # Stop whatever runs. The gang may run although status.prepared is not written yet (the operator
        # died right after starting it); a finished prepare Job is kept, so resuming does not redo it.
        api.delete_job(ns, train_name)
        api.delete_service(ns, n["service"])
        if not status.get("prepared") and job_state(api.get_job(ns, n["prepare"])) != "Complete":
            api.delete_job(ns, n["prepare"])
        return Outcome(Phase.SUSPENDED, "Suspended", "spec.suspend is true; progress is kept")

    if not status.get("prepared"):
        prepare = api.get_job(ns, n["prepare"])
        state = job_state(prepare)
        if state == "Missing":
            start(children.prepare_job(job, settings))
            return Outcome(Phase.PREPARING, "Preparing", "preparing the data", base)
        if state == "Failed":
            return Outcome(Phase.FAILED, "PreparationFailed", failure_message(api, ns, prepare))
        if state != "Complete":
            return Outcome(Phase.PREPARING, "Queued" if state == "Suspended" else "Preparing",
                           "waiting for admission" if state == "Suspended" else "preparing the data")

    training = api.get_job(ns, train_name)
    state = job_state(training)
    prepared = {"prepared": True, "trainingJob": train_name}
    if state == "Missing":
        if attempt:  # the failed gang before it, if still there (its deletion and this start are one step)
            api.delete_job(ns, children.training_job_name(name, attempt - 1))
        start_gang(attempt)
        return Outcome(Phase.TRAINING, "Training", _attempt_text(attempt, job.spec.max_retries), prepared)
    if state == "Complete":
        done = {**prepared, "outputModel": join(job.spec.output.uri, "model"), "completionTime": now()}
        if job.spec.serve.enabled:
            return _serve(job, done["outputModel"], done, settings, adopt, api)
        return Outcome(Phase.SUCCEEDED, "Succeeded", "the model is ready", done)
    if state == "Failed":
        message = failure_message(api, ns, training)
        if attempt >= job.spec.max_retries:
            return Outcome(Phase.FAILED, "TrainingFailed",
                           f"training failed {attempt + 1} time(s), spec.maxRetries is {job.spec.max_retries}: {message}")
        # Only record the retry here; the next reconcile (this status write triggers it) deletes this gang
        # and starts the next. Acting first, an operator dying before the write came back to retries N
        # and no gang N, and started gang N again, next to gang N+1.
        retry = attempt + 1
        return Outcome(Phase.TRAINING, "Retrying",
                       f"attempt {attempt + 1} failed ({message}); attempt {retry + 1} resumes from the latest checkpoint",
                       {**prepared, "retries": retry, "trainingJob": children.training_job_name(name, retry)})
    if state == "Suspended":
        return Outcome(Phase.TRAINING, "Queued", "waiting for admission", prepared)
    return Outcome(Phase.TRAINING, "Training", _attempt_text(attempt, job.spec.max_retries), prepared)


def _base_model(api, ns: str, name: str, base: str) -> str | Outcome:
    """The output model of job ``base``, or the Outcome to report while it is not there (yet)."""
    if base == name:
        return Outcome(Phase.FAILED, "InvalidSpec", "model.fromJob names this job itself")
    body = api.get_ftj(ns, base)
    if body is None:  # it may still be created (e.g. a folder applied in any order): wait, but say so
        return Outcome(Phase.PENDING, "WaitingForBaseJob",
                       f"model.fromJob '{base}' does not exist in namespace '{ns}'; waiting for it to be created and succeed")
    status = body.get("status") or {}
    if status.get("phase") == Phase.FAILED.value:  # Failed is final: waiting would be forever
        return Outcome(Phase.FAILED, "BaseJobFailed", f"model.fromJob '{base}' failed: {status.get('message', '')}")
    if status.get("phase") != Phase.SUCCEEDED.value or not status.get("outputModel"):
        cycle = _cycle(api, ns, name, base, body)
        if cycle:  # each would wait for the other forever
            return Outcome(Phase.FAILED, "InvalidSpec", f"model.fromJob forms a cycle: {' → '.join(cycle)}")
        return Outcome(Phase.PENDING, "WaitingForBaseJob",
                       f"model.fromJob '{base}' has not succeeded yet (it is {status.get('phase') or 'Pending'})")
    return status["outputModel"]


def _cycle(api, ns: str, name: str, base: str, body: dict | None) -> list[str] | None:
    """The chain name → base → … → name when following model.fromJob from ``base`` comes back to this job.
    A chain that loops without this job is left to its members, which fail; this one then fails after them."""
    chain = [name, base]
    while body is not None and not (body.get("status") or {}).get("baseModel"):  # resolved: no longer waiting
        after = ((body.get("spec") or {}).get("model") or {}).get("fromJob")
        if not after or (after in chain and after != name):
            return None
        chain.append(after)
        if after == name:
            return chain
        body = api.get_ftj(ns, after)
    return None


def _serve(job, model_uri: str, done: dict, settings: Settings, adopt, api) -> Outcome:
    """Make the endpoint of a succeeded job match spec.serve: a Deployment and a Service owned by the job,
    created, updated (replicas, resources, image after an edit) or removed."""
    ns, serve = job.metadata.namespace, children.names(job.metadata.name)["serve"]
    if not job.spec.serve.enabled:
        api.delete_deployment(ns, serve)
        api.delete_service(ns, serve)
        return Outcome(Phase.SUCCEEDED, "Succeeded", "the model is ready (no longer served: spec.serve.enabled is false)",
                       {**done, "endpoint": None})
    try:
        for obj in (children.serving_deployment(job, model_uri, settings), children.serving_service(job)):
            adopt(obj)
            api.apply(obj)
    except Rejected as e:  # the model is there all the same: the job stays Succeeded
        return Outcome(Phase.SUCCEEDED, "ServingFailed", f"the model is ready, but the API server rejected {e}", done)
    url = children.serving_endpoint(job)
    return Outcome(Phase.SUCCEEDED, "Serving", f"the model is ready and served at {url}", {**done, "endpoint": url})


def _attempt_text(attempt: int, max_retries: int) -> str:
    if attempt == 0:
        return "training"
    return f"training attempt {attempt + 1} of {max_retries + 1}, resumed from the latest checkpoint"


def status_patch(previous: dict, outcome: Outcome, generation: int | None) -> dict:
    """The status fields the operator owns; progress and the data report are left to the pods."""
    at = now()
    status = Status(phase=outcome.phase.value, reason=outcome.reason, message=outcome.message,
                    conditions=conditions_for(outcome.phase, outcome.reason, outcome.message, previous.get("conditions"), at),
                    observed_generation=generation, **outcome.status)
    if not previous.get("startTime"):
        status.start_time = at
    return status.patch()
