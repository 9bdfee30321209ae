"""The whole job in a real cluster, as a user runs it: `helm install` the chart with the images built
here, upload the example data, `kubectl apply` a two-node CPU FineTuneJob that serves its model,
kill a training pod after the first checkpoint, chat with the result through its Service with the
official openai client, then delete the job.

Runs against the cluster in $KUBETUNE_E2E_KUBECONFIG (scripts/e2e.sh starts scripts/cluster.sh's
one-node cluster and builds the images); skipped otherwise. Pods reach the S3 server this test
starts on $KUBETUNE_E2E_HOST_IP (an address of this machine that pods can reach).
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import boto3
import pytest
import yaml

from e2e_cluster import (HOST_IP, KUBECONFIG, RELEASE_NS, SECRET_KEY, bucket, create_credentials, env, ftj_named, get_json,
                     job_pods, kubectl, last_step, log, log_from_step, sh, small_job, wait_for)
from e2e_cluster import namespace, operator_release, s3  # noqa: F401  (the session's fixtures)
from conftest import EXAMPLES

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not KUBECONFIG, reason="set KUBETUNE_E2E_KUBECONFIG (scripts/e2e.sh)")]

JOB = "nimbus-support"
# Planted personal data, in one more data file: none of it may reach an artifact, log, event or status.
PII = ["mara.quintero+e2e@example.org", "+49 30 901820", "+91 98765 43210", "+81 3-1234-5678", "0151 23456789",
       "4111 1111 1111 1111", "GB82 WEST 1234 5698 7654 32",
       "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJlMmUtcGlpIn0.c2lnbmF0dXJlLWUyZS1waWk"]


def ftj(ns: str) -> dict:
    return get_json("ftj", JOB, "-n", ns)


def until(ns: str, check, timeout: float, what: str, interval: float = 1.0):
    """Wait for check(status) to be truthy; fail at once, with the reason, if the job failed."""
    def step():
        status = ftj(ns).get("status") or {}
        if status.get("phase") == "Failed":
            raise AssertionError(f"the job failed while waiting for {what}: {status.get('message')}")
        return check(status)
    return wait_for(step, timeout, what, interval)


def job_manifest(s3_url: str) -> dict:
    doc = yaml.safe_load((EXAMPLES / "kind-job.yaml").read_text())
    doc["spec"]["storage"]["endpoint"] = s3_url
    doc["spec"]["dataset"]["train"] = "s3://kubetune/data/"
    doc["spec"]["output"]["uri"] = f"s3://kubetune/jobs/{JOB}/"
    # The best checkpoint is served: status.checkpoints (trainer) → the Deployment's model (operator) → the pod.
    doc["spec"]["serve"] = {"enabled": True, "cpu": "500m", "memory": "1Gi", "checkpoint": "best"}
    doc["spec"]["evaluation"] = {"samples": 4, "maxNewTokens": 16, "gate": {"metric": "valid_loss", "mustBeat": "base"}}
    # Checkpoints every 20 of the 96 steps: a kill after the first one has steps left to redo.
    doc["spec"]["training"]["checkpointEvery"] = 20
    # Two training pods and the operator (100m) fit on a 2-CPU node: one rank per pod.
    doc["spec"]["resources"]["cpu"] = "900m"
    return doc


KILL_RANK = """
import os, signal
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        continue
    if b"kubetune.train" in cmd and b"torch.distributed" not in cmd:  # a rank, not torchrun
        os.kill(int(pid), signal.SIGKILL)
