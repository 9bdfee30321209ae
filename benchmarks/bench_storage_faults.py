"""Storage faults between the job and its S3 server, measured: does the job ride out transient ones
and stop with one clear line on permanent ones?

    bash scripts/toxiproxy.sh                                  # builds Toxiproxy once (Go), prints its path
    .venv/bin/python benchmarks/bench_storage_faults.py [--only NAME ...]

The path of every S3 request (boto3 in the CLI and in both trainer ranks):

    boto3 -> Toxiproxy (TCP faults: latency, resets, stalls, bandwidth, endpoint down)
          -> a small HTTP front (HTTP 500/503 answers, see Front) -> moto S3 server

The job is small and real: `kubetune run` on data in S3 with its output in S3 (prepare, 2 CPU ranks
of DeepSpeed, checkpoints and the model uploaded), generation evaluation off. Each fault is either
on for the whole run, or switched on for a window once training starts (the trainer's
"[train] N process(es)" line), or permanent from then on. Retries are counted from the
"[storage] ... retry" lines kubetune's S3 client prints for each retried request.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import free_port  # noqa: E402  (the tests' one)


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def toxiproxy_binary() -> str:
    """scripts/toxiproxy.sh builds it when missing (needs go) and prints its path."""
    run = subprocess.run(["bash", str(ROOT / "scripts" / "toxiproxy.sh")], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"cannot build toxiproxy: {run.stderr.strip().splitlines()[-1:]}")
    return run.stdout.strip().splitlines()[-1]


class Toxiproxy:
    """A toxiproxy-server process and its HTTP API."""

    def __init__(self, binary: str):
        self.port = free_port()
        self.proc = subprocess.Popen([binary, "-host", "127.0.0.1", "-port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read()
        return json.loads(text) if text else {}

    def proxy(self, name: str, upstream_port: int) -> int:
        port = free_port()
        self._call("POST", "/proxies", {"name": name, "listen": f"127.0.0.1:{port}",
                                        "upstream": f"127.0.0.1:{upstream_port}", "enabled": True})
        wait_port(port)
        return port

    def toxic(self, proxy: str, kind: str, stream: str = "downstream", toxicity: float = 1.0, **attributes) -> str:
        name = f"{kind}_{stream}_{uuid.uuid4().hex[:6]}"
        self._call("POST", f"/proxies/{proxy}/toxics", {"name": name, "type": kind, "stream": stream,
                                                        "toxicity": toxicity, "attributes": attributes})
        return name

    def enable(self, proxy: str, on: bool) -> None:
        self._call("POST", f"/proxies/{proxy}", {"enabled": on})

    def reset(self) -> None:
        self._call("POST", "/reset")  # every proxy enabled, every toxic removed

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Front(http.server.ThreadingHTTPServer):
    """A pass-through HTTP front for moto that can answer the next N requests, or every k-th one,
    with an S3 error instead of forwarding them. moto itself has no switch for 5xx, so these are
    produced here: real HTTP 500/503 responses with S3's XML error bodies (InternalError, SlowDown),
    which is what boto3's retry logic looks at. Everything else is forwarded to moto unchanged."""

    daemon_threads = True

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.lock = threading.Lock()
        self.fail_next, self.fail_every, self.seen, self.failed = 0, 0, 0, 0
        self.error = (503, "SlowDown", "Please reduce your request rate.")
        super().__init__(("127.0.0.1", 0), _FrontHandler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request, client_address):  # resets by Toxiproxy are the point, not news
        pass

    def should_fail(self) -> bool:
        with self.lock:
            self.seen += 1
            fail = self.fail_next > 0 or (self.fail_every and self.seen % self.fail_every == 0)
            if self.fail_next > 0:
                self.fail_next -= 1
            self.failed += bool(fail)
            return bool(fail)


class _FrontHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size + 2)[:size]
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return data
                data += chunk
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self):
        body = self._body()
        if self.server.should_fail():
            status, code, message = self.server.error
            payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                       f"<Message>{message}</Message></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer has no body
                self.wfile.write(payload)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "content-length", "connection", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


