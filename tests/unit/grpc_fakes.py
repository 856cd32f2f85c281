"""Fakes for the relay's tests: a code server that answers every method of the table deterministically and
counts what reached it, an in-memory CallQueue, and the agent loop that serves it with a GrpcReplayer.
Their fixtures (`loop`, `code_server`) are in tests/unit/conftest.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc

from appliance.agent.grpc_replay import GrpcReplayer
from protocol.dagster_grpc import MAX_MESSAGE_BYTES
from protocol.grpc_calls import BY_PATH, Arity, GrpcResult

OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


# ---- the fake code server ------------------------------------------------------------------------------

def unary_answer(path: str, request: bytes) -> bytes:
    return b"U|" + path.encode() + b"|" + request[::-1]


def stream_answers(path: str, request: bytes) -> list[bytes]:
    return [f"S{i}|".encode() + path.encode() + b"|" + request for i in range(3)]


class FakeCodeServer(grpc.GenericRpcHandler):
    """Answers every table method; b"fail" -> NOT_FOUND (streams: FAILED_PRECONDITION after one message);
    b"sleep:S" sleeps S seconds first."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.fail_everything = False  # as a code server that is up but broken
        self._lock = threading.Lock()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = BY_PATH.get(details.method)
        if method is None:
            return None
        if method.arity is Arity.UNARY_STREAM:
            return grpc.unary_stream_rpc_method_handler(lambda req, ctx: self._stream(method.path, req, ctx))
        return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self._unary(method.path, req, ctx))

    def _seen(self, path: str, request: bytes) -> None:
        with self._lock:
            self.hits[path] += 1
        if request.startswith(b"sleep:"):
            time.sleep(float(request[6:]))

    def _unary(self, path: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._seen(path, request)
        if request == b"fail" or self.fail_everything:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no such thing at {path}")
        return unary_answer(path, request)

    def _stream(self, path: str, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._seen(path, request)
        messages = stream_answers(path, request)
        if request == b"fail":
            yield messages[0]
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "broke after one chunk")
        yield from messages


# ---- an in-memory CallQueue and the fake agent ---------------------------------------------------------

class MemoryCalls:
    """CallQueue whose items an agent thread takes from `inbox`; results cross threads via futures."""

    def __init__(self) -> None:
        self.inbox: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.submitted: list[tuple[str, dict[str, Any], float]] = []
        self._results: dict[str, concurrent.futures.Future[GrpcResult]] = {}

    def submit(self, location: str, payload: dict[str, Any], *, ttl_seconds: float) -> str:
        call_id = uuid.uuid4().hex
        self._results[call_id] = concurrent.futures.Future()
        self.submitted.append((location, payload, ttl_seconds))
        self.inbox.put((call_id, json.loads(json.dumps(payload))))  # it must survive JSON, as in the queue
        return call_id

    async def wait(self, call_id: str, timeout: float) -> GrpcResult | None:
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._results[call_id])), timeout)
        except TimeoutError:
            return None

    async def call(self, location: str, payload: dict[str, Any], wait: float) -> GrpcResult | None:
        return await self.wait(self.submit(location, payload, ttl_seconds=wait), wait)

    def complete(self, call_id: str, result: dict[str, Any]) -> None:
        self._results[call_id].set_result(GrpcResult.from_result(json.loads(json.dumps(result))))


def run_agent(calls: MemoryCalls, replayer: GrpcReplayer, address: str, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            call_id, payload = calls.inbox.get(timeout=0.02)
        except queue.Empty:
            continue
        calls.complete(call_id, replayer.replay(payload, address))
