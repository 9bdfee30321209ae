"""The operator against a real kube-apiserver + etcd (and the real garbage collector)."""

import json
import signal
import urllib.request

import pytest
import yaml

from conftest import EXAMPLES, free_port
from k8s_helpers import (apply, fail_pod, finish_job, ftj_doc, get, items, operator, operator_log, phase, start_training, wait_for,
                         wait_phase)

pytestmark = pytest.mark.k8s


@pytest.mark.parametrize("example", ["quickstart.yaml", "support-bot-gpu.yaml", "kind-job.yaml"])
def test_examples_are_accepted(control_plane, namespace, example):
    run = control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(EXAMPLES / example))
    assert "created (server dry run)" in run.stdout


def test_status_fields_are_explained(control_plane):
    run = control_plane.kubectl("explain", "ftj.status.progress")
    assert "tokensPerSecond" in run.stdout and "The latest complete checkpoint" in run.stdout
    assert "badLines" in control_plane.kubectl("explain", "ftj.status.dataReport").stdout
    assert "GPU-hours used" in run.stdout and "Model FLOPs utilization" in run.stdout
    assert "best checkpoint by training.bestMetric" in control_plane.kubectl("explain", "ftj.status.checkpoints").stdout
    assert "threshold" in control_plane.kubectl("explain", "ftj.status.evaluation").stdout
    assert "specHash" in control_plane.kubectl("explain", "ftj.status.lineage").stdout
    assert "Default: 30m" in control_plane.kubectl("explain", "ftj.spec.training.stallTimeout").stdout


def test_wide_output_shows_speed_and_cost(control_plane, namespace):
    cp = control_plane
    apply(cp, namespace, ftj_doc("wide"))
    progress = {"phase": "training", "step": 5, "totalSteps": 10, "epoch": 0.5, "percent": 50.0, "etaSeconds": 60,
                "tokensPerSecond": 1234.5, "gpuHours": 2.5, "mfu": 0.41,
                "metrics": {"train_loss": 2.25, "valid_loss": 2.5, "evaluation": {"golden": {"valid_loss": {"served": 3}}}}}
    cp.kubectl("patch", "ftj", "wide", "-n", namespace, "--subresource=status", "--type=merge",
               "-p", json.dumps({"status": {"progress": progress, "evaluation": {
                   "passed": True, "metric": "valid_loss", "message": "ok"}}}))
    header, row = cp.kubectl("get", "ftj", "wide", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert header.split()[-6:] == ["AGE", "TOKENS/S", "GPU-HOURS", "MFU", "ETA", "EVAL"]
    assert row.split()[-5:] == ["1234.5", "2.5", "0.41", "60", "true"]
    assert "TOKENS/S" not in cp.kubectl("get", "ftj", "wide", "-n", namespace).stdout  # wide only
    # the metrics are kept whole (the API server once pruned them: status.progress.metrics was always {})
    assert get(cp, namespace, "ftj", "wide")["status"]["progress"]["metrics"] == progress["metrics"]
    assert cp.kubectl("get", "ftj", "wide", "-n", namespace).stdout.split()[-4:-1] == ["50", "2.25", "2.5"]


@pytest.mark.parametrize("change, message", [
    (lambda d: d["spec"]["resources"].update(nodes=0), "spec.resources.nodes: Invalid value: 0"),
    (lambda d: d["spec"]["resources"].update(gpusPerNode=-1), "spec.resources.gpusPerNode: Invalid value: -1"),
    (lambda d: d["spec"].update(training={"method": "full", "lora": {"r": 8}}),
     "spec.training: Invalid value: lora settings are only allowed with method: lora"),
    (lambda d: d["spec"]["model"].update(source="hf://a/b"), "spec.model: Invalid value: set exactly one of source"),
    (lambda d: d["spec"].pop("output"), "spec.output: Required value"),
    (lambda d: d["spec"]["dataset"].update(formt="chat"), 'unknown field "spec.dataset.formt"'),
    (lambda d: d["metadata"].update(name="x" * 41), "metadata.name must be at most 40 characters"),
    (lambda d: d["metadata"].update(name="v1.2"), "metadata.name must be lowercase letters, digits and '-' (no dots)"),
    # Found by tests/test_fuzz_crd.py: values the CRD took and the child objects did not (the job then sat
    # without a status, the operator retrying the refused Job forever). Now refused here, naming the field.
    (lambda d: d["spec"]["resources"].update(cpu="lots"), 'spec.resources.cpu: Invalid value: "lots"'),
    (lambda d: d["spec"]["storage"].update(credentialsSecret="S3_Creds"), 'spec.storage.credentialsSecret: Invalid value: "S3_Creds"'),
    (lambda d: d["spec"].update(model={"fromJob": ""}), 'spec.model.fromJob: Invalid value: ""'),
    (lambda d: d["spec"]["resources"].update(tolerations=[{"value": "x"}]),
     "spec.resources.tolerations[0]: Invalid value: operator must be Exists when key is empty"),
    (lambda d: d["spec"]["resources"].update(nodeSelector={"Bad Key": "x"}), "spec.resources.nodeSelector: Invalid value"),
    (lambda d: d["spec"]["dataset"].update(train=""), 'spec.dataset.train: Invalid value: ""'),
    (lambda d: d["spec"]["output"].update(uri="s3://b/" + "x" * 5000), "spec.output.uri: Too long"),
    (lambda d: d["spec"].update(maxRetries=1000), "spec.maxRetries: Invalid value: 1000"),
    (lambda d: d["spec"].update(training={"stallTimeout": "30 minutes"}), 'spec.training.stallTimeout: Invalid value: "30 minutes"'),
    (lambda d: d["spec"].update(serve={"checkpoint": "newest"}), 'spec.serve.checkpoint: Invalid value: "newest"'),
    (lambda d: d["spec"].update(evaluation={"gate": {"metric": "rouge_l", "min": 0.3, "mustBeat": "base"}}),
     "spec.evaluation.gate: Invalid value: set exactly one of mustBeat, min, max"),
    (lambda d: d["spec"].update(evaluation={"gate": {"metric": "valid_loss", "mustBeat": "serving"}}),
     "spec.evaluation: Invalid value: gate.mustBeat: serving needs evaluation.servedModel"),
])
def test_invalid_jobs_are_rejected_with_the_field(control_plane, namespace, change, message):
    doc = ftj_doc("bad")
    change(doc)
    run = control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False)
    assert run.returncode != 0 and message in run.stderr, run.stderr


