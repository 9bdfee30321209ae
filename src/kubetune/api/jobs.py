"""Pure translations between OpenAI's fine-tuning objects and FineTuneJobs: dicts in, dicts out.

A job created through the API keeps what the caller asked for (model, files, suffix, metadata,
hyperparameters, method) in one annotation, so reading it back needs nothing but the FineTuneJob.
Statuses: Pending/Preparing → validating_files; Training before its first step → queued; Training →
running; Suspended → paused; Succeeded → succeeded; Failed → failed; cancelled through the API →
cancelled (the job is suspended and marked, keeping its progress).
Methods: supervised (objective sft), dpo (objective dpo), reinforcement (objective rft; reinforcement.py maps
its grader and hyperparameters).
"""

from __future__ import annotations

import calendar
import copy
import csv
import io
import json
import re
import secrets
import time
from dataclasses import dataclass, field

from kubetune.api import reinforcement as R
from kubetune.openai_errors import RequestError
from kubetune.spec import API_GROUP, API_VERSION, SpecError, parse_job
from kubetune.storage import join

ANNOTATION = "kubetune.dev/openai"
CANCELLED = "kubetune.dev/cancelled-at"
API_LABEL = "kubetune.dev/created-by"
SUFFIX = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}  # spec.training.learningRate's defaults, scaled by the multiplier
LIMITS = {"n_epochs": (1, 50), "batch_size": (1, 256), "learning_rate_multiplier": (1e-3, 10.0), "beta": (1e-3, 2.0),
          **R.LIMITS}
INTEGERS = ("n_epochs", "batch_size", "eval_interval", "eval_samples")
COMMON = ("n_epochs", "batch_size", "learning_rate_multiplier")
METHODS = {"supervised": COMMON, "dpo": COMMON + ("beta",), "reinforcement": COMMON + R.EXTRA}
# OpenAI trains on every line its file check accepted: a one-letter answer (a classification label) is no
# "too short" reply to drop, as the spec's cleaning default would. api.jobDefaults can set it back.
API_DEFAULTS = {"preprocessing": {"minChars": 0}}
SHAPES = {"supervised": "chat", "dpo": "preference", "reinforcement": "reinforcement"}  # files.py's kinds
NEEDS = {"chat": "chat examples", "preference": "preference pairs (input, preferred_output, non_preferred_output)",
         "reinforcement": "reinforcement prompts (messages without a final assistant turn, plus item fields)"}
BUILTIN_MODELS = {f"kubetune-{size}": {"fromConfig": {"size": size}} for size in ("tiny", "small", "base")}


@dataclass
class ApiSettings:
    files_uri: str  # s3://bucket/prefix/: uploaded files, one folder per namespace
    outputs_uri: str  # jobs' outputs, NAMESPACE/JOB/ under it
    storage: dict = field(default_factory=dict)  # spec.storage of every job (endpoint, credentialsSecret)
    job_defaults: dict = field(default_factory=dict)  # a partial spec under every job (resources, serve...)
    models: dict = field(default_factory=dict)  # model name → spec.model, beside BUILTIN_MODELS
    default_namespace: str = "default"
    audiences: list = field(default_factory=lambda: ["kubetune"])  # callers' tokens must be made for one of these


def load_settings(path: str | None, **overrides) -> ApiSettings:
    """The server's settings from a YAML file (camelCase keys, as the chart writes it) and flags."""
    import yaml

    doc = yaml.safe_load(open(path, encoding="utf-8")) if path else {}
    keys = {"filesUri": "files_uri", "outputsUri": "outputs_uri", "storage": "storage", "jobDefaults": "job_defaults",
            "models": "models", "defaultNamespace": "default_namespace", "audiences": "audiences"}
    unknown = sorted(set(doc or {}) - set(keys))
    if unknown:
        raise ValueError(f"{path}: unknown setting {unknown[0]!r} (known: {', '.join(keys)})")
    values = {keys[k]: v for k, v in (doc or {}).items() if v is not None}
    for key, value in overrides.items():
        if value is not None:  # a flag beats the file; storage settings merge
            values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    if not values.get("files_uri") or not values.get("outputs_uri"):
        raise ValueError("kubetune api needs filesUri and outputsUri (--files, --outputs or the config file)")
    return ApiSettings(**values)


