"""Failure classes end to end on this machine: what `kubetune` exits with (the code a pod's podFailurePolicy reads)
and the one line it ends with, for small data, a batch that cannot fit, storage refusing and an unexpected crash.
The operator's side (reasons, attempts, preemption) is tests/test_reconcile.py and the real cluster's
tests/e2e; the README's Reliability section has the whole matrix."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import job_doc
from kubetune.errors import EXIT_INVALID, EXIT_STORAGE, EXIT_TRANSIENT, EXIT_UNEXPECTED, cause

pytestmark = pytest.mark.slow


def thirty_conversations(path):
    """A new user's first file: 30 short conversations (OpenAI's minimum is 10); they pack into a few rows."""
    topics = ["reset my password", "export notes", "share a notebook", "change the theme", "delete a tag"]
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"How do I {topics[i % 5]}? (ticket {i})"},
        {"role": "assistant", "content": f"Open Settings, then {topics[i % 5].split()[0]}: step {i % 3 + 1}."}]}) + "\n"
        for i in range(30)))
    return path


def kubetune(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *args], capture_output=True, text=True, timeout=timeout)


def write_job(tmp_path, **training):
    doc = job_doc(str(thirty_conversations(tmp_path / "thirty.jsonl")), str(tmp_path / "out"),
                  training={"method": "full", **training}, evaluation={"samples": 0})
    path = tmp_path / "job.json"
    path.write_text(json.dumps(doc))
    return path


def test_thirty_conversations_train_with_the_batch_sizes_left_to_their_defaults(tmp_path):
    run = kubetune("run", str(write_job(tmp_path)), "--nproc", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    planned = next(line for line in run.stdout.splitlines() if line.startswith("batch: "))
    assert "(auto) on 2 process(es)" in planned, planned
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert progress["globalBatchSize"] <= report["tokens"]["train"]["rows"] and progress["step"] == progress["totalSteps"]
    assert (tmp_path / "out" / "model" / "config.json").exists()


def test_a_batch_that_cannot_fit_fails_once_in_preparation_naming_the_numbers(tmp_path):
    run = kubetune("prepare", str(write_job(tmp_path, globalBatchSize=64)), "--world", "2")
    assert run.returncode == EXIT_INVALID  # permanent: the Job's podFailurePolicy fails it without retrying
    rows = json.loads((tmp_path / "out" / "data_report.json").read_text())["tokens"]["train"]["rows"]
    assert run.stderr.strip().splitlines()[-1] == (f"error: the data has {rows} packed training rows, fewer than "
                                                   "training.globalBatchSize 64 (auto fits it to the data)")
    assert (tmp_path / "out" / "prepared" / "meta.json").exists()  # what preparation made is kept


def test_preparation_stops_at_once_on_sigterm_with_a_transient_code(tmp_path):
    """In a pod, prepare is PID 1, which ignores a SIGTERM it does not handle: an evicted or deleted prepare pod
    would run on until the kubelet's SIGKILL. It stops with 75 (transient: its Job tries again; an eviction is
    not counted, tests/e2e `prepfaults`)."""
    path = tmp_path / "many.jsonl"
    with path.open("w") as f:
        for i in range(60000):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"question number {i} about the plan"},
                                             {"role": "assistant", "content": f"answer number {i}: open Settings"}]}) + "\n")
    doc = job_doc(str(path), str(tmp_path / "out"), evaluation={"samples": 0})
    (tmp_path / "job.json").write_text(json.dumps(doc))
    proc = subprocess.Popen([sys.executable, "-u", "-m", "kubetune.cli", "prepare", str(tmp_path / "job.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("[prepare] read"):  # under way
            break
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == EXIT_TRANSIENT and time.monotonic() - started < 10, out[-2000:]
    assert out.strip().splitlines()[-1] == ("error: preparation stopped by SIGTERM (the pod was deleted or evicted); "
                                            "the next try starts over")


def test_a_bucket_that_does_not_exist_is_a_permanent_storage_error(tmp_path, s3_server):
    doc = job_doc("s3://no-such-bucket/data/", str(tmp_path / "o"), storage={"endpoint": s3_server})
    (tmp_path / "job.json").write_text(json.dumps(doc))
    run = kubetune("prepare", str(tmp_path / "job.json"))
    assert run.returncode == EXIT_STORAGE
    assert run.stderr.strip().splitlines()[-1].startswith("error: bucket no-such-bucket does not exist")


def test_an_unexpected_exception_ends_with_one_line_after_its_traceback(tmp_path):
    run = kubetune("serve", str(tmp_path / "no-model-here"), timeout=120)
    assert run.returncode == EXIT_UNEXPECTED  # retried: it may be a fault of the moment
    lines = run.stderr.strip().splitlines()
    assert "Traceback" in run.stderr and lines[-1].startswith("error: unexpected OSError: "), lines[-3:]


def test_the_one_line_of_an_unexpected_exception_masks_credentials():
    e = ValueError("cannot open s3://AKIA123:hunter2secret@minio:9000/b, token=abc.def.ghi\nmore lines")
    line = cause(e)
    assert line == "error: unexpected ValueError: cannot open s3://AKIA123:***@minio:9000/b, token=***"
    assert "hunter2" not in line and "abc.def" not in line
