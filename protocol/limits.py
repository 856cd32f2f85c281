"""Request-size limits both ends of the agent API agree on: the gateway enforces them, the appliance (and the
run workers' storage client) stay under them, so nothing is sent that would be refused on every retry."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["AGENT_MAX_BODY", "DEFAULT_MAX_BODY", "MAX_RECORD_BYTES", "REQUEST_ROOM", "encoded_size", "record_too_large"]

DEFAULT_MAX_BODY = 1024 * 1024  # anyone's request
AGENT_MAX_BODY = 8 * 1024 * 1024  # a request naming an enrolled, unrevoked agent's key: spooled run metadata, results
REQUEST_ROOM = 64 * 1024  # what a request needs around its items: the query text, the JSON of the variables
MAX_RECORD_BYTES = AGENT_MAX_BODY - REQUEST_ROOM  # one storage record in a storageWrite/storageCall request
_SEQ_ALLOWANCE = 32  # `"seq": <n>` when the record is checked before its sequence number is given


def encoded_size(value: Any) -> int:
    """Bytes of `value` as JSON with ASCII escapes: never less than the compact UTF-8 that httpx sends."""
    return len(json.dumps(value))


def record_too_large(record: dict[str, Any]) -> str | None:
    """Why this storage record ({method, args, kwargs, client[, seq]}) could never reach the control plane, or
    None."""
    size = encoded_size(record) + (0 if "seq" in record else _SEQ_ALLOWANCE)
    if size <= MAX_RECORD_BYTES:
        return None
    return (f"{record.get('method')} of {size} bytes is over the {MAX_RECORD_BYTES} bytes one storage record may "
            "have on its way to the control plane (keep large data in the asset's own storage, not in event metadata)")
