"""The fine-tuning recipe, launched by torchrun: setup → train → export. Read it top to bottom.

GPUs present → NCCL and bf16; none → DeepSpeed's CPU accelerator with gloo and fp32. Same code.
Evaluation is not part of it: the job runner starts it once these processes have ended
(``kubetune.evaluate.run.evaluate_after_training``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from kubetune.models import build_model, resolve_source
from kubetune.packed.rows import Rows, collate, load_rows, to_device, token_stats, validation_metrics, validation_totals
from kubetune.spec import FineTuneJob, load_job
from kubetune.storage import Mirror
from kubetune.train import dpo, extensions
from kubetune.train.bookkeeping import Bookkeeper, Cost
from kubetune.errors import KubetuneError
from kubetune.train.distributed import Preemption, is_node_leader
from kubetune.train.export import export_model
from kubetune.train.progress import report_start
from kubetune.train.plan import BatchPlan, fingerprint, make_plan, rank_micro_batches, step_rows


class TrainingDiverged(KubetuneError):
    """The loss is NaN or infinite: the weights are spoiled, so stop before they are saved."""


class Preempted(KubetuneError):
    """Stopped on SIGTERM after checkpointing the last finished step."""


def deepspeed_config(job: FineTuneJob, plan: BatchPlan, bf16: bool) -> dict:
    t = job.spec.training
    zero: dict = {"stage": t.zero_stage}
    if t.offload and t.zero_stage >= 2:
        zero["offload_optimizer"] = {"device": "cpu"}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.accum,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_force_ds_cpu_optimizer": False,  # a torch AdamW is fine with CPU offload; no custom op build
        "steps_per_print": 10**9,
    }


def warmup_cosine(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Sft:
    """Supervised fine-tuning: the mean next-token loss over every trained (assistant) token of the global batch.
    (``kubetune.train.dpo.Dpo`` is the other objective, with the same methods.)"""

    width = 3  # summed loss, correct predictions, trained tokens

    def normalizer(self, rows: Rows, idx) -> int:
        return rows.label_tokens(idx)

    def micro_loss(self, engine, batch: dict, idx, label_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch.pop("labels")
        loss_sum, correct, count = token_stats(engine(**batch).logits, labels)
        return loss_sum / label_tokens, torch.tensor([loss_sum.item(), correct, count], dtype=torch.float64)

    def step_metrics(self, totals: torch.Tensor) -> dict:
        return {"train_loss": totals[0].item() / max(totals[2].item(), 1),
                "train_accuracy": totals[1].item() / max(totals[2].item(), 1)}

    def totals(self, model, rows: Rows, idx: list[int], micro: int, pad_id: int, device) -> torch.Tensor:
        return validation_totals(model, rows, idx, micro, pad_id, device)

    def metrics(self, totals: torch.Tensor) -> dict:
        return validation_metrics(totals)


def evaluate(run: Run) -> dict:
    """Validation metrics (the objective's); each rank takes a slice of the rows, the totals are summed."""
    engine, rows = run.engine, run.valid_rows
    engine.eval()
    totals = run.objective.totals(engine, rows, list(range(run.rank, len(rows), run.world)), run.plan.micro,
                                  run.tokenizer.pad_token_id, engine.device).to(engine.device)
    engine.train()
    dist.all_reduce(totals)
    return run.objective.metrics(totals)


def fetch_prepared(job: FineTuneJob, scratch: Path) -> Path:
    """A local folder holding prepared/ and tokenizer/ (downloaded once per node for s3://)."""
    out = Mirror(job.spec.output.uri, scratch / "input", job.spec.storage)
    if is_node_leader():
        for part in ("prepared", "tokenizer"):
            out.fetch(part)
    dist.barrier()
    return out.path


@dataclass
class Run:
    """What setup builds and every step uses."""

    job: FineTuneJob
    engine: object  # the DeepSpeed engine
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tokenizer: object
    train_rows: Rows
    valid_rows: Rows
    plan: BatchPlan
    source: str | None  # the resolved base model; None for fromConfig
    dtype: torch.dtype
    on_gpu: bool
    scratch: Path
    rank: int
    world: int
    objective: Sft | dpo.Dpo

    def describe(self) -> str:
        t, plan = self.job.spec.training, self.plan
        return (f"[train] {self.world} process(es) on {'GPU' if self.on_gpu else 'CPU'} ({self.dtype}), "
                f"ZeRO-{t.zero_stage}, {t.method}" + (f", DPO (beta {t.dpo.beta})" if t.objective == "dpo" else "")
                + f"; global batch {plan.global_batch} = {plan.micro} micro x "
                f"{plan.accum} accumulation x {self.world}; {plan.total_steps} steps "
                f"({plan.steps_per_epoch} per epoch)")


def setup(job: FineTuneJob) -> Run:
    import deepspeed
    from transformers import AutoTokenizer

    spec, t = job.spec, job.spec.training
    extensions.build_ops()  # first, under a lock a killed run cannot leave stuck (see extensions)
    deepspeed.init_distributed()  # nccl on GPUs, gloo on DeepSpeed's CPU accelerator
    rank, world = dist.get_rank(), dist.get_world_size()
    on_gpu = deepspeed.get_accelerator().device_name() == "cuda"
    bf16 = on_gpu and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    scratch = Path(os.environ.get("KUBETUNE_SCRATCH") or tempfile.gettempdir()) / f"kubetune-{job.metadata.name}"
    scratch.mkdir(parents=True, exist_ok=True)

    prepared = fetch_prepared(job, scratch)
    tokenizer = AutoTokenizer.from_pretrained(prepared / "tokenizer")
    check_objective(prepared, t.objective)
    train_rows, valid_rows = load_rows(prepared, "train"), load_rows(prepared, "validation")
    plan = make_plan(len(train_rows), t.global_batch_size, t.micro_batch_size, world, t.epochs, t.max_steps)
    source = None if spec.model.from_config else resolve_source(job, scratch / "base-model")
    model = build_model(job, tokenizer, source, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(plan.total_steps, t.warmup_ratio))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(job, plan, bf16))
    objective = Sft()
    if t.objective == "dpo":  # here, before a checkpoint is loaded: the engine holds the base model's weights
        reference = dpo.reference_for(t.method, engine, train_rows, valid_rows, plan.micro, tokenizer.pad_token_id)
        objective = dpo.Dpo(t.dpo.beta, t.dpo.sft_weight, reference)
    return Run(job, engine, scheduler, tokenizer, train_rows, valid_rows, plan, source, dtype, on_gpu, scratch,
               rank, world, objective)


