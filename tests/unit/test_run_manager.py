"""LAUNCH_RUN in the agent against a fake engine: temporary failures are tried again, a final failure ends the
run at once with the reason (an exit report), and a container a lost answer left behind is not a second run."""

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

POLICY = load_policy(Path(__file__).resolve().parents[2] / "policy")
LOCATION = locations_from_data({"version": 1, "locations": [
    {"name": "example", "image": "airlock/example-location:latest", "module": "example_location.definitions"}]},
    POLICY, source="test")


@dataclass
class FakeContainer:
    name: str
    status: str = "running"
    removed: bool = False

    @property
    def attrs(self) -> dict[str, Any]:
        return {"State": {"Status": self.status}}

    @property
    def labels(self) -> dict[str, str]:
        return {labels.RUN_ID: self.name.rsplit("-", 1)[-1]}


@dataclass
class FakeEngine:
    """What RunManager asks of the engine; `failures` are raised, one per call, before anything happens."""

    appliance_id: str = "t1"
    failures: list[Exception] = field(default_factory=list)
    started: list[ContainerSpec] = field(default_factory=list)
    existing: list[FakeContainer] = field(default_factory=list)

    def _maybe_fail(self) -> None:
        if self.failures:
            raise self.failures.pop(0)

    def containers(self, role: str) -> list[FakeContainer]:
        self._maybe_fail()
        return [c for c in self.existing if not c.removed]

    def resolve_image(self, ref: str) -> str:
        return "sha256:" + "1" * 64

    def start(self, spec: ContainerSpec) -> FakeContainer:
        self._maybe_fail()
        self.started.append(spec)
        container = FakeContainer(spec.name)
        self.existing.append(container)
        return container

    def remove(self, container: FakeContainer) -> None:
        container.removed = True


@dataclass
class FakeRelay:
    reports: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def exited(self, run_id: str, report: dict[str, Any]) -> None:
        self.reports.append((run_id, report))


def _manager(tmp_path: Path, engine: FakeEngine, relay: FakeRelay, slept: list[float]) -> RunManager:
    now = [0.0]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    return RunManager(engine=engine, policy=POLICY, tokens=RunTokens.load_or_create(str(tmp_path)),  # type: ignore[arg-type]
                      relay=relay, locations=lambda: LOCATION, egress_port=3128,  # type: ignore[arg-type]
                      launch_retry_seconds=30.0, clock=lambda: now[0], sleep=sleep)


def _work(run_id: str = "r1") -> SignedWork:
    payload = {"run_id": run_id, "location": "example", "execute_run_args": "{}"}
    return SignedWork("w1", WorkKind.LAUNCH_RUN, "default", json.dumps(payload), 1, "", "")


def test_temporary_engine_failures_are_tried_again_and_the_run_starts(tmp_path: Path) -> None:
    engine, relay, slept = FakeEngine(failures=[EngineUnavailable("sockguard: engine did not answer (502)"),
                                                EngineUnavailable("connection lost")]), FakeRelay(), []
    answer = _manager(tmp_path, engine, relay, slept).launch(_work())
    assert answer == {"container": engine.started[0].name} and len(engine.started) == 1
    assert len(slept) == 2 and relay.reports == []


def test_a_permanent_failure_ends_the_run_at_once_with_the_reason(tmp_path: Path) -> None:
    refusal = LauncherError("cannot create x: airlock sockguard refused image: not allowed")
    engine, relay, slept = FakeEngine(failures=[refusal]), FakeRelay(), []
    with pytest.raises(HandlerError, match="sockguard refused image"):
        _manager(tmp_path, engine, relay, slept).launch(_work())
    assert slept == [] and engine.started == []
    [(run_id, report)] = relay.reports
    assert run_id == "r1" and report["exit_code"] is None
    assert report["reason"] == f"the appliance could not start the run's container: {refusal}"


def test_a_launch_still_failing_at_the_end_of_its_window_ends_the_run(tmp_path: Path) -> None:
    engine = FakeEngine(failures=[EngineUnavailable("engine down")] * 50)
    relay, slept = FakeRelay(), []
    with pytest.raises(HandlerError, match="still failing after"):
        _manager(tmp_path, engine, relay, slept).launch(_work())
    assert 3 <= len(slept) < 50 and sum(slept) <= 30.0  # bounded: backoff within the window
    assert len(relay.reports) == 1 and "engine down" in relay.reports[0][1]["reason"]


def test_a_container_a_lost_answer_left_created_is_replaced_and_a_running_one_kept(tmp_path: Path) -> None:
    engine, relay, slept = FakeEngine(), FakeRelay(), []
    manager = _manager(tmp_path, engine, relay, slept)
    stale = FakeContainer(run_container_name(engine.appliance_id, "r1"), status="created")
    engine.existing.append(stale)
    assert manager.launch(_work())["container"] == stale.name and stale.removed and len(engine.started) == 1
    assert manager.launch(_work()) == {"container": stale.name, "already": True}  # delivered twice: one run
    assert len(engine.started) == 1
