"""How long the control plane keeps its own bookkeeping, and the purge that enforces it.

Every relayed gRPC call leaves a work item, every relayed call and refusal an audit entry, every run event a
row in the storage ledger (applied once: run, client, sequence). None of it is Dagster's data — runs, events
and compute logs stay as long as Dagster keeps them — but left alone these tables grow without bound. The sync
program purges them every few minutes:

- work items that ended (done, failed, expired) after `work_seconds` (default 1 day);
- ledger rows after `ledger_seconds` (default 7 days): a batch can only come again while it waits in an
  appliance's spool, which forwards within seconds of the control plane being reachable;
- audit entries after `audit_seconds` (default 90 days).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import sqlalchemy as sa

from controlplane.gateway.queue import work_items
from controlplane.gateway.store import audit_log
from controlplane.storage.service import applied_writes

__all__ = ["Retention", "purge"]

log = logging.getLogger("airlock.retention")
DAY = 24 * 3600.0


@dataclass(frozen=True)
class Retention:
    work_seconds: float = DAY
    ledger_seconds: float = 7 * DAY
    audit_seconds: float = 90 * DAY

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Retention:
        env = os.environ if env is None else env
        values = {field: float(env.get(f"AIRLOCK_CP_RETAIN_{field.upper()}", default))
                  for field, default in (("work_seconds", DAY), ("ledger_seconds", 7 * DAY),
                                         ("audit_seconds", 90 * DAY))}
        if any(v <= 0 for v in values.values()):
            raise ValueError(f"AIRLOCK_CP_RETAIN_*: every retention must be > 0 seconds, got {values}")
        return cls(**values)


def purge(engine: sa.Engine, retention: Retention, *, now: float | None = None) -> dict[str, int]:
    """Delete what is past its retention; returns how many rows of each table went."""
    now = time.time() if now is None else now
    ended = ("done", "failed", "expired")
    statements = {
        "work items": work_items.delete().where(work_items.c.status.in_(ended),
                                                work_items.c.finished_at < now - retention.work_seconds),
        "ledger rows": applied_writes.delete().where(applied_writes.c.applied_at < now - retention.ledger_seconds),
        "audit entries": audit_log.delete().where(audit_log.c.at < now - retention.audit_seconds),
    }
    counts = {}
    with engine.begin() as conn:
        for what, statement in statements.items():
            counts[what] = conn.execute(statement).rowcount or 0
    if any(counts.values()):
        log.info("purged %s", ", ".join(f"{n} {what}" for what, n in counts.items()))
    return counts
