"""Checkpoints in the output location (local or s3://) that count only once complete.

Layout: ``OUTPUT/checkpoints/step-00000040/`` holds DeepSpeed's files (model, optimizer and
scheduler state of every rank, plus our client state: the step), a servable Hugging Face model
made from it (``model/``, and ``adapter/`` for LoRA: what the final export writes) and, written last
by rank 0 after every rank's files are in place, the marker ``COMPLETE``: JSON with the step, the
validation metrics at that step and the running GPU-hours. A folder without the marker (a run killed
while saving, an upload cut short) is ignored on resume and removed later. Pruning keeps the newest
``keepCheckpoints`` and the best by ``training.bestMetric``.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from kubetune.errors import KubetuneError
from kubetune.spec import Storage
from kubetune.status import CheckpointInfo
from kubetune.storage import Mirror, NotFound, join, store_for
from kubetune.train.distributed import is_node_leader
from kubetune.train.metrics import improves
from kubetune.train.progress import LocalSink

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


def save(engine, output: str, storage: Storage, scratch: Path, step: int, client_state: dict, keep: int,
         export: Callable[[str], None], record: dict, best_metric: str) -> str:
    """Save on every rank, the model too (``export(uri)``, a collective); returns the checkpoint URI once it is
    complete. ``record`` goes into the marker (validation metrics, GPU-hours)."""
    folder = local_mirror(output, storage, scratch)
    engine.save_checkpoint(str(folder.path), tag=tag(step), client_state=client_state, save_latest=False)
    dist.barrier()
    uri = join(checkpoints_uri(output), tag(step))
    if is_node_leader():
        folder.publish(tag(step))  # each node uploads what its ranks wrote
    dist.barrier()
    export(uri)  # uri/model (and uri/adapter), before the marker: a complete checkpoint is a model
    if dist.get_rank() == 0:
        marker = {**record, "step": step, "time": time.time()}
        store_for(output, storage).write_bytes(join(uri, MARKER), json.dumps(marker).encode())
        _prune(output, storage, keep, best_metric)
    dist.barrier()
    if folder.remote and is_node_leader():
        shutil.rmtree(folder.path / tag(step), ignore_errors=True)  # uploaded; scratch is not a second store
    return uri


def load(engine, output: str, storage: Storage, scratch: Path, step: int) -> dict:
    """Load a complete checkpoint on every rank; returns the client state. Saved by another number of
    ranks, it is converted to a DeepSpeed universal checkpoint first (``kubetune.train.reshard``)."""
    from kubetune.train import reshard
    from kubetune.train.distributed import rank0_decides

    folder = local_mirror(output, storage, scratch)
    if is_node_leader():
        folder.fetch(tag(step))
    dist.barrier()
    if rank0_decides(lambda: reshard.needs_reshard(folder.path / tag(step), dist.get_world_size()), engine.device):
        return reshard.load_resharded(engine, folder.path, scratch, tag(step))
    _, client_state = engine.load_checkpoint(str(folder.path), tag=tag(step))
    return client_state or {}


def _prune(output: str, storage: Storage, keep: int, best_metric: str) -> None:
    complete, incomplete = _scan(output, storage)
    newest = complete[-1]
    best = best_step(markers(output, storage), best_metric)
    store = store_for(output, storage)
    for step in [s for s in complete[:-keep] if s != best] + [s for s in incomplete if s < newest]:
        store.delete_prefix(join(checkpoints_uri(output), tag(step)))


def marker(output: str, storage: Storage, step: int) -> dict:
    """The marker of a complete checkpoint: step, time, metrics (validation at that step), gpuHours, ..."""
    data = json.loads(store_for(output, storage).read_bytes(join(checkpoints_uri(output), tag(step), MARKER)) or b"{}")
    return {"metrics": {}, **data, "step": step}


def markers(output: str, storage: Storage) -> list[dict]:
    """The markers of every complete checkpoint, oldest first."""
    return [marker(output, storage, step) for step in _scan(output, storage)[0]]


def best_step(found: list[dict], metric: str) -> int | None:
    """The step whose checkpoint has the best ``metric`` (the earliest of equals); None when none has it."""
    best, value = None, None
    for m in found:
        v = m["metrics"].get(metric)
        if v is not None and improves(metric, v, value):
            best, value = m["step"], v
    return best


def model_uri(output: str, step: int) -> str:
    return join(checkpoints_uri(output), tag(step), "model")


def infos(output: str, storage: Storage, metric: str) -> list[CheckpointInfo]:
    """Every complete checkpoint, oldest first, the best by ``metric`` marked: what status.checkpoints shows."""
    found = markers(output, storage)
    best = best_step(found, metric)
    return [CheckpointInfo(name=f"step-{m['step']}", step=m["step"], model=model_uri(output, m["step"]),
                           metrics={k: float(v) for k, v in m["metrics"].items() if k.startswith("valid_")},
                           **({"best": True} if m["step"] == best else {})) for m in found]


class CheckpointNotFound(KubetuneError):
    """A checkpoint reference (step-N, best, last) names no complete checkpoint."""


def finished(output: str, storage: Storage) -> bool:
    """Whether the trainer has exported the final model (its last progress record says it moved past that)."""
    return (LocalSink(output, storage).last() or {}).get("phase") in ("evaluating", "done")


def resolve(output: str, storage: Storage, ref: str, metric: str = "valid_loss") -> str:
    """The model URI that ``ref`` names: ``last`` (the final model once the job finished, else the newest
    checkpoint's), ``best`` (by ``metric``) or ``step-N``."""
    if ref == "last" and finished(output, storage):
        return join(output, "model")
    found = markers(output, storage)
    steps = [m["step"] for m in found]
    best = best_step(found, metric)
    m = re.fullmatch(r"step-0*(\d+)", ref)
    step = {"last": steps[-1] if steps else None, "best": best}.get(ref, int(m.group(1)) if m else None)
    if step in steps:
        return model_uri(output, step)
    have = ", ".join(f"step-{s}" + (" (best)" if s == best else "") for s in steps) or "none yet"
    raise CheckpointNotFound(f"no checkpoint '{ref}' in {checkpoints_uri(output)}; complete checkpoints: {have}"
                             + ("" if ref == "best" or not steps else "; or use best or last"))


def copy_model(uri: str, dest: str, storage: Storage) -> None:
    """Copy a model folder (local or s3://) to ``dest`` (local or s3://)."""
    source = Mirror(uri, spec=storage)
    try:
        local = source.fetch()
        target = Mirror(dest, spec=storage)
        if target.remote:
            shutil.copytree(local, target.path, dirs_exist_ok=True)
            target.publish()
            shutil.rmtree(target.path, ignore_errors=True)
        else:
            shutil.copytree(local, Path(dest), dirs_exist_ok=True)
    finally:
        if source.remote:
            shutil.rmtree(source.path, ignore_errors=True)
