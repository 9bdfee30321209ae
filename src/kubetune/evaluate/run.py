"""Evaluate a finished job: held-out conversations, replies from the base and the fine-tuned model.

For a sample of held-out conversations (``prepared/validation.jsonl``), the last assistant turn is
the reference and everything before it the prompt. Both models answer greedily; the report has
the scores side by side, validation loss/perplexity/token accuracy of both on the validation
shards, and a few prompts with both replies. Written as ``eval_report.json`` and
``eval_report.md`` in the output location, with the verdict of ``evaluation.gate``
(``kubetune.evaluate.gate``) and of the train/serve parity check (``kubetune.evaluate.parity``) at
the top. For ``training.objective: dpo`` the validation metrics are the preference ones, on the validation
pairs, with the base model as the DPO reference (``preference_validation``). ``evaluate_after_training`` is
the job's last step; it also writes ``lineage.json`` and the
model card (``kubetune.lineage``).
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import orjson
import torch

from kubetune import lineage
from kubetune.data.formats import template_messages
from kubetune.evaluate import parity
from kubetune.evaluate.gate import Verdict, better, combine, compared
from kubetune.evaluate.parity import Parity
from kubetune.evaluate.pmi import reply_pmi
from kubetune.evaluate.scores import score
from kubetune.spec import FineTuneJob
from kubetune.storage import Mirror, NotFound, is_s3, join, store_for
from kubetune.train.progress import LocalSink, reporter_for

SHOWN_SAMPLES = 5
PMI_REPLIES = 200  # held-out replies valid_reply_pmi reads (4 forward passes each)


@dataclass
class Prompt:
    messages: list[dict]  # as chat templates take them (``formats.template_messages``)
    tools: list[dict] | None = None

    def render(self, tokenizer) -> str:
        return tokenizer.apply_chat_template(self.messages, tools=self.tools, tokenize=False, add_generation_prompt=True)


def held_out(records: list[dict], samples: int, seed: int) -> list[tuple[Prompt, str]]:
    """(prompt, reference reply) pairs from validation records whose last written assistant reply has
    something before it; a reply that only calls tools has no text to score, so an earlier one is used."""
    pairs = []
    for record in records:
        messages = record["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("content")), default=None)
        if last:  # needs something before the reply to prompt with
            pairs.append((Prompt(template_messages(messages[:last]), record.get("tools")), messages[last]["content"]))
    random.Random(seed).shuffle(pairs)
    return pairs[:samples]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[Prompt], max_new_tokens: int, batch: int = 8) -> list[tuple[str, bool]]:
    """Greedy replies and whether each was cut off at max_new_tokens."""
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch):
        texts = [p.render(tokenizer) for p in prompts[i : i + batch]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row in ids[:, enc["input_ids"].shape[1] :].tolist():
            ended = tokenizer.eos_token_id in row
            row = row[: row.index(tokenizer.eos_token_id)] if ended else row
            out.append((tokenizer.decode(row, skip_special_tokens=True).strip(), not ended))
    return out


def validation(model, prepared: Path, pad_id: int, split: str = "validation") -> dict:
    """Validation loss, perplexity and assistant-token accuracy on a split's shards (as in training)."""
    from kubetune.packed import attention, head
    from kubetune.packed.head import validation_totals
    from kubetune.packed.rows import Collator, load_rows, validation_metrics

    rows = load_rows(prepared, split)
    previous = model.config._attn_implementation
    model.set_attn_implementation(attention.register())  # packed rows: attend within documents
    head.install(model)  # the loss without full-vocabulary logits, as in training
    totals = validation_totals(model, rows, list(range(len(rows))), 4, Collator(pad_id), model.device)
    model.set_attn_implementation(previous)
    return validation_metrics(totals)


def preference_validation(models: dict, prepared: Path, pad_id: int, beta: float, sft_weight: float,
                          split: str = "validation") -> dict:
    """objective dpo: each model's pair metrics on the validation pairs (``kubetune.train.dpo``), as training
    reports them, with the base model (``models["base"]``) as the reference. The base's implicit rewards are
    then 0 by definition (preference accuracy 0, margin 0); valid_logp_accuracy, how often the chosen answer is
    the likelier one, needs no reference and so compares the two."""
    from kubetune.packed import attention, head
    from kubetune.packed.rows import Collator, load_rows
    from kubetune.train.dpo import Dpo, StoredReference

    rows = load_rows(prepared, split)
    previous = {name: model.config._attn_implementation for name, model in models.items()}
    for model in models.values():
        model.set_attn_implementation(attention.register())  # packed rows: attend within documents
        head.install(model)
    base, collator = models["base"], Collator(pad_id)
    reference = StoredReference.compute(base, {"validation": rows}, 4, collator, base.device)
    objective = Dpo(beta, sft_weight, reference)
    out = {name: objective.metrics(objective.totals(model, rows, list(range(len(rows))), 4, collator, model.device))
           for name, model in models.items()}
    for name, model in models.items():
        model.set_attn_implementation(previous[name])
    return out


