"""DeepSpeed's JIT-built C++ ops, built so that a killed run cannot hang the next one.

On CPU, ``deepspeed.init_distributed()`` compiles its shared-memory communication op with
torch.utils.cpp_extension, which guards the build folder with a plain ``lock`` file (FileBaton) and
waits, silently and forever, while one exists. A run killed mid-build leaves that file behind, and
every later run hung. So the trainer builds the op itself first, in a kubetune-owned
TORCH_EXTENSIONS_DIR, while holding an flock of its own: the kernel drops an flock when its holder
dies, so a ``lock`` file found while holding it has no live builder and is removed. Waiting for a
live builder (rank 0 building while rank 1 waits) is reported after a few seconds and bounded.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from pathlib import Path

from kubetune.errors import Transient

SHM_OP = "ShareMemCommBuilder"  # the op deepspeed.comm.torch.build_shm_op loads
NOTICE_AFTER_S = 10.0


class BuildLockTimeout(Transient):
    """A live build of DeepSpeed's op held its lock past the wait limit."""


def extensions_dir() -> Path:
    """TORCH_EXTENSIONS_DIR, set to kubetune's own cache folder unless the user chose one."""
    cache = Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune")
    return Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions")))


@contextlib.contextmanager
def build_lock(build_dir: Path, timeout: float, log=print, notice_after: float = NOTICE_AFTER_S):
    """Hold an exclusive flock for building into ``build_dir``; clear the torch lock a dead build left."""
    build_dir.parent.mkdir(parents=True, exist_ok=True)
    path = build_dir.parent / f"{build_dir.name}.kubetune-lock"  # beside build_dir: the build may wipe it
    with open(path, "a+") as f:
        start, noticed = time.monotonic(), False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                f.seek(0)
                holder = f.read().strip() or "another process"
                what = f"{holder} to finish building DeepSpeed's {build_dir.name} op (lock {path})"
                if waited >= timeout:
                    raise BuildLockTimeout(f"gave up after {waited:.0f} s waiting for {what}; if that build is stuck, "
                                           f"stop it, or set KUBETUNE_BUILD_LOCK_TIMEOUT to wait longer") from None
                if not noticed and waited >= notice_after:
                    log(f"[train] waiting for {what}; giving up after {timeout:.0f} s")
                    noticed = True
                time.sleep(0.2)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
            f.flush()
            stale = build_dir / "lock"
            if stale.exists():  # every builder here holds our flock first, and we hold it: its owner is gone
                log(f"[train] removing {stale}, left by a build that was killed; building again")
                stale.unlink()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_ops(log=print) -> None:
    """Build (or load the already built) ops DeepSpeed will JIT-load at start-up, under ``build_lock``."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(SHM_OP)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # DeepSpeed will not load it either (e.g. on GPUs)
    build_dir = extensions_dir() / builder.NAME  # where torch.utils.cpp_extension builds it
    timeout = float(os.environ.get("KUBETUNE_BUILD_LOCK_TIMEOUT", 600))
    with build_lock(build_dir, timeout, log):
        prebuilt = Path(os.environ.get("KUBETUNE_PREBUILT_EXTENSIONS", "/nonexistent")) / builder.NAME
        if not list(build_dir.glob("*.so")) and list(prebuilt.glob("*.so")):
            # Built into the trainer image; copied (mtimes kept, so ninja finds it up to date) because
            # torch wants to write a lock file beside it and the image's filesystem is read-only.
            shutil.rmtree(build_dir, ignore_errors=True)
            shutil.copytree(prebuilt, build_dir)
        if not list(build_dir.glob("*.so")):
            log(f"[train] building DeepSpeed's {builder.NAME} op into {build_dir} (once; about a minute)")
        builder.load()  # cached in DeepSpeed's process-wide op table: init_distributed reuses it