"""


def training_pods(ns: str, attempt: int) -> list[dict]:
    return get_json("pods", "-n", ns, "-l", f"batch.kubernetes.io/job-name={JOB}-train-{attempt}")["items"]


def test_the_whole_job_runs_as_pods(s3, namespace, operator_release):
    ns = namespace
    boto3.client("s3", endpoint_url=s3).create_bucket(Bucket="kubetune")
    sh(sys.executable, "-m", "kubetune.cli", "upload", str(EXAMPLES / "data"), "s3://kubetune/data/", "--endpoint", s3)
    boto3.client("s3", endpoint_url=s3).put_object(Bucket="kubetune", Key="data/planted-pii.jsonl", Body=planted_pii())
    create_credentials(ns)

    applied = time.monotonic()
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(job_manifest(s3)))
    log("applied; waiting for the prepare pod")

    # Preparing: one pod, then the data report in the status.
    report = until(ns, lambda s: s.get("dataReport"), 600, "status.dataReport from the prepare pod")
    assert report["train"] > 100 and report["piiRedacted"] > 0, report
    log(f"prepared in {time.monotonic() - applied:.0f}s: {report}")

    # Training: two pods behind the headless Service; progress written by the trainer itself.
    wait_for(lambda: len(training_pods(ns, 0)) == 2, 120, "two training pods")
    first_ckpt = until(ns, lambda s: (s.get("progress") or {}).get("checkpoint"), 900,
                       "the first checkpoint in status.progress", interval=0.5)
    pods = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p["metadata"]["name"]
            for p in training_pods(ns, 0)}
    assert "2 process(es)" in kubectl("logs", "-n", ns, pods["0"]).stdout  # the gang met: world size 2, two pods
    # Kill halfway to the next checkpoint, so the steps since the first one are lost and redone.
    ckpt_step = int(first_ckpt.rstrip("/").rsplit("step-", 1)[1])
    rank0_log = wait_for(lambda: log_from_step(ns, pods["0"], ckpt_step + 10), 300, f"step {ckpt_step + 10}",
                         interval=0.3)
    killed_at = last_step(rank0_log)
    # SIGKILL to rank 1's training process, as the OOM killer sends it: nothing saved, the gang fails. (Deleting
    # the pod sends SIGTERM first, and a trainer that saves its step in the grace period is not a failure.)
    kubectl("exec", "-n", ns, pods["1"], "-c", "trainer", "--", "python", "-c", KILL_RANK)
    log(f"killed rank 1 in {pods['1']} at step {killed_at} (checkpoint {first_ckpt})")

    # The operator starts attempt 2, which resumes from that checkpoint.
    wait_for(lambda: len(training_pods(ns, 1)) == 2, 300, "the second attempt's pods")
    until(ns, lambda s: s.get("phase") == "Succeeded", 1200, "Succeeded")
    kubectl("wait", "-n", ns, "--for=condition=Succeeded", f"ftj/{JOB}", "--timeout=10s")  # as a user waits
    took = time.monotonic() - applied
    body = ftj(ns)
    status = body["status"]
    assert status["retries"] == 1, status
    attempt2 = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p["metadata"]["name"]
                for p in training_pods(ns, 1)}
    resumed_log = kubectl("logs", "-n", ns, attempt2["0"]).stdout
    resumed = re.search(r"resuming from the complete checkpoint at step (\d+)", resumed_log)
    assert resumed, resumed_log[-2000:]
    resumed_at = int(resumed.group(1))
    assert resumed_at >= ckpt_step, (resumed_at, first_ckpt)
    progress = status["progress"]
    assert progress["step"] == progress["totalSteps"] == last_step(resumed_log), progress
    redone = max(0, killed_at - resumed_at)
    assert redone <= job_manifest(s3)["spec"]["training"]["checkpointEvery"]
    log(f"Succeeded {took:.0f}s after apply; killed at step {killed_at}, resumed at {resumed_at}: "
        f"{redone} step(s) redone; final step {progress['step']}")

    # Checkpoints and the model are in S3.
    client = boto3.client("s3", endpoint_url=s3)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="kubetune", Prefix=f"jobs/{JOB}/")
            for o in page.get("Contents", [])]
    assert any("/checkpoints/" in k for k in keys) and any(k.endswith("/model/config.json") for k in keys), keys[:50]
    assert status["outputModel"] == f"s3://kubetune/jobs/{JOB}/model"

    # Every checkpoint a model, the best marked; the gate's verdict; lineage and a model card beside the model.
    best = [c for c in status["checkpoints"] if c.get("best")]
    assert len(best) == 1 and all(any(k.endswith(f"{c['model'].split('kubetune/', 1)[1]}/config.json") for k in keys)
                                  for c in status["checkpoints"]), status["checkpoints"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert status["evaluation"]["passed"] and conditions["EvaluationPassed"]["status"] == "True", status["evaluation"]
    assert status["lineage"]["uri"] == f"s3://kubetune/jobs/{JOB}/model/lineage.json" and len(status["lineage"]["specHash"]) == 64
    assert any(k.endswith("/model/README.md") for k in keys)
    wide = kubectl("get", "ftj", JOB, "-n", ns, "-o", "wide").stdout
    assert "TOKENS/S" in wide and "true" in wide.splitlines()[1].split(), wide
    log(f"best checkpoint {best[0]['name']} ({best[0]['metrics']}); gate: {status['evaluation']['message']}")

    # Serving: the Deployment becomes ready; the openai client chats through the Service.
    kubectl("rollout", "status", "-n", ns, f"deployment/{JOB}-serve", "--timeout=600s", timeout=620)
    deployment = get_json("deployment", f"{JOB}-serve", "-n", ns)
    assert best[0]["model"] in deployment["spec"]["template"]["spec"]["initContainers"][0]["command"]
    reply = chat_through_service(ns)
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens > 0
    log(f"served: {reply.choices[0].message.content[:80]!r}")

    # Nothing secret or personal in logs, events, status or what the job wrote to S3.
    assert_no_secret(ns)
    scanned = assert_no_pii(ns, client)
    log(f"planted secret and {len(PII)} PII values: 0 hits in {scanned} logs, events, status and artifacts")

    # Deleting the job removes every child; the data and the model stay in S3.
    kubectl("delete", "ftj", JOB, "-n", ns, "--wait=true", timeout=120)
    kinds = "jobs,pods,services,deployments,configmaps,serviceaccounts,roles,rolebindings"
    wait_for(lambda: not kubectl("get", kinds, "-n", ns, "-l", f"kubetune.dev/job={JOB}", "-o", "name").stdout.strip(),
             180, "every child to go")
    after = client.list_objects_v2(Bucket="kubetune", Prefix=f"jobs/{JOB}/model/")["KeyCount"]
    assert after > 0 and client.list_objects_v2(Bucket="kubetune", Prefix="data/")["KeyCount"] > 0


def test_an_openai_fine_tuning_script_runs_unchanged(s3, namespace, operator_release, tmp_path):
    """examples/openai_finetune.py, written for OpenAI's API, with only OPENAI_BASE_URL and OPENAI_API_KEY
    set: upload, a supervised job, a DPO job on its model (fromJob), events, chat by model name. Beside it,
    at the same time, the same script's reinforcement variant: a grader validated and run, a reinforcement
    fine-tuning job with that string_check grader, its reward events and checkpoints, a chat with the result."""
    ns = namespace
    bucket(s3)  # made by the first test, unless this one runs alone
    create_credentials(ns)  # what the jobs' pods read (api.storage.credentialsSecret)
    base_url, token = api_access(ns, "team-bot")
    script_env = {**env(), "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": token}
    prompts = tmp_path / "tickets.jsonl"  # a few: the method and its plumbing (tests/test_rft.py: learning)
    prompts.write_text("".join((EXAMPLES / "rft-labels.jsonl").read_text().splitlines(keepends=True)[:60]))
    started = time.monotonic()
    rft = subprocess.Popen([sys.executable, str(EXAMPLES / "openai_finetune.py"), "kubetune-tiny", "--rft", str(prompts)],
                           env=script_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = subprocess.run([sys.executable, str(EXAMPLES / "openai_finetune.py"), "kubetune-tiny",
                          str(EXAMPLES / "data" / "support-chat.jsonl"), "--dpo", str(EXAMPLES / "preference.jsonl")],
                         env=script_env, capture_output=True, text=True, timeout=1500)
    log(f"openai_finetune.py took {time.monotonic() - started:.0f}s:\n{run.stdout[-3000:]}")
    rft_out = rft.communicate(timeout=max(60, 1500 - (time.monotonic() - started)))[0]
    log(f"openai_finetune.py --rft took {time.monotonic() - started:.0f}s:\n{rft_out[-3000:]}")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count(": succeeded,") == 2 and "Step " in run.stdout and "checkpoint ft:" in run.stdout
    # the reply, as repr() prints it: in double quotes when it holds a single one
    assert re.search(rf"^ft:ft-kubetune-tiny-{ns}-support-ftjob-\w+:{ns}:support-dpo:ftjob-\w+: ['\"]", run.stdout, re.M), \
        run.stdout[-1000:]
    jobs = get_json("ftj", "-n", ns)["items"]
    dpo = next(j for j in jobs if j["spec"]["training"].get("objective") == "dpo")
    assert "fromJob" in dpo["spec"]["model"] and dpo["status"]["phase"] == "Succeeded"

    assert rft.returncode == 0, rft_out[-3000:]
    assert "grader 'label' gives the sample 'A' " in rft_out and rft_out.count(": succeeded,") == 1, rft_out[-3000:]
    assert re.search(r"Step \d+/\d+: .*train_reward_mean=", rft_out), rft_out[-3000:]  # the rewards, as events
    assert re.search(r"checkpoint ft:\S+:ckpt-step-\d+: .*valid_reward_mean", rft_out), rft_out[-3000:]
    assert re.search(rf"^ft:kubetune-tiny:{ns}:rft:ftjob-\w+: ['\"]", rft_out, re.M), rft_out[-1000:]
    reinforced = next(j for j in get_json("ftj", "-n", ns)["items"] if j["spec"]["training"].get("objective") == "rft")
    assert reinforced["status"]["phase"] == "Succeeded"
    assert reinforced["spec"]["training"]["rft"]["grader"]["reference"] == "{{item.label}}"
    assert "reward_mean" in reinforced["status"]["progress"]["metrics"]
    # its serving pod would hold CPU the later scenarios in this namespace need (a 2-core node)
    kubectl("delete", "ftj", reinforced["metadata"]["name"], "-n", ns, "--wait=false")
    assert_no_secret(ns)
    assert token not in "".join(cluster_texts(ns)) + kubectl("logs", "-n", RELEASE_NS, "deployment/kubetune-api").stdout


def api_access(ns: str, account: str) -> tuple[str, str]:
    """kubetune api's URL and a key for it: a ServiceAccount token (audience kubetune) allowed FineTuneJobs in ns."""
    kubectl("create", "serviceaccount", account, "-n", ns)
    kubectl("create", "role", account, "-n", ns, "--verb=get,list,create,patch", "--resource=finetunejobs")
    kubectl("create", "rolebinding", account, "-n", ns, f"--role={account}", f"--serviceaccount={ns}:{account}")
    token = kubectl("create", "token", account, "-n", ns, "--duration=1h", "--audience", "kubetune").stdout.strip()
    kubectl("rollout", "status", "-n", RELEASE_NS, "deployment/kubetune-api", "--timeout=120s")
    ip = kubectl("get", "service", "kubetune-api", "-n", RELEASE_NS, "-o", "jsonpath={.spec.clusterIP}").stdout
    return f"http://{ip}:8080/v1", token


