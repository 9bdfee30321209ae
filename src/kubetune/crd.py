"""Generate the CustomResourceDefinitions (FineTuneJob, FineTuneSchedule) from the spec models.

Kubernetes wants a *structural* schema: no $ref, a type on every node, no anyOf for optional
fields. Pydantic's JSON schema is turned into that here: references inlined, ``X | None``
collapsed to X, titles dropped, defaults moved into the description (so the API server does not
write every default into stored objects, and ``kubectl explain`` still shows them).
"""

from __future__ import annotations

from typing import Any

from kubetune.schedule_spec import SCHEDULE_KIND, SCHEDULE_NAME_MAX, SCHEDULE_PLURAL, FineTuneScheduleSpec, ScheduleStatus
from kubetune.spec import API_GROUP, API_VERSION, JOB_NAME, KIND, PLURAL, FineTuneJobSpec
from kubetune.status import Status

CRD_FILE = f"crds/{PLURAL}.{API_GROUP}.yaml"
SCHEDULE_CRD_FILE = f"crds/{SCHEDULE_PLURAL}.{API_GROUP}.yaml"


def _structural(node: Any, defs: dict) -> Any:
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    node = dict(node)
    if node.get("x-kubernetes-preserve-unknown-fields") and "oneOf" in node:
        # A union on a tag (training.rft.grader): an open object here, validated by the models themselves.
        return {k: node[k] for k in ("type", "description", "x-kubernetes-preserve-unknown-fields") if k in node}
    options = node.pop("anyOf", None)
    if options is not None:
        real = [o for o in options if o.get("type") != "null"]
        if len(real) == 1:
            return _structural({**real[0], **node}, defs)
        elif sorted(o.get("type") for o in real) == ["integer", "string"]:
            # int | Literal["auto"]: Kubernetes' int-or-string, its values checked by a rule
            number, word = sorted(real, key=lambda o: o["type"])
            words = word.get("enum") or [word["const"]]
            rule = f"type(self) == int ? self >= {number.get('minimum', 0)} : self in {words!r}".replace("'", '"')
            node["x-kubernetes-int-or-string"] = True
            node["x-kubernetes-validations"] = [{"rule": rule, "message": f"a number of at least "
                                                 f"{number.get('minimum', 0)}, or one of: {', '.join(words)}"}]
        elif all(o.get("type") in ("string", "array") for o in real):
            # str | list[str] has no structural type; accept any value, the model validates it.
            node["x-kubernetes-preserve-unknown-fields"] = True
        else:
            raise ValueError(f"cannot express {options} in a structural schema")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "additionalProperties" and value in ({}, True):  # dict[str, Any]: any value, kept as it is
            out["x-kubernetes-preserve-unknown-fields"] = True
            continue
        if key in ("title", "$defs", "default") or (key == "additionalProperties" and not isinstance(value, dict)):
            continue  # extra="forbid" gives additionalProperties: false, which structural schemas reject
        if key == "properties":
            out[key] = {name: _structural(v, defs) for name, v in value.items()}
        else:
            out[key] = _structural(value, defs)
    default = node.get("default")
    if default is not None and not isinstance(default, (dict, list)):
        shown = str(default).lower() if isinstance(default, bool) else default
        out["description"] = f"{out.get('description', '').rstrip()} Default: {shown}.".strip()
    if "const" in out:  # not in Kubernetes' schema dialect
        out["enum"] = [out.pop("const")]
    if "exclusiveMinimum" in out:  # OpenAPI v3.0 form
        out["minimum"], out["exclusiveMinimum"] = out.pop("exclusiveMinimum"), True
    if "exclusiveMaximum" in out:
        out["maximum"], out["exclusiveMaximum"] = out.pop("exclusiveMaximum"), True
    return out


def _schema(model) -> dict:
    raw = model.model_json_schema(by_alias=True)
    return _structural(raw, raw.get("$defs", {}))


def spec_schema() -> dict:
    return _schema(FineTuneJobSpec)


def status_schema() -> dict:
    return _schema(Status)


def _name_rules(max_length: int, why: str, names: str) -> list[dict]:
    return [{
        "rule": f"size(self.metadata.name) <= {max_length}",
        "message": f"metadata.name must be at most {max_length} characters ({why})",
    }, {  # Kubernetes allows dots in a custom object's name; Services and pod hostnames do not
        "rule": f"self.metadata.name.matches(r'{JOB_NAME}')",
        "message": f"metadata.name must be lowercase letters, digits and '-' (no dots): it names {names}",
    }]


def _definition(kind: str, plural: str, short: str, description: str, name_rules: list[dict], spec: dict,
                status: dict, printer: list[dict]) -> dict:
    schema = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "x-kubernetes-validations": name_rules,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                      "shortNames": [short], "categories": ["kubetune"]},
            "scope": "Namespaced",
            "versions": [{
                "name": API_VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": printer,
                "schema": {"openAPIV3Schema": schema},
            }],
        },
    }


def crd(kind: str = "job") -> dict:
    """The CustomResourceDefinition of FineTuneJob (job) or FineTuneSchedule (schedule)."""
    if kind == "schedule":
        return schedule_crd()
    printer = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Reason", "type": "string", "jsonPath": ".status.reason"},  # Queued, Preempted (Kueue), Retrying, ...
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress.percent"},
        {"name": "Train Loss", "type": "number", "jsonPath": ".status.progress.metrics.train_loss"},
        {"name": "Valid Loss", "type": "number", "jsonPath": ".status.progress.metrics.valid_loss"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        # -o wide only (priority 1): cost and speed
        {"name": "Tokens/s", "type": "number", "jsonPath": ".status.progress.tokensPerSecond", "priority": 1},
        {"name": "GPU-Hours", "type": "number", "jsonPath": ".status.progress.gpuHours", "priority": 1},
        {"name": "MFU", "type": "number", "jsonPath": ".status.progress.mfu", "priority": 1},
        {"name": "ETA", "type": "integer", "jsonPath": ".status.progress.etaSeconds", "priority": 1},
        {"name": "Eval", "type": "boolean", "jsonPath": ".status.evaluation.passed", "priority": 1},
    ]
    rules = _name_rules(40, "child objects and pod hostnames add suffixes", "the job's Services and pods")
    return _definition(KIND, PLURAL, "ftj", "A fine-tuning job: data in, a tuned chat model out.", rules,
                       spec_schema(), status_schema(), printer)


def schedule_crd() -> dict:
    printer = [
        {"name": "Serving", "type": "integer", "jsonPath": ".status.servedRevision",
         "description": "The revision the endpoint serves"},
        {"name": "Last Run", "type": "string", "jsonPath": ".status.lastRun.name"},
        {"name": "Last Result", "type": "string", "jsonPath": ".status.lastResult.result"},
        {"name": "Next Run", "type": "string", "jsonPath": ".status.nextRun"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Schedule", "type": "string", "jsonPath": ".spec.schedule", "priority": 1},
        {"name": "Suspend", "type": "boolean", "jsonPath": ".spec.suspend", "priority": 1},
        {"name": "Model", "type": "string", "jsonPath": ".status.servedModel", "priority": 1},
    ]
    rules = _name_rules(SCHEDULE_NAME_MAX, "its runs are NAME-rN, FineTuneJobs of at most 40",
                        "its runs and its endpoint's Service")
    return _definition(SCHEDULE_KIND, SCHEDULE_PLURAL, "fts", "A model kept up to date: runs (FineTuneJobs) on a "
                       "schedule or on request, each promoted and served when it beats the served model.", rules,
                       _schema(FineTuneScheduleSpec), _schema(ScheduleStatus), printer)