def _owned_by(obj: dict, owner: dict) -> bool:
    return any(r["uid"] == owner["metadata"]["uid"] and r.get("controller") for r in obj["metadata"].get("ownerReferences", []))


def test_happy_path_with_children_events_and_kubectl_wait(control_plane, namespace):
    cp = control_plane
    port = free_port()
    with operator(cp, namespace, metrics_port=port) as op:
        apply(cp, namespace, ftj_doc("bot"))
        wait_for(lambda: get(cp, namespace, "job", "bot-prepare"), what="the Preparing Job")
        body = wait_phase(cp, namespace, "bot", "Preparing")
        for kind, name in (("serviceaccount", "bot-trainer"), ("role", "bot-progress"), ("rolebinding", "bot-progress"),
                           ("configmap", "bot-job"), ("job", "bot-prepare")):
            child = get(cp, namespace, kind, name)
            assert child and _owned_by(child, body), f"{kind}/{name} is not owned by the FineTuneJob"
        config = yaml.safe_load(get(cp, namespace, "configmap", "bot-job")["data"]["job.yaml"])
        assert config["metadata"]["name"] == "bot" and config["spec"]["output"]["uri"] == "s3://models/bot/"
        assert not items(cp, namespace, "job", "app.kubernetes.io/component=train")  # no GPU before data is ready

        finish_job(cp, namespace, "bot-prepare")
        train = wait_for(lambda: get(cp, namespace, "job", "bot-train-0"), what="the training gang")
        assert train["spec"]["completionMode"] == "Indexed" and train["spec"]["completions"] == 2
        service = get(cp, namespace, "service", "bot-train")
        assert service["spec"]["clusterIP"] == "None" and _owned_by(service, body)
        pod = train["spec"]["template"]["spec"]
        assert pod["subdomain"] == "bot-train" and pod["containers"][0]["image"] == "kubetune-trainer:test"
        assert wait_phase(cp, namespace, "bot", "Training")["status"]["prepared"] is True

        finish_job(cp, namespace, "bot-train-0")
        cp.kubectl("wait", "--for=condition=Succeeded", "ftj/bot", "-n", namespace, "--timeout=60s")
        status = get(cp, namespace, "ftj", "bot")["status"]
        assert status["outputModel"] == "s3://models/bot/model" and status["phase"] == "Succeeded"
        conditions = {c["type"]: c["status"] for c in status["conditions"]}
        assert conditions == {"Ready": "True", "Running": "False", "Succeeded": "True", "Failed": "False"}
        reasons = wait_for(lambda: {e["reason"] for e in items(cp, namespace, "events")
                                    if e["involvedObject"]["name"] == "bot"} >= {"Preparing", "Training", "Succeeded"}
                           and {e["reason"] for e in items(cp, namespace, "events")}, what="transition events")
        assert {"Preparing", "Training", "Succeeded"} <= reasons
        printed = cp.kubectl("get", "ftj", "-n", namespace).stdout
        assert "PHASE" in printed and "Succeeded" in printed, printed
        assert "Traceback" not in operator_log(op)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'kubetune_finetunejobs{phase="Succeeded"} 1.0' in metrics
        assert "kubetune_reconcile_seconds_count" in metrics and "kubetune_reconcile_errors_total 0.0" in metrics


