"""The fine-tuning recipe, launched by torchrun: setup → train → export. Read it top to bottom.

GPUs present → NCCL and bf16; none → DeepSpeed's CPU accelerator with gloo and fp32. Same code.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from kubetune.spec import FineTuneJob, load_job
from kubetune.storage import download_tree, is_s3, join, store_for, upload_tree
from kubetune.train import attention, checkpoint, extensions
from kubetune.train.data import (Rows, collate, is_node_leader, load_rows, to_device, token_stats,
                                 validation_metrics, validation_totals)
from kubetune.train.plan import BatchPlan, fingerprint, make_plan, rank_micro_batches, step_rows
from kubetune.train.progress import reporter_for


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


def build_model(job: FineTuneJob, tokenizer, source: str | None, dtype: torch.dtype):
    from kubetune.models import load_model

    t = job.spec.training
    model = load_model(job, tokenizer, source=source, dtype=dtype)
    model.set_attn_implementation(attention.register())  # packed rows: attention within each document
    model.config.use_cache = False
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if t.method == "lora":
        from peft import LoraConfig, get_peft_model

        if t.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(
            r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
            target_modules=t.lora.target_modules, task_type="CAUSAL_LM"))
    return model


def evaluate(engine, rows: Rows, rank: int, world: int, micro: int, pad_id: int) -> dict:
    """Validation metrics on assistant tokens; each rank takes a slice, the totals are summed."""
    engine.eval()
    totals = validation_totals(engine, rows, list(range(rank, len(rows), world)), micro, pad_id, engine.device)
    engine.train()
    dist.all_reduce(totals)
    return validation_metrics(totals)


def fetch_prepared(job: FineTuneJob, scratch: Path) -> Path:
    """A local folder holding prepared/ and tokenizer/ (downloaded once per node for s3://)."""
    out = job.spec.output.uri
    if not is_s3(out):
        return Path(out)
    local = scratch / "input"
    if is_node_leader():
        for part in ("prepared", "tokenizer"):
            download_tree(join(out, part), local / part, job.spec.storage)
    dist.barrier()
    return local


def train(job_file: str) -> None:
    import deepspeed
    from transformers import AutoTokenizer

    from kubetune.models import resolve_source
    from kubetune.train.export import export_model
    from kubetune.train.metrics import MetricsLog

    # --- setup ---------------------------------------------------------------------------------
    job = load_job(job_file)
    spec, t = job.spec, job.spec.training
    extensions.build_ops()  # first, under a lock a killed run cannot leave stuck (see extensions)
    deepspeed.init_distributed()  # nccl on GPUs, gloo on DeepSpeed's CPU accelerator
    rank, world = dist.get_rank(), dist.get_world_size()
    accelerator = deepspeed.get_accelerator()
    on_gpu = accelerator.device_name() == "cuda"
    bf16 = on_gpu and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    out, storage = spec.output.uri, spec.storage
    scratch = Path(os.environ.get("KUBETUNE_SCRATCH") or tempfile.gettempdir()) / f"kubetune-{job.metadata.name}"
    scratch.mkdir(parents=True, exist_ok=True)
    log = print if rank == 0 else (lambda *_: None)

    prepared = fetch_prepared(job, scratch)
    tokenizer = AutoTokenizer.from_pretrained(prepared / "tokenizer")
    train_rows, valid_rows = load_rows(prepared, "train"), load_rows(prepared, "validation")
    plan = make_plan(len(train_rows), t.global_batch_size, t.micro_batch_size, world, t.epochs, t.max_steps)
    source = None if spec.model.from_config else resolve_source(job, scratch / "base-model")
    model = build_model(job, tokenizer, source, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(plan.total_steps, t.warmup_ratio))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(job, plan, bf16))

    # Rank 0 decides where to resume and tells the others: ranks that listed the checkpoints at
    # different moments (or one through a storage hiccup) must not start from different steps.
    decided = [checkpoint.latest_complete(out, storage) or 0 if rank == 0 else None]
    dist.broadcast_object_list(decided, src=0, device=engine.device)
    start = decided[0]
    if start:
        checkpoint.load(engine, out, storage, scratch, start)
        log(f"[train] resuming from the complete checkpoint at step {start}")
    log(f"[train] {world} process(es) on {'GPU' if on_gpu else 'CPU'} ({dtype}), ZeRO-{t.zero_stage}, {t.method}; "
        f"global batch {plan.global_batch} = {plan.micro} micro x {plan.accum} accumulation x {world}; "
        f"{plan.total_steps} steps ({plan.steps_per_epoch} per epoch)")
    if rank == 0 and start and is_s3(out):
        # A resumed run may be on a new pod with an empty scratch: start from the metrics uploaded
        # with the checkpoint, else the rows before it would be lost from metrics.csv.
        store_for(out, storage).download(join(out, "metrics.csv"), scratch / "metrics" / "metrics.csv")
    metrics = MetricsLog(scratch / "metrics" if is_s3(out) else Path(out), start) if rank == 0 else None
    reporter = reporter_for(out, storage) if rank == 0 else None
    latest_ckpt = join(checkpoint.checkpoints_uri(out), checkpoint.tag(start)) if start else None
    latest_metrics: dict = {}

    def report(step: int, phase: str, tokens_per_s: float, eta: float | None, force: bool = False) -> None:
        if reporter is None:
            return
        reporter.update({
            "phase": phase, "step": step, "totalSteps": plan.total_steps,
            "epoch": round(step / plan.steps_per_epoch, 2), "percent": round(100 * step / plan.total_steps, 1),
            "etaSeconds": None if eta is None else round(eta), "tokensPerSecond": round(tokens_per_s, 1),
            # rounded: `kubectl get ftj` shows them as they are
            "metrics": {k: round(v, 4) if isinstance(v, float) else v for k, v in latest_metrics.items()},
            "checkpoint": latest_ckpt,
        }, force=force)

    # --- train ---------------------------------------------------------------------------------
    engine.train()
    timer, tokens_per_s = time.monotonic(), 0.0
    for step in range(start, plan.total_steps):
        torch.manual_seed(t.seed * 1_000_003 + step)  # dropout depends on the step, not on history
        rows = step_rows(plan, t.seed, step)
        label_tokens = train_rows.label_tokens(rows)
        step_stats = torch.zeros(3, dtype=torch.float64)
        for micro_rows in rank_micro_batches(rows, plan, rank):
            batch = to_device(collate(train_rows, micro_rows, tokenizer.pad_token_id), engine.device)
            labels = batch.pop("labels")
            loss_sum, correct, count = token_stats(engine(**batch).logits, labels)
            # DeepSpeed divides by accumulation steps and averages over ranks; undo both, so the
            # step's loss is the mean over every trained token of the global batch.
            engine.backward(loss_sum / label_tokens * plan.accum * world)
            engine.step()
            step_stats += torch.tensor([loss_sum.item(), correct, count], dtype=torch.float64)
        step_stats = step_stats.to(engine.device)
        dist.all_reduce(step_stats)
        done = step + 1
        elapsed, timer = time.monotonic() - timer, time.monotonic()
        tokens_per_s = train_rows.tokens(rows) / elapsed
        latest_metrics = {"train_loss": step_stats[0].item() / max(step_stats[2].item(), 1),
                          "train_accuracy": step_stats[1].item() / max(step_stats[2].item(), 1)}
        row = {"step": done, "epoch": round(done / plan.steps_per_epoch, 3), **latest_metrics,
               "learning_rate": scheduler.get_last_lr()[0], "tokens_per_second": round(tokens_per_s, 1),
               "batch": fingerprint(rows)}
        if done % t.eval_every == 0 or done == plan.total_steps:
            latest_metrics.update(evaluate(engine, valid_rows, rank, world, plan.micro, tokenizer.pad_token_id))
            row.update(latest_metrics)
        if metrics:
            metrics.log(row)
        eta = (plan.total_steps - done) * elapsed
        if done % t.checkpoint_every == 0 or done == plan.total_steps:
            if metrics:
                metrics.flush()
                if is_s3(out):
                    upload_tree(metrics.folder, out, storage)  # metrics travel with their checkpoint
            latest_ckpt = checkpoint.save(engine, out, storage, scratch, done, {"step": done}, t.keep_checkpoints)
            report(done, "training", tokens_per_s, eta, force=True)
        else:
            report(done, "training", tokens_per_s, eta, force="valid_loss" in row)

    # --- export and evaluate -----------------------------------------------------------------
    report(plan.total_steps, "exporting", tokens_per_s, 0, force=True)
    export_model(engine, job, tokenizer, source, dtype, scratch)
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return
    plot = metrics.plot()
    metrics.close()
    if is_s3(out):
        upload_tree(metrics.folder, out, storage)
    log(f"[train] done: model {join(out, 'model')}, metrics {join(out, 'metrics.csv')}, "
        f"loss curve {join(out, plot.name)}")
    if spec.evaluation.samples:  # rank 0 alone, after the gang has let go of its accelerators
        from kubetune.evaluate.run import evaluate_job, summary

        report(plan.total_steps, "evaluating", tokens_per_s, None, force=True)
        latest_metrics["evaluation"] = summary(evaluate_job(job, log))
    report(plan.total_steps, "done", tokens_per_s, 0, force=True)
