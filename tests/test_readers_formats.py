import gzip
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubetune.data.formats import FormatError, standardize
from kubetune.data.readers import BadLine, Record, read_file


def test_jsonl_bad_lines_carry_file_line_and_reason():
    raw = b'{"text": "ok"}\n{"text": broken\n\n{"text": "caf\xe9"}\n[1, 2]\n{"text": "last"}\n'
    items = list(read_file("s3://b/data.jsonl", raw))
    assert [type(i).__name__ for i in items] == ["Record", "BadLine", "BadLine", "BadLine", "Record"]
    bad = [i for i in items if isinstance(i, BadLine)]
    assert [(b.line, b.reason.split(" (")[0].split(":")[0]) for b in bad] == [
        (2, "malformed JSON"), (4, "not valid UTF-8"), (5, "expected a JSON object, got list")]
    assert items[-1] == Record("s3://b/data.jsonl", 6, {"text": "last"})


def test_jsonl_saved_with_a_byte_order_mark_keeps_line_1():
    raw = "\ufeff".encode() + b'{"text": "first"}\r\n{"text": "second"}\r\n'  # as Notepad saves "UTF-8 with BOM"
    assert [(r.line, r.data) for r in read_file("win.jsonl", raw)] == [(1, {"text": "first"}), (2, {"text": "second"})]


def test_gzip_csv_and_parquet():
    gz = gzip.compress(b'{"prompt": "p", "completion": "c"}\n')
    assert [r.data for r in read_file("a.jsonl.gz", gz)] == [{"prompt": "p", "completion": "c"}]

    csv_raw = 'instruction,input,output\n"Say hi","","Hello,\nworld"\nbad,\xff,row\n'.encode("latin-1")
    items = list(read_file("a.csv", csv_raw))
    assert items[0] == Record("a.csv", 2, {"instruction": "Say hi", "output": "Hello,\nworld"})
    assert items[1] == BadLine("a.csv", 4, "not valid UTF-8")

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["one", "two"]}), buf)
    assert [(r.line, r.data) for r in read_file("a.parquet", buf.getvalue())] == [(1, {"text": "one"}), (2, {"text": "two"})]
    assert isinstance(next(read_file("b.parquet", b"not parquet")), BadLine)


def test_formats_become_messages_with_weights():
    chat = standardize({"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a1", "weight": 0}, {"role": "user", "content": [{"type": "text", "text": "u2"}]},
        {"role": "assistant", "content": "a2"}]})
    assert [(m["role"], m["content"], m["weight"]) for m in chat] == [
        ("system", "s", 0), ("user", "u", 0), ("assistant", "a1", 0), ("user", "u2", 0), ("assistant", "a2", 1)]
    alpaca = standardize({"instruction": "Do X", "input": "with Y", "output": "Done"})
    assert [(m["role"], m["content"]) for m in alpaca] == [("user", "Do X\n\nwith Y"), ("assistant", "Done")]
    pc = standardize({"prompt": "Q", "completion": "A"})
    assert [m["role"] for m in pc] == ["user", "assistant"]
    text = standardize({"text": "plain"})
    assert text == [{"role": "assistant", "content": "plain", "weight": 1}]
    assert standardize({"messages": '[{"role": "user", "content": "q"}]'})[0]["content"] == "q"


@pytest.mark.parametrize("record, reason", [
    ({"messages": []}, "empty conversation"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "assistant", "content": "x", "weight": 2}]}, "weight must be 0 or 1"),
    ({"messages": [{"role": "user"}]}, "missing content"),
    ({"foo": 1}, "no known fields"),
])
def test_unusable_records_say_why(record, reason):
    with pytest.raises(FormatError, match=reason):
        standardize(record)
