"""The FineTuneSchedule: a model kept up to date. It is to FineTuneJob what CronJob is to Job.

Each run is a FineTuneJob (NAME-r1, NAME-r2, ...) made from ``spec.jobTemplate``, started on a cron tick,
on request (the annotation ``kubetune.dev/retrain-requested-at``, which ``kubetune retrain`` sets), or when
enough new data has landed under a prefix (``trigger.newData``: see ``kubetune.newdata``). A run
continues from the model being served, and its evaluation gate (``mustBeat: serving``) compares the two on
``spec.promotion.goldenSet`` (never trained on), else on the run's held-out data; the runs share a dedup index,
so each learns from data no earlier run trained on. A run that beats the served model becomes a new
revision, and the schedule's one endpoint (a Deployment and Service named NAME-serve) rolls over to it.
``spec.pinnedRevision`` (``kubetune rollback``) serves an earlier revision.

Like the FineTuneJob's, these models are the single source of truth: the CRD is generated from them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kubetune.cron import CronError, parse as parse_cron, zone
from kubetune.spec import (API_GROUP, CAPTURE_RULE, VALIDATION_METRICS, Capture, JOB_NAME, FineTuneJobSpec, GateMetric,
                           Metadata, Quantity, Serve, Uri, _Model, check_capture, parse_document)

SCHEDULE_PLURAL = "finetuneschedules"
SCHEDULE_KIND = "FineTuneSchedule"
SCHEDULE_NAME_MAX = 30  # its runs are NAME-rN, and a FineTuneJob's name has at most 40 characters
RETRAIN_ANNOTATION = f"{API_GROUP}/retrain-requested-at"
# Five fields or a macro; the operator's parser (kubetune.cron) checks the values and names a bad one.
CRON = r"^(@[a-z]+|[-0-9A-Za-z*/,?]+( +[-0-9A-Za-z*/,?]+){4})$"


class Promotion(_Model):
    """When a run's model replaces the one being served."""

    metric: GateMetric = Field("valid_loss", description="The evaluation metric a run's model must improve on the "
                               "served model's, both measured on goldenSet when given, else on the run's held-out "
                               "data: a validation figure (valid_loss, ...) or a reply score (rouge_l, ...: on "
                               "jobTemplate.evaluation.samples generated replies).")
    min_delta: float = Field(0.0, ge=0, description="The least improvement that promotes (0: any improvement).")
    golden_set: Uri | None = Field(
        None, description="A fixed evaluation set (JSONL conversations), held out forever: every run drops training "
        "examples that duplicate it and is judged on it against the served model (instead of on its own validation "
        "split); each revision's metrics show both models on it.")


