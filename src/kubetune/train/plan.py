"""Which rows each rank trains on at each step: a pure function of (data size, spec, world size, seed).

The global batch is fixed by the spec; the world size only changes how it is cut into micro
batches and accumulation steps. The data order depends only on the seed and the step, so a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from hashlib import blake2b

import numpy as np

from kubetune.errors import KubetuneError


class PlanError(KubetuneError):
    """The spec's batch sizes do not fit the data or the world size (a KubetuneError: its one line is the cause
    the trainer reports, not a traceback)."""


@dataclass(frozen=True)
class BatchPlan:
    rows: int
    global_batch: int
    world: int
    micro: int
    accum: int
    steps_per_epoch: int
    total_steps: int

    @property
    def per_rank(self) -> int:
        return self.micro * self.accum


AUTO_MAX = 32  # globalBatchSize: auto's largest batch (rows per step)
AUTO_MIN_STEPS = 8  # ... and it keeps at least this many steps per epoch where the data allows


def auto_global_batch(rows: int, world: int) -> int:
    """globalBatchSize: auto: 32 rows per step, fewer for small data so an epoch has about 8 steps; a multiple
    of the world size, at least one row per process (OpenAI's batch_size auto likewise grows with the data)."""
    batch = min(AUTO_MAX, max(world, rows // AUTO_MIN_STEPS))
    return max(world, batch // world * world)


def make_plan(rows: int, global_batch: int | str, micro: int, world: int, epochs: int,
              max_steps: int | None) -> BatchPlan:
    """The plan, or a PlanError naming the numbers that do not fit (a permanent error: retrying cannot help)."""
    if rows < world:
        raise PlanError(f"the data has {rows} packed training row(s), fewer than the {world} training processes: "
                        "add examples or train on fewer processes")
    if global_batch == "auto":
        global_batch = auto_global_batch(rows, world)
    if global_batch % world:
        raise PlanError(f"training.globalBatchSize {global_batch} is not divisible by the {world} training processes")
    if rows < global_batch:
        raise PlanError(f"the data has {rows} packed training rows, fewer than training.globalBatchSize {global_batch}"
                        f" (auto fits it to the data)")
    per_rank = global_batch // world
    micro = max(m for m in range(1, min(micro, per_rank) + 1) if per_rank % m == 0)
    steps_per_epoch = rows // global_batch  # the remainder differs every epoch, as the order does
    total = max_steps or steps_per_epoch * epochs
    return BatchPlan(rows, global_batch, world, micro, per_rank // micro, steps_per_epoch, total)


def step_rows(plan: BatchPlan, seed: int, step: int) -> np.ndarray:
    """Row indices of the whole global batch of ``step`` (0-based)."""
    epoch, k = divmod(step, plan.steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(plan.rows)
    return order[k * plan.global_batch : (k + 1) * plan.global_batch]


def rank_micro_batches(rows: np.ndarray, plan: BatchPlan, rank: int) -> list[np.ndarray]:
    mine = rows[rank * plan.per_rank : (rank + 1) * plan.per_rank]
    return [mine[i * plan.micro : (i + 1) * plan.micro] for i in range(plan.accum)]


def fingerprint(rows: np.ndarray) -> str:
    """A short id of a global batch, logged per step so runs can be compared."""
    return blake2b(np.asarray(rows, dtype=np.int64).tobytes(), digest_size=6).hexdigest()
