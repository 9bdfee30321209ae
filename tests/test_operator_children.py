"""The pure builders of child objects, without an API server."""

import pytest
import yaml

from conftest import job_doc
from kubetune.operator import children, schedule_children
from kubetune.operator.conditions import Phase, conditions_for
from kubetune.operator.settings import Settings
from kubetune.schedule_spec import parse_schedule
from kubetune.spec import SpecError, parse_job
from test_schedule_spec import schedule_doc

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


def test_prepare_job_is_one_cpu_pod_that_plans_the_batch_for_the_gang():
    j = children.prepare_job(_job(resources={"gpusPerNode": 8, "nodes": 2}, maxRetries=2), SETTINGS)
    c = j["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["kubetune", "prepare", "/etc/kubetune/job.yaml", "--world=16"]  # 2 nodes x 8 GPUs
    assert j["spec"]["backoffLimit"] == 2  # Kubernetes counts its tries
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


CAPTURE = {"uri": "s3://logs/bot/", "sampleRate": 0.25, "feedbackUri": "s3://data/raw/feedback/"}


def _server(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_capture_gives_the_server_its_options_and_the_storage_credentials():
    job = _job(serve={"enabled": True, "capture": CAPTURE},
               preprocessing={"pii": {"redact": ["email", "phone"], "allow": ["help@acme.example"]}})
    server = _server(children.serving_deployment(job, "s3://models/out/model", SETTINGS))
    command = server["command"]
    options = {command[i]: command[i + 1] for i in range(len(command) - 1) if command[i].startswith("--")}
    assert options["--capture-uri"] == "s3://logs/bot/" and options["--capture-sample-rate"] == "0.25"
    assert options["--feedback-uri"] == "s3://data/raw/feedback/" and options["--endpoint"] == "http://minio:9000"
    # the scrubbing preparation applies to the job's data
    assert yaml.safe_load(options["--pii"]) == {"redact": ["email", "phone"], "allow": ["help@acme.example"]}
    assert server["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]  # referenced, never read
    # feedback names a completion the pod that served it keeps: a client's requests go to one pod
    assert children.serving_service(job)["spec"]["sessionAffinity"] == "ClientIP"


def test_without_capture_the_server_gets_no_credentials_and_records_nothing():
    job = _job(serve={"enabled": True})
    server = _server(children.serving_deployment(job, "s3://models/out/model", SETTINGS))
    assert "envFrom" not in server and not any(a.startswith("--capture") for a in server["command"])
    assert "sessionAffinity" not in children.serving_service(job)["spec"]


def test_capture_needs_kubetune_serve():
    with pytest.raises(SpecError, match="serve: capture needs kubetune serve"):
        _job(serve={"enabled": True, "image": "vllm/vllm-openai:v0.11.0", "capture": CAPTURE})


def test_a_schedules_endpoint_captures_as_its_serve_says():
    doc = schedule_doc(serve={"capture": {"uri": "s3://logs/bot/", "feedbackUri": "s3://data/raw/"}})
    doc["spec"]["jobTemplate"]["storage"] = {"credentialsSecret": "s3-creds"}
    doc["metadata"]["namespace"] = "team"
    d = schedule_children.serving_deployment(parse_schedule(doc), 3, "s3://models/bot/bot-r3/model", SETTINGS)
    command = _server(d)["command"]
    assert command[command.index("--capture-uri") + 1] == "s3://logs/bot/"
    assert command[command.index("--feedback-uri") + 1] == "s3://data/raw/"  # feedback is the next run's data
    assert command[command.index("--capture-sample-rate") + 1] == "1.0"
    assert _server(d)["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    # with trigger.newData and no feedbackUri, rated replies land under the new-data prefix: they start the next run
    doc["spec"]["serve"]["capture"].pop("feedbackUri")
    doc["spec"]["trigger"] = {"newData": {"uri": "s3://data/incoming/"}}
    command = _server(schedule_children.serving_deployment(parse_schedule(doc), 3, "s3://m/model", SETTINGS))["command"]
    assert command[command.index("--feedback-uri") + 1] == "s3://data/incoming/feedback/"
    plain = schedule_children.serving_deployment(parse_schedule(schedule_doc()), 3, "s3://m/model", SETTINGS)
    assert "--capture-uri" not in _server(plain)["command"] and "envFrom" not in _server(plain)


@pytest.mark.parametrize("quantity, cpus", [
    (None, 1), ("500m", 1), ("2500m", 2), ("2", 2), ("1.5", 1), ("4000m", 4), ("1e1", 10), ("2E1", 20),
    ("1k", 1000), (".000000002E", 2_000_000_000), ("1Ki", 1024), ("3000000000n", 3), ("0", 1),
])
def test_whole_cpus_reads_every_quantity_the_spec_admits(quantity, cpus):
    # ".23672E" (E alone: exa) once crashed the reconcile loop: the fuzzer found it
    assert children.whole_cpus(quantity) == cpus


def test_failed_pods_count_by_their_class():
    """Permanent exit codes fail the Job at once; a disrupted pod (preempted, evicted, drained) does not count.
    The API server's validation of this policy is exercised wherever these Jobs are created (test_k8s_*)."""
    for j in (children.prepare_job(_job(), SETTINGS), children.training_job(_job(), 0, SETTINGS)):
        rules = j["spec"]["podFailurePolicy"]["rules"]
        assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
        # A trainer that stopped on SIGTERM with its step saved (Kueue suspending the Job deletes its pods unmarked)
        assert rules[1] == {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [143]}}
        assert rules[2] == {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [3, 4, 5, 6]}}
        assert j["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # what a podFailurePolicy requires
        env = j["spec"]["template"]["spec"]["containers"][0]["env"]
        assert {"name": "KUBETUNE_TERMINATION_LOG", "value": "/dev/termination-log"} in env


@pytest.mark.parametrize("queue, own, expected", [
    ({"name": "team-a", "priorityClass": "high"}, {}, {"kueue.x-k8s.io/queue-name": "team-a",
                                                       "kueue.x-k8s.io/priority-class": "high"}),
    ({"name": "team-a"}, {"kueue.x-k8s.io/queue-name": "old"}, {"kueue.x-k8s.io/queue-name": "team-a"}),  # spec wins
    (None, {"kueue.x-k8s.io/queue-name": "q", "kueue.x-k8s.io/priority-class": "low"},
     {"kueue.x-k8s.io/queue-name": "q", "kueue.x-k8s.io/priority-class": "low"}),  # the labels, as before spec.queue
    (None, {"kueue.x-k8s.io/priority-class": "low"}, {}),  # a priority without a queue: Kueue is not asked
])
def test_every_child_job_goes_to_the_queue_the_job_names(queue, own, expected):
    doc = job_doc("s3://data/raw/", "s3://models/out/", **({"queue": queue} if queue else {}))
    doc["metadata"] = {"name": "bot", "namespace": "team-a", "labels": own}
    job = parse_job(doc)
    for child in (children.prepare_job(job, SETTINGS), children.training_job(job, 0, SETTINGS)):
        kueue = {k: v for k, v in child["metadata"]["labels"].items() if k.startswith("kueue.x-k8s.io/")}
        assert kueue == expected
        assert child["spec"]["suspend"] is bool(expected)  # Kueue admits it by unsuspending it
        assert child["spec"]["template"]["metadata"]["labels"] == child["metadata"]["labels"]
