"""Is a code server answering? One Dagster gRPC Ping, raw bytes, no dagster import."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import grpc

from protocol.dagster_grpc import LIST_REPOSITORIES, PING, decode_echo, encode_echo


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


def load_error(address: str, *, timeout: float = 30.0) -> str | None:
    """The code location's load error (message and traceback) if its code failed to import, else None.

    Code servers run with --lazy-load-user-code, so a broken location still answers and hands Dagster its
    error (the UI shows the traceback); ListRepositories returns that error as serialized JSON.
    """
    with grpc.insecure_channel(address) as channel:
        reply = channel.unary_unary(LIST_REPOSITORIES)(b"", timeout=timeout)
    try:
        data = json.loads(decode_echo(reply))
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("__class__") != "SerializableErrorInfo":
        return None
    return _format_error(data)


def _format_error(error: dict) -> str:
    text = f"{error.get('message', '').rstrip()}\n{''.join(error.get('stack') or [])}"
    cause = error.get("cause")
    if isinstance(cause, dict):
        text += "\nThe above exception was caused by:\n" + _format_error(cause)
    return text.strip()