def test_failed_gang_is_recreated_until_max_retries(control_plane, namespace):
    cp = control_plane
    with operator(cp, namespace):
        start_training(cp, namespace, ftj_doc("flaky", maxRetries=1))
        finish_job(cp, namespace, "flaky-train-0", succeeded=False)
        wait_for(lambda: get(cp, namespace, "job", "flaky-train-1"), what="attempt 2")
        # Retrying (retries: 1 recorded) comes just before Training (attempt 2 started).
        status = wait_for(lambda: (get(cp, namespace, "ftj", "flaky")["status"].get("reason") == "Training"
                                   and get(cp, namespace, "ftj", "flaky")["status"]), what="attempt 2 training")
        assert status["retries"] == 1
        assert status["phase"] == "Training" and "resumed from the latest checkpoint" in status["message"]
        retried = [e for e in items(cp, namespace, "events") if e["reason"] == "Retrying"]
        assert retried and "attempt 2 resumes from the latest checkpoint" in retried[0]["message"]
        assert wait_for(lambda: get(cp, namespace, "job", "flaky-train-0") is None, what="old gang deleted")
        finish_job(cp, namespace, "flaky-train-1", succeeded=False)
        cp.kubectl("wait", "--for=condition=Failed", "ftj/flaky", "-n", namespace, "--timeout=60s")
        status = get(cp, namespace, "ftj", "flaky")["status"]
        assert status["reason"] == "TrainingFailed"
        assert "training failed 2 time(s), spec.maxRetries is 1" in status["message"]
        assert "BackoffLimitExceeded" in status["message"]


def test_a_diverged_loss_in_a_training_pod_fails_the_job_at_once(control_plane, namespace):
    """The seam between the trainer's exit code 6 (tests/test_preemption.py) and the operator: it reads the
    pods of the failed Job in the API server, and fails the FineTuneJob with their one line, no retry."""
    cp = control_plane
    with operator(cp, namespace):
        start_training(cp, namespace, ftj_doc("nan", maxRetries=3))
        line = "error: the training loss became nan at step 6: try a lower training.learningRate"
        fail_pod(cp, namespace, "nan-train-0", 6, f"Traceback ...\n{line}\n")
        finish_job(cp, namespace, "nan-train-0", succeeded=False)
        cp.kubectl("wait", "--for=condition=Failed", "ftj/nan", "-n", namespace, "--timeout=60s")
        status = get(cp, namespace, "ftj", "nan")["status"]
        assert status["reason"] == "TrainingDiverged" and status["message"] == line.removeprefix("error: "), status
        assert not status.get("retries") and get(cp, namespace, "job", "nan-train-1") is None  # 3 retries left, unused


