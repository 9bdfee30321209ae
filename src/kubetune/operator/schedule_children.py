"""Pure builders of a FineTuneSchedule's objects: its runs (FineTuneJobs) and its stable endpoint.

The endpoint is the FineTuneJob's (``children.serving_deployment``) with the schedule's name, labels and
a rollout that keeps serving while the next revision starts: a new pod must be ready (/readyz: model
loaded) before an old one goes, so switching revisions fails no request.
"""

from __future__ import annotations

import copy

from kubetune.operator import children
from kubetune.operator.settings import Settings
from kubetune.schedule_spec import RETRAIN_ANNOTATION, FineTuneSchedule, Promotion
from kubetune.spec import API_GROUP, API_VERSION, KIND, FineTuneJob, Metadata, Serve
from kubetune.storage import join

KUEUE_PREFIX = "kueue.x-k8s.io/"  # queue-name, priority-class: copied to every run, which copies them to its Jobs
SCHEDULE_LABEL = f"{API_GROUP}/schedule"  # on runs and on the endpoint's objects
RUN_LABEL = f"{API_GROUP}/run"  # the run's number N (NAME-rN)
RESULT_LABEL = f"{API_GROUP}/result"  # set once the schedule has judged a finished run: Promoted, GateFailed, ...
TRIGGER_ANNOTATION = f"{API_GROUP}/trigger"  # what started a run: schedule (a cron tick) or manual (a request)
TICK_ANNOTATION = f"{API_GROUP}/scheduled-at"  # the cron tick a run was started for
REVISION_ANNOTATION = f"{API_GROUP}/revision"  # the revision an endpoint pod serves
DATA_ANNOTATION = f"{API_GROUP}/data-manifest"  # a run's data manifest (trigger.newData): what it consumed


def run_name(schedule: str, n: int) -> str:
    return f"{schedule}-r{n}"


def run_number(run: dict) -> int:
    return int(((run.get("metadata") or {}).get("labels") or {}).get(RUN_LABEL) or 0)


def number_of(run: str) -> int:
    """N of a run's name NAME-rN."""
    return int(run.rsplit("-r", 1)[1])


def promotion_gate(promotion: Promotion, serving: bool = False) -> dict:
    """The run's evaluation.gate: its model must beat the served one (mustBeat: serving), or with nothing served
    yet the one it started from (mustBeat: base)."""
    gate = {"metric": promotion.metric, "mustBeat": "serving" if serving else "base"}
    return {**gate, "minDelta": promotion.min_delta} if promotion.min_delta else gate


def dedup_index(schedule: FineTuneSchedule, template: dict) -> str:
    """The runs' shared dedup index: what earlier runs trained on (the template's own, if it names one)."""
    given = ((template.get("preprocessing") or {}).get("dedup") or {}).get("index")
    return given or join(template["output"]["uri"], schedule.metadata.name, "dedup-index") + "/"


def run_evaluation(schedule: FineTuneSchedule, template: dict, served_model: str | None) -> dict:
    """The template's evaluation with the promotion gate, the served model to beat and the golden set."""
    promotion = schedule.spec.promotion
    evaluation = {k: v for k, v in (template.get("evaluation") or {}).items() if k not in ("servedModel", "goldenSet")}
    evaluation["gate"] = promotion_gate(promotion, serving=served_model is not None)
    if served_model:
        evaluation["servedModel"] = served_model
    if promotion.golden_set:
        evaluation["goldenSet"] = promotion.golden_set
    return evaluation


def run_job(schedule: FineTuneSchedule, template: dict, n: int, model: dict, annotations: dict[str, str],
            served_model: str | None = None, data: str | None = None) -> dict:
    """Run N: the template (as the user wrote it) with the model to start from, the promotion gate against the
    served model (``served_model``, None before the first promotion), the golden set, the schedule's dedup
    index, no endpoint of its own (the schedule serves), an output location of its own, and with trigger.newData
    its data manifest (``data``)."""
    name, spec = run_name(schedule.metadata.name, n), copy.deepcopy(template)
    spec["model"] = model
    if data:
        spec["dataset"] = {**spec["dataset"], "train": data}
    spec["evaluation"] = run_evaluation(schedule, template, served_model)
    pre = spec.setdefault("preprocessing", {})
    pre["dedup"] = {**(pre.get("dedup") or {}), "index": dedup_index(schedule, template)}
    spec["serve"] = {"enabled": False}
    spec["output"] = {"uri": join(template["output"]["uri"], name) + "/"}
    given = (schedule.metadata.model_extra or {}).get("labels") or {}
    queue = {k: v for k, v in given.items() if k.startswith(KUEUE_PREFIX)}  # a run queues where its schedule says
    labels = {**queue, SCHEDULE_LABEL: schedule.metadata.name, RUN_LABEL: str(n)}
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND,
            "metadata": {"name": name, "namespace": schedule.metadata.namespace, "labels": labels,
                         "annotations": annotations},
            "spec": spec}


