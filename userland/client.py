"""The run worker's connection to the appliance's metadata relay.

`call` encodes, posts, decodes. A spooled write (an event, a run-state change) is acknowledged once the
relay has it on disk; any other call waits for the control plane's answer, which the relay gives only after
this run's earlier writes are forwarded (read-your-writes). The relay's "spool full" answer (503) is
backpressure: the worker waits and retries, it never drops the write. Each write carries a client id and
sequence number so a write retried after a lost acknowledgement is stored once.

`write(..., lazy=True)` is write-behind for the bulk of a run's stream (log lines, plain step events): the
write waits in this process for at most `linger` seconds or `max_batch` writes, then goes with the others
in one request and one fsync. Order is kept: any other write or call sends what waits first, and so do
`flush()` (the storages call it when the instance is disposed) and the process's exit. What a container
killed outright (SIGKILL, OOM) had waiting — its last `linger` seconds of log lines — is lost with it, as
its unflushed stdout is.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any

from protocol.backoff import Delays
from protocol.errors import TemporaryError
from protocol.limits import record_too_large
from protocol.storage_calls import StorageCallRefused, call_mode
from protocol.storage_codec import decode, encode

__all__ = ["RelayClient", "RelayUnavailable", "client_from_env"]

TOKEN_ENV = "AIRLOCK_RUN_TOKEN"  # a run container's token: its own run's writes and reads
LOCATION_TOKEN_ENV = "AIRLOCK_LOCATION_TOKEN"  # a code server's: reads for its sensors and schedules
URL_ENV = "AIRLOCK_METADATA_URL"
Send = Callable[[str, dict[str, Any]], dict[str, Any]]  # (path, JSON body) -> JSON answer


class RelayUnavailable(TemporaryError, RuntimeError):
    """The relay could not be reached or kept refusing for longer than the retry budget."""


class RelayClient:
    def __init__(self, send: Send, *, retry_seconds: float = 600.0, linger: float = 0.05,
                 max_batch: int = 1000) -> None:
        self.send, self.retry_seconds = send, retry_seconds
        self.linger, self.max_batch = linger, max_batch
        self.client_id = uuid.uuid4().hex
        self._seq = itertools.count(1)
        self._waiting: list[dict[str, Any]] = []  # lazy writes not sent yet, in sequence order
        self._state = threading.Condition()  # guards _seq and _waiting; wakes the flusher
        self._sending = threading.Lock()  # one request at a time, so the relay sees this client's order
        self._flusher: threading.Thread | None = None
        self._at_exit = False
        self._failed: Exception | None = None
        reset = weakref.WeakMethod(self._forked)
        os.register_at_fork(after_in_child=lambda: (method := reset()) and method())

    def _forked(self) -> None:
        """A forked child is a new writer: its own client id and sequence (the parent's are still in use),
        fresh locks (the parent's flusher may have held one), and none of the parent's waiting writes."""
        self.client_id = uuid.uuid4().hex
        self._seq = itertools.count(1)
        self._waiting = []
        self._state, self._sending = threading.Condition(), threading.Lock()
        self._flusher, self._failed = None, None

    def call(self, method: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Send what waits, then this; a `call` returns the control plane's answer, a `write` None."""
        mode = call_mode(method)  # refuses a method that is not on the allowlist before anything is sent
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise RelayUnavailable(f"earlier writes of this run could not be sent: {failed}") from failed
        body = self._body(method, args, kwargs)
        with self._sending:
            if mode == "write":
                self._send_writes(self._take(body))
                return None
            self._send_writes(self._take())
            with self._state:
                body["seq"] = next(self._seq)
            answer = self._send_with_retry("/v1/call", body)
        if "error" in answer:
            raise StorageCallRefused(f"{method}: {answer['error']}")
        return decode(answer["result"])

    def write(self, method: str, args: tuple, kwargs: dict[str, Any], *, lazy: bool = False) -> None:
        """A spooled write; `lazy` lets it wait (at most `linger` s) to go with others in one request."""
        if not lazy:
            self.call(method, args, kwargs)
            return
        if call_mode(method) != "write":
            raise StorageCallRefused(f"{method} needs an answer; it cannot wait in the write-behind buffer")
        body = self._body(method, args, kwargs)
        with self._state:
            body["seq"] = next(self._seq)
            self._waiting.append(body)
            full = len(self._waiting) >= self.max_batch
            if not full:
                self._start_flusher()
                self._state.notify()
        if full:
            self.flush()

    def _body(self, method: str, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """One call as the relay takes it, without its sequence number (given when it is queued or sent).
        One too large to ever reach the control plane is refused here, to its caller, before it is buffered:
        in a batch the relay would refuse it with every write beside it."""
        body = {"method": method, "args": encode(list(args)), "kwargs": encode(kwargs), "client": self.client_id}
        if (too_large := record_too_large(body)) is not None:
            raise StorageCallRefused(too_large)
        return body

    def flush(self) -> None:
        """Send every write that waits; returns once the relay has them on disk."""
        with self._sending:
            self._send_writes(self._take())

    def _take(self, then: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """What waits (and `then`, numbered after it), removed from the buffer. Call with _sending held."""
        with self._state:
            batch, self._waiting = self._waiting, []
            if then is not None:
                then["seq"] = next(self._seq)
                batch.append(then)
        return batch

    def _send_writes(self, batch: list[dict[str, Any]]) -> None:
        for start in range(0, len(batch), self.max_batch):
            answer = self._send_with_retry("/v1/write", {"writes": batch[start:start + self.max_batch]})
            if "error" in answer:
                raise StorageCallRefused(f"{batch[start]['method']}: {answer['error']}")

    def _start_flusher(self) -> None:
        if self._flusher is None or not self._flusher.is_alive():  # a forked child does not inherit it
            self._flusher = threading.Thread(target=self._flush_lingering, name="airlock-relay-flush", daemon=True)
            self._flusher.start()
            if not self._at_exit:
                atexit.register(self.flush)
                self._at_exit = True

    def _flush_lingering(self) -> None:
        while True:
            with self._state:
                self._state.wait_for(lambda: bool(self._waiting))
            time.sleep(self.linger)  # let more writes join; a full buffer is sent by its own writer
            try:
                self.flush()
            except Exception as exc:  # the next call raises it: a lazy write has no caller to tell
                self._failed = exc

    def _send_with_retry(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        deadline, delays = time.monotonic() + self.retry_seconds, Delays(base=0.05, cap=2.0)
        while True:
            try:
                return self.send(path, body)
            except RelayBusy as exc:  # spool full or relay restarting: wait, never drop
                last: Exception = exc
            except OSError as exc:
                last = exc
            if time.monotonic() > deadline:
                raise RelayUnavailable(f"metadata relay unavailable for {self.retry_seconds:.0f} s: {last}")
            time.sleep(delays.next())


class RelayBusy(TemporaryError, OSError):
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
    token = os.environ.get(TOKEN_ENV) or os.environ.get(LOCATION_TOKEN_ENV, "")
    url = url or os.environ.get(URL_ENV, "")
    if not token or not url:
        raise RelayUnavailable(f"{URL_ENV} and {TOKEN_ENV} (a run) or {LOCATION_TOKEN_ENV} (a code server) must be "
                               "set: this container has no storage")
    return RelayClient(http_sender(url, token))
