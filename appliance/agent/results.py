"""Batch results back to the control plane: many answers per POST, never one POST per chunk.

A background thread flushes as soon as results are waiting (so a lone answer is not delayed) and
takes everything queued by then, up to `max_batch` results and `max_bytes` of JSON: a postResults request
must stay under the gateway's body limit (protocol/limits.py), or it is refused (413) however often it is
sent, and every result behind it waits. So a result that could never fit is replaced, when it is added, by
a failed result saying why (the caller gets that error, not a hang), and a batch refused as too large is
split. Any other failed POST is retried with backoff and nothing is dropped until `max_pending` is reached.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from protocol.backoff import Delays
from protocol.limits import AGENT_MAX_BODY, REQUEST_ROOM, encoded_size
from protocol.work import failed_result

__all__ = ["MAX_RESULT_BYTES", "ResultBatcher"]

log = logging.getLogger("airlock.agent.results")
MAX_RESULT_BYTES = AGENT_MAX_BODY - REQUEST_ROOM  # the results of one postResults request, in all


class ResultBatcher:
    def __init__(self, post: Callable[[list[dict[str, Any]]], int], *, max_batch: int = 64,
                 max_pending: int = 10_000, max_bytes: int = MAX_RESULT_BYTES) -> None:
        self.post, self.max_batch, self.max_pending, self.max_bytes = post, max_batch, max_pending, max_bytes
        self._pending: deque[tuple[dict[str, Any], int]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="airlock-results", daemon=True)
        self._thread.start()

    def add(self, result: dict[str, Any]) -> None:
        size = encoded_size(result)
        if size > self.max_bytes:
            log.error("result %s is %d bytes, over the %d a postResults request may carry: sending an error instead",
                      result.get("id"), size, self.max_bytes)
            result = failed_result(str(result.get("id")), f"the answer is {size} bytes, over the {self.max_bytes} "
                                   "bytes a result may have on the long-poll path; the work channel "
                                   "(AIRLOCK_WORK_CHANNEL=channel) carries answers up to Dagster's 100 MB")
            size = encoded_size(result)
        with self._cond:
            if len(self._pending) >= self.max_pending:
                dropped, _ = self._pending.popleft()
                log.error("result queue full: dropping the oldest result %s", dropped.get("id"))
            self._pending.append((result, size))
            self._cond.notify()

    def _take(self, limit: int) -> list[tuple[dict[str, Any], int]]:
        """The oldest results, at most `limit` of them and `max_bytes` in all (always at least one)."""
        batch, total = [], 0
        while self._pending and len(batch) < limit and (not batch or total + self._pending[0][1] <= self.max_bytes):
            entry = self._pending.popleft()
            batch.append(entry)
            total += entry[1]
        return batch

    def _loop(self) -> None:
        delays, limit = Delays(base=0.2, cap=10.0), self.max_batch
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending and self._stopping:
                    return
                batch = self._take(limit)
            try:
                self.post([result for result, _ in batch])
                delays.reset()
                limit = self.max_batch
            except Exception as exc:  # any transport failure: keep the batch, back off
                if getattr(exc, "status", None) == 413:  # too large after all: halve it; one result alone fails
                    batch, limit = self._too_large(batch, exc), max(1, len(batch) // 2)
                    with self._cond:
                        self._pending.extendleft(reversed(batch))
                    continue
                delay = delays.next()
                log.warning("posting %d result(s) failed, retrying in %.1f s: %s", len(batch), delay, exc)
                with self._cond:
                    self._pending.extendleft(reversed(batch))
                    self._cond.wait(delay)

    @staticmethod
    def _too_large(batch: list[tuple[dict[str, Any], int]], exc: Exception) -> list[tuple[dict[str, Any], int]]:
        if len(batch) > 1:
            log.warning("the gateway refused %d result(s) as too large (%s): sending them in smaller batches",
                        len(batch), exc)
            return batch
        result, _ = batch[0]
        log.error("the gateway refused result %s as too large (%s): sending an error instead", result.get("id"), exc)
        failed = failed_result(str(result.get("id")), f"the gateway refused the answer as too large: {exc}")
        return [(failed, encoded_size(failed))]

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
