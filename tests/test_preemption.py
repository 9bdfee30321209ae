"""SIGTERM and a diverging loss, on real 2-rank DeepSpeed runs on CPU.

SIGTERM goes to `kubetune train-job`, the training pod's command, as the kubelet sends it on a drain,
an eviction or ``suspend: true``: the step in progress finishes, a checkpoint is written, and the rerun
redoes no step.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune.data.prepare import prepare
from kubetune.errors import EXIT_STOPPED
from kubetune.spec import parse_job
from kubetune.train.launch import cpu_threads_env
from test_trainer_kills import finish, make_job, rows

pytestmark = pytest.mark.slow


def train_job(job_file: Path, scratch: Path) -> subprocess.Popen:
    env = {**os.environ, **cpu_threads_env(2), "KUBETUNE_SCRATCH": str(scratch)}
    return subprocess.Popen([sys.executable, "-m", "kubetune.cli", "train-job", str(job_file), "--nproc-per-node=2",
                             "--standalone"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_checkpoints_the_last_step_and_the_rerun_redoes_none(tmp_path):
    out = tmp_path / "out"
    job = make_job(tmp_path, str(out), "term", training={"maxSteps": 40, "evalEvery": 20, "checkpointEvery": 30})
    prepare(parse_job(json.loads(job.read_text())), log=lambda _: None)
    proc = train_job(job, tmp_path / "scratch")
    deadline = time.monotonic() + 240
    while not (out / "progress.json").exists() or json.loads((out / "progress.json").read_text())["step"] < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED == 143, log[-3000:]  # the Job's podFailurePolicy ignores it: not a failure
    stopped = [line for line in log.splitlines() if "stopped by SIGTERM after step" in line]
    assert stopped, log[-3000:]
    step = int(stopped[0].split("after step ")[1].split(",")[0])
    assert 2 <= step < 30  # between scheduled checkpoints: this one exists only because of the signal
    assert (out / "checkpoints" / f"step-{step:08d}" / "COMPLETE").exists()

    rerun = finish(job, tmp_path / "scratch")
    assert f"resuming from the complete checkpoint at step {step}" in rerun  # 0 steps redone
    assert [r["step"] for r in rows((out / "metrics.csv").read_text())] == [str(s) for s in range(1, 41)]



@pytest.mark.parametrize("moment", ["while it imports", "while its ranks start"])
def test_a_sigterm_while_a_training_pod_starts_stops_it_at_once_with_143(tmp_path, moment):
    """Kueue may preempt a Job seconds after admitting it. The pod's command runs as PID 1 of its own PID namespace
    (as in a container: a signal it has no handler for is dropped, not fatal); the SIGTERM comes from outside it,
    as the kubelet's does. It ends the pod at once, as stopped (143: the Job's podFailurePolicy ignores it), not
    after the grace period, and not as a failure (torchrun exits 1 when a rank still starting dies of it)."""
    import psutil

    job = make_job(tmp_path, str(tmp_path / "out"), "startterm", training={"maxSteps": 40})
    prepare(parse_job(json.loads(job.read_text())), log=lambda _: None)
    env = {**os.environ, **cpu_threads_env(2), "KUBETUNE_SCRATCH": str(tmp_path / "scratch")}
    command = Path(sys.executable).with_name("kubetune")  # the console script, as the pod runs it
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", str(command), "train-job", str(job),
                             "--nproc-per-node=2", "--standalone"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    # "While it imports": as soon as the process handles SIGTERM, i.e. once the interpreter runs kubetune's first
    # line (a signal before that, in the interpreter's own start, tens of milliseconds, is lost as for any PID 1).
    while not (pid1 := psutil.Process(proc.pid).children()) or not catches_sigterm(pid1[0].pid) or (
            moment == "while its ranks start" and not any("kubetune.train" in c.cmdline()
                                                           for c in pid1[0].children(recursive=True))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.02)
    if moment == "while it imports":  # handled from its start: before it loads torch (seconds), not after
        assert "libtorch" not in Path(f"/proc/{pid1[0].pid}/maps").read_text()
    signalled = time.monotonic()
    pid1[0].send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_STOPPED, log[-3000:]
    assert time.monotonic() - signalled < 60, log[-3000:]
    assert "step 40/40" not in log
    if moment == "while it imports":
        assert "kubetune.train" not in log and "torch" not in log, log[-3000:]  # stopped before torchrun began


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (its SigCgt mask in /proc)."""
    try:
        caught = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)

