"""The reconciler against the FakeLauncher: code servers made, adopted and replaced; a location the appliance
refuses (its image, its bounds) reported with the reason without holding back the others; an image allowed
by the operator starts on the next pass, with no backoff left over."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from appliance import labels
from appliance.agent import health, reconciler
from appliance.agent.reconciler import Reconciler
from appliance.agent.status import State
from appliance.launcher.engine import EngineUnavailable
from appliance.policy import load_policy
from appliance.policy.loader import locations_from_data
from appliance.policy.operator import LiveImages, OperatorImages, parse_reference, write_operator_images
from tests.fake_launcher import FakeLauncher

POLICY = load_policy(Path(__file__).resolve().parents[2] / "policy")
EXAMPLE, USER = "airlock/example-location:latest", "acme/etl:1.4"


def _locations(*entries: tuple[str, str]):
    return locations_from_data({"version": 1, "locations": [
        {"name": name, "image": image, "module": "m.definitions"} for name, image in entries]}, POLICY, source="t")


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    launcher = FakeLauncher(appliance_id="t1")
    launcher.add_image(EXAMPLE)
    launcher.add_image(USER)
    answering: set[str] = set()  # code server names that answer Ping

    def ping(address: str, **_: object) -> health.PingResult:
        name = address.rsplit(":", 1)[0]
        return health.PingResult(name in answering, 1.0, "ok" if name in answering else "UNAVAILABLE: starting")

    monkeypatch.setattr(reconciler.health, "ping", ping)
    monkeypatch.setattr(reconciler.health, "load_error", lambda address, **_: None)
    operator = tmp_path / "operator.yaml"
    rec = Reconciler(engine=launcher, policy=POLICY, appliance_container="appliance",
                     egress_routes=str(tmp_path / "routes.json"), egress_port=3128,
                     images=LiveImages(POLICY.images, operator))
    return rec, launcher, answering, operator


def test_a_code_server_is_started_loaded_and_adopted_by_a_new_agent(world) -> None:
    rec, launcher, answering, _ = world
    locations = _locations(("example", EXAMPLE))
    status = rec.reconcile(locations)
    assert status.locations["example"].state is State.LOADING and len(launcher.started) == 1
    assert launcher.attached("example") == {"appliance"}  # the egress proxy's seat on the location network
    routes = json.loads(Path(rec.egress_routes).read_text())
    assert [r["location"] for r in routes["routes"]] == ["example"]
    answering.add(launcher.started[0].name)
    assert rec.reconcile(locations).locations["example"].state is State.LOADED

    restarted = Reconciler(engine=launcher, policy=POLICY, appliance_container="appliance",
                           egress_routes=rec.egress_routes, egress_port=3128)
    assert restarted.reconcile(locations).locations["example"].state is State.LOADED
    assert len(launcher.started) == 1  # adopted, not started again


def test_an_image_the_operator_has_not_allowed_is_refused_alone_and_starts_once_allowed(world) -> None:
    rec, launcher, _answering, operator = world
    locations = _locations(("example", EXAMPLE), ("acme", USER))
    status = rec.reconcile(locations)
    acme = status.locations["acme"]
    assert acme.state is State.ERROR and "airlock images allow acme/etl" in (acme.error or "")
    assert [s.kwargs["labels"][labels.LOCATION] for s in launcher.started] == ["example"]  # not held back
    assert rec.backoff.failures("acme") == 0

    write_operator_images(operator, OperatorImages((parse_reference("acme/etl"),)))
    status = rec.reconcile(locations)  # the very next pass: no backoff to wait out
    assert status.locations["acme"].state is State.LOADING
    assert [s.kwargs["labels"][labels.LOCATION] for s in launcher.started] == ["example", "acme"]


def test_a_location_refused_by_policy_is_reported_and_a_refused_update_keeps_the_running_one(world) -> None:
    rec, launcher, answering, _ = world
    locations = _locations(("example", EXAMPLE))
    rec.reconcile(locations)
    answering.add(launcher.started[0].name)
    status = rec.reconcile(locations, refused={"example": "resources.memory: above bounds.memory_max",
                                               "big": "resources.memory: above bounds.memory_max"})
    assert status.locations["big"].state is State.ERROR and "memory_max" in (status.locations["big"].error or "")
    kept = status.locations["example"]
    assert kept.state is State.LOADED and "previous spec keeps running" in (kept.error or "")
    assert len(launcher.started) == 1
    assert "big" not in rec.reconcile(locations).locations  # no longer refused, no longer desired: gone


def test_a_code_server_that_never_answers_is_replaced_with_backoff_and_its_logs(world, monkeypatch) -> None:
    rec, launcher, _, _ = world
    clock = [1000.0]
    monkeypatch.setattr(reconciler, "now", lambda: clock[0])
    locations = _locations(("example", EXAMPLE))
    rec.reconcile(locations)
    launcher.logs[launcher.started[0].name] = "ModuleNotFoundError: No module named 'm'"
    clock[0] += reconciler.STARTUP_GRACE_SECONDS + 1
    status = rec.reconcile(locations)
    assert status.locations["example"].state is State.ERROR
    assert "No module named 'm'" in (status.locations["example"].error or "")
    assert launcher.workloads(labels.ROLE_CODE_SERVER) == [] and rec.backoff.failures("example") == 1


def test_an_engine_that_does_not_answer_is_an_error_for_that_pass_only(world) -> None:
    rec, launcher, _, _ = world
    launcher.failures["ensure_network"] = [EngineUnavailable("cannot create network: connection lost")]
    status = rec.reconcile(_locations(("example", EXAMPLE)))
    assert status.locations["example"].state is State.ERROR and "connection lost" in status.locations["example"].error
    assert rec.reconcile(_locations(("example", EXAMPLE))).locations["example"].state is State.ERROR  # backoff
    rec.backoff.succeeded("example")
    assert rec.reconcile(_locations(("example", EXAMPLE))).locations["example"].state is State.LOADING


def test_each_location_gets_its_artifact_volume_which_outlives_removal_unless_purged(world) -> None:
    rec, launcher, _answering, _ = world
    both = _locations(("example", EXAMPLE), ("acme", EXAMPLE))
    rec.reconcile(both)
    assert launcher.artifact_locations() == ["acme", "example"]
    assert {p.kwargs["labels"][labels.LOCATION] for p in launcher.prepared} == {"acme", "example"}
    mounts = {s.kwargs["labels"][labels.LOCATION]: [m["Source"] for m in s.kwargs["mounts"]] for s in launcher.started}
    assert mounts == {"example": ["airlock-t1-example-artifacts"], "acme": ["airlock-t1-acme-artifacts"]}

    only_example = _locations(("example", EXAMPLE))
    rec.reconcile(only_example)  # acme removed without --purge: its files stay for when it comes back
    assert launcher.artifact_locations() == ["acme", "example"]
    rec.reconcile(only_example, purge=("acme", "example"))  # purge never touches a location still desired
    assert launcher.artifact_locations() == ["example"]


def test_a_purge_waits_until_nothing_of_the_location_runs(world) -> None:
    rec, launcher, _answering, _ = world
    rec.reconcile(_locations(("acme", EXAMPLE)))
    server = launcher.started[0]
    run = launcher.start(dataclasses.replace(server, name="airlock-t1-run-1", kwargs={
        **server.kwargs, "labels": {**server.kwargs["labels"], labels.ROLE: labels.ROLE_RUN}}))
    rec.reconcile((), purge=("acme",))  # the code server goes; a run still has the volume mounted
    assert launcher.artifact_locations() == ["acme"]
    launcher.remove(run)
    rec.reconcile((), purge=("acme",))
    assert launcher.artifact_locations() == []


def test_the_next_pass_comes_soon_while_a_code_server_is_starting(world) -> None:
    from appliance.agent.status import LOADING_PASS_SECONDS, next_pass_in

    rec, launcher, answering, _ = world
    rec.reconcile(_locations(("example", EXAMPLE)))
    assert next_pass_in(rec.statuses, 5.0) == LOADING_PASS_SECONDS  # LOADING: it is LOADED the moment it answers
    answering.add(launcher.started[0].name)
    rec.reconcile(_locations(("example", EXAMPLE)))
    assert next_pass_in(rec.statuses, 5.0) == 5.0  # all LOADED: the normal interval