DPO_NOTE = ("DPO metrics take the base model as the reference, so its implicit rewards are 0 by definition "
            "(preference accuracy 0, reward margin 0); valid_logp_accuracy (how often the preferred answer is the "
            "likelier one) needs no reference and compares both models.")


def _local_root(job: FineTuneJob, scratch: Path) -> Path:
    """A local folder with the job's model/, prepared/ and tokenizer/ (downloaded for s3:// outputs)."""
    out = Mirror(job.spec.output.uri, scratch, job.spec.storage)
    for part in ("model", "prepared"):
        out.fetch(part)
    try:
        out.fetch("tokenizer")  # the prepared tokenizer, for the parity check (which says so when it is missing)
    except NotFound:
        pass
    return out.path


def _records(root: Path, split: str = "validation") -> list[dict]:
    """A split's records: messages and, for tool-calling conversations, tools."""
    return [orjson.loads(line) for line in (root / "prepared" / f"{split}.jsonl").read_bytes().splitlines() if line.strip()]


def _parity(job: FineTuneJob, root: Path, log: Callable[[str], None]) -> Parity:
    """The train/serve parity check on one validation conversation and a few held-out prompts."""
    # plain conversations only: the checks compare role/content renderings, which tool calls are not
    plain = [r for r in _records(root) if not r.get("tools") and all(m["role"] in ("system", "user", "assistant")
                                                                     and not m.get("tool_calls") for m in r["messages"])]
    trained = next((r["messages"] for r in plain if any(m["role"] == "assistant" and m.get("weight", 1)
                                                         for m in r["messages"])), None)
    prompts = [p.messages for p, _ in held_out(plain, parity.STOP_PROMPTS, job.spec.training.seed)]
    result = parity.check(root, trained, prompts)
    log(f"[evaluate] {result.summary()}")
    return result


SERVED_TOKENIZER_NOTE = ("The served model has a tokenizer of its own (a fromConfig model trains one per job): it "
                         "answers with it, so its reply scores compare, but its loss figures on this job's tokens "
                         "would not, and it has none; gate on a reply metric (rouge_l, ...) to compare such models.")


@dataclass
class Models:
    """The models compared: base, fine_tuned and, with evaluation.servedModel, served; ``own``: the tokenizer of
    a model that does not share the job's (it generates with its own and has no loss figures)."""

    models: dict
    own: dict
    notes: list[str]


def _models(job: FineTuneJob, root: Path, scratch: Path, tokenizer, device: str) -> Models:
    """Load them; the served model is the base itself when the run started from it (not loaded twice)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.models import load_model, resolve_source

    source = None if job.spec.model.from_config else resolve_source(job, scratch / "base")
    out = Models({"base": load_model(job, tokenizer, source=source).to(device).eval(),
                  "fine_tuned": AutoModelForCausalLM.from_pretrained(root / "model").to(device).eval()}, {}, [])
    served = job.spec.evaluation.served_model
    if served and served.rstrip("/") == (job.spec.model.source or "").rstrip("/"):
        out.models["served"] = out.models["base"]
    elif served:
        path = served.removeprefix("hf://")
        if is_s3(served):
            path = str(Mirror(served, scratch / "served", job.spec.storage).fetch())
        out.models["served"] = load_model(job, tokenizer, source=path).to(device).eval()
        own = AutoTokenizer.from_pretrained(path)
        if own.get_vocab() != tokenizer.get_vocab():
            out.own["served"] = own
            out.notes.append(SERVED_TOKENIZER_NOTE)
    return out


def _score_split(job: FineTuneJob, m: Models, tokenizer, root: Path, split: str, log: Callable[[str], None]) -> dict:
    """Every model on one split (validation or golden): its validation figures and (evaluation.samples) replies."""
    ev, t = job.spec.evaluation, job.spec.training
    records = _records(root, split)
    if t.objective == "rft":  # prompts and items, no reference answers: the grader scores the replies
        from kubetune.evaluate.rft import score_prompts

        return score_prompts(job, m.models, m.own, tokenizer, records, split, generate, Prompt, log)
    pairs, pmi_pairs = held_out(records, ev.samples, t.seed), held_out(records, PMI_REPLIES, t.seed)
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    results, replies, notes = {}, {}, []
    shared = {name: model for name, model in m.models.items() if name not in m.own}
    if t.objective == "dpo":  # the pair metrics need both models at once (the base is the reference)
        valid = preference_validation(shared, root, tokenizer.pad_token_id, t.dpo.beta, t.dpo.sft_weight, split)
        notes.append(DPO_NOTE)
    for name, model in m.models.items():
        log(f"[evaluate] {name} on {split}: loss" + (f", generating {len(prompts)} replies" if prompts else ""))
        generated = generate(model, m.own.get(name, tokenizer), prompts, ev.max_new_tokens)
        replies[name] = [g[0] for g in generated]
        metrics, why = score(replies[name], references, [g[1] for g in generated]) if prompts else ({}, [])
        if name not in shared:
            loss = {}
        elif t.objective == "dpo":
            loss = valid[name]
        else:  # the reply PMI first: validation() fuses the loss into the output layer
            pmi = reply_pmi(model, tokenizer, pmi_pairs, job.spec.preprocessing.max_seq_length)
            loss = {**validation(model, root, tokenizer.pad_token_id, split), "valid_reply_pmi": pmi}
        results[name] = {**loss, **metrics}
        notes += [n for n in why if n not in notes]
    examples = [{"prompt": p.messages, "reference": r, **{name: replies[name][i] for name in m.models}}
                for i, (p, r) in enumerate(list(zip(prompts, references))[:SHOWN_SAMPLES])]
    return {"samples": len(prompts), "metrics": results, "notes": notes, "examples": examples}


def _evaluate(job: FineTuneJob, root: Path, scratch: Path, log: Callable[[str], None]) -> dict:
    """The models on the validation split and, with evaluation.goldenSet, on the golden set: the report."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = _models(job, root, scratch, tokenizer, device)
    report = _score_split(job, models, tokenizer, root, "validation", log)
    report = {**report, "max_new_tokens": job.spec.evaluation.max_new_tokens, "notes": models.notes + report["notes"]}
    if job.spec.evaluation.golden_set:
        report["golden"] = _score_split(job, models, tokenizer, root, "golden", log)
    return report


