"""Resume a checkpoint on a different number of ranks, through DeepSpeed's universal checkpoints.

A ZeRO checkpoint holds one optimizer (and, under ZeRO-3, model) shard per data-parallel rank, so
``engine.load_checkpoint`` refuses it when the world size has changed. Then, and only then, each node
leader converts the checkpoint with DeepSpeed's own ``ds_to_universal`` into its scratch folder (one
folder per parameter: fp32 weights, Adam moments), everybody waits, and every rank loads its new
shard from there with ``load_universal``. The step, the learning-rate scheduler and the client state
come from the model-state files the converter copies along. The data order does not depend on the
world size (``kubetune.train.plan``), so the resumed run trains on the batches an uninterrupted one would.
"""

from __future__ import annotations

import re
import shutil
from argparse import Namespace
from pathlib import Path

import torch.distributed as dist

from kubetune.train.distributed import is_node_leader

# zero_pp_rank_{dp}_mp_rank_{mp}_optim_states.pt (bf16_ in front under DeepSpeed's bf16 optimizer)
_OPTIM_SHARD = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def saved_world(folder: Path) -> int | None:
    """How many data-parallel ranks wrote the checkpoint in ``folder``; None without ZeRO shards
    (ZeRO-0 keeps whole replicas, which any world size loads)."""
    ranks = {int(m.group(1)) for f in folder.iterdir() if (m := _OPTIM_SHARD.search(f.name))}
    return len(ranks) or None


def needs_reshard(folder: Path, world: int) -> bool:
    saved = saved_world(folder)
    return saved is not None and saved != world


def to_universal(folder: Path, out: Path) -> None:
    """DeepSpeed's converter, as ``python -m deepspeed.checkpoint.ds_to_universal`` runs it, in-process
    and without worker pools. ``inject_missing_state``: DeepSpeed writes the ``universal_checkpoint_info``
    the converter asks for only for tensor-parallel models; plain data parallelism needs no more."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(out, ignore_errors=True)  # a conversion cut short leaves a partial folder
    ds_to_universal.main(Namespace(input_folder=str(folder), output_folder=str(out), num_extract_workers=1,
                                   num_merge_workers=1, keep_temp_folder=False, strict=True,
                                   inject_missing_state=True))


def load_resharded(engine, folder: Path, scratch: Path, tag: str) -> dict:
    """Every rank: convert (node leaders), then load the universal checkpoint; returns the client state.

    ``load_universal`` is the engine's config switch; it is read only while loading, so it is on for
    this one load and the run saves ordinary checkpoints again, for its own world size."""
    universal = scratch / "universal"
    if is_node_leader():
        to_universal(folder / tag, universal / tag)
    dist.barrier()
    config, previous = engine._config, engine._config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        _, client_state = engine.load_checkpoint(str(universal), tag=tag, load_module_strict=False)
    finally:
        config.load_universal_checkpoint = previous
    dist.barrier()
    if is_node_leader():
        shutil.rmtree(universal, ignore_errors=True)  # loaded; scratch is not a second store
    return client_state or {}