def start_moto(extra_env: dict | None = None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, **(extra_env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


# --- the job ---------------------------------------------------------------------------------------

def job_doc(bucket: str, endpoint: str, name: str) -> dict:
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
            "spec": {"model": {"fromConfig": {"size": "tiny", "vocabSize": 512}},
                     "dataset": {"train": f"s3://{bucket}/raw/"},
                     "preprocessing": {"maxSeqLength": 256, "pii": {"allow": ["no-reply@nimbusnotes.example"]}},
                     "training": {"method": "full", "learningRate": 3e-3, "globalBatchSize": 8, "microBatchSize": 2,
                                  "maxSteps": 6, "zeroStage": 2, "evalEvery": 3, "checkpointEvery": 2,
                                  "keepCheckpoints": 2},
                     "resources": {"nodes": 1, "gpusPerNode": 0},
                     "evaluation": {"samples": 0},
                     "storage": {"endpoint": endpoint},
                     "output": {"uri": f"s3://{bucket}/jobs/{name}/"}}}


@dataclass
class Env:
    """What a scenario may touch while the job runs."""
    tox: Toxiproxy
    front: Front
    direct: object  # a boto3 client straight to moto (no faults)
    iam: object | None
    bucket: str
    notes: list = field(default_factory=list)


@dataclass
class Fault:
    name: str
    expect: str  # "ok" or the text the failure line must contain
    before: Callable[[Env], None] = lambda env: None  # when the job starts
    during: Callable[[Env], None] = lambda env: None  # once training starts (on a thread)
    auth: bool = False  # moto with authentication on, an IAM user's key


def window(seconds: float, on: Callable[[Env], object], off: Callable[[Env, object], None]):
    def during(env: Env):
        handle = on(env)
        time.sleep(seconds)
        off(env, handle)
    return during


def delete_bucket(env: Env) -> None:
    """Empty and delete the bucket (the job may write between the two; try until it is gone)."""
    for _ in range(50):
        try:
            for page in env.direct.get_paginator("list_objects_v2").paginate(Bucket=env.bucket):
                objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if objs:
                    env.direct.delete_objects(Bucket=env.bucket, Delete={"Objects": objs})
            env.direct.delete_bucket(Bucket=env.bucket)
            return
        except env.direct.exceptions.ClientError:
            time.sleep(0.1)


def revoke_key(env: Env) -> None:
    key_id = os.environ["BENCH_ACCESS_KEY_ID"]
    env.iam.delete_access_key(UserName="trainer", AccessKeyId=key_id)


def front_fail(n: int = 0, every: int = 0, error=(503, "SlowDown", "Please reduce your request rate.")):
    def on(env: Env):
        env.front.error, env.front.fail_every, env.front.fail_next = error, every, n
    return on


FAULTS = [
    Fault("none", "ok"),
    Fault("latency 150 ms +-50 each way, whole run", "ok",
          before=lambda e: [e.tox.toxic("s3", "latency", s, latency=150, jitter=50) for s in ("upstream", "downstream")]),
    Fault("bandwidth 256 KB/s each way, whole run", "ok",
          before=lambda e: [e.tox.toxic("s3", "bandwidth", s, rate=256) for s in ("upstream", "downstream")]),
    Fault("reset_peer on 20% of connections, whole run", "ok",
          before=lambda e: e.tox.toxic("s3", "reset_peer", "upstream", toxicity=0.2, timeout=0)),
    Fault("reset_peer on every connection for 4 s", "ok",
          during=window(4, lambda e: e.tox.toxic("s3", "reset_peer", "upstream", timeout=0),
                        lambda e, t: e.tox._call("DELETE", f"/proxies/s3/toxics/{t}"))),
    Fault("timeout (stall 1 s, close) on 20% of connections", "ok",
          before=lambda e: e.tox.toxic("s3", "timeout", "downstream", toxicity=0.2, timeout=1000)),
    Fault("black hole (data dropped) for 5 s", "ok",
          during=window(5, lambda e: e.tox.toxic("s3", "timeout", "downstream", timeout=0),
                        lambda e, t: e.tox._call("DELETE", f"/proxies/s3/toxics/{t}"))),
    Fault("endpoint down (refused) for 5 s", "ok",
          during=window(5, lambda e: e.tox.enable("s3", False), lambda e, t: e.tox.enable("s3", True))),
    Fault("HTTP 503 SlowDown x4 in a row", "ok", during=lambda e: front_fail(n=4)(e)),
    Fault("HTTP 500 InternalError on every 5th request", "ok",
          before=lambda e: front_fail(every=5, error=(500, "InternalError", "We encountered an internal error."))(e)),
    Fault("bucket deleted mid-run", "does not exist", during=delete_bucket),
    Fault("credentials revoked mid-run", "access denied", during=revoke_key, auth=True),
    Fault("endpoint down for good", "cannot reach", during=lambda e: e.tox.enable("s3", False)),
]


def run_fault(fault: Fault, tox: Toxiproxy, work: Path, timeout: float) -> dict:
    import boto3

    moto_env = {"INITIAL_NO_AUTH_ACTION_COUNT": "3"} if fault.auth else {}
    moto, moto_port = start_moto(moto_env)
    front = Front(moto_port)
    tox.reset()
    try:
        tox._call("DELETE", "/proxies/s3")
    except Exception:
        pass
    proxy_port = tox.proxy("s3", front.port)
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    iam = None
    if fault.auth:  # the first 3 requests need no auth: make a user with a key allowed everything
        iam = boto3.client("iam", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="us-east-1", **_kw(creds))
        iam.create_user(UserName="trainer")
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        creds = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        iam = boto3.client("iam", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="us-east-1", **_kw(creds))
        os.environ["BENCH_ACCESS_KEY_ID"] = key["AccessKeyId"]
    direct = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="us-east-1", **_kw(creds))
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    direct.create_bucket(Bucket=bucket)
    for f in sorted((ROOT / "examples" / "data").glob("*.jsonl")):
        direct.upload_file(str(f), bucket, f"raw/{f.name}")
    env = Env(tox, front, direct, iam, bucket)
    name = re.sub(r"[^a-z0-9]+", "-", fault.name.lower()).strip("-")[:40]
    job_file = work / f"{name}.json"
    job_file.write_text(json.dumps(job_doc(bucket, f"http://127.0.0.1:{proxy_port}", "faults")))
    log_path = work / f"{name}.log"
    proc_env = {**os.environ, **creds, "AWS_DEFAULT_REGION": "us-east-1", "PYTHONUNBUFFERED": "1",
                "KUBETUNE_SCRATCH": str(work / "scratch" / name)}
    proc_env.pop("AWS_ENDPOINT_URL", None)
    try:
        fault.before(env)
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "run", str(job_file), "--nproc", "2"],
                                env=proc_env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
        fired = None
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            if fired is None and "[train] 2 process(es)" in log_path.read_text(errors="replace"):
                fired = threading.Thread(target=fault.during, args=(env,), daemon=True)
                fired.start()
            time.sleep(0.05)
        hung = proc.poll() is None
        if hung:
            _kill_tree(proc.pid)
        proc.wait()
        seconds = time.monotonic() - t0
    finally:
        tox.reset()
        front.shutdown()
        moto.terminate()
        moto.wait(10)
    log = log_path.read_text(errors="replace")
    retries = len(re.findall(r"^\[storage\] .*retry", log, re.M))
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    if hung:
        outcome = f"hung (> {timeout:.0f} s)"
    elif proc.returncode == 0:
        outcome = "succeeded"
    else:
        outcome = "failed: " + (errors[0] if errors else (log.strip().splitlines() or ["(no output)"])[-1])[:150]
    if fault.expect == "ok":
        ok = proc.returncode == 0 and not hung
    else:
        ok = proc.returncode not in (0, None) and not hung and any(fault.expect in e for e in errors)
    leaked = [k for k in (creds["AWS_SECRET_ACCESS_KEY"],) if k != "testing" and k in log]
    if leaked:
        ok, outcome = False, outcome + " (SECRET IN LOG)"
    tracebacks = log.count("Traceback (most recent call last)")
    return {"fault": fault.name, "expected": "succeed" if fault.expect == "ok" else f"fail: '{fault.expect}'",
            "outcome": outcome, "ok": ok, "retries": retries, "http_errors_served": front.failed,
            "tracebacks": tracebacks, "seconds": seconds, "log": str(log_path)}


