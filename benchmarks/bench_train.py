"""Trainer throughput on CPU: kubetune (packing, DeepSpeed) vs a plain Hugging Face Trainer with padding.

    .venv/bin/pip install -e '.[bench]'      # accelerate, which transformers' Trainer needs
    .venv/bin/python benchmarks/bench_train.py [--size tiny] [--epochs 2]

Same from-config model, same tokenizer, same cleaned conversations with the same assistant-only
labels, same optimizer settings, one run on this machine. The baseline is the usual recipe:
one conversation per sequence, padded to the longest in its batch (DataCollatorForSeq2Seq).
Figures are real (non-padding) tokens per second of training time, model loading excluded.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def job(out: Path, size: str, epochs: int) -> dict:
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench"},
            "spec": {"model": {"fromConfig": {"size": size, "vocabSize": 1024}},
                     "dataset": {"train": str(ROOT / "examples" / "data")},
                     "preprocessing": {"maxSeqLength": 512, "pii": {"allow": ["no-reply@nimbusnotes.example"]}},
                     "training": {"method": "full", "epochs": epochs, "learningRate": 1e-3, "globalBatchSize": 8,
                                  "microBatchSize": 8, "zeroStage": 0, "evalEvery": 10**6, "checkpointEvery": 10**6},
                     "output": {"uri": str(out)}}}


def kubetune_tokens_per_second(doc: dict, out: Path, nproc: int) -> float:
    from kubetune.train.launch import cpu_threads_env, torchrun_command

    job_file = out.parent / f"job-{nproc}.json"
    job_file.write_text(json.dumps(doc))
    env = {**os.environ, **cpu_threads_env(nproc)}
    subprocess.run(torchrun_command(str(job_file), nproc), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))[1:]  # the first step includes warm-up
    meta = json.loads((out / "prepared" / "meta.json").read_text())
    from kubetune.packed.rows import load_rows
    from kubetune.train.plan import make_plan, step_rows

    data = load_rows(out, "train")
    t = doc["spec"]["training"]
    plan = make_plan(meta["train"]["rows"], t["globalBatchSize"], t["microBatchSize"], nproc, t["epochs"], None)
    tokens = [data.tokens(step_rows(plan, 42, int(r["step"]) - 1)) for r in rows]
    seconds = sum(n / float(r["tokens_per_second"]) for n, r in zip(tokens, rows))
    return sum(tokens) / seconds


def hf_trainer_tokens_per_second(out: Path, size: str, epochs: int) -> float:
    import orjson
    import torch
    from transformers import (AutoTokenizer, DataCollatorForSeq2Seq, LlamaForCausalLM, Trainer,
                              TrainingArguments)

    from kubetune.data.tokenize import tokenize_batch
    from kubetune.models import config_for
    from kubetune.spec import FromConfig

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    conversations = [orjson.loads(line)["messages"] for line in open(out / "prepared" / "train.jsonl", "rb")]
    examples = [{"input_ids": t.input_ids, "labels": t.labels, "attention_mask": [1] * len(t.input_ids)}
                for t in tokenize_batch(tok, conversations)]
    torch.manual_seed(42)
    model = LlamaForCausalLM(config_for(FromConfig(size=size, vocab_size=1024), tok))
    args = TrainingArguments(output_dir=str(out / "hf"), per_device_train_batch_size=8, num_train_epochs=epochs,
                             learning_rate=1e-3, lr_scheduler_type="cosine", logging_steps=10**6,
                             save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100))
    result = trainer.train()
    real_tokens = sum(len(e["input_ids"]) for e in examples) * epochs
    return real_tokens / result.metrics["train_runtime"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    from kubetune.data.prepare import prepare
    from kubetune.spec import parse_job

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "prepared"
        prepare(parse_job(job(base, args.size, args.epochs)), log=lambda _: None)
        hf = hf_trainer_tokens_per_second(base, args.size, args.epochs)
        print(f"HF Trainer, padding, 1 process     : {hf:9.0f} real tokens/s")
        for nproc in (1, 2):
            out = Path(tmp) / f"kt{nproc}"
            subprocess.run(["cp", "-r", str(base), str(out)], check=True)
            kt = kubetune_tokens_per_second(job(out, args.size, args.epochs), out, nproc)
            print(f"kubetune, packing, {nproc} process(es)    : {kt:9.0f} real tokens/s   ratio {kt / hf:.2f}x")


if __name__ == "__main__":
    main()