# The NaN is faked: a tiny fp32 model under AdamW's normalized steps stays finite even at learning
# rate 1e4 (tried), while real runs diverge in bf16/fp16 at scale. Each rank's loss turns NaN from its
# 6th training micro batch on (validation is left alone), through a sitecustomize module that wraps
# the fused loss before the trainer loads.
POISON = """
import torch
import kubetune.packed.loss as loss
real, calls = loss.token_loss, [0]
def token_loss(hidden, weight, target, chunk=None):
    calls[0] += torch.is_grad_enabled()
    loss_sum, correct, count = real(hidden, weight, target, chunk)
    return (loss_sum * float("nan") if calls[0] >= 6 else loss_sum), correct, count
loss.token_loss = token_loss
"""


def test_a_diverging_loss_stops_the_run_without_saving_it(tmp_path, monkeypatch):
    out = tmp_path / "out"
    job = make_job(tmp_path, str(out), "nan", training={"maxSteps": 12, "checkpointEvery": 1, "keepCheckpoints": 20})
    prepare(parse_job(json.loads(job.read_text())), log=lambda _: None)
    (tmp_path / "poison").mkdir()
    (tmp_path / "poison" / "sitecustomize.py").write_text(POISON)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "poison"))
    proc = train_job(job, tmp_path / "scratch")
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 6, log[-3000:]  # diverged: the pod's exit code fails its Job at once (kubetune.errors)
    line = next((x for x in log.splitlines() if "the training loss became nan at step 6" in x), None)
    assert line and "try a lower training.learningRate" in line, log[-3000:]
    saved = sorted(int(p.parent.name.split("-")[1]) for p in out.glob("checkpoints/*/COMPLETE"))
    assert saved == [1, 2, 3, 4, 5]  # the last good one kept, nothing saved from the NaN step on


# An unexpected failure after training (a bug, a broken disk) is faked: evaluation raises, in the pod's command
# process, once every rank has ended and the model is exported.
CRASH_EVALUATION = """
import kubetune.evaluate.run as run
def evaluate_after_training(job, log=print):
    raise RuntimeError("evaluation crashed (test)")
run.evaluate_after_training = evaluate_after_training
"""


def test_a_crash_after_training_ends_with_one_line_and_the_retry_trains_nothing_again(tmp_path, monkeypatch):
    out = tmp_path / "out"
    job = make_job(tmp_path, str(out), "crash", training={"maxSteps": 4, "checkpointEvery": 2})
    prepare(parse_job(json.loads(job.read_text())), log=lambda _: None)
    (tmp_path / "poison").mkdir()
    (tmp_path / "poison" / "sitecustomize.py").write_text(CRASH_EVALUATION)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "poison"))
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    proc = train_job(job, tmp_path / "scratch")
    log, _ = proc.communicate(timeout=300)
    line = "error: unexpected RuntimeError: evaluation crashed (test)"
    assert proc.returncode == 1 and log.strip().splitlines()[-1] == line, log[-3000:]  # exit 1: retried
    assert (tmp_path / "termination-log").read_text() == line + "\n"  # the job's status.message in a pod

    monkeypatch.delenv("PYTHONPATH")  # the retry, with the fault gone
    proc = train_job(job, tmp_path / "scratch")
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    assert "resuming from the complete checkpoint at step 4" in log, log[-3000:]
    assert [r["step"] for r in rows((out / "metrics.csv").read_text())] == ["1", "2", "3", "4"]  # no step trained twice
    assert (out / "model" / "lineage.json").exists()  # and the evaluation ran to its end
