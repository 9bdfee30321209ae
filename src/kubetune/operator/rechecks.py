"""Wake a job up later: the stall watchdog's clock.

A stalled trainer writes nothing, so nothing changes and no event reconciles its job. Each sync of a
training job asks for another one at the moment it would count as stalled; the latest request for a
job replaces the earlier ones. One thread and a heap serve every job (a Kopf timer per object would
cost memory for thousands of jobs, and add a finalizer to each).
"""

from __future__ import annotations

import contextvars
import heapq
import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


class Rechecks:
    def __init__(self, callback: Callable[[str, str], None]):
        self.callback = callback
        self.due: dict[tuple[str, str], float] = {}
        self.context: dict[tuple[str, str], contextvars.Context] = {}
        self.heap: list[tuple[float, tuple[str, str]]] = []
        self.wakeup = threading.Condition()
        threading.Thread(target=self._run, name="kubetune-rechecks", daemon=True).start()

    def after(self, namespace: str, name: str, seconds: float) -> None:
        at = time.monotonic() + max(seconds, 1.0)
        with self.wakeup:
            self.due[(namespace, name)] = at
            # Kopf's context (its settings, for posting Events) as in the handler that asked
            self.context[(namespace, name)] = contextvars.copy_context()
            heapq.heappush(self.heap, (at, (namespace, name)))
            self.wakeup.notify()

    def forget(self, namespace: str, name: str) -> None:
        with self.wakeup:
            self.due.pop((namespace, name), None)  # its heap entries are skipped when they come up
            self.context.pop((namespace, name), None)

    def _next(self) -> tuple[tuple[str, str], contextvars.Context]:
        with self.wakeup:
            while True:
                if not self.heap:
                    self.wakeup.wait()
                    continue
                at, key = self.heap[0]
                if self.due.get(key) != at:  # replaced or forgotten
                    heapq.heappop(self.heap)
                    continue
                wait = at - time.monotonic()
                if wait > 0:
                    self.wakeup.wait(wait)
                    continue
                heapq.heappop(self.heap)
                del self.due[key]
                return key, self.context.pop(key)

    def _run(self) -> None:
        while True:
            (namespace, name), context = self._next()
            log.debug(f"recheck of {namespace}/{name}")
            try:
                context.run(self.callback, namespace, name)
            except Exception:  # the callback retries on its own; this thread must live on
                log.exception(f"recheck of {namespace}/{name} failed")
