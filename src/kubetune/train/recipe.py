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
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from kubetune.models import build_model, resolve_source
from kubetune.packed import attention, head
from kubetune.packed.head import validation_totals
from kubetune.packed.rows import Batch, Collator, Rows, load_rows, validation_metrics
from kubetune.spec import FineTuneJob, load_job
from kubetune.storage import Mirror
from kubetune.train import batching, dpo, extensions
from kubetune.train.bookkeeping import Bookkeeper, Cost
from kubetune.errors import EXIT_DIVERGED, EXIT_STOPPED, KubetuneError, Transient
from kubetune.train.flops import Shape, shape_of
from kubetune.train.distributed import Preemption, is_node_leader
from kubetune.train.export import export_model
from kubetune.train.progress import report_start
from kubetune.train.plan import BatchPlan, fingerprint, make_plan, rank_micro_batches, step_rows


class TrainingDiverged(KubetuneError):
    """The loss is NaN or infinite: the weights are spoiled, so stop before they are saved."""

    exit_code = EXIT_DIVERGED


class Preempted(Transient):
    """Stopped on SIGTERM after checkpointing the last finished step: the pod that follows resumes there. Its
    exit code is not a failure to the Job (podFailurePolicy), whoever sent it: Kueue suspending the Job deletes
    its pods without marking them disrupted."""

    exit_code = EXIT_STOPPED


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

    def micro_loss(self, engine, batch: Batch, label_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This micro batch's share of the step's loss, and its totals, kept on the device (no host sync)."""
        loss_sum, correct, count = head.forward_loss(engine, batch)
        return loss_sum / label_tokens, torch.stack([loss_sum.detach().double(), correct.double(), count.double()])

    def step_metrics(self, totals: torch.Tensor) -> dict:
        loss, correct, count = totals.tolist()
        return {"train_loss": loss / max(count, 1), "train_accuracy": correct / max(count, 1)}

    def totals(self, model, rows: Rows, idx: list[int], micro: int, collator: Collator, device) -> torch.Tensor:
        return validation_totals(model, rows, idx, micro, collator, device)

    def metrics(self, totals: torch.Tensor) -> dict:
        return validation_metrics(totals)


def evaluate(run: Run) -> dict:
    """Validation metrics (the objective's); each rank takes a slice of the rows, the totals are summed."""
    engine, rows = run.engine, run.valid_rows
    engine.eval()
    totals = run.objective.totals(engine, rows, list(range(run.rank, len(rows), run.world)), run.plan.micro,
                                  run.validation_collator, engine.device).to(engine.device)
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
    collator: Collator  # training micro batches
    validation_collator: Collator
    shape: Shape  # what the FLOPs of a step depend on
    gradient_checkpointing: bool
    compiled: bool

    def describe(self) -> str:
        t, plan = self.job.spec.training, self.plan
        extras = [name for name, on in (("gradient checkpointing", self.gradient_checkpointing),
                                        ("compiled blocks", self.compiled),
                                        ("fused loss", head.head_of(self.engine) is not None)) if on]
        return (f"[train] {self.world} process(es) on {'GPU' if self.on_gpu else 'CPU'} ({self.dtype}), "
                f"ZeRO-{t.zero_stage}, {t.method}" + (f", DPO (beta {t.dpo.beta})" if t.objective == "dpo" else "")
                + f"; global batch {plan.global_batch}" + (" (auto)" if t.global_batch_size == "auto" else "")
                + f" = {plan.micro} micro"
                + (" (auto)" if t.micro_batch_size == "auto" else "") + f" x {plan.accum} accumulation x "
                f"{self.world}; {plan.total_steps} steps ({plan.steps_per_epoch} per epoch)"
                + (f"; {', '.join(extras)}" if extras else ""))

    def step_flops(self, rows: np.ndarray) -> float:
        """Model FLOPs of a global batch (``kubetune.train.flops``)."""
        r = self.train_rows
        return self.shape.step_flops(r.tokens(rows), r.label_tokens(rows), int(r.squared[rows].sum()))

    def micro_batches(self, start: int) -> Iterator[Batch]:
        """This rank's micro batches from step ``start`` on, in order, collated ahead on a thread; pinned on GPUs."""
        t = self.job.spec.training

        def collated():
            for step in range(start, self.plan.total_steps):
                for micro_rows in rank_micro_batches(step_rows(self.plan, t.seed, step), self.plan, self.rank):
                    batch = self.collator(self.train_rows, micro_rows)
                    yield batch.pin() if self.on_gpu else batch

        return batching.prefetch(collated())


def start_ranks(job: FineTuneJob) -> tuple:
    """Every rank's start: the ops built, the process group joined; (rank, world, on_gpu, bf16, dtype, device,
    scratch folder)."""
    import deepspeed

    extensions.build_ops()  # first, under a lock a killed run cannot leave stuck (see extensions)
    deepspeed.init_distributed()  # nccl on GPUs, gloo on DeepSpeed's CPU accelerator
    rank, world = dist.get_rank(), dist.get_world_size()
    on_gpu = deepspeed.get_accelerator().device_name() == "cuda"
    bf16 = on_gpu and torch.cuda.is_bf16_supported()
    device = torch.device(deepspeed.get_accelerator().current_device_name())
    scratch = Path(os.environ.get("KUBETUNE_SCRATCH") or tempfile.gettempdir()) / f"kubetune-{job.metadata.name}"
    scratch.mkdir(parents=True, exist_ok=True)
    return rank, world, on_gpu, bf16, torch.bfloat16 if bf16 else torch.float32, device, scratch


def setup(job: FineTuneJob) -> Run:
    import deepspeed
    from transformers import AutoTokenizer

    spec, t = job.spec, job.spec.training
    rank, world, on_gpu, bf16, dtype, device, scratch = start_ranks(job)
    prepared = fetch_prepared(job, scratch)
    tokenizer = AutoTokenizer.from_pretrained(prepared / "tokenizer")
    check_objective(prepared, t.objective)
    train_rows, valid_rows = load_rows(prepared, "train"), load_rows(prepared, "validation")
    per_rank_cap = t.micro_batch_size if isinstance(t.micro_batch_size, int) else len(train_rows)
    plan = make_plan(len(train_rows), t.global_batch_size, per_rank_cap, world, t.epochs, t.max_steps)
    source = None if spec.model.from_config else resolve_source(job, scratch / "base-model")
    model = build_model(job, tokenizer, source, dtype, device)
    head.install(model)
    # The fused attention kernel takes one BlockMask per micro batch and every row padded to one length, so
    # compiled blocks see one shape; the per-document loop (CPU) pads to each batch's longest row.
    fused = on_gpu and attention.kernel_for(torch.empty(0, device=device), model.config.attention_dropout) == "flex"
    length = max(train_rows.fixed_length(), valid_rows.fixed_length()) if fused else None
    collator = Collator(tokenizer.pad_token_id, length, None, fused)
    plan, checkpointing = fit_micro_batch(job, model, plan, collator, train_rows, world, on_gpu)
    compiled = compile_blocks(model, t.compile, fused, t.zero_stage) and compiled_shape_runs(
        job, model, plan, collator, train_rows, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay, betas=(0.9, 0.95),
                                  fused=on_gpu and not t.offload)  # one kernel for all parameters
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(plan.total_steps, t.warmup_ratio))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(job, plan, bf16))
    validation_collator = Collator(tokenizer.pad_token_id, length, plan.micro if compiled else None, fused)
    objective = Sft()
    if t.objective == "dpo":  # here, before a checkpoint is loaded: the engine holds the base model's weights
        reference = dpo.reference_for(t.method, engine, train_rows, valid_rows, plan.micro, validation_collator)
        objective = dpo.Dpo(t.dpo.beta, t.dpo.sft_weight, reference)
    return Run(job, engine, scheduler, tokenizer, train_rows, valid_rows, plan, source, dtype, on_gpu, scratch,
               rank, world, objective, collator, validation_collator, shape_of(engine), checkpointing, compiled)


