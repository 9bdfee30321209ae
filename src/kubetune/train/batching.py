"""How each rank's share of the global batch is cut and fed: the micro batch that fits (``training.microBatchSize:
auto``), gradient checkpointing when even one row does not fit, and micro batches collated ahead on a thread.

The probe runs on the bare model before DeepSpeed takes it, so a rank that runs out of memory never leaves the
others waiting in a collective: each rank tries micro batches of the longest shape (every row is padded to one
length on GPUs), largest first, halving on out-of-memory, while a block of memory stands for what DeepSpeed and
the optimizer will add (``model_state_bytes``). The ranks then take the smallest answer, so all use the same.
On CPU there is no out-of-memory to catch (the kernel kills the process), so ``auto`` is ``CPU_MICRO``.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

import torch

from kubetune.errors import KubetuneError

CPU_MICRO = 4
GIB = 2**30


class DoesNotFit(KubetuneError):
    """Not even one row fits in GPU memory."""


def divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is at most ``cap`` (at least 1): micro batches that divide a rank's
    share keep the global batch exact."""
    return max(m for m in range(1, max(1, min(cap, n)) + 1) if n % m == 0)


def largest_fitting(per_rank: int, fits: Callable[[int], bool]) -> int | None:
    """The largest micro batch (a divisor of ``per_rank``) for which ``fits`` holds, trying the largest first
    and halving on failure; None if not even 1 fits."""
    micro = per_rank
    while True:
        if fits(micro):
            return micro
        if micro == 1:
            return None
        micro = divisor_at_most(per_rank, micro // 2)


def model_state_bytes(trainable: int, zero_stage: int, world: int, offload: bool) -> int:
    """GPU memory DeepSpeed and AdamW add once training starts (bf16 weights): fp32 master weights and the two
    moments (12 bytes a trainable parameter, partitioned from ZeRO-1 on, on the host with offload), an fp32
    gradient partition for the step (ZeRO-0 keeps whole fp32 gradients), the gradient reduction bucket, and a
    margin for the allocator and communication buffers. The probe's own bf16 gradients stand in for the rest."""
    shards = world if zero_stage >= 1 else 1
    optimizer = 0 if offload else 12 * trainable // shards
    gradients = 4 * trainable // shards
    bucket = 2 * min(trainable, 500_000_000)  # DeepSpeed's default reduce_bucket_size, in bf16
    return int(1.05 * (optimizer + gradients + bucket)) + GIB


def probe(model, batch_of: Callable[[int], object], step: Callable[[object, object], torch.Tensor],
          per_rank: int, reserve: int, log=print, halve: bool = True) -> int | None:
    """The largest micro batch whose forward and backward pass fits beside ``reserve`` bytes; the model's
    gradients are dropped afterwards. ``batch_of(m)`` makes a device batch of m rows, ``step(model, batch)``
    returns the loss to backpropagate. Without ``halve``, ``per_rank`` alone is tried."""
    device = next(model.parameters()).device

    def fits(micro: int) -> bool:
        held = batch = None
        try:
            held = torch.empty(reserve, dtype=torch.uint8, device=device)
            batch = batch_of(micro)
            step(model, batch).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return True
        except torch.OutOfMemoryError:
            log(f"[train] micro batch {micro}: out of GPU memory" + (", trying a smaller one" if halve else ""))
            return False
        finally:
            del held, batch
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if not halve:
        return per_rank if fits(per_rank) else None
    return largest_fitting(per_rank, fits)


def prefetch(batches: Iterable, depth: int = 2) -> Iterator:
    """``batches``, produced up to ``depth`` ahead on a thread: collation (and pinning) overlaps the model's
    work. An exception in the producer is raised to the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce():
        try:
            for b in batches:
                q.put(b)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    def consume():
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    threading.Thread(target=produce, daemon=True, name="kubetune-collate").start()  # now, not at the first next()
    return consume()
