"""Spool -> control plane: each run's writes in order, batched, signed (by the gateway client), retried.

One thread. It takes the oldest unforwarded records of each run with pending writes, posts them as one
`storageWrite`, and acknowledges the spool only after the control plane answered. The control plane applies
each record once (run id, client id, sequence), so a batch re-sent after a lost answer stores nothing twice.
A record the control plane refuses (outside the run's scope, not decodable) is logged with the reason and
passed over, since sending it again cannot succeed; anything else — network, 5xx, control plane down — keeps
the batch in the spool and retries with backoff.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from appliance.metadata.spool import Spool, SpooledBatch
from protocol.backoff import Delays

__all__ = ["Forwarder", "WriteBatch"]

log = logging.getLogger("airlock.metadata.forward")
WriteBatch = Callable[[SpooledBatch], dict[str, Any]]  # -> {"accepted", "duplicates", "refused": [{index, error}]}


class Forwarder:
    def __init__(self, spool: Spool, send: WriteBatch, *, max_records: int = 2000,
                 max_bytes: int = 2 * 1024 * 1024) -> None:
        # max_bytes keeps a request well under the gateway's limit for agents (8 MB): a spooled record is
        # at most a compute log chunk (256 kB of text) with its escaping
        self.spool, self.send, self.max_records, self.max_bytes = spool, send, max_records, max_bytes
        self.forwarded = 0

    def run(self, stop: threading.Event) -> None:
        delays = Delays(base=0.2, cap=10.0)
        while not stop.is_set():
            runs = self.spool.pending_runs()
            if not runs:
                with self.spool.changed:
                    self.spool.changed.wait(timeout=1.0)
                continue
            failed: Exception | None = None
            for run_id in runs:
                try:
                    self.forward_one(run_id)
                except Exception as exc:  # control plane down, network, refusal of the whole batch: retry
                    failed = exc
                    if getattr(exc, "status", None) is None:
                        break  # not answered: the control plane is away for every run alike
                    # answered with a refusal of this run's batch: the other runs still go
            if failed is None:
                delays.reset()
                continue
            wait = delays.next()
            log.warning("forwarding failed (%s: %s); retrying in %.1f s", type(failed).__name__, failed, wait)
            stop.wait(wait)

    def forward_one(self, run_id: str) -> int:
        batch = self.spool.read_batch(run_id, max_records=self.max_records, max_bytes=self.max_bytes)
        if not batch.records:
            return 0
        answer = self.send(batch)
        for refusal in answer.get("refused") or []:
            record = batch.records[refusal["index"]] if refusal["index"] < len(batch.records) else {}
            log.error("control plane refused %s of run %s: %s", record.get("method"), run_id, refusal["error"])
        self.spool.ack(run_id, batch.end)
        self.forwarded += len(batch.records)
        return len(batch.records)
