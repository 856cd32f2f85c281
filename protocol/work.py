"""Work requests as they cross from the control plane to an agent, and the bytes their signature covers.

The control plane signs every work request; the agent verifies before acting. The signed bytes are a
compact JSON array, so no field can be shifted into another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class WorkKind(StrEnum):
    RECONCILE_LOCATIONS = "RECONCILE_LOCATIONS"
    GRPC_CALL = "GRPC_CALL"
    LAUNCH_RUN = "LAUNCH_RUN"
    TERMINATE_RUN = "TERMINATE_RUN"


@dataclass(frozen=True)
class SignedWork:
    id: str
    kind: WorkKind
    queue: str
    payload: str  # JSON text, exactly as signed
    attempt: int
    signature: str
    signed_by: str


def work_signing_bytes(item_id: str, kind: str, queue: str, payload: str) -> bytes:
    return json.dumps(["airlock-work-v1", item_id, kind, queue, payload], separators=(",", ":")).encode()


def sign_work(key: Any, item_id: str, kind: str, queue: str, payload: Any, attempt: int) -> dict[str, Any]:
    """A work item as the agent receives it (claimWork's shape), signed by the control plane's `key`."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return {"id": item_id, "kind": kind, "queue": queue, "payload": text, "attempt": attempt,
            "signature": key.sign_bytes(work_signing_bytes(item_id, kind, queue, text)), "signedBy": key.key_id}


def ok_result(work_id: str, value: dict[str, Any]) -> dict[str, Any]:
    """The result entry (postResults' and the work channel's shape) for work that succeeded with `value`."""
    return {"id": work_id, "ok": True, "payload": json.dumps(value, separators=(",", ":"))}


def failed_result(work_id: str, error: str) -> dict[str, Any]:
    """The result entry for work that failed, with the message the control plane records."""
    return {"id": work_id, "ok": False, "error": error}


def read_result(entry: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(value, error) of a result entry; an error means the work failed. ValueError if the payload is not JSON."""
    try:
        value = json.loads(entry["payload"]) if entry.get("payload") else None
    except (TypeError, json.JSONDecodeError):
        raise ValueError(f"result {entry.get('id')}: payload is not JSON") from None
    return value, None if entry.get("ok") else (entry.get("error") or "failed without a message")
