"""Progress for whoever watches: one small record, two sinks.

Rank 0 calls ``Reporter.update`` freely; records go out at most every ``interval`` seconds (and
always when forced). In a cluster (``KUBETUNE_JOB_NAME`` set and a service-account token mounted)
the record is merge-patched into ``status.progress`` of the job's own FineTuneJob; the job's
ServiceAccount may patch only that. Locally it prints a progress line and keeps ``progress.json``
in the output location. A failed report is logged once and never stops training.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import urllib.request
from pathlib import Path

from kubetune.spec import API_GROUP, API_VERSION, Storage
from kubetune.storage import join, store_for

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeStatusSink:
    """PATCH /apis/kubetune.dev/v1alpha1/namespaces/NS/finetunejobs/NAME/status with the record."""

    def __init__(self, name: str, namespace: str, server: str, token_file: Path, ca_file: Path | None):
        self.url = f"{server}/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/finetunejobs/{name}/status"
        self.token_file = token_file
        self.context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None

    @classmethod
    def from_environment(cls) -> KubeStatusSink | None:
        name = os.environ.get("KUBETUNE_JOB_NAME")
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        if not name or not host or not (SA_DIR / "token").exists():
            return None
        namespace = os.environ.get("KUBETUNE_JOB_NAMESPACE") or (SA_DIR / "namespace").read_text().strip()
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        return cls(name, namespace, f"https://{host}:{port}", SA_DIR / "token", SA_DIR / "ca.crt")

    def send(self, record: dict) -> None:
        self.patch_status({"progress": record})

    def patch_status(self, fragment: dict) -> None:
        body = json.dumps({"status": fragment}).encode()
        request = urllib.request.Request(self.url, data=body, method="PATCH", headers={
            "Content-Type": "application/merge-patch+json",
            "Authorization": f"Bearer {self.token_file.read_text().strip()}",  # re-read: tokens rotate
        })
        with urllib.request.urlopen(request, timeout=10, context=self.context):
            pass


class LocalSink:
    """A progress line on stderr and ``progress.json`` in the output location."""

    def __init__(self, output: str, storage: Storage):
        self.uri = join(output, "progress.json")
        self.store = store_for(output, storage)

    def send(self, record: dict) -> None:
        width = 24
        done = int(width * record.get("percent", 0) / 100)
        metrics = record.get("metrics", {})
        parts = [f"[{'#' * done}{'.' * (width - done)}] {record.get('percent', 0):5.1f}%",
                 f"step {record.get('step')}/{record.get('totalSteps')}", f"epoch {record.get('epoch')}"]
        for key in ("train_loss", "valid_loss", "valid_mean_token_accuracy"):
            if metrics.get(key) is not None:
                parts.append(f"{key} {metrics[key]:.4f}")
        if record.get("tokensPerSecond"):
            parts.append(f"{record['tokensPerSecond']:.0f} tok/s")
        if record.get("etaSeconds") is not None:
            parts.append(f"ETA {_duration(record['etaSeconds'])}")
        print(f"[{record.get('phase', 'train')}] " + "  ".join(parts), file=sys.stderr, flush=True)
        self.store.write_bytes(self.uri, json.dumps(record, indent=2).encode())


class Reporter:
    def __init__(self, sinks: list, interval: float = 5.0):
        self.sinks, self.interval = sinks, interval
        self.last = 0.0
        self.failed: set[str] = set()

    def update(self, record: dict, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        record = {**record, "updatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for sink in self.sinks:
            try:
                sink.send(record)
            except Exception as e:  # reporting must never stop training
                name = type(sink).__name__
                if name not in self.failed:
                    self.failed.add(name)
                    print(f"warning: progress report to {name} failed ({type(e).__name__}); training goes on",
                          file=sys.stderr)


def reporter_for(output: str, storage: Storage, interval: float = 5.0) -> Reporter:
    sinks: list = [LocalSink(output, storage)]
    kube = KubeStatusSink.from_environment()
    if kube is not None:
        sinks.append(kube)
    return Reporter(sinks, interval)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
