"""Python graders' processes: the author's ``grade(sample, item)`` runs in a child process (_worker.py),
one per grader and batch, with

- limits: RLIMIT_CPU per sample, RLIMIT_AS (memory), RLIMIT_FSIZE, no core files, and a wall-clock
  timeout per sample after which the process group is killed;
- no network: in fresh network, mount and PID namespaces (``unshare``, where this process may create
  them: root, or CAP_SYS_ADMIN) with nothing but a down loopback, its own /proc and the parent's
  processes out of sight; where it may not (a pod without that capability), socket creation is refused
  inside the child by an audit hook, along with subprocesses and ctypes, which would get around it.
  ``isolation()`` says which applies. The audit hook is a guard against accidents, not a boundary:
  the author is trusted as the job's owner (the README's trust model);
- a minimal environment: nothing of the parent's (no credentials), an empty temporary folder as
  HOME, TMPDIR and working directory.

A sample that kills the process (CPU limit, a crash) or runs past the wall timeout gets an error, and the
next sample a fresh process.
"""

from __future__ import annotations

import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

WORKER = Path(__file__).with_name("_worker.py")
NAMESPACES = ["unshare", "--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child", "--"]
MAX_REPLY = 1024 * 1024


@dataclass(frozen=True)
class PythonLimits:
    cpu_seconds: int = 60
    wall_seconds: float = 120.0  # OpenAI's limit for one grading
    memory_bytes: int = 2 * 1024**3  # OpenAI gives a python grader 2 GB and 1 GB of disk
    file_bytes: int = 1024**3


@dataclass
class Outcome:
    score: float | None = None
    error: str | None = None  # why there is no score (the grader's traceback, a limit)
    runtime: bool = False  # the error is the grader's own exception; else the sandbox ended it
    timeout: bool = False


@functools.cache
def isolation() -> str:
    """``namespaces`` where unshare can make the child its own network, mount and PID namespaces, else
    ``audit-hook``."""
    if shutil.which("unshare"):
        probe = subprocess.run([*NAMESPACES, "true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if probe.returncode == 0:
            return "namespaces"
    return "audit-hook"


class PythonWorker:
    """One python grader's process, reused for the samples of a batch."""

    def __init__(self, source: str, limits: PythonLimits = PythonLimits(), samples: int = 1):
        self.source, self.limits, self.samples = source, limits, samples
        self.proc: subprocess.Popen | None = None
        self.folder: str | None = None
        self.setup_error: str | None = None
        self._buffer = b""

    def grade(self, sample: dict, item: object) -> Outcome:
        if self.setup_error:
            return Outcome(error=self.setup_error, runtime=True)
        if self.proc is None:
            started = self._start()
            if started.error:
                return started
        return self._ask({"sample": sample, "item": item}, self.limits.wall_seconds)

    def _start(self) -> Outcome:
        self.folder = tempfile.mkdtemp(prefix="kubetune-grader-")
        env = {"PATH": os.defpath, "HOME": self.folder, "TMPDIR": self.folder, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
        isolated = isolation() == "namespaces"
        command = [*(NAMESPACES if isolated else []), sys.executable, "-I", str(WORKER)]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, cwd=self.folder, env=env, start_new_session=True)
        setup = {"source": self.source, "network_namespace": isolated,
                 "limits": {**asdict(self.limits), "samples": self.samples}}
        ready = self._ask(setup, self.limits.wall_seconds)
        if ready.error:  # the source failed to run (an import, a top-level exception, a loop): not again
            self.close()
            self.setup_error = f"the grader's source failed: {ready.error}"
            return Outcome(error=self.setup_error, runtime=ready.runtime, timeout=ready.timeout)
        return ready

    def _ask(self, message: dict, timeout: float) -> Outcome:
        try:
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return self._ended()
        line, timed_out = self._read_line(timeout)
        if timed_out:
            self.close()
            return Outcome(error=f"grading took longer than {self.limits.wall_seconds:g} s", timeout=True)
        if line is None:
            return self._ended()
        try:
            reply = json.loads(line)
        except ValueError:
            self.close()
            return Outcome(error="the grader's process wrote something that is not a reply")
        if "error" in reply:
            return Outcome(error=reply["error"], runtime=True)
        return Outcome(score=reply.get("score"))

    def _read_line(self, timeout: float) -> tuple[bytes | None, bool]:
        """(a line, timed out): None at end of output or past MAX_REPLY."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None, True
                chunk = os.read(fd, 65536)
                if not chunk or len(self._buffer) > MAX_REPLY:
                    return None, False
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line, False

    def _ended(self) -> Outcome:
        self.close()
        return Outcome(error=f"the grader's process ended while grading: past its CPU time limit "
                       f"({self.limits.cpu_seconds} s), out of memory ({self.limits.memory_bytes // 2**20} MiB), "
                       "or it exited")

    def close(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            self.proc, self._buffer = None, b""
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
