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
from datetime import datetime, timezone
from typing import Callable

from kubetune.errors import EXIT_STOPPED, PERMANENT
from kubetune.operator import children, kueue
from kubetune.operator.conditions import FINISHED, JobState, Phase, conditions_for, now
from kubetune.operator.kube import Rejected
from kubetune.operator.settings import Settings
from kubetune.spec import FineTuneJob, SpecError, Training, duration_seconds, parse_job
from kubetune.status import Status
from kubetune.storage import join


@dataclass
class Outcome:
    phase: Phase
    reason: str
    message: str
    status: dict = field(default_factory=dict)  # other status fields to set


def job_state(job: dict | None) -> JobState:
    """A Job's state from its spec and conditions."""
    if job is None:
        return JobState.MISSING
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in (JobState.COMPLETE, JobState.FAILED):
            return JobState(c["type"])
    return JobState.SUSPENDED if (job.get("spec") or {}).get("suspend") else JobState.ACTIVE


@dataclass(frozen=True)
class Failure:
    """Why a Job failed: its pod's exit code (kubetune.errors' classes), the one line naming the cause, and
    whether a pod of it was disrupted (preempted, evicted, drained: the DisruptionTarget condition)."""

    code: int | None
    message: str
    disrupted: bool = False

    @property
    def permanent(self) -> str | None:
        """The FineTuneJob's reason when no attempt could do better, else None."""
        return PERMANENT.get(self.code)


def job_failure(api, namespace: str, job: dict) -> Failure:
    """The Job's failure: a failed container's exit code, a permanent one first (in a gang, the other pods fail
    after it, for want of their peer), and the last line of its termination message (a kubetune process writes
    its cause there); else the Job's own condition message."""
    reason = next((c.get("message") or c.get("reason", "") for c in job["status"]["conditions"]
                   if c.get("type") == "Failed"), "") or "the Job failed"
    pods = api.job_pods(namespace, job["metadata"]["name"])
    ended = [t for p in pods for cs in (p.get("status") or {}).get("containerStatuses") or []
             if (t := (cs.get("state") or {}).get("terminated") or {}).get("exitCode")]
    disrupted = any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
                    for p in pods for c in (p.get("status") or {}).get("conditions") or []) \
        or any(t["exitCode"] == EXIT_STOPPED for t in ended)  # a peer stopped on SIGTERM with its step saved
    if not ended:
        return Failure(None, reason, disrupted)
    term = min(ended, key=lambda t: t["exitCode"] not in PERMANENT)  # the first permanent one, else the first
    last = (term.get("message") or "").strip().splitlines()[-1:] or [f"exit code {term['exitCode']}"]
    return Failure(term["exitCode"], last[0].removeprefix("error: ")[:300], disrupted)


def attempt_of(status: dict) -> int:
    """The training attempt under way (0 first): failed ones counted against spec.maxRetries, and disrupted
    ones, which do not count."""
    return int(status.get("retries") or 0) + int(status.get("preemptions") or 0)


def needs_work(body: dict) -> bool:
    """False once a job is finished and its endpoint matches spec.serve (which may change after success)."""
    status = body.get("status") or {}
    if status.get("phase") == Phase.SUCCEEDED:
        if ((body.get("spec") or {}).get("serve") or {}).get("enabled"):
            return not status.get("endpoint") or status.get("observedGeneration") != body["metadata"].get("generation")
        return bool(status.get("endpoint"))
    return status.get("phase") not in FINISHED