def bad(message: str, param: str | None = None, code: str | None = None, status: int = 400) -> RequestError:
    return RequestError(status, message, param, code)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def new_id(prefix: str, random_bytes: int = 4) -> str:
    """An id that sorts by creation time (milliseconds first, then random): lists come newest first even
    for jobs or files created within one second, which creationTimestamp cannot tell apart."""
    return f"{prefix}-{int(time.time() * 1000):012x}{secrets.token_hex(random_bytes)}"


def timestamp(text: str | None) -> int | None:
    """Unix seconds of an RFC 3339 time as Kubernetes writes it (UTC, 'Z')."""
    if not text:
        return None
    return calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))


# --- model names ------------------------------------------------------------------------------

def fine_tuned_model(base: str, namespace: str, suffix: str | None, name: str) -> str:
    """``ft:BASE:NAMESPACE:SUFFIX:JOB`` as OpenAI's ``ft:BASE:ORG:SUFFIX:ID``; BASE loses ':' and paths."""
    short = base.rstrip("/").rsplit("/", 1)[-1].replace(":", "-") or "model"
    return f"ft:{short}:{namespace}:{suffix or ''}:{name}"


def parse_model(model: str) -> tuple[str, str, str | None] | None:
    """(namespace, job name, checkpoint step-N or None) of a fine-tuned model name; None for others."""
    if not model.startswith("ft:"):
        return None
    parts = model.split(":")
    checkpoint = None
    if parts[-1].startswith("ckpt-"):
        checkpoint = parts.pop().removeprefix("ckpt-")
    if len(parts) < 5:
        return None
    return parts[-3], parts[-1], checkpoint


def resolve_model(model: object, namespace: str, settings: ApiSettings) -> dict:
    if not isinstance(model, str) or not model:
        raise bad("model is required: a base model name, an s3:// model or a fine-tuned ft: model", "model")
    catalog = {**BUILTIN_MODELS, **settings.models}
    if model in catalog:
        return copy.deepcopy(catalog[model])
    if model.startswith("s3://"):
        return {"source": model}
    parsed = parse_model(model)
    if parsed:
        ns, name, checkpoint = parsed
        if ns != namespace or checkpoint:
            raise bad(f"model {model!r}: only final fine-tuned models of this project can be trained further",
                      "model", "model_not_available")
        return {"fromJob": name}
    raise bad(f"model {model!r} is not available; use one of {', '.join(sorted(catalog))}, an s3:// model "
              "folder or a fine-tuned ft: model", "model", "model_not_available")


# --- creating a job ---------------------------------------------------------------------------

def _hyperparameter(value: object, key: str, param: str) -> float | int | str | None:
    if value is None or value == "auto":
        return None
    if key == "reasoning_effort":  # kept for reading back; kubetune's models have no reasoning mode
        if value not in R.EFFORTS:
            raise bad(f"{param} must be one of {', '.join(R.EFFORTS)}", param)
        return value
    low, high = LIMITS[key]
    kind = int if key in INTEGERS else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        raise bad(f"{param} must be 'auto' or a number from {low} to {high}", param)
    return value


def method_and_hyperparameters(body: dict) -> tuple[str, dict, dict]:
    """The method type, its hyperparameters (method's own override the deprecated top-level ones) and the
    parameter each came from, for errors."""
    method = body.get("method") or {"type": "supervised"}
    if not isinstance(method, dict) or method.get("type") not in METHODS:
        raise bad("method.type must be 'supervised', 'dpo' or 'reinforcement'", "method.type")
    kind = method["type"]
    top = body.get("hyperparameters") or {}
    if not isinstance(method.get(kind) or {}, dict):
        raise bad(f"method.{kind} must be an object", f"method.{kind}")
    inner = (method.get(kind) or {}).get("hyperparameters") or {}
    if not isinstance(top, dict) or not isinstance(inner, dict):
        raise bad("hyperparameters must be an object", "hyperparameters")
    allowed = set(METHODS[kind])
    merged = {**top, **inner}
    params = {k: f"method.{kind}.hyperparameters.{k}" if k in inner else f"hyperparameters.{k}" for k in allowed}
    unknown = sorted(set(merged) - allowed)
    if unknown:
        raise bad(f"unknown hyperparameter {unknown[0]!r} for method {kind}", f"hyperparameters.{unknown[0]}")
    return kind, {k: _hyperparameter(merged.get(k), k, params[k]) for k in sorted(allowed)}, params


def _metadata(value: object) -> dict:
    if value is None:
        return {}
    ok = (isinstance(value, dict) and len(value) <= 16
          and all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in value.items()))
    if not ok:
        raise bad("metadata: at most 16 string keys (up to 64 characters) with string values (up to 512)", "metadata")
    return value


