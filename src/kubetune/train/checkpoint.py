"""Checkpoints in the output location (local or s3://) that count only once complete.

Layout: ``OUTPUT/checkpoints/step-00000040/`` holds DeepSpeed's files (model, optimizer and
scheduler state of every rank, plus our client state: the step) and, written last
by rank 0 after every rank's files are in place, the marker ``COMPLETE``. A folder without the
marker (a run killed while saving, an upload cut short) is ignored on resume and removed later.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from kubetune.spec import Storage
from kubetune.storage import Mirror, NotFound, join, store_for
from kubetune.train.distributed import is_node_leader

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"/checkpoints/(step-(\d+))/")


def tag(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_uri(output: str) -> str:
    return join(output, "checkpoints")


def _scan(output: str, storage: Storage) -> tuple[list[int], list[int]]:
    """(steps with a marker, steps without one)."""
    try:
        files = store_for(output, storage).list(checkpoints_uri(output))
    except NotFound:  # only "no checkpoints yet": a storage failure must not read as "start from 0"
        return [], []
    steps, complete = set(), set()
    for f in files:
        m = _STEP_DIR.search(f.replace("\\", "/"))
        if m:
            steps.add(int(m.group(2)))
            if f.endswith("/" + MARKER):
                complete.add(int(m.group(2)))
    return sorted(complete), sorted(steps - complete)


def latest_complete(output: str, storage: Storage) -> int | None:
    complete, _ = _scan(output, storage)
    return complete[-1] if complete else None


def local_mirror(output: str, storage: Storage, scratch: Path) -> Mirror:
    """Where DeepSpeed reads and writes checkpoints: the output's own folder when local, else scratch."""
    return Mirror(checkpoints_uri(output), scratch / "checkpoints", storage)


def save(engine, output: str, storage: Storage, scratch: Path, step: int, client_state: dict, keep: int) -> str:
    """Save on every rank; returns the checkpoint URI once it is complete."""
    folder = local_mirror(output, storage, scratch)
    engine.save_checkpoint(str(folder.path), tag=tag(step), client_state=client_state, save_latest=False)
    dist.barrier()
    uri = join(checkpoints_uri(output), tag(step))
    if is_node_leader():
        folder.publish(tag(step))  # each node uploads what its ranks wrote
    dist.barrier()
    if dist.get_rank() == 0:
        marker = {"step": step, "time": time.time()}
        store_for(output, storage).write_bytes(join(uri, MARKER), json.dumps(marker).encode())
        _prune(output, storage, keep)
    dist.barrier()
    if folder.remote and is_node_leader():
        shutil.rmtree(folder.path / tag(step), ignore_errors=True)  # uploaded; scratch is not a second store
    return uri


def load(engine, output: str, storage: Storage, scratch: Path, step: int) -> dict:
    """Load a complete checkpoint on every rank; returns the client state."""
    folder = local_mirror(output, storage, scratch)
    if is_node_leader():
        folder.fetch(tag(step))
    dist.barrier()
    _, client_state = engine.load_checkpoint(str(folder.path), tag=tag(step))
    return client_state or {}


def _prune(output: str, storage: Storage, keep: int) -> None:
    complete, incomplete = _scan(output, storage)
    newest = complete[-1]
    store = store_for(output, storage)
    for step in complete[:-keep] + [s for s in incomplete if s < newest]:
        store.delete_prefix(join(checkpoints_uri(output), tag(step)))
