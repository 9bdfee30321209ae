"""Uploaded training files: validated as OpenAI validates them, stored in the bucket per namespace.

    FILES_URI/NAMESPACE/FILE_ID/data.jsonl   the bytes as uploaded (what a job's dataset points at)
    FILES_URI/NAMESPACE/FILE_ID/file.json    the file object, with what validation found

A file is ``processed`` when it has at least 10 examples and every line is a chat example, a preference
pair or a reinforcement prompt, else ``error`` with what is wrong, by line number, in ``status_details``.
A reinforcement prompt is what the rft prepare step takes (``kubetune.data.prompts``): ``messages`` whose
last turn is not the assistant's, plus item fields; the top-level item fields every such line has are
recorded (``item_fields``) so that a job's grader can be checked against them at create time. Uploads stream: each chunk is
validated and sent on to the bucket (a multipart upload) as it arrives, so a 512 MB file never sits in memory.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import closing
from typing import BinaryIO

import orjson

from kubetune.api.jobs import new_id
from kubetune.data.formats import FormatError, standardize
from kubetune.data.preference import is_preference, standardize_pair
from kubetune.data.prompts import standardize_prompt
from kubetune.data.readers import BadLine, RawLine, parse_line
from kubetune.storage import NotFound, Store, join, store_for

LISTED_PROBLEMS = 10
MIN_EXAMPLES = 10  # OpenAI refuses a training file with fewer
MAX_LINE = 16 * 2**20  # far beyond any context length; a longer line is reported, not held in memory
PUBLIC = ("id", "object", "bytes", "created_at", "filename", "purpose", "status", "status_details", "expires_at")


def kind_of(data: dict) -> tuple[str, dict | None]:
    """('chat' | 'preference' | 'reinforcement', the item of a reinforcement prompt); FormatError says why
    it is none of them."""
    if is_preference(data):
        standardize_pair(data)
        return "preference", None
    # The prompt rule first: chat's "auto" accepts a conversation without an assistant turn too (it would
    # train nothing), and such a line is what the rft prepare step reads as a prompt.
    try:
        _, _, item = standardize_prompt(data, "upload", set())
        return "reinforcement", item
    except FormatError:
        pass  # not a prompt: chat's error, if any, is the one to report (it names what is wrong with the turns)
    standardize(data, "auto")
    return "chat", None


class Validation:
    """What validation finds in an uploaded JSONL file, fed its bytes as they arrive: counts and the first
    problems, never more than one line of the data (at most MAX_LINE bytes) in memory."""

    def __init__(self):
        self.kinds: Counter = Counter()
        self.item_fields: set[str] | None = None  # top-level item fields of every reinforcement prompt so far
        self.problems: list[str] = []  # the first LISTED_PROBLEMS
        self.invalid = self.lines = self._number = 0
        self._partial, self._too_long = bytearray(), False

    def feed(self, chunk: bytes) -> None:
        *complete, rest = chunk.split(b"\n")
        for piece in complete:
            self._extend(piece)
            self._end_line()
        self._extend(rest)

    def _extend(self, piece: bytes) -> None:
        if not self._too_long:
            self._partial += piece
            if len(self._partial) > MAX_LINE:  # the rest of this line is dropped as it comes
                self._too_long, self._partial = True, bytearray()

    def _end_line(self) -> None:
        self._number += 1
        line, self._partial = bytes(self._partial), bytearray()
        if self._number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (Windows editors)
        if self._too_long:
            self._too_long = False
            self.lines += 1
            self._problem(f"longer than {MAX_LINE // 2**20} MiB")
        elif line.strip():  # blank lines are skipped, as preparation skips them
            self.lines += 1
            item = parse_line(RawLine("upload.jsonl", self._number, line))
            try:
                if isinstance(item, BadLine):
                    raise FormatError(item.reason)
                kind, fields = kind_of(item.data)
                self.kinds[kind] += 1
                if fields is not None:
                    self.item_fields = set(fields) if self.item_fields is None else self.item_fields & set(fields)
            except FormatError as e:
                self._problem(str(e))

    def _problem(self, reason: str) -> None:
        self.invalid += 1
        if len(self.problems) < LISTED_PROBLEMS:
            self.problems.append(f"line {self._number}: {reason}")

    def result(self) -> dict:
        """The file's status once every byte was fed (a last line without a newline counts)."""
        if self._partial or self._too_long:
            self._end_line()
        details = []
        if self.lines < MIN_EXAMPLES:  # OpenAI's words
            details.append(f"Training file has {self.lines} example(s), but must have at least {MIN_EXAMPLES} "
                           "examples")
        if self.invalid:
            details.append(f"{self.invalid} of {self.lines} lines are invalid: " + "; ".join(self.problems)
                           + ("; ..." if self.invalid > len(self.problems) else ""))
        found = {"status": "error" if details else "processed", "status_details": "; ".join(details) or None,
                 "lines": self.lines, "kinds": dict(self.kinds)}
        if self.item_fields is not None:
            found["item_fields"] = sorted(self.item_fields)
        return found


