"""Real DeepSpeed on CPU: 2 ranks under torchrun (gloo), a tiny from-config Llama, the bundled data."""

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import EXAMPLES, job_doc
from kubetune.data.prepare import prepare
from kubetune.spec import parse_job
from kubetune.train.launch import cpu_threads_env, torchrun_command

pytestmark = pytest.mark.slow


def make_job(tmp_path: Path, output: str, **training) -> tuple[dict, Path]:
    doc = job_doc(str(EXAMPLES / "data"), output,
                  preprocessing={"maxSeqLength": 256, "pii": {"allow": ["no-reply@nimbusnotes.example"]}},
                  training={"method": "full", "learningRate": 3e-3, "globalBatchSize": 8, "microBatchSize": 2,
                            "epochs": 2, "evalEvery": 10, "checkpointEvery": 10, "keepCheckpoints": 2, **training},
                  evaluation={"samples": 0})  # generation evaluation has its own tests
    path = tmp_path / f"job-{abs(hash(output))}.json"
    path.write_text(json.dumps(doc))
    return doc, path


def launch(job_file: Path, nproc: int = 2, **popen) -> subprocess.Popen:
    env = {**os.environ, **cpu_threads_env(nproc), "KUBETUNE_SCRATCH": str(job_file.parent / "scratch")}
    return subprocess.Popen(torchrun_command(str(job_file), nproc), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def train(job_file: Path, nproc: int = 2) -> str:
    proc = launch(job_file, nproc)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    return output


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every rank (torchrun starts its workers in sessions of their own)."""
    parent = psutil.Process(proc.pid)
    for p in parent.children(recursive=True) + [parent]:
        p.send_signal(signal.SIGKILL)
    proc.wait()


def read_metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def generates(model_dir: Path) -> str:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    enc = tok.apply_chat_template([{"role": "user", "content": "How do I export my notes?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    new = model.generate(**enc, max_new_tokens=8, do_sample=False)[0, enc["input_ids"].shape[1]:]
    assert len(new) > 0
    return tok.decode(new)


def test_full_zero2_loss_falls_and_artifacts_exist(tmp_path):
    out = tmp_path / "out"
    doc, job_file = make_job(tmp_path, str(out), zeroStage=2, epochs=3)
    prepare(parse_job(doc), log=lambda _: None)
    log = train(job_file)
    assert "2 process(es) on CPU" in log and "ZeRO-2" in log
    rows = read_metrics(out)
    valid = [float(r["valid_loss"]) for r in rows if r["valid_loss"]]
    assert valid[-1] < valid[0] - 1.0, valid  # the validation loss visibly falls
    assert float(rows[-1]["valid_mean_token_accuracy"]) > float(next(r for r in rows if r["valid_loss"])["valid_mean_token_accuracy"])
    assert (out / "loss_curve.png").stat().st_size > 10_000
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "tokenizer.json").exists()
    generates(out / "model")
    progress = json.loads((out / "progress.json").read_text())
    assert progress["phase"] == "done" and progress["step"] == progress["totalSteps"] == len(rows)


def test_lora_zero3_with_s3_data_checkpoints_and_model(tmp_path, s3, s3_server):
    client, bucket = s3
    for f in (EXAMPLES / "data").glob("*.jsonl"):
        client.upload_file(str(f), bucket, f"raw/{f.name}")
    out_uri = f"s3://{bucket}/jobs/lora/"
    doc, job_file = make_job(tmp_path, out_uri, method="lora", zeroStage=3, learningRate=5e-3, epochs=1)
    doc["spec"]["dataset"]["train"] = f"s3://{bucket}/raw/"
    doc["spec"]["storage"] = {"endpoint": s3_server}
    doc["spec"]["training"].pop("method")
    doc["spec"]["training"]["lora"] = {"r": 8, "alpha": 16}
    job_file.write_text(json.dumps(doc))
    prepare(parse_job(doc), log=lambda _: None)
    log = train(job_file)
    assert "ZeRO-3, lora" in log
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="jobs/lora/")["Contents"]}
    markers = sorted(k for k in keys if k.endswith("/COMPLETE"))
    assert markers and len(markers) <= 2  # keepCheckpoints: 2
    assert {"jobs/lora/model/model.safetensors", "jobs/lora/adapter/adapter_model.safetensors",
            "jobs/lora/metrics.csv", "jobs/lora/loss_curve.png"} <= keys
    local = tmp_path / "downloaded"
    for key in keys:
        if key.startswith("jobs/lora/model/"):
            (local / Path(key).name).parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(local / Path(key).name))
    generates(local)  # the merged LoRA model loads with plain from_pretrained
    adapter_config = json.loads(client.get_object(Bucket=bucket, Key="jobs/lora/adapter/adapter_config.json")["Body"].read())
    assert adapter_config["r"] == 8


def test_killed_run_resumes_from_last_complete_checkpoint_with_the_same_data_order(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    doc, ref_job = make_job(tmp_path, str(ref), zeroStage=2, epochs=3, checkpointEvery=6, evalEvery=6)
    prepare(parse_job(doc), log=lambda _: None)
    shutil.copytree(ref, killed)
    _, killed_job = make_job(tmp_path, str(killed), zeroStage=2, epochs=3, checkpointEvery=6, evalEvery=6)

    proc = launch(killed_job)
    deadline = time.monotonic() + 300
    while not list(killed.glob("checkpoints/*/COMPLETE")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.02)
    kill_tree(proc)  # the whole gang dies at once, between checkpoints
    complete = sorted(int(p.parent.name.split("-")[1]) for p in killed.glob("checkpoints/*/COMPLETE"))
    assert not (killed / "model").exists(), "the run finished before it was killed"
    # A newer checkpoint whose upload was cut short: files but no marker. It must be skipped.
    torn = killed / "checkpoints" / "step-00000999"
    torn.mkdir()
    (torn / "mp_rank_00_model_states.pt").write_bytes(b"truncated")

    resumed_log = train(killed_job)
    assert f"resuming from the complete checkpoint at step {complete[-1]}" in resumed_log
    ref_log = train(ref_job)
    assert "resuming" not in ref_log
    ref_rows, resumed_rows = read_metrics(ref), read_metrics(killed)
    assert [r["step"] for r in resumed_rows] == [r["step"] for r in ref_rows]  # same final step, no gaps or repeats
    assert [r["batch"] for r in resumed_rows] == [r["batch"] for r in ref_rows]  # same data order
    for a, b in zip(ref_rows, resumed_rows):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-3)

    # One process instead of two: the same global batches, hence (numerically) the same run.
    single = tmp_path / "single"
    shutil.copytree(ref / "prepared", single / "prepared")
    shutil.copytree(ref / "tokenizer", single / "tokenizer")
    _, single_job = make_job(tmp_path, str(single), zeroStage=2, epochs=3, checkpointEvery=6, evalEvery=6)
    assert "global batch 8 = 2 micro x 4 accumulation x 1" in train(single_job, nproc=1)
    single_rows = read_metrics(single)
    assert [r["batch"] for r in single_rows] == [r["batch"] for r in ref_rows]
    assert float(single_rows[-1]["valid_loss"]) == pytest.approx(float(ref_rows[-1]["valid_loss"]), rel=1e-2)
