"""Evaluation of an rft job: held-out prompts answered greedily by every model (base, fine-tuned, served), as
long as training let them answer (``training.rft.maxNewTokens``), each answer scored by the job's grader.
``grader_score`` is the mean reward, the metric a gate such as ``{metric: grader_score, mustBeat: base}``
judges. There are no reference answers, so no loss or overlap metrics."""

from __future__ import annotations

import json
import random
from typing import Callable

from kubetune.data.formats import template_messages
from kubetune.graders import grade_batch
from kubetune.spec import FineTuneJob

SHOWN = 5  # prompts shown with every model's answer (the reference column shows the item)


def score_prompts(job: FineTuneJob, models: dict, own: dict, tokenizer, records: list[dict], split: str,
                  generate: Callable, prompt_type, log: Callable[[str], None]) -> dict:
    """The split's report part: samples, per-model grader_score, a few prompts with every model's answer."""
    ev, t = job.spec.evaluation, job.spec.training
    records = list(records)
    random.Random(t.seed).shuffle(records)
    records = records[: ev.samples]
    prompts = [prompt_type(template_messages(r["messages"]), r.get("tools")) for r in records]
    results, replies = {}, {}
    for name, model in models.items():
        log(f"[evaluate] {name} on {split}: answering and grading {len(prompts)} prompts")
        replies[name] = [g[0] for g in generate(model, own.get(name, tokenizer), prompts, t.rft.max_new_tokens)]
        graded = grade_batch(t.rft.grader, list(zip(replies[name], [r["item"] for r in records])),
                             t.rft.endpoints())
        results[name] = {"grader_score": sum(g.reward for g in graded) / len(graded) if graded else None}
    examples = [{"prompt": p.messages, "reference": json.dumps(r["item"]), **{name: replies[name][i] for name in models}}
                for i, (p, r) in enumerate(list(zip(prompts, records))[:SHOWN])]
    notes = [f"rft: {len(prompts)} held-out prompts answered greedily (up to {t.rft.max_new_tokens} tokens) and "
             f"scored by the grader {t.rft.grader.name!r}; grader_score is the mean reward"]
    return {"samples": len(prompts), "metrics": results, "notes": notes, "examples": examples}
