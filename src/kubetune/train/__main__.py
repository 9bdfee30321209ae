"""``python -m kubetune.train JOB_FILE`` — run by torchrun on every rank."""

import sys

from kubetune.train.recipe import train

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: torchrun ... -m kubetune.train JOB_FILE")
    train(sys.argv[1])
