"""GPU model FLOPs utilization of a full fine-tune: bf16, DeepSpeed ZeRO-2, one GPU, kubetune's attention.

    torchrun --nproc-per-node=1 benchmarks/bench_gpu_mfu.py [--preset 1b|3b] [--seq 2048|4096] [--micro 8]
        [--attention auto|flex|loop]

The packed rows go through kubetune's attention: ``auto`` is the fused FlexAttention kernel on a GPU
(document-causal BlockMask), ``loop`` the per-document fallback, to compare.

Builds a from-config Llama (no hub needed), trains on random packed rows (4 documents per row, so
the document-wise attention path is exercised), and prints tokens/s and MFU against the GPU's
dense bf16 peak. FLOPs per token = 6 * parameters + 12 * layers * hidden * mean document length
(the causal attention term, halved for causality, as in the PaLM appendix).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

PRESETS = {  # (hidden, intermediate, layers, heads, kv heads)
    "1b": (2048, 5632, 22, 32, 4),
    "3b": (3072, 8192, 28, 24, 8),
    "8b": (4096, 14336, 32, 32, 8),
}
DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(name: str) -> float:
    for key, value in DENSE_BF16_TFLOPS.items():
        if key in name:
            return value
    raise SystemExit(f"unknown GPU '{name}': pass --peak-tflops")


def main() -> None:
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubetune.packed import attention
    from kubetune.packed.rows import Rows, collate, to_device, token_stats

    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="1b", choices=PRESETS)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (bigger models)")
    parser.add_argument("--attention", default="auto", choices=attention.KERNELS)
    args = parser.parse_args()
    os.environ["KUBETUNE_ATTENTION"] = args.attention

    deepspeed.init_distributed()
    hidden, inter, layers, heads, kv = PRESETS[args.preset]
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=args.seq)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.set_attn_implementation(attention.register())
    model.config.use_cache = False
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "gradient_clipping": 1.0,
        "steps_per_print": 10**9})

    doc = args.seq // 4
    n_rows = args.micro * 4
    ids = torch.randint(0, 32000, (n_rows, args.seq)).tolist()
    rows = Rows(ids, ids, [[doc] * 4] * n_rows)
    flops_per_token = 6 * params + 12 * layers * hidden * doc
    peak = args.peak_tflops or peak_tflops(torch.cuda.get_device_name())
    warmup = 5
    for step in range(args.steps):
        if step == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        batch = to_device(collate(rows, range((step % 4) * args.micro, (step % 4 + 1) * args.micro), 0), engine.device)
        labels = batch.pop("labels")
        loss, _, count = token_stats(engine(**batch).logits, labels)
        engine.backward(loss / count)
        engine.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens_per_s = (args.steps - warmup) * args.micro * args.seq / seconds
    mfu = tokens_per_s * flops_per_token / (peak * 1e12)
    kernel = attention.kernel_for(torch.empty(0, device="cuda"), 0.0)
    print(f"{torch.cuda.get_device_name()}: {params / 1e9:.2f}B params, seq {args.seq}, micro batch {args.micro}, "
          f"attention {kernel}, "
          f"memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"tokens/s {tokens_per_s:,.0f}   model TFLOP/s {tokens_per_s * flops_per_token / 1e12:.1f}   "
          f"MFU {mfu:.1%} of {peak:.0f} TFLOP/s dense bf16")


if __name__ == "__main__":
    main()
