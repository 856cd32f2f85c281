"""HybridRunLauncher: the control plane instance's run launcher. Runs start in the appliance, never here.

`launch_run` queues a LAUNCH_RUN (signed when an agent claims it, like all work) on the agent queue of the
run's code location, carrying the `dagster api execute_run` arguments with userland's instance ref.
`terminate` marks the run CANCELING and queues TERMINATE_RUN; the agent stops the container with a grace
period and the run worker reports CANCELED itself (or the agent's exit report does, if it cannot).
Run monitoring asks `check_run_worker_health`, answered from the agents' heartbeats: a run whose agent is
alive but no longer has its container has lost its worker. A container that has exited is not judged here:
the agent's exit report travels behind the run's own events, so it is read only after them, and it fails
the run (with exit code, OOM flag and last lines) if the run had not ended by itself.

Configured in the control plane's dagster.yaml; reads the airlock database from the same settings as the
gateway (AIRLOCK_CP_DB, AIRLOCK_CP_DEPLOYMENT).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import sqlalchemy as sa
from dagster import Field, Int
from dagster._core.launcher import CheckRunHealthResult, LaunchRunContext, RunLauncher, WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import ConfigurableClass, ConfigurableClassData, serialize_value

from controlplane.db import create_engine
from controlplane.gateway.queue import WorkQueue
from controlplane.gateway.store import agents
from controlplane.registry import Registry
from controlplane.runs.instance_ref import userland_instance_ref
from controlplane.settings import ControlPlaneSettings
from protocol.work import WorkKind

__all__ = ["HybridRunLauncher", "launch_payload"]

HEARTBEAT_FRESH_SECONDS = 45.0
LAUNCH_GRACE_SECONDS = 120.0  # a run launched this recently may not be in a heartbeat yet
AGENT_LOST_SECONDS = 600.0  # an agent silent this long has lost its runs


def launch_payload(run: DagsterRun, location: str) -> dict[str, Any]:
    args = ExecuteRunArgs(job_origin=run.job_code_origin, run_id=run.run_id, instance_ref=userland_instance_ref(),
                          set_exit_code_on_failure=True)
    return {"run_id": run.run_id, "location": location, "job_name": run.job_name,
            "execute_run_args": serialize_value(args)}


class HybridRunLauncher(RunLauncher, ConfigurableClass):
    def __init__(self, inst_data: ConfigurableClassData | None = None, terminate_grace_seconds: int = 20,
                 database_url: str | None = None) -> None:
        self._inst_data = inst_data
        self.terminate_grace_seconds = terminate_grace_seconds
        self.settings = ControlPlaneSettings.from_env()
        self.database_url = database_url or self.settings.database_url
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict:
        return {"terminate_grace_seconds": Field(Int, is_required=False, default_value=20)}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None,
                          config_value: Mapping[str, Any]) -> HybridRunLauncher:
        return cls(inst_data=inst_data, **config_value)

    @cached_property
    def engine(self) -> sa.Engine:
        return create_engine(self.database_url)

    @cached_property
    def queue(self) -> WorkQueue:
        return WorkQueue(self.engine)

    @cached_property
    def registry(self) -> Registry:
        return Registry(self.engine, self.queue)

    def _location(self, run: DagsterRun) -> tuple[str, str]:
        origin = run.remote_job_origin
        if origin is None:
            raise RuntimeError(f"run {run.run_id} has no code location origin; airlock launches only runs of "
                               "registered locations")
        record = self.registry.get(self.settings.deployment, origin.location_name)
        if record is None:
            raise RuntimeError(f"code location {origin.location_name!r} is not registered in deployment "
                               f"{self.settings.deployment!r} (airlock-cp location list)")
        return origin.location_name, record.spec.queue

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        location, queue = self._location(run)
        work_id = self.queue.enqueue(self.settings.deployment, queue, WorkKind.LAUNCH_RUN.value,
                                     launch_payload(run, location), ttl_seconds=3600)
        self._instance.report_engine_event(
            f"Queued for the appliance serving agent queue {queue!r} (location {location}, work {work_id}).",
            run, cls=self.__class__)

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return False
        location, queue = self._location(run)
        self._instance.report_run_canceling(run)
        self.queue.enqueue(self.settings.deployment, queue, WorkKind.TERMINATE_RUN.value,
                           {"run_id": run_id, "location": location, "grace_seconds": self.terminate_grace_seconds},
                           ttl_seconds=600)
        return True

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def _started_at(self, run: DagsterRun) -> float | None:
        record = self._instance.get_run_record_by_id(run.run_id)
        return record.start_time if record else None

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        """From the agents' heartbeats: which run containers each one has, and how recently it said so.

        Dagster fails a run on any answer but RUNNING or SUCCESS, so doubt answers RUNNING: an agent that
        has not reported for a while (a control plane that just came back, a network blip) gets
        AGENT_LOST_SECONDS before its runs are failed, and an exited container's outcome is left to the
        agent's exit report, which arrives behind the run's own events.
        """
        try:
            location, queue = self._location(run)
        except RuntimeError as exc:
            return CheckRunHealthResult(WorkerStatus.FAILED, str(exc))
        now, newest, seen = time.time(), 0.0, None
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(agents.c.labels, agents.c.last_seen, agents.c.heartbeat).where(
                agents.c.deployment == self.settings.deployment, agents.c.status == "active")).all()
        for row in rows:
            if queue not in json.loads(row.labels) or not row.last_seen:
                continue
            newest = max(newest, row.last_seen)
            for entry in (json.loads(row.heartbeat or "{}").get("runs") or []):
                if entry.get("runId") == run.run_id:
                    seen = entry
        silent = now - newest
        if silent > HEARTBEAT_FRESH_SECONDS:
            if silent > AGENT_LOST_SECONDS:
                return CheckRunHealthResult(WorkerStatus.FAILED, f"no agent serving queue {queue!r} has sent a "
                                            f"heartbeat for {silent:.0f} s; the run's worker is presumed lost")
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"agent heartbeat {silent:.0f} s old; waiting")
        if seen is None:
            started = self._started_at(run)
            if not started or now - started < LAUNCH_GRACE_SECONDS:
                return CheckRunHealthResult(WorkerStatus.RUNNING, "launched recently")
            return CheckRunHealthResult(WorkerStatus.NOT_FOUND, f"the appliance serving location {location} has "
                                        "no container for this run")
        if seen.get("state") != "running":
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"run container {seen.get('state')} "
                                        f"({seen.get('detail') or 'no detail'}); its exit report is on its way")
        return CheckRunHealthResult(WorkerStatus.RUNNING)
