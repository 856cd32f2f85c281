"""The storage RPC behind the agent API's `storageWrite` and `storageCall`.

Checks, in order, before anything runs: the agent serves the location (its queue is among the agent's labels),
the run exists and belongs to that location, then per call the allowlist and the run's scope (executor.py).
Writes are applied once: a ledger row (run id, client id, sequence) is written for each applied write (one
transaction per forwarded batch), and a write whose key is already there is counted as a duplicate and skipped.
Consecutive events of a batch are stored through Dagster's batched event write, in the run's order. Every
refusal is audited with its reason. Dagster calls block, so resolvers run these on a worker thread.

`airlock.run_exited` comes only from the appliance's agent (the relay does not accept it from run workers):
a run whose container ended before the run did is failed here, with the exit code, the OOM flag and the
container's last log lines as the reason.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from controlplane.storage.scope import LOCATION_WIDE, Scope
from protocol.storage_calls import EXIT_METHOD, CodecError, StorageCallRefused

if TYPE_CHECKING:
    from controlplane.storage.executor import StorageExecutor

__all__ = ["EXIT_METHOD", "StorageService", "applied_writes", "metadata"]

log = logging.getLogger("airlock.controlplane.storage")
metadata = sa.MetaData()

applied_writes = sa.Table(
    "airlock_storage_applied", metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("client", sa.String(64), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("method", sa.String(128), nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
)

Audit = Callable[..., None]  # AgentStore.audit(operation=, accepted=, reason=, key_id=, agent_id=)
ServesLocation = Callable[[Any, str], bool]  # (agent record, location) -> does this agent serve it


class StorageService:
    def __init__(self, engine: sa.Engine, instance_factory: Callable[[], Any], serves: ServesLocation,
                 audit: Audit) -> None:
        self.engine, self.serves, self.audit = engine, serves, audit
        self._instance_factory = instance_factory
        self._executor: StorageExecutor | None = None
        self._lock = threading.Lock()

    def create_schema(self) -> None:
        metadata.create_all(self.engine)

    @property
    def executor(self) -> StorageExecutor:
        with self._lock:  # the instance (and Dagster's import) only when the first run reports
            if self._executor is None:
                from controlplane.storage.executor import StorageExecutor

                self._executor = StorageExecutor(self._instance_factory())
            return self._executor

    def write(self, agent: Any, key_id: str, run_id: str, location: str, writes: list[dict]) -> dict[str, Any]:
        try:
            scope = self._admit(agent, key_id, run_id, location, "storageWrite")
        except StorageCallRefused as exc:  # the relay logs each and moves on: sending them again cannot help
            return {"accepted": 0, "duplicates": 0, "refused": [{"index": i, "error": str(exc)}
                                                               for i in range(len(writes))]}
        applied = self._applied_keys(run_id, writes)
        accepted = duplicates = 0
        refused: list[dict[str, Any]] = []
        done: list[dict[str, Any]] = []
        events: list[tuple[int, dict]] = []  # consecutive store_event writes, stored as one batch

        def flush_events() -> None:
            nonlocal accepted
            if not events:
                return
            outcomes = self.executor.store_events(scope, [(call["args"], call["kwargs"]) for _, call in events])
            for (index, call), error in zip(events, outcomes, strict=True):
                if error is None:
                    done.append(call)
                    accepted += 1
                else:
                    self._refused(refused, index, call, error, key_id, agent.id)
            events.clear()

        for index, call in enumerate(writes):
            if (call["client"], call["seq"]) in applied:
                duplicates += 1
                continue
            if call["method"] == "events.store_event":
                events.append((index, call))
                continue
            flush_events()  # keep the run's order: everything before this write is stored first
            try:
                if call["method"] == EXIT_METHOD:
                    self._run_exited(scope, json.loads(call["kwargs"]))
                else:
                    self.executor.execute(scope, call["method"], call["args"], call["kwargs"])
            except (StorageCallRefused, CodecError, ValueError, TypeError) as exc:
                self._refused(refused, index, call, str(exc), key_id, agent.id)
                continue
            done.append(call)
            accepted += 1
        flush_events()
        self._record(run_id, done)
        return {"accepted": accepted, "duplicates": duplicates, "refused": refused}

    def _refused(self, refused: list[dict[str, Any]], index: int, call: dict, error: str, key_id: str,
                 agent_id: str) -> None:
        refused.append({"index": index, "error": error})
        self.audit(operation=f"storageWrite {call['method']}", accepted=False, reason=error[:500], key_id=key_id,
                   agent_id=agent_id)

    def call(self, agent: Any, key_id: str, run_id: str, location: str, call: dict) -> dict[str, Any]:
        scope = self._admit(agent, key_id, run_id, location, "storageCall")
        try:
            return {"result": self.executor.execute(scope, call["method"], call["args"], call["kwargs"]),
                    "error": None}
        except (StorageCallRefused, CodecError) as exc:
            self.audit(operation=f"storageCall {call['method']}", accepted=False, reason=str(exc)[:500],
                       key_id=key_id, agent_id=agent.id)
            return {"result": None, "error": str(exc)}

    def _admit(self, agent: Any, key_id: str, run_id: str, location: str, operation: str) -> Scope:
        reason = None
        if not self.serves(agent, location):
            reason = f"agent {agent.id} does not serve location {location!r}"
        elif run_id == LOCATION_WIDE:
            if operation != "storageCall":
                reason = f"a location token of {location!r} may only read"
        else:
            run = self.executor.instance.get_run_by_id(run_id)
            origin = getattr(run, "remote_job_origin", None) if run else None
            if run is None:
                reason = f"no run {run_id}"
            elif origin is None or origin.location_name != location:
                reason = f"run {run_id} does not belong to location {location!r}"
        if reason:
            self.audit(operation=operation, accepted=False, reason=reason, key_id=key_id, agent_id=agent.id)
            raise StorageCallRefused(reason)
        return Scope(run_id=run_id, location=location)

    def _run_exited(self, scope: Scope, report: dict[str, Any]) -> None:
        instance = self.executor.instance
        run = instance.get_run_by_id(scope.run_id)
        code, oom = report.get("exit_code"), bool(report.get("oom_killed"))
        tail = (report.get("log_tail") or "").strip()
        if code is None and report.get("reason"):  # the container never started (the agent's launch failed)
            what = str(report["reason"])
        else:
            what = f"run container exited with code {code}" + (" after it was OOM-killed (memory limit reached)"
                                                                if oom else "")
            if report.get("reason"):
                what += f" ({report['reason']})"
        if run.is_finished:
            instance.report_engine_event(f"{what}; the run had already ended ({run.status.value}).", run)
            return
        never_started = code is None and report.get("reason")
        message = (f"{what}." if never_started else f"{what} before the run ended.") + (
            f"\nLast log lines:\n{tail[-4000:]}" if tail else "")
        if run.status.value == "CANCELING":
            instance.report_run_canceled(run, message=message)
        else:
            instance.report_run_failed(run, message=message)
        log.warning("run %s: %s", scope.run_id, what)

    def _applied_keys(self, run_id: str, writes: list[dict]) -> set[tuple[str, int]]:
        """Which of these writes (client, seq) were applied before: a batch sent again after a lost answer."""
        clients = {call["client"] for call in writes}
        if not clients:
            return set()
        seqs = [call["seq"] for call in writes]
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(applied_writes.c.client, applied_writes.c.seq).where(
                applied_writes.c.run_id == run_id, applied_writes.c.client.in_(clients),
                applied_writes.c.seq.between(min(seqs), max(seqs)))).all()
        return {(row.client, row.seq) for row in rows}

    def _record(self, run_id: str, done: list[dict]) -> None:
        """One ledger row per applied write, in one transaction."""
        if not done:
            return
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(sa.insert(applied_writes), [
                {"run_id": run_id, "client": c["client"], "seq": c["seq"], "method": c["method"], "applied_at": now}
                for c in done])