def validate(raw: bytes) -> dict:
    """Line count, kinds and problems of a whole JSONL file."""
    found = Validation()
    found.feed(raw)
    return found.result()


def public(record: dict) -> dict:
    return {k: record.get(k) for k in PUBLIC}


class Upload:
    """One file on its way in: ``write`` validates each chunk and sends it on to the bucket, ``finish`` stores
    the file object beside the data, ``abort`` leaves nothing behind."""

    def __init__(self, store: Store, record: dict, record_uri: str):
        self.store, self.record, self.record_uri = store, record, record_uri
        self.size, self.validation, self.writer = 0, Validation(), store.open_write(record["uri"])

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.validation.feed(chunk)
        self.writer.write(chunk)

    def finish(self) -> dict:
        self.writer.close()
        record = {**self.record, "bytes": self.size, **self.validation.result()}
        self.store.write_bytes(self.record_uri, orjson.dumps(record))
        return record

    def abort(self) -> None:
        self.writer.abort()


class FileStore:
    """Thin calls to the bucket; the caller has already checked the namespace is theirs."""

    def __init__(self, files_uri: str, storage=None):
        self.root = files_uri if files_uri.endswith("/") else files_uri + "/"
        self.store = store_for(self.root, storage)

    def _record_uri(self, namespace: str, file_id: str) -> str:
        return join(self.root, namespace, file_id, "file.json")

    def begin(self, namespace: str, filename: str, purpose: str) -> Upload:
        file_id = new_id("file", 6)
        uri = join(self.root, namespace, file_id, "data.jsonl")
        record = {"id": file_id, "object": "file", "created_at": int(time.time()), "filename": filename,
                  "purpose": purpose, "expires_at": None, "uri": uri}
        return Upload(self.store, record, self._record_uri(namespace, file_id))

    def get(self, namespace: str, file_id: str) -> dict | None:
        if not file_id.startswith("file-") or "/" in file_id:
            return None
        try:  # one GET: a HEAD's 404 cannot tell a missing file from a missing bucket
            with closing(self.store.open_read(self._record_uri(namespace, file_id))) as body:
                return orjson.loads(body.read())
        except NotFound:
            return None

    def list(self, namespace: str) -> list[dict]:
        """Newest first."""
        prefix = join(self.root, namespace) + "/"
        try:
            uris = self.store.list(prefix)
        except NotFound:
            return []
        ids = [u.removeprefix(prefix).split("/")[0] for u in uris if u.endswith("/file.json")]
        records = [r for r in (self.get(namespace, i) for i in ids) if r]
        return sorted(records, key=lambda r: (r["created_at"], r["id"]), reverse=True)

    def content(self, record: dict) -> BinaryIO:
        return self.store.open_read(record["uri"])

    def delete(self, namespace: str, file_id: str) -> None:
        self.store.delete_prefix(join(self.root, namespace, file_id) + "/")