def _evaluate_and_judge(job: FineTuneJob, root: Path, scratch: Path, checked: Parity,
                        log: Callable[[str], None]) -> tuple[dict, Verdict | None]:
    """The evaluation, the gate's verdict on it (parity first), both written as eval_report.{json,md}."""
    report = _evaluate(job, root, scratch, log)
    gate = job.spec.evaluation.gate
    verdict = combine(checked.problems, gate, *compared(gate, report))
    report = {"gate": verdict.as_dict() if verdict else None, "parity": checked.as_dict(), **report}
    out = job.spec.output.uri
    store = store_for(out, job.spec.storage)
    store.write_bytes(join(out, "eval_report.json"), json.dumps(report, indent=2).encode())
    store.write_bytes(join(out, "eval_report.md"), markdown(job.metadata.name, report).encode())
    log(f"[evaluate] wrote {join(out, 'eval_report.md')}")
    return report, verdict


def evaluate_job(job: FineTuneJob, log: Callable[[str], None] = print) -> dict:
    """``kubetune evaluate``: the parity check, the evaluation and the gate; the report (also written)."""
    with tempfile.TemporaryDirectory(prefix="kubetune-eval-") as tmp:
        root = _local_root(job, Path(tmp))
        report, verdict = _evaluate_and_judge(job, root, Path(tmp), _parity(job, root, log), log)
    _announce(verdict, log)
    return report


def evaluate_after_training(job: FineTuneJob, log: Callable[[str], None] = print) -> None:
    """The job's "after training" step, run where the trainer was started, once its processes have ended:
    train/serve parity → evaluation (with samples or a gate) → gate → lineage.json and model card.

    The trainer's last progress record ("exporting", in ``progress.json``) goes on as "evaluating",
    then "done" with the evaluation's summary among its metrics; without samples and gate the trainer
    reported "done" itself. In a pod the verdict goes to ``status.evaluation`` (only with a gate or a
    broken parity) and the lineage summary to ``status.lineage``. A failed gate is not a failed job:
    the operator reads ``status.evaluation.passed``.
    """
    spec = job.spec
    evaluating = bool(spec.evaluation.samples or spec.evaluation.gate)
    reporter, record = reporter_for(spec.output.uri, spec.storage), LocalSink(spec.output.uri, spec.storage).last()
    if record and evaluating:
        reporter.update({**record, "phase": "evaluating", "etaSeconds": None}, force=True)
    with tempfile.TemporaryDirectory(prefix="kubetune-after-") as tmp:
        root = _local_root(job, Path(tmp))
        checked = _parity(job, root, log)
        if evaluating:
            report, verdict = _evaluate_and_judge(job, root, Path(tmp), checked, log)
        else:
            report, verdict = None, combine(checked.problems, None, None, 0)
        pinned = lineage.build(job, root / "prepared", verdict.as_dict() if verdict else None, checked.as_dict())
    uri = lineage.write(job, pinned)
    log(f"[evaluate] wrote {uri} and the model card {join(spec.output.uri, 'model', 'README.md')}")
    _announce(verdict, log)
    reporter.patch(status_patch(verdict, lineage.status_lineage(pinned, uri)))  # in a pod: the job's status
    if record and report is not None:
        metrics = {**record.get("metrics", {}), "evaluation": summary(report)}
        reporter.update({**record, "phase": "done", "etaSeconds": 0, "metrics": metrics}, force=True)


