"""Streaming preparation gives the same result however it is cut: one process or two, one chunk or many,
and (but for how rows are packed) one packing window or many."""

import gzip
import json
import random
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from conftest import EXAMPLES, job_doc
from kubetune.data import prepare as prepare_module
from kubetune.data import shards
from kubetune.data.prepare import prepare
from kubetune.data.tokenize import IGNORE
from kubetune.spec import parse_job

WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su") for b in range(200)]


def _records(n: int, seed: int = 0) -> list[dict]:
    """Chat with exact, spacing-only and near copies of earlier records, PII, and a few unusable ones."""
    rng, out = random.Random(seed), []
    for i in range(n):
        if out and rng.random() < 0.15:
            copy = json.loads(json.dumps(rng.choice(out)))
            reply = copy["messages"][-1]
            kind = rng.choice(["exact", "spacing", "near"])
            if kind == "spacing":
                reply["content"] = reply["content"].replace(" ", "  ")
            elif kind == "near":
                words = reply["content"].split()
                words[rng.randrange(len(words))] = rng.choice(WORDS)
                reply["content"] = " ".join(words)
            out.append(copy)
            continue
        question = " ".join(rng.choices(WORDS, k=rng.randint(4, 12)))
        if rng.random() < 0.1:
            question += f" mail me at user{i}@corp.example"
        reply = " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))
        out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]})
    return out


def _outputs(out: Path) -> dict:
    """Everything preparation wrote that a run could differ in (the report without its timing)."""
    report = json.loads((out / "data_report.json").read_text())
    report.pop("seconds")
    meta = json.loads((out / "prepared" / "meta.json").read_text())
    tables = {f: pq.read_table(out / f).to_pydict() for split in ("train", "validation") for f in meta[split]["files"]}
    jsonl = {split: (out / "prepared" / f"{split}.jsonl").read_bytes() for split in ("train", "validation")}
    return {"report": report, "meta": meta, "tables": tables, "jsonl": jsonl,
            "tokenizer": (out / "tokenizer" / "tokenizer.json").read_bytes()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    records = _records(1500)
    lines = [orjson.dumps(r) for r in records]
    lines[100:100] = [b'{"messages": [broken', b'{"messages": []}']
    (folder / "a.jsonl").write_bytes(b"\n".join(lines[:900]) + b"\n")
    with gzip.open(folder / "b.jsonl.gz", "wb") as f:
        f.write(b"\n".join(lines[900:]) + b"\n")
    (folder / "tools.jsonl").write_bytes((EXAMPLES / "tool-calls.jsonl").read_bytes())
    return folder


def _prepare(data: Path, out: Path, monkeypatch, workers: int, chunk: int, window: int, **spec) -> dict:
    monkeypatch.setenv("KUBETUNE_WORKERS", str(workers))
    monkeypatch.setattr(prepare_module, "CHUNK", chunk)
    monkeypatch.setattr(prepare_module, "TOKENIZE_CHUNK", max(1, chunk // 2))
    monkeypatch.setattr(shards, "WINDOW_TOKENS", window)
    doc = job_doc(str(data), str(out), preprocessing={"maxSeqLength": 256, "dedup": {"nearThreshold": 0.8}}, **spec)
    report = prepare(parse_job(doc), log=lambda _: None)
    report.pop("seconds")
    return report


def test_two_workers_and_small_chunks_give_what_one_pass_gives(data, tmp_path, monkeypatch):
    whole = _prepare(data, tmp_path / "one", monkeypatch, workers=1, chunk=10**6, window=10**9)
    assert whole["duplicates"]["exact"] > 100 and whole["duplicates"]["near"] > 30  # the copies were found
    assert whole["bad_lines"]["total"] == 2 and whole["pii_redacted"]["email"] > 50
    one = _outputs(tmp_path / "one")
    cut = _prepare(data, tmp_path / "two", monkeypatch, workers=2, chunk=97, window=10**9)
    assert cut == whole
    assert _outputs(tmp_path / "two") == one


def test_packing_windows_change_rows_only(data, tmp_path, monkeypatch):
    whole = _prepare(data, tmp_path / "one", monkeypatch, workers=1, chunk=10**6, window=10**9)
    windowed = _prepare(data, tmp_path / "win", monkeypatch, workers=2, chunk=200, window=3000)
    one, win = _outputs(tmp_path / "one"), _outputs(tmp_path / "win")
    assert win["jsonl"] == one["jsonl"] and win["tokenizer"] == one["tokenizer"]
    for split in ("train", "validation"):
        a, b = whole["tokens"][split], windowed["tokens"][split]
        assert {k: v for k, v in a.items() if k not in ("rows", "packing_efficiency")} == \
            {k: v for k, v in b.items() if k not in ("rows", "packing_efficiency")}
    assert windowed["tokens"]["train"]["rows"] >= whole["tokens"]["train"]["rows"]
    # every document is in the rows once, whole, and no row is over maxSeqLength
    docs = {}
    for name, version in (("one", one), ("win", win)):
        found = []
        for table in (t for f, t in version["tables"].items() if "/train-" in f):
            for ids, labels, lens in zip(table["input_ids"], table["labels"], table["doc_lens"]):
                assert sum(lens) == len(ids) == len(labels) <= 256
                start = 0
                for n in lens:
                    assert labels[start] == IGNORE
                    found.append(tuple(ids[start:start + n]))
                    start += n
        docs[name] = sorted(found)
    assert docs["one"] == docs["win"]


def test_preference_pairs_stream_the_same(tmp_path, monkeypatch):
    data = tmp_path / "pairs.jsonl"
    data.write_bytes((EXAMPLES / "preference.jsonl").read_bytes())
    spec = {"training": {"method": "full", "objective": "dpo"}}
    whole = _prepare(data, tmp_path / "one", monkeypatch, workers=1, chunk=10**6, window=10**9, **spec)
    cut = _prepare(data, tmp_path / "two", monkeypatch, workers=2, chunk=13, window=10**9, **spec)
    assert cut == whole and whole["examples_out"]["train"] > 100
    assert _outputs(tmp_path / "two") == _outputs(tmp_path / "one")
