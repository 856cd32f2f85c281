"""The relay answers at once when no agent serves a location's queue, instead of holding the caller."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from controlplane.gateway.queue import WorkQueue
from controlplane.gateway.store import AgentStore
from controlplane.relay.manager import LiveAgentCalls, NoAgent


def test_calls_are_queued_only_while_an_agent_is_alive(tmp_path: Path) -> None:
    now = [1000.0]
    engine = sa.create_engine(f"sqlite:///{tmp_path}/cp.db")
    queue, store = WorkQueue(engine), AgentStore(engine, clock=lambda: now[0])
    queue.create_schema()
    store.create_schema()
    calls = LiveAgentCalls(queue, store, "prod", "default")
    with pytest.raises(NoAgent, match="no agent serving queue 'default'"):
        calls.submit("example", {"method": "/api.DagsterApi/Ping"}, ttl_seconds=5)
    agent = store.enroll(store.create_token("prod"), "ed25519:" + "0" * 32, "pem", ("default",))
    store.record_heartbeat(agent.id, {"locations": []})
    assert calls.submit("example", {"method": "/api.DagsterApi/Ping"}, ttl_seconds=5)
    assert queue.pending_count("prod", "default") == 1
    now[0] += 31  # the heartbeat goes stale
    with pytest.raises(NoAgent):
        calls.submit("example", {}, ttl_seconds=5)
    store.revoke(agent.id)
    store.record_heartbeat(agent.id, {"locations": []})
    with pytest.raises(NoAgent):  # a revoked agent is nobody
        calls.submit("example", {}, ttl_seconds=5)
    other = LiveAgentCalls(queue, store, "prod", "gpu")
    with pytest.raises(NoAgent):
        other.submit("example", {}, ttl_seconds=5)
