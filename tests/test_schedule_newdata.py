"""trigger.newData of a FineTuneSchedule: the decision (pure ``plan`` rows), the poll of a prefix on a real S3
protocol server (moto), and a run's data manifest read by the Preparing phase (new objects + a replay)."""

from __future__ import annotations

import json
from datetime import timedelta

import orjson
import pytest

from conftest import job_doc
from kubetune import newdata
from kubetune.data.prepare import prepare
from kubetune.operator.schedule_newdata import seconds_to_poll
from kubetune.spec import Storage, parse_job
from kubetune.operator.schedule_reconcile import plan
from kubetune.operator.settings import Settings
from test_schedule_reconcile import NOW, PASSED, reasons, run, schedule, started

URI = "s3://data/incoming/"
MANIFEST_R1 = "s3://models/bot/bot-r1/data.manifest.json"
MANIFEST_R2 = "s3://models/bot/bot-r2/data.manifest.json"


def go(body, runs=(), data=None):
    return plan(body, list(runs), NOW, Settings(), data)


def new_data(status=None, min_examples=10, **spec) -> dict:
    return schedule(status, schedule=None, trigger={"newData": {"uri": URI, "minExamples": min_examples}}, **spec)


def seen(*pending, earlier=(), error=None, at=NOW) -> newdata.Observation:
    """A poll's result: (key, etag, examples) of the new objects."""
    def entry(key: str, etag: str, examples: int) -> dict:
        return {"uri": URI + key, "etag": etag, "examples": examples}

    return newdata.Observation(at, None, [entry(*p) for p in pending], [entry(*p) for p in earlier], error)


# The decision

def test_below_min_examples_no_run_and_status_says_how_many():
    p = go(new_data(), data=seen(("a.jsonl", "e1", 4), ("b.jsonl", "e1", 5)))
    assert not started(p) and not p.manifests
    assert p.status["newData"] == {"lastPollAt": "2026-03-02T03:00:30Z", "pending": 9, "pendingObjects": 2}
    assert "9 new examples (a run starts at 10)" in p.status["message"]
    assert p.wake_in == 300  # the next poll


def test_enough_new_examples_start_a_run_on_exactly_them_plus_a_replay():
    body = new_data({"newData": {"watermark": MANIFEST_R1, "consumedRun": "bot-r1", "lastPollAt": "2026-03-02T02:00:00Z"}},
                    replayFraction=0.25)
    data = seen(("c.jsonl", "e7", 12), earlier=[("a.jsonl", "e1", 40)])
    p = go(body, [run(1, "Succeeded", PASSED, result="Promoted", trigger="newData")], data=data)
    (new,) = started(p)
    assert new["metadata"]["name"] == "bot-r2" and new["spec"]["dataset"]["train"] == MANIFEST_R2
    assert new["metadata"]["annotations"] == {"kubetune.dev/trigger": "newData", "kubetune.dev/data-manifest": MANIFEST_R2}
    ((uri, manifest),) = p.manifests
    assert uri == MANIFEST_R2 and manifest["files"] == data.pending
    assert manifest["replay"]["files"] == data.earlier and manifest["replay"]["fraction"] == 0.25
    assert manifest["replay"]["seed"] == newdata.replay_seed("team", "bot-r2")  # the same on a retry
    assert ("Normal", "NewData", "12 new examples in 1 objects; starting bot-r2") in p.events
    assert p.status["lastRun"]["trigger"] == "newData"
    assert p.status["newData"] == {"lastPollAt": "2026-03-02T03:00:30Z", "pending": 0, "pendingObjects": 0,
                                   "watermark": MANIFEST_R2, "consumedRun": "bot-r2"}


def test_no_second_run_for_the_same_data_after_a_crash_before_the_status():
    # r2 was created for the data (it names its manifest), the status was not written: it still says 12 pending
    body = new_data({"newData": {"watermark": MANIFEST_R1, "consumedRun": "bot-r1", "pending": 12, "pendingObjects": 1,
                                 "lastPollAt": "2026-03-02T03:00:00Z"}})
    r2 = run(2, "Pending", trigger="newData")
    r2["metadata"]["annotations"]["kubetune.dev/data-manifest"] = MANIFEST_R2
    p = go(body, [r2])
    assert not started(p) and not p.needs_data
    assert p.status["newData"] == {"lastPollAt": "2026-03-02T03:00:00Z", "watermark": MANIFEST_R2, "consumedRun": "bot-r2"}
    # and its run finished, deleted by historyLimit: the status keeps the watermark
    p = go({**body, "status": p.status}, [])
    assert not started(p) and p.status["newData"]["watermark"] == MANIFEST_R2


