"""Channel first, queue otherwise: how the relay hands a call to a location's agent.

When an agent that serves the location's queue holds a work channel to this gateway process, the call goes
straight down it (one frame each way, no database). Otherwise, or when that channel closes before the agent
answered, the call goes to the durable work queue (`fallback`), where a long poll, a channel opened later or
a channel on another gateway replica picks it up. A call that fell back may run twice on the code server if
the lost channel's agent had already started it; every relayed method is a read or a reload, so that is safe
(the refused ones never reach the agent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from controlplane.gateway.channel import ChannelHub, ChannelLost
from controlplane.relay.server import CallQueue, agent_answer
from protocol.grpc_calls import GrpcResult
from protocol.work import WorkKind, read_result

__all__ = ["ChannelCalls"]

log = logging.getLogger("airlock.relay")


class ChannelCalls:
    """CallQueue over the agents' work channels in this process, with a durable `fallback`."""

    def __init__(self, hub: ChannelHub, fallback: CallQueue, deployment: str, queue: str) -> None:
        self.hub, self.fallback, self.deployment, self.queue = hub, fallback, deployment, queue

    async def call(self, location: str, payload: dict[str, Any], wait: float) -> GrpcResult | None:
        channel = self.hub.pick(self.deployment, self.queue)
        if channel is None or channel.loop is not asyncio.get_running_loop():
            return await self.fallback.call(location, payload, wait)
        started = time.monotonic()
        try:
            outcome = await channel.call(self.queue, WorkKind.GRPC_CALL, payload, wait)
        except ChannelLost as lost:
            remaining = max(wait - (time.monotonic() - started), 0.0)
            log.info("relay location=%s: %s before the agent answered; queueing the call (%.1f s left)",
                     location, lost, remaining)
            return await self.fallback.call(location, payload, remaining)
        if outcome is None:
            return None
        try:
            result, error = read_result(outcome)
        except ValueError:
            return GrpcResult.failure("INTERNAL", "airlock relay: the agent's answer is not JSON")
        return agent_answer(error is None, result, error)
