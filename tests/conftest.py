"""Shared fixtures: a real S3 protocol server (moto's server mode) on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(extra_env: dict | None = None, host: str = "127.0.0.1") -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Endpoint URL of a moto S3 server; AWS credentials for it are set in the environment."""
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    os.environ.pop("AWS_ENDPOINT_URL", None)
    proc, url = start_moto()
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3(s3_server):
    """A boto3 client on the server and a fresh bucket name (created)."""
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


def job_doc(train: str, output: str, **spec) -> dict:
    """A minimal valid FineTuneJob document; keyword arguments replace spec sections."""
    base = {
        "model": {"fromConfig": {"size": "tiny", "vocabSize": 512}},
        "dataset": {"train": train},
        "output": {"uri": output},
        "preprocessing": {"maxSeqLength": 256},
    }
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "t"},
            "spec": {**base, **spec}}


@pytest.fixture(scope="session")
def control_plane(request):
    """A real etcd + kube-apiserver (+ garbage collector) on loopback, with the CRD installed. Its
    folder (logs, operator logs) is kept when a test failed."""
    from controlplane import ControlPlane

    cp = ControlPlane().start()
    try:
        cp.kubectl("apply", "-f", str(ROOT / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.dev", "--timeout=60s")
        deadline = time.monotonic() + 60  # Established comes before discovery and OpenAPI (explain) serve it
        while time.monotonic() < deadline and any(cp.kubectl(*args, check=False).returncode
                                                  for args in (("get", "ftj", "-A"), ("explain", "ftj.status"))):
            time.sleep(0.5)
        yield cp
    finally:
        cp.stop(keep=getattr(request.session, "e2e_failed", False))


@pytest.fixture
def namespace(control_plane):
    """A fresh namespace per test."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", name)
    return name


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember a failure, so the end-to-end test can leave the cluster's objects to look at."""
    report = (yield).get_result()
    if report.failed:
        item.session.e2e_failed = True
