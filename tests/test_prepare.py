"""The Preparing phase end to end, with a real S3 protocol server as input and output."""

import json
import subprocess
import sys

import orjson
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import EXAMPLES, job_doc
from kubetune.data.prepare import PrepareError, prepare
from kubetune.data.tokenize import IGNORE
from kubetune.spec import parse_job


def _chat(i, reply=None):
    return {"messages": [{"role": "user", "content": f"Question number {i} about the product?"},
                         {"role": "assistant", "content": reply or f"Answer {i}: open Settings and choose option {i}."}]}


def _lines(records):
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


def _quiet(_):
    pass


def test_s3_in_s3_out_report_counts_everything(s3, s3_server):
    client, bucket = s3
    good = [_chat(i) for i in range(60)]
    shard1 = good[:30] + [good[0]]  # one exact duplicate
    shard1.append(_chat(100, "Contact me at jane@corp.example or +1 415 555 2671, card 4111 1111 1111 1111."))
    client.put_object(Bucket=bucket, Key="raw/part-0.jsonl", Body=_lines(shard1) + b'{"messages": [oops\n')
    client.put_object(Bucket=bucket, Key="raw/part-1.jsonl", Body=_lines(good[30:]) +
                      _lines([{"messages": []}, {"messages": [{"role": "robot", "content": "x"}]}]) + b'{"text": "\xff"}\n')
    client.put_object(Bucket=bucket, Key="raw/README.md", Body=b"not data")
    out = f"s3://{bucket}/jobs/t/"
    job = parse_job(job_doc(f"s3://{bucket}/raw/", out, storage={"endpoint": s3_server},
                            dataset={"train": f"s3://{bucket}/raw/", "maxBadFraction": 0.2}))
    report = prepare(job, log=_quiet)

    assert report["examples_in"] == 62
    assert report["bad_lines"]["total"] == 4
    where = {(b["file"].rsplit("/", 1)[1], b["line"]) for b in report["bad_lines"]["first"]}
    assert where == {("part-0.jsonl", 33), ("part-1.jsonl", 31), ("part-1.jsonl", 32), ("part-1.jsonl", 33)}
    reasons = {b["reason"] for b in report["bad_lines"]["first"]}
    assert {"empty conversation", "messages[0]: unknown role 'robot'", "not valid UTF-8 (byte 10)"} <= reasons
    assert report["duplicates"]["exact"] == 1
    assert report["pii_redacted"]["email"] == 1 and report["pii_redacted"]["phone"] == 1 and report["pii_redacted"]["card"] == 1
    assert report["skipped_files"] == [f"s3://{bucket}/raw/README.md"]
    out_counts = report["examples_out"]
    assert out_counts["train"] + out_counts["validation"] == 61 - report["duplicates"]["near"]
    assert out_counts["validation"] >= 1

    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="jobs/t/")["Contents"]}
    assert {"jobs/t/data_report.json", "jobs/t/prepared/meta.json", "jobs/t/prepared/train-00000.parquet",
            "jobs/t/prepared/validation-00000.parquet", "jobs/t/tokenizer/tokenizer.json"} <= keys
    stored = json.loads(client.get_object(Bucket=bucket, Key="jobs/t/data_report.json")["Body"].read())
    assert stored["bad_lines"]["total"] == 4
    everything = b"".join(client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys if not k.endswith(".parquet"))
    for secret in (b"jane@corp.example", b"555 2671", b"4111 1111"):
        assert secret not in everything  # no PII in the report, the cleaned data or the tokenizer


def test_local_output_shards_are_trainable(tmp_path):
    job = parse_job(job_doc(str(EXAMPLES / "data"), str(tmp_path / "out"),
                            preprocessing={"maxSeqLength": 512, "pii": {"allow": ["no-reply@nimbusnotes.example"]}}))
    report = prepare(job, log=_quiet)
    meta = json.loads((tmp_path / "out/prepared/meta.json").read_text())
    rows = pq.read_table(tmp_path / "out" / meta["train"]["files"][0]).to_pylist()
    assert len(rows) == meta["train"]["rows"] == report["tokens"]["train"]["rows"]
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == sum(row["doc_lens"]) <= 512
        assert any(label != IGNORE for label in row["labels"])
    assert report["tokens"]["train"]["packing_efficiency"] > 0.9
    assert report["duplicates"]["exact"] >= 16 and report["duplicates"]["near"] >= 16  # the planted ones
    valid = (tmp_path / "out/prepared/validation.jsonl").read_text().splitlines()
    assert len(valid) == report["examples_out"]["validation"]


def test_split_is_deterministic_and_validation_file_is_used(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(_lines([_chat(i, f"Reply {i} " + "word%d " % (i * 7) * 3) for i in range(80)]))
    def run(out, **dataset):
        job = parse_job(job_doc(str(data), str(out), dataset={"train": str(data), **dataset}))
        prepare(job, log=_quiet)
        return (out / "prepared/validation.jsonl").read_text()
    assert run(tmp_path / "a") == run(tmp_path / "b")
    held = tmp_path / "held.jsonl"
    held.write_bytes(_lines([_chat(500), _chat(501)]))
    valid = run(tmp_path / "c", validation=str(held))
    assert len(valid.splitlines()) == 2 and "Question number 500" in valid


def test_too_many_bad_lines_fail_with_the_reason(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(_lines([_chat(i) for i in range(5)]) + b"{broken\n" * 3)
    job = parse_job(job_doc(str(data), str(tmp_path / "o")))
    with pytest.raises(PrepareError, match=r"3 of 8 input lines are malformed .*limit dataset.maxBadFraction=5.0%.*d.jsonl:6: malformed JSON"):
        prepare(job, log=_quiet)


def test_nothing_left_fails_with_drop_reasons(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(_lines([{"messages": [{"role": "user", "content": "hi"}]}] * 3))
    job = parse_job(job_doc(str(data), str(tmp_path / "o")))
    with pytest.raises(PrepareError, match="no examples left after cleaning and dedup.*no_assistant_turn 3"):
        prepare(job, log=_quiet)


def test_cli_missing_bucket_is_one_line(s3_server, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_doc("s3://no-such-bucket/data/", str(tmp_path / "o"), storage={"endpoint": s3_server})))
    run = subprocess.run([sys.executable, "-m", "kubetune.cli", "prepare", str(job)], capture_output=True, text=True)
    assert run.returncode == 4  # storage refused (kubetune.errors): no retry helps
    assert run.stderr.strip() == (f"error: bucket no-such-bucket does not exist (at {s3_server}; "
                                  "s3://no-such-bucket/data/)")
