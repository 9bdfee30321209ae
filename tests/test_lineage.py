"""A tiny job run as users run it (`kubetune run`, real DeepSpeed on CPU): a gate that must fail fails
with its numbers, and lineage.json + the model card pin what went in."""

import hashlib
import json
import subprocess
import sys

import pytest
import yaml

from conftest import EXAMPLES, job_doc
from kubetune.evaluate.gate import Verdict
from kubetune.evaluate.run import status_patch
from kubetune.lineage import file_hashes, status_lineage, tree_hash
from kubetune.spec import parse_job
from kubetune.storage import upload_tree

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The finished job's document and output folder, and what `kubetune run` printed."""
    tmp = tmp_path_factory.mktemp("lineage")
    data = tmp / "data" / "chat.jsonl"
    data.parent.mkdir()
    data.write_text("".join((EXAMPLES / "data" / "support-chat.jsonl").read_text().splitlines(keepends=True)[:60]))
    out = tmp / "out"
    doc = job_doc(str(data.parent), str(out), preprocessing={"maxSeqLength": 256},
                  training={"method": "full", "maxSteps": 3, "globalBatchSize": 4, "microBatchSize": 2, "evalEvery": 3,
                            "checkpointEvery": 3, "learningRate": 3e-3},
                  evaluation={"samples": 2, "maxNewTokens": 8, "gate": {"metric": "valid_loss", "max": 0.001}})
    path = tmp / "job.json"
    path.write_text(json.dumps(doc))
    run = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", str(path), "--nproc", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]  # a failed gate is not a failed job
    return doc, out, data, run.stdout + run.stderr


def test_a_gate_that_must_fail_fails_with_its_numbers(job):
    _, out, _, log = job
    report = json.loads((out / "eval_report.json").read_text())
    gate = report["gate"]
    assert gate["passed"] is False and gate["metric"] == "valid_loss" and gate["threshold"] == 0.001
    assert gate["value"] == report["metrics"]["fine_tuned"]["valid_loss"] > 0.001
    assert f"valid_loss {gate['value']:.4f} > max 0.001" in gate["message"]
    assert "[evaluate] evaluation gate FAIL: valid_loss" in log
    assert (out / "eval_report.md").read_text().splitlines()[2].startswith("**Evaluation gate: FAIL** — valid_loss")
    assert report["parity"]["ok"] and report["parity"]["prompts"] >= 1
    assert json.loads((out / "progress.json").read_text())["phase"] == "done"
    # what a training pod sends as status (locally there is no cluster to send it to)
    lineage = json.loads((out / "model" / "lineage.json").read_text())
    patch = status_patch(Verdict(**lineage["gate"]), status_lineage(lineage, str(out / "model" / "lineage.json"))).patch()
    assert patch["evaluation"]["passed"] is False and patch["evaluation"]["value"] == gate["value"]
    assert patch["lineage"]["dataHash"] == lineage["data"]["hash"]


def test_lineage_pins_spec_data_and_shards(job):
    doc, out, data, _ = job
    lineage = json.loads((out / "model" / "lineage.json").read_text())
    spec = parse_job(doc).spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert lineage["spec_hash"] == hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    assert lineage["data"]["inputs"] == [{"uri": str(data), "sha256": digest, "bytes": data.stat().st_size}]
    assert lineage["data"]["hash"] == hashlib.sha256(f"{digest}  {data}\n".encode()).hexdigest()
    shards = {p.relative_to(out / "prepared").as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in (out / "prepared").rglob("*") if p.is_file()}
    assert lineage["prepared"]["files"] == shards and lineage["prepared"]["hash"] == tree_hash(shards)
    report = json.loads((out / "data_report.json").read_text())
    assert lineage["data"]["counts"]["examples_out"] == report["examples_out"]
    assert lineage["base_model"]["kind"] == "fromConfig" and lineage["training"]["maxSteps"] == 3
    # what the trainer chose where the spec could say auto (on CPU: no probe, no compiled blocks)
    assert lineage["trainer_choices"] == {"globalBatchSize": 4, "microBatchSize": 2, "gradientCheckpointing": False, "compiled": False}
    assert lineage["final_metrics"]["step"] == 3 and lineage["gate"]["passed"] is False
    assert lineage["trainer_image"] is None and lineage["kubetune_version"]


def test_model_card_front_matter_is_yaml_and_body_has_no_data(job):
    _, out, data, _ = job
    card = (out / "model" / "README.md").read_text()
    _, header, body = card.split("---\n", 2)
    meta = yaml.safe_load(header)
    assert meta["library_name"] == "transformers" and meta["base_model"] == "fromConfig:llama-tiny"
    assert "kubetune" in meta["tags"]
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["valid_loss"] == pytest.approx(json.loads((out / "model" / "lineage.json").read_text())
                                                  ["final_metrics"]["valid_loss"])
    assert "**Evaluation gate: FAIL**" in body and "kubetune serve" in body and "| training examples |" in body
    first_reply = json.loads(data.read_text().splitlines()[0])["messages"][-1]["content"]
    assert first_reply[:40] not in card


def test_hashes_over_s3_files_match_local_ones(tmp_path, s3, s3_server):
    from kubetune.spec import Storage

    client, bucket = s3
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 100)
    storage = Storage(endpoint=s3_server)
    upload_tree(folder, f"s3://{bucket}/base/", storage)
    local = file_hashes(str(folder))
    assert local == file_hashes(f"s3://{bucket}/base/", storage)
    assert local["sub/weights.bin"] == hashlib.sha256(bytes(range(256)) * 100).hexdigest()
