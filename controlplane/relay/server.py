"""The gRPC relay: one local port per code location that speaks Dagster's API and answers through the agent.

dagster-webserver and dagster-daemon run unmodified; their workspace points each location at a relay port.
Every call is handled as raw bytes (no dagster import, no proto version skew): a relayed method becomes one
GRPC_CALL work item for the location's agent (straight over its work channel when it holds one to this
gateway, on the location's queue otherwise: controlplane/relay/calls.py), the agent replays it against the
real code server and sends the response bytes back, and the relay returns them, so the caller sees exactly
what the code server said.

Status codes the relay itself chooses (everything else is the code server's own code, passed through):
  PERMISSION_DENIED  a method the table refuses (StartRun, ShutdownServer, CancelExecution, Health/Watch);
                     nothing is queued. Dagster's client treats it like any unreachable-server error.
  UNIMPLEMENTED      a method not in the table at all, as a code server of another Dagster version would say.
  UNAVAILABLE        no answer within the relay's own cap (no agent connected, item expired unclaimed, the
                     agent failed the item, or the call could not be queued).
  DEADLINE_EXCEEDED  the caller's own deadline passed first.
  INTERNAL           the agent's answer was malformed (e.g. a unary call with no response message).

How long a call waits (`plan_wait`): the caller's deadline if it set a sane one (Dagster always does: 60 s by
default, 180 s for repository snapshots), capped at `max_wait`; a call with no deadline, or an absurd one
(more than a day, as some clients send for "forever"), waits `default_wait` (60 s, Dagster's own default).
That wait is also the work item's ttl and the deadline the agent uses, so nobody works on a call that no one
is waiting for any more.

GetServerId is polled about once a second per location by both the webserver and the daemon; a successful
answer is cached for a few seconds so those polls do not each cross to the appliance and back (a relayed
ReloadCode or ReloadCodeWithState drops the cached id, since the server id may change with it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from controlplane.gateway.queue import DONE, EXPIRED, WorkQueue
from protocol.dagster_grpc import MAX_MESSAGE_BYTES, SERVICE
from protocol.errors import AirlockError
from protocol.grpc_calls import METHODS, Arity, GrpcCall, GrpcCallError, GrpcMethod, GrpcResult
from protocol.work import WorkKind

__all__ = ["CallQueue", "LocationRelay", "RelayLimits", "RelayServer", "WorkQueueCalls", "agent_answer", "plan_wait"]

log = logging.getLogger("airlock.relay")

GET_SERVER_ID = f"/{SERVICE}/GetServerId"
# After a reload the code server may report a new id at once; a stale cached one would cost an extra reload.
RELOADS = frozenset({f"/{SERVICE}/ReloadCode", f"/{SERVICE}/ReloadCodeWithState"})
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # a second relay on the same port must fail loudly, not share the traffic
]


class CallQueue(Protocol):
    """How a relayed call reaches the agent: its work channel or the work queue in production, fakes in tests."""

    async def call(self, location: str, payload: dict[str, Any], wait: float) -> GrpcResult | None:
        """Have the location's agent run one GRPC_CALL payload. The code server's answer, a failure the relay
        should report, or None if nothing came within `wait` seconds (also how long the item may live).
        An exception means the call could not be handed over at all."""
        ...


def agent_answer(ok: bool, result: dict[str, Any] | None, error: str | None) -> GrpcResult:
    """The GrpcResult for an agent's answer to a GRPC_CALL item, whichever way it came back."""
    if not ok:
        return GrpcResult.failure("UNAVAILABLE", f"airlock relay: the agent could not run the call: {error}")
    try:
        return GrpcResult.from_result(result or {})
    except GrpcCallError as exc:
        return GrpcResult.failure("INTERNAL", f"airlock relay: malformed answer from the agent: {exc}")


