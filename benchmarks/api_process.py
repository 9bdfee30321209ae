"""`kubetune api` as the API benchmarks run it: started on a free port, waited for, and watched (peak RSS, CPU)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import free_port  # noqa: E402


def start_api(args: list[str], env: dict, log_path: Path) -> tuple[subprocess.Popen, str | None]:
    """`kubetune api ARGS` and its base URL once /healthz answers; None (its log on stderr) if it did not start."""
    port = free_port()
    log = open(log_path, "w+")
    api = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "api", "--port", str(port), *args],
                           stdout=log, stderr=subprocess.STDOUT, env=env)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=2).close()
            return api, url
        except OSError:
            if api.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                print(log.read()[-3000:], file=sys.stderr)
                return api, None
            time.sleep(0.2)


class Watch:
    """A process's RSS at start and its peak (sampled every 50 ms), and the CPU seconds it used, while in ``with``."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.idle = self.peak = self.proc.memory_info().rss
        self.cpu_seconds = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    def __enter__(self) -> Watch:
        self._cpu = sum(self.proc.cpu_times()[:2])
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.cpu_seconds = sum(self.proc.cpu_times()[:2]) - self._cpu
        self._done.set()
        self._thread.join()
