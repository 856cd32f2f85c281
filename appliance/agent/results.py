"""Batch results back to the control plane: many answers per POST, never one POST per chunk.

A background thread flushes as soon as results are waiting (so a lone answer is not delayed) and
takes everything queued by then; a failed POST is retried with backoff and nothing is dropped
until the bound is reached.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("airlock.agent.results")


class ResultBatcher:
    def __init__(self, post: Callable[[list[dict[str, Any]]], int], *, max_batch: int = 64,
                 max_pending: int = 10_000) -> None:
        self.post, self.max_batch, self.max_pending = post, max_batch, max_pending
        self._pending: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="airlock-results", daemon=True)
        self._thread.start()

    def add(self, result: dict[str, Any]) -> None:
        with self._cond:
            if len(self._pending) >= self.max_pending:
                dropped = self._pending.popleft()
                log.error("result queue full: dropping the oldest result %s", dropped.get("id"))
            self._pending.append(result)
            self._cond.notify()

    def _loop(self) -> None:
        delay = 0.2
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending and self._stopping:
                    return
                batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            try:
                self.post(batch)
                delay = 0.2
            except Exception as exc:  # any transport failure: keep the batch, back off
                log.warning("posting %d result(s) failed, retrying in %.1f s: %s", len(batch), delay, exc)
                with self._cond:
                    self._pending.extendleft(reversed(batch))
                    self._cond.wait(delay)
                delay = min(delay * 2, 10.0)

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
