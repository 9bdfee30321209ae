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
FILES = {"file-a": {"status": "processed", "uri": "s3://b/files/ns/file-a/data.jsonl", "kinds": {"chat": 3}},
         "file-p": {"status": "processed", "uri": "s3://b/files/ns/file-p/data.jsonl", "kinds": {"preference": 3}}}


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


@pytest.mark.parametrize("body, param", [
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": True}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"beta": 0.1}}, "hyperparameters.beta"),  # beta is DPO's
    ({"method": {"type": "reinforcement"}}, "method.type"),
    ({"suffix": "a:b"}, "suffix"),
    ({"seed": -1}, "seed"),
    ({"model": "gpt-4o"}, "model"),
    ({"model": "ft:kubetune-tiny:other-ns::ftjob-1"}, "model"),  # another namespace's model
    ({"training_file": "file-missing"}, "training_file"),
    ({"training_file": "file-a", "method": {"type": "dpo"}}, "training_file"),  # no pairs in it
    ({"validation_file": "file-p"}, "validation_file"),  # no chat examples in it
    ({"metadata": {"k": 1}}, "metadata"),
    ({"temperature": 1}, "temperature"),
])
def test_bad_requests_name_the_parameter(body, param):
    with pytest.raises(RequestError) as e:
        create(**body)
    assert e.value.status == 400 and e.value.param == param, str(e.value)


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


def test_file_validation_reports_lines_and_kinds():
    good = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    found = validate(good * 2 + b"{oops\n" + b'{"text": 5}\n')
    assert found["status"] == "error" and found["lines"] == 4 and found["kinds"] == {"chat": 2}
    assert "2 of 4 lines are invalid: line 3:" in found["status_details"] and "line 4:" in found["status_details"]
    assert validate(good)["status"] == "processed" and validate(b"")["status"] == "error"


def test_ids_sort_by_creation_time():
    import time

    ids = []
    for _ in range(3):
        ids.append(J.new_id("ftjob"))
        time.sleep(0.002)
    assert sorted(ids) == ids and len(set(ids)) == 3
    assert all(len(i) == len("ftjob-") + 20 for i in ids)  # as long as the random ids they replaced
