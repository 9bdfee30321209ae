"""Storage faults between boto3 and a real S3 protocol server (moto), injected by Toxiproxy (TCP) and a
small HTTP front (5xx). benchmarks/bench_storage_faults.py measures whole jobs; these are the fast
representative cases: transient faults are retried (and each retry is logged), permanent ones end in
one line naming the cause, without credentials."""

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import ROOT
from kubetune import storage
from kubetune.spec import Storage
from kubetune.storage import BucketMissing, S3Store, StorageError, Unavailable

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_storage_faults import Front, Toxiproxy  # noqa: E402  (one implementation for bench and tests)


@pytest.fixture(scope="module")
def toxiproxy():
    if not shutil.which("go") and not list((Path.home() / ".cache" / "kubetune" / "bin").glob("toxiproxy-*/toxiproxy-server")):
        pytest.skip("toxiproxy is not built and `go` is missing to build it (scripts/toxiproxy.sh)")
    run = subprocess.run(["bash", str(ROOT / "scripts" / "toxiproxy.sh")], capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        pytest.skip(f"scripts/toxiproxy.sh could not build toxiproxy: {run.stderr.strip()[-300:]}")
    tox = Toxiproxy(run.stdout.strip().splitlines()[-1])
    yield tox
    tox.stop()


@pytest.fixture
def proxied(toxiproxy, s3, s3_server):
    """(store through the proxy, bucket, toxiproxy): boto3 -> toxiproxy -> moto."""
    _, bucket = s3
    toxiproxy.reset()
    try:
        toxiproxy._call("DELETE", "/proxies/s3")
    except Exception:
        pass
    port = toxiproxy.proxy("s3", int(s3_server.rsplit(":", 1)[1]))
    yield S3Store(Storage(endpoint=f"http://127.0.0.1:{port}")), bucket, toxiproxy
    toxiproxy.reset()


def test_a_reset_window_is_retried_and_logged(proxied, capsys):
    store, bucket, tox = proxied
    toxic = tox.toxic("s3", "reset_peer", "upstream", timeout=0)  # every connection reset at once
    threading.Timer(1.5, lambda: tox._call("DELETE", f"/proxies/s3/toxics/{toxic}")).start()
    store.write_bytes(f"s3://{bucket}/a", b"payload")
    assert store.read_bytes(f"s3://{bucket}/a") == b"payload"
    err = capsys.readouterr().err
    assert "[storage] S3 PutObject: retry 1 of 8 after" in err, err
    assert "testing" not in err  # the (test) credentials never appear


def test_stalled_connections_are_retried(proxied):
    store, bucket, tox = proxied
    # A quarter of the connections stall, then close: every write meets some, and all 9 tries of one write
    # stalling (0.25**9) does not happen by chance (at 0.5 it did, about once in 70 runs).
    tox.toxic("s3", "timeout", "downstream", toxicity=0.25, timeout=300)
    for i in range(6):
        store.write_bytes(f"s3://{bucket}/s{i}", b"x" * 1000)
    assert len(store.list(f"s3://{bucket}/")) == 6


def test_endpoint_down_for_good_fails_with_one_line(proxied, monkeypatch):
    monkeypatch.setattr(storage, "_RETRIES", 2)  # the default 8 back off for about a minute
    store, bucket, tox = proxied
    store_down = S3Store(Storage(endpoint=store.endpoint))  # built after the patch: 2 retries
    tox.enable("s3", False)
    with pytest.raises(StorageError) as e:
        store_down.list(f"s3://{bucket}/data/")
    assert isinstance(e.value, Unavailable) and f"object storage at {store.endpoint} unavailable after 3 tries" in str(e.value)
    assert "\n" not in str(e.value)


def test_http_503_slowdown_is_retried_and_a_persistent_500_named(s3, s3_server, monkeypatch, capsys):
    _, bucket = s3
    front = Front(int(s3_server.rsplit(":", 1)[1]))  # real HTTP 503/500 answers, then forwards to moto
    try:
        store = S3Store(Storage(endpoint=f"http://127.0.0.1:{front.port}"))
        front.fail_next = 3
        store.write_bytes(f"s3://{bucket}/k", b"v")
        assert store.read_bytes(f"s3://{bucket}/k") == b"v"
        assert capsys.readouterr().err.count("after SlowDown") == 3
        monkeypatch.setattr(storage, "_RETRIES", 1)
        front.error, front.fail_next = (500, "InternalError", "internal"), 100
        with pytest.raises(Unavailable, match=r"unavailable after 2 tries \(it kept answering InternalError;"):
            S3Store(Storage(endpoint=f"http://127.0.0.1:{front.port}")).list(f"s3://{bucket}/")
    finally:
        front.shutdown()


def test_upload_into_a_deleted_bucket_names_the_bucket(s3, s3_server, tmp_path):
    # boto3's managed upload wraps the error in S3UploadFailedError; the line must still name the cause.
    client, bucket = s3
    client.delete_bucket(Bucket=bucket)
    f = tmp_path / "f.bin"
    f.write_bytes(b"x")
    with pytest.raises(BucketMissing, match=f"bucket {bucket} does not exist"):
        S3Store(Storage(endpoint=s3_server)).upload(f, f"s3://{bucket}/ckpt/f.bin")


def test_checkpoint_lookup_fails_on_a_storage_fault_instead_of_starting_over(s3, s3_server, monkeypatch):
    # "No checkpoints yet" means start from step 0; an unreachable store must not read the same
    # (a resumed gang whose listing failed would start over, or its ranks disagree on the step).
    from kubetune.train.checkpoint import latest_complete

    _, bucket = s3
    assert latest_complete(f"s3://{bucket}/jobs/x/", Storage(endpoint=s3_server)) is None
    monkeypatch.setattr(storage, "_RETRIES", 1)
    with pytest.raises(Unavailable, match="unavailable after 2 tries"):
        latest_complete(f"s3://{bucket}/jobs/x/", Storage(endpoint="http://127.0.0.1:9"))
    with pytest.raises(StorageError, match="does not exist"):
        latest_complete("s3://no-such-bucket-here/jobs/x/", Storage(endpoint=s3_server))


def test_a_failed_training_run_ends_with_the_cause(s3_server, tmp_path):
    """torchrun prints every rank's failure after the trainer's own line; `kubetune train` ends with
    the cause the failed rank wrote, not torchrun's report."""
    job = tmp_path / "job.yaml"
    job.write_text(f"""apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata: {{name: t}}
spec:
  model: {{fromConfig: {{size: tiny, vocabSize: 512}}}}
  dataset: {{train: {ROOT / 'examples' / 'data'}}}
  output: {{uri: s3://no-such-bucket/out/}}
  storage: {{endpoint: "{s3_server}"}}
""")
    run = subprocess.run([sys.executable, "-m", "kubetune.cli", "train", str(job), "--nproc", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: bucket no-such-bucket does not exist"), run.stderr[-2000:]
