"""The relay's two HTTP faces.

Run workers (TCP, on every location network), each request with `Authorization: Bearer <run token>`:

    POST /v1/write   spooled writes ({"writes": [...]}, or one record): 200 once all are on disk (one fsync),
                     503 when the spool is full (retry later); a batch with one bad record is refused whole,
                     413 if a record alone is over MAX_RECORD_BYTES: it could never be forwarded, and a
                     record the gateway refuses would hold up every write behind it
    POST /v1/call    a call that needs its answer; forwarded after this run's earlier writes

The agent (a Unix socket in the appliance, never on a network):

    POST /control/runs/{run_id}/exited   the run's container is gone: spool its exit report, revoke its token
    GET  /control/runs/{run_id}          {"pending": bytes not yet forwarded}: the agent keeps the container
                                         (and its logs) until that is 0
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from appliance.metadata.spool import Spool, SpoolFull
from appliance.metadata.tokens import RunScope, RunTokens, TokenRefused
from protocol.errors import PermanentError
from protocol.limits import MAX_RECORD_BYTES, record_too_large
from protocol.storage_calls import CALLS, EXIT_METHOD

__all__ = ["MAX_RECORD_BYTES", "RelayState", "StorageCalls", "control_app", "worker_app"]

log = logging.getLogger("airlock.metadata")
MAX_BODY = 64 * 1024 * 1024  # a step's compute log (50 MB by default) plus its encoding
MAX_WRITES = 10_000  # records in one write request (userland sends at most 1,000)


class RecordTooLarge(PermanentError, ValueError):
    """A record that would not fit in one request to the control plane (protocol/limits.py)."""


class StorageCalls(Protocol):
    def call(self, scope: RunScope, record: dict[str, Any]) -> dict[str, Any]: ...  # -> {"result"} | {"error"}


@dataclass
class RelayState:
    spool: Spool
    tokens: RunTokens
    upstream: StorageCalls
    read_wait_seconds: float = 20.0


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _body(request: Request) -> dict[str, Any]:
    declared = int(request.headers.get("content-length") or 0)
    if declared > MAX_BODY:
        raise ValueError(f"body of {declared} bytes is over the {MAX_BODY}-byte limit")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise ValueError(f"body is over the {MAX_BODY}-byte limit")
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    return data


def _record(data: dict[str, Any], mode: str) -> dict[str, Any]:
    method = data.get("method")
    if CALLS.get(method) != mode:  # type: ignore[arg-type]
        allowed = "not on the storage call allowlist" if method not in CALLS else f"not a {mode}"
        raise ValueError(f"{method!r} is {allowed}")
    for name, kind in (("args", str), ("kwargs", str), ("client", str), ("seq", int)):
        if not isinstance(data.get(name), kind):
            raise ValueError(f"{name} must be a {kind.__name__}")
    record = {k: data[k] for k in ("method", "args", "kwargs", "client", "seq")}
    if (too_large := record_too_large(record)) is not None:  # userland's client checks first; this is the rule
        raise RecordTooLarge(too_large)
    return record


def _writes(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of a write request: a batch {"writes": [...]} or one record."""
    if "writes" not in data:
        return [_record(data, "write")]
    batch = data["writes"]
    if not isinstance(batch, list) or not batch or len(batch) > MAX_WRITES:
        raise ValueError(f"writes must be a list of 1 to {MAX_WRITES} records")
    records = []
    for index, item in enumerate(batch):
        try:
            records.append(_record(item if isinstance(item, dict) else {}, "write"))
        except ValueError as exc:
            raise type(exc)(f"writes[{index}]: {exc}") from None  # RecordTooLarge stays one (413)
    return records


def worker_app(state: RelayState) -> Starlette:
    def scope_of(request: Request) -> RunScope:
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise TokenRefused("no run token (Authorization: Bearer ...)")
        return state.tokens.verify(header[7:].strip())

    async def handle(request: Request, mode: str) -> JSONResponse:
        try:
            scope = scope_of(request)
        except TokenRefused as exc:
            log.warning("refused %s from %s: %s", request.url.path, request.client.host if request.client else "?", exc)
            return _error(401, str(exc))
        try:
            data = await _body(request)
            if mode == "write":
                writes = _writes(data)
            else:
                record = _record(data, mode)
        except ValueError as exc:
            log.warning("refused a %s of run %s: %s", mode, scope.run_id, exc)
            return _error(413 if isinstance(exc, RecordTooLarge) else 400, str(exc))
        if mode == "write" and scope.location_wide:
            log.warning("refused a write with the location token of %s", scope.location)
            return _error(403, "a location token may only read")
        if mode == "write":
            try:
                await asyncio.to_thread(state.spool.append_many, scope.run_id, scope.location, writes)
            except SpoolFull as exc:
                log.warning("spool full: run %s waits (backpressure): %s", scope.run_id, exc)
                return _error(503, str(exc))
            return JSONResponse({"ok": True})
        drained = await asyncio.to_thread(state.spool.wait_forwarded, scope.run_id, state.read_wait_seconds)
        if not drained:
            return _error(503, "this run's earlier writes are not forwarded yet")
        try:
            answer = await asyncio.to_thread(state.upstream.call, scope, record)
        except Exception as exc:  # control plane unreachable: the worker retries
            log.warning("call %s of run %s not answered: %s", record["method"], scope.run_id, exc)
            return _error(503, f"control plane not reachable: {type(exc).__name__}")
        if answer.get("error") is not None:
            return _error(403, answer["error"])
        return JSONResponse({"result": answer["result"]})

    async def write(request: Request) -> JSONResponse:
        return await handle(request, "write")

    async def call(request: Request) -> JSONResponse:
        return await handle(request, "call")

    return Starlette(routes=[Route("/v1/write", write, methods=["POST"]), Route("/v1/call", call, methods=["POST"])])


def control_app(state: RelayState) -> Starlette:
    async def exited(request: Request) -> JSONResponse:
        run_id = request.path_params["run_id"]
        try:
            data = await _body(request)
            scope = RunScope(run_id=run_id, location=str(data["location"]))
        except (ValueError, KeyError) as exc:
            return _error(400, f"bad exit report: {exc}")
        if not state.tokens.is_revoked(run_id):
            report = {k: data.get(k) for k in ("exit_code", "oom_killed", "log_tail", "reason")}
            record = {"method": EXIT_METHOD, "args": "[]", "kwargs": json.dumps(report), "client": "airlock-agent",
                      "seq": 1}
            await asyncio.to_thread(state.spool.append, scope.run_id, scope.location, record)
            state.tokens.revoke(run_id)
        await asyncio.to_thread(state.spool.end, run_id)
        return JSONResponse({"ok": True})

    async def status(request: Request) -> JSONResponse:
        return JSONResponse({"pending": state.spool.pending_of(request.path_params["run_id"])})

    return Starlette(routes=[Route("/control/runs/{run_id}/exited", exited, methods=["POST"]),
                             Route("/control/runs/{run_id}", status, methods=["GET"])])
