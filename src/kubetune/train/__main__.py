"""``python -m kubetune.train JOB_FILE`` — run by torchrun on every rank."""

import sys

from kubetune.storage import StorageError
from kubetune.train.extensions import BuildLockTimeout
from kubetune.train.recipe import train

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: torchrun ... -m kubetune.train JOB_FILE")
    try:
        train(sys.argv[1])
    except (BuildLockTimeout, StorageError) as e:  # a clear line naming the cause, not a traceback
        sys.exit(f"error: {e}")
