"""The pure builders of child objects, without an API server."""

import pytest
import yaml

from conftest import job_doc
from kubetune.operator import children
from kubetune.operator.conditions import Phase, conditions_for
from kubetune.operator.settings import Settings
from kubetune.spec import parse_job

SETTINGS = Settings(trainer_image="registry.example/kubetune-trainer:1", finished_ttl_seconds=600)


def _job(**spec):
    doc = job_doc("s3://data/raw/", "s3://models/out/", storage={"endpoint": "http://minio:9000", "credentialsSecret": "s3-creds"}, **spec)
    doc["metadata"] = {"name": "bot", "namespace": "team-a", "labels": {"kueue.x-k8s.io/queue-name": "gpu-queue"}}
    return parse_job(doc)


def test_gang_is_an_indexed_job_with_rendezvous_on_pod_zero():
    job = _job(resources={"nodes": 3, "gpusPerNode": 8, "nodeSelector": {"gpu": "h100"},
                          "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                          "priorityClassName": "training"})
    j = children.training_job(job, attempt=2, settings=SETTINGS)
    spec, pod = j["spec"], j["spec"]["template"]["spec"]
    assert j["metadata"]["name"] == "bot-train-2"
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == ("Indexed", 3, 3, 0)
    assert spec["suspend"] is True and j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert spec["ttlSecondsAfterFinished"] == 600
    c = pod["containers"][0]
    assert c["command"] == ["kubetune"] and c["args"][:2] == ["train-job", "/etc/kubetune/job.yaml"]
    assert c["args"][2:] == ["--nnodes=3", "--nproc-per-node=8", "--node-rank=$(NODE_RANK)",
                             "--master-addr=bot-train-2-0.bot-train", "--master-port=29500", "--shutdown-timeout=295"]
    assert pod["terminationGracePeriodSeconds"] == 300  # time to finish the step and checkpoint after SIGTERM
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert c["image"] == "registry.example/kubetune-trainer:1"
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]  # referenced, never read
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["KUBETUNE_JOB_NAME"]["value"] == "bot" and "OMP_NUM_THREADS" not in env
    assert pod["subdomain"] == "bot-train" and pod["serviceAccountName"] == "bot-trainer"
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["priorityClassName"] == "training"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_cpu_fallback_requests_no_gpu_and_one_process_per_cpu():
    job = _job(resources={"nodes": 2, "gpusPerNode": 0, "cpu": "4", "memory": "8Gi"})
    c = children.training_job(job, 0, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    assert "limits" not in c["resources"] and c["resources"]["requests"] == {"cpu": "4", "memory": "8Gi"}
    assert "--nproc-per-node=4" in c["args"]
    assert {"name": "OMP_NUM_THREADS", "value": "1"} in c["env"]


def test_progress_role_allows_only_this_jobs_status():
    role = children.progress_role(_job())
    assert role["rules"] == [{"apiGroups": ["kubetune.dev"], "resources": ["finetunejobs/status"],
                              "resourceNames": ["bot"], "verbs": ["get", "patch"]}]
    binding = children.progress_role_binding(_job())
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "bot-trainer", "namespace": "team-a"}]


def test_config_map_holds_the_job_and_resolves_from_job():
    job = _job(model={"fromJob": "previous-run"})
    doc = yaml.safe_load(children.config_map(job, model_source="s3://models/prev/model")["data"]["job.yaml"])
    assert doc["spec"]["model"] == {"source": "s3://models/prev/model"}
    assert doc["metadata"] == {"name": "bot", "namespace": "team-a"}
    assert parse_job(doc).spec.output.uri == "s3://models/out/"


def test_prepare_job_is_one_cpu_pod():
    j = children.prepare_job(_job(resources={"gpusPerNode": 8}), SETTINGS)
    c = j["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["kubetune", "prepare", "/etc/kubetune/job.yaml"]
    assert "limits" not in c["resources"] and j["spec"].get("completions") is None
    assert c["resources"]["requests"] == {"cpu": "1", "memory": "2Gi"}  # the GPUs are for training only


def test_prepare_pod_requests_come_from_the_spec():
    job = _job(resources={"prepare": {"memory": "24Gi", "cpu": "4"}})
    c = children.prepare_job(job, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["requests"] == {"cpu": "4", "memory": "24Gi"}
    assert {"name": "KUBETUNE_WORKERS", "value": "4"} in c["env"]  # one worker process per requested CPU
    for cpu, workers in (("500m", "1"), ("2500m", "2"), ("1", "1")):
        c = children.prepare_job(_job(resources={"prepare": {"cpu": cpu}}), SETTINGS)["spec"]["template"]["spec"]["containers"][0]
        assert {"name": "KUBETUNE_WORKERS", "value": workers} in c["env"], cpu


def test_conditions_keep_transition_time_until_status_flips():
    first = conditions_for(Phase.PREPARING, "Preparing", "", None, "t1")
    second = conditions_for(Phase.TRAINING, "Training", "", first, "t2")
    done = conditions_for(Phase.SUCCEEDED, "Succeeded", "", second, "t3")
    by_type = {c["type"]: c for c in done}
    assert by_type["Succeeded"]["status"] == "True" and by_type["Succeeded"]["lastTransitionTime"] == "t3"
    assert by_type["Ready"]["lastTransitionTime"] == "t1" and by_type["Running"]["status"] == "False"


def test_serving_deployment_fetches_the_model_then_serves_it():
    job = _job(serve={"enabled": True, "gpus": 1, "replicas": 2})
    d = children.serving_deployment(job, "s3://models/out/model", SETTINGS)
    pod = d["spec"]["template"]["spec"]
    fetch, server = pod["initContainers"][0], pod["containers"][0]
    assert fetch["command"] == ["kubetune", "download", "s3://models/out/model", "/model", "--endpoint", "http://minio:9000"]
    assert fetch["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert server["command"][:3] == ["kubetune", "serve", "/model"] and "bot" in server["command"]
    assert server["resources"]["limits"] == {"nvidia.com/gpu": 1} and d["spec"]["replicas"] == 2
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert children.serving_endpoint(job) == "http://bot-serve.team-a.svc:8000/v1"
    assert children.serving_service(job)["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]


def test_an_external_serving_image_gets_its_args():
    job = _job(serve={"enabled": True, "image": "vllm/vllm-openai:v0.11.0",
                      "args": ["--model", "{model}", "--served-model-name", "{name}", "--port", "{port}"]})
    server = children.serving_deployment(job, "s3://models/out/model", SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    assert server["image"] == "vllm/vllm-openai:v0.11.0" and "command" not in server
    assert server["args"] == ["--model", "/model", "--served-model-name", "bot", "--port", "8000"]


@pytest.mark.parametrize("quantity, cpus", [
    (None, 1), ("500m", 1), ("2500m", 2), ("2", 2), ("1.5", 1), ("4000m", 4), ("1e1", 10), ("2E1", 20),
    ("1k", 1000), (".000000002E", 2_000_000_000), ("1Ki", 1024), ("3000000000n", 3), ("0", 1),
])
def test_whole_cpus_reads_every_quantity_the_spec_admits(quantity, cpus):
    # ".23672E" (E alone: exa) once crashed the reconcile loop: the fuzzer found it
    assert children.whole_cpus(quantity) == cpus
