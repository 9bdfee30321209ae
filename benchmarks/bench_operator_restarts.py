"""Operator restarts, measured: N FineTuneJobs driven to their end while the operator is SIGKILLed at
random moments and the API server + etcd are restarted.

    .venv/bin/python benchmarks/bench_operator_restarts.py [--jobs 50] [--kills 10] [--api-restarts 1] [--seed 1]

Starts the control plane the tests use (etcd + kube-apiserver + garbage collector), runs
`kubetune-operator` as its own process, and runs the scenario of tests/test_operator_restarts.py:
a mix of jobs that succeed, fail training until maxRetries, fail preparing, are suspended and
resumed, start from another job (model.fromJob), serve, or are deleted midway. The child Jobs'
status is written as the job controller would (no kubelet here). It prints how every job ended, the
child Jobs created more than once (or two training gangs of one job at once), and the children left
without a live FineTuneJob after garbage collection.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from controlplane import ROOT, ControlPlane  # noqa: E402
from test_operator_restarts import run_chaos, table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--api-restarts", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--window", type=float, default=None, help="seconds over which kills happen (default 4 per kill)")
    args = parser.parse_args()
    import urllib3

    urllib3.disable_warnings()  # the test API server's certificate is self-signed
    cp = ControlPlane().start()
    failed = True  # until the scenario has run clean: keep the logs of a crash or a wrong result
    try:
        cp.kubectl("apply", "-f", str(ROOT / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.dev")
        cp.kubectl("create", "namespace", "bench")
        result = run_chaos(cp, "bench", args.jobs, args.kills, args.api_restarts, seed=args.seed, window=args.window)
        print(table(result))
        for what, lines in (("wrong terminal state", result.wrong), ("duplicate", result.duplicates),
                            ("orphan", result.orphans)):
            for line in lines:
                print(f"  {what}: {line}")
        failed = bool(result.wrong or result.duplicates or result.orphans)
        if failed:
            sys.exit(1)
    finally:
        cp.stop(keep=failed)


if __name__ == "__main__":
    main()
