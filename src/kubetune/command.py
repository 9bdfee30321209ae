"""The ``kubetune`` command's entry point: SIGTERM is handled before anything else is imported.

A container's PID 1 ignores a SIGTERM it has no handler for. Pods run ``kubetune ...`` as PID 1, and a
SIGTERM that came while the command was still importing (seconds on a busy node; Kueue may preempt a Job
it has just admitted) was lost: the pod ran on until the kubelet's SIGKILL, a grace period later, holding
the quota its preemptor waits for.
"""

from kubetune.errors import exit_on_sigterm


def main() -> int:
    exit_on_sigterm()
    from kubetune.cli import main as cli_main

    return cli_main()
