"""The gRPC relay end to end on 127.0.0.1: caller -> relay -> CallQueue -> agent replay -> fake code server.

Everything is real gRPC on random local ports. The fake code server answers every method with a deterministic
transformation of the request (streams: three messages), so "the caller got exactly the code server's bytes"
is checkable, and it records every method it saw, so "a refused method never reached it" is too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from appliance.agent.grpc_replay import GrpcReplayer
from controlplane.gateway.queue import WorkQueue
from controlplane.relay import RelayLimits, RelayServer, WorkQueueCalls, plan_wait
from protocol.dagster_grpc import SERVICE
from protocol.grpc_calls import BY_PATH, HEALTH_SERVICE, METHODS, Arity, GrpcCall, GrpcMethod, GrpcResult
from tests.unit.grpc_fakes import OPTIONS, FakeCodeServer, MemoryCalls, run_agent, stream_answers, unary_answer

API = [m for m in METHODS if m.service == SERVICE]
RELAYED = [m for m in METHODS if m.relayed]
REFUSED = [m for m in METHODS if not m.relayed]
GET_SERVER_ID = f"/{SERVICE}/GetServerId"
STREAMS_IN_PROTO = {"StreamingPing", "ExternalPartitionSetExecutionParams", "StreamingExternalRepository",
                    "ExternalScheduleExecution", "ExternalSensorExecution"}


class Stack:
    """One relay plus (optionally) agent threads, torn down by the fixture."""

    def __init__(self, loop: asyncio.AbstractEventLoop, address: str) -> None:
        self.loop, self.address = loop, address
        self.calls = MemoryCalls()
        self.replayer = GrpcReplayer()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._relays: list[RelayServer] = []
        self._channels: list[grpc.Channel] = []

    def relay(self, limits: RelayLimits | None = None, calls: Any = None) -> grpc.Channel:
        server = RelayServer("loc", calls or self.calls, limits=limits)
        port = asyncio.run_coroutine_threadsafe(server.start(), self.loop).result(5)
        self._relays.append(server)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)
        self._channels.append(channel)
        return channel

    def start_agent(self, workers: int = 4) -> None:
        for _ in range(workers):
            t = threading.Thread(target=run_agent, args=(self.calls, self.replayer, self.address, self._stop))
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for channel in self._channels:
            channel.close()
        for server in self._relays:
            asyncio.run_coroutine_threadsafe(server.stop(0), self.loop).result(5)
        self.replayer.close()


@pytest.fixture
def stack(loop: asyncio.AbstractEventLoop, code_server: tuple[FakeCodeServer, str]) -> Iterator[Stack]:
    s = Stack(loop, code_server[1])
    yield s
    s.close()


def call(channel: grpc.Channel, method: GrpcMethod, request: bytes, timeout: float | None = 5.0) -> list[bytes]:
    if method.arity is Arity.UNARY_STREAM:
        return list(channel.unary_stream(method.path)(request, timeout=timeout))
    return [channel.unary_unary(method.path)(request, timeout=timeout)]


def expected(method: GrpcMethod, request: bytes) -> list[bytes]:
    if method.arity is Arity.UNARY_STREAM:
        return stream_answers(method.path, request)
    return [unary_answer(method.path, request)]


# ---- the table -----------------------------------------------------------------------------------------

def test_table_matches_dagster_proto() -> None:
    """28 DagsterApi methods in dagster 1.13's dagster_api.proto, 5 of them unary-stream; 3 refused."""
    assert len(API) == 28 and len({m.name for m in API}) == 28
    assert {m.name for m in API if m.arity is Arity.UNARY_STREAM} == STREAMS_IN_PROTO
    assert {m.name for m in API if not m.relayed} == {"StartRun", "ShutdownServer", "CancelExecution"}
    health = {m.name: m.relayed for m in METHODS if m.service == HEALTH_SERVICE}
    assert health == {"Check": True, "Watch": False}
    assert all(m.reason for m in METHODS)


def test_codec_round_trip_and_validation() -> None:
    payload = GrpcCall("loc", "/api.DagsterApi/Ping", b"\x00\xff", 1.5).to_payload()
    assert GrpcCall.from_payload(json.loads(json.dumps(payload))) == GrpcCall("loc", "/api.DagsterApi/Ping",
                                                                             b"\x00\xff", 1.5)
    result = GrpcResult.failure("NOT_FOUND", "x", [b"a"])
    assert GrpcResult.from_result(result.to_result()) == result
    for bad in ({"location": "l", "method": "Ping", "request_b64": ""},
                {"location": "l", "method": "/a/B", "request_b64": "!!"},
                {"location": "l", "method": "/a/B", "request_b64": "", "deadline": -1}):
        with pytest.raises(ValueError):
            GrpcCall.from_payload(bad)
    with pytest.raises(ValueError):
        GrpcResult.failure("OK", "not an error code")


