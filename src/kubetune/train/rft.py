"""Reinforcement fine-tuning (``training.objective: rft``): the training loop of GRPO, launched by torchrun like
the supervised recipe (``kubetune.train.recipe``), whose set-up pieces, checkpoints and bookkeeping it shares.

Each step takes the global batch of prompts the plan gives it (seeded, so a resumed run sees the same
prompts), and on each rank, for its share: samples ``samplesPerPrompt`` answers per prompt from the current
policy, grades them, turns the rewards into group-relative advantages, then runs the GRPO loss
(``kubetune.train.grpo``) micro batch by micro batch with gradient accumulation, one optimizer step. A
prompt's whole group stays on one rank, so advantages need no communication. Sampling is seeded by seed,
step and rank.

The reference model for the KL term is the base model: with LoRA the policy with its adapter off (as for DPO);
with a full fine-tune a frozen copy of the base weights on each rank (unpartitioned, also under ZeRO-3:
memory for one more model). ``klCoef: 0`` needs none.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from kubetune.data.prompt_shards import load_prompts
from kubetune.models import build_model, load_model, resolve_source
from kubetune.packed import attention, head
from kubetune.packed.rows import Rows, collate
from kubetune.spec import FineTuneJob
from kubetune.train import batching, grpo, sampling
from kubetune.train.bookkeeping import Bookkeeper, sub_grader_names
from kubetune.train.distributed import Preemption
from kubetune.train.export import export_model
from kubetune.train.plan import BatchPlan, fingerprint, make_plan, rank_micro_batches, step_rows
from kubetune.train.recipe import (check_finite, check_objective, cost, deepspeed_config, end_step, fetch_prepared,
                                   finish, load_and_announce, set_checkpointing, start_ranks,
                                   warmup_cosine)

# Step totals, summed over ranks, in this order (then one per sub-grader, then the SIGTERM flag).
FIELDS = ("loss", "tokens", "kl", "clipped", "reward", "reward_sq", "samples", "all_tokens")


@dataclass
class RftRun:
    job: FineTuneJob
    engine: object
    scheduler: object
    tokenizer: object
    train: list[dict]  # prompts: messages, item, prompt_ids
    valid: list[dict]
    plan: BatchPlan  # its rows are prompts
    source: str | None
    dtype: torch.dtype
    on_gpu: bool
    scratch: Path
    rank: int
    world: int
    reference: object | None  # a frozen base model (full), "adapter" (LoRA) or None (klCoef 0)

    @property
    def synced(self) -> bool:
        return self.job.spec.training.zero_stage == 3 and self.world > 1

    def describe(self) -> str:
        t, r, plan = self.job.spec.training, self.job.spec.training.rft, self.plan
        return (f"[train] {self.world} process(es) on {'GPU' if self.on_gpu else 'CPU'} ({self.dtype}), "
                f"ZeRO-{t.zero_stage}, {t.method}, RFT (GRPO: {r.samples_per_prompt} samples per prompt, "
                f"klCoef {r.kl_coef}, grader {r.grader.type} {r.grader.name!r}); {plan.global_batch} prompts a step "
                f"= {plan.micro} micro x {plan.accum} accumulation x {self.world}; {plan.total_steps} steps "
                f"({plan.steps_per_epoch} per epoch)")


def setup(job: FineTuneJob) -> RftRun:
    import deepspeed
    from transformers import AutoTokenizer

    t = job.spec.training
    rank, world, on_gpu, bf16, dtype, device, scratch = start_ranks(job)
    prepared = fetch_prepared(job, scratch)
    check_objective(prepared, "rft")
    tokenizer = AutoTokenizer.from_pretrained(prepared / "tokenizer")
    train, valid = (load_prompts(prepared / "prepared" / f"{s}.jsonl") for s in ("train", "validation"))
    micro = t.micro_batch_size if isinstance(t.micro_batch_size, int) else batching.CPU_MICRO
    plan = make_plan(len(train), t.global_batch_size, micro, world, t.epochs, t.max_steps)
    source = None if job.spec.model.from_config else resolve_source(job, scratch / "base-model")
    model = build_model(job, tokenizer, source, dtype, device)
    head.install(model)
    set_checkpointing(model, bool(t.gradient_checkpointing))
    reference = base_reference(job, tokenizer, source, dtype, device) if t.rft.kl_coef else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(plan.total_steps, t.warmup_ratio))
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=deepspeed_config(job, plan, bf16))
    return RftRun(job, engine, scheduler, tokenizer, train, valid, plan, source, dtype, on_gpu, scratch, rank,
                  world, reference)


def base_reference(job: FineTuneJob, tokenizer, source: str | None, dtype, device):
    """LoRA: "adapter" (the policy with its adapter off). Full: the base model loaded again, frozen: built
    before any checkpoint is loaded, from the same source (or seed, for fromConfig) as the policy."""
    if job.spec.training.method == "lora":
        return "adapter"
    ref = load_model(job, tokenizer, source=source, dtype=dtype, device=device)
    ref.set_attn_implementation(attention.register())
    ref.config.use_cache = False
    ref.requires_grad_(False)
    head.install(ref)
    return ref.eval()


def reference_logps(run: RftRun, batch, temperature: float) -> torch.Tensor | None:
    if run.reference is None:
        return None
    with torch.no_grad():
        if run.reference == "adapter":
            peft_model = run.engine.module
            with peft_model.disable_adapter():
                return grpo.completion_logps(peft_model, batch, temperature)
        return grpo.completion_logps(run.reference, batch, temperature)


@dataclass
class Group:
    """A micro batch's prompts with their sampled answers, advantages and grades."""

    rows: Rows
    advantages: torch.Tensor  # one per sample
    rewards: list[float]
    sub_rewards: list[dict]
    completion_tokens: int


