"""`kubetune api` with the official openai client, unchanged but for base_url and api_key, against the
real API server, the operator and a real S3 server.

The API server runs as the chart deploys it: under its own ServiceAccount holding exactly the chart's
ClusterRole, with the chart's config file. Callers are ServiceAccounts with Roles on finetunejobs; their
tokens are the api keys. No kubelet runs here, so the pods' work is written as the pods write it: Jobs
finished as the job controller does, progress and checkpoints patched into status, metrics.csv put in
the output. The serving Deployment cannot run either: its endpoint is pointed at a `kubetune serve` of
a tiny model on loopback, as the Service would be.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import openai
import pytest
import yaml
from openai import OpenAI

from conftest import ROOT, free_port
from k8s_helpers import finish_job, get, operator, wait_for, wait_phase

pytestmark = pytest.mark.k8s
CHART = ROOT / "charts" / "kubetune"
CHAT = (ROOT / "examples" / "data" / "support-chat.jsonl").read_bytes()
PAIRS = b"".join(json.dumps({
    "input": {"messages": [{"role": "user", "content": f"Is {n} even?"}]},
    "preferred_output": [{"role": "assistant", "content": "yes" if n % 2 == 0 else "no"}],
    "non_preferred_output": [{"role": "assistant", "content": "no" if n % 2 == 0 else "yes"}],
}).encode() + b"\n" for n in range(40))


def caller(cp, namespace: str, name: str, verbs: list[str]) -> str:
    """A ServiceAccount allowed ``verbs`` on finetunejobs in ``namespace``; its token for kubetune's audience."""
    docs = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name, "namespace": namespace},
         "rules": [{"apiGroups": ["kubetune.dev"], "resources": ["finetunejobs"], "verbs": verbs}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": name, "namespace": namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]},
    ]
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    return cp.kubectl("create", "token", name, "-n", namespace, "--duration=1h", "--audience", "kubetune"
                      ).stdout.strip()


@pytest.fixture
def api(control_plane, namespace, s3, s3_server, tmp_path):
    """(base_url, bucket): `kubetune api` with the chart's ServiceAccount, ClusterRole and config."""
    with running_api(control_plane, namespace, s3[1], s3_server, tmp_path) as base_url:
        yield base_url, s3[1]


