"""Reinforcement fine-tuning (training.objective: rft): the spec, preparation of prompts with their items, the
GRPO math, generation agreeing with the packed scoring, and real DeepSpeed runs on CPU with a tiny from-config
Llama: after a supervised warm-up that knows the teams by name but answers with random letters, it learns to
route examples/rft-labels.jsonl's tickets from the grader alone (its held-out grader score rises clearly above
the warm-up's), and a run stopped by SIGTERM resumes on the same prompt batches."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import EXAMPLES, job_doc
from test_graders import chat_server, judge  # noqa: F401  (chat_server: the fixture)
from kubetune.crd import spec_schema
from kubetune.data.prepare import prepare
from kubetune.data.prompts import MissingItemField
from kubetune.errors import EXIT_INVALID, EXIT_STOPPED, exit_code
from kubetune.evaluate.run import evaluate_job
from kubetune.packed import IGNORE
from kubetune.spec import SpecError, parse_job
from kubetune.train import grpo
from kubetune.train.launch import cpu_threads_env, torchrun_command
from kubetune.train.plan import fingerprint, make_plan, step_rows

STEPS, MARGIN = 150, 0.1  # measured: held-out 0.44 -> 0.56, training rewards 0.30 -> 0.69 (README)
GRADER = {"type": "string_check", "name": "team", "input": "{{sample.output_text}}", "reference": "{{item.label}}",
          "operation": "eq"}


def rft_doc(train: str, output: str, rft: dict | None = None, **training) -> dict:
    return job_doc(train, output, preprocessing={"maxSeqLength": 128},
                   training={"method": "full", "objective": "rft", "rft": {"grader": GRADER, **(rft or {})}, **training},
                   evaluation={"samples": 0})


# ---- spec ---------------------------------------------------------------------------------------------------

def test_spec_defaults_and_errors_name_the_field(tmp_path):
    t = parse_job(rft_doc("d.jsonl", "out")).spec.training
    assert (t.rft.samples_per_prompt, t.rft.max_new_tokens, t.rft.temperature, t.rft.kl_coef, t.rft.clip_epsilon) == \
        (4, 64, 1.0, 0.04, 0.2)
    assert t.best_metric == "valid_reward" and t.rft.grader.type == "string_check"
    cases = [({"samplesPerPrompt": 1}, "spec.training.rft.samplesPerPrompt"),
             ({"grader": {**GRADER, "operation": "is"}}, "spec.training.rft.grader.string_check.operation"),
             ({"grader": {**GRADER, "type": "nope"}}, "spec.training.rft.grader"),
             ({"grader": {"type": "score_model", "name": "judge", "model": "m", "input": [
                 {"role": "user", "content": "{{sample.output_text}}"}]}}, "spec.training.rft: judges has no "
              "endpoint for the score_model model 'm'")]
    for rft, field in cases:
        with pytest.raises(SpecError) as e:
            parse_job(rft_doc("d.jsonl", "out", rft))
        assert e.value.problems[0].startswith(field), e.value.problems
    doc = rft_doc("d.jsonl", "out")
    del doc["spec"]["training"]["rft"]
    with pytest.raises(SpecError, match="objective: rft needs training.rft"):
        parse_job(doc)
    with pytest.raises(SpecError, match="rft settings are only allowed with objective: rft"):
        parse_job(rft_doc("d.jsonl", "out", objective="sft"))
    with pytest.raises(SpecError, match="use valid_reward"):
        parse_job(rft_doc("d.jsonl", "out", bestMetric="valid_loss"))


def test_crd_keeps_the_grader_an_open_object():
    rft = spec_schema()["properties"]["training"]["properties"]["rft"]["properties"]
    assert rft["grader"]["type"] == "object" and rft["grader"]["x-kubernetes-preserve-unknown-fields"]
    assert "oneOf" not in json.dumps(spec_schema())
    assert parse_job(yaml.safe_load((EXAMPLES / "rft-job.yaml").read_text())).spec.training.objective == "rft"


# ---- preparation -------------------------------------------------------------------------------------------

def test_prepare_keeps_items_scrubs_prompts_and_counts_fields(tmp_path):
    lines = [{"messages": [{"role": "user", "content": f"Ticket {i}: my invoice is wrong, mail me at ann{i}@x.org"}],
              "label": "A", "meta": {"n": i}} for i in range(30)]
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    job = parse_job(rft_doc(str(data), str(tmp_path / "out")))
    report = prepare(job, log=lambda _: None)
    assert report["objective"] == "rft" and sum(report["rft"]["prompts"].values()) == report["examples_in"] - \
        report["duplicates"]["exact"] - report["duplicates"]["near"]
    assert report["rft"]["item_fields"]["label"]["distinct_values"] == 1 and report["pii_redacted"]["email"] > 0
    record = json.loads((tmp_path / "out" / "prepared" / "train.jsonl").read_text().splitlines()[0])
    assert "<EMAIL>" in record["messages"][0]["content"] and record["item"]["label"] == "A" and "meta" in record["item"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
    assert tok.decode(record["prompt_ids"]).endswith("<|im_start|>assistant\n")  # the generation prompt


def test_a_line_missing_a_referenced_field_fails_naming_line_and_field(tmp_path):
    data = tmp_path / "p.jsonl"
    good = {"messages": [{"role": "user", "content": "my parcel is late, what now?"}], "label": "B"}
    data.write_text(json.dumps(good) + "\n" + json.dumps({**good, "label": None} | {"x": 1}).replace(
        '"label": null, ', "") + "\n")
    with pytest.raises(MissingItemField) as e:
        prepare(parse_job(rft_doc(str(data), str(tmp_path / "out"))), log=lambda _: None)
    assert ":2:" in str(e.value) and "'label'" in str(e.value) and exit_code(e.value) == EXIT_INVALID == 3


# ---- GRPO math ---------------------------------------------------------------------------------------------

def test_group_advantages_and_loss():
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5]), 4)
    assert adv[:4].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-3)  # (r - 0.25) / std (unbiased 0.5)
    assert adv[4:].abs().max() == 0  # a group that scored alike teaches nothing
    logp, old = torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.25, 0.25]))  # ratio 2
    loss, kl, clipped = grpo.token_losses(logp, old, None, torch.tensor([1.0, -1.0]), 0.2, 0.04)
    assert loss.tolist() == pytest.approx([-1.2, 2.0]) and clipped.tolist() == [True, False] and kl.sum() == 0
    ref = torch.log(torch.tensor([0.25, 0.5]))
    _, kl, _ = grpo.token_losses(logp, logp, ref, torch.zeros(2), 0.2, 0.04)
    assert kl.tolist() == pytest.approx([0.5 - torch.log(torch.tensor(0.5)).item() - 1, 0.0])  # k3
    rows = grpo.completion_rows([[5, 6, 7]], [[8, 9]])
    assert rows.labels[0].tolist() == [IGNORE] * 3 + [8, 9] and rows.label_at[0].tolist() == [2, 3]


def test_padded_generation_agrees_with_packed_scoring(tmp_path):
    """Greedy answers to prompts of different lengths, generated left-padded with the KV cache, are each token
    the argmax of the packed forward pass that scores them: positions and masks line up."""
    from kubetune.models import build_model, train_tokenizer
    from kubetune.packed.head import forward_logps, install
    from kubetune.packed.rows import collate
    from kubetune.train import sampling

    tok = train_tokenizer(["route the ticket about my parcel or invoice please"] * 20, 300)
    job = parse_job(rft_doc("d.jsonl", "out"))
    model = build_model(job, tok, None, torch.float32)
    install(model)
    prompts = [tok("route the ticket")["input_ids"], tok("my parcel or invoice please, route it")["input_ids"]]
    done = sampling.sample(model, prompts, 1, 5, None, tok.pad_token_id, tok.eos_token_id, False)
    batch = collate(grpo.completion_rows(prompts, done), [0, 1], tok.pad_token_id)
    _, top = forward_logps(model, batch)
    assert len(top) == sum(len(d) for d in done) and bool(top.all())


# ---- real runs -----------------------------------------------------------------------------------------------

def example_job(tmp_path: Path, example: str, name: str, model: dict | None = None, evaluation: dict | None = None,
                **training) -> Path:
    """examples/EXAMPLE.yaml, shortened for a test, its data from examples/ and its output under tmp_path;
    prepared. ``model`` and ``evaluation`` replace the example's (rft-job.yaml's starts from the warm-up's
    output)."""
    doc = yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["dataset"]["train"] = str(EXAMPLES / Path(doc["spec"]["dataset"]["train"]).name)
    doc["spec"]["output"]["uri"] = str(tmp_path / name)
    doc["spec"]["model"] = model or doc["spec"]["model"]
    doc["spec"]["evaluation"] = evaluation or doc["spec"]["evaluation"]
    doc["spec"]["training"].update(training)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    prepare(parse_job(doc), log=lambda _: None)
    return path


def labels_job(tmp_path: Path, name: str, model: dict | None = None, **training) -> Path:
    """examples/rft-job.yaml from ``model`` (default: a fresh tiny model), gated on grader_score."""
    return example_job(tmp_path, "rft-job", name, model or {"fromConfig": {"size": "tiny", "vocabSize": 320}},
                       {"samples": 50, "gate": {"metric": "grader_score", "mustBeat": "base"}}, **training)


def run_ranks(job: Path, scratch: Path, nproc: int, timeout: int = 600) -> str:
    env = {**os.environ, **cpu_threads_env(nproc), "KUBETUNE_SCRATCH": str(scratch)}
    done = subprocess.run(torchrun_command(str(job), nproc), env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr


@pytest.mark.slow
def test_rft_teaches_the_routing_that_only_the_grader_knows(tmp_path):
    """examples/rft-warmup.yaml then examples/rft-job.yaml: the warm-up names a ticket's team but answers the
    routing prompt with a letter picked at random (its held-out grader score is about 1/3: the share of its one
    greedy letter). Reinforcement fine-tuning, from grades alone, teaches which letter is which team: the
    held-out score rises clearly above the warm-up's, as do the training rewards."""
    scratch = tmp_path / "scratch"
    run_ranks(example_job(tmp_path, "rft-warmup", "warmup"), scratch, 1)
    job = labels_job(tmp_path, "learn", {"source": str(tmp_path / "warmup" / "model")}, maxSteps=STEPS,
                     checkpointEvery=STEPS, evalEvery=STEPS)
    run_ranks(job, scratch, 1)
    report = evaluate_job(parse_job(yaml.safe_load(job.read_text())), log=lambda _: None)
    base, tuned = (report["metrics"][m]["grader_score"] for m in ("base", "fine_tuned"))
    print(f"held-out grader_score: warm-up {base:.3f}, after RFT {tuned:.3f}")
    assert 0.15 < base < 0.6 and tuned >= base + MARGIN, report["metrics"]
    assert report["gate"]["passed"] and report["samples"] == 50
    metrics = (tmp_path / "learn" / "metrics.csv").read_text().splitlines()
    assert metrics[0].split(",")[:6] == ["step", "epoch", "train_loss", "reward_mean", "reward_std", "kl"]
    rewards = [float(line.split(",")[3]) for line in metrics[1:]]
    assert sum(rewards[-25:]) / 25 > sum(rewards[:25]) / 25 + MARGIN, rewards  # training rewards rose too
    assert (tmp_path / "learn" / "loss_curve.png").exists()


