"""Per-record work on every core: an ordered map over chunks in worker processes.

Results come back in the order the chunks went in, whatever the number of workers, so preparation gives
the same shards and report with one process or many. At most ``2 x workers`` chunks are in flight: reading
never runs ahead of the work, and memory stays bounded by the chunk size.

Workers are forked: they start at once, with the modules and the chunk function already in memory, and
whoever calls preparation (a script, pytest, stdin) needs no ``if __name__ == "__main__"`` guard, which
spawned workers would need. A forked worker runs only per-record code (parsing, regexes, numpy, the
tokenizers library with its own threads off), none of the threads the preparing process may run (boto3,
pyarrow) that a fork copies in an unknown state.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Iterator

_work: Callable | None = None


def cpus() -> int:
    """The cores this process may use: KUBETUNE_WORKERS (the operator sets it from the prepare pod's CPU
    request), else the CPU affinity."""
    if os.environ.get("KUBETUNE_WORKERS"):
        return max(1, int(os.environ["KUBETUNE_WORKERS"]))
    return len(os.sched_getaffinity(0))


def ordered_map(work: Callable, chunks: Iterable, workers: int) -> Iterator:
    """``work(chunk)`` for each chunk, in order; in this process when ``workers`` is 1."""
    if workers <= 1:
        yield from map(work, chunks)
        return
    # Set while the workers fork: the tokenizers library's fork hook then turns its thread pool off quietly.
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_install,
                               initargs=(work,))
    try:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(_run, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism


def _install(work: Callable) -> None:
    global _work
    _work = work


def _run(chunk):
    return _work(chunk)