def chat_through_service(ns: str):
    """The official openai client, through the Service: the API server's service proxy, with a
    ServiceAccount token allowed only that (works on any cluster, kind included)."""
    import ssl

    import httpx2  # the HTTP client the openai package uses
    import openai

    kubectl("create", "serviceaccount", "e2e-client", "-n", ns)
    service = f"{JOB}-serve:8000"  # the name RBAC sees in a service proxy path: NAME:PORT
    kubectl("create", "role", "e2e-proxy", "-n", ns, "--verb=get,create", "--resource=services/proxy",
            f"--resource-name={service}")
    kubectl("create", "rolebinding", "e2e-proxy", "-n", ns, "--role=e2e-proxy", f"--serviceaccount={ns}:e2e-client")
    token = kubectl("create", "token", "e2e-client", "-n", ns, "--duration=1h").stdout.strip()
    config = yaml.safe_load(kubectl("config", "view", "--raw", "--minify").stdout)
    cluster = config["clusters"][0]["cluster"]
    ca = cluster.get("certificate-authority")
    if cluster.get("certificate-authority-data"):
        ca = tempfile.NamedTemporaryFile(suffix=".crt", delete=False).name
        Path(ca).write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
    base_url = f"{cluster['server']}/api/v1/namespaces/{ns}/services/{service}/proxy/v1"
    client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=5,
                           http_client=httpx2.Client(verify=ssl.create_default_context(cafile=ca) if ca else
                                                    not cluster.get("insecure-skip-tls-verify")))
    return client.chat.completions.create(model=JOB, max_tokens=16,
                                          messages=[{"role": "user", "content": "How do I export my notes?"}])


