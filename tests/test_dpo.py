"""Preference tuning (training.objective: dpo): the record formats, the loss, preparation of pairs, and real
DeepSpeed runs on CPU (2 ranks, gloo) with a tiny from-config Llama: LoRA learns the preference of
examples/preference.jsonl (friendly answers over curt ones), a full fine-tune under ZeRO-3 runs."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import EXAMPLES
from kubetune.data.formats import FormatError
from kubetune.data.preference import standardize_pair
from kubetune.data.prepare import prepare
from kubetune.packed import IGNORE
from kubetune.packed.loss import logits_logps
from kubetune.packed.rows import Rows, collate
from kubetune.spec import parse_job
from kubetune.train import dpo
from test_train_distributed import train

USER = {"role": "user", "content": "How do I export my notes?"}
GOOD = {"role": "assistant", "content": "Open Settings > Data > Export."}
BAD = {"role": "assistant", "content": "Read the manual."}


# ---- record formats --------------------------------------------------------------------------------------

def test_openai_preference_format():
    tools = [{"type": "function", "function": {"name": "export_notes", "parameters": {"type": "object"}}}]
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "export_notes", "arguments": "{}"}}]}
    record = {"input": {"messages": [{"role": "system", "content": "Be kind."}, USER], "tools": tools},
              "preferred_output": [call], "non_preferred_output": [BAD]}
    prompt, chosen, rejected, found = standardize_pair(record)
    assert [m["role"] for m in prompt] == ["system", "user"] and all(m["weight"] == 0 for m in prompt)
    assert chosen["tool_calls"][0]["function"]["name"] == "export_notes" and chosen["weight"] == 1
    assert rejected == {**BAD, "weight": 1}
    assert found == tools


@pytest.mark.parametrize("record", [
    {"prompt": USER["content"], "chosen": GOOD["content"], "rejected": BAD["content"]},            # text
    {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},                                       # conversational
    {"chosen": [USER, GOOD], "rejected": [USER, BAD]},                                             # implicit prompt
], ids=["text", "conversational", "implicit-prompt"])
def test_prompt_chosen_rejected_format(record):
    prompt, chosen, rejected, tools = standardize_pair(record)
    assert prompt == [{**USER, "weight": 0}]
    assert (chosen["content"], rejected["content"]) == (GOOD["content"], BAD["content"])
    assert tools is None


@pytest.mark.parametrize("record, reason", [
    ({"messages": [USER, GOOD]}, "not a preference pair"),
    ({"input": {"messages": [USER]}, "preferred_output": [GOOD]}, "missing field 'non_preferred_output'"),
    ({"input": [USER], "preferred_output": [GOOD], "non_preferred_output": [BAD]}, "input must be an object"),
    ({"input": {"messages": []}, "preferred_output": [GOOD], "non_preferred_output": [BAD]}, "input.messages is empty"),
    ({"input": {"messages": [{"role": "robot", "content": "x"}]}, "preferred_output": [GOOD],
      "non_preferred_output": [BAD]}, "input.messages[0]: unknown role"),
    ({"input": {"messages": [USER, GOOD]}, "preferred_output": [GOOD], "non_preferred_output": [BAD]},
     "input.messages ends with an assistant message"),
    ({"input": {"messages": [USER]}, "preferred_output": [GOOD, GOOD], "non_preferred_output": [BAD]},
     "preferred_output must be a list of exactly one assistant message"),
    ({"input": {"messages": [USER]}, "preferred_output": [GOOD], "non_preferred_output": [{**BAD, "content": 3}]},
     "non_preferred_output[0]: content must be text"),
    ({"input": {"messages": [USER]}, "preferred_output": [USER], "non_preferred_output": [BAD]},
     "preferred_output[0]: role must be 'assistant'"),
    ({"prompt": "q?", "chosen": "a", "rejected": 7}, "rejected must be text or a list of exactly one"),
    ({"prompt": {"text": "q?"}, "chosen": "a", "rejected": "b"}, "prompt must be text or a list of messages"),
    ({"chosen": [USER, GOOD], "rejected": [{**USER, "content": "Other?"}, BAD]}, "differ before their last message"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
])
def test_bad_shapes_name_the_field_and_why(record, reason):
    with pytest.raises(FormatError) as e:
        standardize_pair(record)
    assert reason in str(e.value)


# ---- the loss ----------------------------------------------------------------------------------------------

def test_dpo_loss_by_hand():
    # policy prefers chosen by 2 nats more than the reference does: loss = -log sigmoid(beta * 2) = log(1 + e^-1)
    losses, rc, rr = dpo.dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                                  torch.tensor([-2.0]), beta=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)  # 0.3133
    assert (rc.item(), rr.item()) == (pytest.approx(0.5), pytest.approx(-0.5))
    same, _, _ = dpo.dpo_loss(torch.tensor([-4.0]), torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-1.0]), 0.1)
    assert same.item() == pytest.approx(math.log(2))  # the policy is the reference: log 2, whatever the log-probs


def test_sequence_log_probs_are_summed_per_document():
    torch.manual_seed(0)
    doc_lens = [[3, 2, 2, 3], [4, 3]]  # row 0: two pairs; row 1: one pair and padding
    length, vocab = 10, 7
    logits = torch.randn(2, length, vocab)
    labels = torch.randint(0, vocab, (2, length))
    labels[:, 0] = IGNORE
    labels[0, 3] = labels[0, 5] = labels[0, 7] = IGNORE  # the first token of each document is unlabeled
    labels[1, 4] = IGNORE
    labels[1, 7:] = IGNORE
    labels[0, 1] = IGNORE  # a prompt token
    rows = Rows(input_ids=[[0] * 10, [0] * 7], labels=[labels[0].tolist(), labels[1, :7].tolist()], doc_lens=doc_lens)
    batch = collate(rows, [0, 1], pad_id=0)
    label_logps, _ = logits_logps(logits.flatten(0, 1)[batch.index], batch.target)
    sums = dpo.document_sums(batch, label_logps)
    logp = torch.log_softmax(logits, -1)
    by_hand = torch.zeros(2, 4)
    for b, lens in enumerate(doc_lens):
        start = 0
        for d, n in enumerate(lens):
            for t in range(start + 1, start + n):  # the label at t is predicted at t - 1
                if labels[b, t] != IGNORE:
                    by_hand[b, d] += logp[b, t - 1, labels[b, t]]
            start += n
    assert torch.allclose(sums, torch.cat([by_hand[0], by_hand[1, :2]]), atol=1e-5)  # documents through the batch
    chosen, rejected = dpo.pair_logps(batch, label_logps)
    assert torch.equal(chosen, sums[[0, 2, 4]])
    assert torch.equal(rejected, sums[[1, 3, 5]])


def test_pairs_are_packed_whole_chosen_first(tmp_path):
    from kubetune.data.shards import ShardWriter, TokenizedChunk

    lens = [(30, 20), (10, 12), (60, 64), (5, 6)]
    docs = [n for pair in lens for n in pair]
    chunk = TokenizedChunk(examples=[b"{}"] * len(lens), ids=np.arange(sum(docs), dtype=np.int32),
                      labels=np.arange(sum(docs), dtype=np.int32), doc_lens=np.array(docs), docs_per_unit=2)
    for packing, folder in ((True, tmp_path / "packed"), (False, tmp_path / "unpacked")):
        folder.mkdir()
        writer = ShardWriter(folder, "train", 64, packing, pairs=True)
        writer.add(chunk)
        writer.close()
        rows = pq.read_table(folder / "train-00000.parquet").to_pylist()
        found = sorted(tuple(row["doc_lens"][i: i + 2]) for row in rows for i in range(0, len(row["doc_lens"]), 2))
        assert found == sorted(lens)  # every pair whole, chosen first
        assert all(len(row["doc_lens"]) % 2 == 0 and sum(row["doc_lens"]) <= 128 for row in rows)
        assert len(rows) < len(lens) if packing else len(rows) == len(lens)


def test_spec_fields():
    doc = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "p"},
           "spec": {"model": {"fromConfig": {}}, "dataset": {"train": "d/"}, "output": {"uri": "o/"}}}
    assert parse_job(doc).spec.training.objective == "sft"
    doc["spec"]["training"] = {"objective": "dpo", "bestMetric": "valid_pref_accuracy"}
    t = parse_job(doc).spec.training
    assert (t.dpo.beta, t.dpo.sft_weight) == (0.1, 0.0)
    doc["spec"]["training"]["dpo"] = {"beta": 0, "sftWeight": -1}
    with pytest.raises(Exception, match="(?s)training.dpo.beta.*training.dpo.sftWeight"):
        parse_job(doc)


# ---- preparation and training --------------------------------------------------------------------------------

def job_doc(output: Path, data: Path, **training) -> dict:
    doc = yaml.safe_load((EXAMPLES / "dpo-job.yaml").read_text())
    doc["spec"]["dataset"]["train"] = str(data)
    doc["spec"]["output"]["uri"] = str(output)
    doc["spec"]["training"].update({"epochs": 2, **training})
    doc["spec"]["evaluation"] = {"samples": 0, "gate": {"metric": "valid_pref_accuracy", "mustBeat": "base"}}
    return doc


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """examples/preference.jsonl plus a few lines to be cleaned, prepared once: (output folder, data report)."""
    tmp = tmp_path_factory.mktemp("dpo")
    lines = (EXAMPLES / "preference.jsonl").read_text().splitlines()
    pii = json.loads(lines[0])
    pii["non_preferred_output"][0]["content"] = "Mail jane.doe@example.com yourself."
    extra = [lines[0],  # an exact duplicate pair
             json.dumps(pii),
             json.dumps({"prompt": "Hi?", "chosen": "Hello there, how can I help?", "rejected": 5}),  # bad
             json.dumps({**json.loads(lines[1]), "non_preferred_output": json.loads(lines[1])["preferred_output"]})]
    data = tmp / "data.jsonl"
    data.write_text("\n".join(lines + extra) + "\n")
    out = tmp / "prepared-out"
    report = prepare(parse_job(job_doc(out, data)), log=lambda _: None)
    return out, report, data


def test_prepare_pairs(prepared):
    out, report, _ = prepared
    assert report["objective"] == "dpo"
    assert report["bad_lines"]["total"] == 1 and "rejected must be text" in report["bad_lines"]["first"][0]["reason"]
    assert report["dropped"]["exact_duplicate"] >= 1 and report["dropped"]["identical_answers"] == 1
    assert report["pii_redacted"]["email"] == 1
    assert sum(report["dropped"].values()) + sum(report["examples_out"].values()) == report["examples_in"]
    meta = json.loads((out / "prepared" / "meta.json").read_text())
    assert meta["objective"] == "dpo"
    rows = pq.read_table(out / meta["train"]["files"][0]).to_pylist()
    assert sum(len(r["doc_lens"]) for r in rows) == 2 * report["examples_out"]["train"]
    for row in rows:
        assert len(row["doc_lens"]) % 2 == 0 and sum(row["doc_lens"]) == len(row["input_ids"])
        start = 0
        for n in row["doc_lens"]:  # each document: an unlabeled prompt, then its labeled answer
            labels = row["labels"][start : start + n]
            trained = [i for i, x in enumerate(labels) if x != IGNORE]
            assert trained and trained == list(range(trained[0], n)) and trained[0] > 1
            start += n
    kept = [json.loads(line) for line in (out / "prepared" / "train.jsonl").read_text().splitlines()]
    assert len(kept) == report["examples_out"]["train"]
    assert all(k["rejected"]["role"] == "assistant" and k["messages"][-1]["role"] == "assistant" for k in kept)
    assert not any("jane.doe" in json.dumps(k) for k in kept)


def test_train_needs_data_prepared_for_its_objective(prepared, tmp_path):
    from kubetune.errors import KubetuneError
    from kubetune.train.recipe import check_objective

    check_objective(prepared[0], "dpo")
    with pytest.raises(KubetuneError, match="prepared data is for training.objective dpo, but the job's is sft"):
        check_objective(prepared[0], "sft")


def _copy_prepared(prepared_out: Path, out: Path) -> None:
    for part in ("prepared", "tokenizer"):
        shutil.copytree(prepared_out / part, out / part)
    shutil.copy(prepared_out / "data_report.json", out / "data_report.json")


def _metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_lora_dpo_learns_the_preference(prepared, tmp_path):
    from kubetune.evaluate.run import evaluate_after_training

    out = tmp_path / "out"
    doc = job_doc(out, prepared[2])
    _copy_prepared(prepared[0], out)
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(doc))
    log = train(job_file)
    assert "DPO (beta 0.1)" in log and "lora" in log
    rows = _metrics(out)
    assert float(rows[0]["train_loss"]) == pytest.approx(math.log(2), abs=1e-4)  # adapter off = the reference
    valid = [r for r in rows if r["valid_loss"]]
    assert float(valid[-1]["valid_pref_accuracy"]) >= 0.8 and float(valid[-1]["valid_reward_margin"]) > 0
    assert float(valid[-1]["valid_loss"]) < 0.5 < math.log(2)
    assert all(r["pref_accuracy"] != "" and r["reward_margin"] != "" for r in rows)
    progress = json.loads((out / "progress.json").read_text())
    assert {"valid_pref_accuracy", "valid_reward_margin", "valid_logp_chosen", "valid_logp_rejected",
            "pref_accuracy"} <= set(progress["metrics"])
    assert (out / "loss_curve.png").stat().st_size > 10_000
    checkpoints = json.loads((out / "checkpoints.json").read_text())
    assert any(c.get("best") for c in checkpoints) and "valid_pref_accuracy" in checkpoints[-1]["metrics"]

    evaluate_after_training(parse_job(doc), log=lambda _: None)
    report = json.loads((out / "eval_report.json").read_text())
    base, tuned = report["metrics"]["base"], report["metrics"]["fine_tuned"]
    assert tuned["valid_pref_accuracy"] >= 0.8 and tuned["valid_pref_accuracy"] > base["valid_pref_accuracy"]
    assert tuned["valid_reward_margin"] > base["valid_reward_margin"] == 0
    # the evaluation recomputes what training's last validation reported (base model as the reference)
    assert tuned["valid_loss"] == pytest.approx(float(valid[-1]["valid_loss"]), rel=1e-3)
    assert report["gate"]["passed"] and report["gate"]["metric"] == "valid_pref_accuracy"
    assert "valid_logp_chosen" in (out / "eval_report.md").read_text()


@pytest.mark.slow
def test_full_fine_tune_dpo_under_zero3(prepared, tmp_path):
    out = tmp_path / "out"
    doc = job_doc(out, prepared[2], method="full", zeroStage=3, learningRate=1e-3, maxSteps=3, evalEvery=3,
                  checkpointEvery=3, dpo={"beta": 0.1, "sftWeight": 0.5})
    del doc["spec"]["training"]["lora"]
    _copy_prepared(prepared[0], out)
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(doc))
    log = train(job_file)
    assert "ZeRO-3, full, DPO" in log
    rows = _metrics(out)
    assert len(rows) == 3
    last = rows[-1]
    for key in ("train_loss", "pref_accuracy", "reward_margin", "valid_loss", "valid_pref_accuracy",
                "valid_reward_margin", "valid_logp_chosen", "valid_logp_rejected"):
        assert math.isfinite(float(last[key])), (key, last)
    # the stored reference is the base model, so the first step's DPO part is log 2 (plus 0.5 x the chosen NLL)
    assert float(rows[0]["train_loss"]) > math.log(2)
    assert (out / "model" / "model.safetensors").exists()
