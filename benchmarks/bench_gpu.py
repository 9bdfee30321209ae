"""GPU throughput of kubetune's own training step, against transformers' packed path on the same rows.

    torchrun --nproc-per-node=1 --standalone benchmarks/bench_gpu.py [--preset 1b] [--method full|lora]
        [--seq 2048] [--global-batch 32] [--steps 5] [--warmup 2] [--micro N] [--sync-check 2]
    ... bench_gpu.py --mode transformers --micro N [same options]   # the baseline, same rows, same micro batch
    ... bench_gpu.py --mode loss-memory [--loss-shapes 1b:2048:8 8b:4096:2]
    ... bench_gpu.py --device-smoke                                 # all of it on CPU, tiny, in seconds

What is measured is the product, not a copy of it: a synthetic *prepared* folder is written the way
``kubetune prepare`` writes one (parquet rows packed by ``kubetune.data.tokenize.pack``, a tokenizer of
exactly the vocabulary size, meta.json), a FineTuneJob is parsed with ``kubetune.spec.parse_job``, and
``kubetune.train.recipe.setup`` builds the run as the trainer does (micro batch: the product's default
unless ``--micro``); then ``recipe.train_step`` is timed. ``recipe.train`` is not called: it would
checkpoint and export the model.

The baseline (``--mode transformers``) is what a user of transformers would run: a plain
``LlamaForCausalLM`` with sdpa attention, packed rows whose ``position_ids`` restart at each document
(transformers then builds a block-diagonal mask itself), the model's own loss from ``labels``, PEFT LoRA,
DeepSpeed ZeRO-2 with the same settings as the product (``recipe.deepspeed_config``) and a fused AdamW,
each micro batch padded to its longest row.

Both count the same model FLOPs (``kubetune.train.flops``: real tokens, labeled positions for the output
layer, sum of squared document lengths for attention), so their tokens/s ratio is their speed ratio.
Each configuration prints one ``RESULT {json}`` line; ``benchmarks/gpu_check.sh`` collects them.
"""

from __future__ import annotations

import argparse
import gc
import json
import linecache
import os
import signal
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

VOCAB = {"1b": 32000, "3b": 128256, "8b": 128256}  # TinyLlama's and Llama 3's vocabularies; smaller presets: 2048
GIB = 2**30


# ---------------------------------------------------------------------------------------------------------------
# The synthetic prepared folder


