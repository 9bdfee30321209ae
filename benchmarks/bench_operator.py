"""Operator at scale: N FineTuneJobs created at once against the real API server.

    .venv/bin/python benchmarks/bench_operator.py [--jobs 1000] [--workers 16]

Starts the same control plane the tests use (etcd + kube-apiserver), runs `kubetune-operator` as its
own process, creates N jobs from ``--workers`` threads as fast as the API accepts them, and measures
for each job the time until all its first-phase children exist (ServiceAccount, Role, RoleBinding,
ConfigMap, Preparing Job), with the operator's peak memory (RSS) sampled throughout.

Two numbers are kept apart:
- the client's creation: the wall time and rate of the N create calls (the API server and etcd share
  the machine with the operator, so a slow client is a busy API server, not a slow operator);
- the operator's reaction, per job: from the moment that job's create call returned (the FineTuneJob
  is then stored, and its watch event on its way to the operator) to the moment this benchmark's own
  watch on Jobs delivered its Preparing Job. Both are this process's clock (sub-millisecond), not
  creationTimestamp, which has a 1 s resolution. The operator creates the Job after the other four
  children; at the end every job's five children are counted, to check that.

The API server's request counters (its /metrics) are diffed over the run: requests per job, by verb
and resource, the operator's and this benchmark's together.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from controlplane import ROOT, ControlPlane  # noqa: E402
from k8s_helpers import ftj_doc, operator  # noqa: E402

NS = "bench"
PREPARE = "app.kubernetes.io/component=prepare"


def request_counts(api) -> Counter:
    """apiserver_request_total by (verb, resource[/subresource]) from the API server's /metrics."""
    r = api.call_api("/metrics", "GET", auth_settings=["BearerToken"], _preload_content=False,
                     _return_http_data_only=True)
    counts: Counter = Counter()
    for line in r.data.decode().splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
        counts[(labels.get("verb", ""), resource)] += float(line.rsplit(" ", 1)[1])
    return counts


class JobWatch:
    """When this process first saw each Preparing Job (by the FineTuneJob it belongs to): a watch on
    Jobs, read as raw JSON lines (no model objects: the benchmark must stay light on a shared CPU)."""

    def __init__(self, batch):
        self.batch = batch
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> JobWatch:
        self.thread.start()
        return self

    def _note(self, obj: dict) -> None:
        owner = (obj.get("metadata", {}).get("labels") or {}).get("kubetune.dev/job")
        if owner:
            self.seen.setdefault(owner, time.time())

    def _run(self) -> None:
        while not self.stop.is_set():
            try:  # (re)list, then watch from there; a relist after an error counts Jobs late, never early
                listed = json.loads(self.batch.list_namespaced_job(NS, label_selector=PREPARE,
                                                                   _preload_content=False).data)
                for obj in listed["items"]:
                    self._note(obj)
                version = listed["metadata"]["resourceVersion"]
                resp = self.batch.list_namespaced_job(NS, label_selector=PREPARE, watch=True, resource_version=version,
                                                      timeout_seconds=240, _preload_content=False)
                for line in _lines(resp):
                    event = json.loads(line)
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self._note(event["object"])
                    if self.stop.is_set():
                        break
                resp.release_conn()
            except Exception as e:  # noqa: BLE001  (expired version, a dropped connection: relist)
                if self.stop.is_set():
                    return
                print(f"job watch: {type(e).__name__}: {e}; relisting", file=sys.stderr)
                time.sleep(0.5)