def fit_micro_batch(job: FineTuneJob, model, plan: BatchPlan, collator: Collator, rows: Rows, world: int,
                    on_gpu: bool) -> tuple[BatchPlan, bool]:
    """The micro batch (``training.microBatchSize``: a number, or auto) and whether gradient checkpointing is on
    (``training.gradientCheckpointing``: true, false, or auto: only when one row does not fit without it). On
    GPUs the longest rows are run forward and backward (``batching.probe``); a fixed micro batch is tried as it
    is, so one that does not fit says so at start-up. Every rank ends with the same answer."""
    t = job.spec.training
    auto = t.micro_batch_size == "auto"
    if not on_gpu:  # no out-of-memory to catch: the kernel kills the process
        micro = batching.divisor_at_most(plan.per_rank, batching.CPU_MICRO) if auto else plan.micro
        set_checkpointing(model, bool(t.gradient_checkpointing))
        return make_plan(plan.rows, plan.global_batch, micro, world, t.epochs, t.max_steps), bool(t.gradient_checkpointing)
    micro = None
    for checkpointing in [t.gradient_checkpointing] if t.gradient_checkpointing is not None else [False, True]:
        set_checkpointing(model, checkpointing)
        micro = _probe(job, model, collator, rows, world, plan.per_rank if auto else plan.micro, halve=auto)
        if micro:
            break
    micro = _agree(micro or 0, model)
    if not micro:
        raise batching.DoesNotFit(
            (f"one row of {collator.length} tokens does not fit in GPU memory" if auto else
             f"training.microBatchSize {plan.micro} rows of {collator.length} tokens do not fit in GPU memory")
            + ("" if checkpointing else " even with gradient checkpointing")
            + "; try " + ("" if auto else "microBatchSize: auto, ") + "method: lora, zeroStage: 3, offload: true, "
            "more GPUs or a lower preprocessing.maxSeqLength")
    if auto and dist.get_rank() == 0:
        print(f"[train] micro batch {micro} (auto: the largest of {plan.per_rank} rows per rank that fits)"
              + (", with gradient checkpointing" if checkpointing else ""))
    return make_plan(plan.rows, plan.global_batch, micro, world, t.epochs, t.max_steps), checkpointing


