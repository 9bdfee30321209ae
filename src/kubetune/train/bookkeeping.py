"""What the trainer records after each step: the metrics row, the progress record and, when due, a
checkpoint (a servable model too) with the metrics it belongs to. One object owns the output
location, so the training loop only says what happened.

Every rank takes part in checkpoints; rank 0 alone keeps the metrics, reports progress and the list
of checkpoints (``status.checkpoints``), and decides when to stop early.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from kubetune.spec import FineTuneJob
from kubetune.status import Status
from kubetune.storage import Mirror, join
from kubetune.train import checkpoint
from kubetune.train.distributed import rank0_decides
from kubetune.train.flops import peak_flops
from kubetune.train.metrics import EarlyStopping, MetricsLog, columns_for
from kubetune.train.plan import BatchPlan
from kubetune.train.progress import LocalSink, reporter_for

class Cost:
    """GPU-hours over all attempts (the total so far travels with each checkpoint) and MFU; None on CPU.

    MFU is the model FLOPs of the steps (``kubetune.train.flops``: the work the step really does, attention over
    the real document lengths) per second over the peak of all GPUs. ``observe`` keeps the FLOPs per token of
    the latest step, so ``mfu(tokens_per_s)`` follows the data's layout."""

    def __init__(self, gpus: int, device_name: str | None, started: float):
        self.gpus, self.peak, self.started = gpus, peak_flops(device_name), started
        self.before = 0.0  # GPU-hours of earlier attempts
        self.flops_per_token = 0.0

    def observe(self, step_flops: float, step_tokens: int) -> None:
        self.flops_per_token = step_flops / max(step_tokens, 1)

    def gpu_hours(self) -> float | None:
        return self.before + self.gpus * (time.monotonic() - self.started) / 3600 if self.gpus else None

    def mfu(self, tokens_per_s: float) -> float | None:
        if not self.peak or self.gpus <= 0:
            return None
        return self.flops_per_token * tokens_per_s / (self.peak * self.gpus)


def sub_grader_names(training) -> tuple[str, ...]:
    """A multi grader's sub-graders (objective rft), whose rewards get columns of their own."""
    grader = training.rft.grader if training.objective == "rft" else None
    return tuple(getattr(grader, "graders", None) or ())


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


