"""Train/serve parity: real preparation, a real exported (untrained) model, the server's own encoding.

The model folder is what the trainer exports (``save_pretrained`` of the model and the prepared
tokenizer), without the DeepSpeed run: parity is about the template and tokenizer, not the weights.
"""

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import EXAMPLES, job_doc
from kubetune.data.prepare import prepare
from kubetune.evaluate.parity import content_parts_notes, eos_problems, template_problems
from kubetune.evaluate.run import evaluate_after_training
from kubetune.models import load_model
from kubetune.spec import parse_job

pytestmark = pytest.mark.slow


def doc_for(out: Path, data: Path, **evaluation) -> dict:
    return job_doc(str(data), str(out), preprocessing={"maxSeqLength": 256, "dedup": {"near": False}},
                   evaluation={"samples": 0, "maxNewTokens": 8, **evaluation})


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    """A prepared job whose model/ is a fresh from-config model exported with the prepared tokenizer."""
    tmp = tmp_path_factory.mktemp("parity")
    data = tmp / "data.jsonl"
    data.write_text("".join((EXAMPLES / "data" / "support-chat.jsonl").read_text().splitlines(keepends=True)[:40]))
    out = tmp / "out"
    job = parse_job(doc_for(out, data))
    prepare(job, log=lambda _: None)
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    load_model(job, tokenizer).save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return out


def conversation(out: Path) -> list[dict]:
    return json.loads((out / "prepared" / "validation.jsonl").read_text().splitlines()[0])["messages"]


def test_the_prepared_tokenizer_and_exported_model_agree(output):
    tok = AutoTokenizer.from_pretrained(output / "tokenizer")
    served = AutoTokenizer.from_pretrained(output / "model")
    assert template_problems(tok, served, conversation(output)) == []
    assert eos_problems(served, LlamaForCausalLM.from_pretrained(output / "model")) == []


def test_an_eos_that_does_not_end_the_turn_is_caught(output):
    tok = AutoTokenizer.from_pretrained(output / "tokenizer")
    broken = AutoTokenizer.from_pretrained(output / "model", eos_token="<|endoftext|>")
    problems = template_problems(tok, broken, conversation(output))
    assert any("eos token '<|endoftext|>' differs" in p for p in problems), problems
    assert any("does not end assistant turns with the eos token '<|endoftext|>'" in p for p in problems), problems


def test_a_template_without_the_end_of_turn_token_is_caught(output):
    tok = AutoTokenizer.from_pretrained(output / "tokenizer")
    tok.chat_template = tok.chat_template.replace("<|im_end|>", "")
    problems = template_problems(tok, tok, conversation(output))
    assert len(problems) == 1 and "does not end assistant turns with the eos token '<|im_end|>'" in problems[0]


def test_an_eos_the_model_cannot_emit_is_caught(output):
    tok = AutoTokenizer.from_pretrained(output / "model")
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=tok.eos_token_id, hidden_size=8, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=1))
    assert "outside the model's output vocabulary" in eos_problems(tok, tiny)[0]


def test_the_server_joins_content_parts_as_preparation_does(output):
    from kubetune.serve.engine import ChatModel

    assert content_parts_notes(ChatModel(output / "model"), conversation(output)) == []


def test_a_broken_export_fails_the_gate_with_the_reason_and_an_intact_one_passes(output, tmp_path):
    broken, intact = tmp_path / "broken", tmp_path / "intact"
    shutil.copytree(output, broken)
    shutil.copytree(output, intact)
    AutoTokenizer.from_pretrained(output / "model", eos_token="<|endoftext|>").save_pretrained(broken / "model")
    data = str(output.parent / "data.jsonl")
    gate = {"gate": {"metric": "valid_loss", "max": 1000.0}}  # any model clears it
    lines: list[str] = []
    evaluate_after_training(parse_job(doc_for(broken, Path(data), **gate)), log=lines.append)
    report = json.loads((broken / "eval_report.json").read_text())
    assert report["gate"]["passed"] is False and "train/serve parity check failed" in report["gate"]["message"]
    assert "'<|endoftext|>'" in report["gate"]["message"] and not report["parity"]["ok"]
    assert any("evaluation gate FAIL" in line for line in lines)
    assert "**Evaluation gate: FAIL** — train/serve parity check failed" in (broken / "model" / "README.md").read_text()

    evaluate_after_training(parse_job(doc_for(intact, Path(data), **gate)), log=lines.append)
    report = json.loads((intact / "eval_report.json").read_text())
    assert report["gate"]["passed"] is True and report["parity"]["ok"] and report["parity"]["prompts"] == 3
    assert 0 <= report["parity"]["stopped"] <= 3  # an untrained model may never stop: reported, not required


def test_an_s3_output_gets_its_report_lineage_and_card_there(output, s3, s3_server):
    from kubetune.lineage import file_hashes, tree_hash
    from kubetune.storage import upload_tree

    client, bucket = s3
    uri = f"s3://{bucket}/jobs/t"
    doc = doc_for(Path(uri), output.parent / "data.jsonl", gate={"metric": "valid_loss", "mustBeat": "base"})
    doc["spec"]["output"]["uri"], doc["spec"]["storage"] = uri, {"endpoint": s3_server}
    job = parse_job(doc)
    upload_tree(output, uri, job.spec.storage)
    evaluate_after_training(job, log=lambda _: None)
    read = lambda key: client.get_object(Bucket=bucket, Key=f"jobs/t/{key}")["Body"].read()  # noqa: E731
    report = json.loads(read("eval_report.json"))
    # the exported model is the base model itself: a tie, which does not beat the base
    assert report["gate"]["passed"] is False and report["gate"]["value"] == report["gate"]["threshold"]
    lineage = json.loads(read("model/lineage.json"))
    assert lineage["prepared"]["hash"] == tree_hash(file_hashes(str(output / "prepared"))) and lineage["output"] == uri
    assert read("model/README.md").startswith(b"---\nbase_model: fromConfig:llama-tiny\n")
