"""SIGKILLed trainer runs, rerun to completion: the representative cases of
benchmarks/bench_trainer_kills.py (which kills at ten points). Real 2-rank DeepSpeed runs on CPU
under torchrun, the whole process tree killed at once."""

import csv
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import EXAMPLES, job_doc
from kubetune.data.prepare import prepare
from kubetune.spec import parse_job
from kubetune.train.launch import cpu_threads_env, torchrun_command

pytestmark = pytest.mark.slow


def make_job(tmp_path: Path, output: str, name: str, training: dict | None = None, **spec) -> Path:
    doc = job_doc(str(EXAMPLES / "data" / "support-faq.jsonl"), output,
                  preprocessing={"maxSeqLength": 128},
                  training={"method": "full", "learningRate": 3e-3, "globalBatchSize": 4, "microBatchSize": 2,
                            "maxSteps": 6, "evalEvery": 2, "checkpointEvery": 2, "keepCheckpoints": 2, **(training or {})},
                  evaluation={"samples": 0}, **spec)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def launch(job_file: Path, scratch: Path) -> subprocess.Popen:
    env = {**os.environ, **cpu_threads_env(2), "KUBETUNE_SCRATCH": str(scratch)}
    return subprocess.Popen(torchrun_command(str(job_file), 2), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(job_file: Path, scratch: Path) -> str:
    proc = launch(job_file, scratch)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail(f"rerun hung: {proc.communicate()[0][-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """Stop, then SIGKILL, torchrun and every rank at once (ranks run in sessions of their own)."""
    procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for p in procs:
        p.suspend()
    for p in procs:
        p.kill()
    proc.wait()


def kill_when(job_file: Path, scratch: Path, reached) -> None:
    proc = launch(job_file, scratch)
    deadline = time.monotonic() + 240
    while not reached():
        assert proc.poll() is None, f"the run ended before the kill point: {proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(0.005)
    kill_tree(proc)


def rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_kill_while_a_checkpoint_is_written_then_rerun_ends_like_an_uninterrupted_run(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    ref_job = make_job(tmp_path, str(ref), "ref")
    prepare(parse_job(json.loads(ref_job.read_text())), log=lambda _: None)
    shutil.copytree(ref, killed)
    killed_job = make_job(tmp_path, str(killed), "killed")

    ckpt = killed / "checkpoints" / "step-00000004"
    kill_when(killed_job, tmp_path / "scratch-killed", ckpt.exists)  # DeepSpeed has started writing it
    complete = sorted(p.parent.name for p in killed.glob("checkpoints/*/COMPLETE"))
    log = finish(killed_job, tmp_path / "scratch-killed")
    resumed = [line for line in log.splitlines() if "resuming from the complete checkpoint" in line]
    assert not resumed or f"step-{int(resumed[0].split()[-1]):08d}" in complete, (resumed, complete)
    finish(ref_job, tmp_path / "scratch-ref")
    a, b = rows((ref / "metrics.csv").read_text()), rows((killed / "metrics.csv").read_text())
    assert [r["step"] for r in b] == [r["step"] for r in a] == [str(s) for s in range(1, 7)]
    assert float(b[-1]["valid_loss"]) == pytest.approx(float(a[-1]["valid_loss"]), rel=1e-4)


def test_s3_run_killed_and_resumed_on_a_fresh_node_keeps_its_metrics(tmp_path, s3, s3_server):
    """In a cluster the rerun is a new pod: nothing of the killed run's scratch folder is left."""
    client, bucket = s3
    out = f"s3://{bucket}/jobs/k/"
    job = make_job(tmp_path, out, "s3", storage={"endpoint": s3_server})
    prepare(parse_job(json.loads(job.read_text())), log=lambda _: None)

    def first_checkpoint_complete() -> bool:
        listing = client.list_objects_v2(Bucket=bucket, Prefix="jobs/k/checkpoints/")
        return any(o["Key"].endswith("/COMPLETE") for o in listing.get("Contents", []))

    kill_when(job, tmp_path / "pod-1", first_checkpoint_complete)
    log = finish(job, tmp_path / "pod-2")  # a fresh scratch folder
    assert "resuming from the complete checkpoint" in log
    metrics = rows(client.get_object(Bucket=bucket, Key="jobs/k/metrics.csv")["Body"].read().decode())
    assert [r["step"] for r in metrics] == [str(s) for s in range(1, 7)]
