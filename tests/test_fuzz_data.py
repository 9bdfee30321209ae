"""Fuzzing the Preparing phase: generated dataset lines (broken JSON, wrong types, huge and empty
fields, odd Unicode, every format and file type) go through ``prepare``, the function
``kubetune prepare`` runs. Properties: it never crashes (the only failure allowed is the documented
one for too many bad lines, which names a line and a reason), and it counts every line:
lines in = bad lines + examples in, examples in = dropped (by reason) + train + validation.

Each hypothesis example batches many lines into one prepare call (prepare has a start-up cost).
``benchmarks/fuzz.py`` runs the same generator with larger counts.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import time

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import job_doc
from kubetune.data.formats import FormatError, standardize
from kubetune.data.prepare import PrepareError, prepare
from kubetune.data.readers import BadLine, read_file
from kubetune.spec import parse_job

# --- generators ------------------------------------------------------------------------------

# Lone surrogates (written escaped, or raw as invalid UTF-8), NUL, bidi controls, emoji with ZWJ,
# combining marks, BOM, line and field separators, quotes.
ODD = ["\ud800", "\udfff", "\x00", "\u202e", "\u200f", "\u2066", "\U0001f600", "\U0001f469\u200d\U0001f467",
       "e\u0301", "\u0301\u0301", "\ufeff", "\r\n", "\r", "\t", "\u3000", "\u2028", "\\", '"', ",", "\x7f"]
odd_text = st.lists(st.one_of(st.text(max_size=10), st.sampled_from(ODD)), max_size=6).map("".join)
text = st.one_of(st.just(""), st.just("   "), odd_text, st.text(min_size=20, max_size=60))
anything = st.one_of(text, st.integers(-(2**70), 2**70), st.floats(), st.none(), st.booleans(),
                     st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"])},
                                       optional={"text": st.one_of(text, anything)}), max_size=3)
good_msg = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": text},
                                 optional={"weight": st.sampled_from([0, 1])})
bad_msg = st.fixed_dictionaries({}, optional={
    "role": st.one_of(st.sampled_from(["robot", "", "USER", "tool"]), anything),
    "content": st.one_of(anything, parts), "weight": st.sampled_from([2, -1, None, True, "1", 0.5, 1.0])})
chat = st.fixed_dictionaries({"messages": st.one_of(st.lists(st.one_of(good_msg, good_msg, bad_msg, anything), max_size=5),
                                                    anything)})
field = st.one_of(text, text, anything)
record = st.one_of(
    chat, chat,
    st.fixed_dictionaries({"instruction": field, "output": field}, optional={"input": field, "system": field}),
    st.fixed_dictionaries({"instruction": field, "response": field}),
    st.fixed_dictionaries({"prompt": field, "completion": field}),
    st.fixed_dictionaries({"text": field}),
    st.dictionaries(st.text(max_size=8), anything, max_size=3),
)


def _json(rec: object, ascii: bool) -> bytes:
    # ensure_ascii writes lone surrogates as \ud800 escapes; without it they become invalid UTF-8
    return json.dumps(rec, ensure_ascii=ascii).encode("utf-8", "surrogatepass")


broken = st.one_of(
    st.builds(lambda r, k: _json(r, True)[:k], record, st.integers(1, 40)),  # truncated JSON
    st.builds(lambda r, k: _json(r, False)[:k], record, st.integers(1, 40)),  # may cut a UTF-8 sequence
    st.binary(min_size=1, max_size=30),
    st.sampled_from([b"[1, 2]", b'"text"', b"42", b"null", b"{", b'{"messages": [oops', b"\xff\xfe{}",
                     b'{"a": 1}{"b": 2}', b"[" * 2000, b'{"text": NaN}', b'{"text": "a\\ud800"}', b"\x00"]),
)
jsonl_line = st.one_of(st.builds(_json, record, st.booleans()), st.builds(_json, record, st.booleans()), broken)

# One huge field (1 MB) in some examples: long words, words, emoji, combining marks, digits, RTL.
HUGE_UNITS = ["x", "lorem ipsum ", "\U0001f600", "e\u0301", "1 ", "\u202eab"]
HUGE_CHARS = 1_000_000

# Lines that are always usable, so a batch never fails for having nothing left; per format.
SENTENCES = ["Open Settings, then Export, and pick Markdown for every notebook you own.",
             "Billing runs on the first of each month; refunds take five business days.",
             "Offline mode keeps the last thirty days of notes cached on this device.",
             "Shared folders inherit permissions from their parent unless you override them.",
             "Two-factor codes expire after thirty seconds, so type them right away please.",
             "Attachments above twenty megabytes upload in the background while you keep typing.",
             "Tags are case-insensitive and may contain spaces, dashes or unicode letters.",
             "Deleted notes stay in the trash for sixty days before they are purged forever."]


def _good(fmt: str, i: int) -> dict:
    q, a = f"Question {i}: how does feature {i * 7} behave here?", SENTENCES[i % len(SENTENCES)]
    return {"chat": {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
            "instruction": {"instruction": q, "output": a}, "prompt_completion": {"prompt": q, "completion": a},
            "text": {"text": a}}[fmt]


@st.composite
def batches(draw, min_lines=30, max_lines=50):
    """(file name, file bytes, number of lines in it, dataset.format, maxBadFraction)."""
    kind = draw(st.sampled_from(["jsonl", "jsonl", "jsonl.gz", "csv", "parquet"]))
    fmt = draw(st.sampled_from(["auto", "auto", "auto", "chat", "prompt_completion", "text"]
                               + ([] if kind == "parquet" else ["instruction"])))  # no such columns in PARQUET_SCHEMA
    limit = draw(st.sampled_from([1.0, 1.0, 0.05, 0.3]))
    good = [_good("chat" if fmt == "auto" else fmt, i) for i in range(8)]
    if kind == "parquet":
        return ("d.parquet", *_parquet(draw, good), fmt, limit)
    records = draw(st.lists(record if kind == "csv" else jsonl_line, min_size=min_lines, max_size=max_lines))
    huge = draw(st.one_of(st.none(), st.sampled_from(HUGE_UNITS)))
    if huge is not None:
        key = draw(st.sampled_from(["text", "prompt", "completion", "messages"]))
        value = huge * (HUGE_CHARS // len(huge))
        rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": value}]} \
            if key == "messages" else {"prompt": "p", "completion": "c", key: value}
        records.insert(draw(st.integers(0, len(records))), rec if kind == "csv" else orjson.dumps(rec))
    good = good if kind == "csv" else [orjson.dumps(g) for g in good]
    records[::5] = [*good, *records[::5]][: len(records[::5])]  # spread the good lines out
    if kind == "csv":
        return ("d.csv", _csv(records), len(records), fmt, limit)
    lines = []
    for line in records:
        line = line.replace(b"\n", b" ")
        lines.append(line if line.strip() else b"{")  # blank lines are not records: keep every line one
    raw = b"\n".join(lines) + b"\n"
    return (f"d.{kind}", gzip.compress(raw) if kind.endswith(".gz") else raw, len(lines), fmt, limit)


CSV_COLUMNS = ["messages", "instruction", "input", "output", "response", "prompt", "completion", "text"]


def _csv(records: list[dict]) -> bytes:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(CSV_COLUMNS)
    for rec in records:  # CSV holds only text: non-strings go in as JSON (messages) or their str()
        w.writerow(["" if k not in rec else rec[k] if isinstance(rec[k], str) else json.dumps(rec[k]) for k in CSV_COLUMNS])
    return out.getvalue().encode("utf-8", "surrogatepass")  # raw surrogates: invalid UTF-8 in that row


PARQUET_SCHEMA = pa.schema([
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()), ("weight", pa.int64())]))),
    ("text", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
    ("created", pa.timestamp("ms"))])  # an unrelated column, with values up to year 146 million


def _parquet(draw, good: list[dict]) -> tuple[bytes, int]:
    # pyarrow strings are valid UTF-8: no lone surrogates here
    valid = st.one_of(st.none(), st.just(""), st.text(max_size=40), st.sampled_from([o for o in ODD if o not in ("\ud800", "\udfff")]))
    msg = st.fixed_dictionaries({"role": st.one_of(st.none(), st.sampled_from(["system", "user", "assistant", "robot"])),
                                 "content": valid}, optional={"weight": st.sampled_from([0, 1, 2, None])})
    row = st.fixed_dictionaries({}, optional={"messages": st.one_of(st.none(), st.lists(msg, max_size=4)),
                                              "text": valid, "prompt": valid, "completion": valid,
                                              "created": st.integers(-(2**62), 2**62)})
    rows = draw(st.lists(row, min_size=30, max_size=50))
    rows[::5] = [*good, *rows[::5]][: len(rows[::5])]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), buf)
    return buf.getvalue(), len(rows)


# --- the property ----------------------------------------------------------------------------

BAD_FRACTION = re.compile(r"(\d+) of (\d+) input lines are malformed \(.*\); first: (.+):(\d+): (.+)$")
TRIED = {"lines": 0, "prepares": 0, "failed_cleanly": 0}


def check_batch(tmp, name: str, raw: bytes, n_lines: int, fmt: str, limit: float) -> str:
    """Run prepare on one generated file and check the properties; returns "ok" or "failed cleanly"."""
    TRIED["prepares"] += 1
    TRIED["lines"] += n_lines
    path = tmp / name
    path.write_bytes(raw)
    job = parse_job(job_doc(str(path), str(tmp / f"out-{TRIED['prepares']}"),
                            dataset={"train": str(path), "format": fmt, "maxBadFraction": limit}))
    try:
        report = prepare(job, log=lambda _: None)
    except PrepareError as e:  # the documented failure: too many bad lines, naming the first one
        m = BAD_FRACTION.search(str(e))
        assert m, f"unexpected PrepareError: {e}"
        bad, total = int(m[1]), int(m[2])
        assert total == n_lines and bad / total > limit and m[3].endswith(name) and int(m[4]) >= 1 and m[5].strip()
        TRIED["failed_cleanly"] += 1
        return "failed cleanly"
    bad = report["bad_lines"]
    assert bad["input_lines"] == n_lines
    assert sum(bad["by_reason"].values()) == bad["total"]
    assert report["examples_in"] + bad["total"] == n_lines
    out = report["examples_out"]
    assert sum(report["dropped"].values()) + out["train"] + out["validation"] == report["examples_in"], report["dropped"]
    assert bad["total"] <= limit * n_lines
    for b in bad["first"]:
        assert b["file"].endswith(name) and b["line"] >= 1 and b["reason"]
    return "ok"


@pytest.mark.slow
def test_prepare_never_crashes_and_counts_every_line(tmp_path_factory):
    start = dict(TRIED)

    @settings(max_examples=30, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(batches())
    def run(batch):
        check_batch(tmp_path_factory.mktemp("fuzz"), *batch)

    began = time.monotonic()
    run()
    lines = TRIED["lines"] - start["lines"]
    print(f"\nfuzzed prepare with {lines} lines in {TRIED['prepares'] - start['prepares']} calls, "
          f"{TRIED['failed_cleanly'] - start['failed_cleanly']} of them failed for too many bad lines "
          f"({time.monotonic() - began:.0f}s)")
    assert lines >= 1000


# --- regression tests for what the fuzzer found ----------------------------------------------

def test_content_part_with_non_text_text_is_a_bad_line():
    # was: TypeError from "\n".join in formats._content
    with pytest.raises(FormatError, match="content must be text"):
        standardize({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]})


def test_forced_chat_format_on_another_record_is_a_bad_line():
    # was: KeyError 'messages' with dataset.format: chat
    with pytest.raises(FormatError, match="missing field 'messages'"):
        standardize({"text": "hello"}, "chat")


def test_parquet_messages_with_weight_on_some_turns():
    # parquet gives every message of a struct column every field: weight null where it was absent,
    # which made every such row a bad line ("weight must be 0 or 1")
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0},
                          {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    (rec,) = read_file("a.parquet", buf.getvalue())
    assert [m["weight"] for m in standardize(rec.data)] == [0, 0, 0, 1]


def test_parquet_value_python_cannot_hold_is_a_bad_line():
    # was: OverflowError from to_pylist (a timestamp past year 9999 in any column) crashed prepare
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["a", "b"], "at": pa.array([0, 2**50], pa.timestamp("ms"))}), buf)
    items = list(read_file("a.parquet", buf.getvalue()))
    assert items[0].data["text"] == "a" and items[1] == BadLine("a.parquet", 2, "unreadable value (OverflowError)")


def test_csv_rows_after_a_large_field_are_read():
    # was: csv.Error "field larger than field limit (131072)" ended the file, rows after it uncounted
    raw = ("text\n" + "x" * 200_000 + "\nsecond\nthird\n").encode()
    assert [r.line for r in read_file("a.csv", raw)] == [2, 3, 4]


def test_a_single_usable_example_is_prepared(tmp_path):
    # was: IndexError in the tokenizer on the empty validation split
    data = tmp_path / "d.jsonl"
    data.write_bytes(orjson.dumps(_good("chat", 0)) + b"\n")
    report = prepare(parse_job(job_doc(str(data), str(tmp_path / "o"))), log=lambda _: None)
    assert report["examples_out"] == {"train": 1, "validation": 0}


def test_a_huge_word_does_not_stall_tokenizer_training(tmp_path):
    # was: minutes in BPE training on a 1 MB string without spaces (quadratic in a word's length)
    data = tmp_path / "d.jsonl"
    lines = [_good("chat", i) for i in range(8)] + [{"text": "xy" * 150_000}]
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in lines))
    began = time.monotonic()
    report = prepare(parse_job(job_doc(str(data), str(tmp_path / "o"))), log=lambda _: None)
    assert time.monotonic() - began < 30 and report["dropped"]["too_long"] == 1