def compiled_shape_runs(job: FineTuneJob, model, plan: BatchPlan, collator: Collator, rows: Rows, world: int) -> bool:
    """Compile the blocks for the shape training uses, by one forward and backward pass of it, so the first step
    does not compile and a compiler that fails (or needs more memory) is found now: the blocks then run eagerly,
    said in one line. Every rank ends with the same answer."""
    began = time.monotonic()
    try:
        ok = _probe(job, model, collator, rows, world, plan.micro, halve=False) is not None
        why = "out of GPU memory at that micro batch"
    except Exception as e:  # noqa: BLE001 - out of memory is the probe's; anything else here is the compiler's
        ok, why = False, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    if _agree(int(ok), model):
        if dist.get_rank() == 0:
            print(f"[train] compiled the decoder blocks for {plan.micro} x {collator.length} tokens in "
                  f"{time.monotonic() - began:.0f} s")
        return True
    if dist.get_rank() == 0:
        print(f"[train] torch.compile failed, the blocks run uncompiled: {why if not ok else 'on another rank'}")
    return uncompile_blocks(model)


def _probe(job: FineTuneJob, model, collator: Collator, rows: Rows, world: int, micro: int, halve: bool):
    t = job.spec.training
    device = next(model.parameters()).device
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    reserve = batching.model_state_bytes(trainable, t.zero_stage, world, t.offload) if halve else 0
    longest = np.argsort(-rows.lengths, kind="stable")
    log = print if dist.get_rank() == 0 else (lambda _: None)
    return batching.probe(model, lambda m: collator(rows, longest[:m]).to(device),
                          lambda mod, b: head.forward_loss(mod, b)[0], micro, reserve, log, halve=halve)