def job_document(body: dict, name: str, namespace: str, files: dict[str, dict], settings: ApiSettings) -> dict:
    """The FineTuneJob for a create request; ``files`` maps file ids to their stored records."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    known = {"model", "training_file", "validation_file", "suffix", "seed", "metadata", "hyperparameters",
             "method", "integrations"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad(f"unknown parameter {unknown[0]!r}", unknown[0])
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not SUFFIX.match(suffix)):
        raise bad("suffix: up to 64 letters, digits, '.', '_' or '-'", "suffix")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**31 - 1):
        raise bad("seed must be an integer from 0 to 2147483647", "seed")
    kind, hp, params = method_and_hyperparameters(body)
    grader = R.job_grader(body["method"]) if kind == "reinforcement" else None
    model = resolve_model(body.get("model"), namespace, settings)
    dataset = {"train": _file_uri(files, body.get("training_file"), "training_file", kind, grader)}
    examples = files[body["training_file"]]["kinds"][SHAPES[kind]]
    if hp["batch_size"] is not None and hp["batch_size"] > examples:  # packing makes at most a row per example
        raise bad(f"batch_size {hp['batch_size']} is larger than the {examples} examples of training_file "
                  f"{body['training_file']}: no batch that size can be filled; use fewer or 'auto'",
                  params["batch_size"], "invalid_batch_size")
    if body.get("validation_file") is not None:
        dataset["validation"] = _file_uri(files, body["validation_file"], "validation_file", kind, grader)

    spec = deep_merge(deep_merge(API_DEFAULTS, settings.job_defaults), {"model": model, "dataset": dataset})
    training = spec.setdefault("training", {})
    if kind == "dpo":
        training["objective"] = "dpo"
    if hp["n_epochs"] is not None:
        training["epochs"] = hp["n_epochs"]
    if hp["batch_size"] is not None:
        training["globalBatchSize"] = hp["batch_size"]
        if isinstance(training.get("microBatchSize"), int):  # else auto: the trainer fits it to the batch
            training["microBatchSize"] = min(training["microBatchSize"], hp["batch_size"])
    if hp["learning_rate_multiplier"] is not None:
        training["learningRate"] = DEFAULT_LR[training.get("method", "lora")] * hp["learning_rate_multiplier"]
    if kind == "dpo" and hp["beta"] is not None:
        training["dpo"] = {**training.get("dpo", {}), "beta": hp["beta"]}
    if grader is not None:
        R.apply(spec, grader, hp)
    if seed is not None:
        training["seed"] = seed
    spec["output"] = {"uri": join(settings.outputs_uri, namespace, name) + "/"}
    if settings.storage:
        spec["storage"] = settings.storage
    asked = {"model": body["model"], "training_file": body.get("training_file"),
             "validation_file": body.get("validation_file"), "suffix": suffix, "seed": seed,
             "metadata": _metadata(body.get("metadata")), "method": kind}
    if hp.get("reasoning_effort"):
        asked["reasoning_effort"] = hp["reasoning_effort"]
    doc = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "FineTuneJob",
           "metadata": {"name": name, "namespace": namespace, "labels": {API_LABEL: "openai-api"},
                        "annotations": {ANNOTATION: json.dumps(asked)}},
           "spec": spec}
    try:
        parse_job(doc, "fine-tuning job")
    except SpecError as e:  # the defaults and the request together must make a valid job
        raise bad("; ".join(e.problems), "hyperparameters") from None
    return doc


def _file_uri(files: dict[str, dict], file_id: object, param: str, kind: str, grader=None) -> str:
    if not isinstance(file_id, str) or not file_id:
        raise bad(f"{param} is required: the id of an uploaded file", param)
    record = files.get(file_id)
    if record is None:
        raise bad(f"{param}: no such file: {file_id}", param, "file_not_found")
    if record["status"] != "processed":
        raise bad(f"{param}: file {file_id} is not usable: {record.get('status_details')}", param, "invalid_file")
    if not record.get("kinds", {}).get(SHAPES[kind]):
        raise bad(f"{param}: file {file_id} has no {NEEDS[SHAPES[kind]]}, which method {kind} needs", param,
                  "invalid_file")
    if grader is not None:
        R.check_item_fields(grader, record, file_id, param)
    return record["uri"]


# --- reading a job ----------------------------------------------------------------------------

def asked(ftj: dict) -> dict:
    try:
        return json.loads(ftj["metadata"].get("annotations", {}).get(ANNOTATION, "{}"))
    except ValueError:
        return {}


def openai_status(ftj: dict) -> str:
    status = ftj.get("status") or {}
    if ftj["metadata"].get("annotations", {}).get(CANCELLED):
        return "cancelled"
    phase = status.get("phase")
    if phase == "Training":
        progress = status.get("progress") or {}
        return "running" if progress.get("step") else "queued"
    return {"Suspended": "paused", "Succeeded": "succeeded", "Failed": "failed"}.get(phase, "validating_files")


def job_object(ftj: dict) -> dict:
    meta, spec, status = ftj["metadata"], ftj["spec"], ftj.get("status") or {}
    a, training = asked(ftj), spec.get("training", {})
    state, name = openai_status(ftj), meta["name"]
    model = a.get("model") or _model_label(spec.get("model", {}))
    lr = training.get("learningRate")
    progress, report = status.get("progress") or {}, status.get("dataReport") or {}
    # "auto" until the trainer has fitted it to the data and written it to status
    batch = progress.get("globalBatchSize") or training.get("globalBatchSize") or "auto"
    hp = {"n_epochs": training.get("epochs", 3), "batch_size": batch,
          "learning_rate_multiplier": round(lr / DEFAULT_LR[training.get("method", "lora")], 6) if lr else 1.0}
    method = _method(spec, a, hp)
    tokens = report.get("trainTokens")
    trained = int(tokens * min(progress.get("epoch", 0), hp["n_epochs"])) if tokens and progress else None
    eta = progress.get("etaSeconds")
    return {
        "id": name, "object": "fine_tuning.job", "created_at": timestamp(meta.get("creationTimestamp")),
        "model": model, "organization_id": meta["namespace"],
        "status": state,
        "error": ({"code": status.get("reason") or "failed", "message": status.get("message") or "", "param": None}
                  if state == "failed" else None),
        "fine_tuned_model": (fine_tuned_model(model, meta["namespace"], a.get("suffix"), name)
                             if state == "succeeded" else None),
        "finished_at": timestamp(status.get("completionTime")) if state in ("succeeded", "failed") else None,
        "hyperparameters": hp, "method": method,
        "training_file": a.get("training_file") or spec.get("dataset", {}).get("train"),
        "validation_file": a.get("validation_file") or spec.get("dataset", {}).get("validation"),
        "result_files": [result_file_id(name)] if state == "succeeded" else [], "trained_tokens": trained, "seed": training.get("seed", 42),
        "estimated_finish": (timestamp(progress.get("updatedAt")) or int(time.time())) + eta
        if state == "running" and eta else None,
        "integrations": [], "metadata": a.get("metadata") or None, "user_provided_suffix": a.get("suffix"),
    }


def _method(spec: dict, asked: dict, hp: dict) -> dict:
    training = spec.get("training", {})
    objective = training.get("objective")
    if objective == "rft":
        return R.method_object(spec, asked, hp)
    if objective == "dpo":
        return {"type": "dpo", "dpo": {"hyperparameters": {**hp, "beta": (training.get("dpo") or {}).get("beta", 0.1)}}}
    return {"type": "supervised", "supervised": {"hyperparameters": dict(hp)}}


# --- a job's results file -----------------------------------------------------------------------
# OpenAI lists a succeeded job's per-step metrics as a file (purpose fine-tune-results). Here it is no stored
# file: its id names the job, and it is made from the job's metrics.csv whenever it is read, so nothing has
# to notice the job finishing, and deleting the job's output is deleting it. GET /v1/files does not list it.

RESULTS_PREFIX = "file-results-"
JOB_NAME = re.compile(r"^[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?$")
RESULT_COLUMNS = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]  # OpenAI's
RFT_RESULT_COLUMNS = ["step", "train_loss", "train_reward_mean", "valid_reward_mean"]  # rewards, OpenAI's names


def result_file_id(job: str) -> str:
    return RESULTS_PREFIX + job


def results_job(file_id: str) -> str | None:
    """The job whose results file ``file_id`` names, or None for other files."""
    job = file_id.removeprefix(RESULTS_PREFIX)
    return job if file_id.startswith(RESULTS_PREFIX) and JOB_NAME.match(job) else None


def results_csv(metric_rows: list[dict], objective: str = "sft") -> bytes:
    """OpenAI's step_metrics.csv from the rows of the trainer's metrics.csv (a row lacking a value: empty);
    an rft job's has its rewards in place of token accuracy and loss on held-out answers, which it has none of."""
    columns = RFT_RESULT_COLUMNS if objective == "rft" else RESULT_COLUMNS
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row.get(k) or "" for k in columns} for row in map(R.with_openai_names, metric_rows))
    return out.getvalue().encode()


