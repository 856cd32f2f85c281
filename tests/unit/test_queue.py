"""The control plane's work queue: routing, exactly-once claims under concurrency, leases, ttl, long poll."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.pool import StaticPool

from controlplane.db import create_engine
from controlplane.gateway.queue import WorkQueue, WorkResult, claim_statement


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine() -> Iterator[sa.Engine]:
    eng = sa.create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    yield eng
    eng.dispose()


@pytest.fixture
def q(engine: sa.Engine, clock: Clock) -> WorkQueue:
    wq = WorkQueue(engine, clock=clock)
    wq.create_schema()
    return wq


def file_engine(path: Path) -> sa.Engine:
    """As every control-plane program opens its database (controlplane/db.py: WAL, busy timeout)."""
    return create_engine(f"sqlite:///{path}")


def test_create_schema_is_idempotent(q: WorkQueue) -> None:
    q.create_schema()
    q.create_schema()
    assert q.pending_count("d", "q") == 0


def test_claim_hands_out_oldest_first(q: WorkQueue, clock: Clock) -> None:
    ids = []
    for n in range(3):
        ids.append(q.enqueue("d", "q", "LAUNCH_RUN", {"n": n}))
        clock.now += 1
    tied = [q.enqueue("d", "q", "TERMINATE_RUN", {"n": n}) for n in (3, 4)]  # same tick: enqueue order wins
    assert q.pending_count("d", "q") == 5

    first = q.claim("d", ["q"], "agent-a", limit=2, lease_seconds=30)
    assert [i.id for i in first] == ids[:2]
    item = first[0]
    assert (item.deployment, item.queue, item.kind, item.payload) == ("d", "q", "LAUNCH_RUN", {"n": 0})
    assert item.attempt == 1
    assert item.created_at == 1_000.0
    assert item.lease_until == clock.now + 30
    assert [i.id for i in q.claim("d", ["q"], "agent-a")] == [ids[2], *tied]
    assert q.pending_count("d", "q") == 0


def test_claim_respects_deployment_and_queue_routing(q: WorkQueue) -> None:
    mine = q.enqueue("d1", "gpu", "k", {})
    other_queue = q.enqueue("d1", "cpu", "k", {})
    other_deployment = q.enqueue("d2", "gpu", "k", {})

    assert [i.id for i in q.claim("d1", ["gpu"], "a")] == [mine]
    assert q.claim("d1", ["gpu"], "a") == []
    assert q.claim("d1", [], "a") == []
    assert [i.id for i in q.claim("d2", ["gpu", "cpu"], "b")] == [other_deployment]
    assert [i.id for i in q.claim("d1", ["gpu", "cpu"], "a")] == [other_queue]


def test_claimed_item_is_not_claimed_again(q: WorkQueue) -> None:
    item_id = q.enqueue("d", "q", "k", {})
    assert [i.id for i in q.claim("d", ["q"], "agent-a")] == [item_id]
    assert q.claim("d", ["q"], "agent-a") == []
    assert q.claim("d", ["q"], "agent-b") == []
    assert q.result(item_id) is None  # claimed is not finished


def test_concurrent_claimers_on_a_file_get_every_item_exactly_once(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    setup_engine = file_engine(db)
    producer = WorkQueue(setup_engine)
    producer.create_schema()
    enqueued = {producer.enqueue("d", "q", "k", {"n": n}) for n in range(200)}

    # One engine and one WorkQueue per thread, like separate gateway processes: only the database arbitrates.
    engines = [file_engine(db) for _ in range(8)]
    barrier = threading.Barrier(len(engines))
    handed_out: list[list[str]] = [[] for _ in engines]
    errors: list[BaseException] = []

    def claimer(n: int) -> None:
        try:
            wq = WorkQueue(engines[n])
            barrier.wait()
            while batch := wq.claim("d", ["q"], f"agent-{n}", limit=3):
                handed_out[n].extend(i.id for i in batch)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for eng in [setup_engine, *engines]:
        eng.dispose()

    assert errors == []
    flat = [i for ids in handed_out for i in ids]
    assert len(flat) == 200
    assert set(flat) == enqueued
    assert sum(1 for ids in handed_out if ids) > 1  # the claimers really did compete


def test_lapsed_lease_requeues_with_attempt_incremented(q: WorkQueue, clock: Clock) -> None:
    item_id = q.enqueue("d", "q", "k", {"x": 1}, ttl_seconds=600)
    q.claim("d", ["q"], "agent-a", lease_seconds=30)

    clock.now += 29
    assert q.requeue_expired_leases() == 0
    assert q.claim("d", ["q"], "agent-b") == []

    clock.now += 1
    assert q.requeue_expired_leases() == 1
    assert q.pending_count("d", "q") == 1
    [again] = q.claim("d", ["q"], "agent-b")
    assert (again.id, again.attempt, again.payload) == (item_id, 2, {"x": 1})

    assert q.complete(item_id, "agent-a", result={"late": True}) is False  # its lease lapsed, b holds it now
    assert q.complete(item_id, "agent-b", result={"ok": True}) is True


def test_ttl_expiry_marks_expired_and_result_says_so(q: WorkQueue, clock: Clock) -> None:
    never_claimed = q.enqueue("d", "q", "k", {}, ttl_seconds=5)
    clock.now += 5
    assert q.claim("d", ["q"], "a") == []  # past ttl: not handed out even before the sweep
    assert q.pending_count("d", "q") == 0
    assert q.result(never_claimed) is None

    assert q.requeue_expired_leases() == 1
    res = q.result(never_claimed)
    assert res is not None
    assert (res.status, res.result) == ("expired", None)
    assert res.error

    lapsed_late = q.enqueue("d", "q", "k", {}, ttl_seconds=20)
    q.claim("d", ["q"], "a", lease_seconds=60)
    clock.now += 30  # past ttl, lease still live: the agent may still finish
    assert q.requeue_expired_leases() == 0
    clock.now += 30  # lease lapsed after the ttl: expire, do not requeue
    assert q.requeue_expired_leases() == 1
    assert q.pending_count("d", "q") == 0
    res = q.result(lapsed_late)
    assert res is not None and res.status == "expired"
    assert q.complete(lapsed_late, "a", result={}) is False


def test_complete_refuses_other_agents_and_repeats_are_idempotent(q: WorkQueue) -> None:
    item_id = q.enqueue("d", "q", "k", {})
    assert q.complete(item_id, "agent-a", result={"early": 1}) is False  # not claimed yet
    q.claim("d", ["q"], "agent-a")

    assert q.complete(item_id, "agent-b", result={"v": 1}) is False
    assert q.complete(item_id, "agent-a", result={"v": 1}) is True
    assert q.complete(item_id, "agent-a", result={"v": 1}) is True  # retried POST
    assert q.complete(item_id, "agent-a", result={"v": 2}) is False  # a different answer is not a retry
    assert q.complete(item_id, "agent-b", result={"v": 1}) is False
    assert q.result(item_id) == WorkResult(item_id, "done", {"v": 1}, None)

    failing = q.enqueue("d", "q", "k", {})
    q.claim("d", ["q"], "agent-a")
    assert q.complete(failing, "agent-a", error="boom") is True
    assert q.complete(failing, "agent-a", error="boom") is True
    assert q.result(failing) == WorkResult(failing, "failed", None, "boom")
    assert q.complete("no-such-id", "agent-a") is False


def test_wait_for_work_wakes_on_enqueue_from_another_thread(q: WorkQueue) -> None:
    q.RECHECK_SECONDS = 30  # only the in-process notification can wake it before the 2 s bound below

    async def main() -> tuple[bool, float]:
        timer = threading.Timer(0.05, q.enqueue, args=("d", "q", "k", {}))
        start = time.monotonic()
        timer.start()
        woke = await q.wait_for_work("d", ["other", "q"], timeout=10)
        return woke, time.monotonic() - start

    woke, elapsed = asyncio.run(main())
    assert woke is True
    assert elapsed < 2


def test_wait_for_work_returns_at_once_when_work_is_already_there(q: WorkQueue) -> None:
    q.enqueue("d", "q", "k", {})
    assert asyncio.run(q.wait_for_work("d", ["q"], timeout=10)) is True


def test_wait_for_work_times_out_false(q: WorkQueue) -> None:
    async def main() -> bool:
        threading.Timer(0.05, q.enqueue, args=("d", "elsewhere", "k", {})).start()
        threading.Timer(0.05, q.enqueue, args=("other-deployment", "q", "k", {})).start()
        return await q.wait_for_work("d", ["q"], timeout=0.3)

    assert asyncio.run(main()) is False


def test_wait_for_work_sees_enqueue_by_another_instance_via_recheck(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    waiting_engine, other_engine = file_engine(db), file_engine(db)
    waiting, other = WorkQueue(waiting_engine), WorkQueue(other_engine)
    waiting.create_schema()

    async def main() -> tuple[bool, float]:
        threading.Timer(0.1, other.enqueue, args=("d", "q", "k", {})).start()
        start = time.monotonic()
        woke = await waiting.wait_for_work("d", ["q"], timeout=10)
        return woke, time.monotonic() - start

    try:
        woke, elapsed = asyncio.run(main())
    finally:
        waiting_engine.dispose()
        other_engine.dispose()
    assert woke is True
    assert elapsed < 2


def test_wait_for_result_returns_the_agents_answer(q: WorkQueue) -> None:
    item_id = q.enqueue("d", "q", "k", {})
    q.claim("d", ["q"], "agent-a")

    async def main() -> WorkResult | None:
        threading.Timer(0.05, q.complete, args=(item_id, "agent-a"), kwargs={"result": {"ok": True}}).start()
        return await q.wait_for_result(item_id, timeout=10)

    assert asyncio.run(main()) == WorkResult(item_id, "done", {"ok": True}, None)
    other = q.enqueue("d", "q", "k", {})
    assert asyncio.run(q.wait_for_result(other, timeout=0.2)) is None


def test_postgres_claim_statement_uses_skip_locked() -> None:
    stmt = claim_statement()
    pg = str(stmt.compile(dialect=postgresql.dialect()))
    assert "FOR UPDATE SKIP LOCKED" in pg
    assert "AS MATERIALIZED" in pg
    assert "RETURNING" in pg
    assert "FOR UPDATE" not in str(stmt.compile(dialect=sqlite.dialect()))


def test_release_hands_claimed_items_back_at_once(tmp_path) -> None:
    import sqlalchemy as sa

    from controlplane.gateway.queue import WorkQueue

    queue = WorkQueue(sa.create_engine(f"sqlite:///{tmp_path}/release.db"))
    queue.create_schema()
    item = queue.enqueue("d", "q", "GRPC_CALL", {})
    [claimed] = queue.claim("d", ["q"], "ghost")
    assert queue.release([claimed.id], "someone-else") == 0  # only the claiming agent's items
    assert queue.release([claimed.id], "ghost") == 1
    [again] = queue.claim("d", ["q"], "alive")
    assert again.id == item and queue.complete(item, "alive", result={"ok": 1})