def sample_micro_batch(run: RftRun, idx: np.ndarray) -> Group:
    r = run.job.spec.training.rft
    prompts = [run.train[int(i)]["prompt_ids"] for i in idx]
    completions = sampling.sample(run.engine, prompts, r.samples_per_prompt, r.max_new_tokens, r.temperature,
                                  run.tokenizer.pad_token_id, run.tokenizer.eos_token_id, run.synced)
    items = [run.train[int(i)]["item"] for i in idx for _ in range(r.samples_per_prompt)]
    rewards, subs = sampling.grades(r, run.tokenizer, completions, items)
    repeated = [p for p in prompts for _ in range(r.samples_per_prompt)]
    advantages = grpo.group_advantages(torch.tensor(rewards), r.samples_per_prompt)
    return Group(grpo.completion_rows(repeated, completions), advantages, rewards, subs,
                 sum(len(c) for c in completions))


def rft_step(run: RftRun, prompt_rows: np.ndarray, preemption: Preemption) -> tuple[dict, bool]:
    """One optimizer step on the global batch of prompts ``prompt_rows``: sample, grade, then the GRPO loss over
    every completion token of the global batch (their count reduced over ranks first)."""
    engine, plan, r = run.engine, run.plan, run.job.spec.training.rft
    groups = [sample_micro_batch(run, idx) for idx in rank_micro_batches(prompt_rows, plan, run.rank)]
    names = sub_grader_names(run.job.spec.training)
    stats = torch.zeros(len(FIELDS) + len(names) + 1, dtype=torch.float64)
    tokens = torch.tensor([float(sum(g.completion_tokens for g in groups))], dtype=torch.float64, device=engine.device)
    dist.all_reduce(tokens)  # the loss is a mean over the global batch's completion tokens
    total = max(tokens.item(), 1.0)
    for g in groups:
        batch = collate(g.rows, range(len(g.rows)), run.tokenizer.pad_token_id).to(engine.device)
        ref = reference_logps(run, batch, r.temperature)
        logp = grpo.completion_logps(engine, batch, r.temperature)
        # One update per sampled batch: the sampling policy is the current one, so its log-probabilities are
        # these, detached (the ratio is 1 with the gradient of logp, as in TRL with num_iterations 1).
        losses, kl, clipped = grpo.token_losses(logp, logp.detach(), ref, g.advantages.to(logp.device)[batch.doc],
                                                r.clip_epsilon, r.kl_coef)
        engine.backward(losses.sum() / total * plan.accum * run.world)  # DeepSpeed divides by both: undone
        engine.step()
        rewards = torch.tensor(g.rewards, dtype=torch.float64)
        stats[: len(FIELDS)] += torch.tensor([losses.detach().sum().item(), len(logp), kl.sum().item(),
                                              clipped.sum().item(), rewards.sum().item(), (rewards ** 2).sum().item(),
                                              len(g.rewards), int(g.rows.lengths.sum())], dtype=torch.float64)
        for k, name in enumerate(names):
            stats[len(FIELDS) + k] += sum(s.get(name, 0.0) for s in g.sub_rewards)
    stats[-1] = float(preemption.requested)
    stats = stats.to(engine.device)
    dist.all_reduce(stats)
    stats = stats.cpu()
    return step_metrics(stats[:-1].tolist(), names), stats[-1].item() > 0