def results_file(ftj: dict, content: bytes) -> dict:
    job = job_object(ftj)
    return {"id": result_file_id(job["id"]), "object": "file", "bytes": len(content),
            "created_at": job["finished_at"] or job["created_at"], "filename": "step_metrics.csv",
            "purpose": "fine-tune-results", "status": "processed", "status_details": None, "expires_at": None}


def _model_label(model: dict) -> str:
    if "fromConfig" in model:
        return f"kubetune-{model['fromConfig'].get('size', 'tiny')}"
    return model.get("source") or model.get("fromJob") or "model"


def checkpoint_objects(ftj: dict) -> list[dict]:
    """Newest first, as OpenAI lists them."""
    job, status = job_object(ftj), ftj.get("status") or {}
    base = fine_tuned_model(job["model"], ftj["metadata"]["namespace"], job["user_provided_suffix"], job["id"])
    created = job["created_at"]
    out = []
    for c in status.get("checkpoints") or []:
        metrics = {"step": c["step"], **R.with_openai_names(c.get("metrics") or {})}
        out.append({"id": f"ftckpt-{job['id']}-{c['step']}", "object": "fine_tuning.job.checkpoint",
                    "created_at": created, "fine_tuned_model_checkpoint": f"{base}:ckpt-{c['name']}",
                    "fine_tuning_job_id": job["id"], "step_number": c["step"], "metrics": metrics,
                    "best": bool(c.get("best"))})
    return sorted(out, key=lambda c: -c["step_number"])