class ScheduleServe(_Model):
    """The schedule's stable endpoint, NAME-serve: the current revision, OpenAI model name NAME."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [CAPTURE_RULE]})

    enabled: bool = Field(True, description="Serve the current revision; false keeps revisions without an endpoint.")
    replicas: int = Serve.model_fields["replicas"]
    gpus: int = Serve.model_fields["gpus"]
    cpu: Quantity | None = Serve.model_fields["cpu"]
    memory: Quantity | None = Serve.model_fields["memory"]
    image: str | None = Serve.model_fields["image"]
    args: list[Annotated[str, Field(max_length=4096)]] | None = Serve.model_fields["args"]
    capture: Capture | None = Field(None, description="Record served conversations and feedback (off when "
                                    "absent); feedbackUri defaults to trigger.newData.uri + feedback/, so rated "
                                    "replies become the next run's data.")

    _capture = model_validator(mode="after")(check_capture)


class NewData(_Model):
    """Start a run when enough new examples have landed under a prefix."""

    uri: str = Field(pattern=r"^s3://[^/]+/(.*/)?$", max_length=4096, description="The prefix new data lands in, "
                     "s3://bucket/prefix/ (the template's storage endpoint; the operator's own credentials). An object "
                     "is new until a run consumes it, and new again when rewritten (a new ETag).")
    min_examples: int = Field(1, ge=1, description="Start a run once at least this many new examples (JSONL lines, "
                              "CSV or parquet rows) have come since the last run.")
    poll_seconds: int = Field(300, ge=30, le=86400, description="How often the prefix is listed (one paginated "
                              "listing per poll).")


class Trigger(_Model):
    """What else starts a run, besides the cron schedule and requests."""

    new_data: NewData | None = Field(None, description="New data under a prefix. Every run then trains on the new "
                                     "objects plus replayFraction of the earlier ones (all of them when nothing is new).")


# Rules on spec.jobTemplate, in place of a FineTuneJob spec's own (its fields are immutable once a job
# exists; a template may change, and the next run takes it).
TEMPLATE_RULES = [
    {"rule": "!has(self.evaluation) || !has(self.evaluation.gate)", "fieldPath": ".evaluation.gate",
     "message": "evaluation.gate is set by the schedule from spec.promotion (each run must beat the served model); "
     "remove it from the template"},
    {"rule": "!has(self.serve)", "fieldPath": ".serve", "message": "serve is not used in a template: the schedule "
     "serves the current revision itself (set spec.serve)"},
]


# A reply score (rouge_l, ...) needs replies to score; the same check as _template's, at admission.
REPLY_METRIC_RULE = {
    "rule": "!has(self.promotion) || !has(self.promotion.metric) || self.promotion.metric in "
            f"{list(VALIDATION_METRICS)} || !has(self.jobTemplate.evaluation) || "
            "!has(self.jobTemplate.evaluation.samples) || self.jobTemplate.evaluation.samples > 0",
    "fieldPath": ".promotion.metric",
    "message": "promotion.metric scores generated replies, but jobTemplate.evaluation.samples is 0"}


class FineTuneScheduleSpec(_Model):
    """A model kept up to date: runs (FineTuneJobs) on a cron schedule or on request, the best one served."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [REPLY_METRIC_RULE]})

    job_template: FineTuneJobSpec = Field(
        description="The spec of each run (a FineTuneJob spec). The schedule sets model (the served revision's, "
        "see retrainFrom), evaluation.gate, servedModel and goldenSet (from promotion and the served revision), "
        "preprocessing.dedup.index (OUTPUT/NAME/dedup-index/ unless given), serve (off) and output.uri "
        "(OUTPUT/NAME-rN/).",
        json_schema_extra={"x-kubernetes-validations": TEMPLATE_RULES})
    schedule: str | None = Field(None, pattern=CRON, max_length=128, description="When to start a run, in cron's "
                                 "five fields as a CronJob takes them (in timeZone), e.g. '0 3 * * *' or @weekly; "
                                 "absent: only on request (kubetune retrain).")
    time_zone: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$",
                                  description="The IANA time zone schedule is read in, as a CronJob's timeZone "
                                  "(e.g. Europe/Berlin; daylight saving time included); absent: UTC.")
    concurrency_policy: Literal["Forbid", "Allow", "Replace"] = Field(
        "Forbid", description="A tick while a run is active: Forbid skips it (a request waits for the run), Allow "
        "starts another, Replace deletes the active runs and starts a new one.")
    suspend: bool = Field(False, description="No runs on ticks while true (runs under way go on; a request still "
                          "starts one).")
    retrain_from: Literal["promoted", "base"] = Field(
        "promoted", description="promoted: a run continues from the served revision's model (the template's model "
        "until the first promotion); base: every run starts from the template's model.")
    history_limit: int = Field(5, ge=1, le=1000, description="Finished runs (FineTuneJobs) kept; older ones are "
                               "deleted, except the served and the pinned revision's. Their stored models stay.")
    promotion: Promotion = Field(default_factory=Promotion)
    trigger: Trigger = Field(default_factory=Trigger)
    replay_fraction: float = Field(0.1, ge=0, le=1, description="With trigger.newData: the share of the examples "
                                   "earlier runs trained on that a run trains on again, with its new data (a sample "
                                   "drawn with the run's seed), so the model does not forget them.")
    pinned_revision: int | None = Field(None, ge=1, description="Serve this revision (a rollback, as kubetune "
                                        "rollback sets it) instead of the latest; runs continue from it.")
    serve: ScheduleServe = Field(default_factory=ScheduleServe)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_cron(value)
            except CronError as e:
                raise ValueError(str(e)) from None
        return value

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        try:
            zone(value)
        except CronError as e:
            raise ValueError(str(e)) from None
        return value

    @model_validator(mode="after")
    def _template(self) -> FineTuneScheduleSpec:
        if self.job_template.evaluation.gate is not None:
            raise ValueError(f"jobTemplate.{TEMPLATE_RULES[0]['message']}")
        if "serve" in self.job_template.model_fields_set:
            raise ValueError(f"jobTemplate.{TEMPLATE_RULES[1]['message']}")
        if self.promotion.metric not in VALIDATION_METRICS and not self.job_template.evaluation.samples:
            raise ValueError(REPLY_METRIC_RULE["message"].replace("metric", f"metric {self.promotion.metric}", 1))
        return self