@contextmanager
def running_api(cp, namespace: str, bucket: str, s3_server: str, tmp_path, *flags: str, ca: str | None = None):
    """`kubetune api` run as the chart deploys it, with more ``flags``; its base URL (https when ``ca``, the
    certificate it is to be trusted with, is given)."""
    release = f"r{uuid.uuid4().hex[:6]}"
    rendered = cp.helm("template", release, str(CHART), "-n", namespace, "--set", "api.enabled=true",
                       "--set", f"api.filesUri=s3://{bucket}/files/", "--set", f"api.outputsUri=s3://{bucket}/jobs/",
                       "--set", "api.storage.credentialsSecret=s3-creds").stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d and d["metadata"]["name"] == f"{release}-api"]
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([d for d in docs if d["kind"] in (
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding")]))
    config = tmp_path / "config.yaml"
    config.write_text(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"])
    token = cp.kubectl("create", "token", f"{release}-api", "-n", namespace, "--duration=1h").stdout.strip()
    args = ["-m", "kubetune.cli", "api", "--config", str(config), "--storage-endpoint", s3_server, *flags]
    with api_process(args, {**cp.env(cp.kubeconfig_for_token(token)), **_aws()}, tmp_path / "api.log", ca) as url:
        yield url


@contextmanager
def api_process(args: list[str], env: dict, log_path, ca: str | None = None, secret: str | None = None):
    """`python ARGS --port N`, a `kubetune api` process; its base URL once it answers. Its log must hold no
    traceback (nor ``secret``)."""
    port = free_port()
    with open(log_path, "w+") as log:
        proc = subprocess.Popen([sys.executable, *args, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                env=env)
        url = f"{'https' if ca else 'http'}://127.0.0.1:{port}"
        try:
            wait_for(lambda: _up(url, ca) or proc.poll() is not None, timeout=60, what="kubetune api")
            assert proc.poll() is None, open(log_path).read()
            yield f"{url}/v1"
        finally:
            proc.terminate()
            proc.wait(10)
        log.seek(0)
        text = log.read()
    assert "Traceback" not in text and (secret is None or secret not in text), text[-3000:]


def _aws() -> dict:
    return {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}


def _up(url: str, ca: str | None = None) -> bool:
    try:
        urllib.request.urlopen(f"{url}/healthz", timeout=2, context=ssl.create_default_context(cafile=ca) if ca
                               else None).close()
        return True
    except OSError:
        return False


def metrics_csv(rows: list[dict]) -> bytes:
    from kubetune.train.metrics import COLUMNS

    return b"".join(",".join(str(row.get(c, "")) for c in COLUMNS).encode() + b"\n" for row in [
        dict(zip(COLUMNS, COLUMNS)), *rows])


def patch_status(cp, namespace: str, name: str, status: dict) -> None:
    cp.kubectl("patch", "ftj", name, "-n", namespace, "--subresource=status", "--type=merge",
               "-p", json.dumps({"status": status}))


def test_supervised_job_from_upload_to_chat_with_the_openai_client(control_plane, namespace, api, s3, s3_server,
                                                                   tmp_path):
    from test_fuzz_serve import save_tiny_model, start_server

    cp, (base_url, bucket), (s3_client, _) = control_plane, api, s3
    client = OpenAI(base_url=base_url, api_key=caller(cp, namespace, "alice", ["get", "list", "create", "patch", "delete"]))

    # Files: upload, list, retrieve, content; a bad file is rejected with its line numbers.
    uploaded = client.files.create(file=("support.jsonl", CHAT), purpose="fine-tune")
    assert uploaded.status == "processed" and uploaded.bytes == len(CHAT) and uploaded.filename == "support.jsonl"
    assert uploaded.id in [f.id for f in client.files.list()]
    assert client.files.retrieve(uploaded.id).status == "processed"
    assert client.files.content(uploaded.id).content == CHAT
    broken = CHAT.split(b"\n")[:3] + [b'{"messages": [{"role": "wizard", "content": "hi"}]}', b"not json"]
    bad = client.files.create(file=("bad.jsonl", b"\n".join(broken) + b"\n"), purpose="fine-tune")
    assert bad.status == "error" and "line 4" in bad.status_details and "wizard" in bad.status_details \
        and "line 5" in bad.status_details, bad.status_details
    assert bad.status_details.startswith("Training file has 5 example(s), but must have at least 10 examples")
    with pytest.raises(openai.BadRequestError, match="line 4") as e:
        client.fine_tuning.jobs.create(model="kubetune-tiny", training_file=bad.id)
    assert e.value.param == "training_file"
    small = client.files.create(file=("small.jsonl", b"\n".join(CHAT.split(b"\n")[:30]) + b"\n"), purpose="fine-tune")
    assert small.status == "processed"
    with pytest.raises(openai.BadRequestError, match=f"batch_size 64 is larger than the 30 examples of training_file "
                       f"{small.id}") as e:  # a batch that can never fill, refused before any pod starts
        client.fine_tuning.jobs.create(model="kubetune-tiny", training_file=small.id, method={
            "type": "supervised", "supervised": {"hyperparameters": {"batch_size": 64}}})
    assert e.value.param == "method.supervised.hyperparameters.batch_size"

    with operator(cp, namespace):
        job = client.fine_tuning.jobs.create(model="kubetune-tiny", training_file=uploaded.id, suffix="support",
                                             seed=7, metadata={"team": "support"},
                                             hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 0.5})
        assert job.status == "validating_files" and job.metadata == {"team": "support"} and job.seed == 7
        ftj = get(cp, namespace, "ftj", job.id)  # a FineTuneJob in the caller's namespace, from the request
        training = ftj["spec"]["training"]
        assert ftj["spec"]["dataset"]["train"].startswith(f"s3://{bucket}/files/{namespace}/{uploaded.id}/")
        assert training["epochs"] == 2 and training["seed"] == 7 and training["learningRate"] == pytest.approx(1e-4)
        assert ftj["spec"]["output"]["uri"] == f"s3://{bucket}/jobs/{namespace}/{job.id}/"
        assert ftj["spec"]["storage"] == {"credentialsSecret": "s3-creds", "endpoint": s3_server}
        assert client.fine_tuning.jobs.list().data[0].id == job.id

        # Preparing, then a training gang without a step yet (queued), then steps (running).
        wait_for(lambda: get(cp, namespace, "job", f"{job.id}-prepare"), what="prepare Job")
        patch_status(cp, namespace, job.id, {"dataReport": {
            "examplesIn": 300, "train": 270, "validation": 30, "badLines": 0, "exactDuplicates": 0, "nearDuplicates": 0,
            "piiRedacted": 0, "trainTokens": 50_000}})
        finish_job(cp, namespace, f"{job.id}-prepare")
        wait_for(lambda: get(cp, namespace, "job", f"{job.id}-train-0"), what="training gang")
        assert client.fine_tuning.jobs.retrieve(job.id).status == "queued"
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        patch_status(cp, namespace, job.id, {"progress": {
            "phase": "training", "step": 10, "totalSteps": 20, "epoch": 1.0, "percent": 50.0, "etaSeconds": 120,
            "tokensPerSecond": 900.0, "metrics": {"train_loss": 2.5}, "updatedAt": now},
            "checkpoints": [{"name": "step-10", "step": 10, "metrics": {"valid_loss": 2.4},
                             "model": f"s3://{bucket}/jobs/x/checkpoints/step-10/model/", "best": True}]})
        rows = [{"step": 5, "epoch": 0.5, "train_loss": 3.1, "train_accuracy": 0.41, "learning_rate": 1e-4},
                   {"step": 10, "epoch": 1.0, "train_loss": 2.5, "train_accuracy": 0.52, "learning_rate": 1e-4,
                    "valid_loss": 2.4, "valid_perplexity": 11.0, "valid_mean_token_accuracy": 0.55}]
        s3_client.put_object(Bucket=bucket, Key=f"jobs/{namespace}/{job.id}/metrics.csv",  # as the trainer writes it
                             Body=metrics_csv(rows))
        running = client.fine_tuning.jobs.retrieve(job.id)
        assert running.status == "running" and running.trained_tokens == 50_000 and running.result_files == []
        assert running.hyperparameters.batch_size == "auto"  # none asked: the trainer fits it to the data
        with pytest.raises(openai.NotFoundError):  # results come when it succeeds
            client.files.retrieve(f"file-results-{job.id}")
        assert running.estimated_finish and running.estimated_finish >= int(time.time()) + 60
        events = client.fine_tuning.jobs.list_events(job.id, limit=50).data
        metrics = {e.data["step"]: e.data for e in events if e.type == "metrics"}
        assert metrics[5]["train_loss"] == 3.1 and metrics[10]["valid_loss"] == 2.4
        assert any(e.message.startswith("Created fine-tuning job") for e in events)
        assert any("Prepar" in e.message for e in events if e.type == "message"), [e.message for e in events]
        (checkpoint,) = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert checkpoint.step_number == 10 and checkpoint.metrics.valid_loss == 2.4
        assert checkpoint.fine_tuned_model_checkpoint.endswith(f":{job.id}:ckpt-step-10")

        # Done: the fine-tuned model's name answers chat completions from the same base URL.
        patch_status(cp, namespace, job.id, {"progress": {"phase": "done", "step": 20, "percent": 100.0, "epoch": 2.0}})
        finish_job(cp, namespace, f"{job.id}-train-0")
        wait_phase(cp, namespace, job.id, "Succeeded")
        done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded" and done.trained_tokens == 100_000 and done.finished_at
    assert done.fine_tuned_model == f"ft:kubetune-tiny:{namespace}:support:{job.id}"

    # Its per-step metrics, as OpenAI gives them: a results file in result_files, read as any file.
    (results_id,) = done.result_files
    results = client.files.retrieve(results_id)
    content = client.files.content(results_id).content
    assert content == (b"step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n"
                       b"5,3.1,0.41,,\n10,2.5,0.52,2.4,0.55\n")
    assert results.purpose == "fine-tune-results" and results.bytes == len(content) and results.status == "processed"
    with pytest.raises(openai.BadRequestError, match="already succeeded"):
        client.fine_tuning.jobs.cancel(job.id)

    # The endpoint is in status before its server is up (a serving pod loading the model refuses
    # connections): a chat request made then waits for it, as a script that chats right away expects.
    port = free_port()
    patch_status(cp, namespace, job.id, {"endpoint": f"http://127.0.0.1:{port}/v1"})  # where the Service would send it
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.chat.completions.create, model=done.fine_tuned_model, max_tokens=4,
                            messages=[{"role": "user", "content": "Where is my order?"}])
        time.sleep(3)
        assert not first.done(), first.result()
        server, _ = start_server(save_tiny_model(tmp_path / "model"), port=port)
        try:
            reply = first.result(timeout=120)
            assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens <= 4
            chunks = list(client.chat.completions.create(model=done.fine_tuned_model, max_tokens=3, stream=True,
                                                         messages=[{"role": "user", "content": "hello"}]))
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            assert [m.id for m in client.models.list().data] == [done.fine_tuned_model]
            with pytest.raises(openai.NotFoundError, match="not being served"):
                client.chat.completions.create(model=checkpoint.fine_tuned_model_checkpoint, messages=[
                    {"role": "user", "content": "hi"}])
        finally:
            server.terminate()
            server.wait(10)

def test_dpo_pause_resume_cancel_and_who_may_do_what(control_plane, namespace, api):
    cp, (base_url, _) = control_plane, api
    alice = OpenAI(base_url=base_url, api_key=caller(cp, namespace, "alice", ["get", "list", "create", "patch"]))
    bob = OpenAI(base_url=base_url, api_key=caller(cp, namespace, "bob", ["get", "list"]))
    other = f"{namespace}-other"
    cp.kubectl("create", "namespace", other)
    eve = OpenAI(base_url=base_url, api_key=caller(cp, other, "eve", ["get", "list", "create", "patch", "delete"]))

    pairs = alice.files.create(file=("pairs.jsonl", PAIRS), purpose="fine-tune")
    chat = alice.files.create(file=("chat.jsonl", CHAT), purpose="fine-tune")
    assert pairs.status == "processed"
    with pytest.raises(openai.BadRequestError, match="no preference pairs"):
        alice.fine_tuning.jobs.create(model="kubetune-tiny", training_file=chat.id, method={"type": "dpo"})
    with pytest.raises(openai.BadRequestError, match="n_epochs"):
        alice.fine_tuning.jobs.create(model="kubetune-tiny", training_file=chat.id, hyperparameters={"n_epochs": 0})
    with pytest.raises(openai.BadRequestError, match="not available"):
        alice.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=chat.id)

    with operator(cp, namespace):
        job = alice.fine_tuning.jobs.create(model="kubetune-tiny", training_file=pairs.id, method={
            "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1}}})
        assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
        training = get(cp, namespace, "ftj", job.id)["spec"]["training"]
        assert training["objective"] == "dpo" and training["dpo"]["beta"] == 0.2 and training["epochs"] == 1
        second = alice.fine_tuning.jobs.create(model="kubetune-tiny", training_file=chat.id)
        first_page = alice.fine_tuning.jobs.list(limit=1)
        assert [j.id for j in first_page.data] == [second.id] and first_page.has_more
        assert [j.id for j in alice.fine_tuning.jobs.list(limit=1, after=second.id).data] == [job.id]

        assert alice.fine_tuning.jobs.pause(job.id)
        wait_for(lambda: alice.fine_tuning.jobs.retrieve(job.id).status == "paused", what="paused")
        assert get(cp, namespace, "ftj", job.id)["spec"]["suspend"] is True
        alice.fine_tuning.jobs.resume(job.id)
        wait_for(lambda: alice.fine_tuning.jobs.retrieve(job.id).status != "paused", what="resumed")
        assert alice.fine_tuning.jobs.cancel(job.id).status == "cancelled"
        assert alice.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
        with pytest.raises(openai.BadRequestError, match="already been cancelled"):
            alice.fine_tuning.jobs.resume(job.id)

    # bob may read but not create or change; eve sees nothing of this namespace.
    assert [j.id for j in bob.fine_tuning.jobs.list().data] == [second.id, job.id]
    with pytest.raises(openai.PermissionDeniedError):
        bob.files.create(file=("x.jsonl", CHAT), purpose="fine-tune")
    with pytest.raises(openai.PermissionDeniedError):
        bob.fine_tuning.jobs.create(model="kubetune-tiny", training_file=chat.id)
    with pytest.raises(openai.PermissionDeniedError):
        bob.fine_tuning.jobs.cancel(second.id)
    assert eve.files.list().data == [] and eve.fine_tuning.jobs.list().data == []
    with pytest.raises(openai.NotFoundError):
        eve.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        eve.files.retrieve(pairs.id)
    with pytest.raises(openai.BadRequestError, match="no such file"):  # another namespace's file is not there
        eve.fine_tuning.jobs.create(model="kubetune-tiny", training_file=pairs.id)
    as_alice = OpenAI(base_url=base_url, api_key=eve.api_key, project=namespace)  # the project is the namespace
    with pytest.raises(openai.PermissionDeniedError):
        as_alice.fine_tuning.jobs.list()
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=base_url, api_key="not-a-token").files.list()
    assert eve.files.delete((eve.files.create(file=("e.jsonl", CHAT), purpose="fine-tune")).id).deleted
    assert eve.files.list().data == []