class WorkQueueCalls:
    """CallQueue on the control plane's WorkQueue: `route(location)` gives the (deployment, agent queue)."""

    def __init__(self, queue: WorkQueue, route: Callable[[str], tuple[str, str]]) -> None:
        self._queue = queue
        self._route = route

    async def call(self, location: str, payload: dict[str, Any], wait: float) -> GrpcResult | None:
        started = time.monotonic()
        call_id = await asyncio.to_thread(self.submit, location, payload, ttl_seconds=wait)
        return await self.wait(call_id, max(wait - (time.monotonic() - started), 0.0))

    def submit(self, location: str, payload: dict[str, Any], *, ttl_seconds: float) -> str:
        deployment, agent_queue = self._route(location)
        return self._queue.enqueue(deployment, agent_queue, WorkKind.GRPC_CALL, payload, ttl_seconds=ttl_seconds)

    async def wait(self, call_id: str, timeout: float) -> GrpcResult | None:
        outcome = await self._queue.wait_for_result(call_id, timeout)
        if outcome is None:
            return None
        if outcome.status == EXPIRED:
            return GrpcResult.failure("UNAVAILABLE", "airlock relay: no agent picked up the call before it expired")
        return agent_answer(outcome.status == DONE, outcome.result, outcome.error)


@dataclass(frozen=True)
class RelayLimits:
    """The relay's waits, in seconds (see the module docstring)."""

    default_wait: float = 60.0  # calls without a sane deadline; Dagster's DEFAULT_GRPC_TIMEOUT
    max_wait: float = 600.0  # no call waits longer, whatever its deadline (the queue's default ttl)
    no_deadline_above: float = 86_400.0  # a deadline further away than a day means "none"
    server_id_cache_seconds: float = 3.0


def plan_wait(time_remaining: float | None, limits: RelayLimits) -> tuple[float, bool]:
    """(seconds to wait for the agent, whether it is the caller's own deadline that bounds the wait)."""
    if time_remaining is None or time_remaining > limits.no_deadline_above:
        return min(limits.default_wait, limits.max_wait), False
    if time_remaining <= limits.max_wait:
        return max(time_remaining, 0.0), True
    return limits.max_wait, False


