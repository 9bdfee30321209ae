"""``python -m kubetune.train JOB_FILE`` — run by torchrun on every rank."""

import os
import sys
import traceback

from kubetune.errors import KubetuneError, cause, exit_code
from kubetune.spec import load_job


def train(job_file: str) -> None:
    """The recipe of the job's objective: rft has a loop of its own (sample, grade, update)."""
    if load_job(job_file).spec.training.objective == "rft":
        from kubetune.train.rft import train as train_rft

        return train_rft(job_file)
    from kubetune.train.recipe import train as train_recipe

    return train_recipe(job_file)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: torchrun ... -m kubetune.train JOB_FILE")
    try:
        train(sys.argv[1])
    except Exception as e:  # noqa: BLE001 - every failure ends with its one-line cause and class
        if not isinstance(e, KubetuneError):
            traceback.print_exc()  # a bug: its traceback for whoever fixes it, the cause for everyone
        line, code = cause(e), exit_code(e)
        # torchrun exits 1 whatever its ranks did, and prints their reports after this line: the file keeps
        # the class and cause for the launcher (`kubetune run`, or the training pod's command) to end with.
        if os.environ.get("KUBETUNE_ERROR_FILE"):
            with open(os.environ["KUBETUNE_ERROR_FILE"], "a") as f:
                f.write(f"{code}\t{line}\n")
        print(line, file=sys.stderr, flush=True)
        sys.exit(code)
