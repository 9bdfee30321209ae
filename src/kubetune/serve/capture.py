"""Recording served conversations and users' feedback (``serve.capture``) as PII-scrubbed chat JSONL.

The request path only appends to in-memory queues; one background thread scrubs each conversation (the
scrubber and settings preparation uses: the job's preprocessing.pii), then writes a batch as one object
named by time, pod and a sequence number, so replicas and restarts never collide. Nothing unscrubbed is
written anywhere. When storage is down a batch is retried later; each queue holds at most
``max_pending`` conversations and drops (and counts, in the log) what comes beyond, so a chat request
never waits on storage. ``close`` (on SIGTERM) writes what is queued.

Two destinations: ``uri`` gets the sampled conversations and every feedback (with its rating, the
correction if any); ``feedback_uri`` gets the conversations rated up or corrected (a correction replaces
the reply) as plain training examples, {"messages", "tools"?}, the format preparation reads.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import random
import re
import socket
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass

from kubetune.data.clean import clean_arguments
from kubetune.data.pii import Scrubber
from kubetune.spec import Pii, Storage
from kubetune.storage import Store, StorageError, join, store_for

RATINGS = ("up", "down")


@dataclass
class Conversation:
    id: str  # the completion's id, chatcmpl-...
    created: int
    model: str
    messages: list[dict]  # the request's messages, then the assistant's reply
    tools: list[dict] | None = None


class Recent:
    """Recent conversations by completion id, for feedback: bounded in count, size and age (oldest go first)."""

    def __init__(self, max_items: int = 4096, max_chars: int = 64 * 1024 * 1024, ttl: float = 3600.0):
        self.max_items, self.max_chars, self.ttl = max_items, max_chars, ttl
        self.items: OrderedDict[str, tuple[Conversation, float, int]] = OrderedDict()
        self.chars, self.lock = 0, threading.Lock()

    def put(self, conversation: Conversation) -> None:
        size = sum(len(m.get("content") or "") + len(json.dumps(m.get("tool_calls") or [])) for m in conversation.messages)
        with self.lock:
            self.items[conversation.id] = (conversation, time.monotonic(), size)
            self.chars += size
            while self.items and (len(self.items) > self.max_items or self.chars > self.max_chars or self._expired()):
                self.chars -= self.items.popitem(last=False)[1][2]

    def _expired(self) -> bool:
        return time.monotonic() - next(iter(self.items.values()))[1] > self.ttl

    def get(self, completion_id: str) -> Conversation | None:
        with self.lock:
            found = self.items.get(completion_id)
        return found[0] if found and time.monotonic() - found[1] <= self.ttl else None


class Sink:
    """One destination: a bounded queue of records, written a batch per object."""

    def __init__(self, uri: str, store: Store, prefix: str, max_pending: int, batch: int):
        self.uri, self.store, self.prefix, self.batch = uri, store, prefix, batch
        self.queue: deque[dict] = deque()
        self.max_pending, self.dropped, self.lock = max_pending, 0, threading.Lock()
        self.seq, self.full = itertools.count(1), False

    def add(self, record: dict) -> bool:
        """Queue a record; False when the queue is full (the record is dropped). True when a batch is ready."""
        with self.lock:
            if len(self.queue) >= self.max_pending:
                self.dropped += 1
                if not self.full:  # once per outage: the writer thread may be stuck retrying, unable to say it
                    self.full = True
                    print(f"[capture] queue for {self.uri} full: dropping conversations until storage answers",
                          file=sys.stderr, flush=True)
                return False
            self.queue.append(record)
            return len(self.queue) >= self.batch

    def write_batch(self, encode) -> int:
        """Write the oldest batch as one object; the records leave the queue only once it is written."""
        with self.lock:
            batch = list(itertools.islice(self.queue, self.batch))
        if not batch:
            return 0
        lines = []
        for record in batch:
            try:
                lines.append(encode(record) + b"\n")
            except Exception:  # e.g. text that is not valid Unicode: such a record would block the queue for good
                with self.lock:
                    self.dropped += 1
        data = b"".join(lines)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        if data:
            self.store.write_bytes(join(self.uri, f"{stamp}-{self.prefix}-{next(self.seq):06d}.jsonl"), data)
        with self.lock:
            for _ in batch:
                self.queue.popleft()
            self.full = False
        return len(batch)


def pod_name() -> str:
    """The pod's name (HOSTNAME in Kubernetes) and a token of this process: a restarted container keeps its name."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", os.environ.get("HOSTNAME") or socket.gethostname())[:63]
    return f"{host}-{uuid.uuid4().hex[:6]}"


