"""HybridRunLauncher without Docker: what LAUNCH_RUN carries, and how run monitoring reads the heartbeats."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("dagster")

from dagster import DagsterInstance
from dagster._core.launcher import WorkerStatus
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import deserialize_value

from controlplane.db import create_engine
from controlplane.gateway.queue import WorkQueue
from controlplane.gateway.store import AgentStore, agents
from controlplane.registry import Registry
from controlplane.runs.launcher import AGENT_LOST_SECONDS, HybridRunLauncher, launch_payload
from tests.unit.storage_loopback import example_run


@pytest.fixture()
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    db = tmp_path / "cp.db"
    monkeypatch.setenv("AIRLOCK_CP_DB", f"sqlite:///{db}")
    monkeypatch.setenv("AIRLOCK_CP_DEPLOYMENT", "default")
    engine = create_engine(f"sqlite:///{db}")
    queue, store = WorkQueue(engine), AgentStore(engine)
    queue.create_schema()
    store.create_schema()
    registry = Registry(engine, queue)
    registry.create_schema()
    registry.add("default", {"name": "example", "image": "sha256:" + "a" * 64,
                             "module": "example_location.definitions"})
    (tmp_path / "home").mkdir()
    instance = DagsterInstance.local_temp(str(tmp_path / "home"))
    launcher = HybridRunLauncher()
    launcher.register_instance(instance)
    return instance, launcher, engine, queue


def test_launch_run_args_name_userland_and_nothing_of_the_control_plane(setup, tmp_path: Path) -> None:
    instance, _, _, _ = setup
    _, run = example_run(instance, "numbers_job")
    payload = launch_payload(run, "example")
    text = json.dumps(payload)
    assert str(tmp_path) not in text and "sqlite" not in text.lower()  # no path or database of the control plane
    args = deserialize_value(payload["execute_run_args"], ExecuteRunArgs)
    ref = args.instance_ref
    assert {ref.run_storage_data.module_name, ref.event_storage_data.module_name,
            ref.schedule_storage_data.module_name} == {"userland.storage"}
    assert ref.compute_logs_data.class_name == "RelayComputeLogManager"
    assert args.run_id == run.run_id and args.set_exit_code_on_failure is True


def test_launch_queues_work_on_the_locations_queue_and_terminate_marks_canceling(setup) -> None:
    instance, launcher, _, queue = setup
    _, run = example_run(instance, "numbers_job")
    from dagster._core.launcher import LaunchRunContext

    before = queue.pending_count("default", "default")  # the registry's RECONCILE_LOCATIONS
    launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    assert launcher.terminate(run.run_id) is True
    assert instance.get_run_by_id(run.run_id).status.value == "CANCELING"
    items = queue.claim("default", ["default"], "agent-1", limit=10)
    kinds = [i.kind for i in items][before:]
    assert kinds == ["LAUNCH_RUN", "TERMINATE_RUN"]
    assert items[before].payload["run_id"] == run.run_id and items[before + 1].payload["grace_seconds"] == 20


def _heartbeat(engine, *, seconds_ago: float, runs: list[dict]) -> None:
    with engine.begin() as conn:
        conn.execute(agents.insert().values(
            id="agent-1", deployment="default", key_id="k", public_key="pk", labels=json.dumps(["default"]),
            status="active", enrolled_at=time.time() - 1000, last_seen=time.time() - seconds_ago,
            heartbeat=json.dumps({"runs": runs})))


@pytest.mark.parametrize("seconds_ago,runs,started_ago,expected", [
    (5, [{"runId": "RUN", "state": "running"}], 500, WorkerStatus.RUNNING),
    (5, [{"runId": "RUN", "state": "exited", "detail": "exit code 0"}], 500, WorkerStatus.RUNNING),  # report due
    (5, [], 10, WorkerStatus.RUNNING),  # launched a moment ago
    (5, [], 500, WorkerStatus.NOT_FOUND),  # the agent is there and the container is not
    (120, [], 500, WorkerStatus.RUNNING),  # silent agent (a control plane that just came back): wait
    (AGENT_LOST_SECONDS + 60, [], 5000, WorkerStatus.FAILED),  # silent for too long: lost
])
def test_worker_health_from_heartbeats(setup, seconds_ago, runs, started_ago, expected) -> None:
    instance, launcher, engine, _ = setup
    _, run = example_run(instance, "numbers_job")
    _heartbeat(engine, seconds_ago=seconds_ago, runs=[dict(r, runId=run.run_id) for r in runs])
    launcher._started_at = lambda _run: time.time() - started_ago
    assert launcher.check_run_worker_health(run).status == expected