def step_metrics(totals: list[float], names: tuple[str, ...]) -> dict:
    t = dict(zip(FIELDS, totals))
    samples, tokens = max(t["samples"], 1), max(t["tokens"], 1)
    mean = t["reward"] / samples
    return {"train_loss": t["loss"] / tokens, "reward_mean": mean,
            "reward_std": math.sqrt(max(t["reward_sq"] / samples - mean * mean, 0.0)), "kl": t["kl"] / tokens,
            "completion_length": t["tokens"] / samples, "clip_ratio": t["clipped"] / tokens,
            "samples": t["samples"], "all_tokens": t["all_tokens"],
            **{f"reward_{n}": v / samples for n, v in zip(names, totals[len(FIELDS):])}}


def validate(run: RftRun, prompts: list[dict] | None = None) -> dict:
    """valid_reward: the mean grade of greedy answers to the held-out prompts (each rank a slice; every rank
    runs as many generation batches, for ZeRO-3)."""
    prompts = run.valid if prompts is None else prompts
    r, micro = run.job.spec.training.rft, run.plan.micro
    mine = prompts[run.rank :: run.world]
    batches = math.ceil(math.ceil(len(prompts) / run.world) / micro)
    total = torch.zeros(2, dtype=torch.float64)
    for b in range(batches):
        chunk = mine[b * micro : (b + 1) * micro]
        given = chunk or prompts[:1]  # a batch to run and discard: the ranks stay in step
        done = sampling.sample(run.engine, [p["prompt_ids"] for p in given], 1, r.max_new_tokens, None,
                               run.tokenizer.pad_token_id, run.tokenizer.eos_token_id, run.synced)
        if chunk:
            rewards, _ = sampling.grades(r, run.tokenizer, done, [p["item"] for p in chunk])
            total += torch.tensor([sum(rewards), len(rewards)], dtype=torch.float64)
    total = total.to(run.engine.device)
    dist.all_reduce(total)
    return {"valid_reward": total[0].item() / max(total[1].item(), 1)}


def train(job_file: str) -> None:
    """Every rank: set up, resume if a checkpoint is there, sample-grade-update step by step, export."""
    job, began = load_and_announce(job_file)
    t = job.spec.training
    run = setup(job)
    engine, plan = run.engine, run.plan
    export = partial(export_model, engine, job, run.tokenizer, run.source, run.dtype, run.scratch)
    book = Bookkeeper(job, plan, run.scratch, run.rank, export, cost(run, began),
                      {"globalBatchSize": plan.global_batch, "microBatchSize": plan.micro})
    start = book.resume(engine)
    book.log(run.describe())
    engine.train()
    timer, tokens_per_s, preemption = time.monotonic(), 0.0, Preemption()
    for step in range(start, book.total_steps):
        torch.manual_seed((t.seed * 1_000_003 + step) * 1009 + run.rank)  # samples depend on the step, not history
        rows = step_rows(plan, t.seed, step)
        metrics, stop = rft_step(run, rows, preemption)
        done = step + 1
        check_finite(metrics, done, book)
        elapsed, timer = time.monotonic() - timer, time.monotonic()
        tokens_per_s = metrics.pop("all_tokens") / elapsed  # prompts and answers, as the model processed them
        metrics["samples_per_second"] = round(metrics.pop("samples") / elapsed, 2)
        row = {"step": done, "epoch": round(done / plan.steps_per_epoch, 3), **metrics,
               "learning_rate": run.scheduler.get_last_lr()[0], "tokens_per_second": round(tokens_per_s, 1),
               "batch": fingerprint(rows)}
        if end_step(book, engine, done, row, metrics, tokens_per_s, (plan.total_steps - done) * elapsed, stop,
                    lambda: validate(run)):
            break
    finish(book, run.rank, export, job.spec.output.uri, tokens_per_s)