def revision_metrics(progress_metrics: dict, evaluation: dict) -> dict[str, float]:
    """A promoted run's figures for status.revisions[].metrics: its own (valid_loss, ...) and, side by side, the
    model it was compared with (served_valid_loss, or base_ before anything was served), on the validation split
    and the golden set (golden_valid_loss, served_golden_valid_loss, ...)."""
    figures = {k: float(v) for k, v in progress_metrics.items() if k.startswith("valid_") and _number(v)}
    summary = progress_metrics.get("evaluation") if isinstance(progress_metrics.get("evaluation"), dict) else {}
    for prefix, part in (("", summary), ("golden_", summary.get("golden") or {})):
        for metric, columns in part.items():
            if metric == "golden" or not isinstance(columns, dict):
                continue
            other = "served" if "served" in columns else "base"
            for key, value in ((f"{prefix}{metric}", columns.get("fineTuned")),
                               (f"{other}_{prefix}{metric}", columns.get(other))):
                if _number(value):
                    figures[key] = float(value)
    if _number(evaluation.get("value")) and not summary.get("golden"):
        figures[evaluation["metric"]] = float(evaluation["value"])
    return figures


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def run_annotations(trigger: str, tick: str | None, request: str | None, data: str | None = None) -> dict[str, str]:
    """What started a run, on the run itself: a crash before the schedule's status is written does not start it twice."""
    out = {TRIGGER_ANNOTATION: trigger, **({DATA_ANNOTATION: data} if data else {})}
    if tick:
        out[TICK_ANNOTATION] = tick
    if request:
        out[RETRAIN_ANNOTATION] = request
    return out


def _as_job(schedule: FineTuneSchedule) -> FineTuneJob:
    """The schedule as a FineTuneJob of its name, serving as spec.serve says: what the job's builders take."""
    serve = Serve(enabled=True, **schedule.spec.serve.model_dump(exclude={"enabled"}))
    new_data = schedule.spec.trigger.new_data
    if serve.capture and not serve.capture.feedback_uri and new_data:  # rated replies become the next run's data
        serve.capture = serve.capture.model_copy(update={"feedback_uri": join(new_data.uri, "feedback") + "/"})
    meta = Metadata(name=schedule.metadata.name, namespace=schedule.metadata.namespace)
    return FineTuneJob(apiVersion=f"{API_GROUP}/{API_VERSION}", kind=KIND, metadata=meta,
                       spec=schedule.spec.job_template.model_copy(update={"serve": serve}))


def _relabel(obj: dict, name: str) -> dict:
    """The schedule's label in place of the job's, on the object, its pods and its selector."""
    parts = [obj["metadata"]["labels"], obj["spec"]["selector"]]
    if obj["kind"] == "Deployment":
        parts = [obj["metadata"]["labels"], obj["spec"]["selector"]["matchLabels"],
                 obj["spec"]["template"]["metadata"]["labels"]]
    for labels in parts:
        labels.pop(children.JOB_LABEL, None)
        labels[SCHEDULE_LABEL] = name
    return obj


def serving_deployment(schedule: FineTuneSchedule, revision: int, model_uri: str, settings: Settings) -> dict:
    deployment = _relabel(children.serving_deployment(_as_job(schedule), model_uri, settings), schedule.metadata.name)
    deployment["spec"]["strategy"] = {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    deployment["metadata"]["annotations"] = {REVISION_ANNOTATION: str(revision)}
    deployment["spec"]["template"]["metadata"]["annotations"] = {REVISION_ANNOTATION: str(revision)}
    return deployment


def serving_service(schedule: FineTuneSchedule) -> dict:
    return _relabel(children.serving_service(_as_job(schedule)), schedule.metadata.name)


def serving_endpoint(schedule: FineTuneSchedule) -> str:
    return children.serving_endpoint(_as_job(schedule))