def _lines(resp):
    buffer = b""
    for chunk in resp.stream(65536, decode_content=True):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        yield from (line for line in lines if line.strip())


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=16, help="client threads creating the jobs")
    parser.add_argument("--timeout", type=float, default=900, help="give up waiting for children after this (s)")
    args = parser.parse_args()
    import urllib3
    from kubernetes import client, config

    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # the test control plane's own cert
    cp = ControlPlane().start()
    try:
        cp.kubectl("apply", "-f", str(ROOT / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.dev")
        cp.kubectl("create", "namespace", NS)
        configuration = client.Configuration()
        config.load_kube_config(str(cp.kubeconfig), client_configuration=configuration)
        # one pooled connection per thread (the default pool, 5 x CPUs, is smaller than --workers on
        # 2 cores: the extra threads would open and close a TLS connection per request)
        configuration.connection_pool_maxsize = args.workers + 4
        api = client.ApiClient(configuration)
        custom, batch = client.CustomObjectsApi(api), client.BatchV1Api(api)
        with operator(cp, NS) as op:
            time.sleep(3)  # let it start watching
            proc = psutil.Process(op.pid)
            peak = [0]
            stop = threading.Event()

            def sample():
                while not stop.is_set():
                    try:
                        peak[0] = max(peak[0], proc.memory_info().rss)
                    except psutil.Error:  # the operator exited (its exit is reported where it is waited for)
                        return
                    time.sleep(0.2)

            threading.Thread(target=sample, daemon=True).start()
            watch = JobWatch(batch).start()
            time.sleep(1)
            components = {"operator": proc, **{p.name: psutil.Process(p.pid) for p in cp.procs},
                          "benchmark": psutil.Process()}
            before, cpu_before = request_counts(api), {k: _cpu(p) for k, p in components.items()}
            sent: dict[str, float] = {}
            returned: dict[str, float] = {}

            def create(i: int) -> None:
                name = f"job-{i:05d}"
                sent[name] = time.time()
                custom.create_namespaced_custom_object("kubetune.dev", "v1alpha1", NS, "finetunejobs", ftj_doc(name))
                returned[name] = time.time()

            start = time.time()
            with ThreadPoolExecutor(args.workers) as pool:
                list(pool.map(create, range(args.jobs)))
            create_s = time.time() - start
            print(f"created {args.jobs} FineTuneJobs in {create_s:.1f} s ({args.jobs / create_s:.0f}/s, "
                  f"{args.workers} client threads)", flush=True)
            deadline = time.time() + args.timeout
            while len(watch.seen) < args.jobs and time.time() < deadline:
                time.sleep(0.5)
            done_s = time.time() - start
            watch.stop.set()
            stop.set()
            cpu = {k: _cpu(p) - cpu_before[k] for k, p in components.items()}
            operator_cpu = cpu["operator"]
            after = request_counts(api)
        # every first-phase child of every job, counted at the end
        missing = Counter()
        kinds = {"ServiceAccount": lambda **kw: client.CoreV1Api(api).list_namespaced_service_account(NS, **kw),
                 "Role": lambda **kw: client.RbacAuthorizationV1Api(api).list_namespaced_role(NS, **kw),
                 "RoleBinding": lambda **kw: client.RbacAuthorizationV1Api(api).list_namespaced_role_binding(NS, **kw),
                 "ConfigMap": lambda **kw: client.CoreV1Api(api).list_namespaced_config_map(NS, **kw),
                 "Job": lambda **kw: batch.list_namespaced_job(NS, **kw)}
        for kind, list_ in kinds.items():
            items = json.loads(list_(label_selector="kubetune.dev/job", _preload_content=False).data)["items"]
            owners = {i["metadata"]["labels"]["kubetune.dev/job"] for i in items}
            missing[kind] = sum(1 for n in watch.seen if n not in owners)

        ready = watch.seen
        from_return = sorted(max(0.0, ready[n] - returned[n]) for n in ready)
        from_send = sorted(max(0.0, ready[n] - sent[n]) for n in ready)
        print(f"children exist for {len(ready)}/{args.jobs} jobs "
              f"(of those, missing at the end: {dict(missing) if any(missing.values()) else 'none'}); "
              f"all within {done_s:.1f} s of the first create")
        print("latency per job, from its create call returning (or being sent) to its Preparing Job reaching "
              "this process's watch; wall clock of this process, not the 1 s creationTimestamp:")
        for label, values in (("from create returned", from_return), ("from create sent", from_send)):
            if values:
                print(f"  {label:22s} p50 {pct(values, .5):6.1f} s  p90 {pct(values, .9):6.1f} s  "
                      f"p99 {pct(values, .99):6.1f} s  max {values[-1]:6.1f} s")
        print(f"operator peak RSS {peak[0] / 2**20:.0f} MiB; operator CPU {operator_cpu:.0f} s "
              f"({100 * operator_cpu / done_s:.0f}% of one core over the run)")
        print("CPU seconds over the run (the machine is shared: these, not wall time, are what each part cost): "
              + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()) + f"; machine load average {os.getloadavg()[0]:.1f}")
        diff = Counter({k: after[k] - before[k] for k in after if after[k] - before[k] > 0})
        total = sum(diff.values())
        print(f"API requests during the run: {total:.0f} ({total / args.jobs:.1f} per job, {total / done_s:.0f}/s); "
              "per job by verb and resource (operator and benchmark):")
        for (verb, resource), n in sorted(diff.items(), key=lambda kv: -kv[1]):
            if n / args.jobs >= 0.05:
                print(f"  {verb:7s} {resource:28s} {n / args.jobs:5.2f}")
        if from_return:
            print("\n| jobs | client create (s) | create rate (/s) | p50 (s) | p90 (s) | p99 (s) | max (s) "
                  "| peak RSS (MiB) | operator CPU (s) |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            print(f"| {args.jobs} | {create_s:.1f} | {args.jobs / create_s:.0f} | {pct(from_return, .5):.1f} "
                  f"| {pct(from_return, .9):.1f} | {pct(from_return, .99):.1f} | {from_return[-1]:.1f} "
                  f"| {peak[0] / 2**20:.0f} | {operator_cpu:.0f} |")
    finally:
        cp.stop()


if __name__ == "__main__":
    main()