def _kw(creds: dict) -> dict:
    return {"aws_access_key_id": creds["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": creds["AWS_SECRET_ACCESS_KEY"]}


def _kill_tree(pid: int) -> None:
    import psutil

    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="faults whose name contains one of these")
    ap.add_argument("--timeout", type=float, default=400, help="seconds per job before it counts as hung")
    ap.add_argument("--workdir", help="keep logs here (default: a temporary folder, removed)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kubetune-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    tox = Toxiproxy(toxiproxy_binary())
    results = []
    try:
        for fault in FAULTS:
            if args.only and not any(o in fault.name for o in args.only):
                continue
            r = run_fault(fault, tox, work, args.timeout)
            results.append(r)
            print(f"  {r['fault']}: {r['outcome']} ({r['seconds']:.1f} s, {r['retries']} retries) "
                  f"{'ok' if r['ok'] else 'UNEXPECTED'}", flush=True)
    finally:
        tox.stop()
    head = ["fault", "outcome", "expected", "retries seen", "5xx served", "time s", "as expected"]
    table = [[r["fault"], r["outcome"], r["expected"], str(r["retries"]), str(r["http_errors_served"]),
              f"{r['seconds']:.1f}", "yes" if r["ok"] else "NO"] for r in results]
    widths = [max(len(x) for x in col) for col in zip(head, *table)]
    print()
    for row in [head, ["-" * w for w in widths], *table]:
        print("| " + " | ".join(x.ljust(w) for x, w in zip(row, widths)) + " |")
    (work / "results.json").write_text(json.dumps(results, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
