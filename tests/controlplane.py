"""A real Kubernetes control plane on loopback, the envtest way: etcd + kube-apiserver (RBAC on) +
kube-controller-manager running only its garbage collector. No kubelet, no scheduler, no job
controller: tests write Job status themselves, as a kubelet and the job controller would.

The binaries are built from pinned Go modules by scripts/controlplane.sh into ~/.cache/kubetune
(a cold build is several minutes on 2 cores; later runs reuse it). kubectl and helm are the real
binaries, from the same cache.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_binaries() -> Path:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "controlplane.sh")], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"scripts/controlplane.sh failed:\n{out.stderr[-4000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def _signing_key(folder: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private, public = folder / "sa.key", folder / "sa.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


class ControlPlane:
    def __init__(self):
        self.bin = build_binaries()
        self.dir = Path(tempfile.mkdtemp(prefix="kubetune-cp-"))
        self.procs: list[subprocess.Popen] = []
        self.token = secrets.token_hex(16)
        self.port = _free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = self.dir / "kubeconfig"

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> ControlPlane:
        etcd_client, etcd_peer = _free_port(), _free_port()
        self._spawn("etcd", [
            "--name=default", f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_client}", f"--advertise-client-urls=http://127.0.0.1:{etcd_client}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}", f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}", "--unsafe-no-fsync", "--log-level=error"])
        private, public = _signing_key(self.dir)
        (self.dir / "tokens.csv").write_text(f'{self.token},admin,admin,"system:masters"\n')
        self._spawn("kube-apiserver", [
            f"--etcd-servers=http://127.0.0.1:{etcd_client}", "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1", f"--secure-port={self.port}", f"--cert-dir={self.dir / 'certs'}",
            "--authorization-mode=RBAC", f"--token-auth-file={self.dir / 'tokens.csv'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={public}", f"--service-account-signing-key-file={private}",
            "--service-cluster-ip-range=10.96.0.0/16", "--endpoint-reconciler-type=none", "--v=0"])
        self._write_kubeconfig(self.kubeconfig, self.token)
        self._wait_ready()
        self._spawn("kube-controller-manager", [
            f"--kubeconfig={self.kubeconfig}", "--controllers=garbagecollector", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={_free_port()}", "--v=0"])
        return self

    def stop(self, keep: bool = False) -> None:
        """Stop every component; remove the data dir (etcd, certs, logs) unless ``keep``, to look at it."""
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if keep:
            print(f"control plane logs kept in {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self, names: tuple[str, ...] = ("kube-apiserver", "etcd")) -> None:
        """Stop these components and start them again with the same arguments: same data dir and
        ports, so the stored objects survive, as after a control-plane node reboot."""
        stopping = [p for p in reversed(self.procs) if p.name in names]
        for proc in stopping:  # the API server before its etcd
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:  # the API server stops serving at once, but lingers before exiting
                proc.kill()
                proc.wait()
        self.procs = [p for p in self.procs if p not in stopping]
        for proc in reversed(stopping):  # back in start order
            self._spawn(proc.name, proc.args[1:])
        self._wait_ready()

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.dir / f"{name}.log", "a")  # appended to: a restart keeps the earlier log
        proc = subprocess.Popen([str(self.bin / name), *args], stdout=log, stderr=subprocess.STDOUT)
        proc.name = name
        self.procs.append(proc)

    def _wait_ready(self, timeout: float = 120) -> None:
        context = ssl._create_unverified_context()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                request = urllib.request.Request(f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"})
                with urllib.request.urlopen(request, timeout=2, context=context) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        logs = (self.dir / "kube-apiserver.log").read_text()[-3000:]
        raise RuntimeError(f"kube-apiserver did not become ready:\n{logs}")

    def _write_kubeconfig(self, path: Path, token: str) -> None:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
        }))

    # --- helpers for tests ---------------------------------------------------------------------
    def kubeconfig_for_token(self, token: str) -> Path:
        path = self.dir / f"kubeconfig-{secrets.token_hex(4)}"
        self._write_kubeconfig(path, token)
        return path

    def env(self, kubeconfig: Path | None = None) -> dict:
        return {**os.environ, "KUBECONFIG": str(kubeconfig or self.kubeconfig),
                "PATH": f"{self.bin}:{os.environ['PATH']}"}

    def kubectl(self, *args: str, kubeconfig: Path | None = None, check: bool = True, input: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess:
        run = subprocess.run([str(self.bin / "kubectl"), *args], env=self.env(kubeconfig), capture_output=True,
                             text=True, input=input, timeout=timeout)
        if check and run.returncode:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {run.stderr}")
        return run

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        run = subprocess.run([str(self.bin / "helm"), *args], env=self.env(), capture_output=True, text=True, timeout=120)
        if check and run.returncode:
            raise AssertionError(f"helm {' '.join(args)} failed: {run.stderr}")
        return run
