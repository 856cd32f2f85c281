"""The control plane's work queue: typed requests per (deployment, agent queue), fetched by long poll.

A table, not an in-memory queue: gateways are stateless, may be several processes on one database
(DESIGN.md "Scale"), and a queued request must survive a gateway restart. A claim is one statement,
`WITH picked AS MATERIALIZED (SELECT ... FOR UPDATE SKIP LOCKED) UPDATE ... WHERE status = 'pending'
RETURNING ...`. On Postgres (12+) concurrent gateways skip each other's locked rows instead of waiting, and
MATERIALIZED makes the LIMIT subquery run exactly once. SQLite has no row locks (FOR UPDATE renders as
nothing), so there it runs inside `BEGIN IMMEDIATE`, which takes the single write lock before anything is
read: two claimers never see the same rows.

pending -> claimed (leased) -> done | failed. `requeue_expired_leases` is the sweeper the gateway must run
every few seconds: a lapsed lease goes back to pending with attempt + 1; past its ttl an item is expired.
Long poll: waiters register an asyncio.Event that `enqueue`/`complete` set via `call_soon_threadsafe`, so
those may run on any thread. Other gateway processes cannot reach the events, so waiters also re-check
the database every RECHECK_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa

__all__ = ["WorkItem", "WorkQueue", "WorkResult", "claim_statement", "metadata", "work_items"]

PENDING, CLAIMED, DONE, FAILED, EXPIRED = "pending", "claimed", "done", "failed", "expired"
TTL_EXPIRED = "expired: not completed within its ttl"

T = TypeVar("T")
_Key = tuple[str, ...]
_Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Event]

metadata = sa.MetaData()

work_items = sa.Table(
    "airlock_work_items", metadata,
    # seq orders items enqueued within the same clock tick and is what the claim locks and matches on.
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(32), nullable=False, unique=True),
    sa.Column("deployment", sa.String(64), nullable=False),
    sa.Column("queue", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),  # JSON
    sa.Column("status", sa.String(16), nullable=False),  # pending | claimed | done | failed | expired
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),  # 1 on first delivery, +1 per lapsed lease
    sa.Column("agent_id", sa.String(64)),
    sa.Column("lease_until", sa.Float),
    sa.Column("result", sa.Text),  # JSON
    sa.Column("error", sa.Text),
    sa.Column("finished_at", sa.Float),
    sa.Index("ix_airlock_work_items_claim", "deployment", "queue", "status", "created_at"),
    sa.Index("ix_airlock_work_items_sweep", "status", "lease_until"),
)


@dataclass(frozen=True)
class WorkItem:
    id: str
    deployment: str
    queue: str
    kind: str
    payload: dict[str, Any]
    created_at: float
    attempt: int
    lease_until: float | None


@dataclass(frozen=True)
class WorkResult:
    id: str
    status: str  # done | failed | expired
    result: dict[str, Any] | None
    error: str | None


def claim_statement() -> sa.Update:
    """The single claim statement for every dialect (see the module docstring for why it is shaped so), with
    bind parameters claim_deployment, claim_queues (a list), claim_now, claim_limit, claim_agent and claim_lease
    (named apart from the columns, as an UPDATE requires). Built once:
    constructing it costs more than running it on SQLite."""
    t = work_items
    picked = (
        sa.select(t.c.seq)
        .where(t.c.deployment == sa.bindparam("claim_deployment"),
               t.c.queue.in_(sa.bindparam("claim_queues", expanding=True)),
               t.c.status == PENDING, t.c.expires_at > sa.bindparam("claim_now"))
        .order_by(t.c.created_at, t.c.seq)
        .limit(sa.bindparam("claim_limit"))
        .with_for_update(skip_locked=True)
        .cte("picked")
        .prefix_with("MATERIALIZED")
    )
    # The outer status check is what keeps an item from being handed out twice even if the inner read raced.
    return (
        sa.update(t)
        .where(t.c.seq.in_(sa.select(picked.c.seq)), t.c.status == PENDING)
        .values(status=CLAIMED, agent_id=sa.bindparam("claim_agent"), lease_until=sa.bindparam("claim_lease"))
        .returning(*t.c)
    )


_CLAIM = claim_statement()
_INSERT = sa.insert(work_items)


class WorkQueue:
    """Enqueue, claim, complete and sweep work items; long-poll for work and for results."""

    RECHECK_SECONDS = 0.5  # how stale a waiter may be about work enqueued by another gateway process

    def __init__(self, engine: sa.Engine, *, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._clock = clock
        self._sqlite = engine.dialect.name == "sqlite"
        # SQLite has one writer per database anyway; serialising this process's use of it also keeps an
        # in-memory StaticPool engine (one connection shared by threads) from interleaving transactions.
        self._db_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if self._sqlite else contextlib.nullcontext()
        )
        self._waiters: dict[_Key, set[_Waiter]] = {}
        self._waiters_lock = threading.Lock()

    def create_schema(self) -> None:
        """Create the table and indexes if they are missing; safe to call on every start."""
        with self._db_lock:
            metadata.create_all(self._engine, checkfirst=True)

    def enqueue(
        self, deployment: str, queue: str, kind: str, payload: dict[str, Any], *, ttl_seconds: float = 600
    ) -> str:
        """Queue one request; the ttl bounds how long a caller may still care about its answer."""
        item_id = uuid.uuid4().hex
        now = self._clock()
        with self._write() as conn:
            conn.execute(_INSERT, {
                "id": item_id, "deployment": deployment, "queue": queue, "kind": kind, "payload": _dump(payload),
                "status": PENDING, "created_at": now, "expires_at": now + ttl_seconds, "attempt": 1,
            })
        self._notify(("work", deployment, queue))
        return item_id

    def claim(
        self, deployment: str, queues: Sequence[str], agent_id: str, *, limit: int = 16, lease_seconds: float = 60
    ) -> list[WorkItem]:
        """Hand up to `limit` pending items, oldest first, to one agent, each under a lease."""
        if not queues or limit <= 0:
            return []
        now = self._clock()
        params = {"claim_deployment": deployment, "claim_queues": list(queues), "claim_now": now, "claim_limit": limit,
                  "claim_agent": agent_id, "claim_lease": now + lease_seconds}
        with self._write() as conn:
            rows = conn.execute(_CLAIM, params).all()
        rows.sort(key=lambda r: (r.created_at, r.seq))  # RETURNING promises no order
        return [
            WorkItem(r.id, r.deployment, r.queue, r.kind, json.loads(r.payload), r.created_at, r.attempt, r.lease_until)
            for r in rows
        ]

    def complete(
        self, item_id: str, agent_id: str, *, result: dict[str, Any] | None = None, error: str | None = None
    ) -> bool:
        """Record the claiming agent's answer (`error` set means failed); False if it may not answer."""
        t = work_items
        status = FAILED if error is not None else DONE
        with self._write() as conn:
            updated = conn.execute(
                sa.update(t)
                .where(t.c.id == item_id, t.c.agent_id == agent_id, t.c.status == CLAIMED)
                .values(status=status, result=None if result is None else _dump(result), error=error,
                        finished_at=self._clock())
            ).rowcount
            if updated != 1:
                row = conn.execute(
                    sa.select(t.c.status, t.c.agent_id, t.c.result, t.c.error).where(t.c.id == item_id)
                ).first()
                # An agent that retries a POST whose response it lost repeats exactly what is stored: accept it.
                return (
                    row is not None and row.status == status and row.agent_id == agent_id
                    and _load(row.result) == result and row.error == error
                )
        self._notify(("result", item_id))
        return True

    def requeue_expired_leases(self) -> int:
        """Sweep: lapsed leases back to pending (attempt + 1), items past ttl to expired; returns both counts."""
        t = work_items
        now = self._clock()
        lapsed = sa.and_(t.c.status == CLAIMED, t.c.lease_until <= now)
        with self._write() as conn:
            # An agent still inside its lease may finish after the ttl; only undelivered or lapsed items expire.
            expired = conn.execute(
                sa.update(t)
                .where(sa.or_(t.c.status == PENDING, lapsed), t.c.expires_at <= now)
                .values(status=EXPIRED, lease_until=None, error=TTL_EXPIRED, finished_at=now)
                .returning(t.c.id)
            ).scalars().all()
            requeued = conn.execute(
                sa.update(t)
                .where(lapsed)
                .values(status=PENDING, agent_id=None, lease_until=None, attempt=t.c.attempt + 1)
                .returning(t.c.deployment, t.c.queue)
            ).all()
        for item_id in expired:
            self._notify(("result", item_id))
        for deployment, queue in set(requeued):
            self._notify(("work", deployment, queue))
        return len(expired) + len(requeued)

    def release(self, item_ids: Sequence[str], agent_id: str) -> int:
        """Hand claimed items straight back (the long poll that claimed them lost its agent)."""
        t = work_items
        with self._write() as conn:
            rows = conn.execute(
                sa.update(t).where(t.c.id.in_(list(item_ids)), t.c.agent_id == agent_id, t.c.status == CLAIMED)
                .values(status=PENDING, agent_id=None, lease_until=None).returning(t.c.deployment, t.c.queue)
            ).all()
        for deployment, queue in set(rows):
            self._notify(("work", deployment, queue))
        return len(rows)

    def result(self, item_id: str) -> WorkResult | None:
        """The final outcome, or None while the item is pending or claimed (or unknown)."""
        t = work_items
        with self._read() as conn:
            row = conn.execute(sa.select(t.c.status, t.c.result, t.c.error).where(t.c.id == item_id)).first()
        if row is None or row.status in (PENDING, CLAIMED):
            return None
        return WorkResult(item_id, row.status, _load(row.result), row.error)

    def pending_count(self, deployment: str, queue: str) -> int:
        """Claimable items (pending and within ttl) on one queue."""
        stmt = sa.select(sa.func.count()).select_from(work_items).where(*_claimable(deployment, [queue], self._clock()))
        with self._read() as conn:
            return conn.execute(stmt).scalar_one()

    async def wait_for_work(self, deployment: str, queues: Sequence[str], timeout: float) -> bool:
        """Long poll: True as soon as a claimable item is on one of `queues`, False after `timeout` seconds."""
        keys = [("work", deployment, q) for q in queues]
        # A notification here means an item was just enqueued or released on one of the queues: answer at once
        # (the caller's claim decides), rather than re-reading the table first.
        found = await self._wait(keys, lambda: self._has_work(deployment, queues), timeout, trust_notification=True)
        return found is not None

    async def wait_for_result(self, item_id: str, timeout: float) -> WorkResult | None:
        """Long poll for an agent's answer to one item; None after `timeout` seconds."""
        found = await self._wait([("result", item_id)], lambda: self.result(item_id), timeout)
        assert not isinstance(found, bool)
        return found

    @contextlib.contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        """One write transaction; on SQLite, BEGIN IMMEDIATE takes the write lock before the first read."""
        with self._db_lock, self._engine.connect() as conn:
            if self._sqlite:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield conn
            conn.commit()

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self._db_lock, self._engine.connect() as conn:
            yield conn

    def _has_work(self, deployment: str, queues: Sequence[str]) -> bool | None:
        claimable = sa.select(work_items.c.seq).where(*_claimable(deployment, queues, self._clock())).limit(1)
        with self._read() as conn:
            return True if conn.execute(claimable).first() is not None else None

    async def _wait(self, keys: Sequence[_Key], check: Callable[[], T | None], timeout: float, *,
                    trust_notification: bool = False) -> T | bool | None:
        """Re-run `check` (off the loop) on every notification for `keys`, and at least every RECHECK_SECONDS;
        with `trust_notification`, a notification itself ends the wait (True)."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        waiter: _Waiter = (loop, event)
        with self._waiters_lock:  # register before the first check, so no notification can slip between
            for key in keys:
                self._waiters.setdefault(key, set()).add(waiter)
        try:
            deadline = loop.time() + timeout
            while True:
                event.clear()
                found = await asyncio.to_thread(check)
                remaining = deadline - loop.time()
                if found is not None or remaining <= 0:
                    return found
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, self.RECHECK_SECONDS))
                    if trust_notification:
                        return True
        finally:
            with self._waiters_lock:
                for key in keys:
                    waiters = self._waiters.get(key, set())
                    waiters.discard(waiter)
                    if not waiters:
                        self._waiters.pop(key, None)

    def _notify(self, key: _Key) -> None:
        """Wake this process's waiters on `key`; callable from any thread."""
        with self._waiters_lock:
            waiters = list(self._waiters.get(key, ()))
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed, so nobody is waiting on it
                loop.call_soon_threadsafe(event.set)


def _claimable(deployment: str, queues: Sequence[str], now: float) -> list[sa.ColumnElement[bool]]:
    t = work_items
    return [t.c.deployment == deployment, t.c.queue.in_(list(queues)), t.c.status == PENDING, t.c.expires_at > now]


def _dump(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _load(text: str | None) -> dict[str, Any] | None:
    return None if text is None else json.loads(text)
