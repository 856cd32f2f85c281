"""The agent's half of the gRPC relay: replay one GRPC_CALL's raw bytes against a code server.

The control plane's relay already refused everything the method table does not relay; the agent checks again
before dialling (defence in depth), so a forged, replayed or buggy work item can never reach StartRun or
ShutdownServer on the user's side. Bytes go through untouched: no serializers, no dagster import.

Channels are cached per code server address, because Dagster's webserver and daemon call each location
several times a second and a new HTTP/2 connection per call would cost more than the call. gRPC channels
reconnect by themselves when a code server restarts on the same address; `forget` drops one whose address
went away. Every outcome, including a refusal or a malformed payload, is a result dict for the control plane:
errors travel as values ({code, details}), never as exceptions out of `replay`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import grpc

from protocol.dagster_grpc import MAX_MESSAGE_BYTES
from protocol.grpc_calls import Arity, GrpcCall, GrpcCallError, GrpcMethod, GrpcResult, lookup

__all__ = ["CHANNEL_OPTIONS", "GrpcReplayer"]

log = logging.getLogger("airlock.agent.grpc")

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

ChannelFactory = Callable[[str], grpc.Channel]


def _insecure_channel(address: str) -> grpc.Channel:
    # Plaintext is right here: the code server sits on the location's internal Docker network, reachable
    # only from the appliance, and publishes no port.
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


class GrpcReplayer:
    """Replays GRPC_CALL payloads on one cached channel per code server address; thread-safe."""

    def __init__(self, *, default_timeout: float = 60.0, channel_factory: ChannelFactory = _insecure_channel) -> None:
        self._default_timeout = default_timeout  # for a payload without a deadline; Dagster's own default
        self._channel_factory = channel_factory
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def replay(self, payload: Mapping[str, Any], address: str) -> dict[str, Any]:
        """Run one call against the code server at host:port and return the GRPC_CALL result dict."""
        return self.replay_call(payload, address).to_result()

    def replay_call(self, payload: Mapping[str, Any], address: str) -> GrpcResult:
        """As `replay`, but returns the decoded GrpcResult."""
        checked = self._check(payload)
        if isinstance(checked, GrpcResult):
            return checked
        call, method, timeout = checked
        channel = self._channel(address)
        responses: list[bytes] = []
        try:
            if method.arity is Arity.UNARY_STREAM:
                for message in channel.unary_stream(call.method)(call.request, timeout=timeout):
                    responses.append(message)
            else:
                responses.append(channel.unary_unary(call.method)(call.request, timeout=timeout))
        except grpc.RpcError as exc:
            code, details = _status(exc)
            return GrpcResult.failure(code, details, responses)
        return GrpcResult(tuple(responses))

    def start(self, payload: Mapping[str, Any], address: str, on_result: Callable[[dict[str, Any]], None]) -> bool:
        """Start a unary call without blocking the caller; its result dict goes to `on_result`, on gRPC's own
        thread. Returns False, having started nothing, for a streaming method: run that one with `replay`."""
        checked = self._check(payload)
        if isinstance(checked, GrpcResult):
            on_result(checked.to_result())
            return True
        call, method, timeout = checked
        if method.arity is Arity.UNARY_STREAM:
            return False
        future = self._channel(address).unary_unary(call.method).future(call.request, timeout=timeout)

        def done(finished: grpc.Future) -> None:
            try:
                result = GrpcResult((finished.result(),))
            except grpc.RpcError as exc:
                result = GrpcResult.failure(*_status(exc))
            except grpc.FutureCancelledError:
                result = GrpcResult.failure("CANCELLED", "airlock agent: the call was cancelled")
            on_result(result.to_result())

        future.add_done_callback(done)
        return True

    def _check(self, payload: Mapping[str, Any]) -> tuple[GrpcCall, GrpcMethod, float] | GrpcResult:
        """The call, its table entry and its timeout, or the failure to answer with (malformed, or not relayed)."""
        try:
            call = GrpcCall.from_payload(payload)
        except GrpcCallError as exc:
            return GrpcResult.failure("INVALID_ARGUMENT", f"airlock agent: {exc}")
        method = lookup(call.method)
        if method is None or not method.relayed:
            reason = "not in the method table" if method is None else method.reason
            log.warning("GRPC-REPLAY-DECISION location=%s method=%s decision=refuse reason=%r",
                        call.location, call.method, reason)
            return GrpcResult.failure("PERMISSION_DENIED", f"airlock agent refuses {call.method}: {reason}")
        return call, method, call.deadline if call.deadline is not None else self._default_timeout

    def forget(self, address: str) -> None:
        """Close and drop the channel to a code server that was replaced or removed."""
        with self._lock:
            channel = self._channels.pop(address, None)
        if channel is not None:
            channel.close()

    def close(self) -> None:
        """Close every cached channel; the replayer may still be used afterwards (channels reopen)."""
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = self._channel_factory(address)
            return channel


def _status(exc: grpc.RpcError) -> tuple[str, str]:
    """The code name and details of a failed call; OK or a missing code (should not happen) becomes UNKNOWN."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    name = code.name if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK else "UNKNOWN"
    return name, details or ""