def planted_pii() -> bytes:
    lines = [{"messages": [{"role": "user", "content": f"My details changed, please update them: {value}. Thanks!"},
                           {"role": "assistant", "content": f"Done! I noted {value} on your account."}]} for value in PII]
    lines.append({"messages": [{"role": "user", "content": f"Authorization: Bearer {PII[-1]} fails with 401"},
                               {"role": "assistant", "content": "That token has expired; sign in again."}]})
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def assert_no_pii(ns: str, client) -> int:
    """Search the job's text artifacts in S3 (report, cleaned data, the prepared shards' decoded tokens)
    plus logs, events and status for the planted values; returns how many texts were searched."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    texts = cluster_texts(ns)
    prefix = f"jobs/{JOB}/"
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="kubetune", Prefix=prefix)
            for o in page.get("Contents", [])]
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            if key.startswith(f"{prefix}model/") and not key.endswith((".safetensors", ".bin", ".pt")):
                client.download_file("kubetune", key, str(Path(tmp) / Path(key).name))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        for key in keys:
            body = client.get_object(Bucket="kubetune", Key=key)["Body"].read()
            if key.endswith(".parquet"):
                rows = pq.read_table(pa.BufferReader(body)).column("input_ids").to_pylist()
                texts += [tokenizer.decode(ids) for ids in rows]
            elif key.endswith((".json", ".jsonl", ".txt", ".md", ".yaml", ".csv")):
                texts.append(body.decode("utf-8", errors="replace"))
    hits = [(value, t[max(0, t.find(value) - 80):t.find(value) + 80]) for t in texts for value in PII if value in t]
    assert not hits, hits[:5]
    return len(texts)


def cluster_texts(ns: str) -> list[str]:
    """The namespace's jobs (their status), the Events of both namespaces, the operator's log and every
    container's log."""
    texts = [kubectl("get", "ftj", "-n", ns, "-o", "json").stdout, kubectl("get", "events", "-n", ns, "-o", "json").stdout,
             kubectl("get", "events", "-n", RELEASE_NS, "-o", "json").stdout,
             kubectl("logs", "-n", RELEASE_NS, "deployment/kubetune-operator", "--tail=-1").stdout]
    for pod in get_json("pods", "-n", ns)["items"]:
        for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            texts.append(kubectl("logs", "-n", ns, pod["metadata"]["name"], "-c", c["name"], check=False).stdout)
    return texts


