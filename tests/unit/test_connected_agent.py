"""Connected mode against an in-process gateway: enrollment once, desired locations by signed work,
policy bounds enforced on what the control plane asks, unknown work answered, heartbeats recorded."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from appliance.agent.channel import ChannelClosed
from appliance.agent.connected import ConnectedAgent, DesiredLocations
from appliance.agent.identity import ensure_enrolled, load_or_create_key
from appliance.agent.status import ApplianceStatus, LocationStatus, State
from appliance.agent.transport import GatewayClient
from appliance.policy import Location, load_policy
from controlplane.gateway.app import build_app
from protocol.signing import SigningKey

ROOT = Path(__file__).resolve().parents[2]
POLICY = load_policy(ROOT / "policy")


@dataclass
class FakeReconciler:
    seen: list[tuple[str, ...]] = field(default_factory=list)
    statuses: dict[str, LocationStatus] = field(default_factory=dict)

    refused: dict[str, str] = field(default_factory=dict)
    purge: tuple[str, ...] = ()

    def reconcile(self, locations: tuple[Location, ...], *, refused: dict[str, str] | None = None,
                  purge: tuple[str, ...] = ()) -> ApplianceStatus:
        self.seen.append(tuple(loc.name for loc in locations))
        self.refused, self.purge = dict(refused or {}), tuple(purge)
        self.statuses = {loc.name: LocationStatus(loc.name, State.LOADED) for loc in locations}
        return ApplianceStatus("t", time.time(), dict(self.statuses))


def desired(*names: str, memory: str = "512m") -> dict:
    return {"version": 1, "locations": [
        {"name": n, "image": "airlock/example-location@sha256:" + "a" * 64, "module": "example_location.definitions",
         "resources": {"memory": memory}, "egress": {"allow": ["pypi.org:443"]}} for n in names]}


@pytest.fixture
def world(tmp_path: Path, request: pytest.FixtureRequest):
    heartbeat_interval = getattr(request, "param", 0.2)
    app = build_app(sa.create_engine(f"sqlite:///{tmp_path}/cp.db"), SigningKey.generate())
    http = TestClient(app, base_url="https://gateway")
    state = tmp_path / "state"
    state.mkdir()
    client = GatewayClient(http, load_or_create_key(str(state)))
    ensure_enrolled(client, str(state), token=app.state.store.create_token("prod"), queues=["default"])
    reconciler = FakeReconciler()
    desired_locations = DesiredLocations(str(state), POLICY)
    agent = ConnectedAgent(client, reconciler, desired_locations, queues=["default"],  # type: ignore[arg-type]
                           state_dir=str(state), reconcile_interval=0.2, heartbeat_interval=heartbeat_interval)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    yield app, agent, reconciler, state
    stop.set()
    app.state.queue.enqueue("prod", "default", "GRPC_CALL", {})  # end the long poll
    thread.join(10)


def _result(app, item_id: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = app.state.queue.result(item_id)
        if result is not None:
            return result
        time.sleep(0.05)
    raise AssertionError(f"no result for {item_id}")


def test_enrollment_is_stored_and_reused_without_a_token(world, tmp_path: Path) -> None:
    app, _, _, state = world
    assert (state / "agent.key").stat().st_mode & 0o777 == 0o600
    again = GatewayClient(TestClient(app, base_url="https://gateway"), load_or_create_key(str(state)))
    enrollment = ensure_enrolled(again, str(state), token="", queues=["default"])
    assert again.whoami()["id"] == enrollment.agent_id


def test_desired_locations_arrive_by_signed_work_and_survive_restart(world) -> None:
    app, _, reconciler, state = world
    item = app.state.queue.enqueue("prod", "default", "RECONCILE_LOCATIONS", desired("alpha", "beta"))
    result = _result(app, item)
    assert result.status == "done" and result.result == {"accepted": ["alpha", "beta"], "refused": {}}
    deadline = time.monotonic() + 5
    while ("alpha", "beta") not in reconciler.seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ("alpha", "beta") in reconciler.seen
    reloaded = DesiredLocations(str(state), POLICY)
    assert [loc.name for loc in reloaded.locations] == ["alpha", "beta"]


def test_control_plane_cannot_loosen_past_local_policy_and_a_refusal_stays_with_its_location(world) -> None:
    app, agent, reconciler, _ = world
    over = desired("alpha", memory="64g")
    both = {"version": 1, "locations": desired("beta")["locations"] + over["locations"]}
    result = _result(app, app.state.queue.enqueue("prod", "default", "RECONCILE_LOCATIONS", both))
    assert result.status == "done" and result.result["accepted"] == ["beta"]
    assert "bounds.memory_max" in result.result["refused"]["alpha"]
    assert [loc.name for loc in agent.desired.locations] == ["beta"]  # beta is not held back by alpha
    deadline = time.monotonic() + 5
    while "alpha" not in reconciler.refused and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "bounds.memory_max" in reconciler.refused["alpha"]  # the reconciler reports it for that location

    # An accepted location whose update is refused keeps its last accepted spec: it was, and stays, running.
    bigger = desired("beta", memory="64g")
    result = _result(app, app.state.queue.enqueue("prod", "default", "RECONCILE_LOCATIONS", bigger))
    assert result.status == "done" and result.result["accepted"] == [] and "beta" in result.result["refused"]
    [kept] = agent.desired.locations
    assert kept.name == "beta" and kept.limits.memory == 512 * 1024 * 1024


def test_a_desired_set_without_its_envelope_is_refused_whole_and_changes_nothing(world) -> None:
    app, agent, _, _ = world
    _result(app, app.state.queue.enqueue("prod", "default", "RECONCILE_LOCATIONS", desired("alpha")))
    result = _result(app, app.state.queue.enqueue("prod", "default", "RECONCILE_LOCATIONS", {"locations": "x"}))
    assert result.status == "failed" and "must be a list" in result.error
    assert [loc.name for loc in agent.desired.locations] == ["alpha"]


def test_unknown_work_is_answered_not_dropped(world) -> None:
    app, _, _, _ = world
    item = app.state.queue.enqueue("prod", "default", "LAUNCH_RUN", {"run_id": "r1"})
    result = _result(app, item)
    assert result.status == "failed" and "does not handle LAUNCH_RUN" in result.error


def test_heartbeat_reaches_the_control_plane(world) -> None:
    app, _, _, _ = world
    app.state.queue.enqueue("prod", "default", "RECONCILE_LOCATIONS", desired("alpha"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        beats = [json.loads(a["heartbeat"]) for a in app.state.store.list_agents() if a["heartbeat"]]
        if beats and beats[-1]["locations"]:
            assert beats[-1]["locations"][0]["name"] == "alpha"
            return
        time.sleep(0.1)
    raise AssertionError("no heartbeat with the location arrived")


@pytest.mark.parametrize("world", [60.0], indirect=True)  # a heartbeat a minute: the change must not wait for it
def test_a_change_of_state_is_reported_at_once_not_at_the_next_heartbeat(world) -> None:
    app, _, _, _ = world
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(a["heartbeat"] for a in app.state.store.list_agents()):
        time.sleep(0.05)  # the first beat, at start
    started = time.monotonic()
    app.state.queue.enqueue("prod", "default", "RECONCILE_LOCATIONS", desired("alpha"))
    while time.monotonic() - started < 10:
        beats = [json.loads(a["heartbeat"]) for a in app.state.store.list_agents() if a["heartbeat"]]
        if beats and beats[-1]["locations"]:
            assert time.monotonic() - started < 5  # well inside the minute
            return
        time.sleep(0.05)
    raise AssertionError("the new location's state waited for the next heartbeat")


class RecordingTunnel:
    """Stands in for appliance/agent/fastpath.py's FastPathTunnel: what the agent asks of it, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def connect(self, channel: str, key: bytes, address: str) -> None:
        self.calls.append(("connect", channel, key, address))

    def disconnect(self, channel: str) -> None:
        self.calls.append(("disconnect", channel))

    def servers(self, servers: dict[str, str]) -> None:
        self.calls.append(("servers", servers))

    def revive(self) -> None:
        pass

    def close(self) -> None:
        self.calls.append(("close",))


