"""The Helm chart: lint, template, and a real `helm install` whose ServiceAccount runs the operator,
so a permission missing from the chart's ClusterRole fails the happy path."""

import json
import re

import pytest
import yaml

from conftest import ROOT
from k8s_helpers import apply, finish_job, finish_run, ftj_doc, get, operator, operator_log, schedule_doc, wait_for, wait_phase

pytestmark = pytest.mark.k8s
CHART = ROOT / "charts" / "kubetune"


@pytest.mark.parametrize("crd", ["finetunejobs.kubetune.dev.yaml", "finetuneschedules.kubetune.dev.yaml"])
def test_chart_crd_is_the_generated_one(crd):
    assert yaml.safe_load((CHART / "crds" / crd).read_text()) == yaml.safe_load((ROOT / "crds" / crd).read_text()), \
        f"copy crds/{crd} into charts/kubetune/crds/"


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


def test_api_server_tls_audiences_and_review_cap_render(control_plane):
    on = ["--set", "api.enabled=true", "--set", "api.filesUri=s3://b/files/", "--set", "api.outputsUri=s3://b/jobs/"]

    def rendered(*extra: str) -> tuple[dict, dict, dict]:
        docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(
            control_plane.helm("template", "kt", str(CHART), *on, *extra).stdout) if d}
        return (docs["Deployment", "kt-api"]["spec"]["template"]["spec"], docs["Service", "kt-api"],
                yaml.safe_load(docs["ConfigMap", "kt-api"]["data"]["config.yaml"]))

    pod, service, config = rendered()
    container = pod["containers"][0]
    assert config["audiences"] == ["kubetune"] and "--tls-cert" not in container["command"]
    assert container["command"][-4:] == ["--review-rate", "20", "--review-burst", "40"]
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTP"
    assert "tls" not in {v["name"] for v in pod["volumes"]}

    pod, service, config = rendered("--set", "api.tls.secretName=api-tls", "--set", "api.audiences={kubetune,k2}",
                                    "--set", "api.reviews.perSecond=2.5", "--set", "api.reviews.burst=1000000")
    container = pod["containers"][0]
    command = container["command"]
    assert command[command.index("--tls-cert") + 1] == "/etc/kubetune-api-tls/tls.crt"
    assert command[command.index("--tls-key") + 1] == "/etc/kubetune-api-tls/tls.key"
    assert command[command.index("--review-rate") + 1] == "2.5"
    assert command[command.index("--review-burst") + 1] == "1000000"  # not 1e+06, which --review-burst refuses
    assert {"name": "tls", "secret": {"secretName": "api-tls"}} in pod["volumes"]
    assert {"name": "tls", "mountPath": "/etc/kubetune-api-tls", "readOnly": True} in container["volumeMounts"]
    for probe in ("readinessProbe", "livenessProbe"):  # the kubelet's probes speak TLS to it too
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "https", "scheme": "HTTPS"}
    assert container["ports"] == [{"name": "https", "containerPort": 8080}]
    assert service["spec"]["ports"] == [{"name": "https", "port": 8080, "targetPort": "https"}]
    assert config["audiences"] == ["kubetune", "k2"]
    for bad in (["--set-json", "api.audiences=[]"], ["--set", "api.reviews.perSecond=fast"]):
        run = control_plane.helm("template", "kt", str(CHART), *on, *bad, check=False)
        assert run.returncode != 0 and bad[1].split("=")[0].split(".")[-1] in run.stderr, run.stderr


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
        # A schedule: its run (a FineTuneJob it owns), its status, the run's result label, its endpoint.
        doc = schedule_doc("sched")
        doc["metadata"]["annotations"] = {"kubetune.dev/retrain-requested-at": "now"}
        apply(cp, namespace, doc)
        wait_for(lambda: get(cp, namespace, "ftj", "sched-r1"), what="the schedule's run (see operator log)")
        finish_run(cp, namespace, "sched-r1", passed=True)
        wait_for(lambda: get(cp, namespace, "deployment", "sched-serve"), what="the schedule's endpoint")
        wait_for(lambda: get(cp, namespace, "ftj", "sched-r1")["metadata"]["labels"].get("kubetune.dev/result"),
                 what="the run's result label")
        log = operator_log(op)
        # (Reason: Forbidden) or a 403 status, not the milliseconds of a timestamp such as "07:12:39,403"
        assert "Forbidden" not in log and not re.search(r"(?<![,\d])403\b", log), log[-3000:]