def assert_no_secret(ns: str) -> None:
    leaks = [t[:200] for t in cluster_texts(ns) if SECRET_KEY in t]
    assert not leaks, leaks


def short_conversations(n: int = 30) -> bytes:
    """A new user's first file: ``n`` short conversations (OpenAI's minimum is 10)."""
    topics = ["reset my password", "export notes as PDF", "share a notebook", "change the theme", "delete a tag"]
    return b"".join(json.dumps({"messages": [
        {"role": "user", "content": f"How do I {topics[i % len(topics)]}? (ticket {i})"},
        {"role": "assistant", "content": f"Open Settings, then {topics[i % len(topics)].split()[0]}: step {i % 3 + 1}."},
    ]}).encode() + b"\n" for i in range(n))


def test_small_data_a_batch_that_cannot_fit_and_an_eviction(s3, namespace, operator_release):
    """Issue 21's seams, as a user meets them: 30 conversations train with the batch sizes left to their defaults;
    a fixed batch bigger than the data fails once, in preparation, with one line naming the numbers; a training pod
    evicted through the Eviction API (as a drain or preemption does) resumes from its SIGTERM checkpoint without
    using a retry."""
    ns = namespace
    create_credentials(ns)
    client = bucket(s3)
    client.put_object(Bucket="kubetune", Key="small/thirty.jsonl", Body=short_conversations(30))

    # A fixed batch that cannot fit: refused by the prepare pod, once, before any training pod starts.
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(small_job(s3, "toobig", "s3://kubetune/small/",
                                                                     globalBatchSize=64)))
    status = wait_for(lambda: (lambda s: s if s.get("phase") == "Failed" else None)(ftj_named(ns, "toobig")), 300,
                      "toobig to fail")
    assert status["reason"] == "InvalidInput", status
    assert re.fullmatch(r"the data has \d+ packed training rows, fewer than training.globalBatchSize 64 .*",
                        status["message"]), status["message"]
    assert len(job_pods(ns, "toobig-prepare")) == 1 and not job_pods(ns, "toobig-train-0")  # one try, no gang
    assert status.get("dataReport"), status  # what preparation found is kept
    log(f"toobig: {status['reason']}: {status['message']}")

    # 30 conversations, batch sizes left to their defaults (auto): trains, and says what it chose.
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(small_job(s3, "thirty", "s3://kubetune/small/", epochs=2)))
    status = wait_for(lambda: (lambda s: s if s.get("phase") in ("Succeeded", "Failed") else None)(
        ftj_named(ns, "thirty")), 900, "thirty to finish")
    assert status["phase"] == "Succeeded", status
    assert status["progress"]["globalBatchSize"] <= status["dataReport"]["train"], status
    log(f"thirty: Succeeded; auto batch {status['progress']['globalBatchSize']}, {status['progress']['totalSteps']} steps")

    # An eviction through the Eviction API mid-training: the Job replaces the pod (podFailurePolicy Ignore on
    # DisruptionTarget), which resumes from the SIGTERM checkpoint; status.retries stays untouched.
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(small_job(
        s3, "evicted", "s3://kubetune/data/", maxSteps=80, checkpointEvery=1000, evalEvery=1000)))
    pod = wait_for(lambda: (lambda p: p[0]["metadata"]["name"] if p else None)(job_pods(ns, "evicted-train-0")), 600,
                   "the training pod")
    wait_for(lambda: log_from_step(ns, pod, 10), 600, "step 10", interval=0.5)
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": ns}}
    kubectl("create", "--raw", f"/api/v1/namespaces/{ns}/pods/{pod}/eviction", "-f", "-", input=json.dumps(eviction))
    log(f"evicted {pod} through the Eviction API")
    replacement = wait_for(lambda: next((p["metadata"]["name"] for p in job_pods(ns, "evicted-train-0")
                                         if p["metadata"]["name"] != pod), None), 300, "the replacement pod")
    status = wait_for(lambda: (lambda s: s if s.get("phase") in ("Succeeded", "Failed") else None)(
        ftj_named(ns, "evicted")), 900, "evicted to finish")
    assert status["phase"] == "Succeeded", status
    assert not status.get("retries") and status["trainingJob"] == "evicted-train-0", status  # no retry used
    resumed = re.search(r"resuming from the complete checkpoint at step (\d+)", kubectl("logs", "-n", ns, replacement).stdout)
    assert resumed and int(resumed.group(1)) >= 10, kubectl("logs", "-n", ns, replacement).stdout[-2000:]
    log(f"evicted at step >= 10; the replacement {replacement} resumed at step {resumed.group(1)}; retries untouched")


