"""The torchrun command line that starts the trainer: used by ``kubetune run`` and the operator's pods."""

from __future__ import annotations

import os
import sys


def default_nproc() -> int:
    """GPUs when there are any; else two CPU processes (the distributed path, like a cluster) if cores allow."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def torchrun_command(job_file: str, nproc: int, nnodes: int = 1, node_rank: int = 0,
                     master_addr: str = "127.0.0.1", master_port: int = 29500) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes == 1:
        cmd.append("--standalone")  # picks a free port; nothing to rendezvous with
    else:
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={master_addr}",
                f"--master-port={master_port}"]
    return cmd + ["-m", "kubetune.train", job_file]


def cpu_threads_env(nproc: int) -> dict[str, str]:
    """Split the machine's cores between CPU ranks instead of letting each take them all."""
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
