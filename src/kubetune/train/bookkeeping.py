"""What the trainer records after each step: the metrics row, the progress record and, when due, a
checkpoint with the metrics it belongs to. One object owns the output location, so the training
loop only says what happened.

Every rank takes part in checkpoints; rank 0 alone keeps the metrics and reports progress.
"""

from __future__ import annotations

from pathlib import Path

from kubetune.spec import FineTuneJob
from kubetune.storage import Mirror, join
from kubetune.train import checkpoint
from kubetune.train.distributed import rank0_decides
from kubetune.train.metrics import MetricsLog
from kubetune.train.plan import BatchPlan
from kubetune.train.progress import reporter_for


class Bookkeeper:
    def __init__(self, job: FineTuneJob, plan: BatchPlan, scratch: Path, rank: int):
        self.job, self.plan, self.scratch, self.rank = job, plan, scratch, rank
        self.out, self.storage = job.spec.output.uri, job.spec.storage
        self.metrics_dir = Mirror(self.out, scratch / "metrics", self.storage)  # metrics.csv, tensorboard/, the plot
        self.metrics_log: MetricsLog | None = None
        self.reporter = reporter_for(self.out, self.storage) if rank == 0 else None
        self.latest_ckpt: str | None = None
        self.latest_metrics: dict = {}

    def log(self, line: str) -> None:
        if self.rank == 0:
            print(line)

    def resume(self, engine) -> int:
        """Load the newest complete checkpoint, if any, and open the metrics there; returns its step."""
        # Rank 0 decides where to resume and tells the others: ranks that listed the checkpoints at
        # different moments (or one through a storage hiccup) must not start from different steps.
        start = rank0_decides(lambda: checkpoint.latest_complete(self.out, self.storage) or 0, engine.device)
        if start:
            checkpoint.load(engine, self.out, self.storage, self.scratch, start)
            self.log(f"[train] resuming from the complete checkpoint at step {start}")
            self.latest_ckpt = join(checkpoint.checkpoints_uri(self.out), checkpoint.tag(start))
        if self.rank == 0:
            if start:
                # A resumed run may be on a new pod with an empty scratch: start from the metrics uploaded
                # with the checkpoint, else the rows before it would be lost from metrics.csv.
                self.metrics_dir.fetch("metrics.csv")
            self.metrics_log = MetricsLog(self.metrics_dir.path, start)
        return start

    def after_step(self, engine, row: dict, metrics: dict, tokens_per_s: float, eta: float) -> None:
        """Record a finished step (``row`` as metrics.csv has it); checkpoint when due."""
        done, t = row["step"], self.job.spec.training
        self.latest_metrics = metrics
        if self.metrics_log:
            self.metrics_log.log(row)
        if done % t.checkpoint_every == 0 or done == self.plan.total_steps:
            self.checkpoint(engine, done, tokens_per_s, eta)
        else:
            self.report(done, "training", tokens_per_s, eta, force="valid_loss" in row)

    def checkpoint(self, engine, done: int, tokens_per_s: float, eta: float) -> None:
        """A complete checkpoint of step ``done``, with the metrics up to it (every rank calls this)."""
        if self.latest_ckpt and self.latest_ckpt.rstrip("/").endswith(checkpoint.tag(done)):
            return  # written already (a SIGTERM right after a scheduled checkpoint)
        if self.metrics_log:
            self.metrics_log.flush()
            self.metrics_dir.publish()  # metrics travel with their checkpoint
        self.latest_ckpt = checkpoint.save(engine, self.out, self.storage, self.scratch, done, {"step": done},
                                           self.job.spec.training.keep_checkpoints)
        self.report(done, "training", tokens_per_s, eta, force=True)

    def report(self, step: int, phase: str, tokens_per_s: float, eta: float | None, force: bool = False) -> None:
        if self.reporter is None:
            return
        plan = self.plan
        self.reporter.update({
            "phase": phase, "step": step, "totalSteps": plan.total_steps,
            "epoch": round(step / plan.steps_per_epoch, 2), "percent": round(100 * step / plan.total_steps, 1),
            "etaSeconds": None if eta is None else round(eta), "tokensPerSecond": round(tokens_per_s, 1),
            # rounded: `kubectl get ftj` shows them as they are
            "metrics": {k: round(v, 4) if isinstance(v, float) else v for k, v in self.latest_metrics.items()},
            "checkpoint": self.latest_ckpt,
        }, force=force)

    def close(self, tokens_per_s: float) -> None:
        """Rank 0, once the model is exported: the loss curve, the last metrics and, without evaluation, "done"."""
        plot = self.metrics_log.plot()
        self.metrics_log.close()
        self.metrics_dir.publish()
        self.log(f"[train] done: model {join(self.out, 'model')}, metrics {join(self.out, 'metrics.csv')}, "
                 f"loss curve {join(self.out, plot.name)}")
        if not self.job.spec.evaluation.samples:  # else the job runner evaluates, then reports "done"
            self.report(self.plan.total_steps, "done", tokens_per_s, 0, force=True)