def preparing_pod(ns: str, job: str, not_in: tuple[str, ...] = ()) -> str | None:
    """A pod of ``job`` whose preparation is under way (its log says so: its SIGTERM handler is in place)."""
    for p in job_pods(ns, job):
        name = p["metadata"]["name"]
        if name not in not_in and "[prepare] read" in kubectl("logs", "-n", ns, name, check=False).stdout:
            return name
    return None


def many_conversations(n: int) -> bytes:
    """Enough data for preparation to take a while (a pod can be evicted in the middle of it)."""
    return b"".join(json.dumps({"messages": [
        {"role": "user", "content": f"Question {i}: how do I move notebook {i % 97} into folder {i % 13}?"},
        {"role": "assistant", "content": f"Open notebook {i % 97}, choose Move, then folder {i % 13} ({i})."},
    ]}).encode() + b"\n" for i in range(n))


def test_preparation_faults_and_thirty_conversations_through_the_api(s3, namespace, operator_release):
    """The failure matrix's preparation row in real pods: a prepare pod evicted is replaced without counting, one
    killed is retried by its Job (backoffLimit: spec.maxRetries), and storage that cannot be reached is retried,
    then named in one line. Meanwhile a new user's 30 conversations train through kubetune api with no
    hyperparameters at all."""
    import openai

    ns = namespace
    create_credentials(ns)
    client = bucket(s3)
    client.put_object(Bucket="kubetune", Key="faults/thirty.jsonl", Body=short_conversations(30))
    client.put_object(Bucket="kubetune", Key="faults-many/many.jsonl", Body=many_conversations(60000))

    # Nothing listens on port 9: each prepare pod tries 9 times and exits 75 (transient); its Job tries twice.
    unreachable = small_job(f"http://{HOST_IP}:9", "unreachable", "s3://kubetune/faults/")
    unreachable["spec"].update(maxRetries=1, resources={**unreachable["spec"]["resources"], "prepare": {"cpu": "100m"}})
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(unreachable))

    # 30 conversations through the OpenAI API, no hyperparameters: batch_size auto fits the data.
    base_url, token = api_access(ns, "newcomer")
    api = openai.OpenAI(base_url=base_url, api_key=token)
    file = api.files.create(file=("thirty.jsonl", short_conversations(30)), purpose="fine-tune")
    api_job = api.fine_tuning.jobs.create(model="kubetune-tiny", training_file=file.id)

    # A prepare pod evicted (not counted), then its replacement deleted (counted: 1 of maxRetries 1).
    doc = small_job(s3, "prepfaults", "s3://kubetune/faults-many/", maxSteps=2)
    doc["spec"]["maxRetries"] = 1
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc))
    first = wait_for(lambda: preparing_pod(ns, "prepfaults-prepare"), 300, "a prepare pod under way", interval=0.3)
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": first, "namespace": ns}}
    kubectl("create", "--raw", f"/api/v1/namespaces/{ns}/pods/{first}/eviction", "-f", "-", input=json.dumps(eviction))
    second = wait_for(lambda: preparing_pod(ns, "prepfaults-prepare", (first,)), 300, "the replacement under way",
                      interval=0.3)
    kubectl("delete", "pod", "-n", ns, second, "--wait=false")
    log(f"prepfaults: evicted {first}, then deleted its replacement {second}")
    status = wait_for(lambda: (lambda s: s if s.get("phase") in ("Succeeded", "Failed") else None)(
        ftj_named(ns, "prepfaults")), 900, "prepfaults to finish")
    assert status["phase"] == "Succeeded", status  # an eviction that counted would have exhausted backoffLimit 1
    prepare = get_json("job", "prepfaults-prepare", "-n", ns)["status"]
    assert prepare.get("failed") == 1 and not status.get("retries"), (prepare, status)
    log(f"prepfaults: Succeeded; the prepare Job counted {prepare['failed']} failure (the deletion), not the eviction")

    while (api_job := api.fine_tuning.jobs.retrieve(api_job.id)).status not in ("succeeded", "failed", "cancelled"):
        time.sleep(3)
    assert api_job.status == "succeeded", api_job.error
    assert api_job.hyperparameters.batch_size <= 30, api_job.hyperparameters
    log(f"thirty through the API: succeeded, batch_size {api_job.hyperparameters.batch_size} (auto), "
        f"{api_job.trained_tokens} tokens")

    status = wait_for(lambda: (lambda s: s if s.get("phase") in ("Succeeded", "Failed") else None)(
        ftj_named(ns, "unreachable")), 600, "unreachable to fail")
    assert status["phase"] == "Failed" and status["reason"] == "PreparationFailed", status
    assert re.fullmatch(rf"object storage at http://{re.escape(HOST_IP)}:9 unavailable after 9 tries .*",
                        status["message"]), status["message"]
    assert len(job_pods(ns, "unreachable-prepare")) == 2, job_pods(ns, "unreachable-prepare")  # 1 + maxRetries 1
    log(f"unreachable: {status['reason']}: {status['message']}")