def check_objective(prepared: Path, objective: str) -> None:
    """Preference pairs and conversations are prepared differently: the data must be prepared for this objective."""
    found = json.loads((prepared / "prepared" / "meta.json").read_text()).get("objective", "sft")
    if found != objective:
        raise KubetuneError(f"the prepared data is for training.objective {found}, but the job's is {objective}; "
                            "prepare the data again (kubetune prepare)")


def train_step(run: Run, rows: np.ndarray, preemption: Preemption) -> tuple[dict, bool]:
    """One optimizer step on the global batch ``rows``: loss and accuracy over all its trained tokens,
    and whether any rank got SIGTERM by the step's end (reduced with them: no collective of its own)."""
    engine, plan, objective = run.engine, run.plan, run.objective
    norm = objective.normalizer(run.train_rows, rows)  # what the global batch's loss is a mean over
    stats = torch.zeros(objective.width + 1, dtype=torch.float64)
    for micro_rows in rank_micro_batches(rows, plan, run.rank):
        batch = to_device(collate(run.train_rows, micro_rows, run.tokenizer.pad_token_id), engine.device)
        loss, micro_stats = objective.micro_loss(engine, batch, micro_rows, norm)
        # DeepSpeed divides by accumulation steps and averages over ranks; undo both, so the
        # step's loss is the mean over the whole global batch (every trained token; for DPO every pair).
        engine.backward(loss * plan.accum * run.world)
        engine.step()
        stats[:-1] += micro_stats
    stats[-1] = float(preemption.requested)
    stats = stats.to(engine.device)
    dist.all_reduce(stats)
    return objective.step_metrics(stats[:-1].cpu()), stats[-1].item() > 0


def cost(run: Run, began: float) -> Cost:
    """GPU-hours and MFU bookkeeping: GPUs and their model; parameters counted whole under ZeRO-3 too."""
    params = sum(getattr(p, "ds_numel", p.numel()) for p in run.engine.module.parameters())
    gpus = run.world if run.on_gpu else 0
    return Cost(gpus, torch.cuda.get_device_name() if run.on_gpu else None, params, began)


def train(job_file: str) -> None:
    """Every rank: set up, resume if a checkpoint is there, train step by step, export."""
    began = time.monotonic()  # GPU-hours count set-up too
    job = load_job(job_file)
    t = job.spec.training
    if int(os.environ.get("RANK", "0")) == 0:
        report_start(job.spec.output.uri, job.spec.storage)
    run = setup(job)
    engine, plan = run.engine, run.plan
    export = partial(export_model, engine, job, run.tokenizer, run.source, run.dtype, run.scratch)  # export(dest)
    book = Bookkeeper(job, plan, run.scratch, run.rank, export, cost(run, began))
    start = book.resume(engine)
    book.log(run.describe())

    engine.train()
    timer, tokens_per_s, preemption = time.monotonic(), 0.0, Preemption()
    for step in range(start, book.total_steps):  # none left when the resumed run had stopped early
        torch.manual_seed(t.seed * 1_000_003 + step)  # dropout depends on the step, not on history
        rows = step_rows(plan, t.seed, step)
        metrics, stop = train_step(run, rows, preemption)
        done = step + 1
        if not math.isfinite(metrics["train_loss"]):  # every rank sees the same reduced loss: all stop here
            raise TrainingDiverged(
                f"the training loss became {metrics['train_loss']} at step {done}; nothing of that step was saved "
                f"(the last complete checkpoint is {book.latest_ckpt or 'none'}); try a lower training.learningRate")
        elapsed, timer = time.monotonic() - timer, time.monotonic()
        tokens_per_s = run.train_rows.tokens(rows) / elapsed
        row = {"step": done, "epoch": round(done / plan.steps_per_epoch, 3), **metrics,
               "learning_rate": run.scheduler.get_last_lr()[0], "tokens_per_second": round(tokens_per_s, 1),
               "batch": fingerprint(rows)}
        if done % t.eval_every == 0 or book.due(done):  # each checkpoint's marker keeps its validation metrics
            metrics.update(evaluate(run))
            row.update(metrics)
        book.after_step(engine, row, metrics, tokens_per_s, eta=(plan.total_steps - done) * elapsed)
        if book.stopped_at:  # early stopping: every rank got rank 0's decision, and the checkpoint is written
            break
        if stop and done < plan.total_steps:
            book.checkpoint(engine, done, tokens_per_s, eta=(plan.total_steps - done) * elapsed)
            raise Preempted(f"stopped by SIGTERM after step {done}, with a complete checkpoint of it; "
                            "the next attempt resumes there")

    book.report(book.total_steps, "exporting", tokens_per_s, 0, force=True)
    export(job.spec.output.uri)
    dist.barrier()
    dist.destroy_process_group()
    if run.rank == 0:
        book.close(tokens_per_s)
