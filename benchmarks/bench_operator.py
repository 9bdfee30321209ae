"""Operator at scale: N FineTuneJobs created at once against the real API server.

    .venv/bin/python benchmarks/bench_operator.py [--jobs 1000]

Starts the same control plane the tests use (etcd + kube-apiserver), runs `kubetune-operator` as its
own process, creates N jobs as fast as the API accepts them, and measures for each job the time
from its creation to the moment all its first-phase children exist (ServiceAccount, Role,
RoleBinding, ConfigMap, Preparing Job), with the operator's peak memory (RSS) sampled throughout.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from controlplane import ROOT, ControlPlane  # noqa: E402
from k8s_helpers import ftj_doc, operator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    args = parser.parse_args()
    from kubernetes import client, config

    cp = ControlPlane().start()
    try:
        cp.kubectl("apply", "-f", str(ROOT / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.dev")
        cp.kubectl("create", "namespace", "bench")
        config.load_kube_config(str(cp.kubeconfig))
        api = client.ApiClient()
        custom, batch = client.CustomObjectsApi(api), client.BatchV1Api(api)
        with operator(cp, "bench") as op:
            time.sleep(3)  # let it start watching
            peak = [0]
            stop = threading.Event()

            def sample():
                proc = psutil.Process(op.pid)
                while not stop.is_set():
                    peak[0] = max(peak[0], proc.memory_info().rss)
                    time.sleep(0.2)

            threading.Thread(target=sample, daemon=True).start()
            created: dict[str, float] = {}

            def create(i: int) -> None:
                name = f"job-{i:05d}"
                created[name] = time.time()
                custom.create_namespaced_custom_object("kubetune.dev", "v1alpha1", "bench", "finetunejobs", ftj_doc(name))

            start = time.time()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(create, range(args.jobs)))
            print(f"created {args.jobs} FineTuneJobs in {time.time() - start:.1f} s")
            ready: dict[str, float] = {}
            deadline = time.time() + 600
            while len(ready) < args.jobs and time.time() < deadline:
                for job in batch.list_namespaced_job("bench", label_selector="app.kubernetes.io/component=prepare").items:
                    owner = job.metadata.labels["kubetune.dev/job"]
                    ready.setdefault(owner, job.metadata.creation_timestamp.timestamp())
                time.sleep(1)
            stop.set()
        latencies = sorted(max(0.0, ready[n] - created[n]) for n in ready)
        pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
        print(f"children exist for {len(ready)}/{args.jobs} jobs; latency p50 {pct(0.5):.1f} s, "
              f"p99 {pct(0.99):.1f} s, max {latencies[-1]:.1f} s (Job creationTimestamp has 1 s resolution)")
        print(f"operator peak RSS {peak[0] / 2**20:.0f} MiB")
    finally:
        cp.stop()


if __name__ == "__main__":
    main()