def test_plan_wait() -> None:
    limits = RelayLimits(default_wait=60, max_wait=600)
    assert plan_wait(None, limits) == (60, False)
    assert plan_wait(97_199_999.0, limits) == (60, False)  # "forever" is no deadline
    assert plan_wait(5.0, limits) == (5.0, True)
    assert plan_wait(3600.0, limits) == (600, False)


# ---- every method through the relay --------------------------------------------------------------------

@pytest.mark.parametrize("method", RELAYED, ids=lambda m: m.path)
def test_relayed_method_returns_code_servers_bytes(stack: Stack, method: GrpcMethod) -> None:
    stack.start_agent()
    channel = stack.relay()
    request = b"req-" + method.name.encode() + bytes(range(256))
    assert call(channel, method, request) == expected(method, request)


@pytest.mark.parametrize("method", REFUSED, ids=lambda m: m.path)
def test_refused_method_never_reaches_code_server(
    stack: Stack, code_server: tuple[FakeCodeServer, str], method: GrpcMethod
) -> None:
    stack.start_agent()
    channel = stack.relay()
    before = code_server[0].hits[method.path]
    with pytest.raises(grpc.RpcError) as info:
        call(channel, method, b"anything")
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert method.path in info.value.details()
    assert stack.calls.submitted == [] and code_server[0].hits[method.path] == before


@pytest.mark.parametrize("method", REFUSED, ids=lambda m: m.path)
def test_agent_refuses_refused_method_without_calling(
    stack: Stack, code_server: tuple[FakeCodeServer, str], method: GrpcMethod
) -> None:
    before = code_server[0].hits[method.path]
    payload = GrpcCall("loc", method.path, b"forged", 5).to_payload()
    result = GrpcResult.from_result(stack.replayer.replay(payload, stack.address))
    assert result.code == "PERMISSION_DENIED" and code_server[0].hits[method.path] == before
    unknown = GrpcResult.from_result(stack.replayer.replay({**payload, "method": "/api.DagsterApi/Nope"}, "x:1"))
    assert unknown.code == "PERMISSION_DENIED"
    assert stack.replayer.replay({"method": "/x/Y"}, "x:1")["error"]["code"] == "INVALID_ARGUMENT"


def test_unknown_method_is_unimplemented(stack: Stack) -> None:
    channel = stack.relay()
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/api.DagsterApi/FutureMethod")(b"", timeout=5)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED and stack.calls.submitted == []


# ---- failures, deadlines, caching, size ----------------------------------------------------------------

def test_no_agent_is_unavailable_quickly(stack: Stack) -> None:
    channel = stack.relay(RelayLimits(default_wait=0.3, max_wait=0.5))
    ping = BY_PATH[f"/{SERVICE}/Ping"]
    for timeout in (None, 30.0):  # no deadline: default_wait; a long one: max_wait
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            call(channel, ping, b"x", timeout=timeout)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE and "agent" in info.value.details()
        assert time.monotonic() - started < 2
    assert [ttl for _, _, ttl in stack.calls.submitted] == pytest.approx([0.3, 0.5], abs=0.05)


def test_callers_deadline_is_deadline_exceeded_and_reaches_the_agent(stack: Stack) -> None:
    stack.start_agent()
    channel = stack.relay()
    ping = BY_PATH[f"/{SERVICE}/Ping"]
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        call(channel, ping, b"sleep:1.5", timeout=0.4)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 1.4
    call(channel, ping, b"a", timeout=None)
    call(channel, ping, b"b", timeout=10**7)  # absurd: treated as none
    deadlines = [payload["deadline"] for _, payload, _ in stack.calls.submitted]
    assert 0 < deadlines[0] <= 0.45 and deadlines[1:] == [60.0, 60.0]


def test_agent_side_error_code_is_mapped_back(stack: Stack) -> None:
    stack.start_agent()
    channel = stack.relay()
    with pytest.raises(grpc.RpcError) as info:
        call(channel, BY_PATH[f"/{SERVICE}/ExternalJob"], b"fail")
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert info.value.details() == f"no such thing at /{SERVICE}/ExternalJob"
    sensor = BY_PATH[f"/{SERVICE}/ExternalSensorExecution"]
    received: list[bytes] = []
    with pytest.raises(grpc.RpcError) as info:
        for message in channel.unary_stream(sensor.path)(b"fail", timeout=5):
            received.append(message)
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert received == stream_answers(sensor.path, b"fail")[:1]