@dataclass
class ClosingChannel:
    """A work channel that ends at its first receive, as one the gateway closes."""

    fastpath: tuple[int, bytes] | None
    id: str = "chan-9"

    def receive(self, timeout: float) -> list:
        raise ChannelClosed(f"channel {self.id} closed")

    def close(self, code: int = 1000, reason: str = "") -> None:
        pass


class ServingReconciler(FakeReconciler):
    def reconcile(self, locations: tuple[Location, ...], **_: object) -> ApplianceStatus:
        self.statuses = {"loc": LocationStatus("loc", State.LOADED, container="airlock-loc-1"),
                         "starting": LocationStatus("starting", State.LOADING)}
        return ApplianceStatus("t", time.time(), dict(self.statuses))


def test_the_fast_path_tunnel_lives_as_long_as_the_work_channel_and_knows_the_code_servers(tmp_path: Path) -> None:
    tunnel = RecordingTunnel()

    class NoPosts:
        def post_results(self, results: list) -> int:
            return len(results)

    agent = ConnectedAgent(NoPosts(), ServingReconciler(), DesiredLocations(str(tmp_path), POLICY),  # type: ignore[arg-type]
                           queues=["default"], state_dir=str(tmp_path), fastpath=tunnel,  # type: ignore[arg-type]
                           control_plane_url="https://gw.example:8443")
    key = b"k" * 32
    with pytest.raises(ChannelClosed):
        agent._serve_channel(ClosingChannel(fastpath=(8450, key)), threading.Event())  # type: ignore[arg-type]
    assert tunnel.calls == [("connect", "chan-9", key, "gw.example:8450"), ("disconnect", "chan-9")]
    tunnel.calls.clear()
    with pytest.raises(ChannelClosed):  # a gateway that offers no fast path: no tunnel
        agent._serve_channel(ClosingChannel(fastpath=None), threading.Event())  # type: ignore[arg-type]
    assert tunnel.calls == [("disconnect", "chan-9")]  # (a no-op for a channel it never connected)
    tunnel.calls.clear()
    agent._reconcile_once()  # only locations whose code server container exists, by its name on the network
    assert tunnel.calls == [("servers", {"loc": "airlock-loc-1:4000"})]