def event_objects(ftj: dict, kube_events: list[dict], metric_rows: list[dict]) -> list[dict]:
    """The job's life from its Kubernetes Events, a metrics event per logged step, newest first."""
    job = job_object(ftj)
    events = [_event(f"{job['id']}-created", job["created_at"], "info", f"Created fine-tuning job: {job['id']}")]
    for e in kube_events:
        when = timestamp(e.get("lastTimestamp") or e.get("eventTime") or e.get("firstTimestamp")) or job["created_at"]
        level = "warn" if e.get("type") == "Warning" else "info"
        events.append(_event(e["metadata"]["uid"], when, level, f"{e.get('reason')}: {e.get('message', '')}"))
    updated = timestamp(((ftj.get("status") or {}).get("progress") or {}).get("updatedAt")) or job["created_at"]
    total = ((ftj.get("status") or {}).get("progress") or {}).get("totalSteps")
    for row in metric_rows:
        data = R.with_openai_names({k: _num(v) for k, v in row.items() if v not in ("", None)})
        step = int(data.get("step", 0))
        text = ", ".join(f"{k}={v:.4g}" for k, v in data.items() if k.endswith(("loss", "accuracy", "_reward_mean")))
        events.append({**_event(f"{job['id']}-step-{step}", updated, "info",
                                f"Step {step}{f'/{total}' if total else ''}: {text}"), "type": "metrics", "data": data})
    if job["status"] == "succeeded":
        events.append(_event(f"{job['id']}-model", job["finished_at"] or updated, "info",
                             f"New fine-tuned model created: {job['fine_tuned_model']}"))
    ordered = sorted(enumerate(events), key=lambda p: (p[1]["created_at"], p[0]), reverse=True)
    return [e for _, e in ordered]


def _event(ident: str, when: int, level: str, message: str) -> dict:
    return {"id": f"ftevent-{ident}", "object": "fine_tuning.job.event", "created_at": when, "level": level,
            "message": message, "type": "message", "data": None}


def _num(text: object) -> float | int | object:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text
    return int(value) if value.is_integer() else value


def page(items: list[dict], after: str | None, limit: object) -> dict:
    """OpenAI's cursor pages: items after the one with id ``after``, at most ``limit`` (1-100, 20 when absent)."""
    try:
        n = int(limit) if limit is not None else 20
    except ValueError:
        raise bad("limit must be an integer from 1 to 100", "limit") from None
    if not 1 <= n <= 100:
        raise bad("limit must be an integer from 1 to 100", "limit")
    if after:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise bad(f"after: no item {after}", "after")
        items = items[ids.index(after) + 1:]
    return {"object": "list", "data": items[:n], "has_more": len(items) > n}
