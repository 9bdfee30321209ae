"""``python -m kubetune.train JOB_FILE`` — run by torchrun on every rank."""

import os
import sys

from kubetune.errors import KubetuneError
from kubetune.train.recipe import train

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: torchrun ... -m kubetune.train JOB_FILE")
    try:
        train(sys.argv[1])
    except KubetuneError as e:  # a clear line naming the cause (storage, op build lock, model), not a traceback
        message = f"error: {e}"
        # torchrun prints the other ranks' failures after this line; the file keeps the cause for
        # whoever reports it (`kubetune run`, or the kubelet's termination message in a pod).
        if os.environ.get("KUBETUNE_ERROR_FILE"):
            with open(os.environ["KUBETUNE_ERROR_FILE"], "a") as f:
                f.write(message + "\n")
        sys.exit(message)
