"""What the end-to-end tests share: kubectl and helm against the cluster in $KUBETUNE_E2E_KUBECONFIG, the S3
server pods reach on $KUBETUNE_E2E_HOST_IP, and one namespace and one `helm install` for the whole session
(the fixtures are session-scoped: every test module imports them, and they are made once)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import pytest
import yaml

from conftest import ROOT, start_moto

KUBECONFIG = os.environ.get("KUBETUNE_E2E_KUBECONFIG")


HOST_IP = os.environ.get("KUBETUNE_E2E_HOST_IP", "127.0.0.1")


BIN = os.environ.get("KUBETUNE_E2E_BIN", "")  # folder with kubectl and helm


RELEASE_NS = "kubetune-system"


# Planted credentials: the S3 server accepts any; no log, event or status may show the secret.
ACCESS_KEY, SECRET_KEY = "AKIAE2E" + uuid.uuid4().hex[:13].upper(), "e2e-secret-" + uuid.uuid4().hex


def env() -> dict:
    return {**os.environ, "KUBECONFIG": KUBECONFIG, "PATH": f"{BIN}:{os.environ['PATH']}" if BIN else os.environ["PATH"]}


def sh(*args: str, check: bool = True, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    run = subprocess.run(args, env=env(), capture_output=True, text=True, input=input, timeout=timeout)
    if check and run.returncode:
        raise AssertionError(f"{' '.join(args)} failed ({run.returncode}): {run.stderr[-3000:]}")
    return run


def kubectl(*args: str, **kw) -> subprocess.CompletedProcess:
    return sh("kubectl", *args, **kw)


def get_json(*args: str) -> dict:
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


def wait_for(check, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def log(message: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@pytest.fixture(scope="session")
def s3():
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION="us-east-1")
    proc, url = start_moto(host=HOST_IP)
    yield url
    proc.terminate()
    proc.wait(10)


def passed(request) -> bool:
    return not getattr(request.session, "e2e_failed", False)  # on failure, keep everything to look at


@pytest.fixture(scope="session")
def namespace(request):
    """The job's namespace, enforcing the restricted Pod Security Standard like the operator's."""
    ns = f"e2e-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    yield ns
    if passed(request):
        kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="session")
def operator_release(request, s3):
    """`helm install` the chart: the locally built operator image, in a restricted namespace, with
    `kubetune api` (api.enabled) whose jobs are small CPU jobs."""
    kubectl("create", "namespace", RELEASE_NS, check=False)
    kubectl("label", "--overwrite", "namespace", RELEASE_NS, "pod-security.kubernetes.io/enforce=restricted")
    create_credentials(RELEASE_NS)  # the API server's own access to the files
    sh("helm", "uninstall", "kubetune", "-n", RELEASE_NS, "--wait", check=False)
    values = Path(tempfile.mkdtemp()) / "api-values.yaml"
    values.write_text(yaml.safe_dump({"api": {
        "enabled": True, "filesUri": "s3://kubetune/api/files/", "outputsUri": "s3://kubetune/api/jobs/",
        "storage": {"endpoint": s3, "credentialsSecret": "s3-credentials"}, "credentialsSecret": "s3-credentials",
        "jobDefaults": {"preprocessing": {"maxSeqLength": 512},
                        "training": {"maxSteps": 12, "microBatchSize": 4, "learningRate": 3e-3,
                                     "evalEvery": 6, "checkpointEvery": 6},
                        "resources": {"nodes": 1, "gpusPerNode": 0, "cpu": "900m", "memory": "2Gi"},
                        "evaluation": {"samples": 2, "maxNewTokens": 8},
                        "serve": {"enabled": True, "cpu": "200m", "memory": "1Gi"}}}}))
    sh("helm", "install", "kubetune", str(ROOT / "charts" / "kubetune"), "-n", RELEASE_NS,
       "-f", str(ROOT / "charts" / "kubetune" / "values-local.yaml"), "-f", str(values),
       "--set", "localS3.enabled=false",  # the MinIO image cannot be pulled here; the test serves S3
       "--set", "storageCredentialsSecret=s3-credentials",  # the operator's own: schedules poll their new data
       "--wait", "--timeout", "5m")
    yield
    if passed(request):
        sh("helm", "uninstall", "kubetune", "-n", RELEASE_NS, "--wait", check=False)


def log_from_step(ns: str, pod: str, step: int) -> str | None:
    """The pod's log once it shows ``step`` (or later), else None (also while its container is still being created:
    kubectl logs refuses then)."""
    run = kubectl("logs", "-n", ns, pod, check=False)
    return run.stdout if not run.returncode and last_step(run.stdout) >= step else None


def last_step(text: str) -> int:
    steps = re.findall(r"step (\d+)/\d+", text)
    return int(steps[-1]) if steps else 0


def create_credentials(ns: str) -> None:
    kubectl("create", "secret", "generic", "s3-credentials", "-n", ns, f"--from-literal=AWS_ACCESS_KEY_ID={ACCESS_KEY}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={SECRET_KEY}", check=False)  # check=False: it may exist


def small_job(s3_url: str, name: str, data: str, **training) -> dict:
    """A one-pod CPU job on tiny data; ``training`` as a user would write it (defaults left out)."""
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": {
        "model": {"fromConfig": {"size": "tiny", "vocabSize": 1024}}, "dataset": {"train": data},
        "preprocessing": {"maxSeqLength": 256}, "training": {"method": "full", "learningRate": 3e-3, **training},
        "evaluation": {"samples": 2, "maxNewTokens": 8},
        "resources": {"nodes": 1, "gpusPerNode": 0, "cpu": "900m", "memory": "2Gi"},
        "output": {"uri": f"s3://kubetune/jobs/{name}/"},
        "storage": {"endpoint": s3_url, "credentialsSecret": "s3-credentials"}}}


def bucket(s3_url: str):
    """An S3 client, with the kubetune bucket there (a test may run alone, without the one that makes it)."""
    client = boto3.client("s3", endpoint_url=s3_url)
    if "kubetune" not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket="kubetune")
    return client


def ftj_named(ns: str, name: str) -> dict:
    return get_json("ftj", name, "-n", ns).get("status") or {}


def job_pods(ns: str, job: str) -> list[dict]:
    return get_json("pods", "-n", ns, "-l", f"batch.kubernetes.io/job-name={job}")["items"]

