"""OpenAI's reinforcement method through `kubetune api`: the pure translations (request → FineTuneJob with
objective rft, and back), then the official openai client against the real server and kube-apiserver."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from conftest import ROOT
from k8s_helpers import get
from kubetune.api import jobs as J
from kubetune.api.files import validate
from kubetune.openai_errors import RequestError
from kubetune.spec import parse_job

PROMPTS = (ROOT / "examples" / "rft-labels.jsonl").read_bytes()  # messages without an answer, plus "label"
TEN = b"\n".join(PROMPTS.split(b"\n")[:10]) + b"\n"
CHAT = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
CHECK = {"type": "string_check", "name": "team", "input": "{{sample.output_text}}", "reference": "{{item.label}}",
         "operation": "eq"}
SETTINGS = J.ApiSettings(files_uri="s3://b/files/", outputs_uri="s3://b/jobs/")
FILES = {"file-r": {"status": "processed", "uri": "s3://b/files/ns/file-r/data.jsonl",
                    "kinds": {"reinforcement": 20}, "item_fields": ["label"]},
         "file-a": {"status": "processed", "uri": "s3://b/files/ns/file-a/data.jsonl", "kinds": {"chat": 30}}}


def create(grader=CHECK, hyperparameters=None, **body) -> dict:
    method = {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hyperparameters or {}}}
    return J.job_document({"training_file": "file-r", "model": "kubetune-tiny", "method": method, **body},
                          "ftjob-x", "ns", FILES, SETTINGS)


def read_back(doc: dict) -> dict:
    return J.job_object({**doc, "metadata": {**doc["metadata"], "creationTimestamp": "2026-11-22T10:00:00Z"}})


def test_prompts_are_a_kind_of_their_own_with_the_item_fields_every_line_has():
    found = validate(PROMPTS)
    assert found["status"] == "processed" and found["kinds"] == {"reinforcement": 700}
    assert found["item_fields"] == ["label"]
    answered = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"}], "label": "A"}\n'
    assert validate(CHAT * 10)["kinds"] == {"chat": 10} and "item_fields" not in validate(CHAT * 10)
    mixed = validate(TEN + answered)  # one kind a line, as with chat and pairs
    assert mixed["kinds"] == {"reinforcement": 10, "chat": 1} and mixed["item_fields"] == ["label"]
    partial = validate(TEN + b'{"messages": [{"role": "user", "content": "x"}]}\n')
    assert partial["item_fields"] == []  # one line lacks label: no field is in every line
    bad = validate(TEN + b'{"messages": [{"role": "wizard", "content": "x"}]}\n')
    assert bad["status"] == "error" and "line 11:" in bad["status_details"] and "wizard" in bad["status_details"]


def test_a_reinforcement_request_becomes_an_rft_job_and_reads_back_as_openai_returns_it():
    doc = create(hyperparameters={"n_epochs": 2, "batch_size": 8, "compute_multiplier": 2, "eval_interval": 10,
                                  "eval_samples": 30, "reasoning_effort": "low"})
    spec = doc["spec"]
    assert spec["training"]["objective"] == "rft" and spec["training"]["epochs"] == 2
    assert spec["training"]["rft"] == {"grader": CHECK, "samplesPerPrompt": 8}
    assert spec["training"]["evalEvery"] == 10 and spec["evaluation"] == {"samples": 30}
    assert parse_job(doc, "t").spec.training.rft.samples_per_prompt == 8  # a valid FineTuneJob
    method = read_back(doc)["method"]
    assert method["type"] == "reinforcement" and method["reinforcement"]["grader"] == CHECK
    assert method["reinforcement"]["hyperparameters"] == {
        "n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 1.0, "compute_multiplier": 2.0,
        "eval_interval": 10, "eval_samples": 30, "reasoning_effort": "low"}
    defaults = read_back(create())["method"]["reinforcement"]["hyperparameters"]
    assert defaults["compute_multiplier"] == 1.0 and defaults["eval_interval"] == 50 and defaults["eval_samples"] == 50
    assert defaults["reasoning_effort"] == "default" and "samplesPerPrompt" not in create()["spec"]["training"]["rft"]


@pytest.mark.parametrize("multiplier, samples", [(0.1, 2), (0.6, 2), (1, 4), (1.4, 6), (3.3, 13), (16, 64)])
def test_compute_multiplier_scales_the_samples_per_prompt(multiplier, samples):
    rft = create(hyperparameters={"compute_multiplier": multiplier})["spec"]["training"]["rft"]
    assert rft["samplesPerPrompt"] == samples


@pytest.mark.parametrize("kwargs, param, words", [
    ({"grader": {**CHECK, "operation": "equals"}}, "method.reinforcement.grader.operation", "equals"),
    ({"grader": {"type": "score_model", "name": "judge", "model": "ft:x:ns::ftjob-1",
                 "input": [{"role": "user", "content": "{{sample.output_text}}"}]}},
     "method.reinforcement.grader", "score_model graders cannot be used"),
    ({"grader": {**CHECK, "reference": "{{item.answer}}"}}, "training_file", "field 'answer'"),
    ({"hyperparameters": {"beta": 0.1}}, "hyperparameters.beta", "unknown hyperparameter"),
    ({"hyperparameters": {"compute_multiplier": 0}}, "method.reinforcement.hyperparameters.compute_multiplier", ""),
    ({"hyperparameters": {"eval_interval": 1.5}}, "method.reinforcement.hyperparameters.eval_interval", ""),
    ({"hyperparameters": {"reasoning_effort": "max"}}, "method.reinforcement.hyperparameters.reasoning_effort", ""),
    ({"hyperparameters": {"batch_size": 21}}, "method.reinforcement.hyperparameters.batch_size", "20 examples"),
    ({"training_file": "file-a"}, "training_file", "no reinforcement prompts"),
    ({"validation_file": "file-a"}, "validation_file", "no reinforcement prompts"),
])
def test_bad_reinforcement_requests_name_the_parameter(kwargs, param, words):
    with pytest.raises(RequestError) as e:
        create(**kwargs)
    assert e.value.status == 400 and e.value.param == param and words in str(e.value), str(e.value)


def test_a_python_grader_is_allowed_it_runs_in_the_jobs_pod():
    python = {"type": "python", "name": "py", "source": "def grade(sample, item):\n    return 1.0\n"}
    assert create(grader=python)["spec"]["training"]["rft"]["grader"] == python


def test_rewards_carry_openais_names_in_events_checkpoints_and_results():
    doc = create()
    doc["metadata"]["creationTimestamp"] = "2026-11-22T10:00:00Z"
    doc["status"] = {"phase": "Succeeded", "completionTime": "2026-11-22T11:00:00Z",
                     "checkpoints": [{"name": "step-20", "step": 20, "metrics": {"valid_reward": 0.6}}]}
    (checkpoint,) = J.checkpoint_objects(doc)
    assert checkpoint["metrics"] == {"step": 20, "valid_reward": 0.6, "valid_reward_mean": 0.6}
    rows = [{"step": "10", "train_loss": "0.01", "reward_mean": "0.4", "kl": "0.02", "valid_reward": ""},
            {"step": "20", "train_loss": "0.02", "reward_mean": "0.5", "kl": "0.03", "valid_reward": "0.6"}]
    metrics = {e["data"]["step"]: e for e in J.event_objects(doc, [], rows) if e["type"] == "metrics"}
    assert metrics[20]["data"]["train_reward_mean"] == 0.5 and metrics[20]["data"]["valid_reward_mean"] == 0.6
    assert "train_reward_mean=0.5" in metrics[20]["message"] and "valid_reward_mean" not in metrics[10]["data"]
    assert J.results_csv(rows, "rft") == (b"step,train_loss,train_reward_mean,valid_reward_mean\n"
                                          b"10,0.01,0.4,\n20,0.02,0.5,0.6\n")


@pytest.mark.k8s
def test_a_reinforcement_job_with_the_openai_client(control_plane, namespace, s3, s3_server, tmp_path):
    from test_openai_api import caller, running_api

    cp = control_plane
    key = caller(cp, namespace, "rl", ["get", "list", "create"])
    with running_api(cp, namespace, s3[1], s3_server, tmp_path) as base_url:
        client = OpenAI(base_url=base_url, api_key=key, max_retries=0)
        prompts = client.files.create(file=("labels.jsonl", PROMPTS), purpose="fine-tune")
        assert prompts.status == "processed", prompts.status_details
        method = {"type": "reinforcement", "reinforcement": {"grader": CHECK, "hyperparameters": {
            "n_epochs": 1, "compute_multiplier": 2, "eval_interval": 5, "reasoning_effort": "medium"}}}
        job = client.fine_tuning.jobs.create(model="kubetune-tiny", training_file=prompts.id, method=method)
        training = get(cp, namespace, "ftj", job.id)["spec"]["training"]  # accepted by the CRD's own checks
        assert training["objective"] == "rft" and training["rft"] == {"grader": CHECK, "samplesPerPrompt": 8}
        assert training["evalEvery"] == 5 and training["epochs"] == 1

        back = client.fine_tuning.jobs.retrieve(job.id)
        assert back.method.type == "reinforcement" and back.method.reinforcement.grader.type == "string_check"
        assert back.method.reinforcement.grader.reference == "{{item.label}}"
        hp = back.method.reinforcement.hyperparameters
        assert (hp.n_epochs, hp.compute_multiplier, hp.eval_interval, hp.reasoning_effort) == (1, 2.0, 5, "medium")

        with pytest.raises(openai.BadRequestError, match="unknown operation 'equals'") as e:
            client.fine_tuning.jobs.create(model="kubetune-tiny", training_file=prompts.id, method={
                "type": "reinforcement", "reinforcement": {"grader": {**CHECK, "operation": "equals"}}})
        assert e.value.param == "method.reinforcement.grader.operation"
        with pytest.raises(openai.BadRequestError, match="no chat examples") as e:
            client.fine_tuning.jobs.create(model="kubetune-tiny", training_file=prompts.id)  # supervised
        assert e.value.param == "training_file"
        with pytest.raises(openai.BadRequestError, match="unknown hyperparameter 'beta'") as e:
            client.fine_tuning.jobs.create(model="kubetune-tiny", training_file=prompts.id, method={
                "type": "reinforcement", "reinforcement": {"grader": CHECK, "hyperparameters": {"beta": 0.1}}})
        assert e.value.param == "hyperparameters.beta"
        with pytest.raises(openai.BadRequestError, match="field 'answer'") as e:
            client.fine_tuning.jobs.create(model="kubetune-tiny", training_file=prompts.id, method={
                "type": "reinforcement", "reinforcement": {"grader": {**CHECK, "reference": "{{item.answer}}"}}})
        assert e.value.param == "training_file"
        assert [j.id for j in client.fine_tuning.jobs.list().data] == [job.id]  # nothing else was created
