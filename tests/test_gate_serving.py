"""gate.mustBeat: serving, with real tiny models: the fine-tuned model is judged against the served one on
the golden set, and the report shows both models on the golden set and on the validation split."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from conftest import EXAMPLES, job_doc
from kubetune.data.prepare import prepare
from kubetune.evaluate.run import evaluate_job
from kubetune.models import load_model
from kubetune.spec import parse_job

pytestmark = pytest.mark.slow


def doc_for(out: Path, data: Path, golden: Path, **evaluation) -> dict:
    return job_doc(str(data), str(out), preprocessing={"maxSeqLength": 256, "dedup": {"near": False}},
                   evaluation={"samples": 2, "maxNewTokens": 4, "goldenSet": str(golden), **evaluation})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    """A prepared job with a golden set, and two models sharing its tokenizer: a plain one and a much worse
    one (its output layer scaled up: confidently wrong, a far higher loss)."""
    tmp = tmp_path_factory.mktemp("serving")
    lines = (EXAMPLES / "data" / "support-chat.jsonl").read_text().splitlines(keepends=True)
    (tmp / "data.jsonl").write_text("".join(lines[:40]))
    (tmp / "golden.jsonl").write_text("".join(lines[40:48]))
    out = tmp / "out"
    job = parse_job(doc_for(out, tmp / "data.jsonl", tmp / "golden.jsonl"))
    prepare(job, log=lambda _: None)
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    models = {}
    for name, scale in (("good", 1.0), ("bad", 60.0)):
        model = load_model(job, tokenizer)
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
        model.save_pretrained(tmp / name)
        tokenizer.save_pretrained(tmp / name)
        models[name] = tmp / name
    # a model whose tokenizer was trained on other data, as with fromConfig and retrainFrom: base
    (tmp / "other.jsonl").write_text("".join(lines[48:100]))
    other = parse_job(doc_for(tmp / "other-out", tmp / "other.jsonl", tmp / "golden.jsonl"))
    prepare(other, log=lambda _: None)
    own = AutoTokenizer.from_pretrained(tmp / "other-out" / "tokenizer")
    load_model(other, own).save_pretrained(tmp / "other")
    own.save_pretrained(tmp / "other")
    return {"tmp": tmp, "out": out, "other": tmp / "other", **models}


def _evaluate(prepared: dict, tuned: str, served: str, name: str, metric: str = "valid_loss") -> dict:
    out = prepared["tmp"] / name
    shutil.copytree(prepared["out"], out)
    shutil.copytree(prepared[tuned], out / "model")
    gate = {"metric": metric, "mustBeat": "serving", "minDelta": 0.5}
    doc = doc_for(out, prepared["tmp"] / "data.jsonl", prepared["tmp"] / "golden.jsonl",
                  gate=gate, servedModel=str(prepared[served]))
    report = evaluate_job(parse_job(doc), log=lambda _: None)
    assert report == json.loads((out / "eval_report.json").read_text())
    return report


def test_a_model_better_than_the_served_one_on_the_golden_set_passes(prepared):
    report = _evaluate(prepared, "good", "bad", "pass")
    golden = report["golden"]["metrics"]
    assert report["gate"]["passed"] is True, report["gate"]["message"]
    assert report["gate"]["value"] == golden["fine_tuned"]["valid_loss"]
    assert report["gate"]["threshold"] == golden["served"]["valid_loss"]
    assert "better than the served model by at least minDelta 0.5 on the golden set" in report["gate"]["message"]
    # both splits, every model, side by side: the golden set is scored apart from the validation split
    assert set(report["metrics"]) == set(golden) == {"base", "served", "fine_tuned"}
    assert golden["fine_tuned"]["valid_loss"] != report["metrics"]["fine_tuned"]["valid_loss"]
    assert report["golden"]["samples"] == 2 and "rouge_l" in golden["served"]
    md = (prepared["tmp"] / "pass" / "eval_report.md").read_text()
    assert "## Golden set" in md and "| metric | base | served | fine-tuned | better |" in md


def test_a_model_worse_than_the_served_one_on_the_golden_set_fails(prepared):
    report = _evaluate(prepared, "bad", "good", "fail")
    assert report["gate"]["passed"] is False
    assert "not better than the served model by at least minDelta 0.5 on the golden set" in report["gate"]["message"]


def test_a_served_model_with_its_own_tokenizer_is_compared_on_replies_only(prepared):
    report = _evaluate(prepared, "good", "other", "own", metric="rouge_l")
    served = report["golden"]["metrics"]["served"]
    assert "rouge_l" in served and "valid_loss" not in served  # its loss on other tokens would not compare
    assert report["gate"]["threshold"] == served["rouge_l"]  # the gate compares what does compare
    assert any("tokenizer of its own" in note for note in report["notes"])
