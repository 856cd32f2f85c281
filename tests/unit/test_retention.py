"""The control plane's own bookkeeping is purged past its retention; what is still in use stays."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from controlplane.gateway.queue import WorkQueue, work_items
from controlplane.gateway.store import AgentStore, audit_log
from controlplane.retention import DAY, Retention, purge
from controlplane.storage.service import applied_writes
from controlplane.storage.service import metadata as storage_metadata


def test_purge_removes_only_what_is_past_retention(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/cp.db")
    for part in (WorkQueue(engine), AgentStore(engine)):
        part.create_schema()
    storage_metadata.create_all(engine)
    now = 1_000 * DAY
    with engine.begin() as conn:
        base = {"deployment": "d", "queue": "q", "kind": "grpc_call", "payload": "{}", "attempt": 1,
                "expires_at": now + DAY}
        conn.execute(work_items.insert(), [
            {**base, "id": "old-done", "status": "done", "created_at": now - 3 * DAY, "finished_at": now - 2 * DAY},
            {**base, "id": "new-done", "status": "done", "created_at": now - 60, "finished_at": now - 30},
            {**base, "id": "old-pending", "status": "pending", "created_at": now - 3 * DAY, "finished_at": None},
        ])
        conn.execute(applied_writes.insert(), [
            {"run_id": "r", "client": "c", "seq": 1, "method": "m", "applied_at": now - 8 * DAY},
            {"run_id": "r", "client": "c", "seq": 2, "method": "m", "applied_at": now - DAY},
        ])
        conn.execute(audit_log.insert(), [
            {"at": now - 91 * DAY, "operation": "o", "accepted": True, "reason": "old"},
            {"at": now - DAY, "operation": "o", "accepted": True, "reason": "recent"},
        ])
    counts = purge(engine, Retention(), now=now)
    assert counts == {"work items": 1, "ledger rows": 1, "audit entries": 1}
    with engine.connect() as conn:
        assert sorted(r.id for r in conn.execute(sa.select(work_items.c.id))) == ["new-done", "old-pending"]
        assert [r.seq for r in conn.execute(sa.select(applied_writes.c.seq))] == [2]
        assert [r.reason for r in conn.execute(sa.select(audit_log.c.reason))] == ["recent"]
    assert purge(engine, Retention(), now=now) == {"work items": 0, "ledger rows": 0, "audit entries": 0}


def test_retention_from_env_refuses_nonsense() -> None:
    assert Retention.from_env({"AIRLOCK_CP_RETAIN_AUDIT_SECONDS": "60"}).audit_seconds == 60
    with pytest.raises(ValueError, match="must be > 0"):
        Retention.from_env({"AIRLOCK_CP_RETAIN_WORK_SECONDS": "0"})