class ScheduleMetadata(Metadata):
    name: str = Field(pattern=JOB_NAME, max_length=SCHEDULE_NAME_MAX)


class FineTuneSchedule(BaseModel):
    model_config = ConfigDict(extra="allow")
    api_version: Literal["kubetune.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneSchedule"]
    metadata: ScheduleMetadata
    spec: FineTuneScheduleSpec


def parse_schedule(doc: Any, source: str = "schedule") -> FineTuneSchedule:
    """Validate a FineTuneSchedule document; raises SpecError naming every bad field."""
    return parse_document(FineTuneSchedule, doc, source)


# The status: what the operator observed and decided.

class Revision(_Model):
    """A promoted run's model."""

    revision: int
    job: str = Field(description="The run (FineTuneJob) that trained it; historyLimit may delete the run, the model stays.")
    model: str = Field(description="The model (the run's status.outputModel).")
    metrics: dict[str, float] = Field(default_factory=dict, description="The run's validation figures (valid_loss, ...).")
    verdict: str | None = Field(None, description="Its evaluation gate's verdict against the model served before.")
    promoted_at: str
    promoted_by: Literal["schedule", "manual", "newData"] = Field(description="What started the run: a cron tick, a "
                                                                   "request or new data.")


class LastRun(_Model):
    name: str
    started_at: str
    trigger: Literal["schedule", "manual", "newData"]


class RunResult(_Model):
    """How the latest finished run ended."""

    run: str
    result: Literal["Promoted", "GateFailed", "Failed", "Superseded", "Replaced"]
    message: str
    finished_at: str


class NewDataStatus(_Model):
    """The prefix's latest poll, and the data consumed so far (its list is in storage, not here)."""

    last_poll_at: str | None = None
    pending: int | None = Field(None, description="New examples not consumed by a run yet.")
    pending_objects: int | None = Field(None, description="The objects holding them.")
    watermark: str | None = Field(None, description="The data manifest of the latest run that consumed new data: "
                                  "what it lists (its files and replay files) is consumed.")
    consumed_run: str | None = None
    error: str | None = Field(None, description="Why the latest poll failed (it is tried again at the next).")


class ScheduleStatus(_Model):
    """Observed state, written by the operator."""

    observed_generation: int | None = None
    reason: str | None = None
    message: str | None = None
    served_revision: int | None = Field(None, description="The revision the endpoint serves.")
    served_model: str | None = None
    served_reason: str | None = Field(None, description="Why that revision: the latest, or pinned.")
    endpoint: str | None = Field(None, description="The OpenAI-compatible endpoint (model name: the schedule's name).")
    revisions: list[Revision] | None = Field(None, description="Promoted runs, oldest first.")
    active: list[str] | None = Field(None, description="Runs under way.")
    runs: int | None = Field(None, description="Runs started so far: the last was NAME-r<runs>.")
    last_run: LastRun | None = None
    last_result: RunResult | None = None
    last_schedule_time: str | None = Field(None, description="The latest cron tick acted on (a run, or skipped).")
    last_retrain_request: str | None = Field(None, description="The latest kubetune.dev/retrain-requested-at acted on.")
    next_run: str | None = Field(None, description="The next cron tick (UTC).")
    new_data: NewDataStatus | None = Field(None, description="What trigger.newData has seen.")

