"""A checkpoint resumed on another number of ranks (2 → 1 and 1 → 2, ZeRO-2 and ZeRO-3), on real
DeepSpeed runs on CPU under torchrun: the checkpoint is converted to a DeepSpeed universal checkpoint
and the resumed run ends like an uninterrupted one.

The interrupted run is an uninterrupted run's output cut back to its checkpoint of step 4 (later
checkpoints, rows and the model removed): what a run stopped right after that checkpoint leaves.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kubetune.data.prepare import prepare
from kubetune.spec import parse_job
from kubetune.train.launch import cpu_threads_env, torchrun_command
from test_trainer_kills import make_job, rows

pytestmark = pytest.mark.slow

STEPS, CUT = 6, 4


def run(job_file: Path, scratch: Path, nproc: int) -> str:
    env = {**os.environ, **cpu_threads_env(nproc), "KUBETUNE_SCRATCH": str(scratch)}
    proc = subprocess.run(torchrun_command(str(job_file), nproc), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def job(tmp: Path, out: Path, name: str, stage: int) -> Path:
    return make_job(tmp, str(out), name, training={"zeroStage": stage, "maxSteps": STEPS, "keepCheckpoints": 3})


class References:
    """Uninterrupted runs, one per (ZeRO stage, ranks), made once for the whole module."""

    def __init__(self, tmp: Path):
        self.tmp, self.made = tmp, {}

    def get(self, stage: int, nproc: int) -> Path:
        if (stage, nproc) not in self.made:
            out = self.tmp / f"ref-z{stage}-n{nproc}"
            job_file = job(self.tmp, out, f"ref-z{stage}-n{nproc}", stage)
            prepare(parse_job(json.loads(job_file.read_text())), log=lambda _: None)
            started = time.monotonic()
            run(job_file, self.tmp / f"scratch-ref-z{stage}-n{nproc}", nproc)
            print(f"uninterrupted ZeRO-{stage} on {nproc} rank(s): {time.monotonic() - started:.1f} s")
            self.made[stage, nproc] = out
        return self.made[stage, nproc]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return References(tmp_path_factory.mktemp("references"))


def stopped_at_checkpoint(ref: Path, out: Path) -> None:
    shutil.copytree(ref, out)
    for ckpt in (out / "checkpoints").iterdir():
        if ckpt.is_dir() and int(ckpt.name.split("-")[1]) > CUT:
            shutil.rmtree(ckpt)
    shutil.rmtree(out / "model", ignore_errors=True)
    assert (out / "checkpoints" / f"step-{CUT:08d}" / "COMPLETE").exists()


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks_ends_like_an_uninterrupted_run(tmp_path, references, stage, before,
                                                                          after):
    ref = references.get(stage, before)
    out = tmp_path / "resumed"
    stopped_at_checkpoint(ref, out)
    started = time.monotonic()
    log = run(job(tmp_path, out, "resumed", stage), tmp_path / "scratch", after)
    elapsed = time.monotonic() - started
    assert f"resuming from the complete checkpoint at step {CUT}" in log, log[-4000:]
    assert "to Universal checkpoint" in log, log[-4000:]  # DeepSpeed's converter ran
    a, b = rows((ref / "metrics.csv").read_text()), rows((out / "metrics.csv").read_text())
    assert [r["step"] for r in b] == [r["step"] for r in a] == [str(s) for s in range(1, STEPS + 1)]
    # the same batches and learning rates after the resume: data order and scheduler carry on
    assert [r["batch"] for r in b] == [r["batch"] for r in a]
    assert [float(r["learning_rate"]) for r in b] == pytest.approx([float(r["learning_rate"]) for r in a])
    # the optimizer state came along: the step after the resume (its update) trains like the reference
    assert float(b[-1]["train_loss"]) == pytest.approx(float(a[-1]["train_loss"]), rel=1e-3)
    ref_loss, resumed_loss = float(a[-1]["valid_loss"]), float(b[-1]["valid_loss"])
    print(f"ZeRO-{stage} {before} -> {after} ranks: valid_loss {ref_loss:.5f} uninterrupted, "
          f"{resumed_loss:.5f} resumed ({elapsed:.1f} s)")
    assert resumed_loss == pytest.approx(ref_loss, rel=0.01)
    assert (out / "model").is_dir()  # exported at the end
    assert not (tmp_path / "scratch" / "kubetune-t" / "universal").exists()  # the conversion is cleaned up