def _announce(verdict: Verdict | None, log: Callable[[str], None]) -> None:
    if verdict is not None:
        log(f"[evaluate] evaluation gate {verdict.word}: {verdict.message}"
            + ("" if verdict.passed else " (the job succeeds; the operator does not serve this model)"))


def status_patch(verdict: Verdict | None, lineage_status):
    """The job status this step writes: status.lineage, and status.evaluation when there is a verdict."""
    from kubetune.status import EvaluationResult, Status

    if verdict is None:
        return Status(lineage=lineage_status)
    return Status(evaluation=EvaluationResult(**verdict.as_dict()), lineage=lineage_status)


def summary(report: dict) -> dict:
    """Fine-tuned vs base (and served, with evaluation.servedModel) per metric, for the progress record and
    status; the golden set's under "golden"."""
    out = _side_by_side(report["metrics"])
    if report.get("golden"):
        out["golden"] = _side_by_side(report["golden"]["metrics"])
    return out


COLUMNS = {"base": "base", "served": "served", "fine_tuned": "fineTuned"}


def _side_by_side(metrics: dict) -> dict:
    tuned = metrics["fine_tuned"]
    return {k: {COLUMNS[name]: _round(m.get(k)) for name, m in metrics.items()} for k in tuned if tuned[k] is not None}


def _round(x):
    return None if x is None else round(float(x), 4)


def markdown(name: str, report: dict) -> str:
    lines = [f"# Evaluation of `{name}`", ""] + _verdict_lines(report)
    parts = [("Validation split", report)] + ([("Golden set", report["golden"])] if report.get("golden") else [])
    for title, part in parts:
        lines += [f"## {title}", "", f"{part['samples']} held-out conversations, greedy replies of at most "
                  f"{report['max_new_tokens']} tokens.", ""] + _table(part["metrics"])
    lines += [f"\n_{note}_" for note in report["notes"] + report.get("golden", {}).get("notes", [])]
    lines += ["", "## Samples", ""]
    names = [n for n in COLUMNS if n in report["metrics"]]
    for i, ex in enumerate(report["examples"], 1):
        question = (ex["prompt"][-1]["content"] or "") if ex["prompt"] else ""
        lines += [f"### {i}. {_quote(question)}", "", "| reference | " + " | ".join(_title(n) for n in names) + " |",
                  "|---|" + "---|" * len(names),
                  f"| {_quote(ex['reference'])} | " + " | ".join(_quote(ex[n]) for n in names) + " |", ""]
    return "\n".join(lines)


def _title(name: str) -> str:
    return name.replace("_", "-")


def _table(metrics: dict) -> list[str]:
    """Each metric of every model side by side, and which is better than the fine-tuned model's comparison
    (the served model when there is one, else the base)."""
    names = [n for n in COLUMNS if n in metrics]
    other = "served" if "served" in metrics else "base"
    lines = ["| metric | " + " | ".join(_title(n) for n in names) + " | better |", "|---|" + "---:|" * len(names) + ":---:|"]
    for key, t in metrics["fine_tuned"].items():
        b = metrics[other].get(key)
        if t is None or b is None:
            continue
        which = "fine-tuned" if better(key, t, b) else ("=" if t == b else other)
        lines.append(f"| {key} | " + " | ".join(_cell(metrics[n].get(key)) for n in names) + f" | {which} |")
    return lines


def _cell(x) -> str:
    return "" if x is None else f"{x:.4f}"


def _verdict_lines(report: dict) -> list[str]:
    """PASS or FAIL with the numbers, and the parity check, at the top of the report."""
    lines = []
    gate, checked = report.get("gate"), report.get("parity")
    if gate:
        numbers = ", ".join(f"{k} {gate[k]:.4f}" for k in ("value", "threshold") if gate[k] is not None)
        lines += [f"**Evaluation gate: {'PASS' if gate['passed'] else 'FAIL'}** — {gate['message']}"
                  + (f" ({numbers})" if numbers else ""), ""]
    if checked:
        state = "ok" if checked["ok"] else "**FAILED**: " + "; ".join(checked["problems"])
        lines += [f"Train/serve parity: {state}. {checked['stopped']} of {checked['prompts']} greedy replies of the "
                  f"fine-tuned model ended on the eos token `{checked['eos_token']}` within {checked['max_new_tokens']} tokens.", ""]
        lines += [f"_{note}_\n" for note in checked["notes"]]
    return lines


def _quote(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"
