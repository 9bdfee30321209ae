"""The gang's division of labour: which process does a node's storage work, and what rank 0 decides for all."""

from __future__ import annotations

import os
import signal
from typing import Callable, TypeVar

T = TypeVar("T")


def is_node_leader() -> bool:
    """The first process on this machine: it does the per-node downloads and uploads."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def rank0_decides(decide: Callable[[], T], device) -> T:
    """``decide()`` on rank 0 alone, its answer sent to every rank.

    For what ranks must agree on but could see differently, e.g. storage listed at different moments.
    """
    import torch.distributed as dist

    answer = [decide() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(answer, src=0, device=device)
    return answer[0]


class Preemption:
    """SIGTERM (a node drain, an eviction, a spot reclaim, ``suspend: true``) noted, not obeyed at
    once: the step in progress finishes, the ranks agree (``requested`` is reduced with the step's
    loss), a checkpoint is written, then the trainer exits, so the next attempt redoes no step.
    torchrun passes the signal on to every rank."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum, frame) -> None:
        self.requested = True
