"""The reconcile plan (keep/adopt, create, remove) and the retry backoff, without Docker."""

from __future__ import annotations

from appliance.agent.backoff import Backoff
from appliance.agent.plan import Observed, plan


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
