"""The Helm chart: lint, template, and a real `helm install` whose ServiceAccount runs the operator,
so a permission missing from the chart's ClusterRole fails the happy path."""

import json
import re

import pytest
import yaml

from conftest import ROOT
from k8s_helpers import apply, finish_job, ftj_doc, get, operator, operator_log, wait_for, wait_phase

pytestmark = pytest.mark.k8s
CHART = ROOT / "charts" / "kubetune"


def test_chart_crd_is_the_generated_one():
    assert yaml.safe_load((CHART / "crds" / "finetunejobs.kubetune.dev.yaml").read_text()) == \
        yaml.safe_load((ROOT / "crds" / "finetunejobs.kubetune.dev.yaml").read_text()), \
        "copy crds/finetunejobs.kubetune.dev.yaml into charts/kubetune/crds/"


@pytest.mark.parametrize("values", [None, "values-local.yaml"])
def test_helm_lint_and_template_are_clean(control_plane, values):
    extra = ["-f", str(CHART / values)] if values else []
    lint = control_plane.helm("lint", "--strict", str(CHART), *extra)
    assert "0 chart(s) failed" in lint.stdout
    rendered = control_plane.helm("template", "kubetune", str(CHART), "-n", "kubetune-system", *extra).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"} <= set(kinds)
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "kubetune-operator")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    container = pod["containers"][0]["securityContext"]
    assert container["readOnlyRootFilesystem"] and container["capabilities"]["drop"] == ["ALL"]
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    assert not any("secrets" in r["resources"] or "*" in r["verbs"] for r in role["rules"])
    if values:
        assert any(d["kind"] == "Service" and d["metadata"]["name"] == "kubetune-s3" for d in docs)


def test_api_server_renders_with_least_privilege(control_plane):
    on = ["--set", "api.enabled=true", "--set", "api.filesUri=s3://b/files/", "--set", "api.outputsUri=s3://b/jobs/"]
    assert "0 chart(s) failed" in control_plane.helm("lint", "--strict", str(CHART), *on).stdout
    docs = [d for d in yaml.safe_load_all(control_plane.helm("template", "kt", str(CHART), *on).stdout) if d]
    role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "kt-api")
    verbs = {(r["apiGroups"][0], r["resources"][0]): set(r["verbs"]) for r in role["rules"]}
    assert verbs == {("authentication.k8s.io", "tokenreviews"): {"create"},
                     ("authorization.k8s.io", "subjectaccessreviews"): {"create"},
                     ("kubetune.dev", "finetunejobs"): {"get", "list", "create", "patch"}, ("", "events"): {"list"}}
    config = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"])
    assert config["filesUri"] == "s3://b/files/" and config["jobDefaults"] == {"serve": {"enabled": True}}
    missing = control_plane.helm("template", "kt", str(CHART), "--set", "api.enabled=true", check=False)
    assert missing.returncode != 0 and "filesUri" in missing.stderr  # enabled without storage: refused


def test_values_schema_rejects_bad_values(control_plane):
    run = control_plane.helm("template", "kubetune", str(CHART), "--set", "replicas=0", check=False)
    assert run.returncode != 0 and "replicas" in run.stderr


def test_operator_works_with_only_the_charts_permissions(control_plane, namespace):
    cp = control_plane
    release_ns = f"{namespace}-sys"
    cp.helm("install", "kubetune", str(CHART), "-n", release_ns, "--create-namespace",
            "--set", "image.repository=kubetune-operator", "--set", "image.tag=test")
    assert get(cp, release_ns, "deployment", "kubetune-operator")
    assert json.loads(cp.kubectl("get", "clusterkopfpeering", "kubetune", "-o", "json").stdout)  # from the chart
    token = cp.kubectl("create", "token", "kubetune-operator", "-n", release_ns, "--duration=1h").stdout.strip()
    as_operator = cp.kubeconfig_for_token(token)
    denied = cp.kubectl("get", "secrets", "-n", namespace, kubeconfig=as_operator, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr  # no access to Secrets' contents

    # Cluster-wide with peering, exactly as the chart's Deployment runs it.
    with operator(cp, None, kubeconfig=as_operator, peering="kubetune") as op:
        apply(cp, namespace, ftj_doc("rbac", serve={"enabled": True}))
        wait_for(lambda: get(cp, namespace, "job", "rbac-prepare"), timeout=90, what="prepare job (see operator log)")
        finish_job(cp, namespace, "rbac-prepare")
        wait_for(lambda: get(cp, namespace, "job", "rbac-train-0"), what="training gang")
        finish_job(cp, namespace, "rbac-train-0", succeeded=False)  # a retry deletes and recreates
        wait_for(lambda: get(cp, namespace, "job", "rbac-train-1"), what="retry")
        finish_job(cp, namespace, "rbac-train-1")
        wait_phase(cp, namespace, "rbac", "Succeeded")
        wait_for(lambda: get(cp, namespace, "deployment", "rbac-serve"), what="the serving Deployment")
        serve = lambda s: cp.kubectl("patch", "ftj", "rbac", "-n", namespace, "--type=merge", "-p",  # noqa: E731
                                     json.dumps({"spec": {"serve": s}}))
        serve({"replicas": 2})  # an edit patches the Deployment, turning it off deletes it
        wait_for(lambda: get(cp, namespace, "deployment", "rbac-serve")["spec"]["replicas"] == 2, what="2 replicas")
        serve({"enabled": False})
        wait_for(lambda: get(cp, namespace, "deployment", "rbac-serve") is None, what="Deployment removed")
        log = operator_log(op)
        # (Reason: Forbidden) or a 403 status, not the milliseconds of a timestamp such as "07:12:39,403"
        assert "Forbidden" not in log and not re.search(r"(?<![,\d])403\b", log), log[-3000:]
