"""Which Dagster gRPC methods cross the airlock, and the GRPC_CALL work item that carries one raw call.

The table is the allowlist both sides enforce: the control plane's relay refuses anything not relayed here,
and the agent refuses it again before dialling the code server (defence in depth: a forged or buggy work item
still cannot reach ShutdownServer). It lists every method of `service DagsterApi` in Dagster 1.13's
`dagster/_grpc/protos/dagster_api.proto` (28: 23 unary-unary, 5 unary-stream) plus the two methods of
`grpc.health.v1.Health` that Dagster's server registers. A method missing from the table is unknown, which is
not the same as refused: the relay answers UNIMPLEMENTED for it, as a code server of another version would.

Calls travel as opaque protobuf bytes, never parsed: Dagster's messages are thin wrappers around serdes strings,
and relaying bytes keeps airlock free of a dagster dependency and of proto version skew. This module is pure
(no grpc import): status codes travel as their names ("UNAVAILABLE"), validated against the fixed gRPC set.

Payload (control plane -> agent):  {"location", "method": "/api.DagsterApi/Ping", "request_b64", "deadline"}
Result  (agent -> control plane):  {"responses": [b64, ...]}  and, if the call failed, "error": {code, details}.
A stream that failed part way keeps the messages it already produced, so the caller sees them, then the error.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from protocol.dagster_grpc import SERVICE
from protocol.errors import PermanentError

__all__ = [
    "BY_PATH",
    "HEALTH_SERVICE",
    "METHODS",
    "STATUS_CODES",
    "Arity",
    "GrpcCall",
    "GrpcCallError",
    "GrpcMethod",
    "GrpcResult",
    "lookup",
]

HEALTH_SERVICE = "grpc.health.v1.Health"

# grpc.StatusCode names except OK: the only codes an error result may carry.
STATUS_CODES = frozenset({
    "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
})


class Arity(StrEnum):
    UNARY_UNARY = "unary_unary"
    UNARY_STREAM = "unary_stream"


@dataclass(frozen=True)
class GrpcMethod:
    """One method of the table; `reason` says why it is relayed or, for a refused one, why not."""

    service: str
    name: str
    arity: Arity
    relayed: bool
    reason: str

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


_UU, _US = Arity.UNARY_UNARY, Arity.UNARY_STREAM
_RUNS_REFUSED = "runs start only as LAUNCH_RUN, each in its own hardened container, never inside the code server"


def _api(name: str, arity: Arity, reason: str, *, relayed: bool = True) -> GrpcMethod:
    return GrpcMethod(SERVICE, name, arity, relayed, reason)


# In the proto's order, so a diff against a new Dagster release reads straight down.
METHODS: tuple[GrpcMethod, ...] = (
    _api("Ping", _UU, "liveness probe used by the webserver and daemon"),
    _api("Heartbeat", _UU, "keeps a heartbeat-watching code server alive; answers an echo"),
    _api("StreamingPing", _US, "streamed liveness probe (Dagster's own tests and tooling)"),
    _api("GetServerId", _UU, "change detection, polled about once a second; cached briefly by the relay"),
    _api("ExecutionPlanSnapshot", _UU, "read-only: builds the execution plan the UI shows and the launcher needs"),
    _api("ListRepositories", _UU, "read-only: which repositories the location serves"),
    _api("ExternalPartitionNames", _UU, "read-only: partition names for the UI and backfills"),
    _api("ExternalNotebookData", _UU, "read-only: a .ipynb under the code server's working dir (Dagster checks)"),
    _api("ExternalPartitionConfig", _UU, "read-only: run config of one partition"),
    _api("ExternalPartitionTags", _UU, "read-only: tags of one partition"),
    _api("ExternalPartitionSetExecutionParams", _US, "read-only: backfill parameters, streamed in chunks"),
    _api("ExternalPipelineSubsetSnapshot", _UU, "read-only: a job subset's snapshot for the launchpad"),
    _api("ExternalRepository", _UU, "read-only: the repository snapshot the workspace loads"),
    _api("ExternalJob", _UU, "read-only: one job's snapshot"),
    _api("StreamingExternalRepository", _US, "read-only: the repository snapshot in chunks (large repositories)"),
    _api("ExternalScheduleExecution", _US, "the daemon's schedule tick: evaluates user code, the code "
         "server's purpose"),
    _api("SyncExternalScheduleExecution", _UU, "schedule tick evaluation, unary form"),
    _api("ExternalSensorExecution", _US, "the daemon's sensor tick: evaluates user code, the code server's "
         "purpose"),
    _api("SyncExternalSensorExecution", _UU, "sensor tick evaluation, unary form"),
    _api("ShutdownServer", _UU, "the agent owns code server lifecycles (reconcile); Dagster treats a refusal "
         "as 'already shut down'", relayed=False),
    _api("CancelExecution", _UU, "runs never execute in the code server; TERMINATE_RUN stops a run's container",
         relayed=False),
    _api("CanCancelExecution", _UU, "read-only: always false here, since no run executes in the code server"),
    _api("StartRun", _UU, _RUNS_REFUSED, relayed=False),
    _api("GetCurrentImage", _UU, "read-only: the image the code server reports"),
    _api("GetCurrentRuns", _UU, "read-only: runs executing in the code server (none here)"),
    _api("ReloadCode", _UU, "reloads definitions from the same image; a no-op for `dagster api grpc`"),
    _api("RefreshComponentState", _UU, "UI action: refreshes state-backed components through the user's own "
         "instance (userland storage), not the control plane's"),
    _api("ReloadCodeWithState", _UU, "reloads definitions pinned to a defs-state version; same image"),
    GrpcMethod(HEALTH_SERVICE, "Check", _UU, True, "standard gRPC health probe of the code server"),
    GrpcMethod(HEALTH_SERVICE, "Watch", _US, False, "an endless stream cannot be carried by one work item; "
               "poll Health/Check instead"),
)

BY_PATH: Mapping[str, GrpcMethod] = {m.path: m for m in METHODS}


def lookup(path: str) -> GrpcMethod | None:
    """The table entry for a full method path ("/api.DagsterApi/Ping"), or None if it is unknown."""
    return BY_PATH.get(path)


class GrpcCallError(PermanentError, ValueError):
    """A GRPC_CALL payload or result that does not have the documented shape."""


@dataclass(frozen=True)
class GrpcCall:
    """One raw call to relay. `deadline` is seconds the agent may spend on it, counted from when it starts;
    None lets the agent apply its own cap."""

    location: str
    method: str
    request: bytes
    deadline: float | None

    def to_payload(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "method": self.method,
            "request_b64": _b64(self.request),
            "deadline": self.deadline,
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> GrpcCall:
        """Validate and decode; unknown keys are ignored so a newer control plane may add fields."""
        location, method = payload.get("location"), payload.get("method")
        if not isinstance(location, str) or not location:
            raise GrpcCallError("GRPC_CALL payload: 'location' must be a non-empty string")
        if not isinstance(method, str) or not method.startswith("/"):
            raise GrpcCallError("GRPC_CALL payload: 'method' must be a full path like '/api.DagsterApi/Ping'")
        deadline = payload.get("deadline")
        if deadline is not None and (
            isinstance(deadline, bool) or not isinstance(deadline, int | float) or not deadline > 0
        ):
            raise GrpcCallError("GRPC_CALL payload: 'deadline' must be a positive number of seconds or null")
        request = _unb64(payload.get("request_b64"), "request_b64")
        return cls(location, method, request, None if deadline is None else float(deadline))


@dataclass(frozen=True)
class GrpcResult:
    """What the code server answered: the response messages (one for unary), then an error if it failed."""

    responses: tuple[bytes, ...] = ()
    code: str | None = None  # a STATUS_CODES name when the call failed
    details: str = ""

    def __post_init__(self) -> None:
        if self.code is not None and self.code not in STATUS_CODES:
            raise GrpcCallError(f"GRPC_CALL result: unknown gRPC status code {self.code!r}")

    @property
    def ok(self) -> bool:
        return self.code is None

    @classmethod
    def failure(cls, code: str, details: str, responses: Sequence[bytes] = ()) -> GrpcResult:
        return cls(tuple(responses), code, details)

    def to_result(self) -> dict[str, Any]:
        result: dict[str, Any] = {"responses": [_b64(r) for r in self.responses]}
        if self.code is not None:
            result["error"] = {"code": self.code, "details": self.details}
        return result

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> GrpcResult:
        raw = result.get("responses", [])
        if not isinstance(raw, list):
            raise GrpcCallError("GRPC_CALL result: 'responses' must be a list of base64 strings")
        responses = tuple(_unb64(r, "responses[]") for r in raw)
        error = result.get("error")
        if error is None:
            return cls(responses)
        if not isinstance(error, Mapping) or not isinstance(error.get("code"), str):
            raise GrpcCallError("GRPC_CALL result: 'error' must be {code, details}")
        details = error.get("details", "")
        return cls(responses, error["code"], details if isinstance(details, str) else str(details))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise GrpcCallError(f"GRPC_CALL: {field!r} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise GrpcCallError(f"GRPC_CALL: {field!r} is not valid base64") from exc
