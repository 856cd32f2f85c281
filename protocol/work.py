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