def synthetic_tokenizer(vocab: int):
    """A tokenizer with exactly ``vocab`` entries (the trainer sizes a fromConfig model's embeddings from
    ``len(tokenizer)``), kubetune's special tokens and chat template. Its words are never used: the rows are
    token ids already."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kubetune.models import CHATML_TEMPLATE, SPECIAL_TOKENS

    words = SPECIAL_TOKENS + [f"w{i}" for i in range(vocab - len(SPECIAL_TOKENS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    assert len(fast) == vocab, (len(fast), vocab)
    return fast


def synthetic_rows(n_rows: int, seq: int, vocab: int, seed: int):
    """Packed rows like a real preparation makes: conversation lengths from a skewed (lognormal) distribution,
    median about 300 tokens, clipped to [32, seq], packed best-fit decreasing by the product's own ``pack``, so
    rows differ in length and in number of documents. Labels as in chat data: the first ~40 % of each document
    (the prompt, at least its first token) is IGNORE, the rest (the assistant's reply) is the input."""
    from kubetune.data.tokenize import pack
    from kubetune.packed import IGNORE

    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    bins: list[list[int]] = []
    while len(bins) < n_rows:  # draw documents until they fill enough rows
        more = max(64, (n_rows - len(bins)) * seq // 300)
        lengths += np.clip(rng.lognormal(np.log(300), 1.0, more), 32, seq).astype(int).tolist()
        bins = pack(lengths, capacity=seq)
    chosen = sorted(rng.choice(len(bins), n_rows, replace=False))  # the last rows packed are the emptiest: mix
    input_ids, labels, doc_lens = [], [], []
    for b in chosen:
        docs = [lengths[i] for i in bins[b]]
        ids = rng.integers(0, vocab, sum(docs))
        lab = ids.copy()
        start = 0
        for n in docs:
            lab[start : start + max(1, round(0.4 * n))] = IGNORE
            start += n
        input_ids.append(ids)
        labels.append(lab)
        doc_lens.append(np.array(docs))
    return input_ids, labels, doc_lens


def write_shard(path: Path, input_ids, labels, doc_lens) -> None:
    """One parquet shard with the columns and types of ``kubetune.data.shards`` (lists of int32)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def column(parts):
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(parts).astype(np.int32)))

    pq.write_table(pa.table({"input_ids": column(input_ids), "labels": column(labels), "doc_lens": column(doc_lens)}),
                   path)


def write_prepared(out: Path, seq: int, vocab: int, train_rows: int, valid_rows: int, seed: int) -> None:
    """OUT/prepared/{meta.json, train-00000.parquet, validation-00000.parquet} and OUT/tokenizer/, as
    ``kubetune prepare`` leaves them (``load_rows`` reads ``OUT / file`` for each file listed in meta.json).
    Written once per set of parameters: the baseline's process finds the product's rows."""
    meta_file = out / "prepared" / "meta.json"
    if meta_file.exists():
        return
    (out / "prepared").mkdir(parents=True, exist_ok=True)
    meta = {"max_seq_length": seq, "packing": True, "tokenizer": "tokenizer", "vocab_size": vocab, "objective": "sft"}
    for split, n, split_seed in (("train", train_rows, seed), ("validation", valid_rows, seed + 1)):
        write_shard(out / "prepared" / f"{split}-00000.parquet", *synthetic_rows(n, seq, vocab, split_seed))
        meta[split] = {"rows": n, "files": [f"prepared/{split}-00000.parquet"]}
    synthetic_tokenizer(vocab).save_pretrained(out / "tokenizer")
    meta_file.write_text(json.dumps(meta, indent=2))  # last: its presence means the folder is complete


def make_job(args, out: Path):
    """The FineTuneJob the product trains, parsed by the product. dataset.train is never read (the rows are
    prepared already); microBatchSize is left out, so the product's default (auto) applies, unless --micro."""
    from kubetune.spec import parse_job

    training = {"method": args.method, "globalBatchSize": args.global_batch, "maxSteps": total_steps(args),
                "evalEvery": 10**6, "checkpointEvery": 10**6, "zeroStage": 2, "seed": args.seed}
    if args.micro:
        training["microBatchSize"] = args.micro
    if args.gradient_checkpointing:
        training["gradientCheckpointing"] = True
    return parse_job({
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench-gpu"},
        "spec": {"model": {"fromConfig": {"size": args.preset, "vocabSize": args.vocab}},
                 "dataset": {"train": "synthetic"},
                 "preprocessing": {"maxSeqLength": args.seq},
                 "training": training,
                 "evaluation": {"samples": 0},
                 "output": {"uri": str(out)}}})


def total_steps(args) -> int:
    return args.warmup + args.steps + args.sync_check


# ---------------------------------------------------------------------------------------------------------------
# Timing and accounting, the same for the product and the baseline


def sync(on_gpu: bool) -> None:
    if on_gpu:
        torch.cuda.synchronize()


def time_steps(step, plan, seed: int, warmup: int, steps: int, on_gpu: bool) -> dict:
    """Run ``warmup`` + ``steps`` optimizer steps with ``step(rows) -> loss``. The first step is timed alone
    (torch.compile, DeepSpeed's lazy allocations, cuBLAS autotuning happen there), the last ``steps`` together."""
    from kubetune.train.plan import step_rows

    sync(on_gpu)
    began = time.perf_counter()
    losses = [step(step_rows(plan, seed, 0))]
    sync(on_gpu)
    first = time.perf_counter() - began
    for s in range(1, warmup):
        losses.append(step(step_rows(plan, seed, s)))
    timed = [step_rows(plan, seed, s) for s in range(warmup, warmup + steps)]
    sync(on_gpu)
    began = time.perf_counter()
    for rows in timed:
        losses.append(step(rows))
    sync(on_gpu)
    return {"first_step_s": first, "seconds": time.perf_counter() - began, "timed": timed, "losses": losses}


def throughput(shape, rows, timed, seconds: float, peak: float | None) -> dict:
    """Real tokens per second and MFU of the timed steps, by ``kubetune.train.flops``'s count: tokens, labeled
    positions (``Rows.trained``) for the output layer, the sum of squared document lengths for attention."""
    tokens = sum(rows.tokens(idx) for idx in timed)
    flops = sum(shape.step_flops(rows.tokens(idx), rows.label_tokens(idx), int(rows.squared[idx].sum()))
                for idx in timed)
    return {"tokens_per_s": round(tokens / seconds, 1), "model_tflops_per_s": round(flops / seconds / 1e12, 2),
            "mfu": round(flops / seconds / peak, 4) if peak else None}


def peak_of(args, on_gpu: bool) -> float | None:
    """Dense bf16 peak FLOP/s of this GPU (``--peak-tflops`` overrides); None on CPU or an unknown GPU."""
    from kubetune.train.flops import peak_flops

    if args.peak_tflops:
        return args.peak_tflops * 1e12
    return peak_flops(torch.cuda.get_device_name()) if on_gpu else None


def peak_gib(on_gpu: bool) -> float | None:
    return round(torch.cuda.max_memory_allocated() / GIB, 2) if on_gpu else None


def report(result: dict) -> None:
    """One short human line, then the machine-readable one."""
    r = result
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
    mem = f"{r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else "n/a"
    print(f"[{r['kind']}] {r['preset']} {r['method']} seq {r['seq']}: micro {r['micro']} x accum {r['accum']}, "
          f"checkpointing {'on' if r['gradient_checkpointing'] else 'off'}, compile {r['compile']} | "
          f"{r['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, peak {mem}, first step {r['first_step_s']:.1f} s, "
          f"setup {r['setup_s']:.1f} s", flush=True)
    print("RESULT " + json.dumps(r), flush=True)


def explain_flops() -> None:
    """The FLOPs formula (T tokens, P labeled positions, n document lengths), from the module that defines it."""
    from kubetune.train import flops

    formula = [line.strip() for line in flops.__doc__.split("\n- ")[0].splitlines() if line.startswith("    ")]
    print("[flops] per step: " + "; ".join(" ".join(line.split()) for line in formula), flush=True)


def count_syncs(step, plan, seed: int, first: int, n: int, on_gpu: bool) -> dict:
    """``n`` more steps with ``torch.cuda.set_sync_debug_mode("warn")``: every host-device synchronization
    becomes a warning at the Python line that caused it. Counted per line, with that line's source."""
    from kubetune.train.plan import step_rows

    if on_gpu:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for s in range(first, first + n):
                step(step_rows(plan, seed, s))
            sync(on_gpu)
    finally:
        if on_gpu:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sites = Counter((w.filename, w.lineno) for w in syncs)
    top = [{"count": c, "where": f"{short_path(f)}:{line}", "code": linecache.getline(f, line).strip()}
           for (f, line), c in sites.most_common(15)]
    print(f"[sync-check] {len(syncs)} synchronizing CUDA calls in {n} steps "
          f"({len(caught) - len(syncs)} other warnings)" + ("" if on_gpu else "; n/a on CPU (nothing to sync)"))
    for site in top:
        print(f"[sync-check] {site['count']:5d}x {site['where']}: {site['code']}")
    return {"kind": "sync-check", "steps": n, "syncs": len(syncs), "per_step": len(syncs) / max(n, 1), "sites": top}


def short_path(path: str) -> str:
    for marker in ("/site-packages/", "/src/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


# ---------------------------------------------------------------------------------------------------------------
# The product


def bench_product(args, out: Path, on_gpu: bool) -> dict:
    """``recipe.setup`` then ``recipe.train_step``, as ``recipe.train`` calls them, minus checkpoints and export."""
    from kubetune.packed import head
    from kubetune.train import recipe
    from kubetune.train.distributed import Preemption

    job = make_job(args, out)
    began = time.perf_counter()
    run = recipe.setup(job)
    setup_s = time.perf_counter() - began
    engine, plan = run.engine, run.plan
    seed = job.spec.training.seed
    preemption = Preemption()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a benchmark stops on `timeout`'s SIGTERM; it has nothing to save
    micro_batches = run.micro_batches(0)  # collated ahead on a thread, as recipe.train does

    def step(rows) -> float:
        metrics, _ = recipe.train_step(run, rows, micro_batches, preemption)
        return metrics["train_loss"]

    engine.train()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()  # the probe's and the model construction's peaks are not training's
    timing = time_steps(step, plan, seed, args.warmup, args.steps, on_gpu)
    result = {"kind": "kubetune", "preset": args.preset, "method": args.method, "seq": args.seq, "vocab": args.vocab,
              "global_batch": plan.global_batch, "micro": plan.micro, "accum": plan.accum,
              "micro_auto": job.spec.training.micro_batch_size == "auto",
              "gradient_checkpointing": bool(run.gradient_checkpointing),
              "compile": "blocks" if run.compiled else "off",
              "fused_loss": head.head_of(engine) is not None,
              **throughput(run.shape, run.train_rows, timing["timed"], timing["seconds"], peak_of(args, on_gpu)),
              "peak_gib": peak_gib(on_gpu), "first_step_s": round(timing["first_step_s"], 2),
              "setup_s": round(setup_s, 2), "steps": args.steps, "first_loss": timing["losses"][0],
              "device": torch.cuda.get_device_name() if on_gpu else "cpu"}
    report(result)
    if args.sync_check:
        sync_result = count_syncs(step, plan, seed, args.warmup + args.steps, args.sync_check, on_gpu)
        print("RESULT " + json.dumps({**sync_result, "preset": args.preset, "method": args.method, "seq": args.seq}),
              flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------------
# The baseline: transformers' own packed path


def baseline_engine(job, tokenizer, plan, on_gpu: bool):
    """A plain LlamaForCausalLM of the product's shape (``kubetune.models.config_for``, same seed), sdpa, PEFT
    LoRA with the job's settings for method lora, under DeepSpeed with the product's config and a fused AdamW."""
    import deepspeed
    from transformers import LlamaForCausalLM

    from kubetune.models import config_for
    from kubetune.train.recipe import deepspeed_config

    t = job.spec.training
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    with device:  # built where it trains: an 8B model initialized on the host takes minutes
        torch.manual_seed(t.seed)
        model = LlamaForCausalLM(config_for(job.spec.model.from_config, tokenizer))
    model = model.to(torch.bfloat16 if on_gpu else torch.float32)
    model.set_attn_implementation("sdpa")
    model.config.use_cache = False
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if t.method == "lora":
        from peft import LoraConfig, get_peft_model

        if t.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay, betas=(0.9, 0.95),
                                  fused=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(job, plan, on_gpu))
    return engine


def baseline_step(engine, rows, plan, pad_id: int, idx) -> float:
    """One optimizer step the transformers way: per-document position_ids (``kubetune.packed.rows.collate``),
    labels to the model, its loss summed over the global batch's labeled tokens (``num_items_in_batch``, as
    the HF Trainer passes it) so the gradient is the product's."""
    from kubetune.packed.rows import collate
    from kubetune.train.plan import rank_micro_batches

    n_items = rows.label_tokens(idx)
    total = torch.zeros((), device=engine.device)
    for micro_rows in rank_micro_batches(idx, plan, 0):
        batch = collate(rows, micro_rows, pad_id)  # padded to the longest row of the micro batch
        out = engine(input_ids=batch.inputs["input_ids"].to(engine.device),
                     position_ids=batch.inputs["position_ids"].to(engine.device),
                     labels=batch.labels.to(engine.device), num_items_in_batch=n_items)
        engine.backward(out.loss * plan.accum)  # DeepSpeed divides by the accumulation steps: undo it
        engine.step()
        total += out.loss.detach()
    return total.item()


def bench_transformers(args, out: Path, on_gpu: bool) -> dict:
    """The baseline on the product's rows and steps, with --micro (the product's micro batch), halved while it
    runs out of memory."""
    from transformers import AutoTokenizer

    from kubetune.packed.rows import load_rows
    from kubetune.train.flops import shape_of
    from kubetune.train.plan import make_plan

    micro = args.micro or 4
    job = make_job(args, out)
    t = job.spec.training
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    rows = load_rows(out, "train")
    while True:
        plan = make_plan(len(rows), t.global_batch_size, micro, 1, t.epochs, t.max_steps)
        engine = None
        try:
            began = time.perf_counter()
            engine = baseline_engine(job, tokenizer, plan, on_gpu)
            setup_s = time.perf_counter() - began
            engine.train()
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            timing = time_steps(lambda idx: baseline_step(engine, rows, plan, tokenizer.pad_token_id, idx),
                                plan, t.seed, args.warmup, args.steps, on_gpu)
            break
        except torch.OutOfMemoryError:
            if plan.micro == 1:
                raise
            print(f"[transformers] micro batch {plan.micro}: out of GPU memory, trying {plan.micro // 2}", flush=True)
        # outside the except block, so the traceback no longer holds the tensors
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        micro = plan.micro // 2
    inner = engine.module.get_base_model() if hasattr(engine.module, "get_base_model") else engine.module
    checkpointing = getattr(inner, "is_activation_checkpointing", None)  # transformers >= 5.2x; older: the old name
    checkpointing = inner.is_gradient_checkpointing if checkpointing is None else checkpointing
    result = {"kind": "transformers", "preset": args.preset, "method": args.method, "seq": args.seq,
              "vocab": args.vocab, "global_batch": plan.global_batch, "micro": plan.micro, "accum": plan.accum,
              "micro_auto": False, "gradient_checkpointing": bool(checkpointing), "compile": "off",
              "fused_loss": False,
              **throughput(shape_of(engine.module), rows, timing["timed"], timing["seconds"], peak_of(args, on_gpu)),
              "peak_gib": peak_gib(on_gpu), "first_step_s": round(timing["first_step_s"], 2),
              "setup_s": round(setup_s, 2), "steps": args.steps, "first_loss": timing["losses"][0],
              "device": torch.cuda.get_device_name() if on_gpu else "cpu"}
    report(result)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Memory of the loss: full logits against the fused, chunked loss


def old_loss(hidden, weight, batch):
    """The loss as kubetune computed it before ``kubetune.packed.loss`` (``token_stats`` of packed/rows.py at
    db9e19d): the model's full logits, then an fp32 cross-entropy over every position, IGNORE skipped."""
    from kubetune.packed import IGNORE

    labels = batch.labels
    logits = hidden @ weight.T
    z, target = logits[:, :-1].float(), labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(z.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum")
    correct = ((z.detach().argmax(-1) == target) & (target != IGNORE)).sum()
    return loss, correct


def new_loss(hidden, weight, batch):
    """``kubetune.packed.loss.token_loss`` on the labeled positions only, gathered as ``kubetune.packed.head``
    gathers them (``Batch.index``: the positions whose next token is labeled)."""
    from kubetune.packed.loss import token_loss

    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.index)
    loss, correct, _count = token_loss(h, weight, batch.target)
    return loss, correct


def measure_loss(fn, hidden, weight, batch, on_gpu: bool) -> dict:
    """Peak CUDA memory above what was allocated before (hidden states, weight, labels) of one forward and
    backward of ``fn``, gradients included; run once before, so cuBLAS's workspace is not counted."""
    for attempt in range(2):
        hidden.grad = weight.grad = None
        gc.collect()
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        began = time.perf_counter()
        loss, correct = fn(hidden, weight, batch)
        loss.backward()
        sync(on_gpu)
        seconds = time.perf_counter() - began
    extra = (torch.cuda.max_memory_allocated() - before) / GIB if on_gpu else None
    return {"loss": loss.item(), "correct": int(correct), "extra_gib": round(extra, 3) if on_gpu else None,
            "ms": round(seconds * 1e3, 1)}


def bench_loss_memory(args, on_gpu: bool) -> list[dict]:
    """For each ``preset:seq:micro``: hidden states (micro, seq, hidden) and an output weight (vocab, hidden), bf16
    on a GPU, both requiring grad; labels from synthetic packed rows. The old loss against the fused one."""
    from kubetune.models import SIZE_PRESETS
    from kubetune.packed.rows import Rows, collate

    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    results = []
    for shape in args.loss_shapes:
        preset, seq, micro = shape.split(":")
        seq, micro = int(seq), int(micro)
        vocab = args.vocab if args.device_smoke else VOCAB.get(preset, 2048)
        hidden_size = SIZE_PRESETS[preset]["hidden_size"]
        batch = collate(Rows(*synthetic_rows(micro, seq, vocab, args.seed)), range(micro), 0).to(device)
        length = batch.inputs["input_ids"].shape[1]
        torch.manual_seed(args.seed)
        hidden = torch.randn(micro, length, hidden_size, device=device, dtype=dtype, requires_grad=True)
        weight = (0.02 * torch.randn(vocab, hidden_size, device=device, dtype=dtype)).requires_grad_()
        old = measure_loss(old_loss, hidden, weight, batch, on_gpu)
        new = measure_loss(new_loss, hidden, weight, batch, on_gpu)
        ratio = round(new["extra_gib"] / old["extra_gib"], 3) if on_gpu and old["extra_gib"] else None
        result = {"kind": "loss-memory", "preset": preset, "seq": seq, "micro": micro, "length": length,
                  "vocab": vocab, "hidden": hidden_size, "labeled": int(batch.index.numel()), "old": old, "new": new,
                  "ratio": ratio, "loss_rel_diff": abs(new["loss"] - old["loss"]) / max(abs(old["loss"]), 1e-9)}
        mem = (f"{old['extra_gib']:.2f} GiB -> {new['extra_gib']:.2f} GiB ({ratio:.2f}x)" if on_gpu
               else "memory n/a on CPU")
        print(f"[loss-memory] {preset} {micro}x{length}, vocab {vocab}: {mem}; {old['ms']:.0f} -> {new['ms']:.0f} ms; "
              f"loss {old['loss']:.4f} vs {new['loss']:.4f}", flush=True)
        print("RESULT " + json.dumps(result), flush=True)
        results.append(result)
        del hidden, weight, batch
    return results


# ---------------------------------------------------------------------------------------------------------------


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="kubetune", choices=["kubetune", "transformers", "loss-memory"])
    p.add_argument("--device-smoke", action="store_true",
                   help="all modes on CPU with a tiny model, fp32 and gloo: tests this script in seconds")
    p.add_argument("--preset", default="1b", help="kubetune.models.SIZE_PRESETS: tiny, small, base, 1b, 3b, 8b")
    p.add_argument("--method", default="full", choices=["full", "lora"])
    p.add_argument("--seq", type=int, default=2048, help="preprocessing.maxSeqLength: the packed row capacity")
    p.add_argument("--vocab", type=int, help="vocabulary size (default: 32000 for 1b, 128256 for 3b and 8b)")
    p.add_argument("--global-batch", type=int, default=32, help="training.globalBatchSize (rows per step)")
    p.add_argument("--micro", type=int, help="training.microBatchSize; default: the product's (auto)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="force it on (default: the product's)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1: the first compiles)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--sync-check", type=int, default=0, metavar="N",
                   help="after the timed steps, N steps under torch.cuda.set_sync_debug_mode('warn'), syncs counted")
    p.add_argument("--loss-shapes", nargs="+", default=["1b:2048:8", "8b:4096:2"], metavar="PRESET:SEQ:MICRO")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if kubetune.train.flops lacks it")
    p.add_argument("--memory-gib", type=float, help="use at most this much GPU memory (80: an 80 GB GPU's budget)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, help="where the prepared folder goes (default: a folder under the temp dir "
                   "named by the data's parameters, shared by the product's and the baseline's runs)")
    args = p.parse_args()
    if args.device_smoke:
        args.preset, args.seq, args.global_batch, args.warmup, args.steps = "tiny", 256, 8, 1, 2
        args.sync_check = args.sync_check or 1
        args.vocab = args.vocab or 512
        args.loss_shapes = ["tiny:256:2"]
    args.vocab = args.vocab or VOCAB.get(args.preset, 2048)
    if args.warmup < 1:
        p.error("--warmup must be at least 1: the first step is timed apart")
    return args


def main() -> None:
    args = parse_args()
    if args.device_smoke:  # before deepspeed or CUDA is touched
        os.environ["DS_ACCELERATOR"] = "cpu"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise SystemExit("bench_gpu.py measures one GPU: run it with torchrun --nproc-per-node=1")
    on_gpu = torch.cuda.is_available()
    if on_gpu and args.memory_gib:  # e.g. an 80 GB GPU's budget on a bigger one: the allocator refuses past it
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * GIB / total))
    if args.mode == "loss-memory" and not args.device_smoke:
        bench_loss_memory(args, on_gpu)
        return

    import deepspeed
    import torch.distributed as dist

    rows = args.global_batch * total_steps(args)  # every step its own rows
    out = args.out or Path(tempfile.gettempdir()) / (
        f"kubetune-bench-gpu/v{args.vocab}-s{args.seq}-r{rows}-seed{args.seed}")
    write_prepared(out, args.seq, args.vocab, rows, 8, args.seed)
    if args.mode == "kubetune":
        explain_flops()
    deepspeed.init_distributed()  # the product's setup does it too; the baseline needs it first
    if args.device_smoke:
        product = bench_product(args, out, on_gpu)
        gc.collect()
        args.micro = product["micro"]  # the baseline gets the product's micro batch, as gpu_check.sh passes it
        baseline = bench_transformers(args, out, on_gpu)
        print(f"[smoke] ratio {product['tokens_per_s'] / baseline['tokens_per_s']:.2f}x; first-step losses "
              f"{product['first_loss']:.5f} (kubetune) vs {baseline['first_loss']:.5f} (transformers)")
        bench_loss_memory(args, on_gpu)
    elif args.mode == "kubetune":
        bench_product(args, out, on_gpu)
    else:
        bench_transformers(args, out, on_gpu)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