class _Abort(AirlockError):
    """The relay's own verdict on a call; the handler turns it into the gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class LocationRelay(grpc.GenericRpcHandler):
    """Serves every method in the table for one location, as raw bytes; unknown methods get UNIMPLEMENTED."""

    def __init__(
        self, location: str, calls: CallQueue, limits: RelayLimits | None = None,
        *, clock: Callable[[], float] = time.monotonic,
        rewrite: Callable[[str, bytes], bytes] = lambda _method, request: request,
        check: Callable[[str, GrpcResult], GrpcResult] = lambda _method, result: result,
    ) -> None:
        self.location = location
        self._rewrite = rewrite  # e.g. scrub.scrub_instance_ref: what must not reach the user side
        self._check = check  # e.g. compat.check_answer: a location on a Dagster outside the window
        self._calls = calls
        self._limits = limits or RelayLimits()
        self._clock = clock
        self._server_id: tuple[float, GrpcResult] | None = None  # (fresh until, last successful answer)
        self._handlers = {m.path: self._handler(m) for m in METHODS}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._handlers.get(handler_call_details.method)
        if handler is None:
            _decision(self.location, handler_call_details.method, "unknown", "not in the relay's method table")
        return handler

    def _handler(self, method: GrpcMethod) -> grpc.RpcMethodHandler:
        stream = method.arity is Arity.UNARY_STREAM
        if not method.relayed:
            return (grpc.unary_stream_rpc_method_handler(self._refuse_stream(method)) if stream
                    else grpc.unary_unary_rpc_method_handler(self._refuse(method)))
        return (grpc.unary_stream_rpc_method_handler(self._relay_stream(method)) if stream
                else grpc.unary_unary_rpc_method_handler(self._relay_unary(method)))

    def _refuse(self, method: GrpcMethod) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            _decision(self.location, method.path, "refuse", method.reason)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"airlock relay refuses {method.path}: {method.reason}")
            raise AssertionError("unreachable: abort raises")
        return refuse

    def _refuse_stream(self, method: GrpcMethod) -> Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[bytes]]:
        refuse = self._refuse(method)

        async def refuse_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            yield await refuse(request, context)  # abort raises before anything is yielded
        return refuse_stream

    def _relay_unary(self, method: GrpcMethod) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        async def relay_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            result = await self._answer(method, request, context)
            if result.ok and len(result.responses) != 1:
                result = GrpcResult.failure("INTERNAL", f"airlock relay: {method.path} is unary but the agent "
                                                        f"returned {len(result.responses)} messages")
            if not result.ok:
                await context.abort(grpc.StatusCode[result.code or "UNKNOWN"], result.details)
            return result.responses[0]
        return relay_unary

    def _relay_stream(self, method: GrpcMethod) -> Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[bytes]]:
        async def relay_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            result = await self._answer(method, request, context)
            for message in result.responses:
                yield message
            if not result.ok:
                await context.abort(grpc.StatusCode[result.code or "UNKNOWN"], result.details)
        return relay_stream

    async def _answer(self, method: GrpcMethod, request: bytes, context: grpc.aio.ServicerContext) -> GrpcResult:
        """The one error funnel: every relay-side failure becomes a GrpcResult with the relay's own code."""
        try:
            return await self._relay(method, request, context.time_remaining())
        except _Abort as abort:
            log.warning("airlock relay location=%s method=%s code=%s: %s",
                        self.location, method.path, abort.code.name, abort.details)
            return GrpcResult.failure(abort.code.name, abort.details)

    async def _relay(self, method: GrpcMethod, request: bytes, time_remaining: float | None) -> GrpcResult:
        wait, caller_bound = plan_wait(time_remaining, self._limits)
        started = self._clock()
        cacheable = method.path == GET_SERVER_ID and request == b""  # GetServerId takes Empty
        if cacheable and self._server_id is not None and started < self._server_id[0]:
            return self._server_id[1]
        if wait <= 0:
            raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"airlock relay: {method.path} arrived past its deadline")
        try:
            request = self._rewrite(method.path, request)
        except ValueError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"airlock relay: {exc}") from exc
        payload = GrpcCall(self.location, method.path, request, wait).to_payload()
        try:
            result = await self._calls.call(self.location, payload, max(wait - (self._clock() - started), 0.0))
        except Exception as exc:  # the queue's own failure (database down, unknown route) is one verdict
            raise _Abort(grpc.StatusCode.UNAVAILABLE,
                         f"airlock relay: could not queue {method.path} for location {self.location!r}: {exc}") from exc
        if result is None:
            if caller_bound:
                raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"airlock relay: {method.path} got no answer from the agent for location "
                             f"{self.location!r} within the call's deadline ({wait:.1f}s)")
            raise _Abort(grpc.StatusCode.UNAVAILABLE,
                         f"airlock relay: no answer from the agent for location {self.location!r} within "
                         f"{wait:.1f}s ({method.path}); is the appliance connected?")
        if cacheable and result.ok:
            self._server_id = (self._clock() + self._limits.server_id_cache_seconds, result)
        elif method.path in RELOADS:
            self._server_id = None
        return self._check(method.path, result)


class RelayServer:
    """One grpc.aio server bound to one local port for one location; start and stop it on a running loop."""

    def __init__(
        self, location: str, calls: CallQueue, *, address: str = "127.0.0.1:0", limits: RelayLimits | None = None,
        rewrite: Callable[[str, bytes], bytes] | None = None,
        check: Callable[[str, GrpcResult], GrpcResult] | None = None,
    ) -> None:
        self.handler = LocationRelay(location, calls, limits, **({"rewrite": rewrite} if rewrite else {}),
                                     **({"check": check} if check else {}))
        self._address = address
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        """Bind and serve; returns the port (useful with port 0). Refuses to start twice."""
        if self._server is not None:
            raise RuntimeError(f"relay for {self.handler.location!r} is already started")
        server = grpc.aio.server(options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers([self.handler])
        try:
            self.port = server.add_insecure_port(self._address)
        except RuntimeError as exc:
            raise OSError(f"relay for {self.handler.location!r} cannot bind {self._address}") from exc
        await server.start()
        self._server = server
        log.info("airlock relay location=%s listening on %s (port %d)", self.handler.location, self._address, self.port)
        return self.port

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting calls; calls in flight get `grace` seconds to finish, then are cancelled."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None


def _decision(location: str, method: str, decision: str, reason: str) -> None:
    """One structured line per security decision (STYLE rule 6)."""
    log.warning("GRPC-RELAY-DECISION location=%s method=%s decision=%s reason=%r", location, method, decision, reason)
