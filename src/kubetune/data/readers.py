"""Read raw records from jsonl, jsonl.gz, parquet and csv files, keeping file and line for every record.

A malformed line is not an exception: it comes out as a ``BadLine`` so the caller can count it,
report where it is, and go on.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from typing import Iterator

import orjson

from kubetune.data.formats import is_valid_unicode

# The csv module's default field limit (128 KiB) stopped a file at its first large field, losing
# every row after it; a field may be as large as the file.
csv.field_size_limit(2**31 - 1)

SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".csv")


@dataclass(frozen=True)
class Record:
    file: str
    line: int
    data: dict


@dataclass(frozen=True)
class BadLine:
    file: str
    line: int
    reason: str


def is_data_file(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


def read_file(name: str, raw: bytes) -> Iterator[Record | BadLine]:
    """Parse one file's bytes by its suffix."""
    lower = name.lower()
    if lower.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            yield BadLine(name, 0, f"not a valid gzip file: {e}")
            return
        lower = lower[:-3]
    if lower.endswith(".parquet"):
        yield from _read_parquet(name, raw)
    elif lower.endswith(".csv"):
        yield from _read_csv(name, raw)
    else:
        yield from _read_jsonl(name, raw)


def _read_jsonl(name: str, raw: bytes) -> Iterator[Record | BadLine]:
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (Windows editors) is not part of line 1
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield BadLine(name, number, f"not valid UTF-8 (byte {e.start})")
            continue
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            yield BadLine(name, number, f"malformed JSON: {str(e).split(':')[0]}")
            continue
        if not isinstance(data, dict):
            yield BadLine(name, number, f"expected a JSON object, got {type(data).__name__}")
            continue
        yield Record(name, number, data)


def _read_csv(name: str, raw: bytes) -> Iterator[Record | BadLine]:
    # surrogateescape keeps undecodable bytes visible per row instead of failing the whole file.
    text = raw.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    start = 2  # line 1 is the header
    try:
        for row in reader:
            values = [v for v in row.values() if isinstance(v, str)]
            if not all(is_valid_unicode(v) for v in values):
                yield BadLine(name, start, "not valid UTF-8")
            elif None in row:
                yield BadLine(name, start, "more fields than the header")
            else:
                yield Record(name, start, {k: v for k, v in row.items() if v not in (None, "")})
            start = reader.line_num + 1
    except csv.Error as e:
        yield BadLine(name, start, f"malformed CSV: {e}")


def _read_parquet(name: str, raw: bytes) -> Iterator[Record | BadLine]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(raw))
    except Exception as e:  # pyarrow raises several types for a corrupt file
        yield BadLine(name, 0, f"not a readable parquet file: {type(e).__name__}")
        return
    try:
        rows = table.to_pylist()
    except Exception:  # a value Python cannot hold (a timestamp past year 9999...): go row by row
        rows = None
    for number in range(1, table.num_rows + 1):
        if rows is not None:
            row = rows[number - 1]
        else:
            try:
                row = table.slice(number - 1, 1).to_pylist()[0]
            except Exception as e:
                yield BadLine(name, number, f"unreadable value ({type(e).__name__})")
                continue
        yield Record(name, number, {k: v for k, v in row.items() if v is not None})
