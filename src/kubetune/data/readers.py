"""Read raw records from jsonl, jsonl.gz, parquet and csv files, keeping file and line for every record.

A malformed line is not an exception: it comes out as a ``BadLine`` so the caller can count it,
report where it is, and go on.
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

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


@dataclass(frozen=True)
class RawLine:
    """A JSONL line not parsed yet: preparation parses it in the worker process that cleans it."""

    file: str
    line: int
    data: bytes


def read_file(name: str, raw: bytes) -> Iterator[Record | BadLine]:
    """Parse one file's bytes by its suffix."""
    for item in iter_file(name, io.BytesIO(raw)):
        yield parse_line(item) if isinstance(item, RawLine) else item


def iter_file(name: str, f: BinaryIO) -> Iterator[RawLine | Record | BadLine]:
    """The records of an open binary file, read as they are needed (memory does not grow with the file);
    JSONL lines come unparsed (``parse_line``)."""
    lower = name.lower()
    if lower.endswith(".gz"):
        f, lower = gzip.GzipFile(fileobj=f), lower[:-3]
    try:
        if lower.endswith(".parquet"):
            yield from _read_parquet(name, f)
        elif lower.endswith(".csv"):
            yield from _read_csv(name, f)
        else:
            yield from _read_jsonl(name, f)
    except (OSError, EOFError, zlib.error) as e:  # a broken or cut gzip stream: what came before it stands
        yield BadLine(name, 0, f"not a valid gzip file: {e}")


def _read_jsonl(name: str, f: BinaryIO) -> Iterator[RawLine]:
    for number, line in enumerate(f, start=1):
        if number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (Windows editors) is not part of line 1
        if line.strip():
            yield RawLine(name, number, line)


def parse_line(raw: RawLine) -> Record | BadLine:
    name, number, line = raw.file, raw.line, raw.data
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadLine(name, number, f"not valid UTF-8 (byte {e.start})")
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        return BadLine(name, number, f"malformed JSON: {str(e).split(':')[0]}")
    if not isinstance(data, dict):
        return BadLine(name, number, f"expected a JSON object, got {type(data).__name__}")
    return Record(name, number, data)


def _read_csv(name: str, f: BinaryIO) -> Iterator[Record | BadLine]:
    # surrogateescape keeps undecodable bytes visible per row instead of failing the whole file.
    # utf-8-sig: a byte-order mark (Windows editors) is not part of the first header
    reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline=""))
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


def _read_parquet(name: str, f: BinaryIO) -> Iterator[Record | BadLine]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(f)
        batches = parquet.iter_batches(batch_size=4096)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        yield BadLine(name, 0, f"not a readable parquet file: {type(e).__name__}")
        return
    number = 0
    try:
        for batch in batches:
            try:
                rows = batch.to_pylist()
            except Exception:  # a value Python cannot hold (a timestamp past year 9999...): go row by row
                rows = None
            for k in range(batch.num_rows):
                number += 1
                if rows is not None:
                    row = rows[k]
                else:
                    try:
                        row = batch.slice(k, 1).to_pylist()[0]
                    except Exception as e:
                        yield BadLine(name, number, f"unreadable value ({type(e).__name__})")
                        continue
                yield Record(name, number, {k: v for k, v in row.items() if v is not None})
    except Exception as e:
        yield BadLine(name, number + 1, f"not a readable parquet file: {type(e).__name__}")
