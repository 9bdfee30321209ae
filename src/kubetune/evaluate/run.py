"""Evaluate a finished job: held-out conversations, replies from the base and the fine-tuned model.

For a sample of held-out conversations (``prepared/validation.jsonl``), the last assistant turn is
the reference and everything before it the prompt. Both models answer greedily; the report has
the scores side by side, validation loss/perplexity/token accuracy of both on the validation
shards, and a few prompts with both replies. Written as ``eval_report.json`` and
``eval_report.md`` in the output location.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Callable

import orjson
import torch

from kubetune.evaluate.scores import score
from kubetune.spec import FineTuneJob
from kubetune.storage import Mirror, join, store_for
from kubetune.train.progress import LocalSink, reporter_for

SHOWN_SAMPLES = 5


def held_out(conversations: list[list[dict]], samples: int, seed: int) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference reply) pairs from conversations that end with an assistant turn."""
    pairs = []
    for messages in conversations:
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last:  # needs something before the reply to prompt with
            pairs.append(([{"role": m["role"], "content": m["content"]} for m in messages[:last]], messages[last]["content"]))
    random.Random(seed).shuffle(pairs)
    return pairs[:samples]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch: int = 8) -> list[tuple[str, bool]]:
    """Greedy replies and whether each was cut off at max_new_tokens."""
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts[i : i + batch]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row in ids[:, enc["input_ids"].shape[1] :].tolist():
            ended = tokenizer.eos_token_id in row
            row = row[: row.index(tokenizer.eos_token_id)] if ended else row
            out.append((tokenizer.decode(row, skip_special_tokens=True).strip(), not ended))
    return out


def validation(model, prepared: Path, pad_id: int) -> dict:
    """Validation loss, perplexity and assistant-token accuracy on the validation shards (as in training)."""
    from kubetune.packed import attention
    from kubetune.packed.rows import load_rows, validation_metrics, validation_totals

    rows = load_rows(prepared, "validation")
    previous = model.config._attn_implementation
    model.set_attn_implementation(attention.register())  # packed rows: attend within documents
    totals = validation_totals(model, rows, list(range(len(rows))), 4, pad_id, model.device)
    model.set_attn_implementation(previous)
    return validation_metrics(totals)


def _local_root(job: FineTuneJob, scratch: Path) -> Path:
    """A local folder with the job's model/ and prepared/ (downloaded for s3:// outputs)."""
    out = Mirror(job.spec.output.uri, scratch, job.spec.storage)
    for part in ("model", "prepared"):
        out.fetch(part)
    return out.path


def evaluate_job(job: FineTuneJob, log: Callable[[str], None] = print) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.models import load_model, resolve_source

    ev, out = job.spec.evaluation, job.spec.output.uri
    with tempfile.TemporaryDirectory(prefix="kubetune-eval-") as tmp:
        scratch = Path(tmp)
        prepared = _local_root(job, scratch)
        model_dir = prepared / "model"
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        conversations = [orjson.loads(line)["messages"] for line in
                         (prepared / "prepared" / "validation.jsonl").read_bytes().splitlines() if line.strip()]
        pairs = held_out(conversations, ev.samples, job.spec.training.seed)
        prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        source = None if job.spec.model.from_config else resolve_source(job, scratch / "base")
        models = {"base": load_model(job, tokenizer, source=source).to(device).eval(),
                  "fine_tuned": AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()}
        results, replies, notes = {}, {}, []
        for name, model in models.items():
            log(f"[evaluate] {name}: generating {len(prompts)} replies")
            generated = generate(model, tokenizer, prompts, ev.max_new_tokens)
            replies[name] = [g[0] for g in generated]
            metrics, why = score(replies[name], references, [g[1] for g in generated]) if prompts else ({}, [])
            results[name] = {**validation(model, prepared, tokenizer.pad_token_id), **metrics}
            notes += [n for n in why if n not in notes]
    report = {
        "samples": len(prompts),
        "max_new_tokens": ev.max_new_tokens,
        "metrics": results,
        "notes": notes,
        "examples": [{"prompt": p, "reference": r, "base": b, "fine_tuned": f}
                     for p, r, b, f in list(zip(prompts, references, replies["base"], replies["fine_tuned"]))[:SHOWN_SAMPLES]],
    }
    store = store_for(out, job.spec.storage)
    store.write_bytes(join(out, "eval_report.json"), json.dumps(report, indent=2).encode())
    store.write_bytes(join(out, "eval_report.md"), markdown(job.metadata.name, report).encode())
    log(f"[evaluate] wrote {join(out, 'eval_report.md')}")
    return report


def evaluate_after_training(job: FineTuneJob, log: Callable[[str], None] = print) -> None:
    """The job's last step, run where the trainer was started, once its processes have ended.

    The trainer's last progress record ("exporting", in ``progress.json``) goes on as "evaluating",
    then "done" with the evaluation's summary among its metrics. A job without evaluation samples
    has nothing to do here: the trainer reported "done" itself.
    """
    spec = job.spec
    if not spec.evaluation.samples:
        return
    reporter, record = reporter_for(spec.output.uri, spec.storage), LocalSink(spec.output.uri, spec.storage).last()
    if record:
        reporter.update({**record, "phase": "evaluating", "etaSeconds": None}, force=True)
    evaluation = summary(evaluate_job(job, log))
    if record:
        metrics = {**record.get("metrics", {}), "evaluation": evaluation}
        reporter.update({**record, "phase": "done", "etaSeconds": 0, "metrics": metrics}, force=True)


def summary(report: dict) -> dict:
    """Fine-tuned vs base per metric, for the progress record and status."""
    base, tuned = report["metrics"]["base"], report["metrics"]["fine_tuned"]
    return {k: {"base": _round(base[k]), "fineTuned": _round(tuned[k])} for k in tuned if tuned[k] is not None}


def _round(x):
    return None if x is None else round(float(x), 4)


_LOWER_IS_BETTER = {"valid_loss", "valid_perplexity", "repetition_rate", "empty_rate", "truncated_rate"}


def markdown(name: str, report: dict) -> str:
    base, tuned = report["metrics"]["base"], report["metrics"]["fine_tuned"]
    lines = [f"# Evaluation of `{name}`", "",
             f"{report['samples']} held-out conversations, greedy replies of at most {report['max_new_tokens']} tokens.", "",
             "| metric | base | fine-tuned | better |", "|---|---:|---:|:---:|"]
    for key in tuned:
        b, t = base.get(key), tuned[key]
        if t is None or b is None:
            continue
        better = "fine-tuned" if (t < b if key in _LOWER_IS_BETTER else t > b) else ("=" if t == b else "base")
        lines.append(f"| {key} | {b:.4f} | {t:.4f} | {better} |")
    lines += [f"\n_{note}_" for note in report["notes"]]
    lines += ["", "## Samples", ""]
    for i, ex in enumerate(report["examples"], 1):
        question = ex["prompt"][-1]["content"] if ex["prompt"] else ""
        lines += [f"### {i}. {_quote(question)}", "", "| reference | base | fine-tuned |", "|---|---|---|",
                  f"| {_quote(ex['reference'])} | {_quote(ex['base'])} | {_quote(ex['fine_tuned'])} |", ""]
    return "\n".join(lines)


def _quote(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"