def test_a_ready_status_without_a_poll_in_hand_asks_for_one():
    p = go(new_data({"newData": {"pending": 12, "pendingObjects": 1, "lastPollAt": "2026-03-02T03:00:00Z"}}))
    assert p.needs_data and not started(p) and not p.manifests


def test_a_failed_poll_is_reported_once_and_starts_nothing():
    error = "bucket data does not exist (at http://minio:9000; s3://data/incoming/)"
    p = go(new_data(request="2026-03-02T03:00:20Z"), data=seen(error=error))
    assert not started(p) and "lastRetrainRequest" not in p.status  # the request waits for a good poll
    assert p.status["newData"]["error"] == error and f"new data not read: {error}" in p.status["message"]
    assert [(k, r) for k, r, _ in p.events] == [("Warning", "NewDataPollFailed")]
    p = go({**new_data(), "status": p.status}, data=seen(error=error))
    assert "NewDataPollFailed" not in reasons(p)  # not again while it stays the same


def test_new_data_waits_for_an_active_run_under_forbid():
    p = go(new_data(), [run(1, "Training", trigger="newData")], data=seen(("c.jsonl", "e1", 50)))
    assert not started(p) and "new data waits for bot-r1 (concurrencyPolicy: Forbid)" in p.status["message"]


def test_a_request_with_nothing_new_retrains_on_everything_seen():
    p = go(new_data(request="2026-03-02T03:00:20Z"), data=seen(earlier=[("a.jsonl", "e1", 40)]))
    (new,) = started(p)
    assert new["metadata"]["annotations"]["kubetune.dev/trigger"] == "manual"
    ((_, manifest),) = p.manifests
    assert manifest["files"] == [] and manifest["replay"]["fraction"] == 1.0


def test_a_new_data_run_promoted_says_so():
    p = go(new_data(), [run(1, "Succeeded", PASSED, trigger="newData")])
    assert p.status["revisions"][0]["promotedBy"] == "newData"


@pytest.mark.parametrize("last, due_in", [(None, 0), (NOW - timedelta(seconds=100), 200), (NOW - timedelta(hours=1), -3300)])
def test_the_poll_interval_holds_across_restarts(last, due_in):
    status = {"newData": {"lastPollAt": last.strftime("%Y-%m-%dT%H:%M:%SZ")}} if last else {}
    assert seconds_to_poll(new_data(status), NOW) == pytest.approx(due_in)
    assert seconds_to_poll(schedule(), NOW) is None  # no trigger.newData: never polled


def test_invalid_trigger_fields_are_named():
    p = go(schedule(trigger={"newData": {"uri": "/data/in/", "pollSeconds": 5}}, replayFraction=2))
    assert p.status["reason"] == "InvalidSpec"
    for field in ("spec.trigger.newData.uri", "spec.trigger.newData.pollSeconds", "spec.replayFraction"):
        assert field in p.status["message"]


# The poll, on a real S3 protocol server

def _lines(n: int, start: int = 0) -> bytes:
    return b"".join(orjson.dumps({"messages": [
        {"role": "user", "content": f"How do I reset device {i}, model {i * 7}?"},
        {"role": "assistant", "content": f"Hold button {i % 5} for {i} seconds, then pick profile {i * 3}."}]}) + b"\n"
        for i in range(start, start + n))


def test_poll_finds_new_and_rewritten_objects_and_counts_each_once(s3, s3_server):
    client, bucket = s3
    prefix, output, storage = f"s3://{bucket}/in/", f"s3://{bucket}/models/", Storage(endpoint=s3_server)
    client.put_object(Bucket=bucket, Key="in/a.jsonl", Body=_lines(3))
    client.put_object(Bucket=bucket, Key="in/notes.txt", Body=b"not data")
    first = newdata.poll(prefix, output, "bot", storage, None, NOW)
    assert first.error is None and [(e["uri"], e["examples"]) for e in first.pending] == [(prefix + "a.jsonl", 3)]

    # a run consumes it; then b arrives and a is rewritten
    mark = newdata.manifest_uri(output, "bot-r1")
    client.put_object(Bucket=bucket, Key="models/bot-r1/data.manifest.json",
                      Body=json.dumps(newdata.run_manifest(first.pending, [], 0.1, 1)).encode())
    assert newdata.poll(prefix, output, "bot", storage, mark, NOW).pending == []
    client.put_object(Bucket=bucket, Key="in/b.jsonl", Body=_lines(5))
    second = newdata.poll(prefix, output, "bot", storage, mark, NOW)
    assert [(e["uri"], e["examples"]) for e in second.pending] == [(prefix + "b.jsonl", 5)]
    assert [e["uri"] for e in second.earlier] == [prefix + "a.jsonl"]
    client.put_object(Bucket=bucket, Key="in/a.jsonl", Body=_lines(4))
    third = newdata.poll(prefix, output, "bot", storage, mark, NOW)
    assert sorted((e["uri"], e["examples"]) for e in third.pending) == [(prefix + "a.jsonl", 4), (prefix + "b.jsonl", 5)]
    assert third.earlier == []  # its old version is gone: not replayed

    # counted once: the cached count is what a later poll uses (the object is not read again)
    cache = json.loads(client.get_object(Bucket=bucket, Key="models/bot-newdata.json")["Body"].read())
    for e in cache["objects"]:
        e["examples"] = 100
    client.put_object(Bucket=bucket, Key="models/bot-newdata.json", Body=json.dumps(cache).encode())
    assert newdata.poll(prefix, output, "bot", storage, mark, NOW).examples == 200


