"""LAUNCH_RUN and the reaper in the agent, against the FakeLauncher: temporary failures are tried again, a final
failure ends the run at once with the reason (an exit report), a container a lost answer left behind is not a
second run, and an exited run container is reported, then removed once its metadata is forwarded."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from appliance import labels
from appliance.agent.dispatcher import HandlerError
from appliance.agent.runs import RunManager
from appliance.launcher.engine import EngineUnavailable, LauncherError
from appliance.launcher.spec import ContainerSpec, run_container_name
from appliance.metadata.tokens import RunTokens
from appliance.policy import load_policy
from appliance.policy.loader import locations_from_data
from protocol.work import SignedWork, WorkKind
from tests.fake_launcher import FakeLauncher

POLICY = load_policy(Path(__file__).resolve().parents[2] / "policy")
IMAGE = "airlock/example-location:latest"
LOCATION = locations_from_data({"version": 1, "locations": [
    {"name": "example", "image": IMAGE, "module": "example_location.definitions"}]}, POLICY, source="test")


@dataclass
class FakeRelay:
    reports: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    pending_bytes: int = 0

    def exited(self, run_id: str, report: dict[str, Any]) -> None:
        self.reports.append((run_id, report))

    def pending(self, run_id: str) -> int:
        return self.pending_bytes


def _manager(tmp_path: Path, launcher: FakeLauncher, relay: FakeRelay, slept: list[float]) -> RunManager:
    now = [0.0]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    launcher.add_image(IMAGE)
    return RunManager(engine=launcher, policy=POLICY, tokens=RunTokens.load_or_create(str(tmp_path)),
                      relay=relay, locations=lambda: LOCATION, egress_port=3128,  # type: ignore[arg-type]
                      launch_retry_seconds=30.0, clock=lambda: now[0], sleep=sleep)


def _work(run_id: str = "r1") -> SignedWork:
    payload = {"run_id": run_id, "location": "example", "execute_run_args": "{}"}
    return SignedWork("w1", WorkKind.LAUNCH_RUN, "default", json.dumps(payload), 1, "", "")


def test_temporary_engine_failures_are_tried_again_and_the_run_starts(tmp_path: Path) -> None:
    launcher = FakeLauncher(failures={"start": [EngineUnavailable("sockguard: engine did not answer (502)")],
                                      "workloads": [EngineUnavailable("connection lost")]})
    relay, slept = FakeRelay(), []
    answer = _manager(tmp_path, launcher, relay, slept).launch(_work())
    assert answer == {"container": launcher.started[0].name} and len(launcher.started) == 1
    assert len(slept) == 2 and relay.reports == []
    [spec] = launcher.started
    assert isinstance(spec, ContainerSpec) and spec.kwargs["labels"][labels.RUN_ID] == "r1"


def test_a_permanent_failure_ends_the_run_at_once_with_the_reason(tmp_path: Path) -> None:
    refusal = LauncherError("cannot create x: airlock sockguard refused image: not allowed")
    launcher, relay, slept = FakeLauncher(failures={"start": [refusal]}), FakeRelay(), []
    with pytest.raises(HandlerError, match="sockguard refused image"):
        _manager(tmp_path, launcher, relay, slept).launch(_work())
    assert slept == [] and launcher.started == []
    [(run_id, report)] = relay.reports
    assert run_id == "r1" and report["exit_code"] is None
    assert report["reason"] == f"the appliance could not start the run's container: {refusal}"


def test_a_launch_still_failing_at_the_end_of_its_window_ends_the_run(tmp_path: Path) -> None:
    launcher = FakeLauncher(failures={"workloads": [EngineUnavailable("engine down")] * 50})
    relay, slept = FakeRelay(), []
    with pytest.raises(HandlerError, match="still failing after"):
        _manager(tmp_path, launcher, relay, slept).launch(_work())
    assert 3 <= len(slept) < 50 and sum(slept) <= 30.0  # bounded: backoff within the window
    assert len(relay.reports) == 1 and "engine down" in relay.reports[0][1]["reason"]


def test_a_container_a_lost_answer_left_created_is_replaced_and_a_running_one_kept(tmp_path: Path) -> None:
    launcher, relay, slept = FakeLauncher(), FakeRelay(), []
    manager = _manager(tmp_path, launcher, relay, slept)
    manager.launch(_work())
    name = run_container_name(launcher.appliance_id, "r1")
    launcher.set_state(name, "created")  # as if the start's answer was lost before it ran
    assert manager.launch(_work())["container"] == name and len(launcher.started) == 2
    assert manager.launch(_work()) == {"container": name, "already": True}  # delivered again: one run
    assert len(launcher.started) == 2


def test_an_exited_run_is_reported_then_removed_once_forwarded(tmp_path: Path) -> None:
    launcher, relay = FakeLauncher(), FakeRelay(pending_bytes=10)
    manager = _manager(tmp_path, launcher, relay, [])
    manager.launch(_work())
    name = run_container_name(launcher.appliance_id, "r1")
    launcher.logs[name] = "Traceback...\nMemoryError"
    manager.reap()
    assert relay.reports == []  # still running: nothing to report
    launcher.set_state(name, "exited", exit_code=137, oom_killed=True)
    assert manager.runs() == [{"runId": "r1", "location": "example", "state": "exited",
                               "detail": "exit code 137, OOM-killed"}]
    manager.reap()
    manager.reap()
    [(_run_id, report)] = relay.reports  # once, however many passes
    assert report["exit_code"] == 137 and report["oom_killed"] and "MemoryError" in report["log_tail"]
    assert launcher.workloads(labels.ROLE_RUN)  # kept while its metadata is not all forwarded
    relay.pending_bytes = 0
    manager.reap()
    assert launcher.workloads(labels.ROLE_RUN) == []
