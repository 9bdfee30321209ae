"""The torchrun command lines that start the trainer: on this machine for ``kubetune run`` and
``kubetune train``; with the launcher options the operator gives a training pod for ``kubetune train-job``."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile


def default_nproc() -> int:
    """GPUs when there are any; else two CPU processes (the distributed path, like a cluster) if cores allow."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def torchrun_command(job_file: str, nproc: int) -> list[str]:
    """This machine alone: ``nproc`` processes; ``--standalone`` picks a free port, nothing to meet."""
    return launcher_command(job_file, [f"--nproc-per-node={nproc}", "--standalone"])


def launcher_command(job_file: str, options: list[str]) -> list[str]:
    """torchrun with these launcher options (processes, nodes, node rank, rendezvous) running the trainer."""
    return [sys.executable, "-m", "torch.distributed.run", *options, "-m", "kubetune.train", job_file]


def node_rank(options: list[str]) -> int:
    """The node rank among torchrun launcher options (0 when not given, as for torchrun)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--node-rank", "--node_rank", type=int, default=0)
    return parser.parse_known_args(options)[0].node_rank


def run_ranks(command: list[str], env: dict[str, str], pass_signals: bool = False) -> tuple[int, str]:
    """Run torchrun ``command``: its exit code and cause, or those the first failed rank wrote (torchrun exits 1
    whatever its ranks did; ``kubetune.train`` writes "CODE<TAB>error: ..." lines to KUBETUNE_ERROR_FILE)."""
    fd, errors = tempfile.mkstemp(prefix="kubetune-ranks-", suffix=".errors")
    os.close(fd)
    try:
        full_env = {**os.environ, **env, "KUBETUNE_ERROR_FILE": errors}
        code = run_passing_signals(command, full_env) if pass_signals else subprocess.run(command, env=full_env).returncode
        with open(errors) as f:
            first = f.readline().strip()
    finally:
        os.unlink(errors)
    if code and first:
        rank_code, _, cause = first.partition("\t")
        return int(rank_code), cause
    return code, ""


def run_passing_signals(command: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``command``, passing SIGTERM and SIGINT on to it; a signal after it has ended ends us.

    A pod's first process gets no default signal handling, so without this the kubelet's SIGTERM
    would be ignored until the grace period ran out; torchrun stops its ranks on it. Once signalled,
    a ``command`` that fails ends with the signal's code (143 for SIGTERM: stopped, not failed):
    torchrun exits 1 however its ranks ended, and a rank still starting dies of the signal.
    """
    proc, received = subprocess.Popen(command, env=env), []

    def on_signal(signum, _frame):
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)
        else:
            sys.exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    code = proc.wait()
    code = 128 - code if code < 0 else code  # killed by a signal: the shell's convention
    return 128 + received[0] if code and received else code


def cpu_threads_env(nproc: int) -> dict[str, str]:
    """Split the machine's cores between CPU ranks instead of letting each take them all."""
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