class Bookkeeper:
    def __init__(self, job: FineTuneJob, plan: BatchPlan, scratch: Path, rank: int, export: Callable[[str], None],
                 cost: Cost, choices: dict | None = None):
        self.job, self.plan, self.scratch, self.rank = job, plan, scratch, rank
        self.choices = choices or {}  # what the trainer chose for the spec's "auto"s, for progress and lineage
        self.export, self.cost = export, cost  # export(uri) writes uri/model: every rank calls it
        self.out, self.storage = job.spec.output.uri, job.spec.storage
        self.metrics_dir = Mirror(self.out, scratch / "metrics", self.storage)  # metrics.csv, tensorboard/, the plot
        self.metrics_log: MetricsLog | None = None
        self.reporter = reporter_for(self.out, self.storage) if rank == 0 else None
        self.latest_ckpt: str | None = None
        self.latest_metrics: dict = {}
        es = job.spec.training.early_stopping
        self.stopping = EarlyStopping(job.spec.training.best_metric, es.patience, es.min_delta) if es else None
        self.stopped_at: int | None = None  # the step at which early stopping ended training

    @property
    def total_steps(self) -> int:
        return self.stopped_at or self.plan.total_steps

    def due(self, done: int) -> bool:
        """Whether step ``done`` ends with a checkpoint, and so with a validation (its marker keeps the metrics)."""
        return done % self.job.spec.training.checkpoint_every == 0 or done == self.plan.total_steps

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
        marker = self._carry_on(start) if self.rank == 0 else {}
        if start:  # a run that stopped early stays stopped: the rerun only exports
            self.stopped_at = rank0_decides(lambda: marker.get("stoppedEarlyAt"), engine.device)
            if self.stopped_at:
                self.latest_metrics = {**marker.get("metrics", {}), "stopped_early_at": self.stopped_at}
        return start

    def _carry_on(self, start: int) -> dict:
        """Rank 0: metrics, GPU-hours and the early-stopping count as the earlier attempts left them."""
        marker = checkpoint.marker(self.out, self.storage, start) if start else {}
        if start:
            # A resumed run may be on a new pod with an empty scratch: start from the metrics uploaded
            # with the checkpoint, else the rows before it would be lost from metrics.csv.
            self.metrics_dir.fetch("metrics.csv")
        t = self.job.spec.training
        self.metrics_log = MetricsLog(self.metrics_dir.path, start, columns_for(t.objective, sub_grader_names(t)))
        # The last progress record counts an attempt killed after its last checkpoint too.
        last = LocalSink(self.out, self.storage).last() or {}
        self.cost.before = max(marker.get("gpuHours") or 0.0, last.get("gpuHours") or 0.0)
        if self.stopping and marker.get("earlyStopping"):
            self.stopping = EarlyStopping(self.stopping.metric, self.stopping.patience, self.stopping.min_delta,
                                          marker["earlyStopping"])
        return marker

    def after_step(self, engine, row: dict, metrics: dict, tokens_per_s: float, eta: float) -> None:
        """Record a finished step (``row`` as metrics.csv has it); after a validation, decide whether to stop
        early (``stopped_at``); checkpoint when due or stopping."""
        done, t = row["step"], self.job.spec.training
        if self.stopping and t.best_metric in metrics and done < self.plan.total_steps:
            # Rank 0 decides for all: the reduced metrics agree, but the stop must not hang on a float's last bit.
            if rank0_decides(lambda: self.stopping.update(metrics[t.best_metric]), engine.device):
                self.stopped_at = done
                metrics["stopped_early_at"] = done
                self.log(f"[train] stopping early at step {done} of {self.plan.total_steps}: {t.best_metric} has "
                         f"not improved by more than {t.early_stopping.min_delta} for {t.early_stopping.patience} "
                         f"validation(s) in a row")
        self.latest_metrics = metrics
        if self.metrics_log:
            self.metrics_log.log(row)
        if self.due(done) or self.stopped_at == done:
            self.checkpoint(engine, done, tokens_per_s, eta)
        else:
            self.report(done, "training", tokens_per_s, eta, force="valid_loss" in row)

    def checkpoint(self, engine, done: int, tokens_per_s: float, eta: float) -> None:
        """A complete checkpoint of step ``done``, with its model and the metrics up to it (every rank calls this)."""
        if self.latest_ckpt and self.latest_ckpt.rstrip("/").endswith(checkpoint.tag(done)):
            return  # written already (a SIGTERM right after a scheduled checkpoint)
        if self.metrics_log:
            self.metrics_log.flush()
            self.metrics_dir.publish()  # metrics travel with their checkpoint
        t = self.job.spec.training
        record = {"metrics": {k: v for k, v in self.latest_metrics.items() if k.startswith("valid_")},
                  "gpuHours": self.cost.gpu_hours()}
        if self.stopping:
            record["earlyStopping"] = self.stopping.state()
        if self.stopped_at:
            record["stoppedEarlyAt"] = self.stopped_at
        self.latest_ckpt = checkpoint.save(engine, self.out, self.storage, self.scratch, done,
                                           {"step": done, "gpu_hours": record["gpuHours"]}, t.keep_checkpoints,
                                           self.export, record, t.best_metric)
        if self.reporter:
            self.reporter.patch(Status(checkpoints=checkpoint.infos(self.out, self.storage, t.best_metric)))
        self.report(done, "training", tokens_per_s, eta, force=True)

    def report(self, step: int, phase: str, tokens_per_s: float, eta: float | None, force: bool = False) -> None:
        if self.reporter is None:
            return
        plan, total = self.plan, self.total_steps
        self.reporter.update({
            "phase": phase, "step": step, "totalSteps": total,
            "epoch": round(step / plan.steps_per_epoch, 2), "percent": round(100 * step / total, 1),
            "etaSeconds": None if eta is None else round(eta), "tokensPerSecond": round(tokens_per_s, 1),
            "gpuHours": _rounded(self.cost.gpu_hours()), "mfu": _rounded(self.cost.mfu(tokens_per_s)),
            # rounded: `kubectl get ftj` shows them as they are
            "metrics": {k: round(v, 4) if isinstance(v, float) else v for k, v in self.latest_metrics.items()},
            "checkpoint": self.latest_ckpt, **self.choices,
        }, force=force)

    def close(self, tokens_per_s: float) -> None:
        """Rank 0, once the model is exported: the loss curve, the last metrics and, without evaluation, "done"."""
        plot = self.metrics_log.plot()
        self.metrics_log.close()
        self.metrics_dir.publish()
        self.log(f"[train] done: model {join(self.out, 'model')}, metrics {join(self.out, 'metrics.csv')}, "
                 f"loss curve {join(self.out, plot.name)}")
        if not self.job.spec.evaluation.samples:  # else the job runner evaluates, then reports "done"
            self.report(self.total_steps, "done", tokens_per_s, 0, force=True)
