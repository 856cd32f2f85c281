"""The reconcile plan (keep/adopt, create, remove) and the retry backoff, without Docker."""

from __future__ import annotations

import pytest

from appliance.agent.plan import Observed, plan
from protocol.backoff import Backoff


def obs(name: str, location: str, spec: str, state: str = "running", health: str | None = None) -> Observed:
    return Observed(id=f"id-{name}", name=name, location=location, spec_hash=spec, state=state, health=health)


def test_matching_running_container_is_adopted_not_recreated() -> None:
    result = plan({"a": "h1"}, [obs("c1", "a", "h1")])
    assert result.keep["a"].name == "c1"
    assert result.create == () and result.remove == ()


def test_missing_location_is_created() -> None:
    result = plan({"a": "h1", "b": "h2"}, [obs("c1", "a", "h1")])
    assert result.create == ("b",)


def test_spec_change_replaces() -> None:
    result = plan({"a": "h2"}, [obs("c1", "a", "h1")])
    assert [r.name for r in result.remove] == ["c1"] and result.create == ("a",)


def test_dead_and_unhealthy_are_replaced() -> None:
    for bad in (obs("c1", "a", "h1", state="exited"), obs("c1", "a", "h1", health="unhealthy")):
        result = plan({"a": "h1"}, [bad])
        assert result.remove == (bad,) and result.create == ("a",)


def test_orphans_and_duplicates_are_removed_running_one_kept() -> None:
    running, starting = obs("c2", "a", "h1"), obs("c1", "a", "h1", state="created")
    orphan = obs("c3", "gone", "h9")
    result = plan({"a": "h1"}, [starting, orphan, running])
    assert result.keep["a"] is running
    assert set(result.remove) == {starting, orphan}


def test_backoff_grows_caps_and_resets() -> None:
    clock = [0.0]
    backoff = Backoff(base=2, cap=10, clock=lambda: clock[0], jitter=lambda: 0.5)
    delays = [backoff.failed("a") for _ in range(5)]
    assert delays == [2, 4, 8, 10, 10]
    assert not backoff.ready("a")
    clock[0] = 10.0
    assert backoff.ready("a")
    backoff.succeeded("a")
    assert backoff.failures("a") == 0 and backoff.ready("a")


def test_delays_double_up_to_the_cap_with_jitter_and_reset() -> None:
    from protocol.backoff import Delays

    delays = Delays(base=0.5, cap=4.0, jitter=lambda: 0.5)  # jitter 0.5: exactly the nominal delay
    assert [delays.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    delays.reset()
    assert delays.next() == 0.5
    high = Delays(base=0.5, cap=4.0, jitter=lambda: 0.999)
    assert max(high.next() for _ in range(10)) <= 4.0  # jitter never pushes past the cap
    with pytest.raises(ValueError):
        Delays(base=0, cap=1)


def test_a_permanent_refusal_stops_the_agents_loop_and_a_temporary_one_is_retried() -> None:
    import threading

    from appliance.agent.connected import ConnectedAgent
    from appliance.agent.transport import GatewayError, GatewayRefusedKey, gateway_error

    assert isinstance(gateway_error("revoked", status=403), GatewayRefusedKey)
    assert type(gateway_error("busy", status=429)) is GatewayError
    calls: list[int] = []
    stop = threading.Event()

    def step() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise GatewayError("gateway restarting", status=502)
        raise gateway_error("this appliance's key was revoked", status=403)

    thread = threading.Thread(target=ConnectedAgent._retrying, args=(stop, step))
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and stop.is_set() and len(calls) == 3  # two retries, then it stopped
