"""The stall watchdog: the real operator and API server, with a real 2-rank trainer that hangs.

The trainer runs here as in a training pod: its progress goes into its FineTuneJob's status through the
API server, with a token of the job's own ServiceAccount mounted where pods have it (a private mount
namespace, so this machine's /run is left alone). Then every process of the run is frozen (SIGSTOP), as
when a collective never returns: no step, no progress. The operator counts the attempt as stalled once
``training.stallTimeout`` has passed since the last step, records the retry and starts the next gang.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from k8s_helpers import apply, finish_job, get, operator, wait_for
from kubetune.data.prepare import prepare
from kubetune.spec import parse_job
from kubetune.train.launch import cpu_threads_env
from test_trainer_kills import make_job

pytestmark = [pytest.mark.k8s, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root for a mount namespace")]

SA_DIR = "/run/secrets/kubernetes.io/serviceaccount"


def trainer_in_pod(cp, namespace: str, name: str, job_file, tmp_path) -> subprocess.Popen:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(cp.kubectl("create", "token", f"{name}-trainer", "-n", namespace).stdout.strip())
    (sa / "namespace").write_text(namespace)
    shutil.copy(cp.dir / "certs" / "apiserver.crt", sa / "ca.crt")  # the API server's self-signed certificate
    env = {**os.environ, **cpu_threads_env(2), "KUBETUNE_SCRATCH": str(tmp_path / "scratch"), "KUBETUNE_JOB_NAME": name,
           "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(cp.port), "KUBETUNE_ATTEMPT": "0"}
    command = (f"mount -t tmpfs tmpfs /run && mkdir -p {SA_DIR} && mount --bind {sa} {SA_DIR} && exec {sys.executable} "
               f"-m kubetune.cli train-job {job_file} --nproc-per-node=2 --standalone")
    return subprocess.Popen(["unshare", "--mount", "sh", "-c", command], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def signal_all(proc: subprocess.Popen, sig: int) -> None:
    """The run's every process: torchrun starts each rank in a session of its own."""
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def test_a_hung_trainer_is_a_failed_attempt_after_stall_timeout(control_plane, namespace, tmp_path):
    cp, name = control_plane, "hung"
    job_file = make_job(tmp_path, str(tmp_path / "out"), name,
                        training={"maxSteps": 400, "evalEvery": 200, "checkpointEvery": 200, "stallTimeout": "60s"})
    doc = json.loads(job_file.read_text())
    prepare(parse_job(doc), log=lambda _: None)
    doc["metadata"] = {"name": name}
    doc["spec"].update(maxRetries=1, resources={"nodes": 1, "gpusPerNode": 0, "cpu": "2"})
    with operator(cp, namespace):
        apply(cp, namespace, doc)
        wait_for(lambda: get(cp, namespace, "job", f"{name}-prepare"), what="the prepare Job")
        finish_job(cp, namespace, f"{name}-prepare")
        wait_for(lambda: get(cp, namespace, "job", f"{name}-train-0"), what="the first gang")
        trainer = trainer_in_pod(cp, namespace, name, job_file, tmp_path)
        try:
            progress = lambda: (get(cp, namespace, "ftj", name).get("status") or {}).get("progress") or {}  # noqa: E731
            wait_for(lambda: trainer.poll() is None and progress().get("phase") == "training" and progress()["step"] >= 3,
                     timeout=240, what="training steps in the job's status")
            signal_all(trainer, signal.SIGSTOP)  # every rank and torchrun: hung
            frozen = time.monotonic()
            last = progress()
            assert last["attempt"] == 0
            # The retry is recorded, then the next reconcile starts attempt 2 at once: the message that names the
            # stall is in the Event (and the operator's log), the status moves on.
            status = wait_for(lambda: (lambda s: s if s.get("retries") == 1 else None)(
                get(cp, namespace, "ftj", name)["status"]), timeout=150, what="the stall to be noticed")
            noticed = time.monotonic() - frozen
        finally:
            signal_all(trainer, signal.SIGKILL)
            trainer.wait()
        # not before stallTimeout after the last record (at most the 5 s report interval before the freeze)
        assert 54 <= noticed <= 100, noticed
        assert status["phase"] == "Training"
        stalled = ("get", "events", "-n", namespace, "--field-selector", "reason=Stalled", "-o", "json")
        events = wait_for(lambda: json.loads(cp.kubectl(*stalled).stdout)["items"], what="the Stalled Event")
        message = events[0]["message"]
        assert "no training step for" in message and "stallTimeout 60s" in message, message
        assert f"(last progress: step {last['step']} at {last['updatedAt']})" in message and "attempt 2 resumes" in message
        wait_for(lambda: get(cp, namespace, "job", f"{name}-train-1"), what="the next gang")
        wait_for(lambda: get(cp, namespace, "job", f"{name}-train-0") is None, what="the stalled gang to go")
