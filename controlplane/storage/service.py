"""The storage RPC behind the agent API's `storageWrite` and `storageCall`.

Checks, in order, before anything runs: the agent serves the location (its queue is among the agent's labels),
the run exists and belongs to that location, then per call the allowlist and the run's scope (executor.py).
Writes are applied once: a ledger row (run id, client id, sequence) is written after each applied write, and a
write whose key is already there is counted as a duplicate and skipped. Every refusal is audited with its
reason. Dagster calls block, so resolvers run these on a worker thread.

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

from controlplane.storage.scope import Scope
from protocol.storage_calls import CodecError, StorageCallRefused

if TYPE_CHECKING:
    from controlplane.storage.executor import StorageExecutor

__all__ = ["EXIT_METHOD", "StorageService", "applied_writes", "metadata"]

log = logging.getLogger("airlock.controlplane.storage")
EXIT_METHOD = "airlock.run_exited"
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
        accepted = duplicates = 0
        refused: list[dict[str, Any]] = []
        for index, call in enumerate(writes):
            key = {"run_id": run_id, "client": call["client"], "seq": call["seq"]}
            if self._applied(key):
                duplicates += 1
                continue
            try:
                if call["method"] == EXIT_METHOD:
                    self._run_exited(scope, json.loads(call["kwargs"]))
                else:
                    self.executor.execute(scope, call["method"], call["args"], call["kwargs"])
            except (StorageCallRefused, CodecError, ValueError, TypeError) as exc:
                refused.append({"index": index, "error": str(exc)})
                self.audit(operation=f"storageWrite {call['method']}", accepted=False, reason=str(exc)[:500],
                           key_id=key_id, agent_id=agent.id)
                continue
            self._record(key, call["method"])
            accepted += 1
        return {"accepted": accepted, "duplicates": duplicates, "refused": refused}

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
        what = f"run container exited with code {code}" + (" after it was OOM-killed (memory limit reached)"
                                                            if oom else "")
        if report.get("reason"):
            what += f" ({report['reason']})"
        if run.is_finished:
            instance.report_engine_event(f"{what}; the run had already ended ({run.status.value}).", run)
            return
        message = f"{what} before the run ended." + (f"\nLast log lines:\n{tail[-4000:]}" if tail else "")
        if run.status.value == "CANCELING":
            instance.report_run_canceled(run, message=message)
        else:
            instance.report_run_failed(run, message=message)
        log.warning("run %s: %s", scope.run_id, what)

    def _applied(self, key: dict[str, Any]) -> bool:
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(applied_writes.c.seq).where(
                applied_writes.c.run_id == key["run_id"], applied_writes.c.client == key["client"],
                applied_writes.c.seq == key["seq"])).first()
        return found is not None

    def _record(self, key: dict[str, Any], method: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.insert(applied_writes).values(**key, method=method, applied_at=time.time()))
