"""FineTuneSchedule against a real kube-apiserver + etcd (+ the garbage collector) with the operator as its own
process: runs on request, promotion to the stable endpoint, refusal on a failed gate, rollback with the CLI,
and cleanup by owner references. Jobs are finished by writing their status as the job controller would, and
each run's evaluation verdict as its training pod would."""

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import EXAMPLES, free_port
from k8s_helpers import apply, finish_run, get, items, operator, operator_log, schedule_doc, wait_for

pytestmark = pytest.mark.k8s


@pytest.fixture(scope="module")
def cp(control_plane):
    control_plane.kubectl("wait", "--for=condition=Established", "crd/finetuneschedules.kubetune.dev", "--timeout=60s")
    wait_for(lambda: control_plane.kubectl("get", "fts", "-A", check=False).returncode == 0, what="fts discovery")
    return control_plane


def kubetune(cp, *args: str) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, with the control plane's kubectl and kubeconfig."""
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *args], env=cp.env(), capture_output=True, text=True,
                          timeout=60)


def status(cp, namespace: str, name: str) -> dict:
    return (get(cp, namespace, "fts", name) or {}).get("status") or {}


def served_model(cp, namespace: str, name: str) -> str | None:
    deployment = get(cp, namespace, "deployment", f"{name}-serve")
    if not deployment:
        return None
    return deployment["spec"]["template"]["spec"]["initContainers"][0]["command"][2]


def _owned_by(obj: dict, owner: dict) -> bool:
    return any(r["uid"] == owner["metadata"]["uid"] and r.get("controller") for r in obj["metadata"].get("ownerReferences", []))


def test_the_example_is_accepted(cp, namespace):
    run = cp.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(EXAMPLES / "support-bot-schedule.yaml"))
    assert "created (server dry run)" in run.stdout


@pytest.mark.parametrize("change, message", [
    (lambda d: d["spec"].update(schedule="daily"), 'spec.schedule: Invalid value: "daily"'),
    (lambda d: d["spec"].update(concurrencyPolicy="Queue"), 'spec.concurrencyPolicy: Unsupported value: "Queue"'),
    (lambda d: d["spec"].update(historyLimit=0), "spec.historyLimit: Invalid value: 0"),
    (lambda d: d["spec"]["jobTemplate"].update(evaluation={"gate": {"metric": "valid_loss", "mustBeat": "base"}}),
     "spec.jobTemplate.evaluation.gate: Invalid value: evaluation.gate is set by the schedule from spec.promotion"),
    (lambda d: d["spec"]["jobTemplate"].update(serve={"enabled": True}),
     "spec.jobTemplate.serve: Invalid value: serve is not used in a template"),
    (lambda d: d["spec"]["promotion"].update(metric="rouge"), 'spec.promotion.metric: Unsupported value: "rouge"'),
    (lambda d: (d["spec"]["promotion"].update(metric="rouge_l"), d["spec"]["jobTemplate"].update(evaluation={"samples": 0})),
     "spec.promotion.metric: Invalid value: promotion.metric scores generated replies"),
    (lambda d: d["spec"].update(timeZone="Europe/Berlin; rm"), "spec.timeZone: Invalid value"),
    (lambda d: d["metadata"].update(name="x" * 31), "metadata.name must be at most 30 characters"),
    (lambda d: d["spec"].update(trigger={"newData": {"uri": "s3://data/in/", "pollSeconds": 5}}),
     "spec.trigger.newData.pollSeconds: Invalid value: 5"),
    (lambda d: d["spec"].update(trigger={"newData": {"uri": "/data/in"}}), 'spec.trigger.newData.uri: Invalid value: "/data/in"'),
    (lambda d: d["spec"].update(replayFraction=1.5), "spec.replayFraction: Invalid value: 1.5"),
    (lambda d: d["spec"].update(serve={"image": "vllm/vllm-openai:v0.11.0", "capture": {"uri": "s3://logs/"}}),
     "spec.serve.capture: Invalid value: capture needs kubetune serve"),
    (lambda d: d["spec"].update(serve={"capture": {"uri": "s3://logs/", "sampleRate": 2}}),
     "spec.serve.capture.sampleRate: Invalid value: 2"),
])
def test_invalid_schedules_are_rejected_with_the_field(cp, namespace, change, message):
    doc = schedule_doc("bad", promotion={})
    change(doc)
    run = cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False)
    assert run.returncode != 0 and message in run.stderr, run.stderr


