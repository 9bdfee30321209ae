"""Uploaded training files: validated as OpenAI validates them, stored in the bucket per namespace.

    FILES_URI/NAMESPACE/FILE_ID/data.jsonl   the bytes as uploaded (what a job's dataset points at)
    FILES_URI/NAMESPACE/FILE_ID/file.json    the file object, with what validation found

A file is ``processed`` when every line is a chat example or a preference pair, else ``error`` with
the first problems by line number in ``status_details``.
"""

from __future__ import annotations

import time
from collections import Counter

import orjson

from kubetune.api.jobs import new_id
from kubetune.data.formats import FormatError, standardize
from kubetune.data.preference import is_preference, standardize_pair
from kubetune.data.readers import BadLine, read_file
from kubetune.storage import NotFound, join, store_for

LISTED_PROBLEMS = 10
PUBLIC = ("id", "object", "bytes", "created_at", "filename", "purpose", "status", "status_details", "expires_at")


def kind_of(data: dict) -> str:
    """'chat' or 'preference'; FormatError says why it is neither."""
    if is_preference(data):
        standardize_pair(data)
        return "preference"
    standardize(data, "auto")
    return "chat"


def validate(raw: bytes) -> dict:
    """Line count, kinds and problems of an uploaded JSONL file."""
    kinds: Counter = Counter()
    problems: list[str] = []
    lines = 0
    for item in read_file("upload.jsonl", raw):
        lines += 1
        if isinstance(item, BadLine):
            problems.append(f"line {item.line}: {item.reason}")
            continue
        try:
            kinds[kind_of(item.data)] += 1
        except FormatError as e:
            problems.append(f"line {item.line}: {e}")
    if not lines:
        problems.append("the file has no examples")
    details = None
    if problems:
        details = (f"{len(problems)} of {lines} lines are invalid: " + "; ".join(problems[:LISTED_PROBLEMS])
                   + ("; ..." if len(problems) > LISTED_PROBLEMS else ""))
    return {"status": "error" if problems else "processed", "status_details": details, "lines": lines,
            "kinds": dict(kinds)}


def public(record: dict) -> dict:
    return {k: record.get(k) for k in PUBLIC}


class FileStore:
    """Thin calls to the bucket; the caller has already checked the namespace is theirs."""

    def __init__(self, files_uri: str, storage=None):
        self.root = files_uri if files_uri.endswith("/") else files_uri + "/"
        self.store = store_for(self.root, storage)

    def _record_uri(self, namespace: str, file_id: str) -> str:
        return join(self.root, namespace, file_id, "file.json")

    def create(self, namespace: str, filename: str, purpose: str, raw: bytes) -> dict:
        file_id = new_id("file", 6)
        uri = join(self.root, namespace, file_id, "data.jsonl")
        self.store.write_bytes(uri, raw)
        record = {"id": file_id, "object": "file", "bytes": len(raw), "created_at": int(time.time()),
                  "filename": filename, "purpose": purpose, "expires_at": None, "uri": uri, **validate(raw)}
        self.store.write_bytes(self._record_uri(namespace, file_id), orjson.dumps(record))
        return record

    def get(self, namespace: str, file_id: str) -> dict | None:
        if not file_id.startswith("file-") or "/" in file_id:
            return None
        uri = self._record_uri(namespace, file_id)
        return orjson.loads(self.store.read_bytes(uri)) if self.store.exists(uri) else None

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

    def content(self, record: dict) -> bytes:
        return self.store.read_bytes(record["uri"])

    def delete(self, namespace: str, file_id: str) -> None:
        self.store.delete_prefix(join(self.root, namespace, file_id) + "/")
