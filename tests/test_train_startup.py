"""Trainer start-up after a killed run. DeepSpeed JIT-builds its CPU communication op at start-up;
torch guards the build with a `lock` file and waits for it to go away. A run killed mid-build leaves
it, and every later run hung with no output. Real 2-rank runs under torchrun, real lock files."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import EXAMPLES, job_doc
from kubetune.data.prepare import prepare
from kubetune.spec import parse_job
from kubetune.train.launch import cpu_threads_env, run_ranks, torchrun_command

pytestmark = pytest.mark.slow


def tiny_job(tmp_path, prepared: bool = True):
    doc = job_doc(str(EXAMPLES / "data" / "support-faq.jsonl"), str(tmp_path / "out"),
                  preprocessing={"maxSeqLength": 128},
                  training={"method": "full", "maxSteps": 1, "globalBatchSize": 4, "microBatchSize": 2},
                  evaluation={"samples": 0})
    if prepared:
        prepare(parse_job(doc), log=lambda _: None)
    path = tmp_path / "job.json"
    path.write_text(json.dumps(doc))
    return path


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its ranks (they run in sessions of their own and hold its stdout)."""
    for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
        p.kill()
    proc.wait()


def run(cmd, tmp_path, timeout, **env):
    env = {**os.environ, **cpu_threads_env(2), "KUBETUNE_SCRATCH": str(tmp_path / "scratch"), **env}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, _ = proc.communicate()
        pytest.fail(f"no result after {timeout} s (hung); output:\n{out[-3000:]}")
    return proc.returncode, out


def own_extensions_dir(tmp_path) -> Path:
    """A TORCH_EXTENSIONS_DIR for the test alone. A cold build of the op takes about a minute on 2
    cores, so it starts from a copy of the one in kubetune's cache when a run has built it there
    (the distributed training tests do); ninja then has nothing to rebuild."""
    extensions = tmp_path / "torch_extensions"
    cache = Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune")
    built = cache / "torch_extensions" / "deepspeed_shm_comm"
    if list(built.glob("*.so")) and not (built / "lock").exists():
        shutil.copytree(built, extensions / built.name)
    return extensions


def test_rerun_after_a_build_killed_midway_does_not_hang(tmp_path):
    job = tiny_job(tmp_path)
    extensions = own_extensions_dir(tmp_path)
    stale = extensions / "deepspeed_shm_comm" / "lock"  # what a run SIGKILLed mid-build leaves behind
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.touch()
    code, out = run(torchrun_command(str(job), 2), tmp_path, timeout=240, TORCH_EXTENSIONS_DIR=str(extensions))
    assert code == 0, out[-3000:]
    assert f"removing {stale}, left by a build that was killed" in out
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()
    assert not stale.exists()


def test_waiting_for_a_live_build_is_reported_and_bounded(tmp_path):
    job = tiny_job(tmp_path, prepared=False)  # it never gets that far
    extensions = tmp_path / "torch_extensions"
    lock = extensions / "deepspeed_shm_comm.kubetune-lock"
    lock.parent.mkdir(parents=True)
    # A live builder that never finishes: it holds the flock on the build lock, with its pid inside.
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, time
with open({str(lock)!r}, "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write(f"pid {{os.getpid()}} on {{os.uname().nodename}}\\n")
    f.flush()
    print("held", flush=True)
    time.sleep(300)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        code, out = run(torchrun_command(str(job), 2), tmp_path, timeout=120, TORCH_EXTENSIONS_DIR=str(extensions),
                        KUBETUNE_BUILD_LOCK_TIMEOUT="15")
    finally:
        holder.kill()
    assert code != 0
    assert f"[train] waiting for pid {holder.pid} on" in out and f"(lock {lock})" in out, out[-3000:]
    assert f"error: gave up after 15 s waiting for pid {holder.pid}" in out, out[-3000:]
    assert "BuildLockTimeout" not in out  # a clear line from the ranks, not their traceback
    assert time.monotonic() - started < 100


def test_a_batch_bigger_than_the_data_fails_with_one_line_naming_the_numbers(tmp_path):
    path = tiny_job(tmp_path)
    doc = json.loads(path.read_text())
    doc["spec"]["training"]["globalBatchSize"] = 4096  # far more rows than support-faq packs into
    path.write_text(json.dumps(doc))
    # what `kubetune run` and a training pod end with: the rank's class (invalid input: 3) and one-line cause,
    # not torchrun's exit code 1 and report
    code, cause = run_ranks(torchrun_command(str(path), 2), {**cpu_threads_env(2), "KUBETUNE_SCRATCH": str(tmp_path)})
    assert code == 3
    assert cause.startswith("error: the data has ") and "fewer than training.globalBatchSize 4096" in cause