def test_retrain_promote_refuse_roll_back_and_delete(cp, namespace):
    port = free_port()
    with operator(cp, namespace, metrics_port=port) as op:
        apply(cp, namespace, schedule_doc("bot", serve={"replicas": 2}))
        wait_for(lambda: status(cp, namespace, "bot").get("reason") == "Waiting", what="the schedule's first status")
        assert get(cp, namespace, "deployment", "bot-serve") is None  # nothing promoted, nothing served

        # Run 1, on request: from the template's model; promoted, and served at the stable endpoint.
        assert kubetune(cp, "retrain", "bot", "-n", namespace).returncode == 0
        run1 = wait_for(lambda: get(cp, namespace, "ftj", "bot-r1"), what="run 1")
        schedule = get(cp, namespace, "fts", "bot")
        assert _owned_by(run1, schedule) and run1["metadata"]["labels"]["kubetune.dev/schedule"] == "bot"
        assert "fromConfig" in run1["spec"]["model"] and run1["spec"]["serve"] == {"enabled": False}
        assert run1["spec"]["evaluation"]["gate"] == {"metric": "valid_loss", "mustBeat": "base"}
        assert run1["spec"]["output"]["uri"] == "s3://models/bot/bot-r1/"
        finish_run(cp, namespace, "bot-r1", passed=True)
        wait_for(lambda: status(cp, namespace, "bot").get("servedRevision") == 1, what="revision 1 served")
        deployment = wait_for(lambda: get(cp, namespace, "deployment", "bot-serve"), what="the endpoint")
        assert served_model(cp, namespace, "bot") == "s3://models/bot/bot-r1/model" and _owned_by(deployment, schedule)
        assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
        assert deployment["spec"]["replicas"] == 2 and get(cp, namespace, "service", "bot-serve")
        st = status(cp, namespace, "bot")
        assert st["revisions"][0]["job"] == "bot-r1" and st["revisions"][0]["promotedBy"] == "manual"
        assert st["endpoint"] == f"http://bot-serve.{namespace}.svc:8000/v1"
        wait_for(lambda: get(cp, namespace, "ftj", "bot-r1")["metadata"]["labels"].get("kubetune.dev/result") == "Promoted",
                 what="run 1 labelled")

        # Run 2 continues from revision 1 and does not beat it: not promoted, the endpoint stays, an Event says why.
        assert kubetune(cp, "retrain", "bot", "-n", namespace).returncode == 0
        run2 = wait_for(lambda: get(cp, namespace, "ftj", "bot-r2"), what="run 2")
        assert run2["spec"]["model"] == {"fromJob": "bot-r1"}
        assert run2["spec"]["evaluation"]["gate"] == {"metric": "valid_loss", "mustBeat": "serving"}
        assert run2["spec"]["evaluation"]["servedModel"] == "s3://models/bot/bot-r1/model"
        assert run2["spec"]["preprocessing"]["dedup"]["index"] == "s3://models/bot/bot/dedup-index/"
        finish_run(cp, namespace, "bot-r2", passed=False, value=1.7)
        st = wait_for(lambda: (s := status(cp, namespace, "bot")).get("lastResult", {}).get("run") == "bot-r2" and s,
                      what="run 2's result")
        assert st["lastResult"]["result"] == "GateFailed" and "not better than the base model" in st["lastResult"]["message"]
        assert len(st["revisions"]) == 1 and served_model(cp, namespace, "bot") == "s3://models/bot/bot-r1/model"
        wait_for(lambda: any(e["reason"] == "NotPromoted" and e["type"] == "Warning" for e in items(cp, namespace, "events")),
                 what="the NotPromoted event")

        # Run 3 beats it: revision 2, the endpoint rolls over.
        assert kubetune(cp, "retrain", "bot", "-n", namespace).returncode == 0
        wait_for(lambda: get(cp, namespace, "ftj", "bot-r3"), what="run 3")
        finish_run(cp, namespace, "bot-r3", passed=True, value=1.1)
        wait_for(lambda: served_model(cp, namespace, "bot") == "s3://models/bot/bot-r3/model", what="revision 2 served")
        header, row = cp.kubectl("get", "fts", "bot", "-n", namespace).stdout.splitlines()
        assert header.split()[:7] == ["NAME", "SERVING", "LAST", "RUN", "LAST", "RESULT", "NEXT"]
        assert row.split()[:4] == ["bot", "2", "bot-r3", "Promoted"]
        runs = {r["metadata"]["name"] for r in items(cp, namespace, "ftj", "kubetune.dev/schedule=bot")}
        assert runs == {"bot-r1", "bot-r2", "bot-r3"}

        # Rollback with the CLI: back to revision 1, and status says why.
        rolled = kubetune(cp, "rollback", "bot", "-n", namespace)
        assert rolled.returncode == 0 and "pinned to revision 1" in rolled.stdout, rolled.stderr
        wait_for(lambda: served_model(cp, namespace, "bot") == "s3://models/bot/bot-r1/model", what="rolled back")
        st = status(cp, namespace, "bot")
        assert st["servedRevision"] == 1 and "pinned by spec.pinnedRevision" in st["servedReason"]
        refused = kubetune(cp, "rollback", "bot", "--to", "9", "-n", namespace)
        assert refused.returncode == 3 and "revision 9 is not among bot's revisions (1, 2)" in refused.stderr
        assert "Traceback" not in operator_log(op)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for line in ('kubetune_schedule_runs_total{trigger="manual"} 3.0', 'kubetune_schedule_rollouts_total{reason="RolledBack"} 1.0',
                     'kubetune_schedule_run_results_total{result="Promoted"} 2.0',
                     'kubetune_schedule_run_results_total{result="GateFailed"} 1.0'):
            assert line in metrics, line

        # Deleting the schedule deletes its runs and its endpoint (owner references, the garbage collector).
        cp.kubectl("delete", "fts", "bot", "-n", namespace)
        wait_for(lambda: not items(cp, namespace, "ftj") and get(cp, namespace, "deployment", "bot-serve") is None
                 and get(cp, namespace, "service", "bot-serve") is None, timeout=90, what="runs and endpoint deleted")