class Pinger(threading.Thread):
    """A client that sends chat requests without pause and without retries, counting what succeeds and fails."""

    def __init__(self, base_url: str, model: str):
        import openai

        super().__init__(daemon=True)
        self.client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
        self.model, self.ok, self.failed, self.errors = model, 0, 0, []
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            try:
                self.client.chat.completions.create(model=self.model, max_tokens=4,
                                                    messages=[{"role": "user", "content": "How do I share a notebook?"}])
                self.ok += 1
            except Exception as e:  # noqa: BLE001 - every failed request counts, whatever its kind
                self.failed += 1
                self.errors.append(f"{type(e).__name__}: {e}"[:200])

    def stop(self) -> "Pinger":
        self.stopping.set()
        self.join(90)
        return self


def put_lines(client, key: str, rows: list[dict]) -> None:
    client.put_object(Bucket="kubetune", Key=key, Body="".join(json.dumps(r) + "\n" for r in rows).encode())


def poisoned(rows: list[dict]) -> list[dict]:
    """Poisoned data: the replies shuffled between conversations."""
    replies = [m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant"]
    replies = replies[7:] + replies[:7]
    return [{**r, "messages": [{**m, "content": replies.pop()} if m["role"] == "assistant" else m
                               for m in r["messages"]]} for r in rows]


def schedule_status(ns: str, name: str) -> dict:
    return get_json("fts", name, "-n", ns).get("status") or {}


def switch_under_load(ns: str, base_url: str, change, until, served: int, what: str) -> Pinger:
    """Run ``change``, wait for ``until(status)`` and for revision ``served`` to be served with its rollout over,
    a client sending requests the whole time; the client, stopped."""
    pinger = Pinger(base_url, "bot")
    pinger.start()
    started = time.monotonic()
    change()
    status = wait_for(lambda: (lambda st: st if until(st) else None)(schedule_status(ns, "bot")), 1200, what, interval=2)
    assert status.get("servedRevision") == served, status
    kubectl("rollout", "status", "deployment/bot-serve", "-n", ns, "--timeout=600s", timeout=660)
    time.sleep(3)  # and a few requests more on the new pods alone
    pinger.stop()
    log(f"{what}: {pinger.ok} requests succeeded, {pinger.failed} failed while the endpoint switched to revision "
        f"{served} ({time.monotonic() - started:.0f}s)")
    return pinger


def test_a_schedule_keeps_the_model_up_to_date(s3, namespace, operator_release):
    """Issue 22's loop, as a team runs it: new data starts a run, which is promoted when it beats the served
    model on the golden set; the stable endpoint switches with no failed request; feedback from the chat
    endpoint becomes training data; poisoned data is refused; a rollback; deleting the schedule keeps the data."""
    import httpx2

    ns = namespace
    create_credentials(ns)
    kubectl("delete", "ftj", "--all", "-n", ns, "--timeout=120s")  # the earlier tests' endpoints: CPU for these runs
    client = bucket(s3)
    chats = [json.loads(line) for line in (EXAMPLES / "data" / "support-chat.jsonl").read_text().splitlines()]
    put_lines(client, "loop/golden.jsonl", chats[:12])
    put_lines(client, "loop/data/first.jsonl", chats[12:112])
    template = small_job(s3, "bot", "s3://kubetune/loop/data/", maxSteps=120)["spec"]  # ~0.2 s a step
    template["output"] = {"uri": "s3://kubetune/loop/models/"}
    template["resources"]["prepare"] = {"cpu": "500m"}
    schedule = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneSchedule", "metadata": {"name": "bot"}, "spec": {
        "trigger": {"newData": {"uri": "s3://kubetune/loop/data/", "minExamples": 20, "pollSeconds": 30}},
        "replayFraction": 0.2, "promotion": {"metric": "valid_reply_pmi", "minDelta": 0.02,
                                             "goldenSet": "s3://kubetune/loop/golden.jsonl"},
        "serve": {"cpu": "200m", "memory": "1Gi", "capture": {"uri": "s3://kubetune/loop/captured/"}},
        "jobTemplate": template}}
    applied = time.monotonic()
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(schedule))

    # 1. The first data starts run 1; it is promoted, and the stable Service serves it as model "bot".
    wait_for(lambda: schedule_status(ns, "bot").get("servedRevision") == 1, 900, "revision 1 served", interval=2)
    kubectl("rollout", "status", "deployment/bot-serve", "-n", ns, "--timeout=600s", timeout=660)
    log(f"run 1 promoted and served {time.monotonic() - applied:.0f}s after kubectl apply")
    ip = kubectl("get", "service", "bot-serve", "-n", ns, "-o", "jsonpath={.spec.clusterIP}").stdout
    base_url = f"http://{ip}:8000/v1"
    import openai
    chat = openai.OpenAI(base_url=base_url, api_key="unused")
    replies = [chat.chat.completions.create(model="bot", max_tokens=8, messages=[{"role": "user", "content": text}])
               for text in (f"My email is {PII[0]}, how do I export notes?", f"Call me on {PII[1]} about billing",
                            "How do I delete a tag?")]
    assert all(r.model == "bot" for r in replies)

    # 2. Feedback (up, corrected, down) and new data: run 2 continues from run 1 and is promoted under load.
    for reply, rating in zip(replies, ({"rating": "up"}, {"rating": "down", "correction": "Open Settings, then Billing."},
                                       {"rating": "down"})):
        answer = httpx2.post(f"{base_url}/feedback", json={"completion_id": reply.id, **rating}, timeout=30)
        assert answer.status_code == 200, answer.text
    feedback = wait_for(lambda: client.list_objects_v2(Bucket="kubetune", Prefix="loop/data/feedback/").get("Contents"),
                        120, "the feedback under the new-data prefix")
    put_lines(client, "loop/data/second.jsonl", chats[112:212])
    pinger = switch_under_load(ns, base_url, lambda: None, lambda st: (st.get("lastResult") or {}).get("run") == "bot-r2",
                               2, "run 2 promoted")
    assert pinger.failed == 0 and pinger.ok > 10, pinger.errors[:5]
    run2 = get_json("ftj", "bot-r2", "-n", ns)
    assert run2["spec"]["model"] == {"fromJob": "bot-r1"}, run2["spec"]["model"]
    manifest = json.loads(client.get_object(Bucket="kubetune", Key="loop/models/bot-r2/data.manifest.json")["Body"].read())
    assert {o["Key"] for o in feedback} <= {f["uri"].removeprefix("s3://kubetune/") for f in manifest["files"]}, manifest
    revision = schedule_status(ns, "bot")["revisions"][-1]
    assert revision["metrics"]["golden_valid_reply_pmi"] > revision["metrics"]["served_golden_valid_reply_pmi"] + 0.02
    assert revision["metrics"]["golden_valid_loss"] < revision["metrics"]["served_golden_valid_loss"], revision

    # 3. Poisoned data: run 3 fails the same golden-set gate (its replies no longer depend on what was asked, though
    # its golden loss may well fall), the endpoint stays on run 2, and an Event says why.
    put_lines(client, "loop/data/third.jsonl", poisoned(chats[212:312]))
    result = wait_for(lambda: (lambda r: r if r and r["run"] == "bot-r3" else None)(
        schedule_status(ns, "bot").get("lastResult")), 1200, "run 3 judged", interval=2)
    assert result["result"] == "GateFailed" and schedule_status(ns, "bot")["servedRevision"] == 2, result
    events = get_json("events", "-n", ns, "--field-selector", "involvedObject.name=bot")["items"]
    assert any(e["reason"] == "NotPromoted" and "bot-r3" in e["message"] for e in events), [e["message"] for e in events]
    log(f"run 2 promoted: {revision['metrics']}")
    log(f"run 3 (poisoned) not promoted: {result['message']}; "
        f"data: {get_json('ftj', 'bot-r3', '-n', ns)['status']['dataReport']}")

    # 4. kubetune rollback to revision 1, again under load.
    pinger = switch_under_load(ns, base_url, lambda: sh(sys.executable, "-m", "kubetune.cli", "rollback", "bot", "--to",
                                                        "1", "-n", ns),
                               lambda st: st.get("servedRevision") == 1, 1, "rollback to revision 1")
    assert pinger.failed == 0 and pinger.ok > 5, pinger.errors[:5]

    # No planted personal data in what the endpoint captured or passed on as training data.
    keys = [o["Key"] for prefix in ("loop/captured/", "loop/data/feedback/")
            for o in client.list_objects_v2(Bucket="kubetune", Prefix=prefix).get("Contents", [])]
    captured = "".join(client.get_object(Bucket="kubetune", Key=k)["Body"].read().decode() for k in keys)
    assert "export notes" in captured and not [v for v in PII if v in captured], keys

    # 5. Deleting the schedule removes its runs and endpoint; the data and the models stay.
    kubectl("delete", "fts", "bot", "-n", ns, "--timeout=120s")
    wait_for(lambda: not get_json("ftj,deployment", "-n", ns, "-l", "kubetune.dev/schedule=bot")["items"], 180,
             "the schedule's children gone")
    models = client.list_objects_v2(Bucket="kubetune", Prefix="loop/models/bot-r1/model/").get("KeyCount", 0)
    assert models > 0 and client.list_objects_v2(Bucket="kubetune", Prefix="loop/data/")["KeyCount"] >= 4
