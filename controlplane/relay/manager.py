"""Keep one relay listener per registered code location in step with the registry, and run the queue's
housekeeping (expired leases back to pending, ttl expiry).

The control plane runs `serve` inside the gateway process (controlplane/serve_gateway.py) so both share
one WorkQueue and wake each other without a database round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from controlplane.gateway.channel import ChannelHub
from controlplane.gateway.queue import WorkQueue
from controlplane.gateway.store import AgentStore
from controlplane.registry import Registry
from controlplane.relay.calls import ChannelCalls
from controlplane.relay.compat import check_answer
from controlplane.relay.fastpath import FastPathEdge
from controlplane.relay.scrub import scrub_instance_ref
from controlplane.relay.server import CallQueue, RelayServer, WorkQueueCalls
from protocol.errors import TemporaryError

log = logging.getLogger("airlock.relay")
SYNC_SECONDS = 2.0


class NoAgent(TemporaryError, RuntimeError):
    """No live agent serves this location's queue: answer UNAVAILABLE now instead of waiting a minute."""


class LiveAgentCalls(WorkQueueCalls):
    """Queue a call only when an agent that serves the queue has sent a heartbeat recently."""

    def __init__(self, queue: WorkQueue, store: AgentStore, deployment: str, queue_name: str) -> None:
        super().__init__(queue, lambda _location: (deployment, queue_name))
        self.store, self.deployment, self.queue_name = store, deployment, queue_name

    def submit(self, location: str, payload: dict[str, Any], *, ttl_seconds: float) -> str:
        if not self.store.live_agents(self.deployment, self.queue_name):
            raise NoAgent(f"no agent serving queue {self.queue_name!r} has sent a heartbeat in the last 30 s")
        return super().submit(location, payload, ttl_seconds=ttl_seconds)


async def serve(registry: Registry, queue: WorkQueue, store: AgentStore, host: str, stop: asyncio.Event,
                hub: ChannelHub | None = None, edge: FastPathEdge | None = None) -> None:
    """Run until `stop`; with a `hub`, calls go over the agents' work channels first (relay/calls.py); with an
    `edge`, the edge owns the relay ports and each Python relay listens on loopback behind it (relay/fastpath.py)."""
    running: dict[tuple[str, str], tuple[RelayServer, int, str]] = {}
    while not stop.is_set():
        wanted = {(r.deployment, r.spec.name): r for r in registry.list()}
        for key, (server, port, route_queue) in list(running.items()):
            record = wanted.get(key)
            if record is None or record.relay_port != port or record.spec.queue != route_queue:
                if edge is not None:
                    edge.unlisten(f"{host}:{port}")
                await server.stop()
                del running[key]
        for key, record in wanted.items():
            if key in running:
                continue
            deployment, queue_name = record.deployment, record.spec.queue
            calls: CallQueue = LiveAgentCalls(queue, store, deployment, queue_name)
            if hub is not None:
                calls = ChannelCalls(hub, calls, deployment, queue_name)
            public = f"{host}:{record.relay_port}"
            server = RelayServer(record.spec.name, calls, address="127.0.0.1:0" if edge else public,
                                 rewrite=scrub_instance_ref, check=check_answer)
            try:
                internal = await server.start()
                if edge is not None:
                    await edge.listen(record.spec.name, public, f"127.0.0.1:{internal}", deployment, queue_name)
            except OSError as exc:
                await server.stop()
                log.error("%s; retrying on the next pass", exc)
                continue
            running[key] = (server, record.relay_port, queue_name)
        await asyncio.to_thread(queue.requeue_expired_leases)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SYNC_SECONDS)
    for server, port, _ in running.values():
        if edge is not None:
            edge.unlisten(f"{host}:{port}")
        await server.stop()