class Recorder:
    def __init__(self, uri: str, sample_rate: float = 1.0, feedback_uri: str | None = None, pii: Pii | None = None,
                 endpoint: str | None = None, flush_seconds: float = 30.0, batch: int = 100, max_pending: int = 10000):
        pii = pii or Pii()
        self.scrubber = Scrubber(pii.redact, pii.allow)
        self.sample_rate, self.flush_seconds = sample_rate, flush_seconds
        storage, prefix = Storage(endpoint=endpoint), pod_name()
        self.capture = Sink(uri, store_for(uri, storage), prefix, max_pending, batch)
        self.feedback = (Sink(feedback_uri, store_for(feedback_uri, storage), f"{prefix}-feedback", max_pending, batch)
                         if feedback_uri else None)  # its own names: the two prefixes may be one
        self.recent = Recent()
        self.wake, self.stopping = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self.logged_drops = 0
        self.close_timeout = 20.0  # seconds close waits for storage: within a pod's default 30 s grace period

    # The request path: no I/O, no scrubbing.

    def completed(self, conversation: Conversation) -> None:
        self.recent.put(conversation)
        if random.random() < self.sample_rate and self.capture.add({"conversation": conversation}):
            self.wake.set()

    def rate(self, completion_id: str, rating: str, correction: str | None) -> bool | None:
        """Record feedback on a recent completion: None when it is unknown or expired; else whether it became
        training data (rated up or corrected, with a feedback_uri)."""
        conversation = self.recent.get(completion_id)
        if conversation is None:
            return None
        ready = self.capture.add({"conversation": conversation, "rating": rating, "correction": correction})
        training = self.feedback is not None and (rating == "up" or correction is not None)
        if training:
            ready = self.feedback.add({"conversation": conversation, "correction": correction, "plain": True}) or ready
        if ready:
            self.wake.set()
        return training

    # The writer thread.

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Write what is queued (waiting at most ``close_timeout`` seconds for storage), then stop."""
        self.stopping.set()
        self.wake.set()
        self.thread.join(self.close_timeout)
        self._log_drops()
        left = sum(len(s.queue) for s in self._sinks())
        if left:
            print(f"[capture] {left} conversations not written: storage did not answer in time", file=sys.stderr, flush=True)

    def _sinks(self) -> list[Sink]:
        return [s for s in (self.capture, self.feedback) if s is not None]

    def _run(self) -> None:
        while True:
            self.wake.wait(self.flush_seconds)
            self.wake.clear()
            stopping = self.stopping.is_set()
            ok = self.flush()
            if stopping:
                return
            if not ok:  # storage is down: wait a whole interval, however full the queues
                self.stopping.wait(self.flush_seconds)

    def flush(self) -> bool:
        """Write every queued record; False when storage failed (the records stay queued)."""
        ok = True
        for sink in self._sinks():  # each on its own: the two may be in different buckets
            try:
                while sink.write_batch(self._encode):
                    pass
            except Exception as e:  # a StorageError is one line without credentials; of others only the type
                why = str(e) if isinstance(e, StorageError) else type(e).__name__
                print(f"[capture] writing to {sink.uri} failed, will retry: {why}", file=sys.stderr, flush=True)
                ok = False
        self._log_drops()
        return ok

    def _log_drops(self) -> None:
        dropped = sum(s.dropped for s in self._sinks())
        if dropped > self.logged_drops:
            print(f"[capture] {dropped} conversations dropped so far (queue full: storage slow or down)",
                  file=sys.stderr, flush=True)
            self.logged_drops = dropped

    def _encode(self, record: dict) -> bytes:
        c: Conversation = record["conversation"]
        messages = scrub_messages(c.messages, self.scrubber)
        correction = record.get("correction")
        if correction is not None:
            correction = self.scrubber.scrub(correction)
        if record.get("plain"):  # training data: the corrected reply in place of the served one
            if correction is not None:
                messages[-1] = {"role": "assistant", "content": correction}
            return json.dumps({"messages": messages, **({"tools": c.tools} if c.tools else {})},
                              ensure_ascii=False).encode()
        out = {"id": c.id, "created": c.created, "model": c.model, "messages": messages}
        if c.tools:
            out["tools"] = c.tools
        if record.get("rating"):
            out["rating"] = record["rating"]
        if correction is not None:
            out["correction"] = correction
        return json.dumps(out, ensure_ascii=False).encode()


def scrub_messages(messages: list[dict], scrubber: Scrubber) -> list[dict]:
    """A copy with every content and tool-call argument scrubbed, as preparation scrubs them."""
    out = copy.deepcopy(messages)
    for m in out:
        if m.get("content") is not None:
            m["content"] = scrubber.scrub(m["content"])
        for call in m.get("tool_calls") or ():
            fn = call["function"]
            try:
                fn["arguments"] = clean_arguments(fn["arguments"], None, scrubber.scrub)
            except (ValueError, TypeError):  # arguments that are not JSON: scrubbed as text
                fn["arguments"] = scrubber.scrub(str(fn["arguments"]))
    return out