def test_a_storage_error_is_one_line_not_an_exception(s3_server):
    got = newdata.poll("s3://no-such-bucket-here/in/", "s3://no-such-bucket-here/m/", "bot", Storage(endpoint=s3_server),
                       None, NOW)
    assert got.pending == [] and "bucket no-such-bucket-here does not exist" in got.error and "\n" not in got.error


# A run's data: the manifest, read by the Preparing phase

def test_replay_picks_are_exact_and_the_same_for_the_same_run():
    new = [{"uri": "n", "etag": "", "examples": 5}]
    manifest = newdata.run_manifest(new, [{"uri": f"f{i}", "etag": "", "examples": 100} for i in range(3)], 0.1, 7)
    picks = newdata.replay_picks(manifest)
    assert sum(len(p) for p in picks.values()) == 30 and all(max(p, default=0) < 100 for p in picks.values())
    assert picks == newdata.replay_picks(manifest)
    assert picks != newdata.replay_picks({**manifest, "replay": {**manifest["replay"], "seed": 8}})


def test_prepare_reads_the_new_objects_and_the_replayed_share(s3, s3_server):
    client, bucket = s3
    prefix, output, storage = f"s3://{bucket}/in/", f"s3://{bucket}/models/", Storage(endpoint=s3_server)
    client.put_object(Bucket=bucket, Key="in/old.jsonl", Body=_lines(200))
    r1 = newdata.poll(prefix, output, "bot", storage, None, NOW)
    client.put_object(Bucket=bucket, Key="models/bot-r1/data.manifest.json",
                      Body=json.dumps(newdata.run_manifest(r1.pending, [], 0.1, 1)).encode())
    client.put_object(Bucket=bucket, Key="in/new.jsonl", Body=_lines(30, start=1000))
    r2 = newdata.poll(prefix, output, "bot", storage, newdata.manifest_uri(output, "bot-r1"), NOW)
    manifest = newdata.run_manifest(r2.pending, r2.earlier, 0.1, newdata.replay_seed("team", "bot-r2"))
    uri = newdata.manifest_uri(output, "bot-r2")
    client.put_object(Bucket=bucket, Key="models/bot-r2/data.manifest.json", Body=json.dumps(manifest).encode())

    # run 1 trained on old.jsonl and put it into the schedule's dedup index: its replayed share is kept all the same
    index = {"dedup": {"index": f"s3://{bucket}/models/bot/dedup-index/"}}
    prepare(parse_job(job_doc(f"s3://{bucket}/in/old.jsonl", f"s3://{bucket}/models/bot-r1/", preprocessing=index,
                              storage={"endpoint": s3_server})), log=lambda _: None)
    job = parse_job(job_doc(uri, f"s3://{bucket}/models/bot-r2/", preprocessing=index, storage={"endpoint": s3_server}))
    report = prepare(job, log=lambda _: None)
    assert report["examples_in"] == 30 + 20 and report["replayed"] == 20
    assert sum(report["examples_out"].values()) == 50 and report["duplicates"]["index"] == 0, report["duplicates"]
    assert report["manifest"] == {"uri": uri, "new_files": 1, "replay_files": 1, "replay_fraction": 0.1}
    assert [(i["uri"].rsplit("/", 1)[1], i.get("replay")) for i in report["inputs"]] == [("new.jsonl", None), ("old.jsonl", 20)]
    again = prepare(job, log=lambda _: None)  # a retried run prepares the same data
    assert again["examples_out"] == report["examples_out"]


def test_a_file_that_is_not_a_manifest_is_named(s3, s3_server, tmp_path):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="m/x.manifest.json", Body=b'{"files": 3}')
    job = parse_job(job_doc(f"s3://{bucket}/m/x.manifest.json", f"s3://{bucket}/out/", storage={"endpoint": s3_server}))
    with pytest.raises(Exception, match=r"dataset.train s3://.*/m/x.manifest.json: not a kubetune data manifest"):
        prepare(job, log=lambda _: None)