def _agree(value: int, model) -> int:
    """The smallest of every rank's ``value``."""
    agreed = torch.tensor([value], device=next(model.parameters()).device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return int(agreed.item())


def set_checkpointing(model, on: bool) -> None:
    base = head.unwrap(model)
    if on and not base.is_gradient_checkpointing:
        base.gradient_checkpointing_enable()
        if base is not model:  # LoRA: the frozen embeddings' output must carry gradients into checkpointed blocks
            base.enable_input_require_grads()
    elif not on and base.is_gradient_checkpointing:
        base.gradient_checkpointing_disable()


def compile_blocks(model, wanted: bool | None, fused: bool, zero_stage: int) -> bool:
    """torch.compile each decoder block in place, as torchtitan does (``training.compile``; absent: with the fused
    kernel and ZeRO 0-2). The blocks share one compiled graph; state dict keys do not change."""
    if wanted is False or not fused or (wanted is None and zero_stage == 3):
        if wanted and not fused:
            print("[train] training.compile: compiling needs the fused attention kernel (GPUs); not compiled")
        return False
    blocks = decoder_blocks(model)
    if blocks is None:
        print("[train] training.compile: this architecture's decoder blocks were not found; not compiled")
        return False
    import torch._dynamo

    # The probe tries a few micro batch sizes (each its own shape) and validation may have its own: room for them
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for block in blocks:
        block.compile(dynamic=False)
    return True


def uncompile_blocks(model) -> bool:
    for block in decoder_blocks(model) or []:
        block._compiled_call_impl = None  # what nn.Module.compile set: its eager forward again
    return False


def decoder_blocks(model):
    return getattr(getattr(head.unwrap(model), "model", None), "layers", None)


def check_objective(prepared: Path, objective: str) -> None:
    """Preference pairs and conversations are prepared differently: the data must be prepared for this objective."""
    found = json.loads((prepared / "prepared" / "meta.json").read_text()).get("objective", "sft")
    if found != objective:
        raise KubetuneError(f"the prepared data is for training.objective {found}, but the job's is {objective}; "
                            "prepare the data again (kubetune prepare)")


def train_step(run: Run, rows: np.ndarray, micro_batches: Iterator[Batch], preemption: Preemption) -> tuple[dict, bool]:
    """One optimizer step on the global batch ``rows`` (this rank's ``plan.accum`` micro batches of it are the next
    of ``micro_batches``): loss and accuracy over all its trained tokens, and whether any rank got SIGTERM by
    the step's end (reduced with them: no collective of its own). The host reads the device once, at the end."""
    engine, plan, objective = run.engine, run.plan, run.objective
    norm = objective.normalizer(run.train_rows, rows)  # what the global batch's loss is a mean over
    stats = torch.zeros(objective.width + 1, dtype=torch.float64, device=engine.device)
    for _ in range(plan.accum):
        batch = next(micro_batches).to(engine.device)
        loss, micro_stats = objective.micro_loss(engine, batch, norm)
        # DeepSpeed divides by accumulation steps and averages over ranks; undo both, so the
        # step's loss is the mean over the whole global batch (every trained token; for DPO every pair).
        engine.backward(loss * plan.accum * run.world)
        engine.step()
        stats[:-1] += micro_stats
    stats[-1:].fill_(float(preemption.requested))  # a kernel argument; `stats[-1] = x` copies from the host and waits
    dist.all_reduce(stats)
    stats = stats.cpu()
    return objective.step_metrics(stats[:-1]), stats[-1].item() > 0


def cost(run: Run, began: float) -> Cost:
    """GPU-hours and MFU bookkeeping: GPUs and their model."""
    gpus = run.world if run.on_gpu else 0
    return Cost(gpus, torch.cuda.get_device_name() if run.on_gpu else None, began)


def load_and_announce(job_file: str) -> tuple[FineTuneJob, float]:
    """The job, its "starting" record written by rank 0, and when it began (GPU-hours count set-up too)."""
    began = time.monotonic()
    job = load_job(job_file)
    if int(os.environ.get("RANK", "0")) == 0:
        report_start(job.spec.output.uri, job.spec.storage)
    return job, began


def train(job_file: str) -> None:
    """Every rank: set up, resume if a checkpoint is there, train step by step, export."""
    job, began = load_and_announce(job_file)
    t = job.spec.training
    run = setup(job)
    engine, plan = run.engine, run.plan
    export = partial(export_model, engine, job, run.tokenizer, run.source, run.dtype, run.scratch)  # export(dest)
    book = Bookkeeper(job, plan, run.scratch, run.rank, export, cost(run, began),
                      {"globalBatchSize": plan.global_batch, "microBatchSize": plan.micro, "gradientCheckpointing": run.gradient_checkpointing,
                       "compiled": run.compiled})
    start = book.resume(engine)
    book.log(run.describe())

    engine.train()
    timer, tokens_per_s, preemption = time.monotonic(), 0.0, Preemption()
    micro_batches, first = run.micro_batches(start), None
    for step in range(start, book.total_steps):  # none left when the resumed run had stopped early
        torch.manual_seed(t.seed * 1_000_003 + step)  # dropout depends on the step, not on history
        rows = step_rows(plan, t.seed, step)
        metrics, stop = train_step(run, rows, micro_batches, preemption)
        done = step + 1
        check_finite(metrics, done, book)
        elapsed, timer = time.monotonic() - timer, time.monotonic()
        tokens_per_s = run.train_rows.tokens(rows) / elapsed
        book.cost.observe(run.step_flops(rows), run.train_rows.tokens(rows))
        if first is None:  # the first step warms up (lazy allocations, kernel tuning): its time would be a wrong ETA
            first = elapsed
        elif done == start + 2:
            book.log(f"[train] first step {first:.1f} s, then {elapsed:.2f} s a step")
        row = {"step": done, "epoch": round(done / plan.steps_per_epoch, 3), **metrics,
               "learning_rate": run.scheduler.get_last_lr()[0], "tokens_per_second": round(tokens_per_s, 1),
               "batch": fingerprint(rows)}
        eta = None if done == start + 1 and done < plan.total_steps else (plan.total_steps - done) * elapsed
        if end_step(book, engine, done, row, metrics, tokens_per_s, eta, stop, lambda: evaluate(run)):
            break
    finish(book, run.rank, export, job.spec.output.uri, tokens_per_s)


def check_finite(metrics: dict, done: int, book: Bookkeeper) -> None:
    """Every rank sees the same reduced loss: all stop here on a NaN or an infinity."""
    if not math.isfinite(metrics["train_loss"]):
        raise TrainingDiverged(
            f"the training loss became {metrics['train_loss']} at step {done}; nothing of that step was saved "
            f"(the last complete checkpoint is {book.latest_ckpt or 'none'}); try a lower training.learningRate")


def end_step(book: Bookkeeper, engine, done: int, row: dict, metrics: dict, tokens_per_s: float, eta: float | None,
             stop: bool, validate: Callable[[], dict]) -> bool:
    """After step ``done``: validation when due, the record, a SIGTERM's checkpoint (then Preempted). True when
    training stops early (every rank got rank 0's decision, and the checkpoint is written)."""
    t = book.job.spec.training
    if done % t.eval_every == 0 or book.due(done):  # each checkpoint's marker keeps its validation metrics
        metrics.update(validate())
        row.update(metrics)
    book.after_step(engine, row, metrics, tokens_per_s, eta=eta)
    if book.stopped_at:
        return True
    if stop and done < book.plan.total_steps:
        book.checkpoint(engine, done, tokens_per_s, eta=eta)
        raise Preempted(f"stopped by SIGTERM after step {done}, with a complete checkpoint of it; "
                        "the next attempt resumes there")
    return False


def finish(book: Bookkeeper, rank: int, export: Callable[[str], None], uri: str, tokens_per_s: float) -> None:
    """The trained model exported, the ranks parted, the record closed."""
    book.report(book.total_steps, "exporting", tokens_per_s, 0, force=True)
    export(uri)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        book.close(tokens_per_s)