def test_a_cron_tick_starts_a_run_with_no_other_event(cp, namespace):
    # The operator wakes itself at the next tick (its recheck thread): nothing else changes meanwhile.
    with operator(cp, namespace):
        while time.gmtime().tm_sec >= 45:  # created in the minute of its first reconcile: no tick due before nextRun
            time.sleep(1)
        apply(cp, namespace, schedule_doc("tick", schedule="* * * * *"))
        due = wait_for(lambda: status(cp, namespace, "tick").get("nextRun"), what="the next tick in status")
        assert status(cp, namespace, "tick")["message"] == "no revision yet"
        run = wait_for(lambda: get(cp, namespace, "ftj", "tick-r1"), timeout=90, what="the run of the next tick")
        assert run["metadata"]["annotations"]["kubetune.dev/trigger"] == "schedule"
        assert run["metadata"]["annotations"]["kubetune.dev/scheduled-at"] == due
        st = wait_for(lambda: (s := status(cp, namespace, "tick")).get("lastRun") and s, what="lastRun")
        assert st["lastScheduleTime"] == due and st["lastRun"]["trigger"] == "schedule" and st["nextRun"] > due


def test_new_data_under_a_prefix_starts_a_run_on_it_and_replays_earlier_data(cp, namespace, s3, s3_server):
    # One poll per pollSeconds (30, the least), kept across an operator restart; a run's data is its manifest.
    client, bucket = s3

    def lines(n: int, at: int) -> bytes:
        return b"".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                 {"role": "assistant", "content": f"answer {i}"}]}).encode() + b"\n"
                        for i in range(at, at + n))

    def manifest(run: str) -> dict:
        return json.loads(client.get_object(Bucket=bucket, Key=f"models/{run}/data.manifest.json")["Body"].read())

    doc = schedule_doc("fresh", trigger={"newData": {"uri": f"s3://{bucket}/in/", "minExamples": 5, "pollSeconds": 30}},
                       replayFraction=0.5)
    doc["spec"]["jobTemplate"].update(output={"uri": f"s3://{bucket}/models/"}, storage={"endpoint": s3_server})
    client.put_object(Bucket=bucket, Key="in/a.jsonl", Body=lines(6, 0))
    with operator(cp, namespace) as op:
        apply(cp, namespace, doc)
        run1 = wait_for(lambda: get(cp, namespace, "ftj", "fresh-r1"), what="run 1, for a.jsonl")
        uri1 = f"s3://{bucket}/models/fresh-r1/data.manifest.json"
        assert run1["spec"]["dataset"]["train"] == uri1 and run1["metadata"]["annotations"]["kubetune.dev/trigger"] == "newData"
        assert [(f["uri"], f["examples"]) for f in manifest("fresh-r1")["files"]] == [(f"s3://{bucket}/in/a.jsonl", 6)]
        wait_for(lambda: any(e["reason"] == "NewData" and e["message"] == "6 new examples in 1 objects; starting fresh-r1"
                             for e in items(cp, namespace, "events")), what="the NewData event")
        finish_run(cp, namespace, "fresh-r1", passed=True)
        wait_for(lambda: status(cp, namespace, "fresh").get("servedRevision") == 1, what="revision 1")
        assert "Traceback" not in operator_log(op)
    polled = status(cp, namespace, "fresh")["newData"]
    assert polled["watermark"] == uri1 and polled["pending"] == 0

    client.put_object(Bucket=bucket, Key="in/b.jsonl", Body=lines(2, 100))  # below minExamples: no run
    with operator(cp, namespace) as op:
        st = wait_for(lambda: (s := status(cp, namespace, "fresh")["newData"]).get("pending") == 2 and s, timeout=75,
                      what="b.jsonl counted at the next poll")
        assert st["lastPollAt"] > polled["lastPollAt"] and st["pendingObjects"] == 1
        assert get(cp, namespace, "ftj", "fresh-r2") is None
        client.put_object(Bucket=bucket, Key="in/c.jsonl", Body=lines(4, 200))  # 6 new examples now
        run2 = wait_for(lambda: get(cp, namespace, "ftj", "fresh-r2"), timeout=75, what="run 2, for b and c")
        assert run2["spec"]["model"] == {"fromJob": "fresh-r1"}
        data = manifest("fresh-r2")
        assert [f["uri"].rsplit("/", 1)[1] for f in data["files"]] == ["b.jsonl", "c.jsonl"]
        assert [f["uri"].rsplit("/", 1)[1] for f in data["replay"]["files"]] == ["a.jsonl"]
        assert data["replay"]["fraction"] == 0.5
        assert "Traceback" not in operator_log(op)
