"""The run worker's connection to the appliance's metadata relay.

One method, `call`: encode, post, decode. A spooled write (an event, a run-state change) is acknowledged
once the relay has it on disk; any other call waits for the control plane's answer, which the relay gives
only after this run's earlier writes are forwarded (read-your-writes). The relay's "spool full" answer
(503) is backpressure: the worker waits and retries, it never drops the write. Each call carries a client
id and sequence number so a write retried after a lost acknowledgement is stored once.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from protocol.storage_calls import StorageCallRefused, call_mode
from protocol.storage_codec import decode, encode

__all__ = ["RelayClient", "RelayUnavailable", "client_from_env"]

TOKEN_ENV = "AIRLOCK_RUN_TOKEN"
URL_ENV = "AIRLOCK_METADATA_URL"
Send = Callable[[str, dict[str, Any]], dict[str, Any]]  # (path, JSON body) -> JSON answer


class RelayUnavailable(RuntimeError):
    """The relay could not be reached or kept refusing for longer than the retry budget."""


class RelayClient:
    def __init__(self, send: Send, *, retry_seconds: float = 600.0) -> None:
        self.send, self.retry_seconds = send, retry_seconds
        self.client_id = uuid.uuid4().hex
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def call(self, method: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        mode = call_mode(method)  # refuses a method that is not on the allowlist before anything is sent
        with self._lock:
            seq = next(self._seq)
        body = {"method": method, "args": encode(list(args)), "kwargs": encode(kwargs), "client": self.client_id,
                "seq": seq}
        answer = self._send_with_retry(f"/v1/{mode}", body)
        if "error" in answer:
            raise StorageCallRefused(f"{method}: {answer['error']}")
        return decode(answer["result"]) if mode == "call" else None

    def _send_with_retry(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        deadline, delay = time.monotonic() + self.retry_seconds, 0.05
        while True:
            try:
                return self.send(path, body)
            except RelayBusy as exc:  # spool full or relay restarting: wait, never drop
                last: Exception = exc
            except OSError as exc:
                last = exc
            if time.monotonic() > deadline:
                raise RelayUnavailable(f"metadata relay unavailable for {self.retry_seconds:.0f} s: {last}")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


class RelayBusy(OSError):
    """The relay answered 503 (spool full, control plane catching up); retry after a pause."""


def http_sender(url: str, token: str) -> Send:
    import httpx

    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120.0,
                          transport=httpx.HTTPTransport(retries=0))

    def send(path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = client.post(path, json=body)
        except httpx.TransportError as exc:
            raise ConnectionError(str(exc)) from None
        if response.status_code == 503:
            raise RelayBusy(response.text[:200])
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise StorageCallRefused(f"metadata relay refused ({response.status_code}): {message[:1000]}")
        return response.json()

    return send


@functools.cache
def client_from_env(url: str | None = None) -> RelayClient:
    """One client per process and URL: the three storages share its sequence numbers."""
    token = os.environ.get(TOKEN_ENV, "")
    url = url or os.environ.get(URL_ENV, "")
    if not token or not url:
        raise RelayUnavailable(f"{URL_ENV} and {TOKEN_ENV} must be set in a run container")
    return RelayClient(http_sender(url, token))
