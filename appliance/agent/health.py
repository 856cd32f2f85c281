"""Is a code server answering? One Dagster gRPC Ping, raw bytes, no dagster import."""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

from protocol.dagster_grpc import PING, decode_echo, encode_echo


@dataclass(frozen=True)
class PingResult:
    ok: bool
    latency_ms: float
    detail: str


def ping(address: str, *, timeout: float = 5.0, echo: str = "airlock") -> PingResult:
    """Call DagsterApi/Ping at host:port and check the echo comes back."""
    started = time.perf_counter()
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(PING)  # no serializers: bytes in, bytes out
        try:
            reply = call(encode_echo(echo), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            return PingResult(False, (time.perf_counter() - started) * 1000, f"{code}: {details}")
    latency = (time.perf_counter() - started) * 1000
    answered = decode_echo(reply)
    if answered != echo:
        return PingResult(False, latency, f"echo mismatch: sent {echo!r}, got {answered!r}")
    return PingResult(True, latency, "ok")