def reconcile(api, settings: Settings, body: dict, adopt: Callable[[dict], None]) -> Outcome | None:
    """Drive one FineTuneJob a step further; None when it is finished and there is nothing to do."""
    if not needs_work(body):
        return None
    meta = body["metadata"]
    try:
        job = parse_job({**body, "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                                              "labels": meta.get("labels") or {}}})
    except SpecError as e:
        return Outcome(Phase.FAILED, "InvalidSpec", "; ".join(e.problems))
    step = Step(api, settings, job, body.get("status") or {}, adopt)
    try:
        return step.run()
    except Rejected as e:  # a value the CRD lets through but a child may not have: say so, do not retry forever
        return Outcome(Phase.FAILED, "InvalidSpec", f"the API server rejected {e}")


@dataclass
class Step:
    """One reconcile of one job: a method per phase, each returning the Outcome to record."""

    api: object
    settings: Settings
    job: FineTuneJob
    status: dict
    adopt: Callable[[dict], None]
    model_source: str | None = None  # model.fromJob, resolved

    def __post_init__(self):
        self.ns, self.name = self.job.metadata.namespace, self.job.metadata.name
        self.n = children.names(self.name)
        self.retries, self.preemptions = int(self.status.get("retries") or 0), int(self.status.get("preemptions") or 0)
        self.attempt = attempt_of(self.status)
        self.train_name = children.training_job_name(self.name, self.attempt)

    def run(self) -> Outcome:
        if self.status.get("phase") == Phase.SUCCEEDED:  # spec.serve was turned on, changed or turned off
            return self.serve(self.status["outputModel"], {})
        # fromJob is resolved once, before the job starts, and kept in status.baseModel: deleting the base
        # job later must not send a running job back to Pending. The handlers re-run this when a base finishes.
        self.model_source = self.status.get("baseModel")
        if self.job.spec.model.from_job and not self.model_source:
            resolved = _base_model(self.api, self.ns, self.name, self.job.spec.model.from_job)
            if isinstance(resolved, Outcome):
                return resolved
            self.model_source = resolved
        if self.job.spec.suspend:
            return self.suspend()
        if not self.status.get("prepared"):
            waiting = self.prepare()
            if waiting:
                return waiting
        return self.train()

    def ensure(self, obj: dict) -> None:
        self.adopt(obj)  # owner reference: deleting the FineTuneJob deletes the child
        self.api.apply(obj)  # create; an existing Deployment is updated (spec.serve may change after success)

    def start(self, workload: dict) -> None:
        """Create a Job, after what its pods need: identity, permission to report, the job file."""
        job = self.job
        for obj in (children.service_account(job), children.progress_role(job), children.progress_role_binding(job),
                    children.config_map(job, self.model_source)):
            self.ensure(obj)
        self.ensure(workload)

    def suspend(self) -> Outcome:
        # Stop whatever runs. The gang may run although status.prepared is not written yet (the operator
        # died right after starting it); a finished prepare Job is kept, so resuming does not redo it.
        self.api.delete_job(self.ns, self.train_name)
        self.api.delete_service(self.ns, self.n["service"])
        if not self.status.get("prepared") and job_state(self.api.get_job(self.ns, self.n["prepare"])) != JobState.COMPLETE:
            self.api.delete_job(self.ns, self.n["prepare"])
        return Outcome(Phase.SUSPENDED, "Suspended", "spec.suspend is true; progress is kept")

    def prepare(self) -> Outcome | None:
        """The Outcome while the data is not prepared yet; None once it is."""
        prepare = self.api.get_job(self.ns, self.n["prepare"])
        state = job_state(prepare)
        if state == JobState.MISSING:
            self.start(children.prepare_job(self.job, self.settings))
            base = {"baseModel": self.model_source} if self.job.spec.model.from_job else {}
            return Outcome(Phase.PREPARING, "Preparing", "preparing the data", base)
        if state == JobState.FAILED:  # its Job counted the tries (backoffLimit: spec.maxRetries)
            failure = job_failure(self.api, self.ns, prepare)
            return Outcome(Phase.FAILED, failure.permanent or "PreparationFailed", failure.message)
        if state == JobState.SUSPENDED:
            return self.queued(prepare, Phase.PREPARING, {})
        if state == JobState.ACTIVE:
            return Outcome(Phase.PREPARING, "Preparing", "preparing the data", self.admitted(prepare))
        return None

    def train(self) -> Outcome:
        training = self.api.get_job(self.ns, self.train_name)
        state, attempt, max_retries = job_state(training), self.attempt, self.job.spec.max_retries
        prepared = {"prepared": True, "trainingJob": self.train_name}
        if state == JobState.MISSING:
            if attempt:  # the failed gang before it, if still there (its deletion and this start are one step)
                self.api.delete_job(self.ns, children.training_job_name(self.name, attempt - 1))
            self.ensure(children.headless_service(self.job))
            self.start(children.training_job(self.job, attempt, self.settings))
            return Outcome(Phase.TRAINING, "Training", _attempt_text(attempt, self.retries, max_retries),
                           {**prepared, "admittedAt": None})  # the gang's own admission, not the prepare Job's
        if state == JobState.COMPLETE:
            done = {**prepared, "outputModel": join(self.job.spec.output.uri, "model"), "completionTime": now()}
            if self.job.spec.serve.enabled:
                return self.serve(done["outputModel"], done)
            return Outcome(Phase.SUCCEEDED, "Succeeded", "the model is ready", done)
        if state == JobState.FAILED:
            failure = job_failure(self.api, self.ns, training)
            if failure.permanent:  # the Job's podFailurePolicy failed it at once; no attempt would do better
                return Outcome(Phase.FAILED, failure.permanent, failure.message, prepared)
            if failure.disrupted:  # a gang of several pods, one preempted: the others failed for it
                return self.next_attempt("Preempted", f"attempt {attempt + 1} was preempted ({failure.message}); "
                                         "the next resumes from the latest checkpoint, not counted against "
                                         "spec.maxRetries", {**prepared, "preemptions": self.preemptions + 1})
            message = failure.message if failure.code is None else f"exit code {failure.code}: {failure.message}"
            return self.retry_or_fail("TrainingFailed", "failed", message, prepared)
        if state == JobState.SUSPENDED:
            return self.queued(training, Phase.TRAINING, prepared)
        prepared.update(self.admitted(training))
        stall = stalled(self.status.get("progress"), attempt, training, self.job.spec.training)
        if stall:  # a hung rank (a collective that never returns, a dead filesystem) holds the gang's GPUs
            if self.retries >= max_retries:
                self.api.delete_job(self.ns, self.train_name)
            return self.retry_or_fail("Stalled", "stalled", stall, prepared)
        return Outcome(Phase.TRAINING, "Training", _attempt_text(attempt, self.retries, max_retries), prepared)

    def queued(self, held: dict, phase: Phase, status: dict) -> Outcome:
        """A Job Kueue holds (suspended): waiting for quota, or preempted, in Kueue's words."""
        queue = held["metadata"].get("labels", {}).get(kueue.QUEUE_LABEL)
        if not queue:  # suspended by hand, not by Kueue: nothing will start it
            return Outcome(phase, "Queued", f"Job {held['metadata']['name']} is suspended and not in a Kueue queue")
        st = held.get("status") or {}
        pods_left = int(st.get("active") or 0) + int(st.get("terminating") or 0)
        reason, message = kueue.waiting(self.api.workload(self.ns, held), queue, pods_left, self.status.get("progress"))
        return Outcome(phase, reason, message, {**status, "admittedAt": None})

    def admitted(self, running: dict) -> dict:
        """status.admittedAt of a running Job Kueue admitted, read once per admission (after Queued/Preempted)."""
        if kueue.QUEUE_LABEL not in running["metadata"].get("labels", {}):
            return {}
        if self.status.get("admittedAt") and self.status.get("reason") not in ("Queued", "Preempting", "Preempted"):
            return {"admittedAt": self.status["admittedAt"]}
        return {"admittedAt": kueue.admitted_at(self.api.workload(self.ns, running)) or now()}

    def retry_or_fail(self, reason: str, what: str, message: str, prepared: dict) -> Outcome:
        retries, max_retries = self.retries, self.job.spec.max_retries
        if retries >= max_retries:
            return Outcome(Phase.FAILED, reason,
                           f"training {what} {retries + 1} time(s), spec.maxRetries is {max_retries}: {message}")
        return self.next_attempt("Retrying" if reason == "TrainingFailed" else reason,
                                 f"attempt {self.attempt + 1} {what} ({message}); attempt {self.attempt + 2} resumes "
                                 "from the latest checkpoint", {**prepared, "retries": retries + 1})

    def next_attempt(self, reason: str, message: str, status: dict) -> Outcome:
        # Only record the attempt here; the next reconcile (this status write triggers it) deletes this gang
        # and starts the next. Acting first, an operator dying before the write came back to attempt N
        # and no gang N, and started gang N again, next to gang N+1.
        following = children.training_job_name(self.name, self.attempt + 1)
        return Outcome(Phase.TRAINING, reason, message, {**status, "trainingJob": following})

    def serve(self, model_uri: str, done: dict) -> Outcome:
        """Make the endpoint of a succeeded job match spec.serve: a Deployment and a Service owned by the job,
        created, updated (replicas, resources, image after an edit) or removed."""
        job = self.job
        if not job.spec.serve.enabled:
            self.api.delete_deployment(self.ns, self.n["serve"])
            self.api.delete_service(self.ns, self.n["serve"])
            return Outcome(Phase.SUCCEEDED, "Succeeded", "the model is ready (no longer served: spec.serve.enabled is false)",
                           {**done, "endpoint": None})
        evaluation = self.status.get("evaluation")
        if evaluation and not evaluation.get("passed"):  # promotion only on a pass
            self.api.delete_deployment(self.ns, self.n["serve"])
            self.api.delete_service(self.ns, self.n["serve"])
            return Outcome(Phase.SUCCEEDED, "EvaluationFailed", f"the model is ready but not served: it did not pass "
                           f"evaluation.gate ({evaluation.get('message', '')})", {**done, "endpoint": None})
        model_uri = served_model(job.spec.serve.checkpoint, model_uri, self.status.get("checkpoints") or [])
        if isinstance(model_uri, Outcome):
            return Outcome(model_uri.phase, model_uri.reason, model_uri.message, {**done, **model_uri.status})
        try:
            for obj in (children.serving_deployment(job, model_uri, self.settings), children.serving_service(job)):
                self.ensure(obj)
        except Rejected as e:  # the model is there all the same: the job stays Succeeded
            return Outcome(Phase.SUCCEEDED, "ServingFailed", f"the model is ready, but the API server rejected {e}", done)
        url = children.serving_endpoint(job)
        return Outcome(Phase.SUCCEEDED, "Serving", f"the model is ready and served at {url}", {**done, "endpoint": url})


def _base_model(api, ns: str, name: str, base: str) -> str | Outcome:
    """The output model of job ``base``, or the Outcome to report while it is not there (yet)."""
    if base == name:
        return Outcome(Phase.FAILED, "InvalidSpec", "model.fromJob names this job itself")
    body = api.get_ftj(ns, base)
    if body is None:  # it may still be created (e.g. a folder applied in any order): wait, but say so
        return Outcome(Phase.PENDING, "WaitingForBaseJob",
                       f"model.fromJob '{base}' does not exist in namespace '{ns}'; waiting for it to be created and succeed")
    status = body.get("status") or {}
    if status.get("phase") == Phase.FAILED:  # Failed is final: waiting would be forever
        return Outcome(Phase.FAILED, "BaseJobFailed", f"model.fromJob '{base}' failed: {status.get('message', '')}")
    if status.get("phase") != Phase.SUCCEEDED or not status.get("outputModel"):
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


def served_model(ref: str, final_model: str, checkpoints: list[dict]) -> str | Outcome:
    """The model that serve.checkpoint names: last (the final model), best, or step-N (status.checkpoints)."""
    if ref == "last":
        return final_model
    for c in checkpoints:
        if c.get("model") and (c.get("best") if ref == "best" else c.get("step") == int(ref.removeprefix("step-"))):
            return c["model"]
    have = ", ".join(f"step-{c.get('step')}" + (" (best)" if c.get("best") else "") for c in checkpoints) or "none"
    # Nothing is torn down: an endpoint serving an earlier choice goes on serving it.
    return Outcome(Phase.SUCCEEDED, "ServingFailed", f"the model is ready, but serve.checkpoint '{ref}' is not among "
                   f"the job's checkpoints (status.checkpoints: {have})")


def stalled(progress: dict | None, attempt: int, gang: dict, training) -> str | None:
    """Why the running gang counts as stalled, or None. The clock runs from this gang's last progress
    record (its "starting" record until the first step): a gang whose pods have not started (no GPUs
    free, an image still pulling) has written none and is not stalled, and neither is a record from
    before it (an earlier attempt, or this one before a suspend)."""
    if not progress or progress.get("attempt") != attempt or progress.get("phase") not in ("starting", "training"):
        return None
    # Its start: created, or resumed (Kueue admitting it again after a preemption resets status.startTime).
    created = max(gang["metadata"].get("creationTimestamp") or "", (gang.get("status") or {}).get("startTime") or "")
    last = progress.get("updatedAt") or ""
    if last < created:  # both RFC 3339 in UTC: text order is time order
        return None
    idle = seconds_since(last)
    if idle <= training.stall_timeout_seconds:
        return None
    where = f"step {progress.get('step')}" if progress.get("phase") == "training" else "start-up, before the first step"
    return (f"no training step for {idle:.0f} s, more than training.stallTimeout {training.stall_timeout} "
            f"(last progress: {where} at {last})")


def seconds_to_stall(body: dict) -> float | None:
    """In how many seconds a training job would count as stalled if its trainer wrote nothing more; None
    when no clock runs for it (no record of this attempt yet, or one from before its gang, which ``stalled``
    ignores: the trainer's next record starts the clock again)."""
    status = body.get("status") or {}
    progress = status.get("progress") or {}
    if (progress.get("phase") not in ("starting", "training") or not progress.get("updatedAt")
            or progress.get("attempt") != attempt_of(status)):
        return None
    timeout = duration_seconds(((body.get("spec") or {}).get("training") or {}).get("stallTimeout")
                               or Training.model_fields["stall_timeout"].default)
    left = timeout - seconds_since(progress["updatedAt"])
    return left if left > 0 else None


def seconds_since(timestamp: str) -> float:
    then = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - then).total_seconds()


def _attempt_text(attempt: int, retries: int, max_retries: int) -> str:
    if attempt == 0:
        return "training"
    return (f"training attempt {attempt + 1} ({retries} of spec.maxRetries {max_retries} used), resumed from the "
            "latest checkpoint")


def status_patch(previous: dict, outcome: Outcome, generation: int | None) -> dict:
    """The status fields the operator owns; progress and the data report are left to the pods."""
    at = now()
    conditions = conditions_for(outcome.phase, outcome.reason, outcome.message, previous.get("conditions"), at,
                                previous.get("evaluation"))
    status = Status(phase=outcome.phase.value, reason=outcome.reason, message=outcome.message, conditions=conditions,
                    observed_generation=generation, **outcome.status)
    if not previous.get("startTime"):
        status.start_time = at
    return status.patch()
