"""The CRD in crds/ is generated from the spec model; these tests catch drift and schemas the API server would reject."""

import pytest
import yaml

from conftest import ROOT
from kubetune.crd import CRD_FILE, SCHEDULE_CRD_FILE, crd


@pytest.mark.parametrize("kind, path", [("job", CRD_FILE), ("schedule", SCHEDULE_CRD_FILE)])
def test_committed_crd_matches_the_spec_model(kind, path):
    committed = yaml.safe_load((ROOT / path).read_text())
    assert committed == crd(kind), f"{path} is stale: regenerate with `kubetune crd --kind {kind} > {path}`"
    chart = yaml.safe_load((ROOT / "charts" / "kubetune" / path).read_text())
    assert chart == committed, f"copy {path} into charts/kubetune/crds/"


def _walk(node, path="spec"):
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", ["job", "schedule"])
def test_schema_is_structural_and_documented(kind):
    schema = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for path, node in _walk(schema):
        for banned in ("$ref", "anyOf", "const", "title", "$defs"):
            assert banned not in node, f"{path} has {banned}"
        assert ("type" in node or node.get("x-kubernetes-preserve-unknown-fields")
                or node.get("x-kubernetes-int-or-string")), f"{path} has no type"
        if path.count(".") >= 2 and "[]" not in path and "{" not in path:
            assert node.get("description"), f"{path} has no description for kubectl explain"


def test_crd_names_and_status():
    spec = crd()["spec"]
    assert spec["names"]["shortNames"] == ["ftj"]
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]][:3] == ["Phase", "Reason", "Progress"]  # Reason: Queued with Kueue, Retrying, ...
    assert "exactly one" in version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["model"]["description"].lower()


def test_only_what_the_operator_rereads_may_change_after_creation():
    # Transition rules (they use oldSelf): the API server rejects an edit of any other spec field.
    spec = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = {r["fieldPath"]: r for r in spec["x-kubernetes-validations"]}
    for name in spec["properties"]:
        if name in ("suspend", "maxRetries", "serve"):  # the operator applies serve edits to the endpoint
            assert f".{name}" not in rules, name
        else:
            assert "oldSelf" in rules[f".{name}"]["rule"] and name in rules[f".{name}"]["message"], name


def test_schedule_crd_names_columns_and_an_editable_template():
    spec = crd("schedule")["spec"]
    assert (spec["names"]["plural"], spec["names"]["shortNames"]) == ("finetuneschedules", ["fts"])
    version = spec["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")] == [
        "Serving", "Last Run", "Last Result", "Next Run", "Age"]
    template = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["jobTemplate"]
    # a run is a new FineTuneJob: the template may change, unlike a job's spec (no oldSelf rules)
    assert template["x-kubernetes-validations"] and "oldSelf" not in str(template)
