"""The pure translations of `kubetune api`: requests to FineTuneJobs, FineTuneJobs to OpenAI objects."""

from __future__ import annotations

import json

import pytest

from kubetune.api import jobs as J
from kubetune.api.files import validate
from kubetune.openai_errors import RequestError

SETTINGS = J.ApiSettings(files_uri="s3://b/files/", outputs_uri="s3://b/jobs/",
                         job_defaults={"training": {"method": "full", "microBatchSize": 8}},
                         models={"llama-1b": {"source": "s3://models/llama-1b/"}})
FILES = {"file-a": {"status": "processed", "uri": "s3://b/files/ns/file-a/data.jsonl", "kinds": {"chat": 30}},
         "file-p": {"status": "processed", "uri": "s3://b/files/ns/file-p/data.jsonl", "kinds": {"preference": 12}},
         "file-e": {"status": "error", "uri": "s3://b/files/ns/file-e/data.jsonl", "kinds": {"chat": 3},
                    "status_details": "Training file has 3 example(s), but must have at least 10 examples"}}


def create(**body) -> dict:
    return J.job_document({"training_file": "file-a", "model": "llama-1b", **body}, "ftjob-x", "ns", FILES, SETTINGS)


@pytest.mark.parametrize("base", ["kubetune-tiny", "s3://models/llama:3b/", "ft:kubetune-tiny:ns:a:ftjob-1"])
def test_fine_tuned_model_names_parse_back_to_their_job(base):
    name = J.fine_tuned_model(base, "team-a", "support", "ftjob-abc")
    assert J.parse_model(name) == ("team-a", "ftjob-abc", None)
    assert J.parse_model(f"{name}:ckpt-step-40") == ("team-a", "ftjob-abc", "step-40")
    assert J.parse_model("gpt-4o-mini") is None and J.parse_model("ft:too:short") is None


def test_request_becomes_a_job_on_top_of_the_defaults():
    doc = create(hyperparameters={"n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": 2}, seed=3, suffix="s")
    spec = doc["spec"]
    assert spec["model"] == {"source": "s3://models/llama-1b/"}
    assert spec["training"] == {"method": "full", "epochs": 4, "globalBatchSize": 4, "microBatchSize": 4,
                                "learningRate": pytest.approx(4e-5), "seed": 3}
    assert spec["output"]["uri"] == "s3://b/jobs/ns/ftjob-x/" and spec["dataset"]["train"] == FILES["file-a"]["uri"]
    job = J.job_object({**doc, "metadata": {**doc["metadata"], "creationTimestamp": "2026-11-22T10:00:00Z"}})
    assert job["hyperparameters"] == {"n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": 2.0}
    assert job["status"] == "validating_files" and job["created_at"] == 1795341600 and job["model"] == "llama-1b"
    assert json.loads(doc["metadata"]["annotations"][J.ANNOTATION])["suffix"] == "s"
    # every example the file check accepted is trained on: a one-letter label is no too-short reply to drop
    assert spec["preprocessing"] == {"minChars": 0}
    strict = J.ApiSettings(files_uri="s3://b/files/", outputs_uri="s3://b/jobs/",
                           job_defaults={"preprocessing": {"minChars": 4, "maxSeqLength": 512}})
    doc = J.job_document({"training_file": "file-a", "model": "kubetune-tiny"}, "ftjob-y", "ns", FILES, strict)
    assert doc["spec"]["preprocessing"] == {"minChars": 4, "maxSeqLength": 512}  # api.jobDefaults decides


@pytest.mark.parametrize("body, param", [
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": True}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"beta": 0.1}}, "hyperparameters.beta"),  # beta is DPO's
    ({"method": {"type": "rl"}}, "method.type"),
    ({"method": {"type": "reinforcement"}}, "method.reinforcement.grader"),  # a grader is required
    ({"method": {"type": "dpo", "dpo": "x"}}, "method.dpo"),
    ({"suffix": "a:b"}, "suffix"),
    ({"seed": -1}, "seed"),
    ({"model": "gpt-4o"}, "model"),
    ({"model": "ft:kubetune-tiny:other-ns::ftjob-1"}, "model"),  # another namespace's model
    ({"training_file": "file-missing"}, "training_file"),
    ({"training_file": "file-e"}, "training_file"),  # validation found it unusable
    ({"validation_file": "file-e"}, "validation_file"),
    ({"training_file": "file-a", "method": {"type": "dpo"}}, "training_file"),  # no pairs in it
    ({"validation_file": "file-p"}, "validation_file"),  # no chat examples in it
    ({"metadata": {"k": 1}}, "metadata"),
    ({"temperature": 1}, "temperature"),
])
def test_bad_requests_name_the_parameter(body, param):
    with pytest.raises(RequestError) as e:
        create(**body)
    assert e.value.status == 400 and e.value.param == param, str(e.value)


@pytest.mark.parametrize("body, param", [
    ({"hyperparameters": {"batch_size": 31}}, "hyperparameters.batch_size"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 64}}}},
     "method.supervised.hyperparameters.batch_size"),
    ({"training_file": "file-p", "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 13}}}},
     "method.dpo.hyperparameters.batch_size"),
])
def test_a_batch_larger_than_the_training_file_is_refused(body, param):
    with pytest.raises(RequestError) as e:
        create(**body)
    assert e.value.status == 400 and e.value.param == param
    examples = 12 if "dpo" in param else 30
    assert f"larger than the {examples} examples of training_file file-" in str(e.value)
    assert create(hyperparameters={"batch_size": 30})["spec"]["training"]["globalBatchSize"] == 30  # every example


