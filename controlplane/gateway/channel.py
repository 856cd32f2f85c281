"""The gateway's end of the work channel (protocol/channel.py): one WebSocket per connected agent, held open.

Two kinds of work travel on it:
  durable   items of the WorkQueue (RECONCILE_LOCATIONS, LAUNCH_RUN, TERMINATE_RUN, and GRPC_CALLs queued while
            no channel was open here). A pump claims them as claimWork would, each still signed by the control
            plane's Ed25519 key, and their results complete them in the queue. A channel is a faster long poll.
  direct    relayed gRPC calls handed over by the relay in this process (`AgentChannel.call`): no database row,
            just a future in memory, so a relayed call costs one frame each way. If the channel closes under
            such a call, the caller gets ChannelLost and queues it durably instead (controlplane/relay/calls.py).
Frames are authenticated by the channel's keys; a frame that fails closes the channel (code 1008) with an
audit entry. The channel also closes when its agent's key stops being active (checked every AGENT_RECHECK s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from starlette.websockets import WebSocket

from controlplane.gateway.auth import Caller
from controlplane.gateway.queue import WorkQueue
from controlplane.gateway.store import AgentStore
from protocol.channel import (
    ChannelError,
    FrameOpener,
    FrameSealer,
    decode_body,
    encode_body,
    gateway_hello,
)
from protocol.errors import TemporaryError
from protocol.signing import SigningKey
from protocol.work import read_result, sign_work

__all__ = ["AgentChannel", "ChannelHub", "ChannelLost"]

log = logging.getLogger("airlock.gateway.channel")
MAX_CLAIM = 64  # durable items per claim, as claimWork's MAX_BATCH
AGENT_RECHECK = 10.0  # seconds between checks that the channel's key is still active


class ChannelLost(TemporaryError):
    """The channel closed before the agent answered a direct call."""


class FastPath(Protocol):
    """Where a channel registers its tunnel key (controlplane/relay/fastpath.py's FastPathEdge)."""

    port: int

    def ticket(self, channel: str, key: bytes, deployment: str, queues: list[str]) -> None: ...
    def revoke(self, channel: str) -> None: ...


class AgentChannel:
    """One connected agent's channel: send work, route its results, then fail what it leaves unanswered."""

    def __init__(self, websocket: WebSocket, caller: Caller, *, key: SigningKey, store: AgentStore,
                 queue: WorkQueue, fastpath: FastPath | None = None) -> None:
        assert caller.agent is not None
        self.websocket, self.caller, self.agent = websocket, caller, caller.agent
        self.queues: list[str] = caller.body["queues"]
        self._key, self._store, self._queue, self._fastpath = key, store, queue, fastpath
        self.id = ""
        self.loop = asyncio.get_running_loop()
        self._calls: dict[str, asyncio.Future[dict[str, Any]]] = {}  # direct calls awaiting their result
        self._sealer: FrameSealer | None = None
        self._send_lock = asyncio.Lock()  # a frame's sequence number is its order on the wire: seal and send as one
        self.sent = self.answered = 0

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    async def call(self, queue: str, kind: str, payload: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """Hand one item straight to the agent and wait for its result dict; None after `timeout` seconds."""
        item_id = uuid.uuid4().hex
        future: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self._calls[item_id] = future
        try:
            await self._send([{"id": item_id, "kind": kind, "queue": queue, "attempt": 1,
                               "payload": json.dumps(payload, separators=(",", ":"))}])
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            self._calls.pop(item_id, None)

    async def serve(self) -> str:
        """Handshake, then run until the agent goes or a frame is refused; returns why the channel ended."""
        await self.websocket.accept()
        hello, keys = gateway_hello(self._key, self.caller.key_id, self.queues, self.caller.body["ek"])
        self.id = hello["channel"]
        if self._fastpath is not None and self._fastpath.port:
            self._fastpath.ticket(self.id, keys.fastpath, self.agent.deployment, self.queues)
            hello["fastpath"] = {"port": self._fastpath.port}
        try:
            await self.websocket.send_text(json.dumps(hello))
        except BaseException:  # the agent went before the channel opened: its tunnel key must not outlive it
            if self._fastpath is not None:
                self._fastpath.revoke(self.id)
            raise
        self._sealer, opener = FrameSealer(keys.down), FrameOpener(keys.up)
        self._store.audit(operation=f"channel {self.id}", accepted=True, key_id=self.caller.key_id,
                          agent_id=self.agent.id, reason=f"opened for queues {','.join(self.queues)}")
        tasks = [asyncio.create_task(coro) for coro in (self._read(opener), self._pump())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            return next(iter(done)).result()
        finally:
            if self._fastpath is not None:
                self._fastpath.revoke(self.id)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for future in self._calls.values():
                if not future.done():
                    future.set_exception(ChannelLost(f"channel {self.id} closed"))

    async def _read(self, opener: FrameOpener) -> str:
        while True:
            try:
                message = await self.websocket.receive()
            except RuntimeError:  # the socket is already closed
                return "channel already closed"
            if message["type"] == "websocket.disconnect":
                return f"agent closed the channel ({message.get('code')})"
            frame = message.get("bytes")
            try:
                if not isinstance(frame, bytes):
                    raise ChannelError(f"frame {opener.seq} is not a binary frame")
                results = decode_body(opener.open(frame), "results")
            except ChannelError as exc:
                self._store.audit(operation=f"channel {self.id}", accepted=False, reason=str(exc),
                                  key_id=self.caller.key_id, agent_id=self.agent.id)
                with contextlib.suppress(Exception):
                    await self.websocket.close(code=1008, reason=str(exc)[:120])
                return f"refused: {exc}"
            durable = []
            for result in results:
                future = self._calls.get(str(result.get("id")))
                if future is None:
                    durable.append(result)
                elif not future.done():
                    future.set_result(result)
            self.answered += len(results)
            if durable:
                await asyncio.to_thread(self._complete, durable)

    def _complete(self, results: Sequence[dict[str, Any]]) -> None:
        for r in results:
            try:
                value, error = read_result(r)
                self._queue.complete(str(r["id"]), self.agent.id, result=value, error=error)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("channel %s: dropping a malformed result %r: %s", self.id, str(r)[:200], exc)

    async def _send(self, items: list[dict[str, Any]]) -> None:
        """One frame of work; ChannelLost if the channel is gone or closes under the send."""
        if self._sealer is None:
            raise ChannelLost("the channel is not open")
        async with self._send_lock:
            try:
                await self.websocket.send_bytes(self._sealer.seal(encode_body("work", items)))
            except Exception as exc:  # the socket closed under us: the caller decides what to do instead
                raise ChannelLost(f"channel {self.id}: {type(exc).__name__}: {exc}") from None
        self.sent += len(items)

    async def _pump(self) -> str:
        deployment, agent_id = self.agent.deployment, self.agent.id
        next_check = time.monotonic() + AGENT_RECHECK
        while True:
            items = await asyncio.to_thread(self._queue.claim, deployment, self.queues, agent_id, limit=MAX_CLAIM)
            if items:
                signed = [sign_work(self._key, i.id, i.kind, i.queue, i.payload, i.attempt) for i in items]
                try:
                    await self._send(signed)  # waits while the agent is slow to read: no more is claimed meanwhile
                except ChannelLost as lost:  # not delivered: back to pending now, not after the lease
                    await asyncio.to_thread(self._queue.release, [i.id for i in items], agent_id)
                    return str(lost)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + AGENT_RECHECK
                record = await asyncio.to_thread(self._store.by_key, self.caller.key_id)
                if record is None or record.status != "active":
                    reason = f"key {self.caller.key_id} is {record.status if record else 'unknown'}"
                    self._store.audit(operation=f"channel {self.id}", accepted=False, reason=f"closed: {reason}",
                                      key_id=self.caller.key_id, agent_id=agent_id)
                    with contextlib.suppress(Exception):
                        await self.websocket.close(code=1008, reason=reason[:120])
                    return f"closed: {reason}"
            if not items:
                await self._queue.wait_for_work(deployment, self.queues, timeout=AGENT_RECHECK)


class ChannelHub:
    """The channels open in this gateway process, by (deployment, queue). Used from the event loop only."""

    def __init__(self) -> None:
        self._channels: list[AgentChannel] = []
        self.fastpath: FastPath | None = None  # set by serve_gateway when the edge runs

    def add(self, channel: AgentChannel) -> None:
        self._channels.append(channel)

    def remove(self, channel: AgentChannel) -> None:
        with contextlib.suppress(ValueError):
            self._channels.remove(channel)

    def pick(self, deployment: str, queue: str) -> AgentChannel | None:
        """The open channel serving this queue with the fewest direct calls in flight, or None."""
        serving = [c for c in self._channels if c.agent.deployment == deployment and queue in c.queues]
        return min(serving, key=lambda c: c.in_flight, default=None)

    def __len__(self) -> int:
        return len(self._channels)


def channel_endpoint(hub: ChannelHub, *, key: SigningKey, store: AgentStore, queue: WorkQueue) -> Any:
    """The Starlette WebSocket endpoint; SignedRequestMiddleware has already authenticated the upgrade."""

    async def endpoint(websocket: WebSocket) -> None:
        caller: Caller = websocket.scope["auth"]
        channel = AgentChannel(websocket, caller, key=key, store=store, queue=queue, fastpath=hub.fastpath)
        hub.add(channel)
        started = time.monotonic()
        reason = "gateway stopping"
        try:
            reason = await channel.serve()
        finally:
            hub.remove(channel)
            assert caller.agent is not None
            store.audit(operation=f"channel {channel.id}", accepted=True, key_id=caller.key_id,
                        agent_id=caller.agent.id,
                        reason=f"closed after {time.monotonic() - started:.0f} s, {channel.sent} item(s) sent, "
                               f"{channel.answered} result(s): {reason}")

    return endpoint
