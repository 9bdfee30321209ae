"""Fuzzing FineTuneJob documents against the real API server, with the operator running.

Documents are generated (hypothesis) from the CRD's own openAPIV3Schema, then most are mutated:
wrong types, out-of-range numbers, unknown fields, missing required fields, huge strings, odd
unicode, both model.source and fromJob, bad names. Each one must be either rejected at admission
with a message naming a field, or accepted and then carried by the operator to a phase with
conditions and a reason, within a bounded time, through every stage: created, prepare Job finished,
training Job finished (and the endpoint deployed when serve is on). The operator must keep running
without an unhandled traceback.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import ROOT
from k8s_helpers import operator
from test_operator_restarts import GROUP, MANAGED, PLURAL, VERSION, patch_job_status

pytestmark = pytest.mark.k8s

CRD = yaml.safe_load((ROOT / "crds" / "finetunejobs.kubetune.dev.yaml").read_text())
SPEC_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]

# Strings that have broken parsers before: control characters, NUL, bidi overrides, zero-width
# joiners, combining marks, emoji, a lone surrogate (JSON allows the escape), very long runs.
ODD = ["", " ", "\x00", "a\x00b", "\u202eevil", "z\u200dw\u200dj", "e\u0301\u0301\u0301", "\U0001f600" * 3,
       "\ud800", "../../etc/passwd", "s3://", "hf://", "${HOME}", "$(NODE_RANK)", "{model}", "a\nb", "\t",
       "Ω≈ç√∫", "ｆｕｌｌ", "null", "true", "1e400", "-1", "NaN", "500m", "1Gi", "0x10"]


def _text(node: dict) -> st.SearchStrategy:
    limit = min(node.get("maxLength", 40), 40)
    if "pattern" in node:
        return st.from_regex(node["pattern"], fullmatch=True).filter(lambda s: len(s) <= node.get("maxLength", 10**6))
    return st.one_of(st.text(min_size=node.get("minLength", 0), max_size=limit), st.sampled_from(ODD))


def from_schema(node: dict) -> st.SearchStrategy:
    """Values the schema allows (types, enums, bounds, required fields); CEL rules are not considered."""
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if node.get("x-kubernetes-int-or-string"):  # microBatchSize: a number or "auto"
        return st.one_of(st.integers(min_value=-2, max_value=64), st.sampled_from(["auto", "Auto", "8", ""]))
    if "type" not in node:  # x-kubernetes-preserve-unknown-fields: anything
        return st.one_of(st.text(max_size=20), st.lists(st.text(max_size=20), max_size=3), st.integers())
    kind = node["type"]
    if kind == "object":
        if "properties" not in node:
            return st.dictionaries(st.sampled_from(["disk", "zone", "kubernetes.io/arch", "a/b", "Bad Key", "x" * 70]),
                                   from_schema(node.get("additionalProperties") or {"type": "string"}), max_size=3)
        required = set(node.get("required", []))
        props = node["properties"]
        return st.fixed_dictionaries({k: from_schema(v) for k, v in props.items() if k in required},
                                     optional={k: from_schema(v) for k, v in props.items() if k not in required})
    if kind == "string":
        return _text(node)
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        return st.lists(from_schema(node["items"]), max_size=min(node.get("maxItems", 3), 3))
    lo, hi = node.get("minimum"), node.get("maximum")
    if kind == "integer":
        lo = None if lo is None else int(lo) + (1 if node.get("exclusiveMinimum") else 0)
        hi = None if hi is None else int(hi) - (1 if node.get("exclusiveMaximum") else 0)
        return st.integers(min_value=lo, max_value=hi if hi is not None else (lo or 0) + 10**4)
    return st.floats(min_value=lo, max_value=hi if hi is not None else 1e6, allow_nan=False, allow_infinity=False,
                     exclude_min=bool(node.get("exclusiveMinimum")), exclude_max=bool(node.get("exclusiveMaximum")))


def _valid(spec: dict) -> dict:
    """Bring a schema-generated spec within the CEL rules: one model source, lora settings only with lora."""
    model = spec["model"]
    keep = next((k for k in ("fromConfig", "source", "fromJob") if k in model), "fromConfig")
    spec["model"] = {keep: model.get(keep, {})}
    if "lora" in spec.get("training", {}) and spec["training"].get("method") == "full":
        del spec["training"]["lora"]
    return spec


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*path, i))


def _set(doc, path, value):
    for part in path[:-1]:
        doc = doc[part]
    doc[path[-1]] = value


WRONG = [None, "", "3", 3, -1, 0, 2**31, 2**63 - 1, 10**30, 3.5, -0.0, 1e-320, 1e300, True, [], [1], {}, {"a": 1},
         "x" * 5000, "\ud800"]
BAD_NAMES = ["1{}", "fz.{}", "Fz-{}", "fz-{}-", "fz-{}" + "x" * 40, "-fz{}", "fz_{}"]
UNKNOWN_KEYS = ["bogus", "formt", "Model", "ünïcode", "x" * 300, "status"]
# Each document gets one of these in turn (hypothesis' own choice among them would be far from even).
KINDS = ["valid", "valid", "wrong_value", "wrong_value", "unknown_field", "drop_field", "huge_string", "odd_string",
         "both_sources", "bad_name"]


@st.composite
def documents(draw) -> tuple[dict, dict]:
    """A spec generated from the schema (within its CEL rules), and the choices its mutation may use."""
    spec = draw(from_schema(SPEC_SCHEMA).map(_valid))
    doc = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {}, "spec": spec}
    choices = {"pick": draw(st.integers(0, 10**6)), "wrong": draw(st.sampled_from(WRONG)), "odd": draw(st.sampled_from(ODD)),
               "huge": draw(st.sampled_from([5000, 70_000, 300_000, 1_200_000])), "name": draw(st.sampled_from(BAD_NAMES)),
               "key": draw(st.sampled_from(UNKNOWN_KEYS))}
    return doc, choices


def mutate(doc: dict, how: str, c: dict) -> dict:
    """Break a valid document one way (``how``), using the drawn choices ``c``."""
    paths = list(_paths(doc["spec"]))[1:]  # every field and list item under spec
    path = ("spec", *paths[c["pick"] % len(paths)])
    strings = [("spec", *p) for p in paths if isinstance(_get(doc["spec"], p), str)] or [("spec", "dataset", "train")]
    if how == "wrong_value":
        _set(doc, path, c["wrong"])
    elif how == "unknown_field":
        target = doc["spec"]
        for part in path[1:]:
            if not isinstance(target[part], dict):
                break
            target = target[part]
        target[c["key"]] = 1
    elif how == "drop_field":
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        del parent[path[-1]]
    elif how == "huge_string":
        _set(doc, strings[c["pick"] % len(strings)], "x" * c["huge"])
    elif how == "odd_string":
        _set(doc, strings[c["pick"] % len(strings)], c["odd"])
    elif how == "both_sources":
        doc["spec"]["model"] = {"source": "hf://org/model", "fromJob": "fz-other"}
    elif how == "bad_name":
        doc["metadata"]["name"] = c["name"]
    return doc


def _get(value, path):
    for part in path:
        value = value[part]
    return value


def generate(n: int) -> list[tuple[str, dict]]:
    """n (mutation, document) pairs, the same on every run (derandomized). Hypothesis is the generator
    here; the checks run on whole batches afterwards (one API round trip per example would be too slow)."""
    drawn: list[tuple[dict, dict]] = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(documents())
    def collect(example):
        drawn.append(example)

    collect()
    out = []
    for i, (doc, choices) in enumerate(drawn[:n]):
        how = KINDS[i % len(KINDS)]
        doc = mutate(doc, how, choices)
        doc["metadata"]["name"] = doc["metadata"].get("name", "fz-{}").format(i)
        out.append((how, doc))
    return out


@dataclass
class Report:
    tried: int = 0
    rejected: int = 0
    accepted: int = 0
    rejected_without_field: list[str] = field(default_factory=list)
    by_kind: dict[str, list[int]] = field(default_factory=dict)  # mutation -> [tried, rejected]
    invalid_spec_after_admission: list[str] = field(default_factory=list)  # accepted, then Failed: InvalidSpec
    stuck: list[str] = field(default_factory=list)  # no phase/condition in time
    ended: dict[str, int] = field(default_factory=dict)  # final phase/reason counts
    operator_alive: bool = True
    tracebacks: int = 0
    seconds: float = 0.0
    digest: str = ""  # of the documents: two runs with the same digest sent the same ones


_FIELD = re.compile(r"\b(spec|metadata)(\.[A-Za-z]|\b)|\bbody\b")


def _condition(body: dict | None) -> tuple[str, str] | None:
    status = (body or {}).get("status") or {}
    conditions = status.get("conditions") or []
    if status.get("phase") and status.get("reason") and conditions and all(c.get("reason") for c in conditions):
        return status["phase"], status["reason"]
    return None


def run_fuzz(cp, namespace: str, n: int, batch: int = 100, stage_timeout: float = 60,
             docs: list[tuple[str, dict]] | None = None) -> Report:
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    api_client = config.new_client_from_config(str(cp.kubeconfig))
    custom, batch_api = client.CustomObjectsApi(api_client), client.BatchV1Api(api_client)
    report = Report()
    docs = docs or generate(n)  # hypothesis also draws constants from the loaded modules: the digest tells
    report.digest = hashlib.sha256(json.dumps(docs).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    start = time.monotonic()
    with operator(cp, namespace) as op:
        for first in range(0, len(docs), batch):
            chunk = docs[first:first + batch]

            def create(item):
                how, doc = item
                try:  # Strict, as kubectl: an unknown field is an error, not a warning
                    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, doc,
                                                           field_validation="Strict", _request_timeout=60)
                    return how, doc, None
                except ApiException as e:
                    try:
                        message = json.loads(e.body).get("message", "")
                    except ValueError:
                        message = str(e.body)
                    return how, doc, f"{e.status}: {message}"

            with ThreadPoolExecutor(4) as pool:
                outcomes = list(pool.map(create, chunk))
            report.tried += len(outcomes)
            accepted = {}
            for how, doc, error in outcomes:
                counts = report.by_kind.setdefault(how, [0, 0])
                counts[0] += 1
                counts[1] += error is not None
                if error is None:
                    accepted[doc["metadata"]["name"]] = (how, doc)
                else:
                    report.rejected += 1
                    if not _FIELD.search(error):
                        report.rejected_without_field.append(f"{how} {doc['metadata']['name']}: {error[:300]}")
            report.accepted += len(accepted)
            bodies = _wait_stage(custom, namespace, accepted, lambda name, body: _condition(body), stage_timeout)
            # Drive the jobs that got so far through their Jobs, as the job controller would, and check
            # that every stage ends in a phase with a reason too.
            for component, done in (("prepare", lambda s: s[0] != "Preparing" or s[1] == "Queued"),
                                    ("train", lambda s: s[0] != "Training" or s[1] == "Queued")):
                for job in batch_api.list_namespaced_job(namespace, label_selector=f"{MANAGED},app.kubernetes.io/component={component}").items:
                    owner = job.metadata.labels.get("kubetune.dev/job")
                    if owner in accepted and not job.status.conditions:
                        patch_job_status(batch_api, namespace, job, succeeded=True)
                bodies = _wait_stage(custom, namespace, accepted,
                                     lambda name, body: _condition(body) and done(_condition(body)) and _served(body),
                                     stage_timeout)
            for name, (how, doc) in accepted.items():
                state = _condition(bodies.get(name))
                # Preparing or Training now, with its Jobs finished, is stuck too (unless queued by Kueue).
                moving = state and state[0] in ("Preparing", "Training") and state[1] != "Queued"
                if state is None or moving or not _served(bodies.get(name)):
                    report.stuck.append(f"{how} {name}: {json.dumps((bodies.get(name) or {}).get('status'))[:300]} "
                                        f"spec {json.dumps(doc['spec'])[:300]}")
                    continue
                key = "/".join(state)
                report.ended[key] = report.ended.get(key, 0) + 1
                if state == ("Failed", "InvalidSpec"):
                    report.invalid_spec_after_admission.append(
                        f"{how} {name}: {bodies[name]['status']['message'][:300]}")
        report.operator_alive = op.poll() is None
        report.tracebacks = Path(op.log_path).read_text().count("Traceback")
    report.seconds = time.monotonic() - start
    return report


def _served(body: dict | None) -> bool:
    """A succeeded job with serve.enabled is done once its endpoint is there."""
    status = (body or {}).get("status") or {}
    wants = (((body or {}).get("spec") or {}).get("serve") or {}).get("enabled")
    return not (status.get("phase") == "Succeeded" and wants and not status.get("endpoint")
                and status.get("reason") != "ServingFailed")


def _wait_stage(custom, namespace: str, accepted: dict, ok, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        bodies = {b["metadata"]["name"]: b for b in
                  custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _request_timeout=30)["items"]}
        if all(ok(name, bodies.get(name)) for name in accepted) or time.monotonic() > deadline:
            return bodies
        time.sleep(1)


def summary(r: Report) -> str:
    rows = [("documents tried", f"{r.tried} (digest {r.digest})"), ("rejected at admission", r.rejected),
            ("  of which without a field in the message", len(r.rejected_without_field)),
            ("  by mutation (rejected/tried)", ", ".join(f"{k} {v[1]}/{v[0]}" for k, v in r.by_kind.items())),
            ("accepted", r.accepted),
            ("  then Failed: InvalidSpec, the operator's own check",
             sum("the API server rejected" not in m for m in r.invalid_spec_after_admission)),
            ("  then Failed: InvalidSpec, a child refused by the API server",
             sum("the API server rejected" in m for m in r.invalid_spec_after_admission)),
            ("  stuck without phase/condition", len(r.stuck)),
            ("  ended as", ", ".join(f"{k} {v}" for k, v in sorted(r.ended.items()))),
            ("operator crashed", "no" if r.operator_alive else "YES"), ("operator tracebacks", r.tracebacks),
            ("wall time", f"{r.seconds:.1f} s")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _check(report: Report, n: int) -> None:
    print(summary(report))
    for line in report.rejected_without_field + report.stuck + report.invalid_spec_after_admission:
        print("  ", line)
    assert report.tried == n
    assert report.operator_alive and report.tracebacks == 0
    assert not report.stuck, report.stuck
    assert not report.rejected_without_field, report.rejected_without_field


def test_fuzzed_documents(control_plane, namespace):
    _check(run_fuzz(control_plane, namespace, 100, stage_timeout=40), 100)


@pytest.mark.slow
def test_fuzzed_documents_many(control_plane, namespace):
    _check(run_fuzz(control_plane, namespace, 500, stage_timeout=90), 500)