def test_get_server_id_is_cached_only_when_successful(
    stack: Stack, code_server: tuple[FakeCodeServer, str]
) -> None:
    stack.start_agent()
    channel = stack.relay(RelayLimits(server_id_cache_seconds=0.5))
    fake, method = code_server[0], BY_PATH[GET_SERVER_ID]
    before = fake.hits[GET_SERVER_ID]
    answers = [call(channel, method, b"") for _ in range(5)]
    assert answers == [expected(method, b"")] * 5 and fake.hits[GET_SERVER_ID] == before + 1
    time.sleep(0.6)  # the window has passed
    call(channel, method, b"")
    assert fake.hits[GET_SERVER_ID] == before + 2
    call(channel, BY_PATH[f"/{SERVICE}/ReloadCode"], b"")  # a reload drops the cached id
    call(channel, method, b"")
    assert fake.hits[GET_SERVER_ID] == before + 3
    time.sleep(0.6)
    fake.fail_everything = True
    try:
        for _ in range(2):  # a failure is never cached
            with pytest.raises(grpc.RpcError):
                call(channel, method, b"")
    finally:
        fake.fail_everything = False
    call(channel, method, b"")
    call(channel, method, b"")
    assert fake.hits[GET_SERVER_ID] == before + 6


def test_five_megabytes_each_way(stack: Stack) -> None:
    stack.start_agent()
    channel = stack.relay()
    big = os.urandom(5 * 1024 * 1024)
    for name in ("ExternalRepository", "StreamingExternalRepository"):
        method = BY_PATH[f"/{SERVICE}/{name}"]
        assert call(channel, method, big, timeout=20) == expected(method, big)


# ---- the real WorkQueue --------------------------------------------------------------------------------

def test_work_queue_backed_calls_end_to_end(
    stack: Stack, tmp_path: Any, code_server: tuple[FakeCodeServer, str]
) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'queue.db'}")
    work = WorkQueue(engine)
    work.create_schema()
    routes = {"loc": ("prod", "default")}
    calls = WorkQueueCalls(work, routes.__getitem__)
    stop = threading.Event()

    def agent() -> None:
        while not stop.is_set():
            items = work.claim("prod", ["default"], "agent-1")
            for item in items:
                assert item.kind == "GRPC_CALL" and item.payload["location"] == "loc"
                work.complete(item.id, "agent-1", result=stack.replayer.replay(item.payload, stack.address))
            if not items:
                time.sleep(0.005)

    thread = threading.Thread(target=agent)
    thread.start()
    try:
        channel = stack.relay(calls=calls)
        for name in ("Ping", "ExternalScheduleExecution", "ListRepositories"):
            method = BY_PATH[f"/{SERVICE}/{name}"]
            assert call(channel, method, b"via sqlite") == expected(method, b"via sqlite")
        with pytest.raises(grpc.RpcError) as info:
            call(channel, BY_PATH[f"/{SERVICE}/Ping"], b"fail")
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
    finally:
        stop.set()
        thread.join(5)
        engine.dispose()


def test_work_queue_calls_map_expired_and_failed_items(tmp_path: Any) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'queue.db'}")
    work = WorkQueue(engine)
    work.create_schema()
    calls = WorkQueueCalls(work, lambda _loc: ("prod", "default"))
    payload = GrpcCall("loc", f"/{SERVICE}/Ping", b"", 1).to_payload()
    expired = calls.submit("loc", payload, ttl_seconds=0.01)
    time.sleep(0.02)  # past its ttl before any agent claims it
    failed = calls.submit("loc", payload, ttl_seconds=60)
    assert [i.id for i in work.claim("prod", ["default"], "a")] == [failed]
    work.complete(failed, "a", error="location 'loc' is not deployed here")
    work.requeue_expired_leases()
    got = asyncio.run(calls.wait(expired, 1)), asyncio.run(calls.wait(failed, 1))
    assert [r.code if r else None for r in got] == ["UNAVAILABLE", "UNAVAILABLE"]
    assert "expired" in got[0].details and "not deployed" in got[1].details  # type: ignore[union-attr]
    engine.dispose()


@pytest.mark.parametrize("method", RELAYED + REFUSED, ids=lambda m: m.path)
def test_start_answers_like_replay_without_blocking_and_leaves_streams_to_a_worker(
    code_server: tuple[FakeCodeServer, str], method: GrpcMethod
) -> None:
    """GrpcReplayer.start (the agent's path for unary calls on its work channel) answers exactly what replay
    answers, on gRPC's thread; a stream is left to replay (False, nothing started)."""
    replayer = GrpcReplayer()
    payload = GrpcCall("loc", method.path, b"abc", 5.0).to_payload()
    answered: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
    started = replayer.start(payload, code_server[1], answered.set_result)
    if method.relayed and method.arity is Arity.UNARY_STREAM:
        assert started is False and not answered.done()
    else:
        assert started is True
        assert answered.result(5) == replayer.replay(payload, code_server[1])
    replayer.close()