def test_suspend_deletes_the_workload_and_keeps_progress(control_plane, namespace):
    cp = control_plane
    with operator(cp, namespace):
        start_training(cp, namespace, ftj_doc("pausable"))
        progress = {"phase": "training", "step": 40, "totalSteps": 100, "epoch": 0.4, "percent": 40.0,
                    "tokensPerSecond": 900.0, "checkpoint": "s3://models/pausable/checkpoints/step-00000040"}
        cp.kubectl("patch", "ftj", "pausable", "-n", namespace, "--subresource=status", "--type=merge",
                   "-p", json.dumps({"status": {"progress": progress}}))
        cp.kubectl("patch", "ftj", "pausable", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": true}}')
        body = wait_phase(cp, namespace, "pausable", "Suspended")
        assert body["status"]["progress"] == progress
        wait_for(lambda: get(cp, namespace, "job", "pausable-train-0") is None, what="gang deleted")
        assert get(cp, namespace, "service", "pausable-train") is None
        cp.kubectl("patch", "ftj", "pausable", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": false}}')
        wait_for(lambda: get(cp, namespace, "job", "pausable-train-0"), what="gang recreated")
        body = wait_phase(cp, namespace, "pausable", "Training")
        assert body["status"]["progress"]["step"] == 40  # the trainer resumes from that checkpoint


def test_deleting_the_job_removes_its_children(control_plane, namespace):
    cp = control_plane
    with operator(cp, namespace):
        apply(cp, namespace, ftj_doc("gone"))
        wait_for(lambda: get(cp, namespace, "job", "gone-prepare"), what="prepare job")
        cp.kubectl("delete", "ftj", "gone", "-n", namespace, "--timeout=60s")
        for kind, name in (("job", "gone-prepare"), ("configmap", "gone-job"), ("serviceaccount", "gone-trainer"),
                           ("role", "gone-progress"), ("rolebinding", "gone-progress")):
            wait_for(lambda: get(cp, namespace, kind, name) is None, timeout=90, what=f"{kind}/{name} garbage-collected")


def test_operator_restarted_mid_job_converges_without_duplicates(control_plane, namespace):
    cp = control_plane
    with operator(cp, namespace) as first:
        apply(cp, namespace, ftj_doc("steady"))
        wait_for(lambda: get(cp, namespace, "job", "steady-prepare"), what="prepare job")
        first.send_signal(signal.SIGKILL)
        first.wait()
    finish_job(cp, namespace, "steady-prepare")  # finishes while no operator runs
    with operator(cp, namespace):
        wait_phase(cp, namespace, "steady", "Training")
        with operator(cp, namespace):  # a second replica too: the same objects, never twice
            finish_job(cp, namespace, "steady-train-0")
            wait_phase(cp, namespace, "steady", "Succeeded")
    names = sorted(j["metadata"]["name"] for j in items(cp, namespace, "job"))
    assert names == ["steady-prepare", "steady-train-0"]
    assert len(items(cp, namespace, "configmap", "kubetune.dev/job=steady")) == 1


def test_kueue_queue_label_creates_suspended_jobs(control_plane, namespace):
    cp = control_plane
    doc = ftj_doc("queued")
    doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-queue"}
    with operator(cp, namespace):
        apply(cp, namespace, doc)
        job = wait_for(lambda: get(cp, namespace, "job", "queued-prepare"), what="prepare job")
        assert job["spec"]["suspend"] is True
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-queue"
        wait_for(lambda: get(cp, namespace, "ftj", "queued")["status"].get("reason") == "Queued", what="Queued")
        # Kueue admits the workload by unsuspending the Job; the operator leaves that to Kueue.
        cp.kubectl("patch", "job", "queued-prepare", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": false}}')
        wait_for(lambda: get(cp, namespace, "ftj", "queued")["status"].get("reason") == "Preparing", what="admitted")
        assert get(cp, namespace, "job", "queued-prepare")["spec"]["suspend"] is False


def test_pods_may_patch_only_their_own_jobs_status(control_plane, namespace, tmp_path):
    from kubetune.status import Progress, StatusSink

    cp = control_plane
    with operator(cp, namespace):
        for name in ("mine", "other"):
            apply(cp, namespace, ftj_doc(name))
        wait_for(lambda: get(cp, namespace, "rolebinding", "mine-progress"), what="the pods' RBAC")
        wait_for(lambda: phase(cp, namespace, "other"), what="other job handled")
    token = cp.kubectl("create", "token", "mine-trainer", "-n", namespace).stdout.strip()
    token_file = tmp_path / "token"
    token_file.write_text(token)
    sink = StatusSink("mine", namespace, cp.server, token_file, ca_file=None)
    sink.context = __import__("ssl")._create_unverified_context()  # the test server's certificate is self-signed
    sink.send(Progress(phase="training", step=7, total_steps=10, epoch=0.7, percent=70.0, tokens_per_second=9.0))
    assert get(cp, namespace, "ftj", "mine")["status"]["progress"]["step"] == 7
    other = StatusSink("other", namespace, cp.server, token_file, ca_file=None)
    other.context = sink.context
    with pytest.raises(Exception, match="403"):
        other.send(Progress(phase="training", step=1, total_steps=10, epoch=0.1, percent=10.0, tokens_per_second=9.0))
    run = cp.kubectl("get", "secrets", "-n", namespace, kubeconfig=cp.kubeconfig_for_token(token), check=False)
    assert run.returncode != 0 and "forbidden" in run.stderr


def test_serving_deployment_after_success_and_removed_with_the_job(control_plane, namespace):
    cp = control_plane
    with operator(cp, namespace):
        start_training(cp, namespace, ftj_doc("chatbot", serve={"enabled": True}))
        assert get(cp, namespace, "deployment", "chatbot-serve") is None  # nothing to serve yet
        finish_job(cp, namespace, "chatbot-train-0")
        cp.kubectl("wait", "--for=condition=Succeeded", "ftj/chatbot", "-n", namespace, "--timeout=60s")
        status = wait_for(lambda: get(cp, namespace, "ftj", "chatbot")["status"].get("endpoint")
                          and get(cp, namespace, "ftj", "chatbot")["status"], what="endpoint in status")
        assert status["endpoint"] == f"http://chatbot-serve.{namespace}.svc:8000/v1" and status["reason"] == "Serving"
        body = get(cp, namespace, "ftj", "chatbot")
        deployment, service = get(cp, namespace, "deployment", "chatbot-serve"), get(cp, namespace, "service", "chatbot-serve")
        assert _owned_by(deployment, body) and _owned_by(service, body)
        init = deployment["spec"]["template"]["spec"]["initContainers"][0]
        assert init["command"][:3] == ["kubetune", "download", "s3://models/chatbot/model"]

        # spec.serve stays editable after success, and an edit is applied, not ignored.
        serve_patch = lambda serve: cp.kubectl("patch", "ftj", "chatbot", "-n", namespace, "--type=merge",  # noqa: E731
                                               "-p", json.dumps({"spec": {"serve": serve}}))
        serve_patch({"replicas": 2})
        wait_for(lambda: get(cp, namespace, "deployment", "chatbot-serve")["spec"]["replicas"] == 2, what="2 replicas")
        body = wait_for(lambda: (b := get(cp, namespace, "ftj", "chatbot"))["status"]["observedGeneration"]
                        == b["metadata"]["generation"] and b, what="observedGeneration")
        serve_patch({"enabled": False})
        for kind in ("deployment", "service"):
            wait_for(lambda: get(cp, namespace, kind, "chatbot-serve") is None, what=f"{kind} removed when serving is off")
        status = wait_for(lambda: "endpoint" not in (s := get(cp, namespace, "ftj", "chatbot")["status"]) and s,
                          what="endpoint cleared")
        assert status["phase"] == "Succeeded" and "no longer served" in status["message"]
        serve_patch({"enabled": True})
        wait_for(lambda: get(cp, namespace, "deployment", "chatbot-serve"), what="served again")
        assert wait_for(lambda: get(cp, namespace, "ftj", "chatbot")["status"].get("endpoint"), what="endpoint again")

        cp.kubectl("delete", "ftj", "chatbot", "-n", namespace)
        for kind in ("deployment", "service"):
            wait_for(lambda: get(cp, namespace, kind, "chatbot-serve") is None, timeout=90, what=f"{kind} removed")


def test_child_the_api_server_refuses_fails_the_job_with_its_message(control_plane, namespace):
    """Found by tests/test_fuzz_crd.py: a child Job the API server refused (422) was retried forever and
    the job kept no status. What the CRD still lets through (here a label key whose name part is over 63
    characters) now fails the job at once, with the API server's reason."""
    cp = control_plane
    with operator(cp, namespace) as op:
        apply(cp, namespace, ftj_doc("picky", resources={"nodes": 1, "gpusPerNode": 0, "nodeSelector": {"k" * 64: "v"}}))
        wait_for(lambda: get(cp, namespace, "job", "picky-prepare"), what="prepare job")
        finish_job(cp, namespace, "picky-prepare")
        status = wait_phase(cp, namespace, "picky", "Failed")["status"]
        assert status["reason"] == "InvalidSpec"
        assert status["message"].startswith("the API server rejected Job picky-train-0: ") and "nodeSelector" in status["message"]
        assert get(cp, namespace, "job", "picky-train-0") is None
        assert "Traceback" not in operator_log(op)



def test_a_failed_gate_is_not_served_and_serve_checkpoint_picks_the_model(control_plane, namespace, tmp_path):
    """What the trainer pod writes (status.evaluation, status.checkpoints, with the job's own token) decides
    what the operator serves."""
    from kubetune.status import CheckpointInfo, EvaluationResult, Status, StatusSink

    cp = control_plane
    token_file = tmp_path / "token"
    with operator(cp, namespace):
        for name in ("gated", "picked"):
            start_training(cp, namespace, ftj_doc(name, serve={"enabled": True, "checkpoint": "best"}))
            token_file.write_text(cp.kubectl("create", "token", f"{name}-trainer", "-n", namespace).stdout.strip())
            sink = StatusSink(name, namespace, cp.server, token_file, ca_file=None)
            sink.context = __import__("ssl")._create_unverified_context()  # the test server's certificate is self-signed
            checkpoints = [CheckpointInfo(name=f"step-{s}", step=s, model=f"s3://models/{name}/checkpoints/step-{s:08d}/model",
                                          metrics={"valid_loss": loss}, **({"best": True} if s == 4 else {}))
                           for s, loss in ((4, 1.5), (8, 1.7))]
            verdict = EvaluationResult(passed=name == "picked", metric="valid_loss", value=1.7, threshold=1.6,
                                       message="valid_loss 1.7 vs base 1.6")
            sink.patch(Status(checkpoints=checkpoints, evaluation=verdict))
            finish_job(cp, namespace, f"{name}-train-0")
        gated = wait_phase(cp, namespace, "gated", "Succeeded")["status"]
        assert gated["reason"] == "EvaluationFailed" and "valid_loss 1.7 vs base 1.6" in gated["message"]
        assert {c["type"]: c["status"] for c in gated["conditions"]}["EvaluationPassed"] == "False"
        assert get(cp, namespace, "deployment", "gated-serve") is None and not gated.get("endpoint")

        wait_for(lambda: get(cp, namespace, "deployment", "picked-serve"), what="the picked job's Deployment")
        fetch = lambda: get(cp, namespace, "deployment", "picked-serve")["spec"]["template"]["spec"]["initContainers"][0]["command"][2]  # noqa: E731
        assert fetch() == "s3://models/picked/checkpoints/step-00000004/model"
        cp.kubectl("patch", "ftj", "picked", "-n", namespace, "--type=merge", "-p", '{"spec": {"serve": {"checkpoint": "step-8"}}}')
        wait_for(lambda: fetch() == "s3://models/picked/checkpoints/step-00000008/model", what="the Deployment to follow")
        cp.kubectl("patch", "ftj", "picked", "-n", namespace, "--type=merge", "-p", '{"spec": {"serve": {"checkpoint": "step-5"}}}')
        status = wait_for(lambda: (s := get(cp, namespace, "ftj", "picked")["status"])["reason"] == "ServingFailed" and s,
                          what="ServingFailed")
        assert "step-4 (best), step-8" in status["message"]
        assert fetch() == "s3://models/picked/checkpoints/step-00000008/model" and status["endpoint"]  # still served