@pytest.mark.slow
def test_sigterm_then_resume_trains_on_the_same_prompt_batches(tmp_path):
    """2 ranks, LoRA under ZeRO-3 (generation in step across ranks): SIGTERM after a step checkpoints it, the
    rerun resumes there, and every step's prompts are the seeded plan's."""
    job = labels_job(tmp_path, "resume", method="lora", zeroStage=3, maxSteps=30, checkpointEvery=100, evalEvery=100,
                     globalBatchSize=4, microBatchSize=2,
                     rft={"grader": GRADER, "samplesPerPrompt": 2, "maxNewTokens": 3})
    out, scratch = tmp_path / "resume", tmp_path / "scratch"
    env = {**os.environ, **cpu_threads_env(2), "KUBETUNE_SCRATCH": str(scratch)}
    proc = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "train-job", str(job), "--nproc-per-node=2",
                             "--standalone"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (out / "progress.json").exists() or json.loads((out / "progress.json").read_text())["step"] < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_STOPPED, log[-3000:]
    step = int(next(line for line in log.splitlines() if "stopped by SIGTERM after step" in line)
               .split("after step ")[1].split(",")[0])
    assert 2 <= step < 30
    rerun = run_ranks(job, scratch, 2)
    assert f"resuming from the complete checkpoint at step {step}" in rerun
    lines = (out / "metrics.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 31)]
    prompts = sum(1 for _ in open(out / "prepared" / "train.jsonl"))
    plan = make_plan(prompts, 4, 2, 2, 3, 30)
    assert [r["batch"] for r in rows] == [fingerprint(step_rows(plan, 42, s)) for s in range(30)]
    assert "samples_per_second" in header and (out / "model").exists()


@pytest.mark.slow
def test_a_score_model_grader_asks_its_judge_for_every_sample(tmp_path, chat_server):
    """A score_model grader in training: every sampled answer goes, its template filled, to the judge named in
    training.rft.judges (a real HTTP server on loopback that answers the score the message asks for; a model's
    scores could not be asserted), and each step's reward is the judge's."""
    points = {"A": 2, "B": 5, "C": 9}
    lines = [json.loads(line) for line in (EXAMPLES / "rft-labels.jsonl").read_text().splitlines()[:60]]
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({**x, "points": points[x["label"]]}) + "\n" for x in lines))
    grader = judge("Ticket for team {{item.label}}, answer {{sample.output_text}}. REPLY:{{item.points}}")
    doc = rft_doc(str(data), str(tmp_path / "out"), {"grader": grader, "samplesPerPrompt": 2, "maxNewTokens": 2,
                                                     "judges": {grader["model"]: {"url": chat_server.url}}},
                  maxSteps=2, globalBatchSize=4, microBatchSize=4, evalEvery=100, checkpointEvery=100)
    job = tmp_path / "judge.yaml"
    job.write_text(yaml.safe_dump(doc))
    prepare(parse_job(doc), log=lambda _: None)
    run_ranks(job, tmp_path / "scratch", 1)
    train = [json.loads(x) for x in (tmp_path / "out" / "prepared" / "train.jsonl").read_text().splitlines()]
    plan = make_plan(len(train), 4, 4, 1, 3, 2)
    rows = list(csv.DictReader((tmp_path / "out" / "metrics.csv").open()))
    assert len(rows) == 2
    for step, row in enumerate(rows):
        expected = sum(train[int(i)]["item"]["points"] for i in step_rows(plan, 42, step)) / 4
        assert float(row["reward_mean"]) == pytest.approx(expected)  # each sample scored by the judge's reply
    asked = [r for r in chat_server.requests if r["path"] == "/v1/chat/completions"]
    assert len(asked) >= 2 * 4 * 2 and asked[0]["body"]["model"] == grader["model"] and asked[0]["auth"] is None
    assert asked[0]["body"]["messages"][-1]["content"].startswith("Ticket for team ")