def test_batch_size_auto_is_left_to_the_trainer_and_reported_once_resolved():
    doc = create(hyperparameters={"batch_size": "auto"})
    assert "globalBatchSize" not in doc["spec"]["training"]
    doc["metadata"]["creationTimestamp"] = "2026-11-22T10:00:00Z"
    assert J.job_object(doc)["hyperparameters"]["batch_size"] == "auto"
    doc["status"] = {"phase": "Training", "progress": {"step": 1, "globalBatchSize": 8}}
    job = J.job_object(doc)
    assert job["hyperparameters"]["batch_size"] == 8 == job["method"]["supervised"]["hyperparameters"]["batch_size"]


def test_a_succeeded_job_has_its_metrics_as_a_results_file():
    doc = create()
    doc["metadata"]["creationTimestamp"] = "2026-11-22T10:00:00Z"
    assert J.job_object(doc)["result_files"] == []
    doc["status"] = {"phase": "Succeeded", "completionTime": "2026-11-22T11:00:00Z"}
    (file_id,) = J.job_object(doc)["result_files"]
    assert J.results_job(file_id) == "ftjob-x" and J.results_job("file-abc") is None
    assert J.results_job("file-results-../x") is None
    rows = [{"step": "5", "epoch": "0.5", "train_loss": "3.1", "train_accuracy": "0.2", "valid_loss": ""},
            {"step": "10", "epoch": "1.0", "train_loss": "2.5", "train_accuracy": "0.4", "valid_loss": "2.4",
             "valid_mean_token_accuracy": "0.41", "batch": "abc"}]
    content = J.results_csv(rows)
    assert content == (b"step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n"
                       b"5,3.1,0.2,,\n10,2.5,0.4,2.4,0.41\n")
    record = J.results_file(doc, content)
    assert record["purpose"] == "fine-tune-results" and record["bytes"] == len(content) and record["id"] == file_id
    assert record["created_at"] == 1795345200  # the job's finish


def test_statuses_follow_the_phase():
    def status(phase=None, progress=None, cancelled=False):
        meta = {"name": "ftjob-x", "namespace": "ns", "annotations": {J.CANCELLED: "t"} if cancelled else {}}
        return J.openai_status({"metadata": meta, "spec": {}, "status": {"phase": phase, "progress": progress}})

    assert [status(), status("Pending"), status("Preparing"), status("Training"), status("Training", {"step": 0}),
            status("Training", {"step": 3}), status("Suspended"), status("Succeeded"), status("Failed"),
            status("Suspended", cancelled=True)] == [
        "validating_files", "validating_files", "validating_files", "queued", "queued", "running", "paused",
        "succeeded", "failed", "cancelled"]


def test_pages_follow_the_cursor():
    items = [{"id": str(i)} for i in range(5)]
    assert J.page(items, None, 2) == {"object": "list", "data": items[:2], "has_more": True}
    assert J.page(items, "3", None) == {"object": "list", "data": items[4:], "has_more": False}
    with pytest.raises(RequestError):
        J.page(items, None, 0)


GOOD = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


def test_file_validation_reports_lines_and_kinds():
    found = validate(GOOD * 10 + b"{oops\n" + b'{"text": 5}\n')
    assert found["status"] == "error" and found["lines"] == 12 and found["kinds"] == {"chat": 10}
    assert found["status_details"].startswith("2 of 12 lines are invalid: line 11: malformed JSON")
    assert "line 12:" in found["status_details"]
    assert validate(GOOD * 10)["status"] == "processed"


@pytest.mark.parametrize("examples", [0, 1, 9])
def test_a_file_of_fewer_than_10_examples_is_refused_as_openai_does(examples):
    found = validate(GOOD * examples + b"\n\n")  # blank lines are no examples
    assert found["status"] == "error"
    assert found["status_details"] == (f"Training file has {examples} example(s), but must have at least 10 "
                                       "examples")


def test_validation_fed_in_pieces_finds_what_it_finds_in_the_whole(monkeypatch):
    import random

    from kubetune.api import files

    monkeypatch.setattr(files, "MAX_LINE", 300)  # a line longer than this is reported, not kept
    raw = (b"\xef\xbb\xbf" + GOOD + GOOD.replace(b"\n", b"\r\n") + b"\n" + GOOD * 9 + b"[1]\n"
           + b'{"messages": "' + b"x" * 1000 + b'"}\n' + b"\xff\xfe\n" + GOOD[:-1])
    whole = validate(raw)
    assert whole["lines"] == 15 and whole["kinds"] == {"chat": 12}
    details = whole["status_details"].split("; ")
    assert details[0] == "3 of 15 lines are invalid: line 13: expected a JSON object, got list"
    assert details[1].startswith("line 14: longer than") and details[2] == "line 15: not valid UTF-8 (byte 0)"
    rng = random.Random(3)
    for _ in range(20):
        found, at = files.Validation(), 0
        while at < len(raw):
            step = rng.randint(1, 200)
            found.feed(raw[at:at + step])
            at += step
        assert found.result() == whole


def test_ids_sort_by_creation_time():
    import time

    ids = []
    for _ in range(3):
        ids.append(J.new_id("ftjob"))
        time.sleep(0.002)
    assert sorted(ids) == ids and len(set(ids)) == 3
    assert all(len(i) == len("ftjob-") + 20 for i in ids)  # as long as the random ids they replaced
