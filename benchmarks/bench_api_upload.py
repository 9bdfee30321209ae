"""Concurrent uploads to `kubetune api`: the API server's peak memory and the upload throughput.

    .venv/bin/python benchmarks/bench_api_upload.py [--uploads 4] [--mb 500]

Starts the tests' control plane (etcd + kube-apiserver: the API key is a ServiceAccount token, checked
with TokenReview and SubjectAccessReview), a moto S3 server and `kubetune api` as its own process, writes
one valid chat JSONL file of ``--mb`` MB in a temporary folder, and uploads it ``--uploads`` times at once
with the official openai client. The API process's RSS is sampled every 50 ms from before the first
upload to after the last (the chart gives the API container 1 GiB), and its CPU time is counted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from api_process import Watch, start_api  # noqa: E402
from conftest import start_moto  # noqa: E402  (the tests' own)
from controlplane import ControlPlane  # noqa: E402

NS = "bench"
MIB = 1024 * 1024


def write_chat_jsonl(path: Path, size: int) -> int:
    """Valid chat examples, varied text, until ``size`` bytes; the number of lines."""
    lines = 0
    with open(path, "wb", buffering=MIB) as f:
        while f.tell() < size:
            n = lines
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "You are the support assistant of a parcel company."},
                {"role": "user", "content": f"Where is my order #{n:08d}? It was due on day {n % 28 + 1}."},
                {"role": "assistant", "content": f"Order #{n:08d} left the depot {n % 5 + 1} days ago and "
                 f"arrives within {n % 3 + 1} working days; tracking code TR{n * 7919 % 10**9:09d}."}]}).encode()
                    + b"\n")
            lines += 1
    return lines


def caller_token(cp: ControlPlane) -> str:
    cp.kubectl("apply", "-f", str(Path(__file__).resolve().parents[1] / "crds"))  # the Role names finetunejobs
    cp.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.dev")
    cp.kubectl("create", "namespace", NS)
    cp.kubectl("-n", NS, "create", "serviceaccount", "uploader")
    cp.kubectl("-n", NS, "create", "role", "ft", "--verb=get,list,create", "--resource=finetunejobs")
    cp.kubectl("-n", NS, "create", "rolebinding", "ft", "--role=ft", f"--serviceaccount={NS}:uploader")
    return cp.kubectl("-n", NS, "create", "token", "uploader", "--duration=2h", "--audience", "kubetune").stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=4)
    parser.add_argument("--mb", type=int, default=500, help="size of each file in MB (10^6 bytes)")
    args = parser.parse_args()

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    cp = ControlPlane().start()
    moto, s3_url = start_moto(env)
    api = None
    try:
        with tempfile.TemporaryDirectory(prefix="bench-api-upload-") as tmp:
            data = Path(tmp) / "chat.jsonl"
            lines = write_chat_jsonl(data, args.mb * 10**6)
            size = data.stat().st_size
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="testing",
                         aws_secret_access_key="testing").create_bucket(Bucket=bucket)
            token = caller_token(cp)
            api, url = start_api(["--files", f"s3://{bucket}/files/", "--outputs", f"s3://{bucket}/jobs/",
                                  "--storage-endpoint", s3_url], {**cp.env(), **env}, Path(tmp) / "api.log")
            if url is None:
                return 1
            client = OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=3600)

            def upload(_):
                with open(data, "rb") as f:
                    return client.files.create(file=("chat.jsonl", f), purpose="fine-tune")

            with Watch(api.pid) as watch:
                start = time.monotonic()
                with ThreadPoolExecutor(args.uploads) as pool:
                    results = list(pool.map(upload, range(args.uploads)))
                wall = time.monotonic() - start
            statuses = sorted({r.status for r in results})
            ok = all(r.status == "processed" and r.bytes == size for r in results)
            print(f"uploads: {args.uploads} at once of {size / 10**6:.0f} MB ({lines:,} chat lines) each; "
                  f"statuses {statuses}, bytes {'match' if ok else 'DIFFER'}")
            print(f"wall: {wall:.1f} s; throughput: {args.uploads * size / 10**6 / wall:.1f} MB/s in all; "
                  f"API process CPU: {watch.cpu_seconds:.1f} s (the S3 server and this client share the machine's cores)")
            print(f"API process RSS: idle {watch.idle / MIB:.0f} MiB, peak {watch.peak / MIB:.0f} MiB")
            return 0 if ok else 1
    finally:
        if api is not None:
            api.terminate()
            api.wait(10)
        moto.terminate()
        moto.wait(10)
        cp.stop()


if __name__ == "__main__":
    sys.exit(main())
